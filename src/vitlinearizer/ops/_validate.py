"""Input checks and small helpers shared by every recurrence path: errors name the argument, its shape and what is allowed."""
from __future__ import annotations

import contextlib

import torch


def accumulation_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """The dtype every path computes and keeps the state in: float64 when any input is float64, else float32
    (so a float64 value or state is never silently rounded through a float32 query)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def grad_needed(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd records ops on these tensors: else the paths may overwrite their temporaries in place."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


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
    check_log_decay_sign(log_decay, "linear_recurrence")


def check_log_decay_sign(log_decay: torch.Tensor, caller: str, name: str = "log_decay") -> None:
    """A positive log-decay is a growth factor: the naive/step paths silently amplify the state and the chunked
    factored weights can overflow, so it is refused up front. NaN is let through (as in the naive loop) so that
    an AMP overflow still reaches the loss scaler instead of crashing the run.

    Checked on CPU only: on an accelerator, reading the answer back would synchronise the device on every call
    (every token of step-by-step inference). The mixers' decays are <= 0 by construction. (The chunked kernel's
    own choices, its span guard and overflow check, do read back on an accelerator: two syncs per call, which is
    why CUDA takes fla when it is installed.)"""
    # Data-dependent: a graph being captured cannot branch on it, and meta tensors carry no values.
    if log_decay.device.type != "cpu" or torch.compiler.is_compiling() or torch.jit.is_tracing():
        return
    if log_decay.numel() and bool((log_decay > 0).any()):
        raise ValueError(
            f"{caller}: {name} must be <= 0 (a decay exp({name}) in [0, 1]), got a maximum of "
            f"{log_decay[log_decay > 0].max().item():.4g} in {name} of shape {tuple(log_decay.shape)}"
        )


def check_step_inputs(q_t, k_t, v_t, log_decay_t, state=None) -> None:
    """The one-token counterpart of :func:`check_recurrence_inputs`, for :func:`recurrent_step`."""
    for name, t in dict(q_t=q_t, k_t=k_t, v_t=v_t, log_decay_t=log_decay_t, state=state).items():
        if t is None and name == "state":
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"recurrent_step: `{name}` must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"recurrent_step: `{name}` must be a floating-point tensor, got dtype {t.dtype}")
    if q_t.dim() != 3 or k_t.dim() != 3 or v_t.dim() != 3 or q_t.shape != k_t.shape:
        raise ValueError(
            "recurrent_step: q_t, k_t must be the same (B, G, N) and v_t (B, H, P); "
            f"got q_t {tuple(q_t.shape)}, k_t {tuple(k_t.shape)}, v_t {tuple(v_t.shape)}"
        )
    batch, groups, key_dim = q_t.shape
    heads, value_dim = v_t.shape[1], v_t.shape[2]
    if v_t.shape[0] != batch or heads % groups != 0:
        raise ValueError(
            f"recurrent_step: v_t must be (B, H, P) with B = {batch} and H a multiple of the q_t/k_t group count "
            f"G = {groups}, got v_t {tuple(v_t.shape)}"
        )
    scalar, vector = (batch, heads), (batch, heads, key_dim)
    if tuple(log_decay_t.shape) not in (scalar, vector):
        raise ValueError(
            f"recurrent_step: log_decay_t must be per head {scalar} or per key channel {vector}, "
            f"got {tuple(log_decay_t.shape)}"
        )
    expected = (batch, heads, key_dim, value_dim)
    if state is not None and tuple(state.shape) != expected:
        # A broadcastable state (e.g. without the batch dim) would otherwise be silently shared by the batch.
        raise ValueError(f"recurrent_step: state must be (B, H, N, P) = {expected}, got {tuple(state.shape)}")
    devices = {t.device for t in (q_t, k_t, v_t, log_decay_t, state) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"recurrent_step: all inputs must be on one device, got {sorted(map(str, devices))}")
    check_log_decay_sign(log_decay_t, "recurrent_step", "log_decay_t")


def autocast_disabled(device: torch.device):
    """A context without autocast on ``device``: the kernels choose their own (float32 or wider) compute dtype,
    which autocast would override for their matmuls (and a bf16 matmul result then fails an in-place float32 op)."""
    if device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()
