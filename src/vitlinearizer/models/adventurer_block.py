"""The Adventurer block: [flip] -> heading average -> causal token mixer -> [flip back], then a SwiGLU MLP.

Besides the plain (autograd) forward, the block has an inference path that streams the scan in slabs carrying the
mixer's state, with slab-sized temporaries updated in place (docs/performance.md, "Student speed work").
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, RmsNorm, SwiGLU
from torch.nn.modules import module as _module_globals

from .mixers import create_mixer

__all__ = ["AdventurerBlock", "STREAM_SLAB_TOKENS", "slab_size"]


def _scan_order(length: int, device: torch.device) -> torch.Tensor:
    """Token index at each position of a flipped scan: patches reversed, class token (last) in place.

    The permutation is its own inverse, so the same index also puts the scan outputs back in raster order.
    """
    order = torch.arange(length - 2, -2, -1, device=device)
    order[-1] = length - 1
    return order


# torch.fx records the scan order as one call: it is built from the sequence length, unknown while tracing.
torch.fx.wrap("_scan_order")


def _forward_hooked(module: nn.Module) -> bool:
    """Whether a forward hook would observe ``module`` or a module inside it.

    The no-autograd fast paths run submodules' arithmetic without their ``__call__`` and overwrite buffers in
    place; hooks (timm's hook-based feature extraction, profilers, FLOP counters, visualisation tools) must see
    every call and keep what they were given, so with any hook the plain module calls run instead.
    """
    if _module_globals._global_forward_hooks or _module_globals._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())


def _rms_scale(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Per-token factor 1/RMS of timm's ``RmsNorm`` (B, L, 1), from one reduction pass (no x**2 temporary)."""
    acc = torch.promote_types(x.dtype, torch.float32)
    rms = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=acc)
    return rms.square_().div_(x.shape[-1]).add_(norm.eps).rsqrt_()


def _plain_rms_norm(norm: nn.Module) -> bool:
    return isinstance(norm, RmsNorm) and len(norm.normalized_shape) == 1


