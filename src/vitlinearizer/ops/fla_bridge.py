"""Optional GPU path through flash-linear-attention (``pip install fla-core``) Triton kernels.

Imported lazily: a CPU-only machine, or one without fla, never imports Triton. Same (B, L, H, N) layout and
(B, H, N, P) state as ours; fla scales q by 1/sqrt(N) unless told ``scale=1.0``.
"""
from __future__ import annotations

import functools
import warnings
from typing import Callable, NamedTuple

import torch

from ._validate import expand_groups
from .chunked import LOG_DECAY_FLOOR  # fla's kernels also take within-chunk cumulative sums


class FlaKernels(NamedTuple):
    simple_gla: Callable  # per-head decay (Mamba-2/SSD)
    gla: Callable  # per-key-channel decay
    hgrn: Callable  # a scalar state per head (HGRN): element-wise, where the others would pad each head to 16x16


@functools.lru_cache(maxsize=1)
def fla_kernels() -> FlaKernels | None:
    """fla-core's kernels, or None when it cannot be imported (warned once)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from fla.ops.gla import chunk_gla
            from fla.ops.hgrn import fused_recurrent_hgrn
            from fla.ops.simple_gla import chunk_simple_gla
    except Exception as exc:  # ImportError, or Triton failing to initialise
        warnings.warn(
            f"fla-core kernels unavailable ({type(exc).__name__}: {exc}); using the pure-PyTorch chunked path. "
            "Install with `pip install fla-core` for the Triton GPU path.",
            stacklevel=3,
        )
        return None
    return FlaKernels(chunk_simple_gla, chunk_gla, fused_recurrent_hgrn)


def fla_available(device: torch.device) -> bool:
    return device.type == "cuda" and fla_kernels() is not None


def fla_linear_recurrence(q, k, v, log_decay, initial_state=None, return_final_state=False):
    kernels = fla_kernels()
    if kernels is None or q.device.type != "cuda":
        raise RuntimeError("impl='fla' needs a CUDA device and `pip install fla-core`; use impl='chunked' instead")
    return call_fla(kernels, q, k, v, log_decay, initial_state, return_final_state)


def call_fla(kernels: FlaKernels, q, k, v, log_decay, initial_state=None, return_final_state=False):
    """Our recurrence in fla's terms: ``kernels`` are fla's or anything with their signatures (tests pass fla's
    pure-PyTorch references, to check these conventions without a GPU)."""
    heads = v.shape[2]
    q, k = expand_groups(q, heads), expand_groups(k, heads)
    if initial_state is not None:
        initial_state = initial_state.float()
    g = log_decay.float().clamp(min=LOG_DECAY_FLOOR)
    if log_decay.dim() == 3 and q.shape[-1] == 1 and v.shape[-1] == 1:
        return _call_hgrn(kernels.hgrn, q, k, v, g, initial_state, return_final_state)
    kernel = kernels.simple_gla if log_decay.dim() == 3 else kernels.gla
    y, state = kernel(q, k, v, g=g, scale=1.0, initial_state=initial_state, output_final_state=return_final_state)
    return y, state


def _call_hgrn(hgrn, q, k, v, g, initial_state, return_final_state):
    """N = P = 1: S_t = exp(g_t) S_{t-1} + k_t v_t and y_t = q_t S_t, i.e. fla's h_t = exp(g_t) h_{t-1} + x_t with
    x = k v, heads as its channels. In float32: the kernel keeps its state (and final state) in x's dtype."""
    x = k[..., 0].float() * v[..., 0].float()  # (B, L, H)
    h0 = initial_state[..., 0, 0] if initial_state is not None else None  # (B, H)
    h, state = hgrn(x, g, initial_state=h0, output_final_state=return_final_state)
    y = (q[..., 0].float() * h).to(v.dtype)[..., None]
    return y, (state[..., None, None] if state is not None else None)
