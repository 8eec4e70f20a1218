"""Datasets for distillation runs: Fashion-MNIST (Debian idx files), robust ImageFolder trees and a synthetic set.

Every dataset yields ``(float tensor (3, H, W), int label)`` and has ``classes`` / ``num_classes``; the holdout
split is carved from the training data so that model selection never looks at the test set."""
from __future__ import annotations

import abc
import copy
import gzip
import hashlib
import json
import os
import struct
import warnings
import unicodedata
import zlib
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from torch.utils.data import Dataset
from torchvision.transforms.functional import pil_to_tensor

from .images import IMG_EXTENSIONS, check_image_file, load_rgb

DEFAULT_FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
# Fashion-MNIST's own pixel statistics (train set), replicated to 3 channels: with ImageNet statistics the black
# background lands at ~-2 and the data mean at ~-0.7; these keep inputs zero-mean, unit-variance for both models.
FASHION_MNIST_MEAN = (0.2860, 0.2860, 0.2860)
FASHION_MNIST_STD = (0.3530, 0.3530, 0.3530)
DATASET_NAMES = ("fashion_mnist", "imagefolder", "synthetic")
AUGMENTS = ("timm", "simple", "none")
VERIFY_MODES = ("full", "header", "none")
# timm's resize interpolations for training and evaluation alike (its train-only "random" would fail the eval
# transform, and an export records one interpolation for eval and predict).
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
SPLITS = ("train", "holdout", "test")
EVAL_SPLIT_DIRS = ("val", "validation", "test")  # ImageFolder's test split: the first of these that exists
_LAYOUT = "a folder with train/ and val/ (or validation/ or test/)"
_FMNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                 "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


class DataWarning(UserWarning):
    """Data problems that do not stop a run (skipped files, empty classes); filterable as one category."""


def show_data_warnings_plainly() -> None:
    """Print DataWarnings as their message alone; every other warning keeps its format. The CLI installs this:
    data warnings are about the user's files, yet from the CLI the only frame they can point to is inside this
    library, so the default "file:line + source line" reads like a library bug."""
    previous = warnings.formatwarning
    if getattr(previous, "_plain_data_warnings", False):
        return

    def formatwarning(message, category, filename, lineno, line=None) -> str:
        if issubclass(category, DataWarning):
            return f"{category.__name__}: {message}\n"
        return previous(message, category, filename, lineno, line)

    formatwarning._plain_data_warnings = True
    warnings.formatwarning = formatwarning


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
             f"is required for imagefolder: pass data.root pointing at {_LAYOUT}"),
        ]
        for field, ok, rule in checks:
            if not ok:
                raise ValueError(f"data.{field} {rule}, got {getattr(self, field)!r}")
        return self


class VisionDataset(Dataset, abc.ABC):
    """A list of (key, label) pairs plus a loader; splits and subsets are cheap copies with fewer keys."""

    def __init__(self, keys: Sequence, targets: Sequence[int], classes: Sequence[str],
                 transform: Callable | None = None):
        self.keys, self.targets = np.asarray(keys), np.asarray(targets, dtype=np.int64)
        self.classes, self.transform = list(classes), transform
        self.skipped: list[tuple[str, str]] = []  # (path, reason); only ImageFolder ever fills it
        # A JSON-lines file that runtime skips are appended to as well: a DataLoader worker's ``skipped`` dies with
        # the worker, the file is how the main process learns of them (``read_skip_log``).
        self.skip_log: Optional[Path] = None
        # A sample that fails to load is replaced by the next one that loads: training keeps its batch size and
        # does not die mid-epoch. Evaluation sets False: a failed sample then comes back as None and is left out,
        # since a replacement would be scored twice.
        self.replace_failed = True
        # Of the train and holdout splits: the training listing they were drawn from (see listing_fingerprint).
        self.split_from: Optional[dict] = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.targets)

    @abc.abstractmethod
    def load(self, i: int) -> Image.Image:
        """RGB PIL image of sample ``i``, before transforms."""

    def _finish(self, img: Image.Image, i: int):
        x = self.transform(img) if self.transform is not None else pil_to_tensor(img).float().div_(255)
        return x, int(self.targets[i])

    def __getitem__(self, index: int):
        i = range(len(self))[index]  # negative indices and IndexError as for a list
        return self._finish(self.load(i), i)

    def subset(self, positions: Sequence[int]) -> "VisionDataset":
        """Shallow copy holding only ``positions`` (indices into this dataset); image arrays are shared."""
        new, positions = copy.copy(self), np.asarray(positions, dtype=np.int64)
        new.keys, new.targets = self.keys[positions], self.targets[positions]
        new.skipped = list(self.skipped)  # later runtime skips are recorded per split
        return new

    def _key_name(self, key) -> str:
        return str(key)

    def listing_fingerprint(self) -> dict:
        """``{"files", "digest"}`` of the (key, label) list. The holdout split is a seeded draw from this list, so
        the same seed draws the same images only from the same list: an export records it, and ``eval --split
        holdout`` checks that the data still gives it."""
        listing = "".join(f"{self._key_name(key)}\t{target}\n" for key, target in zip(self.keys, self.targets.tolist()))
        # surrogateescape: a file name that is not UTF-8 (Latin-1 from an old archive) arrives with surrogates.
        digest = hashlib.sha256(listing.encode("utf-8", "surrogateescape")).hexdigest()[:16]
        return {"files": len(self), "digest": digest}

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.targets, minlength=self.num_classes)

    def _record_skip(self, path: str, reason: str) -> None:
        self.skipped.append((path, reason))
        if self.skip_log is not None:
            self.skip_log.parent.mkdir(parents=True, exist_ok=True)
            # One short line per write in append mode: lines from concurrent workers do not interleave.
            with open(self.skip_log, "a", encoding="utf-8") as f:
                f.write(json.dumps({"path": path, "reason": reason}) + "\n")


