"""The pipeline stages behind the CLI: train a teacher, distil, fine-tune, evaluate, predict.

Each stage takes a validated :class:`RunConfig`, writes a run directory (``config.yaml``, ``metrics.jsonl``,
``checkpoints/``, an exported ``.safetensors`` model and ``summary.json``) and returns the summary.
Exported models carry their own description in the safetensors metadata (architecture, classes,
preprocessing), so ``eval`` and ``predict`` need nothing but the file.
"""
from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import safetensors
import timm
import torch
import torch.nn as nn

from . import models  # noqa: F401  (registers the students with timm)
from .checkpoint import (derive_seed, export_model, pretrained_cfg_overlay, read_export_metadata, seed_all,
                         update_pretrained_cfg, write_text_atomic)
from .config import RunConfig, dump_yaml
from .data import DataConfig, build_dataset, build_transform, dataset_info, load_rgb
from .distill import DistillationTask
from .engine import Trainer, cleanup_distributed, evaluate_classifier
from .finetune import ClassificationTask
from .models.adventurer import checkpoint_filter_fn
from .teacher import Teacher, load_state_dict_safely


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but CUDA is not available; use device=cpu or auto")
    return device


def _img_size(data: DataConfig) -> tuple[int, int]:
    size = data.img_size
    return (size, size) if isinstance(size, int) else tuple(size)


def model_metadata(kind: str, model_name: str, model_kwargs: dict, data: DataConfig, info: dict) -> dict:
    return {
        "kind": kind,
        "model": model_name,
        "model_kwargs": model_kwargs,
        "num_classes": info["num_classes"],
        "classes": list(info["class_names"]),
        "img_size": list(_img_size(data)),
        "mean": list(info["mean"]),
        "std": list(info["std"]),
        "interpolation": data.interpolation,
        "crop_pct": data.crop_pct,
    }


def read_metadata(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: expected an exported .safetensors model (the run directory's student.safetensors)")
    meta = read_export_metadata(path)
    if meta is None:
        raise ValueError(f"{path} has no vitlinearizer metadata; export it with `vitlinearizer distill/finetune`")
    return meta


def _model_for(meta: dict) -> nn.Module:
    """The (untrained) model an export description names, at the resolution it was trained at: the position
    embedding in the file has that grid's size."""
    kwargs = {"img_size": tuple(meta["img_size"]), **meta["model_kwargs"]}
    return timm.create_model(meta["model"], num_classes=meta["num_classes"], **kwargs)


def load_exported_model(path: str | Path, device="cpu") -> tuple[nn.Module, dict]:
    meta = read_metadata(path)
    model = _model_for(meta)
    state = load_state_dict_safely(path)
    model.load_state_dict(state)
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


def _seed_initialisation(cfg: RunConfig) -> None:
    """Model initialisation follows train.seed, not whatever drew random numbers earlier in this process: a
    stage gives the same result alone (CLI) or after other stages (the demo), and --train.seed changes it."""
    seed_all(derive_seed(cfg.train.seed, 3))  # 3: a stream apart from the engine's (data order 1, training 2)


def _datasets(cfg: RunConfig):
    info = dataset_info(cfg.data)
    train = build_dataset(cfg.data, "train")
    holdout = build_dataset(cfg.data, "holdout") if cfg.data.holdout_fraction > 0 else None
    return info, train, holdout


def _write_config(cfg: RunConfig, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "config.yaml", dump_yaml(cfg))


def _train_and_export(task: nn.Module, cfg: RunConfig, info: dict, train_ds, holdout, resume: bool, kind: str,
                      model_name: str, model_kwargs: dict, filename: str) -> dict:
    """Train ``task``, export its student (the EMA copy when EMA is on) with metadata, test it, write the summary."""
    run_dir = Path(cfg.output_dir)
    _write_config(cfg, run_dir)
    eval_fn = None
    if holdout is not None:
        def eval_fn(model):
            return {f"holdout_{k}": v for k, v in evaluate_classifier(model, holdout, cfg.train.batch_size * 2).items()}
    trainer = Trainer(task, train_ds, cfg.train, run_dir, eval_fn=eval_fn, device=resolve_device(cfg.device))
    try:
        summary = trainer.fit(resume=resume)
    finally:
        cleanup_distributed()
    if trainer.rank != 0:
        return summary
    trained = trainer.ema.module if trainer.ema is not None else task.student
    meta = model_metadata(kind, model_name, model_kwargs, cfg.data, info)
    summary["exported"] = str(export_model(trained, run_dir / filename, meta))
    return _finish(summary, run_dir, trained, cfg, test_split=kind != "distilled-student")


def _finish(summary: dict, run_dir: Path, model: nn.Module, cfg: RunConfig, test_split: bool = True) -> dict:
    if test_split:
        test = build_dataset(cfg.data, "test")
        summary["test"] = evaluate_classifier(model, test, cfg.train.batch_size * 2)
    summary["complete"] = not summary.get("interrupted", False)
    write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=2, default=str))
    return summary


