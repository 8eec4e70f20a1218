"""The pipeline stages behind the CLI: train a teacher, distil, fine-tune (``eval`` and ``predict`` of their
exports: :mod:`vitlinearizer.evaluation`).

Each stage takes a validated :class:`RunConfig`, writes a run directory (``config.yaml``, ``metrics.jsonl``,
``checkpoints/``, an exported ``.safetensors`` model and ``summary.json``) and returns the summary.
Exported models carry their own description in the safetensors metadata (architecture, classes,
preprocessing), so ``eval`` and ``predict`` need nothing but the file.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Collection

import timm
from timm.layers import to_2tuple
import torch
import torch.nn as nn
import yaml

from . import models  # noqa: F401  (registers the students with timm)
from .checkpoint import CheckpointError, export_model, list_checkpoints, read_export_metadata, write_text_atomic
from .config import RunConfig, StudentConfig, TeacherConfig, dump_yaml
from .curves import plot_curves, read_metrics
from .data import EVAL_SPLIT_DIRS, DataConfig, build_dataset, build_transform, check_data_source, dataset_info, read_skip_log
from .distill import DistillationTask
from .engine import Trainer, cleanup_distributed, evaluate_classifier
# runner.load_exported_model & co. stay importable from here, where they were first documented.
from .exports import architecture_changes, load_exported_model, model_metadata, read_metadata  # noqa: F401
from .finetune import ClassificationTask
from .models.adventurer import checkpoint_filter_fn, patch_grid
from .seeding import derive_seed, seed_all
from .teacher import Teacher, check_teacher_model, load_state_dict_safely, pixels_per_token


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``; anything else, or a
    device this machine lacks, is a one-line ValueError naming the value and the choices."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mps = torch.backends.mps.is_available()
    # torch.device also takes xla, meta, hpu, ... which the training and evaluation code does not run on.
    if not isinstance(name, str) or not re.fullmatch(r"cpu|cuda(:\d+)?|mps", name):
        choices = "auto, cpu, cuda, cuda:N or mps" if mps else "auto, cpu, cuda or cuda:N"
        raise ValueError(f"device={name!r} is not a device; use {choices}")
    device = torch.device(name)
    if device.type == "mps" and not mps:
        raise ValueError(f"device={name!r} but MPS is not available; use device=cpu or auto")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but CUDA is not available; use device=cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device={name!r} but there are only {torch.cuda.device_count()} CUDA device(s); "
                         f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}, or auto")
    return device


@contextlib.contextmanager
def _model_kwargs_checked(option: str, model_name: str, model_kwargs: dict):
    """A model that rejects ``model_kwargs`` (timm passes them to its constructor, which raises a TypeError) fails
    as a one-line ValueError naming the option, the model and the argument where the TypeError names it."""
    try:
        yield
    except (TypeError, ValueError) as exc:
        cause = exc if isinstance(exc, TypeError) else exc.__cause__  # the Teacher wraps timm's TypeError
        named = [k for k in model_kwargs if re.search(rf"\b{re.escape(k)}\b", str(cause))]
        if not isinstance(cause, TypeError) or not (named or (cause is exc and model_kwargs)):
            raise  # not about model_kwargs (e.g. a teacher that is no ViT)
        if named:
            raise ValueError(f"{option}: {model_name} does not accept {', '.join(named)} ({cause}); remove or "
                             f"correct it in {option}") from exc
        raise ValueError(f"{model_name} cannot be built with {option} {model_kwargs} ({cause}); correct "
                         f"{option}") from exc


def _seed_initialisation(cfg: RunConfig) -> None:
    """Model initialisation follows train.seed, not whatever drew random numbers earlier in this process: a
    stage gives the same result alone (CLI) or after other stages (the demo), and --train.seed changes it."""
    seed_all(derive_seed(cfg.train.seed, 3))  # 3: a stream apart from the engine's (data order 1, training 2)


def _datasets(cfg: RunConfig, classifier: bool = True):
    """Dataset info, the training set and the holdout set. ``classifier``: the run trains with labels and ends
    with a test evaluation, whose data must then exist before training starts (not be found missing after it)."""
    tested = classifier and cfg.train.final_test
    try:
        check_data_source(cfg.data, ("train", "test") if tested else ("train",))
    except FileNotFoundError as exc:
        root = Path(cfg.data.root or ".")
        train_alone = (cfg.data.name == "imagefolder" and (root / "train").is_dir()
                       and not any((root / d).is_dir() for d in EVAL_SPLIT_DIRS))
        if tested and train_alone:
            raise FileNotFoundError(f"{exc}; or train without a final test: --train.final_test false") from None
        raise
    if classifier and not cfg.train.final_test and cfg.data.holdout_fraction == 0:
        warnings.warn("train.final_test is false and data.holdout_fraction is 0: the trained classifier is never "
                      "evaluated; set data.holdout_fraction (e.g. 0.1) to measure it on held-out training images")
    info = dataset_info(cfg.data)
    if classifier and info["num_classes"] < 2:
        # One class trains to loss 0 and 100% accuracy, whatever the images: a layout mistake, not a result.
        raise ValueError(f"the training data has {info['num_classes']} class ({', '.join(info['class_names'])}): "
                         "a classifier needs at least 2; for ImageFolder data put each class's images in its own "
                         "folder under train/ (distill alone, which uses no labels, takes one folder)")
    train = build_dataset(cfg.data, "train")
    holdout = build_dataset(cfg.data, "holdout") if cfg.data.holdout_fraction > 0 else None
    return info, train, holdout


def _write_config(cfg: RunConfig, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "config.yaml", dump_yaml(cfg))


# Settings a resumed run may change: they decide how the run is carried out (logging, data-loader workers,
# checkpoint cadence, the final test, where it runs), not what its steps compute.
RESUME_MAY_CHANGE = frozenset({
    "output_dir", "device", "data.verify", "train.log_every", "train.progress", "train.num_workers",
    "train.save_every_steps", "train.keep_checkpoints", "train.max_bad_steps", "train.final_test",
})


def flatten_config(tree: dict, prefix: str = "") -> dict:
    """``{"train": {"lr": 1e-3}}`` -> ``{"train.lr": 1e-3}`` (model_kwargs too, key by key)."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten_config(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