def read_skip_log(path: str | os.PathLike) -> list[tuple[str, str]]:
    """The (path, reason) pairs a ``skip_log`` file holds, first occurrence of each path only (every worker, and
    every epoch of a resumed run, may log the same file again); [] when nothing was skipped."""
    if not Path(path).is_file():
        return []
    entries: dict[str, str] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill; the file is a record, not a result
            continue
        entries.setdefault(record["path"], record["reason"])
    return list(entries.items())


def read_idx(path: str | os.PathLike, expected_ndim: int) -> np.ndarray:
    """Decode one (optionally gzipped) idx file of unsigned bytes; ValueError naming the file if corrupt."""
    path = str(path)
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            data = f.read()
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise ValueError(f"{path}: corrupt idx file ({e}); reinstall dataset-fashion-mnist") from e
    head = 4 + 4 * expected_ndim
    magic = 0x0800 | expected_ndim  # two zero bytes, dtype 0x08 = ubyte, number of dims
    if len(data) < head or struct.unpack(">I", data[:4])[0] != magic:
        raise ValueError(f"{path}: bad idx magic number {data[:4].hex()!r}, expected {magic:08x}; the file is corrupt")
    dims = struct.unpack(f">{expected_ndim}I", data[4:head])
    if len(data) - head != int(np.prod(dims)):
        raise ValueError(f"{path}: idx header says {dims} but holds {len(data) - head} bytes; file truncated?")
    return np.frombuffer(data, dtype=np.uint8, offset=head).reshape(dims)


def _fmnist_files(root: str, split: str) -> tuple[str, str]:
    """(images, labels) paths of ``split`` in ``root``; FileNotFoundError saying how to install them."""
    stems = _FMNIST_FILES[split]  # gzipped as Debian ships them, or already gunzipped
    found = [next((p for p in (os.path.join(root, s + ".gz"), os.path.join(root, s)) if os.path.isfile(p)), None)
             for s in stems]
    if None in found:
        missing = [s + ".gz" for s, p in zip(stems, found) if p is None]
        if any(os.path.isdir(os.path.join(root, d)) for d in ("train", *EVAL_SPLIT_DIRS)):
            raise FileNotFoundError(f"data.name is fashion_mnist (the default) but {root!r} looks like an ImageFolder "
                                    "tree (it has train/ or val/): pass --data.name imagefolder")
        raise FileNotFoundError(
            f"Fashion-MNIST files not found in {root!r} (missing: {', '.join(missing)}). Install them with "
            f"`sudo apt-get install dataset-fashion-mnist` (puts them in {DEFAULT_FASHION_MNIST_ROOT}), "
            f"or pass a different data root (data.root) holding {{train,t10k}}-{{images-idx3,labels-idx1}}-ubyte.gz.")
    return found[0], found[1]


