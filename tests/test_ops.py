"""Every recurrence path against the naive float loop: outputs, final state and all input gradients."""
import math

import pytest
import torch

from vitlinearizer.ops import _serial as serial_mod
from vitlinearizer.ops import chunked, linear_recurrence, recurrent_step

TOL = {torch.float64: 1e-5, torch.float32: 1e-3}


def rel_err(ref: torch.Tensor, other: torch.Tensor) -> float:
    """Relative RMS error (as fla tests do); the floor covers gradients that are exactly zero (L=1, no state)."""
    return ((ref - other).double().pow(2).mean().sqrt() / ref.double().pow(2).mean().sqrt().clamp_min(1e-3)).item()


def make_inputs(batch, length, heads, key_dim, value_dim, per_channel, groups=None, dtype=torch.float64, seed=0,
                with_state=False, min_log_decay=-1.0):
    gen = torch.Generator().manual_seed(seed)
    groups = groups or heads
    q = torch.randn(batch, length, groups, key_dim, generator=gen, dtype=dtype) / math.sqrt(key_dim)
    k = torch.randn(batch, length, groups, key_dim, generator=gen, dtype=dtype)
    v = torch.randn(batch, length, heads, value_dim, generator=gen, dtype=dtype)
    shape = (batch, length, heads, key_dim) if per_channel else (batch, length, heads)
    log_decay = torch.rand(shape, generator=gen, dtype=dtype) * min_log_decay  # in (min_log_decay, 0]
    state = torch.randn(batch, heads, key_dim, value_dim, generator=gen, dtype=dtype) if with_state else None
    inputs = [q, k, v, log_decay] + ([state] if with_state else [])
    return [t.requires_grad_() for t in inputs]


def run(impl, inputs, chunk_size=None, seed=1):
    state = inputs[4] if len(inputs) == 5 else None
    y, final = linear_recurrence(*inputs[:4], initial_state=state, return_final_state=True, impl=impl,
                                 chunk_size=chunk_size)
    gen = torch.Generator().manual_seed(seed)
    dy = torch.randn(y.shape, generator=gen, dtype=y.dtype)
    dstate = torch.randn(final.shape, generator=gen, dtype=final.dtype)
    grads = torch.autograd.grad((y * dy).sum() + (final * dstate).sum(), inputs)
    return y, final, grads


NAMES = ["q", "k", "v", "log_decay", "initial_state"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("per_channel", [False, True], ids=["per_head", "per_channel"])
@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "init_state"])
@pytest.mark.parametrize("length", [1, 7, 65, 197])
@pytest.mark.parametrize("impl,chunk_size", [("chunked", None), ("chunked", 8), ("step", None)],
                         ids=["chunked", "chunked8", "step"])
def test_paths_match_naive(impl, chunk_size, length, with_state, per_channel, dtype):
    inputs = make_inputs(2, length, 3, 8, 5, per_channel, dtype=dtype, with_state=with_state, seed=length)
    y_ref, s_ref, g_ref = run("naive", inputs)
    y, s, g = run(impl, inputs, chunk_size)
    assert y.dtype == dtype and y.shape == (2, length, 3, 5)
    assert rel_err(y_ref, y) <= TOL[dtype], "output"
    assert rel_err(s_ref, s) <= TOL[dtype], "final state"
    for name, a, b in zip(NAMES, g_ref, g):
        assert rel_err(a, b) <= TOL[dtype], f"grad of {name}"


@pytest.mark.parametrize("impl", ["chunked", "step"])
def test_grouped_queries_match_expanded_heads(impl):
    # Mamba-2 with ngroups=1: all heads share B and C.
    inputs = make_inputs(2, 33, 4, 6, 3, per_channel=False, groups=1, seed=3)
    y_ref, s_ref, g_ref = run("naive", inputs)
    y, s, g = run(impl, inputs, chunk_size=16)
    assert rel_err(y_ref, y) <= 1e-10 and rel_err(s_ref, s) <= 1e-10
    for a, b in zip(g_ref, g):
        assert rel_err(a, b) <= 1e-10


