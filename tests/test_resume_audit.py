"""Exact resume and crash safety at the edges: a stale damaged checkpoint ahead of the one resumed from, a write
cut short, settings changed between the two halves of a run, and the exported file's bytes."""
from __future__ import annotations

import json
import os
import signal

import pytest
import safetensors.torch
import torch

import _engine_worker as W
from vitlinearizer import checkpoint as C
from vitlinearizer.checkpoint import (STATE_FILE, CheckpointError, export_model, list_checkpoints,
                                      load_latest_checkpoint)
from vitlinearizer.engine import TrainingInterrupted


pytestmark = pytest.mark.usefixtures("single_thread")  # weights are compared bit for bit (conftest.py)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run = tmp_path_factory.mktemp("reference")
    W.train(run)
    return W.final_state(run)


def assert_same(a: tuple, b: tuple) -> None:
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k


def _names(run_dir) -> list[str]:
    return [p.name for p in list_checkpoints(run_dir / "checkpoints")]


def _tmp_entries(run_dir) -> list[str]:
    return [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".tmp")]


def test_a_stale_damaged_checkpoint_never_prunes_the_valid_ones(tmp_path, reference):
    cfg = {"save_every_steps": 2, "keep_checkpoints": 1}
    with pytest.raises(TrainingInterrupted):
        W.train(tmp_path, cfg=cfg, task=W.make_task(signal_at_call=13))  # stops at step 7
    assert _names(tmp_path) == ["step_00000007"]
    (tmp_path / "checkpoints" / "step_00000007" / STATE_FILE).unlink()
    # Nothing valid to resume: starts over, and is stopped again at step 3, before the damaged step 7.
    with pytest.warns(UserWarning, match="damaged checkpoint .*step_00000007"):
        with pytest.raises(TrainingInterrupted) as info:
            W.train(tmp_path, resume=True, cfg=cfg, task=W.make_task(signal_at_call=5))
    # The checkpoint it reports was kept: the damaged step 7 of the abandoned attempt does not count as the newest.
    assert info.value.checkpoint.name == "step_00000003" and info.value.checkpoint.is_dir()
    assert _names(tmp_path) == ["step_00000003"]
    assert load_latest_checkpoint(tmp_path).step == 3
    W.train(tmp_path, resume=True, cfg=cfg)
    assert_same(W.final_state(tmp_path), reference)


