"""Frozen timm ViT teacher whose token features are aligned to a student's patch grid.

The student emits raster-order patch tokens over its grid ``(Hs, Ws)``; the teacher may use
another patch size or resolution, so its token maps are resampled to that grid. Checkpoints
are read only through :func:`load_state_dict_safely`, which never unpickles arbitrary objects.
"""
from __future__ import annotations

import argparse
import difflib
import importlib
import inspect
import math
import pickle
import re
import warnings
from pathlib import Path
from typing import Collection, NamedTuple, Optional, Sequence, Union

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from .checkpoint import read_export_metadata, update_pretrained_cfg
from .models.adventurer import Adventurer, nearest_patch_multiple

__all__ = ["UnsafeCheckpointError", "check_teacher_model", "load_state_dict_safely", "pixels_per_token", "TeacherOutput",
           "Teacher"]

_CONTAINER_KEYS = ("state_dict", "model", "module")
_EMA_KEYS = ("model_ema", "state_dict_ema")
# timm's train.py stores its argparse.Namespace under "args"; a Namespace only sets attributes on unpickling.
_SAFE_GLOBALS = [argparse.Namespace]
_NOT_VIT = "teacher must be a ViT-family timm model with patch tokens"


class UnsafeCheckpointError(ValueError):
    """A checkpoint needs arbitrary Python objects (i.e. code execution) to load."""


def load_state_dict_safely(path: Union[str, Path], prefer_ema: bool = False,
                           model_keys: Optional[Collection[str]] = None,
                           option: str = "checkpoint file") -> dict[str, torch.Tensor]:
    """Loads a tensor state dict without ever executing code from the file.

    Args:
        path: ``.safetensors`` file; any other name (``.pth``, ``.pt``, ``.bin``, timm's ``.pth.tar``, Lightning's
            ``.ckpt``, no suffix) is read as a torch checkpoint that may hold only tensors and plain data.
        prefer_ema: Pick ``model_ema``/``state_dict_ema`` over raw weights when both exist.
        model_keys: State-dict keys of the model the weights are for. Key prefixes shared by every key are then
            removed as far as that makes more keys match (Lightning's ``model.``, ``net.``, ...); without them
            only DDP's ``module.`` is.
        option: What names the file in errors (e.g. ``teacher.weights``, the option it came from).

    Returns:
        Name -> CPU tensor; training containers (``state_dict``, ``model``, ...) and wrapper prefixes
        (``module.``; with ``model_keys`` also e.g. Lightning's ``model.``) removed.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        UnsafeCheckpointError: The pickle holds arbitrary objects (``ValueError`` subclass).
        ValueError: Unreadable file or no tensors inside.
    """
    path = Path(path)
    if path.is_dir():
        raise FileNotFoundError(f"{option} {path} is a directory; pass the weights file in it (.safetensors, .pth, "
                                f".bin)")
    if not path.is_file():
        raise FileNotFoundError(f"{option} not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj = load_file(str(path), device="cpu")
        except Exception as e:  # safetensors raises its own SafetensorError (not an OSError) on a bad header
            raise ValueError(f"{path} is not a readable .safetensors file (truncated or corrupt?); "
                             f"loader said: {type(e).__name__}: {e}") from e
    else:
        obj = _torch_load_weights_only(path)
    keys = _EMA_KEYS + _CONTAINER_KEYS if prefer_ema else _CONTAINER_KEYS + _EMA_KEYS
    found_ema = False
    # Training checkpoints nest weights, sometimes twice (e.g. {"model": {"module": ...}}).
    while isinstance(obj, dict):
        key = next((k for k in keys if isinstance(obj.get(k), dict)), None)
        if key is None:
            break
        found_ema |= key in _EMA_KEYS
        obj = obj[key]
    if prefer_ema and not found_ema:
        warnings.warn(f"{option} {path} holds no EMA weights ({' / '.join(_EMA_KEYS)}): prefer_ema has no effect, "
                      "its weights are used", UserWarning, stacklevel=2)
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)} if isinstance(obj, dict) else {}
    if not tensors:
        found = list(obj)[:10] if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"{path} holds no tensor state dict (found: {found})")
    return _strip_wrapper_prefix(tensors, model_keys)