# Settings that name files: a config records them as typed, so they compare as the file they name here
# (``tw/vit.pth`` and its absolute path are the same file; a relative path is read from the working directory).
PATH_KEYS = frozenset({"data.root", "teacher.weights", "student.checkpoint"})


def _same_setting(key: str, a, b) -> bool:
    if key in PATH_KEYS and isinstance(a, str) and isinstance(b, str):
        return os.path.abspath(os.path.expanduser(a)) == os.path.abspath(os.path.expanduser(b))
    return a == b


def config_changes(saved: dict, wanted: dict, defaults: dict) -> list[str]:
    """Flattened keys whose value differs between a run's saved config and the wanted one. A key the saved
    config lacks (an option added to the library after the run started) counts as unchanged while the wanted
    value is its default: adding options does not invalidate earlier runs. Paths (``PATH_KEYS``) compare as the
    files they name from the working directory."""
    saved, wanted, defaults = (flatten_config(c) for c in (saved, wanted, defaults))
    return sorted(key for key in set(saved) | set(wanted)
                  if not _same_setting(key, saved.get(key, defaults.get(key)), wanted.get(key)))


def _check_resume_config(previous_config: str, cfg: RunConfig, run_dir: Path) -> None:
    """A resumed run continues with the settings it started with: the Trainer checks its own schedule, this the
    rest (data, augmentation, the objective, the models), whose change would otherwise be taken silently and
    recorded as if the whole run had used it."""
    saved = yaml.safe_load(previous_config) or {}
    wanted = yaml.safe_load(dump_yaml(cfg))
    changed = [key for key in config_changes(saved, wanted, yaml.safe_load(dump_yaml(RunConfig())))
               if key not in RESUME_MAY_CHANGE]
    if changed:
        old, new = flatten_config(saved), flatten_config(wanted)
        shown = ", ".join(f"{key} {old.get(key)!r} -> {new.get(key)!r}" for key in changed[:6])
        more = f" and {len(changed) - 6} more" if len(changed) > 6 else ""
        paths = [key for key in changed if key in PATH_KEYS]
        where = (f" ({', '.join(paths)}: a relative path is read from the working directory, {os.getcwd()}; resume "
                 "from the directory the run started in, or name the same file)") if paths else ""
        raise CheckpointError(f"--resume continues {run_dir} only with the settings it was started with (its "
                              f"config.yaml); changed: {shown}{more}{where}. Resume without these changes, or start a "
                              "new run with another --output_dir")


