"""Recurrent (one token at a time) inference: O(1) memory per token from a carried (B, H, N, P) state."""
from __future__ import annotations

import torch

from ._serial import serial_slices
from ._validate import accumulation_dtype, autocast_disabled, check_step_inputs, expand_groups, grad_needed


def recurrent_step(q_t, k_t, v_t, log_decay_t, state=None, *, validate: bool = True):
    """Advance the recurrence by one token.

    Args:
        q_t, k_t: (B, G, N) query/key of this token (G divides H).
        v_t: (B, H, P) value.
        log_decay_t: (B, H) per-head or (B, H, N) per-key-channel log decay (<= 0).
        state: (B, H, N, P) carried state, or None for a zero state. Kept in float32 (float64 for float64 input).
        validate: Check shapes, dtypes, devices and the decay's sign first (ValueError/TypeError naming the
            argument); False skips that for inputs built to fit, e.g. by a mixer at every token.

    Returns:
        (y_t (B, H, P) in v_t's dtype, new state (B, H, N, P)).
    """
    if validate:
        check_step_inputs(q_t, k_t, v_t, log_decay_t, state)
    return _step(q_t, k_t, v_t, log_decay_t, state)


def _per_head(x_t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, G, N) query/key groups as (B, H, N); one group shared by all heads (Mamba-2) as a view, not a copy:
    at one token per call, the copy costs as much as the state update's arithmetic."""
    if x_t.shape[1] == 1:
        return x_t.expand(-1, heads, -1)
    return expand_groups(x_t.unsqueeze(1), heads).squeeze(1)


def _step(q_t, k_t, v_t, log_decay_t, state):
    acc = accumulation_dtype(q_t, k_t, v_t, log_decay_t, state)
    heads = v_t.shape[1]
    q_t = _per_head(q_t, heads).to(acc)  # (B, H, N)
    k_t = _per_head(k_t, heads).to(acc)  # (B, H, N)
    decay = log_decay_t.to(acc).exp()
    decay = decay[..., None] if decay.dim() == 3 else decay[..., None, None]
    k_col, v_row = k_t[..., :, None], v_t.to(acc)[..., None, :]  # (B, H, N, 1), (B, H, 1, P)
    if grad_needed(k_col, v_row, decay, state):
        # Also from a zero state the decay stays in the graph (its gradient is 0, not missing).
        state = k_col.new_zeros(torch.broadcast_shapes(k_col.shape, v_row.shape)) if state is None else state.to(acc)
        state = decay * state + k_col * v_row  # (B, H, N, P)
    elif state is None:
        state = k_col * v_row
    else:
        # A new state (the caller may keep the old one), in two passes instead of three and, where OpenMP's threads
        # sleep at once, in head pieces that run on the calling thread: one token's update is too small to pay for
        # waking them.
        pieces = serial_slices(state, dim=1)
        if len(pieces) == 1:  # no slicing: each view costs a microsecond, a sixth of the update
            state = torch.mul(state.to(acc), decay).addcmul_(k_col, v_row)
        else:
            state, old = torch.empty_like(state, dtype=acc), state
            for heads_slice in pieces:
                new = state[:, heads_slice]
                torch.mul(old[:, heads_slice], decay[:, heads_slice], out=new)
                new.addcmul_(k_col[:, heads_slice], v_row[:, heads_slice])
    with autocast_disabled(q_t.device):
        y_t = (q_t.unsqueeze(-2) @ state).squeeze(-2)  # (B, H, P)
    return y_t.to(v_t.dtype), state


def step_linear_recurrence(q, k, v, log_decay, initial_state=None, return_final_state=False):
    """The whole sequence through :func:`recurrent_step`, as a decoder would run it."""
    # recurrent_step checks each token; here the inputs were checked once by linear_recurrence, so call the
    # unchecked core to avoid a per-token sign check (a device sync each on GPU).
    state = initial_state
    outputs = []
    for t in range(q.shape[1]):
        y_t, state = _step(q[:, t], k[:, t], v[:, t], log_decay[:, t], state)
        outputs.append(y_t)
    y = torch.stack(outputs, dim=1)
    return y, (state if return_final_state else None)