def _torch_load_weights_only(path: Path):
    not_torch = (f"{path} is neither a .safetensors file nor a torch checkpoint (torch.save, timm .pth.tar, "
                 "Lightning .ckpt) that loads with weights_only=True")
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        why = _unpickler_reason(e)
        with open(path, "rb") as f:
            if not f.read(4).startswith((b"PK\x03\x04", b"\x80")):  # torch.save writes a zip, or protocol-2+ pickle
                raise ValueError(f"{not_torch}; loader said: {why}") from None
        raise UnsafeCheckpointError(
            f"refusing to load {path}: it contains arbitrary Python objects, and unpickling them "
            "could execute code, so it was refused for safety. Convert it to .safetensors in a "
            f"trusted environment (safetensors.torch.save_file). Loader said: {why}") from None
    except Exception as e:  # other files fail anywhere in torch's reader: RuntimeError, KeyError, EOFError, ...
        raise ValueError(f"{not_torch}; loader said: {type(e).__name__}: {e}") from e


def _unpickler_reason(e: Exception) -> str:
    """The cause in torch's weights-only error, without the text around it: that advises weights_only=False, the
    opposite of what we want, and only some torch versions mark the cause with "WeightsUnpickler error:"."""
    text = str(e).partition("WeightsUnpickler error:")[2] or str(e)
    lines = [line.strip() for line in text.splitlines()
             if line.strip() and "weights_only" not in line and not line.strip().startswith("Check the documentation")]
    return lines[0].split(". ")[0] if lines else type(e).__name__


def _strip_wrapper_prefix(sd: dict[str, torch.Tensor],
                          model_keys: Optional[Collection[str]] = None) -> dict[str, torch.Tensor]:
    """Removes leading key components that every key shares and that only wrap the model.

    With ``model_keys``, as many shared components go (Lightning's ``model.``, ``net.``, ``backbone.``,
    ``model.module.``, ...) as make the most keys match the model. Otherwise, or when no depth matches any key
    (a layout only timm's checkpoint filter understands, e.g. OpenAI CLIP's ``visual.``), only DDP's ``module.``.
    """
    shared = _shared_components(sd)
    fits = [sum(k.split(".", j)[-1] in model_keys for k in sd) for j in range(len(shared) + 1)] if model_keys else [0]
    if max(fits) > 0:
        depth = fits.index(max(fits))  # the first maximum: strip no more than needed
    else:
        depth = 1 if shared[:1] == ["module"] else 0
    return {k.split(".", depth)[-1]: v for k, v in sd.items()} if depth else sd


def _prefix_hint(unexpected: Sequence[str], model_keys: Collection[str]) -> list[str]:
    """A line naming the prefixes under which unexpected keys hold model keys, e.g. from a Lightning module that
    holds both a student ``model.`` and a ``teacher.``: only a prefix on every key is removed automatically."""
    prefixed = {k: k[:-len(rest)] for k in unexpected for j in range(k.count("."), 0, -1)
                for rest in [k.split(".", j)[-1]] if rest in model_keys}  # the shortest prefix wins
    if not prefixed:
        return []
    prefixes = sorted(set(prefixed.values()))
    return [f"  {len(prefixed)} unexpected key(s) are model keys under a prefix ({', '.join(prefixes[:5])}; e.g. "
            f"{next(iter(prefixed))}); a prefix is removed automatically only when every key shares it, so save "
            f"just the teacher's weights without it, e.g. {{k.removeprefix({prefixes[0]!r}): v ...}} to .safetensors"]


def _shared_components(keys: Collection[str]) -> list[str]:
    """Leading dotted components that all ``keys`` share, never a whole key ({"a.b.x", "a.b.y"} -> ["a", "b"])."""
    shared = []
    for column in zip(*(k.split(".")[:-1] for k in keys)):
        if len(set(column)) != 1:
            break
        shared.append(column[0])
    return shared


class TeacherOutput(NamedTuple):
    """Teacher features on the student grid; token tensors are (B, Hs*Ws, C_t) in raster order.

    Attributes:
        stages: Block outputs (no final norm) for each requested block, in request order.
        last: Last-layer patch tokens after the final norm (what ``forward_features`` gives).
        cls: Final class token after the norm, (B, C_t), or None if the model has none.
    """

    stages: list[torch.Tensor]
    last: torch.Tensor
    cls: Optional[torch.Tensor]


