"""Optional GPU path through flash-linear-attention (``pip install fla-core``) Triton kernels.

Imported lazily: a CPU-only machine, or one without fla, never imports Triton. Same (B, L, H, N) layout and
(B, H, N, P) state as ours; fla scales q by 1/sqrt(N) unless told ``scale=1.0``.
"""
from __future__ import annotations

import functools
import warnings

import torch

from ._validate import expand_groups
from .chunked import LOG_DECAY_FLOOR  # fla's kernels also take within-chunk cumulative sums


@functools.lru_cache(maxsize=1)
def fla_kernels():
    """Return (chunk_simple_gla, chunk_gla) or None when fla-core cannot be imported (warned once)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from fla.ops.gla import chunk_gla
            from fla.ops.simple_gla import chunk_simple_gla
    except Exception as exc:  # ImportError, or Triton failing to initialise
        warnings.warn(
            f"fla-core kernels unavailable ({type(exc).__name__}: {exc}); using the pure-PyTorch chunked path. "
            "Install with `pip install fla-core` for the Triton GPU path.",
            stacklevel=3,
        )
        return None
    return chunk_simple_gla, chunk_gla


def fla_available(device: torch.device) -> bool:
    return device.type == "cuda" and fla_kernels() is not None


def fla_linear_recurrence(q, k, v, log_decay, initial_state=None, return_final_state=False):
    kernels = fla_kernels()
    if kernels is None or q.device.type != "cuda":
        raise RuntimeError("impl='fla' needs a CUDA device and `pip install fla-core`; use impl='chunked' instead")
    return call_fla(kernels, q, k, v, log_decay, initial_state, return_final_state)


def call_fla(kernels, q, k, v, log_decay, initial_state=None, return_final_state=False):
    """Our recurrence in fla's terms: ``kernels`` = (chunk_simple_gla, chunk_gla) or anything with their
    signatures (tests pass fla's pure-PyTorch references, to check these conventions without a GPU)."""
    chunk_simple_gla, chunk_gla = kernels
    heads = v.shape[2]
    q, k = expand_groups(q, heads), expand_groups(k, heads)
    if initial_state is not None:
        initial_state = initial_state.float()
    kernel = chunk_simple_gla if log_decay.dim() == 3 else chunk_gla
    g = log_decay.float().clamp(min=LOG_DECAY_FLOOR)
    y, state = kernel(q, k, v, g=g, scale=1.0, initial_state=initial_state, output_final_state=return_final_state)
    return y, state