def build_student(cfg: RunConfig, num_classes: int, use_mask_token: bool) -> nn.Module:
    kwargs = dict(cfg.student.model_kwargs)
    kwargs.update(mixer=cfg.student.mixer, drop_path_rate=cfg.student.drop_path_rate)
    try:
        model = timm.create_model(cfg.student.model, num_classes=num_classes, img_size=_img_size(cfg.data),
                                  use_mask_token=use_mask_token, **kwargs)
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise ValueError(f"student.model {cfg.student.model!r} is unknown; choose one of "
                             f"{', '.join(timm.list_models('adventurer*'))}") from exc
        raise
    model.patch_grid(*_img_size(cfg.data))  # a resolution that does not fit the patch size fails here
    if cfg.student.checkpoint:
        state = load_state_dict_safely(cfg.student.checkpoint)
        state = checkpoint_filter_fn(state, model)  # resamples the position embedding to this resolution
        head = {k for k in state if k.startswith("head.")}
        if any(state[k].shape != v.shape for k, v in model.state_dict().items() if k in head):
            state = {k: v for k, v in state.items() if k not in head}  # another class count: keep our new head
        missing, unexpected = model.load_state_dict(state, strict=False)
        bad = [k for k in missing if not k.startswith(("head.", "mask_token"))] + list(unexpected)
        if bad:
            raise ValueError(f"student.checkpoint {cfg.student.checkpoint} does not fit {cfg.student.model}: {bad[:10]}")
    return model


def build_teacher(cfg: RunConfig, num_classes: int, data_mean, data_std) -> Teacher:
    if not cfg.teacher.weights:
        warnings.warn("teacher.weights is not set: distilling from a randomly initialised teacher", stacklevel=2)
    teacher = Teacher(cfg.teacher.model, weights=cfg.teacher.weights, img_size=_img_size(cfg.data),
                      num_classes=num_classes, ignore_head=cfg.teacher.ignore_head, **cfg.teacher.model_kwargs)
    teacher.set_input_normalization(data_mean, data_std)
    return teacher


def dry_run_config(cfg: RunConfig, output_dir: str, img_size: int | None = None) -> RunConfig:
    """The same models at their true sizes and resolution, on 2 synthetic images for 2 steps of batch 1: checks
    a preset end to end without its data, weights or hardware (teacher and student start from random weights).
    ``img_size`` replaces the resolution (a cheaper check of the same architectures and code paths)."""
    cfg = copy.deepcopy(cfg)
    num_classes = dataset_info(cfg.data)["num_classes"] if cfg.data.name != "imagefolder" else 1000
    cfg.data = DataConfig(name="synthetic", img_size=img_size or cfg.data.img_size, num_classes=num_classes, synthetic_length=2,
                          holdout_fraction=0.0, augment=cfg.data.augment, mean=cfg.data.mean, std=cfg.data.std)
    cfg.train.epochs, cfg.train.batch_size, cfg.train.accum_steps = 1, 1, 1
    cfg.train.num_workers, cfg.train.warmup_epochs, cfg.train.warmup_steps = 0, 0.0, None
    cfg.train.save_checkpoints = False
    if resolve_device(cfg.device).type == "cpu":
        cfg.train.amp = "none"
    cfg.teacher.weights = cfg.student.checkpoint = None
    cfg.output_dir = output_dir
    return cfg


def train_teacher(cfg: RunConfig, resume: bool = False) -> dict:
    """Supervised training of a timm ViT teacher from scratch (the demo's teacher)."""
    _seed_initialisation(cfg)
    info, train_ds, holdout = _datasets(cfg)
    model = timm.create_model(cfg.teacher.model, num_classes=info["num_classes"], img_size=_img_size(cfg.data),
                              **cfg.teacher.model_kwargs)
    task = ClassificationTask(model, label_smoothing=cfg.finetune.label_smoothing)
    return _train_and_export(task, cfg, info, train_ds, holdout, resume, "teacher", cfg.teacher.model,
                             cfg.teacher.model_kwargs, "teacher.safetensors")


