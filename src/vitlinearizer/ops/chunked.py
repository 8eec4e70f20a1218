"""Chunked linear recurrence in pure PyTorch (the SSD "minimal" algorithm, generalised to GLA decays).

The sequence is cut into chunks of Q tokens. Inside a chunk the recurrence is evaluated in its quadratic
(attention-like) form; between chunks only the (N, P) state is carried. Work is O(L·Q·(N+P)) per head and
matmul-bound, and autograd provides the backward pass.

Two ways to evaluate the within-chunk decay weights ``exp(cum_i - cum_j)`` (``cum``: cumulative log-decay
inside the chunk, ``j <= i``):

- ``exact``: materialise every weight as ``exp`` of a difference, which is <= 0 by construction, so nothing
  ever overflows (strong decay of -20 per token underflows to zero). Costs one (Q, Q) matrix per head
  (per-head decay) or one (Q, Q, N) tensor per head (per-channel decay) and a few passes over it.
- ``factored``: split the weight around the chunk's half-way log-decay ``m = cum_last / 2`` as
  ``exp(cum_i - m) * exp(m - cum_j)`` and fold the two factors into q/v (per-head) or q/k (per-channel).
  The intra-chunk term then becomes plain matmuls: for Mamba-2 (one q/k group) ``scores @ (w * v)`` is ONE
  batched GEMM over all heads in the natural (B, L, H, P) layout, with no per-head (Q, Q) tensors, no
  layout copies and no final permute. Each factor is bounded by ``exp(span / 2)`` where
  ``span = -cum_last`` is the total log-decay of the chunk, so the path is taken only when every chunk's
  span is <= ``MAX_FACTORED_SPAN``; the output is also checked for inf/nan and recomputed with ``exact``
  should an extreme activation still overflow. Masked (j > i) entries are removed with ``masked_fill``
  (never by multiplying with 0), so an overflow there cannot turn into a NaN, also not in the backward.

``auto`` (the default) uses ``factored`` when it is safe, first at the requested chunk size and then at halves
of it (each halving halves every chunk's span) down to ``MIN_FACTORED_CHUNK``, and ``exact`` otherwise; both
are tested against the naive loop (tests/test_ops.py, tests/test_fast_paths.py). Without autograd, the kernels
update their own temporaries in place.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._serial import serial_slices
from ._validate import accumulation_dtype, expand_groups, grad_needed

# Chosen from benchmarks/ops.py on 2 CPU cores (see docs/performance.md, "Chunk size"). Per-head decays: the
# factored path is three GEMMs per chunk whose efficiency grows with Q while the intra-chunk work grows as Q²;
# 64 is the measured optimum at L = 1025..4097. Per-channel decays: the factored path has the same structure
# per head; the exact fallback materialises a (Q, Q, N) tensor per head and prefers small chunks.
DEFAULT_CHUNK_SIZE_PER_HEAD = 64
DEFAULT_CHUNK_SIZE_PER_CHANNEL = 64
EXACT_CHUNK_SIZE_PER_CHANNEL = 16
# Largest total log-decay of one chunk for which the factored path is used: factors stay within
# exp(±MAX_FACTORED_SPAN / 2) = exp(±50) ≈ 5e21, far inside the float32 range (3e38).
MAX_FACTORED_SPAN = 100.0
# A chunk whose span exceeds MAX_FACTORED_SPAN makes the factored path retry at half the chunk size (half the
# span) down to this size before the exact path takes over: at Mamba-2's initial decays (A up to 16, dt up to
# 0.1: up to 1.6 per token) a 128-token chunk exceeds the limit in most layers, a 64-token one in a few, and the
# factored path at Q=32 is still as fast as the exact one at Q=64 (benchmarks/ops.py).
MIN_FACTORED_CHUNK = 32
# Per-token log-decays below this are clamped to it. Its exp (~1e-48) is zero to float32 and negligible next to
# any float64 state, so a decay this strong is a reset of the state, as -inf (a decay of exactly 0, e.g. at the
# boundary of two packed sequences) or -1e4 is. Unclamped, the within-chunk cumulative sums would turn -inf into
# NaN (-inf - -inf) and a huge finite value into lost precision for every later token of the chunk (the
# differences of large sums), while the naive and step paths handle both.
LOG_DECAY_FLOOR = -110.0
METHODS = ("auto", "exact")


def _pad_to_chunks(x: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Zero-pad dim 1 (length) to a multiple of the chunk size; zero k/v and zero log-decay leave the state unchanged."""
    pad = (-x.shape[1]) % chunk_size
    if pad == 0:
        return x
    widths = [0, 0] * (x.dim() - 2) + [0, pad]
    return F.pad(x, widths)


