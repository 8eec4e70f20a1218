"""The data pipeline of distillation runs: :class:`DataConfig`, datasets built from it (Fashion-MNIST from Debian's
idx files, robust ImageFolder trees, a synthetic set; :mod:`vitlinearizer.datasets`), their splits and transforms.

Every dataset yields ``(float tensor (3, H, W), int label)`` and has ``classes`` / ``num_classes``; the holdout
split is carved from the training data so that model selection never looks at the test set."""
from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform

from .datasets import (DEFAULT_FASHION_MNIST_ROOT, EVAL_SPLIT_DIRS, FASHION_MNIST_CLASSES, IMAGEFOLDER_LAYOUT,
                       VERIFY_MODES, DataWarning, FashionMNIST, ImageFolderDataset, SyntheticDataset, VisionDataset,
                       eval_split_dir, fashion_mnist_files, list_classes, read_idx, read_skip_log,
                       show_data_warnings_plainly, split_classes, walk_following_links)
from .images import IMG_EXTENSIONS, check_image_file, load_rgb

# The data pipeline's entry points, and the datasets and image loading it is built from (one import for users).
__all__ = [
    "AUGMENTS", "DATASET_NAMES", "DEFAULT_FASHION_MNIST_ROOT", "EVAL_SPLIT_DIRS", "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_MEAN", "FASHION_MNIST_STD", "IMG_EXTENSIONS", "INTERPOLATIONS", "SPLITS", "VERIFY_MODES",
    "DataConfig", "DataWarning", "FashionMNIST", "ImageFolderDataset", "SyntheticDataset", "VisionDataset",
    "balanced_subset", "build_dataset", "build_transform", "check_data_source", "check_image_file", "dataset_info",
    "load_rgb", "parse_size", "read_idx", "read_skip_log", "resolve_mean_std", "show_data_warnings_plainly",
    "stratified_split", "walk_following_links",
]

# Fashion-MNIST's own pixel statistics (train set), replicated to 3 channels: with ImageNet statistics the black
# background lands at ~-2 and the data mean at ~-0.7; these keep inputs zero-mean, unit-variance for both models.
FASHION_MNIST_MEAN = (0.2860, 0.2860, 0.2860)
FASHION_MNIST_STD = (0.3530, 0.3530, 0.3530)
DATASET_NAMES = ("fashion_mnist", "imagefolder", "synthetic")
AUGMENTS = ("timm", "simple", "none")
# timm's resize interpolations for training and evaluation alike (its train-only "random" would fail the eval
# transform, and an export records one interpolation for eval and predict).
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
SPLITS = ("train", "holdout", "test")


def _is_num(v: Any, kinds: tuple = (int, float, np.integer, np.floating)) -> bool:
    return isinstance(v, kinds) and not isinstance(v, bool)  # YAML `true` must not pass as 1


def _is_int(v: Any, lo: int) -> bool:
    return _is_num(v, (int, np.integer)) and v >= lo


def _nums(v: Any, n: int, lo: float, ints: bool = False) -> bool:
    return isinstance(v, tuple) and len(v) == n and all(_is_int(x, lo) if ints else _is_num(x) and x >= lo for x in v)


