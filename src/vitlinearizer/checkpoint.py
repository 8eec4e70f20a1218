"""Crash-safe training checkpoints, student export, and what makes a resume exact.

A checkpoint is a directory ``<root>/step_{step:08d}/`` holding

* ``model.safetensors`` - the task state dict minus frozen prefixes (e.g. the teacher),
* ``ema.safetensors``   - the EMA copy of the student (only when EMA is on),
* ``state.pt``          - optimizer, scheduler, position, config and RNG states, loadable
  with ``torch.load(weights_only=True)``,
* ``manifest.json``     - the size and CRC-32 of each of the files above, checked on load: damaged
  bytes that still parse (safetensors and torch check no checksum) would otherwise be resumed from.

Directories are written under a hidden temporary name in the same parent, every file is
fsynced, and only then renamed into place, so a directory named ``step_*`` is always
complete unless the disk itself damaged it afterwards (which the manifest reveals).
``<root>/latest`` names the newest one (for humans and shell tools); the loader scans the
directories instead of trusting it, because a crash between the two renames would leave
``latest`` one checkpoint behind.

The other half of exact resumption (RNG state, and a data order and per-sample augmentation
randomness that depend only on the checkpointed position) is in :mod:`vitlinearizer.seeding`.
"""
from __future__ import annotations

import errno
import io
import json
import os
import re
import shutil
import tempfile
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union

import safetensors.torch
import torch
from torch import nn

__all__ = [
    "MODEL_FILE", "EMA_FILE", "STATE_FILE", "MANIFEST_FILE", "LATEST_FILE", "Checkpoint", "CheckpointError",
    "CheckpointNoSpaceError", "module_state_for_checkpoint", "save_checkpoint", "list_checkpoints",
    "load_checkpoint", "load_latest_checkpoint", "export_student", "export_model",
    "read_export_metadata", "pretrained_cfg_overlay", "update_pretrained_cfg", "write_text_atomic",
    "check_output_dir", "check_writable", "save_training_checkpoint", "restore_training_state", "write_bytes_atomic",
    "fsync_path",
]

MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
STATE_FILE = "state.pt"
MANIFEST_FILE = "manifest.json"
LATEST_FILE = "latest"
_STEP_DIR = re.compile(r"^step_(\d{8,})$")
_TMP_PREFIX = ".tmp-"

PathLike = Union[str, os.PathLike]


class CheckpointError(RuntimeError):
    """A checkpoint directory is missing files or holds unreadable data."""


class CheckpointNoSpaceError(OSError):
    """The disk filled up while writing a checkpoint; ``errno`` is ``ENOSPC``."""


@dataclass
class Checkpoint:
    """A verified, fully loaded checkpoint.

    Attributes:
        path: The checkpoint directory.
        step: Global optimisation step it was taken after.
        model: Task state dict (frozen prefixes absent), CPU tensors.
        ema: EMA student state dict, or None when EMA was off.
        state: Everything from ``state.pt`` (optimizer, scheduler, position, config, RNG).
    """

    path: Path
    step: int
    model: dict[str, torch.Tensor]
    ema: Optional[dict[str, torch.Tensor]]
    state: dict[str, Any]


# --------------------------------------------------------------------------- writing