def _train_and_export(task: nn.Module, cfg: RunConfig, info: dict, train_ds, holdout, resume: bool, kind: str,
                      model_name: str, model_kwargs: dict, filename: str) -> dict:
    """Train ``task``, export its student (the EMA copy when EMA is on) with metadata, test it, write the summary."""
    run_dir = Path(cfg.output_dir)
    previous_config = (run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").is_file() else None
    eval_fn = None
    if holdout is not None:
        def eval_fn(model):
            result = evaluate_classifier(model, holdout, cfg.train.batch_size * 2, amp=cfg.train.amp)
            return {f"holdout_{k}": v for k, v in result.items()}
    for split, ds in (("train", train_ds), ("holdout", holdout)):
        if ds is not None:
            ds.skip_log = _skip_log(run_dir, split)
    trainer = Trainer(task, train_ds, cfg.train, run_dir, eval_fn=eval_fn, device=resolve_device(cfg.device))
    if resume and previous_config is not None and list_checkpoints(trainer.ckpt_dir):
        _check_resume_config(previous_config, cfg, run_dir)
    # Written once the Trainer accepted the settings (a batch larger than the data set fails in it), so that a
    # refused run leaves the directory describing the run its checkpoints belong to.
    if trainer.rank == 0:
        _write_config(cfg, run_dir)
        # Records of unreadable files left by an attempt that died before its first checkpoint are not this
        # run's; with checkpoints and no --resume, fit refuses the run and the records stay with their run.
        if not resume and not list_checkpoints(trainer.ckpt_dir):
            shutil.rmtree(run_dir / _SKIP_LOG_DIR, ignore_errors=True)
    try:
        summary = trainer.fit(resume=resume)
    except CheckpointError:
        # Refused before any step: the directory keeps describing the run its checkpoints belong to.
        if previous_config is not None and trainer.rank == 0:
            write_text_atomic(run_dir / "config.yaml", previous_config)
        raise
    except BaseException:  # diverged or interrupted: the curves show how it got there
        if trainer.rank == 0 and (run_dir / "metrics.jsonl").is_file():
            _draw_curves(run_dir)
        raise
    finally:
        cleanup_distributed()
    if trainer.rank != 0:
        return summary
    trained = trainer.ema.module if trainer.ema is not None else trainer.student
    meta = model_metadata(kind, model_name, model_kwargs, cfg.data, info)
    if train_ds.split_from is not None:
        meta["holdout_drawn_from"] = train_ds.split_from
    summary["exported"] = str(export_model(trained, run_dir / filename, meta))
    return _finish(summary, run_dir, trained, cfg, train_ds, holdout,
                   test_split=kind != "distilled-student" and cfg.train.final_test)


# The warnings name at most 50 files; the summary keeps more, for a later look at what a run left out.
_SKIPPED_LISTED = 100
_SKIP_LOG_DIR = "skipped"


def _skip_log(run_dir: Path, split: str) -> Path:
    return run_dir / _SKIP_LOG_DIR / f"{split}.jsonl"


def _skipped_files(datasets: dict) -> dict:
    """Per split, the files left out as unreadable: their count and the first ``_SKIPPED_LISTED`` (path, reason).

    Each file is listed once, under the first split that names it: the scan of train/ drops a file before the
    holdout is drawn from it, so both carry that scan, and it is listed under train; a file that passed the scan
    and failed to decode later, in this process or a DataLoader worker, is read from the split's ``skip_log``."""
    listed, seen = {}, set()
    for split, ds in datasets.items():
        if ds is None:
            continue
        skipped = dict(ds.skipped)
        if getattr(ds, "skip_log", None) is not None:
            for path, reason in read_skip_log(ds.skip_log):
                skipped.setdefault(path, reason)
        skipped = {path: reason for path, reason in skipped.items() if path not in seen}
        seen.update(skipped)
        if skipped:
            listed[split] = {"count": len(skipped), "files": [{"path": p, "reason": r} for p, r in
                                                              list(skipped.items())[:_SKIPPED_LISTED]]}
    return listed


def _finish(summary: dict, run_dir: Path, model: nn.Module, cfg: RunConfig, train_ds, holdout,
            test_split: bool = True) -> dict:
    test = None
    if test_split:
        test = build_dataset(cfg.data, "test")
        test.skip_log = _skip_log(run_dir, "test")
        # Under the training's autocast, as timm's train.py validates (top-1 can differ slightly from float32's).
        summary["test"] = evaluate_classifier(model, test, cfg.train.batch_size * 2, amp=cfg.train.amp)
    summary["skipped_files"] = _skipped_files({"train": train_ds, "holdout": holdout, "test": test})
    summary["complete"] = not summary.get("interrupted", False)
    curves = _draw_curves(run_dir, summary.get("test"))
    if curves is not None:
        summary["curves"] = curves
    write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=2, default=str))
    return summary


