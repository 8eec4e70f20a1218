"""Exported models applied to data: ``vitlinearizer eval`` (accuracy on a split) and ``predict`` (labels of image
files).

An export (``student.safetensors`` / ``teacher.safetensors``, :func:`vitlinearizer.exports.load_exported_model`)
describes itself in its metadata: architecture, classes, preprocessing and the holdout split it was trained
without, so both need nothing but the file.
"""
from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path

import timm
from timm.layers import to_2tuple
import torch
import torch.nn as nn

from .data import EVAL_SPLIT_DIRS, DataConfig, build_dataset, build_transform, walk_following_links
from .engine import evaluate_classifier
from .images import IMG_EXTENSIONS, load_rgb
from .models.adventurer import patch_grid
from .exports import load_exported_model
from .runner import resolve_device
from .teacher import pixels_per_token

__all__ = ["evaluate", "predict"]


# What an export's metadata fixes about the input: eval and predict take these from the file, as it was trained.
_PREPROCESSING = ("img_size", "mean", "std", "interpolation", "crop_pct")


def _preprocessing(model: nn.Module, meta: dict) -> dict:
    """The export's preprocessing; for a field its description leaves out, the model's timm data config (what
    ``timm.data.resolve_data_config(model=model)`` gives), so that eval, predict and timm agree on it."""
    timm_cfg = timm.data.resolve_data_config(model=model)
    defaults = {"img_size": list(timm_cfg["input_size"][1:]), "mean": list(timm_cfg["mean"]),
                "std": list(timm_cfg["std"]), "interpolation": timm_cfg["interpolation"],
                "crop_pct": timm_cfg["crop_pct"]}
    return {**meta, **{k: v for k, v in defaults.items() if meta.get(k) is None}}


def _user_set(data: DataConfig, field: str, explicit=None) -> bool:
    """Whether the user set ``data.<field>``: named in ``explicit`` (the data fields a command line or YAML file
    gave), or, without that record, holding a value other than DataConfig's default."""
    return field in explicit if explicit is not None else getattr(data, field) != getattr(DataConfig(), field)


def _export_preprocessing(data: DataConfig, meta: dict, explicit=None) -> DataConfig:
    """``data`` with the export's preprocessing in every field of ``_PREPROCESSING`` not in ``explicit`` (the
    fields a user set); ``explicit=None`` counts a field as set when it differs from DataConfig's default."""
    for field in _PREPROCESSING:
        if not _user_set(data, field, explicit) and meta.get(field) is not None:
            setattr(data, field, tuple(meta[field]) if isinstance(meta[field], list) else meta[field])
    return data.validate()


def _export_data_source(checkpoint, data: DataConfig, meta: dict, explicit=None) -> None:
    """data.name and data.root from the export's record of the data it was trained on, where the user names no data
    set (``explicit``: the data fields the user set; None: those that differ from DataConfig's defaults). A root
    the user gives is kept: the same kind of data (e.g. an ImageFolder) in another place."""
    # Synthetic data is drawn from settings (class count, length) the export does not record.
    if meta.get("data_name") in (None, "synthetic") or _user_set(data, "name", explicit):
        return
    data.name = meta["data_name"]
    if not _user_set(data, "root", explicit) and meta.get("data_root") is not None:
        if not Path(meta["data_root"]).exists():
            raise FileNotFoundError(f"{checkpoint} was trained on {data.name} data at {meta['data_root']}, which does "
                                    "not exist here: name the data to evaluate on with --data.root (and --data.name)")
        data.root = meta["data_root"]


def _warn_if_untrained_head(checkpoint, meta: dict) -> None:
    # distill trains the features only: the head keeps its random initialisation, so its labels are noise.
    if meta.get("kind") == "distilled-student":
        warnings.warn(f"{checkpoint} is a distilled, not fine-tuned, student: its classification head is untrained, "
                      "so its labels, probabilities and accuracy mean nothing; run `vitlinearizer finetune "
                      f"--student.checkpoint {checkpoint} ...` first and use that run's export", UserWarning,
                      stacklevel=3)


def _recorded_split(checkpoint, meta: dict) -> dict | None:
    """holdout_fraction and seed of the data the export was trained on: from its metadata, else from the
    config.yaml of its run directory (when that run built this model); None when neither records them."""
    if meta.get("holdout_fraction") is not None:
        return {"holdout_fraction": meta["holdout_fraction"], "seed": meta.get("data_seed", DataConfig().seed)}
    path = Path(checkpoint).parent / "config.yaml"
    if not path.is_file():
        return None
    import yaml
    try:
        run = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None
    role = "teacher" if meta.get("kind") == "teacher" else "student"
    if not isinstance(run, dict) or (run.get(role) or {}).get("model") != meta.get("model"):
        return None  # a config.yaml of some other run
    data = run.get("data") or {}
    default = DataConfig()
    return {"holdout_fraction": data.get("holdout_fraction", default.holdout_fraction),
            "seed": data.get("seed", default.seed)}