@dataclass
class DataConfig:
    name: str = "fashion_mnist"
    root: Optional[str] = None          # None: Debian path for fashion_mnist; required for imagefolder
    img_size: Any = 224                 # int or (H, W)
    mean: Optional[Sequence[float]] = None  # None: per-dataset default (see resolve_mean_std)
    std: Optional[Sequence[float]] = None
    augment: str = "simple"             # "timm" | "simple" | "none"
    auto_augment: Optional[str] = None  # only for augment="timm", e.g. "rand-m9-mstd0.5-inc1"
    re_prob: float = 0.0                # random erasing, only for augment="timm"
    crop_pct: float = 1.0               # eval resize/crop ratio; 1.0 keeps the whole (tiny) image
    interpolation: str = "bicubic"
    holdout_fraction: float = 0.1
    max_train_samples: Optional[int] = None
    max_eval_samples: Optional[int] = None
    num_classes: int = 10               # synthetic only
    synthetic_length: int = 1024        # synthetic only; the test split has the same length
    seed: int = 0
    strict: bool = False
    verify: str = "full"                # imagefolder only: "full" | "header" | "none"

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def from_dict(cls, d: dict) -> "DataConfig":
        known = {f.name for f in fields(cls)}
        if set(d) - known:
            raise ValueError(f"unknown data config key(s) {sorted(set(d) - known)}; allowed: {sorted(known)}")
        return cls(**d)

    def validate(self) -> "DataConfig":
        """Normalise (img_size [H, W] -> tuple, mean/std -> 3-tuples); otherwise ValueError naming the field."""
        if isinstance(self.img_size, list):
            self.img_size = tuple(self.img_size)
        if isinstance(self.img_size, str) and "x" in self.img_size.lower():  # "HxW", as predict and bench take it
            try:
                self.img_size = parse_size(self.img_size)
            except ValueError:
                pass  # reported below with the other checks
        for field in ("mean", "std"):
            v = getattr(self, field)
            if _is_num(v):  # a YAML scalar, as the command line's single value: grey statistics
                v = (v,)
            if isinstance(v, (list, tuple)):  # one value = grey statistics, replicated like the images
                setattr(self, field, tuple(v) * 3 if len(v) == 1 else tuple(v))
        checks = [
            ("name", self.name in DATASET_NAMES, f"must be one of {DATASET_NAMES}"),
            ("img_size", _is_int(self.img_size, 1) or _nums(self.img_size, 2, 1, ints=True),
             "must be a positive int, a pair [H, W] of positive ints or 'HxW'"),
            ("mean", self.mean is None or _nums(self.mean, 3, -np.inf), "must be None or 1 or 3 numbers"),
            ("std", self.std is None or _nums(self.std, 3, 1e-12), "must be None or 1 or 3 numbers > 0"),
            ("augment", self.augment in AUGMENTS, f"must be one of {AUGMENTS}"),
            ("interpolation", self.interpolation in INTERPOLATIONS, f"must be one of {INTERPOLATIONS}"),
            ("verify", self.verify in VERIFY_MODES, f"must be one of {VERIFY_MODES}"),
            ("holdout_fraction", _is_num(self.holdout_fraction) and 0 <= self.holdout_fraction < 1,
             "must be in [0, 1)"),
            ("re_prob", _is_num(self.re_prob) and 0 <= self.re_prob <= 1, "must be in [0, 1]"),
            ("crop_pct", _is_num(self.crop_pct) and 0 < self.crop_pct <= 1, "must be in (0, 1]"),
            ("max_train_samples", self.max_train_samples is None or _is_int(self.max_train_samples, 1), "must be >= 1"),
            ("max_eval_samples", self.max_eval_samples is None or _is_int(self.max_eval_samples, 1), "must be >= 1"),
            ("num_classes", _is_int(self.num_classes, 2), "must be an int >= 2"),
            ("synthetic_length", _is_int(self.synthetic_length, 1), "must be a positive int"),
            ("seed", _is_int(self.seed, 0), "must be a non-negative int"),
            ("root", self.name != "imagefolder" or bool(self.root),
             f"is required for imagefolder: pass data.root pointing at {IMAGEFOLDER_LAYOUT}"),
        ]
        for field, ok, rule in checks:
            if not ok:
                raise ValueError(f"data.{field} {rule}, got {getattr(self, field)!r}")
        return self


def _rank_order(targets: np.ndarray, rng: np.random.Generator, proportional: bool) -> np.ndarray:
    """A seeded order over samples that interleaves classes: any prefix is stratified (proportional=True,
    each class at its own rate) or balanced (equal counts per class while every class still has samples)."""
    key = np.empty(len(targets))
    for c in np.unique(targets):
        idx = np.flatnonzero(targets == c)
        rank = rng.permutation(len(idx)).astype(np.float64)
        key[idx] = (rank + 0.5) / len(idx) if proportional else rank
    return np.lexsort((rng.random(len(targets)), key))