def _write_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and fsync it. The single choke point for checkpoint bytes
    (tests patch it to simulate a full disk)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_path(path: Path) -> None:
    """Flush a file, or a directory's entries, to the disk: a rename is only durable once the directory entry
    itself reaches it."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # missing, or a filesystem / platform that cannot open or fsync directories
        pass


def module_state_for_checkpoint(module: nn.Module, frozen_prefixes: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """Return a safetensors-ready copy of ``module.state_dict()``.

    Entries whose name starts with any of ``frozen_prefixes`` are dropped. Every tensor is
    copied to CPU into its own contiguous storage, because safetensors refuses tied
    (shared) or strided tensors and the copy also decouples the file from ongoing training.
    """
    prefixes = tuple(frozen_prefixes)
    return {name: t.detach().to("cpu", copy=True).contiguous()
            for name, t in module.state_dict().items() if not name.startswith(prefixes)}


def _safetensors_bytes(tensors: Mapping[str, torch.Tensor], metadata: Optional[Mapping[str, str]] = None) -> bytes:
    # "format: pt" is what timm/transformers loaders look for in the metadata.
    data = safetensors.torch.save(dict(tensors), metadata={"format": "pt", **(metadata or {})})
    # safetensors writes its metadata from a Rust HashMap, in an order that changes from call to call: with more
    # than one entry, the same weights would give other bytes in each run (and an exact resume a different file).
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    if len(header.get("__metadata__") or {}) < 2:
        return data
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # the tensor bytes that follow stay 8-byte aligned, as safetensors writes them
    return len(text).to_bytes(8, "little") + text + data[8 + n:]


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _write_recorded(path: Path, data: bytes, manifest: dict) -> None:
    """Write one checkpoint file and record its size and checksum. CRC-32, not a cryptographic hash: accidental
    damage is what it must reveal (untrusted files are handled by safetensors and weights_only), and for a
    100M-parameter model it costs ~0.15 s to save and ~0.3 s to check, less than sha256, which is several times
    slower on CPUs without SHA instructions."""
    _write_file(path, data)
    manifest[path.name] = {"bytes": len(data), "crc32": zlib.crc32(data)}


def list_checkpoints(root: PathLike) -> list[Path]:
    """Checkpoint directories under ``root``, oldest first; crash leftovers (temp dirs) are ignored."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def _replace_file(path: Path, data: bytes) -> None:
    # Readers see the old or the new content, never a partial file.
    tmp = path.with_name(f"{_TMP_PREFIX}{path.name}-{os.getpid()}")
    try:
        _write_file(tmp, data)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def write_text_atomic(path: PathLike, text: str) -> None:
    """Atomically replace the text file ``path`` (tmp file, fsync, rename)."""
    _replace_file(Path(path), text.encode())


def check_output_dir(path: PathLike, flag: str) -> None:
    """ValueError now if ``path`` is, or lies under, a file: a command would otherwise fail only at its first
    write, after the data and models were built (or, for a benchmark, after the measurements)."""
    for p in (Path(path), *Path(path).parents):
        if p.exists():
            if not p.is_dir():
                raise ValueError(f"{flag.lstrip('-')} {path}: {p} is a file, not a directory; pass another {flag}")
            return


def check_writable(path: PathLike, flag: str) -> None:
    """ValueError now if no file can be created in ``path`` (or, when it does not exist yet, in the directory it
    would be created in): the outputs are written only after the measurements. A real file is tried, since
    permission bits do not tell for root or a read-only mount."""
    existing = next((p for p in (Path(path), *Path(path).parents) if p.exists()), Path("."))
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise ValueError(f"{flag.lstrip('-')} {path}: cannot write in {existing} ({exc.strerror or exc}); pass "
                         f"another {flag}") from None


def write_bytes_atomic(path: PathLike, data: bytes) -> None:
    """Atomically replace the file ``path`` (tmp file, fsync, rename)."""
    _replace_file(Path(path), data)


def _step_of(path: Path) -> int:
    return int(_STEP_DIR.match(path.name).group(1))


