"""The datasets behind :mod:`vitlinearizer.data`: Fashion-MNIST from Debian's idx files, robust ImageFolder trees
and a synthetic set, on one base (:class:`VisionDataset`) whose splits and subsets are cheap copies.

Every dataset yields ``(float tensor (3, H, W), int label)`` and has ``classes`` / ``num_classes``. Build them with
:func:`vitlinearizer.data.build_dataset`, which also draws the holdout split and applies the transforms."""
from __future__ import annotations

import abc
import copy
import gzip
import hashlib
import json
import os
import struct
import unicodedata
import warnings
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms.functional import pil_to_tensor

from .images import IMG_EXTENSIONS, check_image_file, load_rgb

DEFAULT_FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
VERIFY_MODES = ("full", "header", "none")
EVAL_SPLIT_DIRS = ("val", "validation", "test")  # ImageFolder's test split: the first of these that exists
IMAGEFOLDER_LAYOUT = "a folder with train/ and val/ (or validation/ or test/)"
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


def fashion_mnist_files(root: str, split: str) -> tuple[str, str]:
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
    img_path, lbl_path = fashion_mnist_files(root, split)
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


def list_classes(split_dir: Path) -> list[str]:
    if not split_dir.is_dir():
        raise FileNotFoundError(f"{split_dir} not found: pass data.root pointing at {IMAGEFOLDER_LAYOUT}")
    # Hidden folders (.ipynb_checkpoints, .git) are never classes.
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _is_image_name(name: str) -> bool:
    """Whether ImageFolderDataset takes a file of this name as an image (it is only decoded later)."""
    return name.lower().endswith(IMG_EXTENSIONS) and not name.startswith(".")


def _holds_image_files(folder: Path) -> bool:
    """Whether any file under ``folder`` has an image name; stops at the first (no image is opened)."""
    return any(_is_image_name(f) for _, filenames in walk_following_links(folder) for f in filenames)


def split_classes(split_dir: Path, class_names: Optional[Sequence[str]]
                   ) -> tuple[list[str], list[str], list[str]]:
    """(classes in label order, those without a folder in ``split_dir``, folders of no class that hold no image
    files and are ignored); ValueError for a folder of no class that holds image files. See ImageFolderDataset
    for the rule. Only the folders of no class are listed (there are rarely any), and no image is opened."""
    present = list_classes(split_dir)
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


def eval_split_dir(root: str | os.PathLike) -> str:
    """Name of ImageFolder's test split under ``root``: the first of EVAL_SPLIT_DIRS that exists."""
    found = next((d for d in EVAL_SPLIT_DIRS if (Path(root) / d).is_dir()), None)
    if found is None:
        looked = ", ".join(d + "/" for d in EVAL_SPLIT_DIRS)
        raise FileNotFoundError(f"no evaluation folder in {root}: looked for {looked} (the first found is used); "
                                f"add one, or pass data.root pointing at {IMAGEFOLDER_LAYOUT}")
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

    Class folders, empty ones included: the classes are ``class_names`` (by default, and as
    :func:`vitlinearizer.data.build_dataset` passes them, ``train/``'s class folders in sorted order, hidden ones
    excepted), whatever the folders hold. This list is read without opening an image (``dataset_info``,
    ``check_data_source``), sizes the model's head and is recorded in exports and compared with a logit teacher's,
    so it cannot depend on which images decode:

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
        classes, missing, no_class = split_classes(self.split_dir, class_names)
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
