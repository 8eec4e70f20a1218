"""Linear-recurrence kernels shared by every token mixer (Mamba-2/SSD, GLA, HGRN).

One entry point, :func:`linear_recurrence`, several implementations with one signature:

- ``naive``: float32/64 loop over tokens, the reference;
- ``chunked``: pure PyTorch, quadratic inside chunks and state passing between them (CPU default);
- ``step``: one token at a time from a carried state (recurrent inference);
- ``fla``: flash-linear-attention Triton kernels on CUDA (optional, imported lazily); they take q, k, v in
  their own dtype (bf16 under autocast: tensor cores) and accumulate, decay and carry the state in float32;
- ``auto``: ``fla`` on CUDA when available for float32/bf16/fp16 inputs, else ``chunked``.
"""
from __future__ import annotations

import torch

from ._validate import autocast_disabled, check_recurrence_inputs
from .chunked import chunked_linear_recurrence
from .fla_bridge import fla_available, fla_linear_recurrence
from .naive import naive_linear_recurrence
from .step import recurrent_step, step_linear_recurrence

IMPLEMENTATIONS = ("auto", "naive", "chunked", "step", "fla")

__all__ = ["linear_recurrence", "recurrent_step", "IMPLEMENTATIONS", "resolve_impl"]


_FLA_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def resolve_impl(impl: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """Map ``auto`` to the fastest implementation available on ``device`` for inputs of ``dtype``."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"unknown recurrence impl {impl!r}; choose one of {', '.join(IMPLEMENTATIONS)}")
    if impl != "auto":
        return impl
    # Triton has no float64 dots: a float64 model (gradcheck, a reference) takes the chunked path on CUDA too.
    fla_dtype = dtype is None or dtype in _FLA_DTYPES
    return "fla" if fla_dtype and fla_available(device) else "chunked"


def linear_recurrence(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
    impl: str = "auto",
    chunk_size: int | None = None,
):
    """Gated linear recurrence ``S_t = exp(log_decay_t) S_{t-1} + k_t v_t^T``, ``y_t = S_t^T q_t``.

    Args:
        q, k: (B, L, G, N) queries and keys; G is H (one per head) or a divisor of H (heads share groups,
            as Mamba-2's B and C with ``ngroups=1``).
        v: (B, L, H, P) values.
        log_decay: (B, L, H) per-head decay (Mamba-2 / SSD) or (B, L, H, N) per-key-channel decay (GLA);
            values must be <= 0; -inf (a decay of 0) resets the state, e.g. between packed sequences.
        initial_state: optional (B, H, N, P) state before the first token.
        return_final_state: also return the (B, H, N, P) state after the last token (float32).
        impl: one of ``IMPLEMENTATIONS``.
        chunk_size: chunk length for ``chunked`` (default chosen per decay kind).

    Returns:
        y (B, L, H, P) in v's dtype, or ``(y, final_state)`` when ``return_final_state``.
    """
    check_recurrence_inputs(q, k, v, log_decay, initial_state)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"linear_recurrence: chunk_size must be a positive int, got {chunk_size!r}")
    impl = resolve_impl(impl, q.device, torch.promote_types(q.dtype, v.dtype))
    if q.numel() == 0 or v.numel() == 0:  # nothing to compute (empty batch or sequence): the reference loop,
        impl = "naive"  # which also passes the state through
    # Every path computes in (at least) float32 by itself; autocast would put its matmuls back in bf16/fp16.
    with autocast_disabled(q.device):
        y, state = _dispatch(impl, q, k, v, log_decay, initial_state, return_final_state, chunk_size)
    return (y, state) if return_final_state else y


def _dispatch(impl, q, k, v, log_decay, initial_state, return_final_state, chunk_size):
    if impl == "chunked":
        return chunked_linear_recurrence(q, k, v, log_decay, initial_state, return_final_state, chunk_size)
    if impl == "naive":
        return naive_linear_recurrence(q, k, v, log_decay, initial_state, return_final_state)
    if impl == "step":
        return step_linear_recurrence(q, k, v, log_decay, initial_state, return_final_state)
    return fla_linear_recurrence(q, k, v, log_decay, initial_state, return_final_state)