def _prune(root: Path, keep: int, written: Path) -> None:
    ckpts = list_checkpoints(root)
    # Checkpoints ahead of the one just written belong to an abandoned continuation of the run: a resume went back
    # past them because they failed to load. Kept, they would count among the `keep` newest and prune away the
    # valid ones, the one just written included.
    stale = [p for p in ckpts if _step_of(p) > _step_of(written)]
    current = [p for p in ckpts if _step_of(p) <= _step_of(written)]
    for old in stale + (current[:-keep] if keep > 0 else []):
        shutil.rmtree(old, ignore_errors=True)
    # Leftovers of crashed writes only waste space; nothing ever reads them.
    for p in root.iterdir():
        if p.name.startswith(_TMP_PREFIX) and not p.name.endswith(f"-{os.getpid()}"):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def save_checkpoint(root: PathLike, step: int, model_state: Mapping[str, torch.Tensor], state: Mapping[str, Any],
                    ema_state: Optional[Mapping[str, torch.Tensor]] = None, keep: int = 2) -> Path:
    """Atomically write checkpoint ``root/step_{step:08d}`` and prune old ones.

    Args:
        root: Directory holding all checkpoints of a run (created if missing).
        step: Global step; names the directory.
        model_state: Tensors for ``model.safetensors`` (see :func:`module_state_for_checkpoint`).
        state: Picklable dict for ``state.pt``; must only hold types ``weights_only`` accepts.
        ema_state: Tensors for ``ema.safetensors``, or None.
        keep: How many newest checkpoints to keep (0 keeps all); checkpoints of a later step than ``step`` (left
            by an abandoned continuation of the run, see :func:`load_latest_checkpoint`) are removed.

    Returns:
        The final checkpoint directory.

    Raises:
        CheckpointNoSpaceError: The disk is full; the temporary directory is removed and
            earlier checkpoints are untouched.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}"
    final = root / name
    tmp = root / f"{_TMP_PREFIX}{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        manifest: dict[str, dict] = {}  # one file's bytes in memory at a time, as large models need
        _write_recorded(tmp / MODEL_FILE, _safetensors_bytes(model_state), manifest)
        if ema_state is not None:
            _write_recorded(tmp / EMA_FILE, _safetensors_bytes(ema_state), manifest)
        _write_recorded(tmp / STATE_FILE, _torch_bytes(dict(state, has_ema=ema_state is not None)), manifest)
        _write_file(tmp / MANIFEST_FILE, json.dumps({"files": manifest}).encode())
        fsync_path(tmp)
        if final.exists():
            # Re-saving a step (e.g. an interrupt right after a periodic save): move the old
            # copy aside first because rename cannot replace a non-empty directory.
            trash = root / f"{_TMP_PREFIX}old-{name}-{os.getpid()}"
            os.rename(final, trash)
            os.rename(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, final)
        fsync_path(root)
    except BaseException as e:  # also an interrupt (a second Ctrl-C): no partial copy of the model stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            previous = [p for p in list_checkpoints(root) if _step_of(p) < step]
            intact = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
            raise CheckpointNoSpaceError(
                errno.ENOSPC, f"no space left on device while writing checkpoint to {final}; {intact}") from e
        raise
    try:
        write_text_atomic(root / LATEST_FILE, name + "\n")
    except OSError as e:
        # The checkpoint itself is complete and the loader does not need `latest`.
        warnings.warn(f"checkpoint {final} written but could not update {root / LATEST_FILE}: {e}")
    _prune(root, keep, final)
    return final


# --------------------------------------------------------------------------- reading


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from e


def _read_manifest(path: Path) -> dict[str, dict]:
    """The recorded size and CRC-32 of each file; none for a checkpoint written before manifests existed."""
    if not (path / MANIFEST_FILE).is_file():
        return {}
    try:
        files = json.loads((path / MANIFEST_FILE).read_bytes())["files"]
        return {name: {"bytes": int(f["bytes"]), "crc32": int(f["crc32"])} for name, f in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path / MANIFEST_FILE} is unreadable: {e!r}") from e


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:  # in blocks: a whole model's bytes would double the memory a load needs
        while block := f.read(1 << 24):
            crc = zlib.crc32(block, crc)
    return crc


def _verify(path: Path, recorded: dict) -> None:
    try:
        size, crc = path.stat().st_size, _crc32(path)
    except FileNotFoundError as e:
        raise CheckpointError(f"{path} is missing") from e
    except OSError as e:
        # Not damage: a storage error (EIO, a lost mount) may pass. Treated as damage, the resume would go back to
        # an older checkpoint and the next save would delete this intact one as part of an abandoned continuation.
        raise OSError(e.errno, f"{path} cannot be read ({e.strerror or e}); it is kept: fix the storage, then resume "
                               "again") from e
    if size != recorded["bytes"]:
        raise CheckpointError(f"{path} is damaged: it holds {size} bytes, {recorded['bytes']} were written")
    if crc != recorded["crc32"]:
        raise CheckpointError(f"{path} is damaged: its CRC-32 differs from the one recorded when it was written")


def load_checkpoint(path: PathLike) -> Checkpoint:
    """Load and verify one checkpoint directory (against its manifest, when it has one).

    Raises:
        CheckpointError: A file is missing, unreadable or damaged.
        OSError: The storage failed to read a file (not taken for damage).
    """
    path = Path(path)
    m = _STEP_DIR.match(path.name)
    if not m or not path.is_dir():
        raise CheckpointError(f"{path} is not a checkpoint directory (expected step_XXXXXXXX/)")
    manifest = _read_manifest(path)
    for f in (MODEL_FILE, STATE_FILE, *manifest):
        if not (path / f).is_file():
            raise CheckpointError(f"{path} is incomplete: {f} is missing")
    for f, recorded in manifest.items():
        _verify(path / f, recorded)
    try:
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path / STATE_FILE} cannot be loaded with weights_only=True: {e}") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path / STATE_FILE} does not hold a dict")
    model = _load_safetensors(path / MODEL_FILE)
    ema = None
    if state.get("has_ema", False):
        if not (path / EMA_FILE).is_file():
            raise CheckpointError(f"{path} is incomplete: {EMA_FILE} is missing")
        ema = _load_safetensors(path / EMA_FILE)
    return Checkpoint(path=path, step=int(m.group(1)), model=model, ema=ema, state=state)


def load_latest_checkpoint(root: PathLike) -> Optional[Checkpoint]:
    """Load the newest valid checkpoint, falling back to older ones when it is damaged.

    Args:
        root: The checkpoints directory, or a run directory containing ``checkpoints/``.

    Returns:
        The newest checkpoint that verifies, or None when there is none.
    """
    root = Path(root)
    if not list_checkpoints(root) and (root / "checkpoints").is_dir():
        root = root / "checkpoints"
    for path in reversed(list_checkpoints(root)):
        try:
            return load_checkpoint(path)
        except CheckpointError as e:
            warnings.warn(f"skipping damaged checkpoint {path}: {e}; trying the previous one")
    return None


# --------------------------------------------------------------------------- training objects


def save_training_checkpoint(root: PathLike, step: int, task: nn.Module, optimizer: torch.optim.Optimizer,
                             scheduler: Any, state: Mapping[str, Any], ema: Optional[nn.Module] = None,
                             frozen_prefixes: Iterable[str] = (), keep: int = 2) -> Path:
    """Checkpoint live training objects (see :func:`save_checkpoint`).

    Args:
        task: Module whose state dict, minus ``frozen_prefixes``, goes to ``model.safetensors``.
        optimizer, scheduler: Anything with ``state_dict()``; stored in ``state.pt``.
        state: Extra ``state.pt`` entries (position, config, RNG states).
        ema: The EMA copy of the student, or None.
    """
    full = dict(state, optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict())
    ema_state = module_state_for_checkpoint(ema) if ema is not None else None
    return save_checkpoint(root, step, module_state_for_checkpoint(task, frozen_prefixes), full, ema_state, keep)


def restore_training_state(ckpt: Checkpoint, task: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                           ema: Optional[nn.Module] = None, frozen_prefixes: Iterable[str] = (),
                           expect: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """Load a checkpoint into live training objects; return its ``state.pt`` dict.

    Only keys under ``frozen_prefixes`` may be absent from the checkpoint: those modules
    (teachers) are rebuilt by the caller, everything else must match exactly. ``ema`` is
    left untouched when the checkpoint has no EMA weights.

    Args:
        expect: Values that must equal the checkpoint's, looked up in ``state.pt`` and then in
            its ``config`` (e.g. what the data order depends on); checked before anything loads.

    Raises:
        CheckpointError: The checkpoint does not fit ``task``, ``optimizer`` (other parameters train, or in other
            groups) or ``expect``.
    """
    saved = {**ckpt.state.get("config", {}), **ckpt.state}
    changed = {k: (saved.get(k), v) for k, v in (expect or {}).items() if saved.get(k) != v}
    if changed:
        raise CheckpointError(f"cannot resume {ckpt.path} exactly, these settings changed (saved, now): {changed}")
    try:
        missing, unexpected = task.load_state_dict(ckpt.model, strict=False)
    except RuntimeError as e:  # shapes differ: torch lists them over many lines
        raise CheckpointError(f"{ckpt.path} does not fit the task: {' '.join(str(e).split())}; resume with the "
                              "model settings the run was started with, or start in a new output_dir") from e
    missing = [k for k in missing if not k.startswith(tuple(frozen_prefixes))]
    if missing or unexpected:
        raise CheckpointError(f"{ckpt.path} does not fit the task: missing {missing[:5]}, unexpected {unexpected[:5]}")
    try:
        optimizer.load_state_dict(ckpt.state["optimizer"])
        scheduler.load_state_dict(ckpt.state["scheduler"])
    except ValueError as e:
        # E.g. another distill.objective: the same tensors, but other ones train.
        raise CheckpointError(
            f"cannot resume {ckpt.path}: the set of trained parameters or their optimizer groups changed since the "
            f"checkpoint ({e}); resume with the settings the run was started with (its config.yaml), or start in a "
            "new output_dir") from e
    if ema is not None and ckpt.ema is not None:
        ema.load_state_dict(ckpt.ema)
    return ckpt.state


# --------------------------------------------------------------------------- export


# The safetensors header entry in which exported models describe themselves (architecture, classes,
# preprocessing), as JSON.
METADATA_KEY = "vitlinearizer"


def export_model(model: Union[nn.Module, Mapping[str, torch.Tensor]], path: PathLike, description: Mapping) -> Path:
    """Export weights with their description (JSON under ``METADATA_KEY``); the file stays a plain timm state dict.

    The description's fields are checked here, not when the file is read back: ``model`` (timm name),
    ``model_kwargs`` (mapping), ``num_classes`` (int), ``classes`` (one name per class), ``img_size`` (int or
    [H, W]; stored as [H, W]), ``mean`` / ``std`` (numbers). :func:`vitlinearizer.exports.load_exported_model` needs
    ``model``, ``num_classes`` and ``img_size``; a teacher's weights file needs only its statistics."""
    return export_student(model, path, metadata={METADATA_KEY: json.dumps(_checked_description(description))})