def _carry_states(chunk_states, chunk_decay, initial_state):
    """The exact paths' chunk states scanned into the state *entering* each chunk.

    chunk_states: (B, C, ...) state produced inside each chunk from a zero start;
    chunk_decay:  (B, C, ...) broadcastable total decay across each chunk;
    returns (states entering each chunk (B, C, ...), final state (B, ...)).
    """
    chunks = chunk_states.shape[1]
    if not grad_needed(chunk_states, chunk_decay, initial_state) and not _capturing_graph():
        # Each entering state is written straight into one buffer (no per-chunk tensors, no final stack copy);
        # not while a graph is captured, where dynamo refuses `out=` views.
        entering = chunk_states.new_empty(chunk_states.shape)
        entering[:, 0] = initial_state
        _scan_into(entering, chunk_states, chunk_decay)
        return entering, torch.addcmul(chunk_states[:, -1], entering[:, -1], chunk_decay[:, -1])
    state = initial_state
    entering = []
    for c in range(chunks):
        entering.append(state)
        state = torch.addcmul(chunk_states[:, c], state, chunk_decay[:, c])
    return torch.stack(entering, dim=1), state


def _scan_into(entering: torch.Tensor, added: torch.Tensor, factor: torch.Tensor) -> None:
    """``entering[:, c + 1] = added[:, c] + factor[:, c] * entering[:, c]`` for every chunk c but the last, in place.

    ``entering`` and ``added`` (B, C, S1, ...), ``entering[:, 0]`` set by the caller; ``factor`` (B, C, 1 or S1, ...).
    One op per chunk, on CPU per row piece of :func:`~vitlinearizer.ops._serial.serial_slices` (each piece's chain
    runs on the calling thread).
    """
    for rows in serial_slices(added[:, 0], dim=1):
        into, add = entering[:, :, rows], added[:, :, rows]
        scale = factor if factor.shape[2] == 1 else factor[:, :, rows]
        for c in range(added.shape[1] - 1):
            torch.addcmul(add[:, c], into[:, c], scale[:, c], out=into[:, c + 1])


def _carry_factored(states, half, initial_state):
    """The factored paths' chunk states scanned into the states entering each chunk: one op per chunk.

    states: (B, C, *S) state each chunk produces from a zero start, times ``exp(-half)`` (the factored
        convention: the true state is ``exp(half_c) * states_c``); overwritten when autograd is off;
    half: (B, C, ...) half of each chunk's total log-decay, broadcastable against one state (B, *S);
    initial_state: (B, *S).
    Returns (entering (B, C, *S), final state (B, *S)) with ``entering_c = exp(half_c) * S_c``, S_c the state
    before chunk c: the factor the output rows of chunk c expect.

    From S_{c+1} = exp(2 half_c) S_c + exp(half_c) states_c follows E_{c+1} = f_c (E_c + states_c) with
    E_c = exp(half_c) S_c and f_c = exp(half_c + half_{c+1}) <= 1 (no exponent is positive); taking
    half_C = 0 makes E_C the final state. With the states pre-scaled by f, each step is one ``addcmul`` on a
    state that stays in cache, instead of three.
    """
    chunks = states.shape[1]
    following = torch.cat([half[:, 1:], torch.zeros_like(half[:, :1])], 1)
    f = (half + following).exp()
    if not grad_needed(states, half, initial_state):
        scaled = states.mul_(f)
        entering = states.new_empty(states.shape)
        torch.mul(initial_state, half[:, 0].exp(), out=entering[:, 0])
        _scan_into(entering, scaled, f)
        return entering, torch.addcmul(scaled[:, -1], entering[:, -1], f[:, -1])
    scaled = states * f
    out = [initial_state * half[:, 0].exp()]
    for c in range(chunks):
        out.append(torch.addcmul(scaled[:, c], out[-1], f[:, c]))
    return torch.stack(out[:-1], 1), out[-1]