def _draw_curves(run_dir: Path, test: dict | None = None) -> str | None:
    """``run_dir/curves.png`` from the run's metrics (and its final ``test`` metrics); None, with a warning, when it
    cannot be drawn: a figure is not worth failing a run for."""
    try:
        metrics = read_metrics(run_dir)
        metrics.test = test
        return str(plot_curves(metrics, run_dir / "curves.png"))
    except Exception as exc:
        warnings.warn(f"could not draw {run_dir / 'curves.png'}: {type(exc).__name__}: {exc}")
        return None


def _is_set(key: str, value, default, explicit: Collection[str] | None) -> bool:
    """Whether the user set config ``key``: named in ``explicit`` (the keys a command line or YAML file gave), or,
    without that record (``explicit=None``, e.g. a config built in Python), holding a value other than the default."""
    return key in explicit if explicit is not None else value != default


def resolve_architectures(cfg: RunConfig, explicit: Collection[str] | None = None, teacher: bool = True) -> RunConfig:
    """The config with the architectures taken from the export metadata of ``student.checkpoint`` and
    ``teacher.weights``, where the config does not set them: a distilled student is fine-tuned as what it is, and a
    teacher trained by ``train-teacher`` is rebuilt as it was trained, without repeating model, mixer and
    model_kwargs. What the config sets takes precedence (and must fit the weights): ``student.model``,
    ``student.mixer``, ``teacher.model`` and each model_kwargs key. ``explicit``: the flattened keys the user set
    (see :func:`_is_set`); without it a value equal to the default counts as not set. ``teacher=False``: the run
    builds no teacher (finetune without logit distillation), whose settings are then left as they are."""
    cfg = copy.deepcopy(cfg)
    _resolve_student(cfg, explicit)
    if teacher:
        _resolve_teacher(cfg, explicit)
    return cfg