def _rms_norm(norm: nn.Module, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """timm ``RmsNorm`` without autograd: one output tensor, scaled in place; ``scale`` from :func:`_rms_scale`."""
    if not _plain_rms_norm(norm):
        return norm(x)
    out = x * (_rms_scale(norm, x) if scale is None else scale).to(x.dtype)
    return out.mul_(norm.weight.to(x.dtype)) if norm.weight is not None else out


def _swiglu(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm ``SwiGLU`` without autograd: the gate is activated and multiplied in place."""
    plain = (isinstance(mlp, SwiGLU) and isinstance(mlp.norm, nn.Identity)
             and isinstance(mlp.act, nn.SiLU) and not mlp.training)
    if not plain:
        return mlp(x)
    gate = F.silu(mlp.fc1_g(x), inplace=True)
    return mlp.fc2(gate.mul_(mlp.fc1_x(x)))


# Target tokens per slab of the streaming inference path (see AdventurerBlock): slabs bound the temporaries
# (and so peak memory, cache misses and the page faults of fresh multi-MB allocations), but every slab costs
# ~60 more ops. Measured on 2 CPU cores (4-block Adventurer-S at width 384, alternating; docs/performance.md):
# 1536 beats 2048 by 20% at 768² (two slabs instead of one) and by ~5% at 1024² and 2048²; 1024 is level
# with 1536 at 768² and 1024² and 7% slower at 2048².
STREAM_SLAB_TOKENS = 1536
SLAB_ALIGN = 64  # slabs are whole chunks of the recurrence kernel


def slab_size(positions: int, target: int) -> int:
    """Equal slabs of about ``target`` positions (a multiple of SLAB_ALIGN); ``positions`` when one slab."""
    count = max(1, (2 * positions + target) // (2 * target))  # rounded; also for traced (tensor) sizes
    if count == 1:
        return positions
    align = min(SLAB_ALIGN, target)
    per = -(-positions // count)  # ceil
    return -(-per // align) * align


class AdventurerBlock(nn.Module):
    """Pre-norm block: [flip] -> prepend heading average -> causal mixer -> drop it -> [flip back]; SwiGLU MLP.

    Without autograd (``torch.no_grad`` / ``inference_mode``) the block runs its inference path: the mixer
    scans the sequence in slabs of about ``stream_slab_tokens`` positions, carrying its state
    (:meth:`Mamba2Mixer.scan`), and each slab goes on through the residual, norm and MLP at once, with
    temporaries overwritten in place (one slab when the input is short or ``stream_slab_tokens = 0``).
    Same result as the parallel (autograd) form (tests/test_fast_paths.py), with a working set of one slab
    instead of several (L, 4D) temporaries.
    """

    def __init__(
        self,
        dim: int,
        mixer: str = "mamba2",
        mixer_kwargs: dict | None = None,
        mlp_ratio: float = 2.5,
        drop_path: float = 0.0,
        flip: bool = False,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        self.flip = flip
        self.stream_slab_tokens = STREAM_SLAB_TOKENS
        self.norm1 = RmsNorm(dim, eps=norm_eps)
        self.mixer = create_mixer(mixer, dim, **(mixer_kwargs or {}))
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = RmsNorm(dim, eps=norm_eps)
        self.mlp = SwiGLU(dim, int(dim * mlp_ratio), bias=True)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def _streamable(self, x: torch.Tensor) -> bool:
        """Whether the no-autograd path applies (streaming in slabs, or in one piece for short inputs)."""
        if torch.is_grad_enabled() or not hasattr(self.mixer, "scan") or _forward_hooked(self):
            return False
        return not self.training or (isinstance(self.drop_path1, nn.Identity) and isinstance(self.drop_path2, nn.Identity))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, N + 1, D), patch tokens in raster order and the class token last.
        if self._streamable(x):
            return self._forward_streaming(x)
        h = self.norm1(x)
        order = _scan_order(x.shape[1], x.device) if self.flip else None
        if order is not None:
            h = h.index_select(1, order)
        # The heading token gives every position a global summary before the causal scan reaches it.
        h = torch.cat([h.mean(dim=1, keepdim=True), h], dim=1)  # (B, N + 2, D)
        h = self.mixer(h)[:, 1:]
        if order is not None:
            h = h.index_select(1, order)
        x = x + self.drop_path1(h)
        return x + self.drop_path2(self.mlp(self.norm2(x)))

    def _forward_streaming(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """No-autograd forward, in slabs of about ``stream_slab_tokens`` scan positions (one slab for short
        inputs or ``stream_slab_tokens = 0``). ``out=x`` overwrites the input in place: each slab reads only
        its own rows, and the heading token is computed before any row is written.

        The last slab is not padded to whole chunks of the recurrence: that would also run the mixer's
        projections on the pad rows (+13% FLOPs at 224², 197 tokens); the kernel pads only its own inputs.
        """
        length = x.shape[1]
        out = torch.empty_like(x) if out is None else out
        order = _scan_order(length, x.device) if self.flip else None
        # Heading token = mean of norm1(x) over all tokens, without materialising norm1(x):
        # mean_t(x_t * s_t * w) = w * (s^T X) / L with s_t = 1 / RMS(x_t).
        plain = _plain_rms_norm(self.norm1)
        if plain:
            scale = _rms_scale(self.norm1, x)  # (B, L, 1)
            head = torch.bmm(scale.transpose(1, 2).to(x.dtype), x).div_(length)
            head = head.mul_(self.norm1.weight.to(x.dtype)) if self.norm1.weight is not None else head
        else:
            scale = None
            head = self.norm1(x).mean(dim=1, keepdim=True)
        total, state = length + 1, None
        slab = slab_size(total, self.stream_slab_tokens) if self.stream_slab_tokens else total
        for start in range(0, total, slab):
            stop = min(start + slab, total)
            lo, hi = max(start, 1) - 1, stop - 1  # tokens at scan positions [start, stop), heading excluded
            idx = None if order is None else order[lo:hi]
            rows = x[:, lo:hi] if idx is None else x.index_select(1, idx)
            if plain:
                row_scale = scale[:, lo:hi] if idx is None else scale.index_select(1, idx)
                u = _rms_norm(self.norm1, rows, row_scale)
            else:
                u = self.norm1(rows)
            if start == 0:
                u = torch.cat([head, u], dim=1)
            y, state = self.mixer.scan(u, state, want_state=stop < total)
            y = y[:, (1 if start == 0 else 0):(1 if start == 0 else 0) + hi - lo]
            # Residual, in scan order. Under autocast the mixer returns bf16/fp16: the residual stream keeps x's
            # dtype, as in the parallel form.
            y = y.add_(rows) if y.dtype == rows.dtype else rows + y
            y = y.add_(_swiglu(self.mlp, _rms_norm(self.norm2, y)))
            if idx is None:
                out[:, lo:hi] = y
            else:
                out.index_copy_(1, idx, y)
        return out