def _capturing_graph() -> bool:
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def _max_span(cum_last: torch.Tensor) -> float:
    if cum_last.numel() == 0 or cum_last.device.type == "meta":  # meta: shape-only runs (FLOP counting)
        return 0.0
    return float(cum_last.detach().amin().neg())


# ------------------------------------------------------------------------------------------ per-head decay
def _per_head_chunks(q, k, v, log_decay, chunk_size):
    """Pad to whole chunks; returns (q, k, v, cumulative log-decay inside each chunk (B, C, Q, H), chunks)."""
    q, k, v, log_decay = (_pad_to_chunks(t, chunk_size) for t in (q, k, v, log_decay))
    chunks = q.shape[1] // chunk_size
    cum = log_decay.reshape(q.shape[0], chunks, chunk_size, v.shape[2]).cumsum(2)
    return q, k, v, cum, chunks


def _scale_rows(y, u, length, grad, out):
    """y (B, C*Q, H, P) times the row factors u (B, C*Q, H, 1), cut to ``length`` tokens; written into ``out``
    (B, length, H, P) when given, which saves the caller a copy."""
    y, u = y[:, :length], u[:, :length]
    if out is not None:
        return torch.mul(y, u, out=out)
    return y * u if grad else y.mul_(u)


def _per_head_factored(q, k, v, log_decay, initial_state, chunk_size, want_state=True, out=None):
    """Per-head decay, factored weights; None when a chunk's span is too large (caller falls back to exact).

    Returns (y, final state), the state None when ``want_state`` is False and nothing needs carrying (one
    chunk, no initial state): short training sequences then skip the state GEMM and the chunk carry.
    ``out``: optional (B, L, H, P) buffer for y (no autograd).
    """
    batch, length, groups, key_dim = q.shape
    heads, value_dim = v.shape[2], v.shape[3]
    rep = heads // groups
    grad = grad_needed(q, k, v, log_decay, initial_state)
    q, k, v, cum, chunks = _per_head_chunks(q, k, v, log_decay, chunk_size)
    bc = batch * chunks
    half = cum[:, :, -1:] * 0.5  # (B, C, 1, H): the half-way point m of each chunk's log-decay
    if _max_span(half) * 2 > MAX_FACTORED_SPAN:
        return None
    u = (cum - half).exp()  # exp(cum_i - m), applied to the output rows
    # exp(m - cum_j), applied to the values; not 1/u, whose backward (-1/u²) overflows once span/2 > ~44.
    w = (half - cum).exp()
    vw = (v.reshape(batch, chunks, chunk_size, heads, value_dim) * w[..., None]).reshape(bc, chunk_size, heads * value_dim)
    qg = q.reshape(bc, chunk_size, groups, key_dim)
    kg = k.reshape(bc, chunk_size, groups, key_dim)
    upper = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).triu(1)

    carry = want_state or chunks > 1 or initial_state is not None
    ys, states = [], []
    for g in range(groups):  # Mamba-2 has one group: one GEMM per term for all heads
        qq, kk = qg[:, :, g], kg[:, :, g]
        vg = vw if groups == 1 else vw.view(bc, chunk_size, groups, rep * value_dim)[:, :, g]
        scores = torch.bmm(qq, kk.transpose(1, 2)).masked_fill_(upper, 0.0)  # (BC, Q, Q)
        ys.append(torch.bmm(scores, vg))  # intra-chunk, still without the exp(cum_i - m) row factor
        if carry:
            states.append(torch.bmm(kk.transpose(1, 2), vg))  # (BC, N, R*P), times exp(-m) of the true state
    if not carry:
        y = ys[0] if groups == 1 else torch.stack(ys, 2)
        return _scale_rows(y.view(batch, chunk_size, heads, value_dim), u.view(batch, chunk_size, heads, 1),
                           length, grad, out), None
    states = states[0] if groups == 1 else torch.stack(states, 2)
    states = states.view(batch, chunks, key_dim, heads, value_dim)

    # y_i = exp(cum_i - m) * [sum_j s_ij w_j v_j + exp(m) q_i^T S_entering].
    if initial_state is None:
        state = states.new_zeros(batch, key_dim, heads, value_dim)
    else:
        state = initial_state.to(states.dtype).transpose(1, 2)
    entering, final_state = _carry_factored(states, half.view(batch, chunks, 1, heads, 1), state)
    final_state = final_state.transpose(1, 2)
    entering = entering.reshape(bc, key_dim, heads * value_dim)
    for g in range(groups):
        eg = entering if groups == 1 else entering.view(bc, key_dim, groups, rep * value_dim)[:, :, g]
        ys[g] = torch.baddbmm(ys[g], qg[:, :, g], eg) if grad else ys[g].baddbmm_(qg[:, :, g], eg)
    y = ys[0] if groups == 1 else torch.stack(ys, 2)
    padded = chunks * chunk_size
    return _scale_rows(y.view(batch, padded, heads, value_dim), u.view(batch, padded, heads, 1), length, grad,
                       out), final_state


