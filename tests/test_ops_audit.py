"""Edge cases of the recurrence API: chunk boundaries, extreme decays, gradients, layouts, dtypes and input checks."""
import math

import pytest
import torch

from vitlinearizer.ops import chunked, linear_recurrence, recurrent_step


def make(batch, length, heads, groups, key_dim, value_dim, per_channel, dtype=torch.float64, seed=0, state=False):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, length, groups, key_dim, generator=gen, dtype=dtype)
    k = torch.randn(batch, length, groups, key_dim, generator=gen, dtype=dtype)
    v = torch.randn(batch, length, heads, value_dim, generator=gen, dtype=dtype)
    shape = (batch, length, heads, key_dim) if per_channel else (batch, length, heads)
    a = -torch.rand(shape, generator=gen, dtype=dtype)
    s = torch.randn(batch, heads, key_dim, value_dim, generator=gen, dtype=dtype) if state else None
    return q, k, v, a, s


def naive(q, k, v, a, s=None):
    return linear_recurrence(q, k, v, a, initial_state=s, return_final_state=True, impl="naive")


@pytest.mark.parametrize("method", chunked.METHODS)
@pytest.mark.parametrize("per_channel", [False, True], ids=["per_head", "per_channel"])
def test_chunk_boundaries_groups_and_states_match_naive(per_channel, method):
    chunk = 4
    for length in (1, 2, chunk - 1, chunk, chunk + 1, 3 * chunk + 5):
        for groups in (1, 2, 4):
            for with_state in (False, True):
                q, k, v, a, s = make(2, length, 4, groups, 3, 2, per_channel, seed=length + groups, state=with_state)
                y_ref, s_ref = naive(q, k, v, a, s)
                y, state = chunked.chunked_linear_recurrence(q, k, v, a, s, True, chunk, method)
                y_only, none = chunked.chunked_linear_recurrence(q, k, v, a, s, False, chunk, method)
                case = (length, groups, with_state)
                assert none is None and y.shape == y_ref.shape, case
                torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10, msg=str(case))
                torch.testing.assert_close(y_only, y_ref, rtol=1e-10, atol=1e-10, msg=str(case))
                torch.testing.assert_close(state, s_ref, rtol=1e-10, atol=1e-10, msg=str(case))


