"""Input checks shared by every recurrence path: errors name the argument, its shape and what is allowed."""
from __future__ import annotations

import contextlib

import torch


def accumulation_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """The dtype every path computes and keeps the state in: float64 when any input is float64, else float32
    (so a float64 value or state is never silently rounded through a float32 query)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def expand_groups(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Broadcast (B, L, G, N) query/key groups to (B, L, H, N); a no-op when G == H."""
    groups = x.shape[2]
    if groups == heads:
        return x
    return x.repeat_interleave(heads // groups, dim=2)


def check_recurrence_inputs(q, k, v, log_decay, initial_state=None) -> None:
    tensors = dict(q=q, k=k, v=v, log_decay=log_decay)
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"linear_recurrence: `{name}` must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"linear_recurrence: `{name}` must be a floating-point tensor, got dtype {t.dtype}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            "linear_recurrence: q, k must be (B, L, H, N) and v (B, L, H, P); "
            f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if q.shape != k.shape:
        raise ValueError(f"linear_recurrence: q and k must have the same shape, got {tuple(q.shape)} and {tuple(k.shape)}")
    batch, length, groups, key_dim = q.shape
    if v.shape[:2] != (batch, length):
        raise ValueError(
            f"linear_recurrence: v must share (B, L) = {(batch, length)} with q, got v {tuple(v.shape)}"
        )
    heads = v.shape[2]
    if heads % groups != 0:
        raise ValueError(
            f"linear_recurrence: the head count of v ({heads}) must be a multiple of the q/k head (group) count ({groups})"
        )
    scalar = (batch, length, heads)
    vector = (batch, length, heads, key_dim)
    if tuple(log_decay.shape) not in (scalar, vector):
        raise ValueError(
            f"linear_recurrence: log_decay must be per head {scalar} (Mamba-2) or per key channel {vector} (GLA), "
            f"got {tuple(log_decay.shape)}"
        )
    if initial_state is not None:
        expected = (batch, heads, key_dim, v.shape[3])
        if not isinstance(initial_state, torch.Tensor) or tuple(initial_state.shape) != expected:
            got = tuple(initial_state.shape) if isinstance(initial_state, torch.Tensor) else type(initial_state).__name__
            raise ValueError(f"linear_recurrence: initial_state must be (B, H, N, P) = {expected}, got {got}")
        if not initial_state.is_floating_point():
            raise TypeError(f"linear_recurrence: `initial_state` must be a floating-point tensor, got dtype {initial_state.dtype}")
    devices = {t.device for t in (q, k, v, log_decay, initial_state) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"linear_recurrence: all inputs must be on one device, got {sorted(map(str, devices))}")


def autocast_disabled(device: torch.device):
    """A context without autocast on ``device``: the kernels choose their own (float32 or wider) compute dtype,
    which autocast would override for their matmuls (and a bf16 matmul result then fails an in-place float32 op)."""
    if device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()