def _per_head_exact(q, k, v, log_decay, initial_state, chunk_size):
    batch, length, groups, key_dim = q.shape
    heads, value_dim = v.shape[2], v.shape[3]
    rep = heads // groups
    grad = grad_needed(q, k, v, log_decay, initial_state)
    q, k, v, cum, chunks = _per_head_chunks(q, k, v, log_decay, chunk_size)
    bc = batch * chunks
    qg = q.reshape(bc, chunk_size, groups, key_dim)
    kg = k.reshape(bc, chunk_size, groups, key_dim)
    vv = v.reshape(bc, chunk_size, heads, value_dim)

    # Intra-chunk: y_i = sum_{j<=i} exp(cum_i - cum_j) (q_i . k_j) v_j, one (Q, Q) weight matrix per head.
    upper = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).triu(1)
    cum_h = cum.permute(3, 0, 1, 2).reshape(heads, bc, chunk_size)  # (H, BC, Q)
    segment = (cum_h[..., :, None] - cum_h[..., None, :]).masked_fill_(upper, float("-inf")).exp_()
    scores = torch.stack([torch.bmm(qg[:, :, g], kg[:, :, g].transpose(1, 2)) for g in range(groups)])
    scores = scores[:, None]  # (G, 1, BC, Q, Q)
    weights = segment.view(groups, rep, bc, chunk_size, chunk_size)
    weights = weights * scores if grad else weights.mul_(scores)
    v_heads = vv.permute(2, 0, 1, 3).reshape(heads * bc, chunk_size, value_dim)
    intra = torch.bmm(weights.reshape(heads * bc, chunk_size, chunk_size), v_heads).view(heads, bc, chunk_size, value_dim)

    # State each chunk hands on (from a zero start): sum_j exp(cum_last - cum_j) k_j v_j^T.
    to_end = (cum[:, :, -1:] - cum).exp().view(bc, chunk_size, heads, 1)
    weighted_v = vv * to_end  # (BC, Q, H, P)
    states = [torch.bmm(kg[:, :, g].transpose(1, 2), weighted_v[:, :, g * rep:(g + 1) * rep].reshape(bc, chunk_size, -1))
              for g in range(groups)]
    states = (states[0] if groups == 1 else torch.stack(states, 2)).view(batch, chunks, key_dim, heads, value_dim)
    decay = cum[:, :, -1].exp().view(batch, chunks, 1, heads, 1)
    if initial_state is None:
        state = states.new_zeros(batch, key_dim, heads, value_dim)
    else:
        state = initial_state.to(states.dtype).transpose(1, 2)
    entering, final_state = _carry_states(states, decay, state)
    entering = entering.reshape(bc, key_dim, heads * value_dim)  # a stack of strided states under graph capture

    # Inter-chunk: y_i = exp(cum_i) q_i^T S_entering, then add the intra-chunk part (head-major -> natural).
    carried = [torch.bmm(qg[:, :, g], entering.view(bc, key_dim, groups, -1)[:, :, g]) for g in range(groups)]
    y = (carried[0] if groups == 1 else torch.stack(carried, 2)).view(bc, chunk_size, heads, value_dim)
    ecum = cum.exp().view(bc, chunk_size, heads, 1)
    y = y * ecum if grad else y.mul_(ecum)
    intra = intra.permute(1, 2, 0, 3)
    y = y + intra if grad else y.add_(intra)
    y = y.view(batch, chunks * chunk_size, heads, value_dim)[:, :length]
    return y, final_state.transpose(1, 2)