def test_a_stale_checkpoint_does_not_take_the_place_of_a_valid_one(tmp_path):
    for step in (2, 4, 9):
        C.save_checkpoint(tmp_path, step, {"w": torch.full((2,), float(step))}, {"step": step}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000004", "step_00000009"]
    # As after a resume from step 4 (step 9 failed to load): the run goes on from 4 and writes 5, then 6.
    C.save_checkpoint(tmp_path, 5, {"w": torch.full((2,), 5.0)}, {"step": 5}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000004", "step_00000005"]
    C.save_checkpoint(tmp_path, 6, {"w": torch.full((2,), 6.0)}, {"step": 6}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000005", "step_00000006"]


def test_an_interrupted_checkpoint_write_leaves_no_partial_files_and_resumes_exactly(tmp_path, monkeypatch, reference):
    real_write = C._write_file

    def interrupted(path, data):
        if "step_00000004" in str(path) and path.name == STATE_FILE:
            raise KeyboardInterrupt  # e.g. a second Ctrl-C while the checkpoint is written
        real_write(path, data)

    monkeypatch.setattr(C, "_write_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        W.train(tmp_path, cfg={"save_every_steps": 2})
    monkeypatch.setattr(C, "_write_file", real_write)
    assert _names(tmp_path) == ["step_00000002"] and _tmp_entries(tmp_path) == []
    W.train(tmp_path, resume=True, cfg={"save_every_steps": 2})
    assert_same(W.final_state(tmp_path), reference)


@pytest.mark.parametrize("change,named", [
    ({"clip_grad": None}, "clip_grad"),
    ({"amp": "bf16"}, "amp"),
    ({"ema_decay": 0.99}, "ema_decay"),
    ({"ema_decay": 0.0}, "ema_decay"),  # the export would silently become the raw student instead of the EMA
])
def test_resume_refuses_settings_that_change_the_steps_or_the_export(tmp_path, change, named):
    with pytest.raises(TrainingInterrupted):
        W.train(tmp_path, task=W.make_task(signal_at_call=7))
    with pytest.raises(CheckpointError, match=rf"cannot resume .*'{named}'"):
        W.train(tmp_path, resume=True, cfg=change)


def test_resume_allows_settings_that_change_no_result(tmp_path, reference):
    with pytest.raises(TrainingInterrupted):
        W.train(tmp_path, cfg={"clip_grad": 1.0}, task=W.make_task(signal_at_call=7))
    harmless = {"log_every": 3, "progress": True, "num_workers": 1, "save_every_steps": 5, "keep_checkpoints": 3,
                "max_bad_steps": 4, "final_test": False}
    summary, _ = W.train(tmp_path, resume=True, cfg=harmless)
    assert summary["steps"] == 12
    assert_same(W.final_state(tmp_path), reference)


def test_clip_grad_off_spelt_none_or_zero_is_the_same_setting(tmp_path):
    cfg = {"clip_grad": None, "epochs": 1}
    with pytest.raises(TrainingInterrupted):
        W.train(tmp_path, cfg=cfg, task=W.make_task(signal_at_call=5))
    summary, _ = W.train(tmp_path, resume=True, cfg={**cfg, "clip_grad": 0.0})
    assert summary["steps"] == 6


def test_exported_bytes_do_not_depend_on_the_process(tmp_path):
    # safetensors orders the header's metadata as a hash map does, differently from call to call: the same weights
    # and description must still give the same file, or an exact resume cannot give the uninterrupted run's export.
    model = torch.nn.Linear(3, 2)
    description = {"kind": "student", "model": "x", "num_classes": 2, "mean": [0.5] * 3}
    blobs = set()
    for i in range(12):
        blobs.add(export_model(model, tmp_path / f"{i}.safetensors", description).read_bytes())
    assert len(blobs) == 1
    path = tmp_path / "0.safetensors"
    assert C.read_export_metadata(path) == description
    loaded = safetensors.torch.load_file(path)
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
    header = json.loads(path.read_bytes()[8:8 + int.from_bytes(path.read_bytes()[:8], "little")])
    assert list(header["__metadata__"]) == sorted(header["__metadata__"])


# --------------------------------------------------------------------------- through the CLI

CLI_TINY = [
    "--data.name", "synthetic", "--data.img_size", "28", "--data.synthetic_length", "32", "--data.num_classes", "3",
    "--train.batch_size", "4", "--train.epochs", "2", "--train.progress", "false", "--train.log_every", "1",
    "--student.model_kwargs", "{depth: 2, embed_dim: 32, mixer_kwargs: {d_state: 8, head_dim: 16}}",
]
CLI_CASES = {
    # 4 steps an epoch: checkpoints at steps 3 (mid-epoch 1) and 4, the signal's at step 6 (mid-epoch 2)
    "distill": ["--data.holdout_fraction", "0", "--teacher.model_kwargs",
                "{patch_size: 4, embed_dim: 32, depth: 2, num_heads: 2}", "--train.accum_steps", "2",
                "--train.ema_decay", "0.9", "--train.save_every_steps", "3", "--train.keep_checkpoints", "0",
                "--data.augment", "timm",
                "--train.num_workers", "1"],
    # 24 training images (8 held out), 6 steps an epoch: a checkpoint at step 5, the epoch's (and signal's) at 6
    "finetune": ["--data.holdout_fraction", "0.25", "--train.layer_decay", "0.6", "--data.augment", "timm",
                 "--data.re_prob", "0.5", "--student.drop_path_rate", "0.1", "--train.ema_decay", "0.8",
                 "--train.save_every_steps", "5", "--train.num_workers", "2"],
}


def _records(run_dir) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "images_per_s"}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("command", list(CLI_CASES))
def test_cli_run_killed_after_a_mid_epoch_checkpoint_resumes_to_the_same_export(tmp_path, monkeypatch, command):
    from vitlinearizer import engine
    from vitlinearizer.cli import main

    args = [command, *CLI_TINY, *CLI_CASES[command]]
    assert main([*args, "--output_dir", str(tmp_path / "whole")]) == 0
    real_step = engine.Trainer._train_step

    def sigterm_before_step_6(self, batches):
        if self.step == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(self, batches)

    monkeypatch.setattr(engine.Trainer, "_train_step", sigterm_before_step_6)
    cut = tmp_path / "cut"
    assert main([*args, "--output_dir", str(cut)]) == 128 + signal.SIGTERM
    monkeypatch.setattr(engine.Trainer, "_train_step", real_step)
    # As if killed right after the mid-epoch checkpoint: the later ones never written, the records logged since kept.
    mid_epoch = {"distill": 3, "finetune": 5}[command]
    assert list_checkpoints(cut / "checkpoints")[-1].name == "step_00000006"
    for later in list_checkpoints(cut / "checkpoints"):
        if int(later.name[5:]) > mid_epoch:
            C.shutil.rmtree(later)
    assert load_latest_checkpoint(cut).step == mid_epoch
    # Another worker count changes no result.
    workers = args.index("--train.num_workers") + 1
    assert main([*args[:workers], "0", *args[workers + 1:], "--output_dir", str(cut), "--resume"]) == 0
    name = "student.safetensors"
    assert (cut / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    assert _records(cut) == _records(tmp_path / "whole")
    summaries = [json.loads((d / "summary.json").read_text()) for d in (tmp_path / "whole", cut)]
    assert summaries[0].get("test") == summaries[1].get("test") and summaries[1]["complete"]
    assert summaries[0]["last_eval"] == summaries[1]["last_eval"]