@lru_cache(maxsize=4)
def _load_fmnist_arrays(root: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    # Cached so that train, holdout and test builds decode each file once per process (~50 MB in total).
    img_path, lbl_path = _fmnist_files(root, split)
    images, labels = read_idx(img_path, 3), read_idx(lbl_path, 1)
    if len(images) != len(labels) or labels.max(initial=0) >= len(FASHION_MNIST_CLASSES):
        raise ValueError(f"{img_path} / {lbl_path}: {len(images)} images vs {len(labels)} labels, "
                         f"max label {labels.max(initial=0)}; the files are corrupt or mismatched")
    return images, labels


class FashionMNIST(VisionDataset):
    def __init__(self, root: str = DEFAULT_FASHION_MNIST_ROOT, split: str = "train", transform: Callable | None = None):
        if split not in _FMNIST_FILES:
            raise ValueError(f"FashionMNIST split must be 'train' or 'test', got {split!r}")
        self.images, labels = _load_fmnist_arrays(os.path.abspath(root), split)
        super().__init__(np.arange(len(labels)), labels, FASHION_MNIST_CLASSES, transform)

    def load(self, i: int) -> Image.Image:
        return Image.fromarray(self.images[self.keys[i]]).convert("RGB")


class SyntheticDataset(VisionDataset):
    """Seeded images whose class sets a grating's orientation/frequency and a colour tint, plus noise.

    Sample ``k`` of ``stream`` is generated from ``(seed, stream, k)`` alone, so any subset is reproducible
    without storing images; label = k % num_classes (balanced). Another ``stream`` gives a disjoint test set."""

    def __init__(self, num_classes: int = 10, length: int = 1024, img_size: Any = 32, seed: int = 0,
                 stream: int = 0, transform: Optional[Callable] = None):
        keys = np.arange(length)
        super().__init__(keys, keys % num_classes, [f"class_{c}" for c in range(num_classes)], transform)
        self.size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.seed, self.stream = seed, stream

    def load(self, i: int) -> Image.Image:
        k, c, n = int(self.keys[i]), int(self.targets[i]), self.num_classes
        rng = np.random.default_rng([self.seed, self.stream, k])
        h, w = self.size
        yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
        n_angles = min(n, 8)  # orientations stay >= 22.5 degrees apart; frequency separates further classes
        angle = np.pi * (c % n_angles) / n_angles + rng.normal(0, 0.05)
        freq = 2.0 + 1.5 * ((c // n_angles) % 4)
        wave = np.sin(2 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle)) + rng.uniform(0, 2 * np.pi))
        tint = 0.5 + 0.35 * np.cos(2 * np.pi * c / n + np.array([0.0, 2.094, 4.189]))  # class colour wheel
        img = tint * (0.55 + 0.35 * wave[..., None]) + rng.normal(0, 0.08, (h, w, 3))
        return Image.fromarray((np.clip(img, 0, 1) * 255).round().astype(np.uint8))


def _list_classes(split_dir: Path) -> list[str]:
    if not split_dir.is_dir():
        raise FileNotFoundError(f"{split_dir} not found: pass data.root pointing at {_LAYOUT}")
    # Hidden folders (.ipynb_checkpoints, .git) are never classes.
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _is_image_name(name: str) -> bool:
    """Whether ImageFolderDataset takes a file of this name as an image (it is only decoded later)."""
    return name.lower().endswith(IMG_EXTENSIONS) and not name.startswith(".")


def _holds_image_files(folder: Path) -> bool:
    """Whether any file under ``folder`` has an image name; stops at the first (no image is opened)."""
    return any(_is_image_name(f) for _, filenames in walk_following_links(folder) for f in filenames)


def _split_classes(split_dir: Path, class_names: Optional[Sequence[str]]
                   ) -> tuple[list[str], list[str], list[str]]:
    """(classes in label order, those without a folder in ``split_dir``, folders of no class that hold no image
    files and are ignored); ValueError for a folder of no class that holds image files. See ImageFolderDataset
    for the rule. Only the folders of no class are listed (there are rarely any), and no image is opened."""
    present = _list_classes(split_dir)
    classes = list(class_names) if class_names is not None else present
    extra = sorted(set(present) - set(classes))
    ignored = [u for u in extra if not _holds_image_files(split_dir / u)]  # contributes no sample: harmless
    unknown = [u for u in extra if u not in ignored]
    if unknown:
        # Whether the classes are train/'s or an exported model's, they are the ones a model is trained on.
        composed = {unicodedata.normalize("NFC", c): c for c in classes}
        same = [f"{u!r} is {composed[unicodedata.normalize('NFC', u)]!r} in other Unicode code points (macOS writes "
                "accents decomposed); rename one of the two folders" for u in unknown
                if unicodedata.normalize("NFC", u) in composed]
        raise ValueError(f"{split_dir} has class folder(s) the model was not trained on: {unknown}; the model's "
                         f"classes are {classes}" + (f". {'; '.join(same)}" if same else ""))
    return classes, sorted(set(classes) - set(present)), ignored


def _eval_split_dir(root: str | os.PathLike) -> str:
    """Name of ImageFolder's test split under ``root``: the first of EVAL_SPLIT_DIRS that exists."""
    found = next((d for d in EVAL_SPLIT_DIRS if (Path(root) / d).is_dir()), None)
    if found is None:
        looked = ", ".join(d + "/" for d in EVAL_SPLIT_DIRS)
        raise FileNotFoundError(f"no evaluation folder in {root}: looked for {looked} (the first found is used); "
                                f"add one, or pass data.root pointing at {_LAYOUT}")
    return found


def walk_following_links(class_dir: Path) -> Iterator[tuple[str, list[str]]]:
    """(dirpath, sorted file names) under ``class_dir``, following symlinks (datasets are often symlink farms) but
    entering each real directory once and never one that contains ``class_dir``: a link loop (``a/loop -> ..``)
    would otherwise list images again and again, and pull in the other classes' images under this label."""
    top = os.path.realpath(class_dir)
    seen = {top}
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        keep = []
        for d in sorted(d for d in dirnames if not d.startswith(".")):
            real = os.path.realpath(os.path.join(dirpath, d))
            if real not in seen and os.path.commonpath([real, top]) != real:
                seen.add(real)
                keep.append(d)
        dirnames[:] = keep
        yield dirpath, sorted(filenames)


class ImageFolderDataset(VisionDataset):
    """``root/<split>/<class>/**/<image>``; undecodable files are dropped at construction into ``skipped``.

    Class folders, empty ones included: the classes are ``class_names`` (by default, and as :func:`build_dataset`
    passes them, ``train/``'s class folders in sorted order, hidden ones excepted), whatever the folders hold.
    This list is read without opening an image (``dataset_info``, ``check_data_source``), sizes the model's head
    and is recorded in exports and compared with a logit teacher's, so it cannot depend on which images decode:

    - a class folder with no usable image (none, or only undecodable files) keeps its class and label index, with
      a DataWarning. In ``train/`` that gives the model an output for a class it never sees an example of: delete
      the folder (or add images). In an evaluation split the class is simply not scored.
    - a split may lack a class folder (DataWarning), which is the same as an empty one.
    - a folder that is not among the classes is ignored, with a DataWarning, when it holds no image files (no
      file with an image extension; other files do not count); when it holds image files it is an error (ValueError
      naming it): those images would be scored against classes the model has no output for.

    verify: "full" decodes every image once (~1 ms per small image, about a minute per 20k ImageNet-size JPEGs
    on one core; cached per file), "header" only parses headers, "none" trusts the tree. A file that still fails
    in ``__getitem__`` is replaced by the next sample and appended to ``skipped`` (in the worker process that
    hit it) and to ``skip_log`` when set. ``class_names`` (the train folder's classes) fixes the label mapping for val."""

    def __init__(self, root: str | os.PathLike, split: str = "train", transform: Optional[Callable] = None, *,
                 class_names: Optional[Sequence[str]] = None, verify: str = "full", strict: bool = False):
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
        self.root, self.split_dir = Path(root), Path(root) / split
        classes, missing, no_class = _split_classes(self.split_dir, class_names)
        if missing:
            warnings.warn(f"{self.split_dir} lacks class folder(s) {missing}", DataWarning, stacklevel=2)
        if no_class:
            warnings.warn(f"{self.split_dir}: ignoring folder(s) {no_class}: they hold no images and are not among "
                          f"the model's classes {classes}; delete them to silence this", DataWarning, stacklevel=2)
        candidates, ignored = [], []
        for label, name in enumerate(classes):
            for dirpath, filenames in walk_following_links(self.split_dir / name):
                for f in filenames:
                    path = os.path.join(dirpath, f)
                    ok = _is_image_name(f)
                    (candidates.append((path, label)) if ok else ignored.append(path))
        ignored += [str(p) for p in self.split_dir.iterdir() if p.is_file()]  # loose files outside class dirs
        skipped, samples = [], []
        for path, label in candidates:
            reason = check_image_file(path, verify)
            (samples.append((path, label)) if reason is None else skipped.append((path, reason)))
        if skipped:
            msg = f"{len(skipped)} unreadable file(s) in {self.split_dir} (at most 50 listed):\n" + "\n".join(
                f"  {p}: {r}" for p, r in skipped[:50])
            if strict:
                raise ValueError(f"{msg}\n(data.strict=true makes unreadable files an error; with data.strict=false "
                                 "(--data.strict false) they are skipped with a warning)")
            warnings.warn(msg + "\n(skipped; set data.strict=true (--data.strict true) to make this an error)",
                          DataWarning, stacklevel=2)
        if not samples:
            raise ValueError(f"no decodable images ({', '.join(IMG_EXTENSIONS)}) in {self.split_dir}'s class folders")
        super().__init__(np.array([p for p, _ in samples], dtype=object), [l for _, l in samples],
                         classes, transform)
        self.skipped = skipped
        empty = [c for c, n in zip(classes, self.class_counts()) if n == 0 and c not in missing]
        if empty and split == "train":
            warnings.warn(f"{self.split_dir}: class folder(s) {empty} hold no usable images but still count as "
                          f"classes (the classes are train/'s folders: {classes}), so the model gets an output for a "
                          f"class it never sees an example of; delete the folder(s), or add images, and rerun",
                          DataWarning, 2)
        elif empty:
            warnings.warn(f"{self.split_dir}: class folder(s) {empty} hold no usable images; those classes are not "
                          "scored", DataWarning, 2)
        self.report = dict(found=len(candidates), valid=len(samples), skipped=len(skipped), ignored=len(ignored),
                           ignored_examples=ignored[:10], empty_classes=empty, missing_classes=missing, verify=verify)
        self._bad: set[str] = set()

    @property
    def samples(self) -> list[tuple[str, int]]:
        return [(str(p), int(t)) for p, t in zip(self.keys, self.targets)]

    def _key_name(self, key) -> str:  # relative: a tree copied elsewhere is the same listing
        return Path(os.path.relpath(str(key), self.split_dir)).as_posix()

    def load(self, i: int) -> Image.Image:
        return load_rgb(self.keys[i])

    def __getitem__(self, index: int):
        start, n = range(len(self))[index], len(self)
        for step in range(n if self.replace_failed else 1):
            i = (start + step) % n  # deterministic replacement: the next sample that decodes
            path = str(self.keys[i])
            if path in self._bad:
                continue
            try:
                img = self.load(i)
            except Exception as e:  # the run must not die mid-epoch over one file
                self._bad.add(path)
                self._record_skip(path, f"{type(e).__name__}: {e}")
                instead = "using the next sample" if self.replace_failed else "left out"
                warnings.warn(f"could not decode {path} ({type(e).__name__}: {e}); {instead}", DataWarning,
                              stacklevel=2)
                continue
            return self._finish(img, i)
        if not self.replace_failed:
            return None
        raise RuntimeError(f"no sample of {self.split_dir} could be decoded; see .skipped")


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
        classes = _list_classes(Path(cfg.root) / "train")
    return ImageFolderDataset(cfg.root, _eval_split_dir(cfg.root) if test else "train", class_names=classes,
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
            _fmnist_files(os.path.abspath(cfg.root or DEFAULT_FASHION_MNIST_ROOT), split)
    elif cfg.name == "imagefolder":
        train_dir = Path(cfg.root) / "train"
        classes = _list_classes(train_dir)  # the label mapping of every split, so needed even for "test" alone
        if not classes:
            raise ValueError(f"{train_dir} has no class folders: put each class's images in train/<class>/")
        if "test" in splits:
            _split_classes(Path(cfg.root) / _eval_split_dir(cfg.root), classes)


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
    names = (list(FASHION_MNIST_CLASSES) if cfg.name == "fashion_mnist" else _list_classes(Path(cfg.root) / "train")
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