# --------------------------------------------------------------------------------------- per-channel decay
def _head_major(x: torch.Tensor, batch: int, chunks: int, chunk_size: int) -> torch.Tensor:
    """(B, C*Q, H, D) -> contiguous (B*C*H, Q, D)."""
    heads, dim = x.shape[2], x.shape[3]
    return x.reshape(batch, chunks, chunk_size, heads, dim).transpose(2, 3).reshape(-1, chunk_size, dim)


def _token_major(y, batch, chunks, chunk_size, length, out):
    """Head-major (B*C*H, Q, P) -> (B, length, H, P); copied into ``out`` when given."""
    heads, value_dim = y.shape[0] // (batch * chunks), y.shape[-1]
    y = y.view(batch, chunks, heads, chunk_size, value_dim).transpose(2, 3)
    if out is not None and length == chunks * chunk_size:  # no padding to cut: one copy, straight into out
        out.view(batch, chunks, chunk_size, heads, value_dim).copy_(y)
        return out
    y = y.reshape(batch, chunks * chunk_size, heads, value_dim)[:, :length]
    return y if out is None else out.copy_(y)


def _per_channel_factored(q, k, v, log_decay, initial_state, chunk_size, want_state=True, out=None):
    batch, length, heads, key_dim = q.shape
    value_dim = v.shape[3]
    grad = grad_needed(q, k, v, log_decay, initial_state)
    q, k, v, log_decay = (_pad_to_chunks(t, chunk_size) for t in (q, k, v, log_decay))
    chunks = q.shape[1] // chunk_size
    # Head-major (B, C, H, Q, D) views; the ops below write contiguous results from them, so the layout change
    # of q, k and the log-decays costs no copy of its own (only v is copied).
    q, k, log_decay = (t.view(batch, chunks, chunk_size, heads, key_dim).transpose(2, 3) for t in (q, k, log_decay))
    v = _head_major(v, batch, chunks, chunk_size)  # (BCH, Q, P)
    cum = log_decay.cumsum(3)  # contiguous (B, C, H, Q, N)
    half = cum[..., -1:, :] * 0.5  # (B, C, H, 1, N)
    if _max_span(half) * 2 > MAX_FACTORED_SPAN:
        return None
    up, down = (cum - half).exp(), (half - cum).exp()  # exp(cum_i - m) for the queries, exp(m - cum_j) for the keys
    q_t = (up * q if grad else up.mul_(q)).view(-1, chunk_size, key_dim)  # the result takes up's contiguous layout
    k_t = (down * k if grad else down.mul_(k)).view(-1, chunk_size, key_dim)
    upper = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).triu(1)
    scores = torch.bmm(q_t, k_t.transpose(1, 2)).masked_fill_(upper, 0.0)  # (BCH, Q, Q)
    y = torch.bmm(scores, v)  # (BCH, Q, P)
    if not want_state and chunks == 1 and initial_state is None:  # nothing to carry (see _per_head_factored)
        return _token_major(y, batch, chunks, chunk_size, length, out), None
    states = torch.bmm(k_t.transpose(1, 2), v)  # (BCH, N, P) times exp(-m) per key row

    if initial_state is None:
        state = states.new_zeros(batch, heads, key_dim, value_dim)
    else:
        state = initial_state.to(states.dtype)
    states = states.view(batch, chunks, heads, key_dim, value_dim)
    entering, final_state = _carry_factored(states, half.transpose(3, 4), state)
    entering = entering.view(-1, key_dim, value_dim)
    y = torch.baddbmm(y, q_t, entering) if grad else y.baddbmm_(q_t, entering)
    return _token_major(y, batch, chunks, chunk_size, length, out), final_state


