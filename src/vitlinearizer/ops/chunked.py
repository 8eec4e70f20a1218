"""Chunked linear recurrence in pure PyTorch (the SSD "minimal" algorithm, generalised to GLA decays).

The sequence is cut into chunks of Q tokens. Inside a chunk the recurrence is evaluated in its quadratic
(attention-like) form; between chunks only the (N, P) state is carried. Work is O(L·Q·(N+P)) per head and
matmul-bound, and autograd provides the backward pass.

Numerical stability: every exponent is a difference ``cum_i - cum_j`` with ``i >= j`` of the within-chunk
cumulative log-decay, which is <= 0. Nothing ever computes ``exp`` of a positive cumulative sum, so strong
decay (log_decay of -20 per token) underflows to zero instead of overflowing to inf.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._validate import expand_groups

# Chosen from benchmarks/ops.py on 2 CPU cores (see docs/performance.md): per-head decays use large chunks
# (the Q x Q matmuls are cheap), per-channel decays materialise a (Q, Q, N) tensor per chunk and prefer small.
DEFAULT_CHUNK_SIZE_PER_HEAD = 64
DEFAULT_CHUNK_SIZE_PER_CHANNEL = 16


def _pad_to_chunks(x: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Zero-pad dim 1 (length) to a multiple of the chunk size; zero k/v and zero log-decay leave the state unchanged."""
    pad = (-x.shape[1]) % chunk_size
    if pad == 0:
        return x
    widths = [0, 0] * (x.dim() - 2) + [0, pad]
    return F.pad(x, widths)


def _carry_states(chunk_states, chunk_decay, initial_state):
    """Scan chunk-end contributions into the state *entering* each chunk.

    chunk_states: (B, C, ..., N, P) state produced inside each chunk from a zero start;
    chunk_decay:  (B, C, ..., N or 1, 1) total decay across each chunk;
    returns (states entering each chunk (B, C, ..., N, P), final state (B, ..., N, P)).
    """
    state = initial_state
    entering = []
    for c in range(chunk_states.shape[1]):
        entering.append(state)
        state = chunk_decay[:, c] * state + chunk_states[:, c]
    return torch.stack(entering, dim=1), state


def _chunked_per_head(q, k, v, log_decay, initial_state, chunk_size):
    # q, k: (B, L, G, N); v: (B, L, H, P); log_decay: (B, L, H); H = G * R heads share each q/k group.
    batch, length, groups, key_dim = q.shape
    heads, value_dim = v.shape[2], v.shape[3]
    rep = heads // groups
    q, k, v, log_decay = (_pad_to_chunks(t, chunk_size) for t in (q, k, v, log_decay))
    chunks = q.shape[1] // chunk_size
    q = q.view(batch, chunks, chunk_size, groups, key_dim).transpose(2, 3)  # (B, C, G, Q, N)
    k = k.view(batch, chunks, chunk_size, groups, key_dim).transpose(2, 3)  # (B, C, G, Q, N)
    v = v.view(batch, chunks, chunk_size, groups, rep, value_dim).permute(0, 1, 3, 4, 2, 5)  # (B, C, G, R, Q, P)
    cum = log_decay.view(batch, chunks, chunk_size, groups, rep).permute(0, 1, 3, 4, 2).cumsum(-1)  # (B, C, G, R, Q)

    # Intra-chunk: y_i = sum_{j<=i} exp(cum_i - cum_j) (q_i . k_j) v_j. q.k is computed once per group.
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).tril()
    segment = (cum[..., :, None] - cum[..., None, :]).masked_fill(~causal, float("-inf")).exp()  # (B, C, G, R, Q, Q)
    scores = (q @ k.transpose(-1, -2)).unsqueeze(3) * segment  # (B, C, G, R, Q, Q)
    y = scores @ v  # (B, C, G, R, Q, P)

    # State each chunk hands on (from a zero start): sum_j exp(cum_last - cum_j) k_j v_j^T.
    to_end = (cum[..., -1:] - cum).exp()  # (B, C, G, R, Q)
    weighted_v = (v * to_end[..., None]).transpose(3, 4).reshape(batch, chunks, groups, chunk_size, rep * value_dim)
    chunk_states = (k.transpose(-1, -2) @ weighted_v).view(batch, chunks, groups, key_dim, rep, value_dim)
    chunk_states = chunk_states.transpose(3, 4)  # (B, C, G, R, N, P)

    if initial_state is None:
        initial_state = chunk_states.new_zeros(batch, groups, rep, key_dim, value_dim)
    else:
        initial_state = initial_state.view(batch, groups, rep, key_dim, value_dim).to(chunk_states.dtype)
    chunk_decay = cum[..., -1].exp()[..., None, None]  # (B, C, G, R, 1, 1)
    entering, final_state = _carry_states(chunk_states, chunk_decay, initial_state)

    # Inter-chunk: y_i += exp(cum_i) q_i^T S_entering.
    entering = entering.transpose(3, 4).reshape(batch, chunks, groups, key_dim, rep * value_dim)
    carried = (q @ entering).view(batch, chunks, groups, chunk_size, rep, value_dim).transpose(3, 4)
    y = y + carried * cum.exp()[..., None]  # (B, C, G, R, Q, P)

    y = y.permute(0, 1, 4, 2, 3, 5).reshape(batch, chunks * chunk_size, heads, value_dim)[:, :length]
    return y, final_state.reshape(batch, heads, key_dim, value_dim)


def _chunked_per_channel(q, k, v, log_decay, initial_state, chunk_size):
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


def chunked_linear_recurrence(
    q, k, v, log_decay, initial_state=None, return_final_state=False, chunk_size: int | None = None
):
    """Args and returns as :func:`vitlinearizer.ops.linear_recurrence`; ``chunk_size`` defaults per decay kind.

    Computes in float32 for lower-precision inputs (the recurrence state is never kept in bf16/fp16).
    """
    out_dtype = v.dtype
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k, v, log_decay = (t.to(acc) for t in (q, k, v, log_decay))
    if log_decay.dim() == 3:
        size = chunk_size or DEFAULT_CHUNK_SIZE_PER_HEAD
        y, state = _chunked_per_head(q, k, v, log_decay, initial_state, size)
    else:
        size = chunk_size or DEFAULT_CHUNK_SIZE_PER_CHANNEL
        heads = v.shape[2]
        y, state = _chunked_per_channel(
            expand_groups(q, heads), expand_groups(k, heads), v, log_decay, initial_state, size
        )
    return y.to(out_dtype), (state if return_final_state else None)