def pixels_per_token(model: nn.Module) -> tuple[int, int] | None:
    """Input pixels per token (height, width) of a patch-embedding model, None without a ``patch_embed``.

    A plain ViT's patch size; for a hybrid ViT (a CNN stem, e.g. ``vit_small_r26_s32_224``) the stem's stride
    times its own patch size, where ``patch_embed.patch_size`` alone says (1, 1).
    """
    embed = getattr(model, "patch_embed", None)
    if embed is None or getattr(embed, "patch_size", None) is None:
        return None
    if hasattr(embed, "feat_ratio"):
        return tuple(int(r) for r in embed.feat_ratio(as_scalar=False))
    return tuple(int(p) for p in embed.patch_size)


def _close_model_names(model_name: str, limit: int = 5) -> list[str]:
    """timm names like a misspelt one: those sharing its longest prefix (``vit_tinyy`` -> ``vit_tiny_patch16_224``,
    which difflib ranks below shorter names such as ``gcvit_tiny``), then difflib's."""
    name, known = model_name.split(".")[0], timm.list_models()
    same_start: list[str] = []
    for end in range(len(name), 3, -1):
        same_start = sorted((m for m in known if m.startswith(name[:end])), key=len)
        if same_start:
            break
    close = same_start[:3] + difflib.get_close_matches(name, known, n=limit, cutoff=0.5)
    return list(dict.fromkeys(close))[:limit] or timm.list_models("vit_*")[:limit]


def _create_vit(model_name: str, kwargs: dict) -> nn.Module:
    if not timm.is_model(model_name):
        raise ValueError(f"unknown timm model {model_name!r}; close matches: {', '.join(_close_model_names(model_name))}")
    try:
        model = timm.create_model(model_name, pretrained=False, **{"dynamic_img_size": True, **kwargs})
    except TypeError:
        # Some ViT variants lack dynamic_img_size; they then only run at their img_size.
        try:
            model = timm.create_model(model_name, pretrained=False, **kwargs)
        except TypeError as e:
            raise ValueError(f"{_NOT_VIT}; got {model_name!r}, which rejects ViT arguments: {e}") from e
    lacks = [a for a in ("patch_embed", "blocks", "num_prefix_tokens", "forward_intermediates")
             if not hasattr(model, a)]
    if lacks:
        raise ValueError(f"{_NOT_VIT}; got {model_name!r} ({type(model).__name__}, lacks {', '.join(lacks)})")
    if "return_prefix_tokens" not in inspect.signature(model.forward_intermediates).parameters:
        # CaiT, XCiT: the class token joins only after the patch blocks, and their forward_intermediates lacks the
        # arguments the token slicing below relies on; they would fail at the first training step.
        raise ValueError(f"{_NOT_VIT}; got {model_name!r} ({type(model).__name__}), whose class token joins only "
                         "after the patch blocks (its forward_intermediates cannot return prefix tokens). Distil from "
                         "a ViT, e.g. vit_base_patch16_clip_224")
    if isinstance(model, Adventurer):
        # It has every attribute above, but its class token comes last, so prefix-first token slicing would
        # silently take a patch token for the class token.
        raise ValueError(f"{_NOT_VIT} and its class token first; got {model_name!r}, an Adventurer student "
                         "(class token last). Distil from a ViT, e.g. vit_base_patch16_clip_224")
    return model


def check_teacher_model(model_name: str, model_kwargs: dict | None = None) -> None:
    """Fails, as :class:`Teacher` would, where ``model_name`` is unknown to timm or no ViT a student can be distilled
    from; builds the model on the meta device, so nothing is allocated and no random number is drawn. Lets a run
    refuse the model before it scans its data."""
    with torch.device("meta"):
        _create_vit(model_name, dict(model_kwargs or {}))


