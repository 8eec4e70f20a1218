"""Run configuration: nested dataclasses, YAML files, command-line overrides and strict checking.

A run is configured by a YAML file (``configs/*.yaml``) whose top-level sections mirror :class:`RunConfig`;
every field can be overridden on the command line as ``--section.field VALUE``. Unknown or mistyped keys and
values of the wrong type are errors that name the key and what is allowed, raised before any work starts.
"""
from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .data import DataConfig
from .distill import DistillConfig
from .engine import TrainConfig


def _check_model_kwargs(section: str, kwargs: dict, owned: dict[str, str]) -> None:
    """model_kwargs must not set what the library sets from another option (it would clash or be overridden)."""
    for key, owner in owned.items():
        if key in kwargs:
            raise ValueError(f"{section}.model_kwargs must not set {key!r}: {owner}")


@dataclass
class StudentConfig:
    model: str = "adventurer_nano_patch4_28"
    mixer: str = "mamba2"
    drop_path_rate: float = 0.0
    grad_checkpointing: bool = False
    model_kwargs: dict = field(default_factory=dict)
    checkpoint: str | None = None

    def validate(self) -> None:
        _check_model_kwargs("student", self.model_kwargs, {
            "mixer": "use student.mixer", "drop_path_rate": "use student.drop_path_rate",
            "grad_checkpointing": "use student.grad_checkpointing",
            "img_size": "use data.img_size", "num_classes": "the class count comes from the data",
            "use_mask_token": "distill adds the mask token itself"})


@dataclass
class TeacherConfig:
    model: str = "vit_tiny_patch16_224"
    model_kwargs: dict = field(default_factory=dict)
    weights: str | None = None
    ignore_head: bool = False
    prefer_ema: bool = False

    def validate(self) -> None:
        _check_model_kwargs("teacher", self.model_kwargs, {
            "img_size": "use data.img_size",
            "num_classes": "the class count comes from the data (teacher.ignore_head drops a checkpoint's other head)"})


@dataclass
class FinetuneConfig:
    label_smoothing: float = 0.1
    kd_weight: float = 0.0
    kd_temperature: float = 1.0

    def validate(self) -> None:
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"finetune.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if not 0 <= self.kd_weight <= 1:  # the loss is (1 - kd_weight) * CE + kd_weight * KD
            raise ValueError(f"finetune.kd_weight must be in [0, 1], got {self.kd_weight}")
        if self.kd_temperature <= 0:
            raise ValueError(f"finetune.kd_temperature must be > 0, got {self.kd_temperature}")


@dataclass
class RunConfig:
    output_dir: str = "runs/default"
    device: str = "auto"
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)