def stratified_split(targets: Sequence[int], fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (keep, holdout) positions; holdout is ``round(fraction * n)`` samples spread over classes, at least
    one when ``fraction > 0`` and never all (on a tiny set that one may be a class's only image)."""
    n = len(targets)
    n_hold = min(n - 1, max(1, round(fraction * n))) if fraction > 0 and n > 1 else 0
    order = _rank_order(np.asarray(targets), np.random.default_rng([seed, 1]), proportional=True)
    return np.sort(order[n_hold:]), np.sort(order[:n_hold])


def balanced_subset(targets: Sequence[int], n: int, seed: int) -> np.ndarray:
    """Sorted positions of ``min(n, len)`` samples, as equal per class as the class sizes allow."""
    return np.sort(_rank_order(np.asarray(targets), np.random.default_rng([seed, 2]), proportional=False)[:n])


def resolve_mean_std(cfg: DataConfig) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """cfg.mean/std, else Fashion-MNIST's own statistics for fashion_mnist and ImageNet's for the rest."""
    fm = cfg.name == "fashion_mnist"
    mean = cfg.mean or (FASHION_MNIST_MEAN if fm else IMAGENET_DEFAULT_MEAN)
    return tuple(mean), tuple(cfg.std or (FASHION_MNIST_STD if fm else IMAGENET_DEFAULT_STD))


def build_transform(cfg: DataConfig, train: bool) -> Callable:
    """timm transform: PIL RGB -> normalised float tensor (3, H, W) at ``cfg.img_size``."""
    mean, std = resolve_mean_std(cfg)
    common = dict(input_size=cfg.img_size, interpolation=cfg.interpolation, mean=mean, std=std)
    if not train or cfg.augment == "none":
        return create_transform(is_training=False, crop_pct=cfg.crop_pct, **common)
    if cfg.augment == "simple":
        # timm's default crop scale (0.08, 1) leaves a few pixels of a 28-px image; (0.6, 1) keeps the object.
        return create_transform(is_training=True, scale=(0.6, 1.0), hflip=0.5, color_jitter=None, **common)
    return create_transform(is_training=True, auto_augment=cfg.auto_augment, re_prob=cfg.re_prob, **common)


def _source(cfg: DataConfig, test: bool, classes: Optional[Sequence[str]] = None) -> VisionDataset:
    if cfg.name == "fashion_mnist":
        return FashionMNIST(cfg.root or DEFAULT_FASHION_MNIST_ROOT, "test" if test else "train")
    if cfg.name == "synthetic":
        return SyntheticDataset(cfg.num_classes, cfg.synthetic_length, cfg.img_size, cfg.seed, stream=int(test))
    if classes is None:
        classes = list_classes(Path(cfg.root) / "train")
    return ImageFolderDataset(cfg.root, eval_split_dir(cfg.root) if test else "train", class_names=classes,
                              verify=cfg.verify, strict=cfg.strict)


def _check_split(cfg: DataConfig, split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if split == "holdout" and cfg.holdout_fraction == 0:
        raise ValueError("split 'holdout' needs data.holdout_fraction > 0 (it is 0)")


def check_data_source(cfg: DataConfig, splits: Sequence[str] = ("train", "test")) -> None:
    """Raises now what :func:`build_dataset` would raise later for a missing data folder or file of ``splits``,
    so that a run can fail before training rather than lose its result at the final evaluation.

    Only folders and file names are looked at (an ImageFolder split's class folders included): no image is
    opened or counted, so undecodable files are still found (and skipped) by ``build_dataset`` alone.

    Raises:
        FileNotFoundError: Missing Fashion-MNIST files, ``root/train/``, or all of ``root/{val,validation,test}/``.
        ValueError: A bad config or split, a train/ without class folders, or an evaluation folder with a class
            folder that train/ lacks and that holds image files (an empty one is ignored, see ImageFolderDataset).
    """
    for split in splits:
        _check_split(cfg, split)
    cfg.validate()
    if cfg.name == "fashion_mnist":
        for split in sorted({"test" if s == "test" else "train" for s in splits}):
            fashion_mnist_files(os.path.abspath(cfg.root or DEFAULT_FASHION_MNIST_ROOT), split)
    elif cfg.name == "imagefolder":
        train_dir = Path(cfg.root) / "train"
        classes = list_classes(train_dir)  # the label mapping of every split, so needed even for "test" alone
        if not classes:
            raise ValueError(f"{train_dir} has no class folders: put each class's images in train/<class>/")
        if "test" in splits:
            split_classes(Path(cfg.root) / eval_split_dir(cfg.root), classes)


def build_dataset(cfg: DataConfig, split: str, *, classes: Optional[Sequence[str]] = None) -> VisionDataset:
    """Dataset for ``split``: "train" (augmented, minus holdout), "holdout" (seeded stratified
    ``holdout_fraction`` of the training set) or "test" (Fashion-MNIST t10k; ImageFolder's first of ``val/``,
    ``validation/``, ``test/``; synthetic stream 1); capped by ``max_train_samples`` / ``max_eval_samples`` with
    class-balanced subsets. :func:`check_data_source` finds missing folders without building anything.

    ``classes`` (ImageFolder only): the class names in label order instead of ``train/``'s class folders, e.g. an
    exported model's, to evaluate it on a tree without ``train/``; a class folder not among them is an error."""
    _check_split(cfg, split)
    cfg.validate()
    ds = _source(cfg, test=split == "test", classes=classes)
    if split != "test":
        listing = ds.listing_fingerprint() if cfg.holdout_fraction > 0 else None
        keep, hold = stratified_split(ds.targets, cfg.holdout_fraction, cfg.seed)
        ds = ds.subset(keep if split == "train" else hold)
        ds.split_from = listing
    cap = cfg.max_train_samples if split == "train" else cfg.max_eval_samples
    if cap is not None and cap < len(ds):
        ds = ds.subset(balanced_subset(ds.targets, cap, cfg.seed))
    ds.transform = build_transform(cfg, train=split == "train")
    return ds


def dataset_info(cfg: DataConfig) -> dict:
    """num_classes, class_names, mean, std without building (or scanning) the dataset."""
    cfg.validate()
    names = (list(FASHION_MNIST_CLASSES) if cfg.name == "fashion_mnist" else list_classes(Path(cfg.root) / "train")
             if cfg.name == "imagefolder" else [f"class_{c}" for c in range(cfg.num_classes)])
    mean, std = resolve_mean_std(cfg)
    return dict(num_classes=len(names), class_names=names, mean=mean, std=std)


def parse_size(text) -> tuple[int, int]:
    """'1024' -> (1024, 1024); '1024x2048' -> (1024, 2048) (height x width)."""
    if isinstance(text, (tuple, list)):
        return int(text[0]), int(text[1])
    parts = str(text).lower().split("x")
    try:
        dims = [int(p) for p in parts]
    except ValueError:
        dims = []
    if len(dims) not in (1, 2) or min(dims) < 1:
        raise ValueError(f"size must be S or HxW with positive integers, got {text!r}")
    return (dims[0], dims[0]) if len(dims) == 1 else (dims[0], dims[1])
