"""Tests for crash-safe checkpoints, fallback loading, disk-full handling and student export."""
from __future__ import annotations

import errno
import random
import re

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
from torch import nn

import _engine_worker as W
from vitlinearizer import checkpoint as C
from vitlinearizer.checkpoint import (
    EMA_FILE,
    LATEST_FILE,
    MANIFEST_FILE,
    MODEL_FILE,
    STATE_FILE,
    CheckpointError,
    CheckpointNoSpaceError,
    export_model,
    export_student,
    list_checkpoints,
    load_checkpoint,
    load_latest_checkpoint,
    module_state_for_checkpoint,
    read_export_metadata,
    save_checkpoint,
)
from vitlinearizer.seeding import capture_rng_state, restore_rng_state


def _save(root, step, value=None, keep=0, ema=True):
    model = {"w": torch.full((2, 3), float(step if value is None else value)), "b": torch.zeros(3)}
    state = {"step": step, "rng": [capture_rng_state()], "config": {"betas": (0.9, 0.99)}}
    return save_checkpoint(root, step, model, state, ema_state=model if ema else None, keep=keep)


def _tmp_entries(root):
    return [p.name for p in root.iterdir() if p.name.startswith(".tmp")]


def test_roundtrip_weights_only_latest_and_pruning(tmp_path):
    for step in (1, 2, 3):
        path = _save(tmp_path, step, keep=2)
    assert path == tmp_path / "step_00000003"
    assert sorted(p.name for p in path.iterdir()) == sorted([MODEL_FILE, EMA_FILE, STATE_FILE, MANIFEST_FILE])
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002", "step_00000003"]  # keep=2
    assert (tmp_path / LATEST_FILE).read_text() == "step_00000003\n"
    state = torch.load(path / STATE_FILE, weights_only=True)
    assert state["step"] == 3 and state["has_ema"] and state["config"]["betas"] == (0.9, 0.99)
    ckpt = load_latest_checkpoint(tmp_path)
    assert ckpt.step == 3 and torch.equal(ckpt.model["w"], torch.full((2, 3), 3.0)) and ckpt.ema is not None
    assert load_latest_checkpoint(tmp_path.parent / "nowhere") is None
    assert _tmp_entries(tmp_path) == []


def test_resaving_a_step_replaces_it(tmp_path):
    _save(tmp_path, 5, value=1.0)
    _save(tmp_path, 5, value=2.0, ema=False)
    ckpt = load_latest_checkpoint(tmp_path)
    assert ckpt.model["w"][0, 0] == 2.0 and ckpt.ema is None and _tmp_entries(tmp_path) == []


def test_tied_and_strided_tensors_and_frozen_prefixes():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Linear(4, 4)
            self.dec = nn.Linear(4, 4)
            self.dec.weight = self.enc.weight  # shared storage: safetensors refuses it as is
            self.teacher = nn.Linear(4, 4)
            self.register_buffer("view", torch.arange(16.0).reshape(4, 4).t())  # non-contiguous

    state = module_state_for_checkpoint(Tied(), frozen_prefixes=("teacher.",))
    assert not any(k.startswith("teacher.") for k in state)
    loaded = safetensors.torch.load(safetensors.torch.save(state))
    assert torch.equal(loaded["dec.weight"], loaded["enc.weight"]) and torch.equal(loaded["view"], state["view"])


@pytest.mark.parametrize("damage", ["truncate_model", "delete_state", "garbage_state", "delete_ema",
                                    "garbage_manifest"])