HELP = {
    "output_dir": "run directory: resolved config, metrics.jsonl, checkpoints, summary.json",
    "device": "auto | cpu | cuda | cuda:N",
    "data.name": "fashion_mnist | imagefolder | synthetic",
    "data.root": "dataset folder (imagefolder: holds train/ and val/, validation/ or test/; fashion_mnist: "
                 "Debian's idx files)",
    "data.img_size": "input size: an int, [H, W] or HxW",
    "data.mean": "normalisation mean (null: the dataset's default)",
    "data.std": "normalisation std (null: the dataset's default)",
    "data.augment": "timm | simple | none (simple: random-resized-crop 0.6-1 + flip)",
    "data.auto_augment": "timm auto-augment policy for augment=timm, e.g. rand-m9-mstd0.5-inc1",
    "data.re_prob": "random-erasing probability (augment=timm)",
    "data.crop_pct": "eval centre-crop fraction",
    "data.interpolation": "resize interpolation: nearest | bilinear | bicubic | box | hamming | lanczos",
    "data.holdout_fraction": "fraction of the training set held out for validation (never the test set)",
    "data.max_train_samples": "use a class-balanced subset of this many training images",
    "data.max_eval_samples": "use a class-balanced subset of this many evaluation images",
    "data.num_classes": "classes of the synthetic dataset",
    "data.synthetic_length": "images in the synthetic dataset",
    "data.seed": "seed of the holdout split and subsets",
    "data.strict": "fail on undecodable images instead of skipping them",
    "data.verify": "imagefolder pre-scan: full | header | none",
    "train.epochs": "training epochs",
    "train.batch_size": "images per process per micro-batch",
    "train.lr": "peak learning rate (AdamW)",
    "train.min_lr": "final learning rate of the cosine schedule",
    "train.warmup_epochs": "linear warm-up length in epochs",
    "train.warmup_steps": "linear warm-up length in optimiser steps (overrides warmup_epochs)",
    "train.weight_decay": "AdamW weight decay (not applied to norms, biases, tokens, position embeddings)",
    "train.betas": "AdamW betas",
    "train.eps": "AdamW epsilon",
    "train.clip_grad": "gradient-norm clipping (null or 0: off)",
    "train.accum_steps": "micro-batches accumulated per optimiser step",
    "train.amp": "none | bf16 (autocast, also for the holdout and final test; recurrence state and losses stay float32)",
    "train.ema_decay": "EMA of the weights (0: off); the EMA model is exported when on",
    "train.ema_warmup": "ramp the EMA decay up from 0 over the first steps (timm's EMA warm-up), for short runs",
    "train.layer_decay": "layer-wise lr decay for fine-tuning a pre-trained student: layer i gets "
                         "lr * layer_decay**(last - i) (1: off; BEiT/MAE use 0.65-0.75)",
    "train.seed": "seed of initialisation, data order, augmentation and masking",
    "train.num_workers": "data-loader worker processes",
    "train.log_every": "log metrics every N steps",
    "train.save_checkpoints": "write checkpoints (false: none, and no resume; for dry runs)",
    "train.save_every_steps": "also checkpoint every N steps (0: at epoch ends only)",
    "train.max_bad_steps": "stop after this many consecutive skipped steps (non-finite loss or gradient)",
    "train.keep_checkpoints": "checkpoints kept on disk",
    "train.drop_last": "drop the last incomplete batch of an epoch",
    "train.progress": "show a progress bar",
    "train.final_test": "test the trained classifier on the data's test split at the end (false: a dataset without "
                        "one, e.g. an ImageFolder with train/ alone, trains and reports its holdout only)",
    "student.model": "student architecture (timm name, e.g. adventurer_small_patch16_224)",
    "student.mixer": "token mixer: mamba2 | gla | hgrn",
    "student.drop_path_rate": "stochastic-depth rate",
    "student.grad_checkpointing": "recompute each block in the backward instead of keeping its activations "
                                  "(less memory at high resolution, ~1/3 more compute; outputs unchanged)",
    "student.model_kwargs": "extra keyword arguments for timm.create_model",
    "student.checkpoint": "initial student weights (.safetensors), e.g. a distilled student for finetune; an export "
                          "of this library also gives the model, mixer and model_kwargs you leave unset",
    "teacher.model": "teacher architecture (timm ViT name)",
    "teacher.model_kwargs": "extra keyword arguments for the teacher's timm.create_model",
    "teacher.weights": "local teacher weights (.safetensors / .pth / .bin); a train-teacher export also gives the "
                       "model and model_kwargs you leave unset",
    "teacher.ignore_head": "drop the checkpoint's classifier (e.g. other class count)",
    "teacher.prefer_ema": "take the EMA weights (model_ema / state_dict_ema) of a checkpoint that holds both, as "
                          "timm's train.py writes them; default: the raw weights",
    "distill.objective": "both | act | mask | none (none: supervised only)",
    "distill.mask_ratio": "fraction of student patch tokens replaced by the mask token, in (0, 1)",
    "distill.mask_type": "random | block",
    "distill.num_stages": "K stages for activation matching (must divide both depths; null: the paper's 4 "
                          "where it does, else the largest K below 4 that does)",
    "distill.act_weight": "weight of activation matching",
    "distill.mask_weight": "weight of masked prediction (lambda)",
    "distill.act_tokens": "visible | all: tokens in the similarity maps",
    "distill.row_block_size": "compute similarity maps in row blocks of this size (0: all at once)",
    "distill.num_anchors": "k random anchor rows per image for activation matching (0: all rows)",
    "distill.normalize_target": "LayerNorm teacher targets (no affine) for masked prediction",
    "distill.smooth_l1_beta": "Smooth-L1 beta of masked prediction",
    "distill.label_smoothing": "label smoothing when objective=none",
    "distill.cls_weight": "weight of predicting the teacher's final class token from the student's (not in the paper; 0: off)",
    "finetune.label_smoothing": "cross-entropy label smoothing (finetune, and train-teacher's too)",
    "finetune.kd_weight": "weight of logit distillation from the teacher (0: off)",
    "finetune.kd_temperature": "logit-distillation temperature",
}