def _to_tokens(fmap: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Resamples an NCHW map to ``grid`` and flattens it to raster-order tokens."""
    if tuple(fmap.shape[-2:]) != grid:
        down = grid[0] < fmap.shape[-2] or grid[1] < fmap.shape[-1]
        # fp32 because antialiased kernels do not cover all half types; antialias avoids
        # aliasing when several teacher tokens fall into one student cell.
        fmap = F.interpolate(fmap.float(), size=grid, mode="bilinear", align_corners=False,
                             antialias=down).to(fmap.dtype)
    return fmap.flatten(2).transpose(1, 2).contiguous()


class Teacher(nn.Module):
    """Frozen, always-eval timm ViT used as a distillation target.

    Args:
        model_name: timm name (``name.tag`` ok): ``vit_*``, ``deit_*``, ``vit_*_clip_*``, ``eva02_*``.
        weights: Optional local checkpoint, see :func:`load_state_dict_safely`. Never downloaded.
        img_size: Override the model's input resolution.
        num_classes: Override the classifier size (0 removes the head).
        ignore_head: Drop checkpoint classifier weights (head stays random), e.g. other class count.
        prefer_ema: Use EMA weights when the checkpoint holds both.
        **model_kwargs: Extra ``timm.create_model`` arguments (depth, embed_dim, ...).
    """

    def __init__(self, model_name: str, weights: Union[str, Path, None] = None, img_size=None,
                 num_classes: Optional[int] = None, *, ignore_head: bool = False,
                 prefer_ema: bool = False, **model_kwargs):
        super().__init__()
        overrides = {"img_size": img_size, "num_classes": num_classes}
        kwargs = {**model_kwargs, **{k: v for k, v in overrides.items() if v is not None}}
        self.model_name = model_name
        self.model = _create_vit(model_name, kwargs)
        if weights is not None:
            self._load_weights(Path(weights), ignore_head, prefer_ema)
        self.model.requires_grad_(False)
        # Non-persistent: set from the data pipeline's statistics (set_input_normalization), not learned state.
        channels = len(self.mean)
        self.register_buffer("input_scale", torch.ones(1, channels, 1, 1), persistent=False)
        self.register_buffer("input_shift", torch.zeros(1, channels, 1, 1), persistent=False)
        self._renormalize = False
        self.train(False)

    def _load_weights(self, path: Path, ignore_head: bool, prefer_ema: bool) -> None:
        expected = self.model.state_dict()
        sd = load_state_dict_safely(path, prefer_ema=prefer_ema, model_keys=set(expected), option="teacher.weights")
        meta = read_export_metadata(path)
        if meta is not None and "img_size" in meta:
            # timm's filter takes the grid a position embedding was trained on from pretrained_cfg's input_size
            # (224 by default), else assumes a square: a non-square export would be resampled from the wrong grid,
            # or, at an equal token count, silently transposed.
            update_pretrained_cfg(self.model, input_size=(3, *meta["img_size"]))
        stored_shapes = {k: tuple(v.shape) for k, v in sd.items()}
        stored_pos = sd.get("pos_embed")
        family = importlib.import_module(timm.models.model_entrypoint(self.model_name).__module__)
        filter_fn = getattr(family, "checkpoint_filter_fn", None)
        stored, built = sd.get("patch_embed.proj.weight"), expected.get("patch_embed.proj.weight")
        if stored is not None and built is not None and stored.dim() == built.dim() == 4 and stored.shape[-2:] != built.shape[-2:]:
            # timm's filter resamples the patch embedding to the new patch size (FlexiViT); the features then differ
            # from the ones the checkpoint was trained to produce, which is rarely what a distillation target wants.
            warnings.warn(f"{path} has {tuple(stored.shape[-2:])} patches but the teacher is built with "
                          f"{tuple(built.shape[-2:])}: timm resamples its patch embedding, which changes the teacher's "
                          f"features; build it with the checkpoint's patch size (teacher.model_kwargs "
                          f"{{patch_size: {stored.shape[-1]}}}) unless this is intended", UserWarning, stacklevel=3)
        if filter_fn is not None:
            # timm's own remapping: OpenAI CLIP / DINOv2 layouts, pos-embed resampling, ...
            try:
                sd = filter_fn(sd, self.model)
            except (RuntimeError, KeyError, ValueError, IndexError) as e:
                # E.g. a plain ViT file for DeiT-distilled: timm splits its position embedding at two prefix tokens
                # and fails with a bare reshape error; the top-level tokens it lacks name the real mismatch.
                lacks = sorted(k for k in set(expected) - set(sd) if "." not in k)
                why = (f"; the file has no {', '.join(lacks)}, which {self.model_name!r} has: is it the checkpoint of "
                       "another model (teacher.model, teacher.model_kwargs)?") if lacks else ""
                raise ValueError(f"timm could not adapt {path} to {self.model_name!r}: {e}{why}") from e
        pos, built_pos = sd.get("pos_embed"), expected.get("pos_embed")
        if (stored_pos is not None and pos is not None and built_pos is not None and "img_size" not in (meta or {})
                and pos.shape == stored_pos.shape == built_pos.shape and not torch.equal(pos, stored_pos)):
            # Same token count on another grid (e.g. 7x28 vs 14x14): timm took the grid of pretrained_cfg's input
            # size, right for its own weights, silently wrong for a file trained at the teacher's size.
            size = tuple(self.model.pretrained_cfg.get("input_size", (3, 224, 224))[-2:])
            warnings.warn(f"timm resampled {path}'s position embedding, which already has the teacher's token count, "
                          f"from the grid of a {size[0]}x{size[1]} input (timm's assumption for {self.model_name!r}) to "
                          f"{tuple(self.model.patch_embed.grid_size)}; if the file was trained at another size, name it: "
                          "teacher.model_kwargs {pretrained_cfg_overlay: {input_size: [3, H, W]}}",
                          UserWarning, stacklevel=3)
        heads = self.model.pretrained_cfg.get("classifier") or "head"  # ("head", "head_dist") for DeiT
        head_prefixes = tuple(f"{h}." for h in ((heads,) if isinstance(heads, str) else heads))
        drop_head = ignore_head or getattr(self.model, "num_classes", None) == 0  # headless: features only
        if drop_head:
            sd = {k: v for k, v in sd.items() if not k.startswith(head_prefixes)}
            expected = {k: v for k, v in expected.items() if not k.startswith(head_prefixes)}
        missing = sorted(set(expected) - set(sd))
        unexpected = sorted(set(sd) - set(expected))
        # The file's shape, not the filter's resampling of it, is what the user can recognise.
        shapes = [f"{k}: checkpoint {stored_shapes.get(k, tuple(sd[k].shape))} vs model {tuple(v.shape)}"
                  for k, v in expected.items() if k in sd and sd[k].shape != v.shape]
        if missing or unexpected or shapes:
            lines = [f"checkpoint {path} does not fit teacher {self.model_name!r}:"] + [
                f"  {len(v)} {label}: {', '.join(v[:10])}{f' (+{len(v) - 10} more)' if len(v) > 10 else ''}"
                for label, v in (("missing keys", missing), ("unexpected keys", unexpected),
                                 ("shape mismatches", shapes)) if v]
            if any(k.startswith(head_prefixes) for k in missing + unexpected + shapes):
                n = next((sd[k].shape[0] for k in sd if k.startswith(head_prefixes)), None)
                lines.append(f"  the classifier head does not fit (checkpoint head outputs: {n}): the checkpoint was trained "
                             "on other classes; pass ignore_head=True (CLI: --teacher.ignore_head true) to drop its head, "
                             "or, in Python, num_classes to match it")
            lines += _prefix_hint(unexpected, expected)
            lines += self._architecture_hint({k: tuple(v.shape) for k, v in sd.items()})
            if any(k.startswith("pos_embed:") for k in shapes) and meta is None:
                lines += self._pos_embed_hint(stored_shapes["pos_embed"])
            raise ValueError("\n".join(lines))
        self.model.load_state_dict(sd, strict=not drop_head)
        # A teacher trained by this library was trained on inputs normalised with its data's statistics, which
        # the file records; timm's pretrained_cfg only knows the architecture's default (ImageNet / 0.5). Reading
        # its inputs with the wrong statistics costs the demo's teacher ~3 points of accuracy, and every
        # distillation target would be computed from such inputs.
        if meta is not None and "mean" in meta and "std" in meta:
            update_pretrained_cfg(self.model, mean=tuple(meta["mean"]), std=tuple(meta["std"]))

    def _architecture_hint(self, shapes: dict[str, tuple[int, ...]]) -> list[str]:
        """A line naming the ViT settings (width, depth) in which the checkpoint differs from the built teacher:
        the key and shape lists above name the symptom, this names the option to change."""
        blocks = {int(m.group(1)) for k in shapes for m in [re.match(r"blocks\.(\d+)\.", k)] if m}
        proj = shapes.get("patch_embed.proj.weight")
        if not blocks and proj is None:
            return [f"  the checkpoint holds no ViT weights (no patch_embed or blocks keys; e.g. "
                    f"{', '.join(sorted(shapes)[:3])}): is it another architecture's? teacher.model must be a ViT"]
        found = {"embed_dim": proj[0] if proj is not None and len(proj) == 4 else None,
                 "depth": max(blocks) + 1 if blocks else None}
        built = {"embed_dim": self.embed_dim, "depth": self.depth}
        differ = {k: v for k, v in found.items() if v is not None and v != built[k]}
        if not differ:
            return []
        return [f"  the checkpoint is a ViT with {', '.join(f'{k} {v}' for k, v in differ.items())}, the teacher "
                f"{self.model_name!r} is built with {', '.join(f'{k} {built[k]}' for k in differ)}: set teacher.model "
                f"or teacher.model_kwargs as it was trained, e.g. {{{', '.join(f'{k}: {v}' for k, v in differ.items())}"
                f"}}{' (and its num_heads)' if 'embed_dim' in differ else ''}"]

    def _pos_embed_hint(self, shape: tuple[int, ...]) -> list[str]:
        """A line for a position embedding timm could not resample: one of a non-square grid, whose height and
        width a plain state dict does not record (timm then assumes a square)."""
        prefix = 0 if getattr(self.model, "no_embed_class", False) else self.num_prefix_tokens
        n = shape[1] - prefix if len(shape) == 3 else 0
        if n <= 0 or math.isqrt(n) ** 2 == n:
            return []
        ph, pw = self.patch_size
        sizes = [f"{h * ph}x{n // h * pw}" for h in range(1, n + 1) if n % h == 0 and 1 / 4 <= h * h / n <= 4]
        return [f"  pos_embed: the checkpoint's {n} positions are a non-square grid, which timm cannot resample "
                f"without knowing its height and width; build the teacher at the size it was trained at "
                f"(data.img_size, with {ph}x{pw} patches one of {', '.join(sizes)}), or name that size H x W to timm: "
                f"teacher.model_kwargs {{pretrained_cfg_overlay: {{input_size: [3, H, W]}}}}"]

    def train(self, mode: bool = True) -> "Teacher":
        """Ignores ``mode``: the target must stay deterministic (no dropout/drop-path)."""
        return super().train(False)

    @property
    def embed_dim(self) -> int:
        return int(getattr(self.model, "embed_dim", self.model.num_features))

    @property
    def depth(self) -> int:
        return len(self.model.blocks)

    @property
    def patch_size(self) -> tuple[int, int]:
        """Input pixels per token: the patch size, or a hybrid ViT's stem stride times it."""
        return pixels_per_token(self.model)

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.model.num_prefix_tokens)

    @property
    def has_class_token(self) -> bool:
        return getattr(self.model, "cls_token", None) is not None

    @property
    def pretrained_cfg(self) -> dict:
        """The ViT's: timm's ``DistillationTeacher``, wrapping this teacher for ``LogitDistillationTask``, reads its
        input statistics from here (without it, ImageNet's, wrong for e.g. CLIP teachers)."""
        return self.model.pretrained_cfg

    @property
    def mean(self) -> tuple[float, ...]:
        return tuple(self.model.pretrained_cfg.get("mean", IMAGENET_DEFAULT_MEAN))

    @property
    def std(self) -> tuple[float, ...]:
        return tuple(self.model.pretrained_cfg.get("std", IMAGENET_DEFAULT_STD))

    def set_input_normalization(self, data_mean: Optional[Sequence[float]] = None,
                                data_std: Optional[Sequence[float]] = None) -> None:
        """Declares the normalisation the data pipeline applied; inputs are mapped to the teacher's.

        Args:
            data_mean: Per-channel pipeline mean; both None means inputs use the teacher's mean/std.
            data_std: Per-channel std used by the pipeline.
        """
        if data_mean is None and data_std is None:
            data_mean, data_std = self.mean, self.std
        if data_mean is None or data_std is None:
            raise ValueError("set both data_mean and data_std, or neither")
        # float64 from the cfg tuples so that "same as teacher" is detected exactly.
        t_mean, t_std, d_mean, d_std = (torch.as_tensor(v, dtype=torch.float64).reshape(1, -1, 1, 1)
                                        for v in (self.mean, self.std, data_mean, data_std))
        if d_mean.shape != t_mean.shape or d_std.shape != t_mean.shape or bool((d_std <= 0).any()):
            raise ValueError(f"data mean/std need {t_mean.numel()} channels and positive std; "
                             f"got {list(data_mean)}, {list(data_std)}")
        # x_t = (x * d_std + d_mean - t_mean) / t_std, folded into one affine map.
        self.input_scale.copy_(d_std / t_std)  # copy_ also moves to the buffer's device
        self.input_shift.copy_((d_mean - t_mean) / t_std)
        self._renormalize = not (torch.equal(d_mean, t_mean) and torch.equal(d_std, t_std))

    def normalize_input(self, images: torch.Tensor) -> torch.Tensor:
        """Maps pipeline-normalised images to the teacher's normalisation."""
        if not self._renormalize:
            return images
        return images * self.input_scale.to(images.dtype) + self.input_shift.to(images.dtype)

    def stage_indices(self, num_stages: int) -> list[int]:
        """Indices of the last block of each of ``num_stages`` equal stages (12, 4 -> [2, 5, 8, 11])."""
        d = self.depth
        if num_stages < 1 or d % num_stages:
            allowed = [k for k in range(1, d + 1) if d % k == 0]
            raise ValueError(f"cannot split teacher depth {d} into K={num_stages} equal stages; "
                             f"K (distill.num_stages) must divide {d}: one of {allowed}")
        return [d // num_stages * (i + 1) - 1 for i in range(num_stages)]

    @torch.no_grad()
    def forward_features_aligned(self, images: torch.Tensor, stage_indices: Sequence[int],
                                 out_grid: Optional[tuple[int, int]] = None) -> TeacherOutput:
        """Teacher tokens resampled to the student grid.

        Args:
            images: (B, 3, H, W) batch in the pipeline's normalisation.
            stage_indices: Block indices to tap (negative counts from the end).
            out_grid: Student grid (Hs, Ws); None keeps the teacher's native grid.

        Returns:
            TeacherOutput; patch tokens never include the prefix (class, register) tokens.
        """
        d = self.depth
        idx = [int(i) + d if int(i) < 0 else int(i) for i in stage_indices]
        if any(not 0 <= i < d for i in idx):
            raise ValueError(f"stage indices {list(stage_indices)} out of range for depth {d}")
        taps = sorted(set(idx)) or [d - 1]
        npt = self.num_prefix_tokens
        images = self._fit_to_patch_size(images)
        # Intermediates are prefix-free anyway; EVA breaks on return_prefix_tokens without prefixes.
        final, inter = self.model.forward_intermediates(
            self.normalize_input(images), indices=taps, output_fmt="NCHW",
            return_prefix_tokens=npt > 0, norm=False)
        maps = dict(zip(taps, (t[0] if isinstance(t, tuple) else t for t in inter)))
        b, c, ht, wt = maps[taps[0]].shape
        grid = (ht, wt) if out_grid is None else (int(out_grid[0]), int(out_grid[1]))
        stages = [_to_tokens(maps[i], grid) for i in idx]
        last = _to_tokens(final[:, npt:].transpose(1, 2).reshape(b, -1, ht, wt), grid)
        cls = final[:, 0] if self.has_class_token else None
        return TeacherOutput(stages, last, cls)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (or pooled features when ``num_classes=0``) for logit KD and evaluation."""
        return self.model(self.normalize_input(self._fit_to_patch_size(images)))

    def _fit_to_patch_size(self, images: torch.Tensor) -> torch.Tensor:
        """Resize to the nearest multiple of the teacher's patch size: a /14 teacher and a /16 student cannot
        both tile every resolution (e.g. 64 px), and the token grids are resampled to the student's anyway."""
        h, w = images.shape[-2:]
        size = nearest_patch_multiple(h, w, self.patch_size)
        if size == (h, w):
            return images
        return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)

