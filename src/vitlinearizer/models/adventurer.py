"""Adventurer: a plain ViT-like stack of causal linear-time token mixers (Mamba-2 by default).

Paper: "Adventurer: Optimizing Vision Mamba Architecture Designs for Efficiency" (arXiv 2410.07599), the
student of "ViT-Linearizer" (arXiv 2504.00037). Original code: github.com/wangf3014/Adventurer (a895f9e).

Differences from the released code:
- scan direction flips in every other block (``i % 2 == 1``); the release's ``i // 2 == 1`` flips only
  blocks 2 and 3, a bug its author confirmed (Adventurer issue #6);
- drop-path rates are ``linspace(0, rate, depth)`` (the release prepends a 0 and shifts them by one block);
- any input resolution at run time: the position embedding is resampled on the fly;
- the mixer is pluggable (``mamba2`` | ``gla`` | ``hgrn``) and runs on the pure-PyTorch kernels of
  :mod:`vitlinearizer.ops` (Triton through fla-core on GPU when installed);
- an optional learnable ``mask_token`` replaces masked patch embeddings (masked distillation).
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import PatchEmbed, RmsNorm, resample_abs_pos_embed, to_2tuple, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint

try:  # torch.export with dynamic sizes must not take shape-dependent early-outs (timm's own resampling skips them)
    from timm.layers import is_exporting
except ImportError:  # older timm: an export is specialised to the example's size when that is the native one
    def is_exporting() -> bool:
        return False

try:  # newer timm records a model's current input size, read by its data config and exports
    from timm.models._input import update_model_input_size
except ImportError:  # older timm has no such record to keep up to date
    update_model_input_size = None

from .adventurer_block import AdventurerBlock, _forward_hooked, _plain_rms_norm, _rms_scale
from .mixers import MIXERS

__all__ = ["Adventurer", "AdventurerBlock", "checkpoint_filter_fn"]


# timm's names: the class token, the mean / max / mean + max of the patch tokens, none (the head sees every token)
GLOBAL_POOLS = ("token", "avg", "max", "avgmax", "")


def _check_global_pool(global_pool: str) -> str:
    if global_pool not in GLOBAL_POOLS:
        raise ValueError(f"global_pool must be one of {', '.join(map(repr, GLOBAL_POOLS))} "
                         f"('' keeps every token, class token last), got {global_pool!r}")
    return global_pool


class Adventurer(nn.Module):
    """Isotropic causal vision model: patch embed, class token appended LAST, blocks, RMSNorm, class-token head."""

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        embed_dim: int = 512,
        depth: int = 12,
        mlp_ratio: float = 2.5,
        mixer: str = "mamba2",
        mixer_kwargs: dict | None = None,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-5,
        use_mask_token: bool = False,
        dynamic_img_pad: bool = False,
        **kwargs,
    ):
        super().__init__()
        if kwargs.pop("dynamic_img_size", True) is False:
            raise ValueError("Adventurer always accepts any resolution that is a multiple of the patch size "
                             "(any resolution with dynamic_img_pad=True)")
        kwargs.pop("pretrained_cfg", None)
        # timm's factory arguments (create_model(..., device="meta", dtype=torch.bfloat16)), as its ViT takes them.
        device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
        if kwargs:
            raise TypeError(f"Adventurer got unexpected arguments: {', '.join(sorted(kwargs))}")
        if mixer not in MIXERS:
            raise ValueError(f"unknown mixer {mixer!r}; choose one of {', '.join(MIXERS)}")
        self.num_classes, self.global_pool = num_classes, _check_global_pool(global_pool)
        self.in_chans = in_chans  # timm's data config reads the channel count from here (else it assumes 3)
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1  # the class token (stored last; timm's name kept for tooling)
        self.mixer_name = mixer
        self.grad_checkpointing = False

        with torch.device(device) if device is not None else contextlib.nullcontext():
            # dynamic_img_pad (as timm's ViT): a side that is not a multiple of the patch is zero-padded at the
            # bottom / right to the next multiple, instead of refused.
            self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, strict_img_size=False,
                                          dynamic_img_pad=dynamic_img_pad)
            self.patch_grid(*self.patch_embed.img_size)  # the native resolution must fit the patch too
            self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
            self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
            self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if use_mask_token else None
            rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
            self.blocks = nn.Sequential(*[
                AdventurerBlock(embed_dim, mixer, mixer_kwargs, mlp_ratio, rates[i], flip=i % 2 == 1, norm_eps=norm_eps)
                for i in range(depth)
            ])
            # timm reports one reduction per feature map; a non-square patch reports its larger side, as timm's ViT
            # does.
            reduction = max(to_2tuple(patch_size))
            self.feature_info = [dict(module=f"blocks.{i}", num_chs=embed_dim, reduction=reduction)
                                 for i in range(depth)]
            self.norm = RmsNorm(embed_dim, eps=norm_eps)
            self.head_drop = nn.Dropout(drop_rate)
            self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
            self.init_weights()
        if dtype is not None:
            self.to(dtype=dtype)

    def init_weights(self) -> None:
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        if self.mask_token is not None:
            trunc_normal_(self.mask_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        # GPT-2 style: scale residual-branch outputs so the residual stream's variance does not grow with depth.
        for block in self.blocks:
            for proj in (block.mlp.fc2, getattr(block.mixer, "out_proj", None), getattr(block.mixer, "o_proj", None)):
                if proj is not None:
                    proj.weight.data.div_(math.sqrt(2 * len(self.blocks)))
        for mixer in (b.mixer for b in self.blocks):
            if hasattr(mixer, "gk_proj"):  # GLA: start with slow decay (logsigmoid of a positive bias ~ 0)
                nn.init.constant_(mixer.gk_proj[1].bias, 4.0)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The mask token is used only by masked distillation: a distilled student loads as a plain classifier
        # (also through timm's `checkpoint_path` and `load_state_dict(strict=True)`).
        if self.mask_token is None:
            state_dict.pop(prefix + "mask_token", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ----------------------------------------------------------------------------------------- timm API
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token", "mask_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^cls_token|^pos_embed|^mask_token|^patch_embed", blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = _check_global_pool(global_pool)
        # On the model's device and dtype, in its train/eval mode, as timm's ViT makes it.
        like = self.patch_embed.proj.weight
        self.head = (nn.Linear(self.embed_dim, num_classes, device=like.device, dtype=like.dtype)
                     if num_classes > 0 else nn.Identity())
        self.head.train(self.training)

    def set_input_size(self, img_size: int | tuple[int, int] | None = None, patch_size=None) -> None:
        """Change the native resolution: the position embedding is resampled once and stored at the new grid."""
        if patch_size is not None and to_2tuple(patch_size) != tuple(self.patch_embed.patch_size):
            raise ValueError("Adventurer cannot change its patch size after creation; create a new model instead")
        if img_size is not None:
            self.patch_grid(*to_2tuple(img_size))
        old_grid = self.patch_embed.grid_size
        self.patch_embed.set_input_size(img_size=img_size)
        new_grid = self.patch_embed.grid_size
        if new_grid != old_grid:
            patches = resample_abs_pos_embed(self.pos_embed[:, :-1], list(new_grid), list(old_grid), num_prefix_tokens=0)
            self.pos_embed = nn.Parameter(torch.cat([patches, self.pos_embed[:, -1:]], dim=1).detach(),
                                          requires_grad=self.pos_embed.requires_grad)  # a frozen one stays frozen
        if update_model_input_size is not None:
            update_model_input_size(self, self.patch_embed.img_size)

    # ----------------------------------------------------------------------------------------- forward
    def patch_grid(self, height: int, width: int) -> tuple[int, int]:
        """Token grid for an input size; a clear error when a side is not a multiple of the patch size (unless
        the model pads it: ``dynamic_img_pad``)."""
        return patch_grid(height, width, self.patch_embed.patch_size, pad=self.patch_embed.dynamic_img_pad)

    def _patchify(self, x: torch.Tensor) -> torch.Tensor:
        """The patch embedding as one GEMM over (B, N, C*p*p) patches: the same numbers as the stride-p Conv2d
        of ``patch_embed.proj`` (same weights), about twice as fast on CPU (benchmarks/block_parts.py)."""
        pe = self.patch_embed
        plain = (isinstance(pe.norm, nn.Identity) and getattr(pe, "flatten", True) and not getattr(pe, "dynamic_img_pad", False)
                 and isinstance(pe.proj, nn.Conv2d) and pe.proj.kernel_size == pe.proj.stride and pe.proj.padding == (0, 0)
                 and not _forward_hooked(pe))
        if not plain:
            return pe(x)
        batch, chans, height, width = x.shape
        ph, pw = pe.proj.kernel_size
        patches = x.reshape(batch, chans, height // ph, ph, width // pw, pw).permute(0, 2, 4, 1, 3, 5)
        patches = patches.reshape(batch, (height // ph) * (width // pw), chans * ph * pw)
        return F.linear(patches, pe.proj.weight.reshape(pe.proj.out_channels, -1), pe.proj.bias)

    def _embed(self, x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, tuple[int, int]]:
        _check_images(x, self.patch_embed.proj.weight)
        grid = self.patch_grid(x.shape[-2], x.shape[-1])
        x = self._patchify(x)  # (B, N, D)
        if mask is not None:
            if self.mask_token is None:
                raise ValueError("this model has no mask token; create it with use_mask_token=True to pass `mask`")
            if mask.shape != x.shape[:2] or mask.dtype != torch.bool:
                raise ValueError(f"mask must be a bool tensor of shape {tuple(x.shape[:2])}, got {mask.dtype} {tuple(mask.shape)}")
            x = torch.where(mask[..., None], self.mask_token.to(x.dtype), x)
        pos = self._pos_embed_for(grid)
        x = torch.cat([x, self.cls_token.expand(x.shape[0], -1, -1)], dim=1)  # class token LAST
        if torch.is_grad_enabled() or torch.promote_types(x.dtype, pos.dtype) != x.dtype:
            return x + pos, grid
        return x.add_(pos), grid  # x is a fresh tensor of this forward

    def _pos_embed_for(self, grid: tuple[int, int]) -> torch.Tensor:
        """The position embedding resampled to ``grid``. Without autograd the bicubic resample is cached and
        reused while the parameter holds the same values: compared element-wise, since fused optimisers and
        writes through ``.data`` change a parameter without bumping its version counter."""
        pos = self.pos_embed
        cacheable = not torch.is_grad_enabled() and pos.device.type != "meta" and not torch.compiler.is_compiling()
        cached = getattr(self, "_pos_cache", None) if cacheable else None
        if (cached is not None and cached[0] == grid and cached[1].dtype == pos.dtype
                and cached[1].device == pos.device and torch.equal(cached[1], pos)):
            return cached[2]
        resampled = _pos_embed_at(pos, grid, self.patch_embed.grid_size)
        if cacheable and resampled is not pos:
            self._pos_cache = (grid, pos.detach().clone(), resampled)
        return resampled

    def _run_block(self, block: nn.Module, x: torch.Tensor, owned: bool = False) -> torch.Tensor:
        """``owned``: x is a temporary of this forward that nothing else references, so a streaming block
        may write its output into it (saves one (B, L, D) allocation per block)."""
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint(block, x)
        if owned and isinstance(block, AdventurerBlock) and block._streamable(x):
            return block._forward_streaming(x, out=x)
        return block(x)

    def forward_features(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, H, W) -> (B, N + 1, D) normalised tokens; ``mask`` (B, N) bool replaces patch embeddings."""
        x, _ = self._embed(x, mask)
        owned = not _forward_hooked(self)  # a hook may keep a block's output, which must then not be overwritten
        for block in self.blocks:
            x = self._run_block(block, x, owned=owned)
        if owned and not torch.is_grad_enabled() and _plain_rms_norm(self.norm):  # x is this forward's own tensor
            x = x.mul_(_rms_scale(self.norm, x).to(x.dtype))
            return x.mul_(self.norm.weight.to(x.dtype)) if self.norm.weight is not None else x
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "token":
            x = x[:, -1]
        elif self.global_pool:  # pools over the patch tokens (the class token is last)
            patches = x[:, :-1]
            if self.global_pool == "avg":
                x = patches.mean(dim=1)
            elif self.global_pool == "max":
                x = patches.amax(dim=1)
            else:  # avgmax
                x = 0.5 * (patches.mean(dim=1) + patches.amax(dim=1))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        mask: torch.Tensor | None = None,
    ):
        """Block outputs as patch tokens in raster order ('NLC' (B, N, D) or 'NCHW'); the class token is the prefix."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        x, (gh, gw) = self._embed(x, mask)
        blocks = self.blocks[: max_index + 1] if stop_early else self.blocks
        intermediates = []
        for i, block in enumerate(blocks):
            x = self._run_block(block, x)
            if i in take_indices:
                intermediates.append(self.norm(x) if norm else x)
        prefix = [y[:, -1:] for y in intermediates]
        intermediates = [y[:, :-1] for y in intermediates]
        if output_fmt == "NCHW":
            # The width is spelled out: an empty batch leaves a -1 ambiguous (timm's ViT fails there).
            intermediates = [y.reshape(y.shape[0], gh, gw, y.shape[-1]).permute(0, 3, 1, 2).contiguous()
                             for y in intermediates]
        if return_prefix_tokens:
            intermediates = list(zip(intermediates, prefix))
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(self, indices=1, prune_norm: bool = False, prune_head: bool = True) -> list[int]:
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[: max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:  # no head and no pooling, as timm's ViT: forward() then returns every token
            self.reset_classifier(0, "")
        return take_indices


def _check_images(x: torch.Tensor, patch_weight: torch.Tensor) -> None:
    """A clear error for inputs the patch embedding (weight ``patch_weight``) cannot take."""
    chans = patch_weight.shape[1]
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != chans:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"expected images of shape (B, {chans}, H, W), got {got}"
                         + ("; add a batch dimension with x.unsqueeze(0)" if isinstance(x, torch.Tensor) and x.dim() == 3 else ""))
    if x.dtype != patch_weight.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"input dtype {x.dtype} does not match the model's {patch_weight.dtype}; convert one of them "
                        f"(x.to({patch_weight.dtype}) or model.to({x.dtype})), or run under torch.autocast")


def _pos_embed_at(pos_embed: torch.Tensor, grid: tuple[int, int], native_grid: tuple[int, int]) -> torch.Tensor:
    """``pos_embed`` (patches in raster order, class token last) resampled from ``native_grid`` to ``grid``."""
    # Not while exporting: the branch would fix the graph to one side of the native size (a same-size resample is
    # the identity, as timm's resample_abs_pos_embed relies on).
    if not is_exporting() and tuple(grid) == tuple(native_grid):
        return pos_embed
    patches = resample_abs_pos_embed(pos_embed[:, :-1], list(grid), list(native_grid), num_prefix_tokens=0)
    return torch.cat([patches, pos_embed[:, -1:]], dim=1)


# torch.fx symbolic tracing (timm's FX feature extraction, FX quantisation) records these as calls instead of tracing
# them: their checks and the resampling depend on the input's size, which a traced graph must take at run time.
torch.fx.wrap("_check_images")
torch.fx.wrap("_pos_embed_at")
torch.fx.wrap("patch_grid")


def nearest_patch_multiple(height: int, width: int, patch_size: tuple[int, int]) -> tuple[int, int]:
    """The input size closest to (height, width) that the patch size tiles (at least one patch per side)."""
    ph, pw = patch_size
    return max(ph, round(height / ph) * ph), max(pw, round(width / pw) * pw)


def patch_grid(height: int, width: int, patch_size: tuple[int, int], pad: bool = False) -> tuple[int, int]:
    """Token grid of any patch-embedding model for an input size; a clear error when a side is not a multiple
    of the patch size (timm's ViT would silently crop it), or with ``pad`` the grid of the input padded to one."""
    ph, pw = patch_size
    if pad:
        return -(-height // ph), -(-width // pw)
    if height % ph or width % pw:
        fit = nearest_patch_multiple(height, width, patch_size)
        raise ValueError(
            f"input size {height}x{width} is not a multiple of the patch size {ph}x{pw}; "
            f"resize or crop to a multiple, e.g. {fit[0]}x{fit[1]}"
        )
    return height // ph, width // pw


def _source_grid(model: nn.Module, positions: int, recorded_only: bool) -> tuple[int, int] | None:
    """The checkpoint's patch grid from what timm knows of its source: the ``img_size`` a timm export records
    (``save_for_hf``'s config.json, read back by ``local-dir:`` / ``hf-hub:`` into ``model.pretrained_model_args``)
    or, unless ``recorded_only``, ``pretrained_cfg['input_size']`` (settable with ``pretrained_cfg_overlay``).
    None when that size does not account for every position (it then describes some other checkpoint)."""
    size = (getattr(model, "pretrained_model_args", None) or {}).get("img_size")
    if size is None and not recorded_only:
        size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size", (None, None, None))[1:]
    if size is None or None in to_2tuple(size):
        return None
    ph, pw = model.patch_embed.patch_size
    height, width = to_2tuple(size)
    grid = (height // ph, width // pw)
    return grid if grid[0] * grid[1] == positions else None


def checkpoint_filter_fn(state_dict: dict, model: Adventurer, grid: tuple[int, int] | None = None) -> dict:
    """Map a saved state dict onto ``model``: unwrap containers, resample the position embedding (a mask token
    the model does not have is dropped by :meth:`Adventurer._load_from_state_dict`).

    ``grid``: the checkpoint's patch grid (rows, columns). A state dict alone cannot tell 6x8 from 8x6: without
    ``grid`` the size timm recorded for the checkpoint is used (see :func:`_source_grid`), else a square grid.
    """
    for key in ("model_ema", "state_dict_ema", "model", "state_dict"):
        if key in state_dict and isinstance(state_dict[key], dict):
            state_dict = state_dict[key]
            break
    state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    if any(k.startswith("student.") for k in state_dict):
        # A training task's state dict (a Trainer checkpoint's model.safetensors): the student, without the task's
        # own parameters (the distillation predictor, a teacher).
        state_dict = {k.removeprefix("student."): v for k, v in state_dict.items() if k.startswith("student.")}
    out = {}
    for k, v in state_dict.items():
        if k == "pos_embed":
            n = v.shape[1] - 1
            same_shape = v.shape == model.pos_embed.shape
            # An equal token count can still be another grid (6x8 into 8x6); only a recorded size says so.
            old = tuple(grid) if grid is not None else _source_grid(model, n, recorded_only=same_shape)
            if old is None and not same_shape:
                old = (math.isqrt(n),) * 2
                if old[0] * old[1] != n:
                    raise ValueError(
                        f"cannot infer the grid of a non-square pos_embed with {n} patch positions; create the model "
                        "at the checkpoint's own img_size, load it, then call model.set_input_size(img_size=...), "
                        "or state the checkpoint's size with pretrained_cfg_overlay=dict(input_size=(C, H, W))")
            if old is not None and (not same_shape or old != tuple(model.patch_embed.grid_size)):
                if old[0] * old[1] != n:
                    raise ValueError(f"the checkpoint's grid {old[0]}x{old[1]} does not match its pos_embed "
                                     f"of {n} patch positions")
                patches = resample_abs_pos_embed(v[:, :-1], list(model.patch_embed.grid_size), list(old),
                                                 num_prefix_tokens=0)
                v = torch.cat([patches, v[:, -1:]], dim=1)
        out[k] = v
    return out


def _create_adventurer(variant: str, pretrained: bool = False, **kwargs) -> Adventurer:
    out_indices = kwargs.pop("out_indices", 3)
    return build_model_with_cfg(
        Adventurer,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )


def _cfg(url: str = "", **kwargs) -> dict:
    return {
        "url": url,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.9,
        "interpolation": "bicubic",
        "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "apache-2.0",
        **kwargs,
    }


_DEMO = dict(num_classes=10, input_size=(3, 28, 28), crop_pct=1.0)
default_cfgs = generate_default_cfgs({
    "adventurer_tiny_patch16_224": _cfg(),
    "adventurer_small_patch16_224": _cfg(),
    "adventurer_base_patch16_224": _cfg(),
    "adventurer_large_patch16_224": _cfg(),
    "adventurer_nano_patch4_28": _cfg(**_DEMO),
    "adventurer_micro_patch4_28": _cfg(**_DEMO),
})

# Demo sizes keep Mamba-2's structure with a smaller state and heads, sized for 28-64 px inputs.
_DEMO_MAMBA2 = dict(d_state=32, head_dim=32)


def _demo_args(kwargs: dict) -> dict:
    if kwargs.get("mixer", "mamba2") == "mamba2":
        kwargs["mixer_kwargs"] = {**_DEMO_MAMBA2, **(kwargs.get("mixer_kwargs") or {})}
    return kwargs


@register_model
def adventurer_tiny_patch16_224(pretrained: bool = False, **kwargs) -> Adventurer:
    """Adventurer-Tiny (~12M), width 256, depth 12."""
    model_args = dict(patch_size=16, embed_dim=256, depth=12)
    return _create_adventurer("adventurer_tiny_patch16_224", pretrained, **dict(model_args, **kwargs))


@register_model
def adventurer_small_patch16_224(pretrained: bool = False, **kwargs) -> Adventurer:
    """Adventurer-Small (44M), width 512, depth 12."""
    model_args = dict(patch_size=16, embed_dim=512, depth=12)
    return _create_adventurer("adventurer_small_patch16_224", pretrained, **dict(model_args, **kwargs))


@register_model
def adventurer_base_patch16_224(pretrained: bool = False, **kwargs) -> Adventurer:
    """Adventurer-Base (99M), width 768, depth 12."""
    model_args = dict(patch_size=16, embed_dim=768, depth=12)
    return _create_adventurer("adventurer_base_patch16_224", pretrained, **dict(model_args, **kwargs))


@register_model
def adventurer_large_patch16_224(pretrained: bool = False, **kwargs) -> Adventurer:
    """Adventurer-Large (346M), width 1024, depth 24."""
    model_args = dict(patch_size=16, embed_dim=1024, depth=24)
    return _create_adventurer("adventurer_large_patch16_224", pretrained, **dict(model_args, **kwargs))


@register_model
def adventurer_nano_patch4_28(pretrained: bool = False, **kwargs) -> Adventurer:
    """Demo size (1.4M), width 128, depth 6, patch 4: for 28-64 px images."""
    model_args = dict(img_size=28, patch_size=4, embed_dim=128, depth=6)
    return _create_adventurer("adventurer_nano_patch4_28", pretrained, **_demo_args(dict(model_args, **kwargs)))


@register_model
def adventurer_micro_patch4_28(pretrained: bool = False, **kwargs) -> Adventurer:
    """Demo size (3.1M), width 192, depth 6, patch 4: for 28-64 px images."""
    model_args = dict(img_size=28, patch_size=4, embed_dim=192, depth=6)
    return _create_adventurer("adventurer_micro_patch4_28", pretrained, **_demo_args(dict(model_args, **kwargs)))