class ConfigError(ValueError):
    """An invalid configuration: names the key and what is allowed."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping: plain YAML keeps the last value and drops the
    other without a word, so an edited config would silently run with whichever line came later."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` then a key of base: an override, allowed
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, collections.abc.Hashable) and key in seen:
                mark = key_node.start_mark
                where = "a command-line value" if mark.name.startswith("<") else mark.name
                raise ConfigError(f"key {key!r} appears twice in {where} (line {mark.line + 1}); keep one")
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_yaml_text(text):
    """YAML from a config file or a command-line value; a repeated key is an error (see _UniqueKeyLoader)."""
    return yaml.load(text, Loader=_UniqueKeyLoader)


def _sections(cls=RunConfig) -> dict[str, type]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name])}


def field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _suggest(key: str, allowed) -> str:
    close = difflib.get_close_matches(key, list(allowed), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def coerce(value: Any, hint: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the field's annotated type, or raise ConfigError naming the key."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
            if type(None) in args:
                return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if hint is Any:  # e.g. data.img_size: an int or [H, W]; command-line strings are read as YAML
        return load_yaml_text(value) if isinstance(value, str) else value
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):  # YAML `progress: 1`, as `--train.progress 1`
            return bool(value)
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key} expects true or false, got {value!r}")
    if hint in (int, float):
        return _number(key, value, hint)
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key} expects a string, got {value!r}")
    if hint is dict or origin is dict:
        if isinstance(value, str):
            value = load_yaml_text(value)
        if not isinstance(value, dict):
            raise ConfigError(f"{key} expects a mapping such as {{a: 1}}, got {value!r}")
        # YAML reads `{depth:2}` (no space after the colon) as the key 'depth:2' with no value, which timm would
        # then silently drop, building the default architecture.
        glued = [k for k, v in value.items() if v is None and isinstance(k, str) and ":" in k]
        if glued:
            fixed = ", ".join(k.replace(":", ": ", 1) for k in glued)
            raise ConfigError(f"{key}: {glued[0]!r} is a key without a value; YAML needs a space after each colon: "
                              f"{{{fixed}}}")
        return dict(value)
    if origin in (tuple, list, collections.abc.Sequence) or hint in (tuple, list):
        if isinstance(value, str):
            value = load_yaml_text(value if value.startswith("[") else f"[{value}]")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):  # YAML `mean: 0.5`, as `--data.mean 0.5`
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} expects a list such as [0.9, 0.999], got {value!r}")
        inner = [a for a in args if a is not Ellipsis]
        if inner and len(set(inner)) == 1:
            value = [coerce(v, inner[0], key) for v in value]
        return tuple(value) if (origin or hint) is tuple else list(value)
    return value


def _number(key: str, value: Any, kind: type) -> int | float:
    """An int (``kind=int``) or float from YAML or the command line; bools are not numbers here."""
    if isinstance(value, (int,) if kind is int else (int, float)) and not isinstance(value, bool):
        return kind(value)
    if isinstance(value, str):
        try:
            return kind(value)
        except ValueError:
            pass
    raise ConfigError(f"{key} expects {'an integer' if kind is int else 'a number'}, got {value!r}")


def _build_section(cls, values: dict, prefix: str):
    types_ = field_types(cls)
    unknown = [k for k in values if k not in types_]
    if unknown:
        key = unknown[0]
        raise ConfigError(
            f"unknown key '{prefix}{key}'{_suggest(key, types_)}; allowed in '{prefix.rstrip('.') or 'top level'}': "
            f"{', '.join(types_)}"
        )
    kwargs = {k: coerce(v, types_[k], prefix + k) for k, v in values.items()}
    try:
        return cls(**{**_defaults(cls), **kwargs})
    except (ValueError, TypeError) as exc:
        raise ConfigError(str(exc)) from exc


def _defaults(cls) -> dict:
    return {f.name: getattr(cls(), f.name) for f in dataclasses.fields(cls) if not dataclasses.is_dataclass(getattr(cls(), f.name))}


def build_config(values: dict | None = None) -> RunConfig:
    """A validated :class:`RunConfig` from a nested mapping (YAML contents merged with overrides)."""
    values = dict(values or {})
    sections = _sections()
    top = {k: v for k, v in values.items() if k not in sections}
    built = {}
    for name, cls in sections.items():
        section_values = values.get(name) or {}
        if not isinstance(section_values, dict):
            raise ConfigError(f"'{name}' must be a mapping of keys, got {section_values!r}")
        built[name] = _build_section(cls, section_values, f"{name}.")
    scalar_types = {k: v for k, v in field_types(RunConfig).items() if k not in sections}
    unknown = [k for k in top if k not in scalar_types]
    if unknown:
        allowed = list(scalar_types) + list(sections)
        raise ConfigError(f"unknown key '{unknown[0]}'{_suggest(unknown[0], allowed)}; allowed: {', '.join(allowed)}")
    top = {k: coerce(v, scalar_types[k], k) for k, v in top.items()}
    if "output_dir" in top and not top["output_dir"].strip():  # e.g. `--output_dir $RUN` with RUN unset
        raise ConfigError("output_dir must not be empty: the run would write its checkpoints into the current "
                          "directory; pass a run directory such as runs/my_run")
    cfg = RunConfig(**top, **built)
    for name in ("student", "teacher", "distill", "finetune"):
        try:
            getattr(cfg, name).validate()
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
    return cfg


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory; pass a YAML file (see configs/ for examples)")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; see configs/ for examples")
    with open(path) as f:
        values = load_yaml_text(f) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(values).__name__}")
    return values


def merge(base: dict, overrides: dict) -> dict:
    """Deep-merge ``overrides`` (dotted keys allowed) into a copy of ``base``."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"cannot set {dotted}: '{p}' is not a section")
        node[leaf] = value
    return out


def all_keys() -> dict[str, Any]:
    """Every configurable dotted key with its type, in declaration order."""
    keys = {}
    sections = _sections()
    for name, hint in field_types(RunConfig).items():
        if name in sections:
            for sub, sub_hint in field_types(sections[name]).items():
                keys[f"{name}.{sub}"] = sub_hint
        else:
            keys[name] = hint
    return keys


def to_dict(cfg: RunConfig) -> dict:
    def plain(v):
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, list):
            return [plain(x) for x in v]
        return v

    return plain(dataclasses.asdict(cfg))


def dump_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