def _export_description(path: str | None, option: str, wrong_kinds: dict[str, str]) -> dict | None:
    """The export metadata of the file ``option`` names (None for other files); a file of one of ``wrong_kinds``
    (kind -> what to pass instead) is refused."""
    meta = read_export_metadata(path) if path and Path(path).is_file() else None
    if meta and meta.get("kind") in wrong_kinds:
        raise ValueError(f"{option} {path} is an export of kind {meta['kind']!r} ({meta.get('model')}): "
                         f"{wrong_kinds[meta['kind']]}")
    return meta if meta and "model" in meta else None


def _resolve_student(cfg: RunConfig, explicit: Collection[str] | None) -> None:
    meta = _export_description(cfg.student.checkpoint, "student.checkpoint", {
        "teacher": "student.checkpoint takes a student (the student.safetensors of distill or finetune); a teacher "
                   "goes in teacher.weights"})
    if meta is None:
        return
    stored = dict(meta.get("model_kwargs") or {})
    defaults = StudentConfig()
    if not _is_set("student.model", cfg.student.model, defaults.model, explicit):
        cfg.student.model = meta["model"]
    stored_mixer = stored.pop("mixer", None)
    if stored_mixer is not None and not _is_set("student.mixer", cfg.student.mixer, defaults.mixer, explicit):
        cfg.student.mixer = stored_mixer
    cfg.student.model_kwargs = {**stored, **cfg.student.model_kwargs}


def _resolve_teacher(cfg: RunConfig, explicit: Collection[str] | None) -> None:
    student = ("teacher.weights takes a ViT (the teacher.safetensors of train-teacher, or a timm checkpoint); a "
               "student goes in student.checkpoint")
    meta = _export_description(cfg.teacher.weights, "teacher.weights",
                               {"student": student, "distilled-student": student})
    if meta is None or meta.get("kind") != "teacher":
        return
    if _is_set("teacher.model", cfg.teacher.model, TeacherConfig().model, explicit) and cfg.teacher.model != meta["model"]:
        return  # another architecture: the file's model_kwargs describe a different model
    cfg.teacher.model = meta["model"]
    cfg.teacher.model_kwargs = {**(meta.get("model_kwargs") or {}), **cfg.teacher.model_kwargs}


def _stored_grid(path: str, model: nn.Module) -> tuple[int, int] | None:
    meta = read_export_metadata(path)
    if not meta or "img_size" not in meta:
        return None
    return patch_grid(*meta["img_size"], model.patch_embed.patch_size)


def _create_student(cfg: RunConfig, num_classes: int, use_mask_token: bool) -> nn.Module:
    """The configured student, untrained; a one-line ValueError for an unknown model, an argument it does not take
    or a resolution its patch does not tile."""
    kwargs = dict(cfg.student.model_kwargs)
    kwargs.update(mixer=cfg.student.mixer, drop_path_rate=cfg.student.drop_path_rate)
    try:
        with _model_kwargs_checked("student.model_kwargs", cfg.student.model, cfg.student.model_kwargs):
            model = timm.create_model(cfg.student.model, num_classes=num_classes, img_size=to_2tuple(cfg.data.img_size),
                                      use_mask_token=use_mask_token, **kwargs)
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise ValueError(f"student.model {cfg.student.model!r} is unknown; choose one of "
                             f"{', '.join(timm.list_models('adventurer*'))}") from exc
        raise
    model.patch_grid(*to_2tuple(cfg.data.img_size))  # a resolution that does not fit the patch size fails here
    return model


def _check_architectures(cfg: RunConfig, student: bool, teacher: bool) -> None:
    """Builds the configured student and teacher on the meta device (nothing allocated, no random number drawn):
    settings they cannot be built with fail before the data scan, which takes minutes on a large ImageFolder."""
    if teacher:
        with _model_kwargs_checked("teacher.model_kwargs", cfg.teacher.model, cfg.teacher.model_kwargs):
            check_teacher_model(cfg.teacher.model, {"img_size": to_2tuple(cfg.data.img_size), **cfg.teacher.model_kwargs})
    if student:
        with torch.device("meta"):
            _create_student(cfg, num_classes=2, use_mask_token=False)