def _checked_description(description: Mapping) -> dict:
    described = dict(description)

    def bad(key: str, expected: str):
        return ValueError(f"export description: {key} must be {expected}, got {described[key]!r}")

    def is_int(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    if "model" in described and not (isinstance(described["model"], str) and described["model"]):
        raise bad("model", "a timm model name")
    if "model_kwargs" in described and not isinstance(described["model_kwargs"], Mapping):
        raise bad("model_kwargs", "a mapping of keyword arguments ({} for none)")
    if "num_classes" in described and not (is_int(described["num_classes"]) and described["num_classes"] >= 0):
        raise bad("num_classes", "an int >= 0")
    if "img_size" in described:
        size = described["img_size"]
        size = [size, size] if is_int(size) else size
        if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(is_int(v) and v > 0 for v in size)):
            raise bad("img_size", "a positive int or [H, W]")
        described["img_size"] = list(size)
    for key in ("mean", "std"):
        values = described.get(key)
        if key in described and not (isinstance(values, (list, tuple)) and values and
                                     all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)):
            raise bad(key, "a list of numbers, one per channel")
    classes = described.get("classes")
    if classes is not None:
        if not (isinstance(classes, (list, tuple)) and all(isinstance(c, str) for c in classes)):
            raise bad("classes", "a list of class names")
        if "num_classes" in described and len(classes) != described["num_classes"]:
            raise ValueError(f"export description: {len(classes)} classes named for num_classes="
                             f"{described['num_classes']}; name each class once")
    return described