def test_naive_matches_closed_form():
    # y_t = sum_{s<=t} exp(sum_{r=s+1..t} a_r) (q_t . k_s) v_s, written as an explicit double sum.
    q, k, v, a = (t.detach() for t in make_inputs(1, 6, 1, 2, 2, per_channel=False))
    y = linear_recurrence(q, k, v, a, impl="naive")
    for t in range(6):
        expected = sum(math.exp(a[0, s + 1:t + 1, 0].sum().item()) * (q[0, t, 0] @ k[0, s, 0]) * v[0, s, 0]
                       for s in range(t + 1))
        torch.testing.assert_close(y[0, t, 0], expected)


@pytest.mark.parametrize("per_channel", [False, True], ids=["per_head", "per_channel"])
def test_carried_state_splits_sequence(per_channel):
    q, k, v, a = (t.detach() for t in make_inputs(2, 50, 2, 4, 4, per_channel, seed=5))
    y_full = linear_recurrence(q, k, v, a, impl="chunked")
    y1, state = linear_recurrence(q[:, :23], k[:, :23], v[:, :23], a[:, :23], return_final_state=True, impl="chunked")
    y2 = linear_recurrence(q[:, 23:], k[:, 23:], v[:, 23:], a[:, 23:], initial_state=state, impl="chunked")
    assert rel_err(y_full, torch.cat([y1, y2], 1)) < 1e-10


@pytest.mark.parametrize("impl", ["naive", "chunked", "step"])
def test_empty_sequence_passes_the_state_through(impl):
    q, k, v, a, s0 = (t.detach() for t in make_inputs(2, 0, 3, 4, 5, False, with_state=True))
    y, state = linear_recurrence(q, k, v, a, initial_state=s0, return_final_state=True, impl=impl)
    assert y.shape == (2, 0, 3, 5) and torch.equal(state, s0)
    y, state = linear_recurrence(q, k, v, a, return_final_state=True, impl=impl)
    assert y.shape == (2, 0, 3, 5) and state.shape == (2, 3, 4, 5) and not state.any()
    # A sequence split at its very start: the empty head changes nothing.
    q, k, v, a = (t.detach() for t in make_inputs(1, 9, 2, 3, 3, True, seed=2))
    _, carried = linear_recurrence(q[:, :0], k[:, :0], v[:, :0], a[:, :0], return_final_state=True, impl=impl)
    torch.testing.assert_close(linear_recurrence(q, k, v, a, initial_state=carried, impl=impl),
                               linear_recurrence(q, k, v, a, impl=impl))


@pytest.mark.parametrize("impl", ["naive", "chunked", "step"])
@pytest.mark.parametrize("per_channel", [False, True], ids=["per_head", "per_channel"])
def test_empty_batch(impl, per_channel):
    q, k, v, a = (t.detach() for t in make_inputs(0, 70, 2, 4, 3, per_channel))
    y, state = linear_recurrence(q, k, v, a, return_final_state=True, impl=impl)
    assert y.shape == (0, 70, 2, 3) and state.shape == (0, 2, 4, 3)


@pytest.mark.parametrize("per_channel", [False, True], ids=["per_head", "per_channel"])
def test_chunked_finite_for_long_strongly_decaying_sequences(per_channel):
    q, k, v, a = (t.detach().float() for t in make_inputs(1, 4097, 2, 8, 4, per_channel, dtype=torch.float64,
                                                          min_log_decay=-20.0, seed=7))
    y, state = linear_recurrence(q, k, v, a, impl="chunked", return_final_state=True)
    assert torch.isfinite(y).all() and torch.isfinite(state).all()
    # With decay this strong the state is dominated by the last token, which the naive tail reproduces.
    y_tail = linear_recurrence(q[:, -300:], k[:, -300:], v[:, -300:], a[:, -300:], impl="naive")
    assert rel_err(y_tail[:, -100:], y[:, -100:]) < 1e-4