def build_student(cfg: RunConfig, num_classes: int, use_mask_token: bool) -> nn.Module:
    model = _create_student(cfg, num_classes, use_mask_token)
    model.set_grad_checkpointing(cfg.student.grad_checkpointing)
    if cfg.student.checkpoint:
        state = load_state_dict_safely(cfg.student.checkpoint, model_keys=model.state_dict().keys(),
                                       option="student.checkpoint")
        # Resamples the position embedding to this resolution.
        state = checkpoint_filter_fn(state, model, _stored_grid(cfg.student.checkpoint, model))
        own = model.state_dict()
        head = {k for k in state if k.startswith("head.")}
        if any(state[k].shape != v.shape for k, v in own.items() if k in head):
            state = {k: v for k, v in state.items() if k not in head}  # another class count: keep our new head
        mismatched = [f"{k} {tuple(v.shape)} in the file, {tuple(own[k].shape)} here"
                      for k, v in state.items() if k in own and v.shape != own[k].shape]
        missing = [k for k in own if k not in state and not k.startswith(("head.", "mask_token"))]
        unexpected = [k for k in state if k not in own and k != "mask_token"]
        problems = mismatched + [f"{k}: not in the file" for k in missing] + [f"{k}: not in the model" for k in unexpected]
        if problems:
            raise ValueError(
                f"student.checkpoint {cfg.student.checkpoint} does not fit student.model {cfg.student.model} with "
                f"mixer={cfg.student.mixer} and model_kwargs={cfg.student.model_kwargs} ({len(problems)} tensors): "
                f"{'; '.join(problems[:5])}. Set student.model, student.mixer and student.model_kwargs as the "
                "checkpoint was trained (an export of this library sets them itself when they are left at their defaults)")
        model.load_state_dict(state, strict=False)
    return model


def build_teacher(cfg: RunConfig, num_classes: int, data_mean, data_std) -> Teacher:
    if not cfg.teacher.weights:
        warnings.warn("teacher.weights is not set: distilling from a randomly initialised teacher", stacklevel=2)
    with _model_kwargs_checked("teacher.model_kwargs", cfg.teacher.model, cfg.teacher.model_kwargs):
        teacher = Teacher(cfg.teacher.model, weights=cfg.teacher.weights, img_size=to_2tuple(cfg.data.img_size),
                          num_classes=num_classes, ignore_head=cfg.teacher.ignore_head,
                          prefer_ema=cfg.teacher.prefer_ema, **cfg.teacher.model_kwargs)
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
    _check_architectures(cfg, student=False, teacher=True)  # a model distill would refuse as a teacher fails now
    _seed_initialisation(cfg)
    info, train_ds, holdout = _datasets(cfg)
    with _model_kwargs_checked("teacher.model_kwargs", cfg.teacher.model, cfg.teacher.model_kwargs):
        model = timm.create_model(cfg.teacher.model, num_classes=info["num_classes"], img_size=to_2tuple(cfg.data.img_size),
                                  **cfg.teacher.model_kwargs)
    patch = pixels_per_token(model)
    if patch is not None:  # timm's ViT crops what does not fill a patch, silently; the student refuses it
        try:
            patch_grid(*to_2tuple(cfg.data.img_size), tuple(patch))
        except ValueError as exc:
            raise ValueError(f"data.img_size for teacher {cfg.teacher.model}: {exc}") from None
    task = ClassificationTask(model, label_smoothing=cfg.finetune.label_smoothing)
    return _train_and_export(task, cfg, info, train_ds, holdout, resume, "teacher", cfg.teacher.model,
                             cfg.teacher.model_kwargs, "teacher.safetensors")