def read_export_metadata(path: PathLike) -> Optional[dict]:
    """The description :func:`export_model` stored in ``path``; None for any other file."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        return None
    with safetensors.safe_open(str(path), "pt") as f:
        meta = (f.metadata() or {}).get(METADATA_KEY)
    return None if meta is None else json.loads(meta)


def pretrained_cfg_overlay(path: PathLike, description: Optional[Mapping] = None) -> dict:
    """timm's ``pretrained_cfg_overlay`` for a file written by :func:`export_model`.

    ``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=pretrained_cfg_overlay(path), **kwargs)``
    then loads the weights with the file's classifier size, and ``timm.data.resolve_data_config(model=model)``
    gives the statistics, input size and resize settings the model was trained with (timm's registry only knows
    the architecture's defaults). ``kwargs`` must still build the same architecture (``img_size`` and
    ``model_kwargs`` of :func:`read_export_metadata`). ``description``: the file's, when already read.
    """
    meta = read_export_metadata(path) if description is None else description
    if meta is None:
        raise ValueError(f"{path} has no {METADATA_KEY} description; only files written by export_model carry one")
    overlay = dict(file=str(path), num_classes=meta.get("num_classes"), mean=meta.get("mean"), std=meta.get("std"),
                   input_size=(3, *meta["img_size"]) if "img_size" in meta else None,
                   interpolation=meta.get("interpolation"), crop_pct=meta.get("crop_pct"))
    # What the description leaves out stays timm's default for the architecture.
    return {k: tuple(v) if isinstance(v, list) else v for k, v in overlay.items() if v is not None}


def update_pretrained_cfg(model: nn.Module, **fields) -> None:
    """Replace fields of a built timm model's ``pretrained_cfg`` (and of ``default_cfg``, timm's alias of it)."""
    model.pretrained_cfg = model.default_cfg = {**model.pretrained_cfg, **fields}


def export_student(student: Union[nn.Module, Mapping[str, torch.Tensor]], path: PathLike,
                   metadata: Optional[Mapping[str, str]] = None) -> Path:
    """Atomically write a student's plain state dict as a standalone ``.safetensors`` file.

    Keys carry no prefix, so the file loads with ``model.load_state_dict(load_file(path))``
    or ``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path))``.

    Args:
        student: The model (pass the EMA module for EMA weights) or its state dict.
        path: Destination file; parent directories are created.
        metadata: Extra string entries for the safetensors header (e.g. the model's description).

    Returns:
        The written path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(student, nn.Module):
        student = student.state_dict()
    try:
        _replace_file(path, _safetensors_bytes({k: v.detach().to("cpu", copy=True).contiguous()
                                                for k, v in student.items()}, metadata))
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise CheckpointNoSpaceError(errno.ENOSPC, f"no space left on device while exporting to {path}") from e
        raise
    return path