@pytest.mark.parametrize("method", ["auto", "exact"])
@pytest.mark.parametrize("reset", [-math.inf, -1e4, -1e30])
@pytest.mark.parametrize("per_channel", [False, True], ids=["per_head", "per_channel"])
def test_chunked_resets_match_naive(per_channel, reset, method):
    # A log-decay of -inf (or one so strong that its exp is 0) resets the state, e.g. between packed sequences.
    # Within-chunk cumulative sums would turn it into NaN (-inf - -inf) or wipe out the precision of every later
    # token of its chunk.
    inputs = make_inputs(2, 70, 2, 8, 4, per_channel, dtype=torch.float32, seed=11, with_state=True)
    with torch.no_grad():
        inputs[3][0, 5] = reset  # inside the first chunk
        inputs[3][1, 40] = reset  # the last token but one of a chunk of 16
    q, k, v, a, state = inputs
    y_ref, s_ref = linear_recurrence(q, k, v, a, initial_state=state, return_final_state=True, impl="naive")
    y, s = chunked.chunked_linear_recurrence(q, k, v, a, state, return_final_state=True, chunk_size=16,
                                             method=method)
    assert rel_err(y_ref, y) < 1e-5 and rel_err(s_ref, s) < 1e-5
    gen = torch.Generator().manual_seed(0)
    dy, ds = torch.randn(y.shape, generator=gen), torch.randn(s.shape, generator=gen)
    grads = torch.autograd.grad((y * dy).sum() + (s * ds).sum(), inputs)
    ref = torch.autograd.grad((y_ref * dy).sum() + (s_ref * ds).sum(), inputs)
    for name, g, r in zip(NAMES, grads, ref):
        assert torch.isfinite(g).all() and rel_err(r, g) < 1e-5, name
    # Nothing before a reset reaches the tokens after it: the first sequence's output from token 5 on does not
    # depend on the initial state.
    y_fresh = chunked.chunked_linear_recurrence(*[t.detach() for t in inputs[:4]], None, chunk_size=16,
                                                method=method)[0]
    torch.testing.assert_close(y_fresh[0, 5:], y[0, 5:].detach())


