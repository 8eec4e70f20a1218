"""Reference linear recurrence: an explicit loop over tokens in float32 (float64 for float64 input).

    S_t = exp(log_decay_t) * S_{t-1} + k_t v_t^T        S: (N, P) per batch and head
    y_t = S_t^T q_t

Slow and obviously correct; every other path is tested against it.
"""
from __future__ import annotations

import torch

from ._validate import accumulation_dtype, expand_groups


def naive_linear_recurrence(q, k, v, log_decay, initial_state=None, return_final_state=False):
    """Args and returns as :func:`vitlinearizer.ops.linear_recurrence`."""
    acc = accumulation_dtype(q, k, v, log_decay, initial_state)
    out_dtype = v.dtype
    heads = v.shape[2]
    q, k = expand_groups(q, heads).to(acc), expand_groups(k, heads).to(acc)  # (B, L, H, N)
    v, log_decay = v.to(acc), log_decay.to(acc)
    batch, length, _, key_dim = q.shape
    value_dim = v.shape[-1]
    if initial_state is None:
        state = q.new_zeros(batch, heads, key_dim, value_dim)  # (B, H, N, P)
    else:
        state = initial_state.to(acc, copy=True)  # never the caller's tensor, also for an empty sequence
    per_channel = log_decay.dim() == 4
    outputs = []
    for t in range(length):
        decay = log_decay[:, t].exp()  # (B, H) or (B, H, N)
        decay = decay[..., None] if per_channel else decay[..., None, None]
        state = decay * state + k[:, t, :, :, None] * v[:, t, :, None, :]
        outputs.append((q[:, t, :, :, None] * state).sum(dim=2))  # (B, H, P)
    y = torch.stack(outputs, dim=1).to(out_dtype) if outputs else v.new_empty(v.shape, dtype=out_dtype)  # (B, L, H, P)
    return y, (state if return_final_state else None)