def _per_channel_exact(q, k, v, log_decay, initial_state, chunk_size):
    # q, k, log_decay: (B, L, H, N); v: (B, L, H, P).
    batch, length, heads, key_dim = q.shape
    value_dim = v.shape[3]
    q, k, v, log_decay = (_pad_to_chunks(t, chunk_size) for t in (q, k, v, log_decay))
    chunks = q.shape[1] // chunk_size
    shape = (batch, chunks, chunk_size, heads)
    q, k, cum = (t.view(*shape, key_dim).transpose(2, 3) for t in (q, k, log_decay))  # (B, C, H, Q, N)
    cum = cum.cumsum(3)
    v = v.view(*shape, value_dim).transpose(2, 3)  # (B, C, H, Q, P)

    # Intra-chunk: A_ij = sum_n q_in k_jn exp(cum_in - cum_jn) for j <= i; a (Q, Q, N) tensor per chunk.
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).tril()[..., None]
    segment = (cum[..., :, None, :] - cum[..., None, :, :]).masked_fill(~causal, float("-inf")).exp()
    scores = (q[..., :, None, :] * k[..., None, :, :] * segment).sum(-1)  # (B, C, H, Q, Q)
    y = scores @ v  # (B, C, H, Q, P)

    to_end = (cum[..., -1:, :] - cum).exp()  # (B, C, H, Q, N)
    chunk_states = (k * to_end).transpose(-1, -2) @ v  # (B, C, H, N, P)
    if initial_state is None:
        initial_state = chunk_states.new_zeros(batch, heads, key_dim, value_dim)
    else:
        initial_state = initial_state.to(chunk_states.dtype)
    chunk_decay = cum[..., -1, :].exp()[..., None]  # (B, C, H, N, 1)
    entering, final_state = _carry_states(chunk_states, chunk_decay, initial_state)

    y = y + (q * cum.exp()) @ entering  # (B, C, H, Q, P)
    y = y.transpose(2, 3).reshape(batch, chunks * chunk_size, heads, value_dim)[:, :length]
    return y, final_state


def _recurrence(q, k, v, log_decay, initial_state, chunk_size, method, per_head, want_state=True, out=None):
    """One pass of the chunked kernel (inputs already in the accumulation dtype); returns (y, state), the
    state possibly None when ``want_state`` is False. ``out``: optional buffer y is written to (no autograd); the
    factored kernels write their last pass straight into it when it has the accumulation dtype."""
    result = None
    length = q.shape[1]
    direct = out if out is not None and out.dtype == q.dtype else None
    # The factored method decides from the data (span guard, overflow check); a graph being captured
    # (torch.compile, torch.export, tracing) cannot branch on data, so it gets the exact method, which is safe
    # for every input.
    if method != "exact" and not _capturing_graph():
        size = chunk_size or (DEFAULT_CHUNK_SIZE_PER_HEAD if per_head else DEFAULT_CHUNK_SIZE_PER_CHANNEL)
        size = max(1, min(size, length))  # a sequence shorter than a chunk is one chunk, not padded
        if not per_head:
            heads = v.shape[2]
            q, k = expand_groups(q, heads), expand_groups(k, heads)
        factored = _per_head_factored if per_head else _per_channel_factored
        while True:
            result = factored(q, k, v, log_decay, initial_state, size, want_state, direct)
            if result is not None or size // 2 < MIN_FACTORED_CHUNK:
                break
            size //= 2  # halves every chunk's decay span; still faster than the exact path
        # A finite input whose factors still overflow (extreme activations) gets the exact path. Any inf/nan
        # element makes the sum inf/nan: one read pass instead of isfinite's four (a finite sum that
        # overflows only costs a needless, still exact, recomputation).
        if result is not None and result[0].device.type != "meta" and not bool(torch.isfinite(result[0].sum())):
            result = None
    if result is None:
        if per_head:
            result = _per_head_exact(q, k, v, log_decay, initial_state, chunk_size or DEFAULT_CHUNK_SIZE_PER_HEAD)
        else:
            heads = v.shape[2]  # expand_groups returns q, k unchanged when already expanded above
            result = _per_channel_exact(expand_groups(q, heads), expand_groups(k, heads), v, log_decay,
                                        initial_state, chunk_size or EXACT_CHUNK_SIZE_PER_CHANNEL)
    if out is not None and result[0] is not out:
        result = out.copy_(result[0]), result[1]
    return result