def _use_recorded_split(checkpoint, meta: dict, data: DataConfig, explicit=None) -> None:
    """Set data.holdout_fraction/seed to the training run's, so that the holdout split is the images the model
    was not trained on; a value the user set is kept, with a warning where it differs."""
    recorded = _recorded_split(checkpoint, meta)
    if recorded is None:
        warnings.warn(f"{checkpoint} does not record the holdout split it was trained with (neither its metadata "
                      f"nor a config.yaml of its run beside it): using data.holdout_fraction={data.holdout_fraction} "
                      f"and data.seed={data.seed}; if training used others, this 'holdout' overlaps the training "
                      "images", UserWarning, stacklevel=3)
        return
    for field, value in recorded.items():
        if not _user_set(data, field, explicit):
            setattr(data, field, value)
        elif getattr(data, field) != value:
            warnings.warn(f"data.{field}={getattr(data, field)!r} but {checkpoint} was trained with {value!r}: this "
                          "'holdout' overlaps the training images; omit the option to use the training split",
                          UserWarning, stacklevel=3)
    if data.holdout_fraction == 0:
        raise ValueError(f"{checkpoint} was trained on the whole training set (holdout_fraction 0), so it has no "
                         "holdout split; evaluate it on --split test")


def _names(classes, limit: int = 10) -> str:
    if classes is None:
        return "names not recorded"
    classes = list(classes)
    return ", ".join(map(str, classes[:limit])) + (f", ... ({len(classes) - limit} more)" if len(classes) > limit else "")


def evaluate(checkpoint: str | Path, data: DataConfig, split: str = "test", batch_size: int = 256,
             device: str = "auto", explicit=None, amp: str = "none") -> dict:
    """Top-1/top-5 of an exported model on a split of ``data``, always with the eval transform; ``amp="bf16"``
    runs the forward under bfloat16 autocast.

    Preprocessing (img_size, mean, std, interpolation, crop_pct) comes from the model's metadata and, for
    ``split="holdout"``, holdout_fraction/seed from the training run's record, except for the data fields named
    in ``explicit`` (None: the fields that differ from DataConfig's defaults). ``data`` itself is left as given."""
    data = copy.deepcopy(data)  # filled in from this export: reused for another, it would carry these values
    model, meta = load_exported_model(checkpoint, resolve_device(device))
    _warn_if_untrained_head(checkpoint, meta)
    _export_data_source(checkpoint, data, meta, explicit)
    _export_preprocessing(data, _preprocessing(model, meta), explicit)
    if split == "holdout":
        _use_recorded_split(checkpoint, meta, data, explicit)
    # A train/ labels the data (checked against the model's classes below); without one, the export's classes do.
    no_train = data.name == "imagefolder" and not (Path(data.root) / "train").is_dir()
    if no_train and not meta.get("classes"):
        raise ValueError(f"{checkpoint} records no class names and {data.root} has no train/ folder: nothing says "
                         "which class folder is which output; add the train/ class folders, or export the model with "
                         "its classes")
    try:
        dataset = build_dataset(data, split, classes=meta.get("classes") if no_train else None)
    except FileNotFoundError as exc:
        if split == "test" and data.name == "imagefolder" and not no_train and not any(
                (Path(data.root) / d).is_dir() for d in EVAL_SPLIT_DIRS):
            raise FileNotFoundError(f"{exc}; or evaluate on the training images the model was trained without: "
                                    "--split holdout") from None
        raise
    dataset.transform = build_transform(data, train=False)  # the train split too: no augmentation draws
    recorded = meta.get("holdout_drawn_from")
    if split == "holdout" and recorded and dataset.split_from and dataset.split_from != recorded:
        then, now = recorded["files"], dataset.split_from["files"]
        change = f"{then} files then, {now} now" if then != now else f"{now} files, but other names or labels"
        warnings.warn(f"the training data is not the listing {checkpoint} was trained on ({change}; an added, "
                      "removed or unreadable file, or another data.verify): the holdout drawn now is not the split it "
                      "was trained without and can overlap its training images; evaluate on --split test, or on the "
                      "data as it was", UserWarning, stacklevel=2)
    if dataset.num_classes != meta["num_classes"]:
        raise ValueError(f"the data has {dataset.num_classes} classes ({_names(dataset.classes)}) but the model predicts "
                         f"{meta['num_classes']} ({_names(meta.get('classes'))}): evaluate it on data with its classes")
    if meta.get("classes") is not None and dataset.classes != list(meta["classes"]):  # other labels: meaningless
        differ = [f"{i}: data {a!r} vs model {b!r}" for i, (a, b) in enumerate(zip(dataset.classes, meta["classes"]))
                  if a != b]
        raise ValueError(f"the data's classes are not the ones the model was trained on ({'; '.join(differ[:5])}); "
                         "evaluate on data with the same class folders")
    result = evaluate_classifier(model, dataset, batch_size, amp=amp)
    return {"checkpoint": str(checkpoint), "model": meta["model"], "split": split, "amp": amp, **result}