@pytest.mark.parametrize("want_state", [False, True], ids=["output_only", "with_state"])
@pytest.mark.parametrize("per_channel", [False, True], ids=["per_head", "per_channel"])
def test_chunked_gradients_finite_near_the_factored_span_limit(per_channel, want_state):
    # A chunk whose total log-decay is just under MAX_FACTORED_SPAN takes the factored path; its factors
    # reach exp(±span/2), and the backward must not square them (a reciprocal's gradient, -1/u², overflowed
    # float32 here and stopped a fine-tuning run).
    length = 51
    per_token = -0.97 * chunked.MAX_FACTORED_SPAN / length
    inputs = make_inputs(2, length, 2, 8, 4, per_channel, dtype=torch.float32, seed=3)
    with torch.no_grad():
        inputs[3].fill_(per_token)
    q, k, v, a = inputs
    def loss(impl):
        out = linear_recurrence(q, k, v, a, impl=impl, return_final_state=want_state)
        y = out[0] if want_state else out
        return (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum() + (out[1].sum() if want_state else 0)
    grads = torch.autograd.grad(loss("chunked"), inputs)
    ref = torch.autograd.grad(loss("naive"), inputs)
    for name, g, r in zip(NAMES, grads, ref):
        assert torch.isfinite(g).all(), name
        assert rel_err(r, g) < 1e-3, name


def test_recurrent_step_is_one_token_of_the_sequence():
    q, k, v, a = (t.detach() for t in make_inputs(2, 9, 3, 4, 2, per_channel=True, seed=11))
    y_ref, s_ref = linear_recurrence(q, k, v, a, impl="naive", return_final_state=True)
    state = None
    for t in range(9):
        y_t, state = recurrent_step(q[:, t], k[:, t], v[:, t], a[:, t], state)
        torch.testing.assert_close(y_t, y_ref[:, t])
    torch.testing.assert_close(state, s_ref)


def test_bf16_inputs_keep_float32_state():
    q, k, v, a = (t.detach().bfloat16() for t in make_inputs(1, 40, 2, 4, 4, per_channel=False, seed=2))
    y, state = linear_recurrence(q, k, v, a, impl="chunked", return_final_state=True)
    assert y.dtype == torch.bfloat16 and state.dtype == torch.float32
    y_ref = linear_recurrence(q.double(), k.double(), v.double(), a.double(), impl="naive")
    assert rel_err(y_ref, y.double()) < 2e-2


@pytest.mark.parametrize("impl", ["chunked", "naive", "step"])
@pytest.mark.parametrize("per_channel", [False, True], ids=["per_head", "per_channel"])
def test_autocast_does_not_lower_the_kernels_precision(impl, per_channel):
    # Under bf16 autocast (--train.amp bf16) the kernels still compute in float32: the same result as
    # without autocast, and no dtype clash between autocast's bf16 matmuls and the kernels' in-place float32 ops.
    ins = [t.detach().bfloat16() for t in make_inputs(2, 70, 2, 8, 4, per_channel, seed=4, with_state=True)]
    ins[4] = ins[4].float()
    y, s = linear_recurrence(*ins[:4], initial_state=ins[4], return_final_state=True, impl=impl, chunk_size=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ac, s_ac = linear_recurrence(*ins[:4], initial_state=ins[4], return_final_state=True, impl=impl,
                                       chunk_size=16)
    assert y_ac.dtype == torch.bfloat16 and s_ac.dtype == torch.float32
    torch.testing.assert_close(y_ac, y, rtol=0, atol=0)
    torch.testing.assert_close(s_ac, s, rtol=0, atol=0)


def test_auto_uses_chunked_on_cpu():
    q, k, v, a = (t.detach() for t in make_inputs(1, 20, 2, 4, 4, per_channel=False))
    torch.testing.assert_close(linear_recurrence(q, k, v, a), linear_recurrence(q, k, v, a, impl="chunked"))


def test_auto_takes_fla_only_for_dtypes_triton_computes(monkeypatch):
    import vitlinearizer.ops as ops

    monkeypatch.setattr(ops, "fla_available", lambda device: True)  # as on a CUDA machine with fla-core
    cuda = torch.device("cuda")
    assert [ops.resolve_impl("auto", cuda, d) for d in (torch.float32, torch.bfloat16, torch.float16)] == ["fla"] * 3
    assert ops.resolve_impl("auto", cuda, torch.float64) == "chunked"
    assert ops.resolve_impl("fla", cuda, torch.float64) == "fla"  # asked for by name: not second-guessed
    chosen = []
    monkeypatch.setattr(ops, "_dispatch", lambda impl, *args: chosen.append(impl) or (None, None))
    q, k, v, a = (t.detach().double() for t in make_inputs(1, 20, 2, 4, 4, per_channel=False))
    linear_recurrence(q, k, v, a)
    linear_recurrence(q, k, v.float(), a)  # the wider of q's and v's dtypes decides
    linear_recurrence(q.float(), k.float(), v.float(), a.float())
    assert chosen == ["chunked", "chunked", "fla"]


@pytest.mark.parametrize("mutate,match", [
    (lambda q, k, v, a: (q[..., :-1], k, v, a), "same shape"),
    (lambda q, k, v, a: (q, k, v[:, :-1], a), r"share \(B, L\)"),
    (lambda q, k, v, a: (q, k, v, a[..., None, None]), "log_decay must be per head"),
    (lambda q, k, v, a: (q.long(), k, v, a), "floating-point"),
    (lambda q, k, v, a: (q[0], k[0], v, a), r"\(B, L, H, N\)"),
    (lambda q, k, v, a: (q[:, :, :2], k[:, :, :2], v, a), "multiple of"),
])
def test_bad_inputs_raise_clear_errors(mutate, match):
    q, k, v, a = (t.detach() for t in make_inputs(1, 5, 3, 4, 4, per_channel=False))
    with pytest.raises((ValueError, TypeError), match=match):
        linear_recurrence(*mutate(q, k, v, a))


def test_bad_impl_state_and_chunk_size():
    q, k, v, a = (t.detach() for t in make_inputs(1, 5, 3, 4, 4, per_channel=False))
    with pytest.raises(ValueError, match="unknown recurrence impl 'fast'.*chunked"):
        linear_recurrence(q, k, v, a, impl="fast")
    with pytest.raises(ValueError, match="initial_state must be"):
        linear_recurrence(q, k, v, a, initial_state=torch.zeros(1, 3, 4, 5, dtype=q.dtype))
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        linear_recurrence(q, k, v, a, chunk_size=0)
    with pytest.raises(ValueError, match="chunk_size must be a positive int, got True"):
        linear_recurrence(q, k, v, a, chunk_size=True)
    with pytest.raises(TypeError, match="`initial_state` must be a floating-point tensor"):
        linear_recurrence(q, k, v, a, initial_state=torch.zeros(1, 3, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"one device, got \['cpu', 'meta'\]"):
        linear_recurrence(q, k, v, a, initial_state=torch.zeros(1, 3, 4, 4, device="meta", dtype=q.dtype))


@pytest.mark.parametrize("impl", ["chunked", "naive", "step"])
@pytest.mark.parametrize("wide", ["v", "initial_state"])
def test_a_float64_input_keeps_float64_precision(impl, wide):
    # The working precision follows the widest input, not q alone: a float64 value or state is not rounded.
    ins = [t.detach() for t in make_inputs(1, 33, 2, 4, 4, per_channel=False, seed=5, with_state=True)]
    reference = linear_recurrence(*ins[:4], initial_state=ins[4], return_final_state=True, impl="naive")
    mixed = [t if name == wide else t.float() for name, t in zip(NAMES, ins)]
    y, state = linear_recurrence(*mixed[:4], initial_state=mixed[4], return_final_state=True, impl=impl)
    assert state.dtype == torch.float64
    # q, k, log_decay were rounded to float32 on the way in; everything after stays in float64.
    rounded = [t.float().double() if name != wide else t for name, t in zip(NAMES, ins)]
    expected = linear_recurrence(*rounded[:4], initial_state=rounded[4], return_final_state=True, impl="naive")
    assert rel_err(expected[1], state) < 1e-10
    assert rel_err(reference[1], state) < 1e-5


@pytest.mark.parametrize("per_channel", [False, True], ids=["per_head", "per_channel"])
def test_recurrent_step_in_serial_pieces_leaves_the_callers_state_alone(per_channel, monkeypatch):
    # A grain of 12 elements cuts each (1, 5, 2, 3) state into head pieces of 2, 2 and 1 heads.
    monkeypatch.setattr(serial_mod, "ATEN_GRAIN_SIZE", 12)
    monkeypatch.setattr(serial_mod, "SERIAL_UPDATES", True)
    q, k, v, a = (t.detach() for t in make_inputs(1, 6, 5, 2, 3, per_channel, seed=12))
    assert len(serial_mod.serial_slices(torch.empty(1, 5, 2, 3), dim=1)) == 3
    y_ref, s_ref = linear_recurrence(q, k, v, a, impl="naive", return_final_state=True)
    state = None
    for t in range(6):
        before = None if state is None else state.clone()
        y_t, new_state = recurrent_step(q[:, t], k[:, t], v[:, t], a[:, t], state)
        torch.testing.assert_close(y_t, y_ref[:, t])
        if before is not None:
            assert torch.equal(state, before) and new_state is not state
        state = new_state
    torch.testing.assert_close(state, s_ref)


def test_serial_slices_cut_only_cpu_tensors_above_the_grain(monkeypatch):
    monkeypatch.setattr(serial_mod, "SERIAL_UPDATES", True)
    grain = serial_mod.ATEN_GRAIN_SIZE
    assert serial_mod.serial_slices(torch.empty(1, 4, grain // 8), dim=1) == [slice(None)]  # under the grain
    assert serial_mod.serial_slices(torch.empty(3, grain + 1), dim=0) == [slice(None)]  # one row above it
    assert serial_mod.serial_slices(torch.empty(0, 7), dim=0) == [slice(None)]
    state = torch.empty(1, 12, 64, 64)  # Adventurer-S: 49,152 floats
    pieces = serial_mod.serial_slices(state, dim=1)
    assert len(pieces) == 2 and all(state[:, s].numel() <= grain for s in pieces)
    assert sum(state[:, s].shape[1] for s in pieces) == 12
    assert serial_mod.serial_slices(state.to("meta"), dim=1) == [slice(None)]  # off the CPU: one piece
    monkeypatch.setattr(serial_mod, "SERIAL_UPDATES", False)  # threads that spin share the update
    assert serial_mod.serial_slices(state, dim=1) == [slice(None)]


@pytest.mark.parametrize("env, serial", [
    ({}, False),  # torch's default: libgomp spins
    ({"OMP_WAIT_POLICY": "PASSIVE"}, True),
    ({"OMP_WAIT_POLICY": " passive "}, True),
    ({"OMP_WAIT_POLICY": "passive", "GOMP_SPINCOUNT": "5000"}, False),  # the spin count takes precedence
    ({"OMP_WAIT_POLICY": "active"}, False),
    ({"GOMP_SPINCOUNT": "0"}, True),
    ({"GOMP_SPINCOUNT": "0k", "OMP_WAIT_POLICY": "active"}, True),
    ({"GOMP_SPINCOUNT": "infinite"}, False),
])
def test_state_updates_go_serial_only_when_openmp_threads_sleep_at_once(env, serial):
    assert serial_mod.threads_sleep_at_once(env) is serial