# Without autograd, sequences longer than ~1.5x this run in segments of about this many tokens (whole chunks),
# carrying the state: every temporary stays a few MB, which the allocator recycles, instead of tens of MB
# that are page-faulted in afresh on every call (on the 2-core benchmark machine a fresh page costs ~3 us:
# at L=4097 the faults took as long as the arithmetic). See docs/performance.md.
SEGMENT_TOKENS = 2048


def _segments(length: int, align: int) -> list[tuple[int, int]]:
    """Token ranges for the no-autograd path: one range when the sequence is short; otherwise whole chunks of
    ``align`` in segments of ~SEGMENT_TOKENS, then the ``length % align`` tokens left over as one short chunk
    of their own, so that no segment is padded (padding copies every input)."""
    aligned = length - length % align
    count = (2 * aligned + SEGMENT_TOKENS) // (2 * SEGMENT_TOKENS) if SEGMENT_TOKENS else 1  # rounded
    if count <= 1:
        return [(0, length)]
    per = -(-(-(-aligned // count)) // align) * align  # ceil(aligned / count), in whole chunks
    pieces = [(start, min(start + per, aligned)) for start in range(0, aligned, per)]
    return pieces + ([(aligned, length)] if aligned < length else [])


def chunked_linear_recurrence(
    q, k, v, log_decay, initial_state=None, return_final_state=False, chunk_size: int | None = None,
    method: str = "auto",
):
    """Args and returns as :func:`vitlinearizer.ops.linear_recurrence`; ``chunk_size`` defaults per decay kind
    and is the largest chunk used (the factored method halves it where a chunk's decay span is too large).

    ``method``: ``auto`` (factored where safe, else exact) or ``exact``. Computes in float32 for
    lower-precision inputs (the recurrence state is never kept in bf16/fp16).
    """
    if method not in METHODS:
        raise ValueError(f"chunked_linear_recurrence: method must be one of {', '.join(METHODS)}, got {method!r}")
    out_dtype = v.dtype
    acc = accumulation_dtype(q, k, v, log_decay, initial_state)
    q, k, v = (t.to(acc) for t in (q, k, v))
    log_decay = log_decay.to(acc).clamp(min=LOG_DECAY_FLOOR)
    per_head = log_decay.dim() == 3
    length = q.shape[1]
    align = chunk_size or (DEFAULT_CHUNK_SIZE_PER_HEAD if per_head else DEFAULT_CHUNK_SIZE_PER_CHANNEL)
    pieces = [(0, length)]
    if not grad_needed(q, k, v, log_decay, initial_state) and q.device.type != "meta":
        pieces = _segments(length, align)
    if len(pieces) == 1:
        y, state = _recurrence(q, k, v, log_decay, initial_state, chunk_size, method, per_head, return_final_state)
        return y.to(out_dtype), (state.contiguous() if return_final_state else None)
    y = v.new_empty(v.shape, dtype=out_dtype)
    state = initial_state
    for start, stop in pieces:
        part = slice(start, stop)
        _, state = _recurrence(q[:, part], k[:, part], v[:, part], log_decay[:, part], state, chunk_size, method,
                               per_head, want_state=return_final_state or stop < length, out=y[:, part])
    return y, (state.contiguous() if return_final_state else None)