def _class_name(meta: dict, index: int) -> str:
    """The class's name as the export records it; its index for a file exported without class names."""
    classes = meta.get("classes")
    return str(classes[index]) if classes and index < len(classes) else str(index)


def _image_files(images) -> list[str]:
    """The files ``images`` names, a directory standing for the images below it (sorted, recursive, with the
    extensions ImageFolder reads); every missing path is checked before any work, and all are named."""

    missing = [str(p) for p in images if not Path(p).exists()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} image path(s) do not exist: {', '.join(missing)}")
    files = []
    for path in map(Path, images):
        if not path.is_dir():
            files.append(str(path))
            continue
        # As ImageFolder walks a class folder: into symlinked directories (rglob does not), each once, hidden ones
        # and files skipped.
        found = sorted(os.path.join(dirpath, name) for dirpath, names in walk_following_links(path) for name in names
                       if not name.startswith(".") and name.lower().endswith(IMG_EXTENSIONS)
                       and os.path.isfile(os.path.join(dirpath, name)))
        if not found:
            raise FileNotFoundError(f"directory {path} holds no images ({', '.join(IMG_EXTENSIONS)})")
        files += found
    return files


def _set_input_size(model: nn.Module, img_size: tuple[int, int]) -> None:
    """Run a model without ``patch_grid`` (a timm ViT teacher) at another input size: timm resamples its
    position embedding; a size that does not fit the patch size is refused (timm would silently crop it)."""
    patch = pixels_per_token(model)
    if not hasattr(model, "set_input_size") or patch is None:
        raise ValueError(f"{type(model).__name__} runs only at the size it was trained at; omit --img-size")
    patch_grid(*img_size, patch)
    model.set_input_size(img_size=img_size)


def predict(checkpoint: str | Path, images: str | os.PathLike | list[str | os.PathLike], topk: int = 5,
            device: str = "auto", img_size: int | tuple[int, int] | None = None, on_result=None,
            batch_size: int = 32) -> list[dict]:
    """Top-k labels with probabilities for image files (a directory: the images below it), resized to
    ``img_size`` (default: the size the model was trained at; Adventurer students run at any multiple of their
    patch size, ViT teachers too, by resampling their position embedding), ``batch_size`` images per forward.

    Paths that do not exist fail before any work. An image that cannot be decoded gives
    ``{"image", "error"}`` instead of ``{"image", "top"}`` and the others are still classified;
    ``on_result(result)`` is called with each result, in the order of the files, as soon as its batch is done."""
    if topk < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    images = [str(p) for p in ([images] if isinstance(images, (str, os.PathLike)) else images)]
    files = _image_files(images)
    model, meta = load_exported_model(checkpoint, resolve_device(device))
    _warn_if_untrained_head(checkpoint, meta)
    img_size = tuple(meta["img_size"]) if img_size is None else to_2tuple(img_size)
    if hasattr(model, "patch_grid"):
        model.patch_grid(*img_size)  # a size that does not fit the patch size fails here, naming the fix
    elif img_size != tuple(meta["img_size"]):
        _set_input_size(model, img_size)
    data = _export_preprocessing(DataConfig(name="synthetic", img_size=img_size), _preprocessing(model, meta),
                                 explicit={"img_size"})
    transform = build_transform(data, train=False)
    k = min(topk, meta["num_classes"])
    model_device = next(model.parameters()).device
    results = []
    for start in range(0, len(files), batch_size):
        batch, inputs = [], []
        for path in files[start:start + batch_size]:
            try:
                inputs.append(transform(load_rgb(path)))
            except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, ... for a bad file
                batch.append({"image": path, "error": f"cannot read the image ({type(exc).__name__}: {exc})"})
            else:
                batch.append({"image": path})
        if inputs:
            with torch.no_grad():
                top = model(torch.stack(inputs).to(model_device)).float().softmax(-1).topk(k, dim=-1)
            decoded = iter(zip(top.values.tolist(), top.indices.tolist()))
            for result in (r for r in batch if "error" not in r):
                probs, indices = next(decoded)
                result["top"] = [{"label": _class_name(meta, i), "index": int(i), "prob": round(float(p), 4)}
                                 for p, i in zip(probs, indices)]
        for result in batch:
            results.append(result)
            if on_result is not None:
                on_result(result)
    return results
