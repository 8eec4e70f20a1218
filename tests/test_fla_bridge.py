"""The fla (Triton, GPU) path's conventions, checked on CPU: fla's kernels cannot run here, but fla ships pure-PyTorch
references with the same meaning. The bridge's arguments must bind to the real kernels' signatures, and the bridge
driving those references must give our naive recurrence (scale, log-space gates, state layout, grouped keys)."""
import inspect

import pytest
import torch

fla_gla = pytest.importorskip("fla.ops.gla", reason="fla-core is not installed (pip install fla-core)")
fla_simple_gla = pytest.importorskip("fla.ops.simple_gla")
from fla.ops.gla.naive import naive_recurrent_gla  # noqa: E402
from fla.ops.simple_gla.naive import naive_recurrent_simple_gla  # noqa: E402

from vitlinearizer.ops import linear_recurrence  # noqa: E402
from vitlinearizer.ops.fla_bridge import call_fla, fla_kernels  # noqa: E402


def _reference_kernels(calls):
    """(chunk_simple_gla, chunk_gla) stand-ins: each binds its arguments to the real kernel's signature (a renamed or
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

    return simple_gla, gla


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


def test_fla_kernels_import_on_a_machine_without_a_gpu():
    # The bridge's lazy import must succeed wherever fla-core is installed; only running the kernels needs CUDA.
    assert fla_kernels() == (fla_simple_gla.chunk_simple_gla, fla_gla.chunk_gla)