def distill(cfg: RunConfig, resume: bool = False) -> dict:
    """Distil the teacher into the student (activation matching + masked prediction); no labels used."""
    _seed_initialisation(cfg)
    info, train_ds, _ = _datasets(cfg)
    student = build_student(cfg, info["num_classes"], use_mask_token=True)
    # Distillation matches features only: a headless teacher, so a checkpoint trained on other classes
    # (e.g. ImageNet's 1000) needs no --teacher.ignore_head.
    teacher = build_teacher(cfg, 0, info["mean"], info["std"])
    task = DistillationTask(student, teacher, cfg.distill)
    return _train_and_export(task, cfg, info, train_ds, None, resume, "distilled-student", cfg.student.model,
                             dict(cfg.student.model_kwargs, mixer=cfg.student.mixer), "student.safetensors")


def finetune(cfg: RunConfig, resume: bool = False) -> dict:
    """Supervised fine-tuning of a (distilled) student, or training it from scratch without student.checkpoint."""
    _seed_initialisation(cfg)
    info, train_ds, holdout = _datasets(cfg)
    student = build_student(cfg, info["num_classes"], use_mask_token=False)
    teacher = None
    if cfg.finetune.kd_weight > 0:
        teacher = build_teacher(cfg, info["num_classes"], info["mean"], info["std"])
    task = ClassificationTask(student, cfg.finetune.label_smoothing, teacher, cfg.finetune.kd_weight,
                              cfg.finetune.kd_temperature)
    return _train_and_export(task, cfg, info, train_ds, holdout, resume, "student", cfg.student.model,
                             dict(cfg.student.model_kwargs, mixer=cfg.student.mixer), "student.safetensors")


def evaluate_teacher(cfg: RunConfig, split: str = "test") -> dict:
    """Accuracy of the configured teacher (``teacher.weights``) on a split of ``cfg.data``."""
    info = dataset_info(cfg.data)
    teacher = build_teacher(cfg, info["num_classes"], info["mean"], info["std"])
    return evaluate_classifier(teacher, build_dataset(cfg.data, split), cfg.train.batch_size * 2)


def evaluate(checkpoint: str | Path, data: DataConfig, split: str = "test", batch_size: int = 256,
             device: str = "auto") -> dict:
    """Top-1/top-5 of an exported model on a split of ``data`` (preprocessing from the model's metadata)."""
    model, meta = load_exported_model(checkpoint, resolve_device(device))
    data.img_size = tuple(meta["img_size"]) if data.img_size == DataConfig().img_size else data.img_size
    data.mean, data.std = meta["mean"], meta["std"]
    data.validate()
    dataset = build_dataset(data, split)
    if dataset.num_classes != meta["num_classes"]:
        raise ValueError(f"the data has {dataset.num_classes} classes but the model predicts {meta['num_classes']}")
    if dataset.classes != list(meta["classes"]):  # same count, other labels: the accuracy would be meaningless
        differ = [f"{i}: data {a!r} vs model {b!r}" for i, (a, b) in enumerate(zip(dataset.classes, meta["classes"]))
                  if a != b]
        raise ValueError(f"the data's classes are not the ones the model was trained on ({'; '.join(differ[:5])}); "
                         "evaluate on data with the same class folders")
    result = evaluate_classifier(model, dataset, batch_size)
    return {"checkpoint": str(checkpoint), "model": meta["model"], "split": split, **result}


def predict(checkpoint: str | Path, images: list[str], topk: int = 5, device: str = "auto",
            img_size: tuple[int, int] | None = None) -> list[dict]:
    """Top-k labels with probabilities for image files, resized to ``img_size`` (default: the size the model was
    trained at; Adventurer students run at any multiple of their patch size)."""
    model, meta = load_exported_model(checkpoint, resolve_device(device))
    img_size = tuple(meta["img_size"]) if img_size is None else tuple(img_size)
    if hasattr(model, "patch_grid"):
        model.patch_grid(*img_size)  # a size that does not fit the patch size fails here, naming the fix
    data = DataConfig(name="synthetic", img_size=img_size, mean=meta["mean"], std=meta["std"],
                      interpolation=meta["interpolation"], crop_pct=meta["crop_pct"])
    transform = build_transform(data, train=False)
    k = min(topk, meta["num_classes"])
    results = []
    for path in images:
        if not Path(path).is_file():
            raise FileNotFoundError(f"image {path} does not exist")
        x = transform(load_rgb(path)).unsqueeze(0).to(next(model.parameters()).device)
        with torch.no_grad():
            probs = model(x).float().softmax(-1)[0]
        top = probs.topk(k)
        results.append({"image": str(path), "top": [
            {"label": meta["classes"][i], "index": int(i), "prob": round(float(p), 4)}
            for p, i in zip(top.values.tolist(), top.indices.tolist())
        ]})
    return results