@pytest.mark.parametrize("method", chunked.METHODS)
@pytest.mark.parametrize("per_channel", [False, True], ids=["per_head", "per_channel"])
@pytest.mark.parametrize("extreme", [0.0, -60.0, -300.0, -1e4, -math.inf])
def test_extreme_and_mixed_decays_stay_exact_and_finite(extreme, per_channel, method):
    # Every third token gets the extreme decay, one head is reset at every token and another never decays:
    # spans far beyond MAX_FACTORED_SPAN, where the factored path must give way to the exact one.
    q, k, v, a, s = make(2, 37, 4, 2, 3, 2, per_channel, seed=9, state=True)
    a[:, ::3] = extreme
    a[0, :, 1] = -math.inf
    a[1, :, 0] = 0.0
    y_ref, s_ref = naive(q, k, v, a, s)
    y, state = chunked.chunked_linear_recurrence(q, k, v, a, s, True, 8, method)
    assert torch.isfinite(y).all() and torch.isfinite(state).all()
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(state, s_ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("method", chunked.METHODS)
@pytest.mark.parametrize("per_channel", [False, True], ids=["per_head", "per_channel"])
@pytest.mark.parametrize("groups", [1, 2])
def test_chunked_gradcheck(groups, per_channel, method):
    inputs = [t.requires_grad_() for t in make(1, 5, 2, groups, 2, 2, per_channel, seed=groups, state=True)]
    def fn(q, k, v, a, s):
        return chunked.chunked_linear_recurrence(q, k, v, a, s, True, 2, method)
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("impl", ["naive", "chunked", "step"])
@pytest.mark.parametrize("per_channel", [False, True], ids=["per_head", "per_channel"])
def test_strided_and_expanded_inputs(impl, per_channel):
    q, k, v, a, s = make(2, 20, 4, 4, 3, 5, per_channel, seed=2, state=True)
    ref = naive(q, k, v, a, s)
    q_t = q.transpose(0, 1).contiguous().transpose(0, 1)
    v_t = v.permute(3, 1, 2, 0).contiguous().permute(3, 1, 2, 0)
    a_t = a.transpose(0, 1).contiguous().transpose(0, 1)
    s_t = s.transpose(2, 3).contiguous().transpose(2, 3)
    k_shared = k[:, :, :1].expand_as(k)  # stride 0 over the heads
    assert not (q_t.is_contiguous() or v_t.is_contiguous() or s_t.is_contiguous() or k_shared.is_contiguous())
    ref = naive(q, k_shared.contiguous(), v, a, s)
    y, state = linear_recurrence(q_t, k_shared, v_t, a_t, s_t, True, impl=impl, chunk_size=8)
    torch.testing.assert_close(y, ref[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state, ref[1], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("impl", ["naive", "chunked", "step"])
def test_half_precision_computes_in_float32(impl, dtype):
    q, k, v, a, s = make(2, 40, 4, 2, 3, 5, True, dtype=torch.float32, seed=4, state=True)
    low = [t.to(dtype) for t in (q, k, v, a)]
    y, state = linear_recurrence(*low, s, True, impl=impl, chunk_size=16)
    assert y.dtype == dtype and state.dtype == torch.float32
    # The same as float32 on the rounded inputs, rounded once at the end: no half-precision intermediate.
    y32, s32 = naive(*[t.float() for t in low], s)
    torch.testing.assert_close(y, y32.to(dtype), rtol=0, atol=0) if impl == "naive" else \
        torch.testing.assert_close(y.float(), y32, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(state, s32, rtol=1e-4, atol=1e-4)
    with torch.autocast("cpu", dtype=dtype):
        y_ac, s_ac = linear_recurrence(*low, s, True, impl=impl, chunk_size=16)
    assert y_ac.dtype == dtype
    torch.testing.assert_close(y_ac, y, rtol=0, atol=0)
    torch.testing.assert_close(s_ac, state, rtol=0, atol=0)


@pytest.mark.parametrize("per_channel", [False, True], ids=["per_head", "per_channel"])
@pytest.mark.parametrize("want_state", [False, True])
def test_no_grad_segments_equal_the_autograd_path(per_channel, want_state, monkeypatch):
    monkeypatch.setattr(chunked, "SEGMENT_TOKENS", 8)
    q, k, v, a, s = make(2, 45, 4, 2, 3, 2, per_channel, seed=6, state=True)
    y_ref, s_ref = naive(q, k, v, a, s)
    with torch.no_grad():
        out = chunked.chunked_linear_recurrence(q, k, v, a, s, want_state, 4)
    grad_in = [t.clone().requires_grad_() for t in (q, k, v, a, s)]
    out_grad = chunked.chunked_linear_recurrence(*grad_in, want_state, 4)
    assert out_grad[0].requires_grad and not out[0].requires_grad
    torch.testing.assert_close(out[0], y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out_grad[0].detach(), y_ref, rtol=1e-10, atol=1e-10)
    if want_state:
        torch.testing.assert_close(out[1], s_ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(out_grad[1].detach(), s_ref, rtol=1e-10, atol=1e-10)
    else:
        assert out[1] is None and out_grad[1] is None


@pytest.mark.parametrize("impl", ["chunked", "step"])
@pytest.mark.parametrize("per_channel", [False, True], ids=["per_head", "per_channel"])
def test_split_anywhere_with_carried_state_equals_one_call(impl, per_channel):
    q, k, v, a, s = make(1, 29, 2, 1, 3, 2, per_channel, seed=8, state=True)
    y_ref, s_ref = naive(q, k, v, a, s)
    for cut in (0, 1, 7, 8, 9, 28, 29):
        first, mid = linear_recurrence(q[:, :cut], k[:, :cut], v[:, :cut], a[:, :cut], s, True, impl=impl,
                                       chunk_size=8)
        second, end = linear_recurrence(q[:, cut:], k[:, cut:], v[:, cut:], a[:, cut:], mid, True, impl=impl,
                                        chunk_size=8)
        torch.testing.assert_close(torch.cat([first, second], 1), y_ref, rtol=1e-10, atol=1e-10, msg=str(cut))
        torch.testing.assert_close(end, s_ref, rtol=1e-10, atol=1e-10, msg=str(cut))


@pytest.mark.parametrize("impl", ["naive", "chunked", "step"])
@pytest.mark.parametrize("per_channel", [False, True], ids=["per_head", "per_channel"])
def test_positive_log_decay_is_refused(impl, per_channel):
    # exp(log_decay) > 1 grows the state without bound; before the check every path returned amplified output.
    q, k, v, a, _ = make(1, 6, 2, 1, 3, 2, per_channel)
    a[0, 3] = 0.25
    with pytest.raises(ValueError, match=r"log_decay must be <= 0.*maximum of 0\.25.*shape \(1, 6, 2"):
        linear_recurrence(q, k, v, a, impl=impl)
    a[0, 3] = math.inf
    with pytest.raises(ValueError, match="log_decay must be <= 0"):
        linear_recurrence(q, k, v, a, impl=impl)
    # 0 (no decay) and -inf (a reset) are valid; NaN propagates as in the reference loop (for AMP's scaler).
    a[0, 3], a[0, 4] = 0.0, -math.inf
    assert torch.isfinite(linear_recurrence(q, k, v, a, impl=impl)).all()
    a[0, 3] = math.nan
    assert linear_recurrence(q, k, v, a, impl=impl).isnan().any()


def test_positive_log_decay_is_not_checked_on_meta_tensors():
    q, k, v, a, _ = make(1, 6, 2, 1, 3, 2, False)
    meta = [t.to("meta") for t in (q, k, v, a)]
    assert linear_recurrence(*meta, impl="naive").shape == (1, 6, 2, 2)


@pytest.mark.parametrize("per_channel", [False, True], ids=["per_head", "per_channel"])
def test_recurrent_step_checks_its_inputs(per_channel):
    q, k, v, a, s = make(2, 1, 4, 2, 3, 5, per_channel, state=True)
    q, k, v, a = q[:, 0], k[:, 0], v[:, 0], a[:, 0]
    recurrent_step(q, k, v, a, s)
    with pytest.raises(ValueError, match=r"state must be \(B, H, N, P\) = \(2, 4, 3, 5\), got \(4, 3, 5\)"):
        recurrent_step(q, k, v, a, s[0])  # broadcastable: used to be silently shared by the whole batch
    with pytest.raises(ValueError, match=r"log_decay_t must be per head \(2, 4\) or per key channel \(2, 4, 3\)"):
        recurrent_step(q, k, v, a[:, :3], s)
    with pytest.raises(ValueError, match=r"q_t, k_t must be the same \(B, G, N\)"):
        recurrent_step(q[:, None], k[:, None], v, a, s)
    with pytest.raises(ValueError, match="multiple of the q_t/k_t group count G = 3"):
        recurrent_step(q[:, :1].expand(2, 3, 3), k[:, :1].expand(2, 3, 3), v, a, s)
    with pytest.raises(ValueError, match="log_decay_t must be <= 0"):
        recurrent_step(q, k, v, a.abs() + 0.1, s)
    with pytest.raises(TypeError, match="`state` must be a floating-point tensor"):
        recurrent_step(q, k, v, a, s.long())
    with pytest.raises(ValueError, match="one device"):
        recurrent_step(q, k, v, a, s.to("meta"))


@pytest.mark.parametrize("bad", [0, -3, True, 2.0])
def test_chunk_size_must_be_a_positive_int(bad):
    q, k, v, a, _ = make(1, 5, 2, 1, 3, 2, False)
    with pytest.raises(ValueError, match=f"chunk_size must be a positive int, got {bad!r}"):
        linear_recurrence(q, k, v, a, impl="chunked", chunk_size=bad)


def test_wrong_initial_state_names_the_expected_shape():
    q, k, v, a, s = make(2, 5, 4, 2, 3, 5, False, state=True)
    with pytest.raises(ValueError, match=r"initial_state must be \(B, H, N, P\) = \(2, 4, 3, 5\), got \(2, 4, 5, 3\)"):
        linear_recurrence(q, k, v, a, initial_state=s.transpose(2, 3).contiguous())