def test_damaged_newest_falls_back_with_warning(tmp_path, damage):
    _save(tmp_path, 1)
    newest = _save(tmp_path, 2)
    if damage == "truncate_model":
        data = (newest / MODEL_FILE).read_bytes()
        (newest / MODEL_FILE).write_bytes(data[: len(data) // 2])
    elif damage == "delete_state":
        (newest / STATE_FILE).unlink()
    elif damage == "garbage_state":
        (newest / STATE_FILE).write_bytes(b"\x00not a pickle")
    elif damage == "garbage_manifest":
        (newest / MANIFEST_FILE).write_bytes(b'{"files": ')
    else:
        (newest / EMA_FILE).unlink()
    # A crash mid-write leaves a hidden temp dir, possibly with a higher step: never used.
    (tmp_path / ".tmp-step_00000003-999").mkdir()
    (tmp_path / ".tmp-step_00000003-999" / MODEL_FILE).write_bytes(b"partial")
    with pytest.warns(UserWarning, match="damaged checkpoint .*step_00000002"):
        ckpt = load_latest_checkpoint(tmp_path)
    assert ckpt.step == 1 and ckpt.model["w"][0, 0] == 1.0
    with pytest.raises(CheckpointError):
        load_checkpoint(newest)


@pytest.mark.parametrize("name", [MODEL_FILE, EMA_FILE, STATE_FILE])
def test_damaged_tensor_bytes_fall_back_with_warning(tmp_path, name):
    _save(tmp_path, 1)
    newest = _save(tmp_path, 2)
    # Bytes inside the tensor data: the file still parses (safetensors header, zip directory), so only the
    # manifest's checksum tells.
    data = bytearray((newest / name).read_bytes())
    if name == STATE_FILE:
        start = data.find(load_checkpoint(newest).state["rng"][0]["torch"].numpy().tobytes())
    else:
        start = 8 + int.from_bytes(data[:8], "little")  # safetensors: 8-byte header length, header, tensors
    assert start > 0
    data[start:start + 8] = b"\xff" * 8
    (newest / name).write_bytes(bytes(data))
    with pytest.warns(UserWarning, match=f"damaged checkpoint .*step_00000002: .*{re.escape(name)} is damaged"):
        ckpt = load_latest_checkpoint(tmp_path)
    assert ckpt.step == 1 and ckpt.model["w"][0, 0] == 1.0


def test_a_read_error_is_not_taken_for_damage(tmp_path, monkeypatch):
    _save(tmp_path, 1)
    newest = _save(tmp_path, 2)
    real_crc = C._crc32

    def failing(path):
        if path.parent == newest:
            raise OSError(errno.EIO, "Input/output error")
        return real_crc(path)

    monkeypatch.setattr(C, "_crc32", failing)
    # Falling back to step 1 would make the next save delete the intact step 2 as an abandoned continuation.
    with pytest.raises(OSError, match=r"step_00000002/.* cannot be read \(Input/output error\); it is kept"):
        load_latest_checkpoint(tmp_path)
    monkeypatch.setattr(C, "_crc32", real_crc)
    assert load_latest_checkpoint(tmp_path).step == 2


def test_a_checkpoint_written_before_manifests_still_loads(tmp_path):
    path = _save(tmp_path, 1)
    (path / MANIFEST_FILE).unlink()
    ckpt = load_checkpoint(path)
    assert ckpt.step == 1 and torch.equal(ckpt.ema["w"], torch.full((2, 3), 1.0))


def test_disk_full_keeps_previous_checkpoint_and_removes_temp_dir(tmp_path, monkeypatch):
    _save(tmp_path, 1)
    real_write, calls = C._write_file, []

    def full_disk(path, data):
        calls.append(path)
        if len(calls) == 2:  # model.safetensors fits, the next file does not
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, data)

    monkeypatch.setattr(C, "_write_file", full_disk)
    with pytest.raises(CheckpointNoSpaceError, match=r"no space left on device while writing checkpoint to "
                       r".*step_00000002; the previous checkpoint .*step_00000001 is intact") as info:
        _save(tmp_path, 2)
    assert info.value.errno == errno.ENOSPC
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000001"]
    assert _tmp_entries(tmp_path) == [] and (tmp_path / LATEST_FILE).read_text() == "step_00000001\n"
    assert load_latest_checkpoint(tmp_path).step == 1


def test_trainer_disk_full_raises_clearly_and_resume_uses_intact_checkpoint(tmp_path, monkeypatch):
    real_write = C._write_file

    def full_after_step_4(path, data):
        if "step_00000006" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, data)

    monkeypatch.setattr(C, "_write_file", full_after_step_4)
    with pytest.raises(CheckpointNoSpaceError, match="step_00000004 is intact"):
        W.train(tmp_path / "run", cfg={"save_every_steps": 2})
    monkeypatch.setattr(C, "_write_file", real_write)
    assert _tmp_entries(tmp_path / "run" / "checkpoints") == []
    W.train(tmp_path / "run", resume=True, cfg={"save_every_steps": 2})
    W.train(tmp_path / "ref")
    for a, b in zip(W.final_state(tmp_path / "run"), W.final_state(tmp_path / "ref")):
        assert all(torch.equal(a[k], b[k]) for k in b)


