"""Exported models: the description a run writes into its ``student.safetensors`` / ``teacher.safetensors``
(architecture, classes, preprocessing, holdout split, data set), reading it back, and rebuilding the model from it.
"""
from __future__ import annotations

import os
from pathlib import Path

import safetensors
import timm
import torch
import torch.nn as nn
from timm.layers import to_2tuple

from . import models  # noqa: F401  (registers the students with timm)
from .checkpoint import pretrained_cfg_overlay, read_export_metadata, update_pretrained_cfg
from .data import DataConfig
from .teacher import load_state_dict_safely

__all__ = ["architecture_changes", "load_exported_model", "model_metadata", "read_metadata"]


def model_metadata(kind: str, model_name: str, model_kwargs: dict, data: DataConfig, info: dict) -> dict:
    return {
        "kind": kind,
        "model": model_name,
        "model_kwargs": model_kwargs,
        "num_classes": info["num_classes"],
        "classes": list(info["class_names"]),
        "img_size": list(to_2tuple(data.img_size)),
        "mean": list(info["mean"]),
        "std": list(info["std"]),
        "interpolation": data.interpolation,
        "crop_pct": data.crop_pct,
        # The holdout split the run trained without: `eval --split holdout` rebuilds exactly that split.
        "holdout_fraction": data.holdout_fraction,
        "data_seed": data.seed,
        # The data it was trained on: `eval --checkpoint FILE` alone evaluates on that data set.
        "data_name": data.name,
        "data_root": os.path.abspath(data.root) if data.root else None,
    }


def read_metadata(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        exports = sorted(p.name for p in path.glob("*.safetensors"))
        raise FileNotFoundError(f"checkpoint {path} is a directory; pass the exported model in it"
                                + (f": {', '.join(str(path / e) for e in exports)}" if exports else
                                   " (a run directory holds student.safetensors or teacher.safetensors)"))
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: expected an exported .safetensors model (the run directory's student.safetensors)")
    meta = read_export_metadata(path)
    if meta is None:
        raise ValueError(f"{path} has no vitlinearizer metadata; export it with `vitlinearizer distill/finetune`")
    missing = [key for key in _REBUILD_KEYS if key not in meta]
    if missing:
        raise ValueError(f"{path}: its description lacks {', '.join(missing)}, needed to rebuild the model; export it "
                         f"with a description that names {', '.join(_REBUILD_KEYS)} (exports.model_metadata builds one)")
    return meta


# What an export description must name for load_exported_model to rebuild the model; the rest (classes, mean, std,
# interpolation, crop_pct, ...) is optional, timm's defaults for the architecture standing in.
_REBUILD_KEYS = ("model", "num_classes", "img_size")


def _model_for(meta: dict) -> nn.Module:
    """The (untrained) model an export description names, at the resolution it was trained at: the position
    embedding in the file has that grid's size."""
    kwargs = {"img_size": to_2tuple(meta["img_size"]), **meta.get("model_kwargs", {})}
    return timm.create_model(meta["model"], num_classes=meta["num_classes"], **kwargs)


def load_exported_model(path: str | Path, device="cpu") -> tuple[nn.Module, dict]:
    meta = read_metadata(path)
    try:
        model = _model_for(meta)
    except RuntimeError as exc:
        if "Unknown model" not in str(exc):
            raise
        raise ValueError(f"{path}: its description names model {meta['model']!r}, which timm does not know; import "
                         "the package that registers it before loading") from None
    state = load_state_dict_safely(path)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        changes = architecture_changes(path) or [str(exc).splitlines()[0]]
        raise ValueError(
            f"{path}: its tensors do not fit the model its description names ({meta['model']}, "
            f"model_kwargs={meta.get('model_kwargs', {})}, num_classes={meta['num_classes']}): "
            f"{'; '.join(changes[:4])}{f' (+{len(changes) - 4} more)' if len(changes) > 4 else ''}. The description "
            "must name the architecture the weights were trained with (e.g. a mixer other than mamba2 in "
            "model_kwargs)") from None
    # What timm.data.resolve_data_config(model=model) reads: the file's preprocessing, not the registry's.
    update_pretrained_cfg(model, **pretrained_cfg_overlay(path, meta))
    return model.to(device).eval(), meta


def architecture_changes(path: str | Path) -> list[str]:
    """How the tensors of an exported model differ (names, shapes) from what this version of the library builds
    for the file's own description; empty when they agree.

    A file from before an architecture change still loads (layers keep old checkpoints loadable, e.g. a GLA
    student without the short convolution loads as that layer), so only this check tells a caller that reusing it
    would mix two architectures. The mask token is left out: a distilled student carries one, its export
    description does not ask for one.
    """
    path = Path(path)
    meta = read_metadata(path)
    with torch.device("meta"):  # shapes only: nothing is allocated or initialised
        model = _model_for(meta)
    built = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != "mask_token"}
    with safetensors.safe_open(str(path), "pt") as f:
        stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys() if k != "mask_token"}
    changes = [f"{k}: not built any more" for k in sorted(stored.keys() - built.keys())]
    changes += [f"{k}: new" for k in sorted(built.keys() - stored.keys())]
    changes += [f"{k}: shape {stored[k]} -> {built[k]}" for k in sorted(stored.keys() & built.keys())
                if stored[k] != built[k]]
    return changes
