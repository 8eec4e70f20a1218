"""The fla (Triton, GPU) path's conventions, checked on CPU: fla's kernels cannot run here, but fla ships pure-PyTorch
references with the same meaning. The bridge's arguments must bind to the real kernels' signatures, and the bridge
driving those references must give our naive recurrence (scale, log-space gates, state layout, grouped keys)."""
import inspect

import pytest
import torch

fla_gla = pytest.importorskip("fla.ops.gla", reason="fla-core is not installed (pip install fla-core)")
fla_simple_gla = pytest.importorskip("fla.ops.simple_gla")
fla_hgrn = pytest.importorskip("fla.ops.hgrn")
from fla.ops.gla.naive import naive_recurrent_gla  # noqa: E402
from fla.ops.hgrn.naive import naive_recurrent_hgrn  # noqa: E402
from fla.ops.simple_gla.naive import naive_recurrent_simple_gla  # noqa: E402

from vitlinearizer.ops import linear_recurrence  # noqa: E402
from vitlinearizer.ops.fla_bridge import FlaKernels, call_fla, fla_kernels  # noqa: E402


def _reference_kernels(calls):
    """Stand-ins for fla's kernels: each binds its arguments to the real kernel's signature (a renamed or
    removed parameter fails here as it would on the GPU), then runs fla's pure-PyTorch reference."""

    def simple_gla(*args, **kwargs):
        bound = inspect.signature(fla_simple_gla.chunk_simple_gla).bind(*args, **kwargs).arguments
        calls.append("chunk_simple_gla")
        return naive_recurrent_simple_gla(bound["q"], bound["k"], bound["v"], bound["g"], scale=bound["scale"],
                                          initial_state=bound.get("initial_state"),
                                          output_final_state=bound.get("output_final_state", False))

    def gla(*args, **kwargs):
        bound = inspect.signature(fla_gla.chunk_gla).bind(*args, **kwargs).arguments
        calls.append("chunk_gla")
        q = bound["q"]
        q = q * (bound["scale"] * q.shape[-1] ** 0.5)  # this reference always scales q by 1/sqrt(K)
        return naive_recurrent_gla(q, bound["k"], bound["v"], bound["g"], initial_state=bound.get("initial_state"),
                                   output_final_state=bound.get("output_final_state", False))

    def hgrn(*args, **kwargs):
        bound = inspect.signature(fla_hgrn.fused_recurrent_hgrn).bind(*args, **kwargs).arguments
        calls.append("fused_recurrent_hgrn")
        assert bound["x"].dtype == torch.float32 or bound["x"].dtype == torch.float64  # its state has x's dtype
        return naive_recurrent_hgrn(bound["x"], bound["g"], initial_state=bound.get("initial_state"),
                                    output_final_state=bound.get("output_final_state", False))

    return FlaKernels(simple_gla, gla, hgrn)


@pytest.mark.parametrize("per_channel", [False, True], ids=["per-head (Mamba-2)", "per-channel (GLA)"])
@pytest.mark.parametrize("groups", [1, 4])
@pytest.mark.parametrize("with_state", [False, True])
def test_bridge_through_fla_references_equals_naive(per_channel, groups, with_state):
    torch.manual_seed(0)
    b, length, heads, n, p = 2, 37, 4, 8, 6
    q, k = torch.randn(b, length, groups, n, dtype=torch.float64), torch.randn(b, length, groups, n, dtype=torch.float64)
    v = torch.randn(b, length, heads, p, dtype=torch.float64)
    log_decay = -torch.rand(b, length, heads, *((n,) if per_channel else ()), dtype=torch.float64)
    state = torch.randn(b, heads, n, p, dtype=torch.float64) if with_state else None
    calls = []
    y, final = call_fla(_reference_kernels(calls), q, k, v, log_decay, state, return_final_state=True)
    assert calls == ["chunk_gla" if per_channel else "chunk_simple_gla"]
    y_ref, final_ref = linear_recurrence(q, k, v, log_decay, state, return_final_state=True, impl="naive")
    torch.testing.assert_close(y.to(y_ref.dtype), y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(final.to(final_ref.dtype), final_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("groups", [1, 6])
def test_scalar_states_take_fla_hgrn(with_state, groups):
    # HGRN's shape: a 1x1 state per head (channel), q = k shared; the GLA kernels would pad each head to 16x16.
    torch.manual_seed(0)
    b, length, heads = 2, 29, 6
    q, k = torch.randn(b, length, groups, 1), torch.randn(b, length, groups, 1)
    v = torch.randn(b, length, heads, 1)
    log_decay = -torch.rand(b, length, heads) * 2
    state = torch.randn(b, heads, 1, 1) if with_state else None
    calls = []
    y, final = call_fla(_reference_kernels(calls), q, k, v, log_decay, state, return_final_state=True)
    assert calls == ["fused_recurrent_hgrn"] and y.dtype == v.dtype and final.dtype == torch.float32
    y_ref, final_ref = linear_recurrence(q.double(), k.double(), v.double(), log_decay.double(),
                                         None if state is None else state.double(), return_final_state=True,
                                         impl="naive")
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(final.double(), final_ref, rtol=1e-5, atol=1e-5)
    # bf16 inputs (a mixer under autocast): the recurrence still runs and keeps its state in float32.
    y16, final16 = call_fla(_reference_kernels([]), q.bfloat16(), k.bfloat16(), v.bfloat16(), log_decay, state, True)
    assert y16.dtype == torch.bfloat16 and final16.dtype == torch.float32
    torch.testing.assert_close(final16.double(), final_ref, rtol=0.05, atol=0.05)


def test_fla_kernels_import_on_a_machine_without_a_gpu():
    # The bridge's lazy import must succeed wherever fla-core is installed; only running the kernels needs CUDA.
    assert fla_kernels() == FlaKernels(fla_simple_gla.chunk_simple_gla, fla_gla.chunk_gla, fla_hgrn.fused_recurrent_hgrn)