def test_trainer_resume_skips_damaged_newest(tmp_path):
    cfg = {"save_every_steps": 2, "keep_checkpoints": 3}
    W.train(tmp_path / "ref")
    task = W.make_task(signal_at_call=13)  # interrupted at step 7 (accum_steps=2)
    with pytest.raises(KeyboardInterrupt):
        W.train(tmp_path / "run", cfg=cfg, task=task)
    ckpts = list_checkpoints(tmp_path / "run" / "checkpoints")
    assert [p.name for p in ckpts] == ["step_00000004", "step_00000006", "step_00000007"]
    (ckpts[-1] / STATE_FILE).unlink()
    with pytest.warns(UserWarning, match="damaged checkpoint .*step_00000007"):
        W.train(tmp_path / "run", resume=True, cfg=cfg)
    for a, b in zip(W.final_state(tmp_path / "run"), W.final_state(tmp_path / "ref")):
        assert all(torch.equal(a[k], b[k]) for k in b)


def test_resume_refuses_changed_data_order(tmp_path):
    W.train(tmp_path, cfg={"epochs": 1})
    with pytest.raises(CheckpointError, match="batch_size"):
        W.train(tmp_path, resume=True, cfg={"epochs": 2, "batch_size": 2})


def test_resume_refuses_changed_trained_parameters(tmp_path):
    W.train(tmp_path)
    task = W.make_task()
    task.student[1].requires_grad_(False)  # as another layer_decay or objective would: other parameters train
    with pytest.raises(CheckpointError, match="the set of trained parameters or their optimizer groups changed .*"
                       "resume with the settings the run was started with"):
        W.train(tmp_path, resume=True, task=task)


def test_rng_state_roundtrip_through_weights_only(tmp_path):
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    state = capture_rng_state()
    expected = torch.rand(3), random.random(), np.random.rand()
    torch.save(state, tmp_path / "rng.pt")
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]
    assert np.random.rand() == expected[2]


def test_export_student_loads_into_timm(tmp_path):
    kw = dict(img_size=32, patch_size=8, num_classes=5)
    student = timm.create_model("test_vit", **kw)
    path = export_student(student, tmp_path / "out" / "student.safetensors")
    assert [p.name for p in path.parent.iterdir()] == ["student.safetensors"]  # no temp file left
    fresh = timm.create_model("test_vit", **kw)
    fresh.load_state_dict(safetensors.torch.load_file(path))  # strict: plain timm keys
    # num_classes in the overlay too: otherwise timm drops a head whose size differs from its registry's.
    overlay = dict(file=str(path), num_classes=kw["num_classes"])
    via_timm = timm.create_model("test_vit", pretrained=True, pretrained_cfg_overlay=overlay, **kw)
    for k, v in student.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k]) and torch.equal(v, via_timm.state_dict()[k])


def test_exported_description_round_trips_and_other_files_have_none(tmp_path):
    student = timm.create_model("test_vit", img_size=32, patch_size=8, num_classes=5)
    description = dict(kind="student", model="test_vit", num_classes=5, mean=[0.29] * 3, img_size=[32, 32])
    path = export_model(student, tmp_path / "student.safetensors", description)
    assert read_export_metadata(path) == description
    assert set(safetensors.torch.load_file(path)) == set(student.state_dict())  # still a plain state dict
    assert read_export_metadata(export_student(student, tmp_path / "plain.safetensors")) is None
    torch.save(student.state_dict(), tmp_path / "weights.pth")
    assert read_export_metadata(tmp_path / "weights.pth") is None