def distill(cfg: RunConfig, resume: bool = False, explicit: Collection[str] | None = None) -> dict:
    """Distil the teacher into the student (activation matching + masked prediction); no labels used.
    ``distill.objective: none`` (the ablation's supervised row) trains a classifier instead, which is then tested.
    ``explicit``: the config keys the user set (:func:`resolve_architectures`)."""
    cfg = resolve_architectures(cfg, explicit)
    _check_architectures(cfg, student=True, teacher=True)
    _seed_initialisation(cfg)
    supervised = cfg.distill.objective == "none"
    info, train_ds, _ = _datasets(cfg, classifier=supervised)
    student = build_student(cfg, info["num_classes"], use_mask_token=True)
    # Distillation matches features only: a headless teacher, so a checkpoint trained on other classes
    # (e.g. ImageNet's 1000) needs no --teacher.ignore_head.
    teacher = build_teacher(cfg, 0, info["mean"], info["std"])
    task = DistillationTask(student, teacher, cfg.distill)
    return _train_and_export(task, cfg, info, train_ds, None, resume, "student" if supervised else "distilled-student",
                             cfg.student.model, dict(cfg.student.model_kwargs, mixer=cfg.student.mixer),
                             "student.safetensors")


def _check_logit_teacher(cfg: RunConfig, class_names) -> None:
    """Logit distillation compares the teacher's class scores with the student's, class by class: the teacher's
    head must be trained on these classes, in this order."""
    if cfg.teacher.ignore_head:
        raise ValueError("finetune.kd_weight > 0 distils the teacher's logits, but teacher.ignore_head drops its "
                         "classifier (the logits would come from a random head); set finetune.kd_weight 0, or give "
                         "a teacher trained on these classes")
    if not cfg.teacher.weights:
        raise ValueError("finetune.kd_weight > 0 needs teacher.weights (a teacher trained on these classes)")
    meta = read_export_metadata(cfg.teacher.weights)
    if meta and meta.get("classes") is not None and list(meta["classes"]) != list(class_names):
        raise ValueError(f"teacher {cfg.teacher.weights} was trained on the classes {meta['classes']}, the data has "
                         f"{list(class_names)}: logit distillation needs the same classes in the same order")


def finetune(cfg: RunConfig, resume: bool = False, explicit: Collection[str] | None = None) -> dict:
    """Supervised fine-tuning of a (distilled) student, or training it from scratch without student.checkpoint.
    ``explicit``: the config keys the user set (:func:`resolve_architectures`)."""
    cfg = resolve_architectures(cfg, explicit, teacher=cfg.finetune.kd_weight > 0)
    _check_architectures(cfg, student=True, teacher=cfg.finetune.kd_weight > 0)
    _seed_initialisation(cfg)
    info, train_ds, holdout = _datasets(cfg)
    student = build_student(cfg, info["num_classes"], use_mask_token=False)
    teacher = None
    if cfg.finetune.kd_weight > 0:
        _check_logit_teacher(cfg, info["class_names"])
        teacher = build_teacher(cfg, info["num_classes"], info["mean"], info["std"])
    task = ClassificationTask(student, cfg.finetune.label_smoothing, teacher, cfg.finetune.kd_weight,
                              cfg.finetune.kd_temperature)
    return _train_and_export(task, cfg, info, train_ds, holdout, resume, "student", cfg.student.model,
                             dict(cfg.student.model_kwargs, mixer=cfg.student.mixer), "student.safetensors")


def evaluate_teacher(cfg: RunConfig, split: str = "test") -> dict:
    """Accuracy of the configured teacher (``teacher.weights``) on a split of ``cfg.data``."""
    info = dataset_info(cfg.data)
    teacher = build_teacher(cfg, info["num_classes"], info["mean"], info["std"])
    dataset = build_dataset(cfg.data, split)
    dataset.transform = build_transform(cfg.data, train=False)  # the train split too: no augmentation draws
    return evaluate_classifier(teacher, dataset, cfg.train.batch_size * 2, amp=cfg.train.amp)
