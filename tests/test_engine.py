"""Tests for the generic training engine (CPU, tiny models, a few seconds each)."""
from __future__ import annotations

import io
import json
import math
import os
import multiprocessing
import re
import signal
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import _engine_worker as W
from vitlinearizer.checkpoint import STATE_FILE, CheckpointError, list_checkpoints, load_latest_checkpoint
from vitlinearizer.engine import (
    EpochBatchSampler,
    SeededDataset,
    TrainConfig,
    TrainingDivergedError,
    TrainingInterrupted,
    build_optimizer,
    build_scheduler,
    evaluate_classifier,
)

# Forked children start in milliseconds because torch is already imported; a fresh
# interpreter needs ~20 s here just to import torch and timm.
FORK = multiprocessing.get_context("fork")


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs (max |diff| {(a[k] - b[k]).abs().max()})"


pytestmark = pytest.mark.usefixtures("single_thread")  # weights are compared bit for bit (conftest.py)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Final (model, ema) of an uninterrupted run with the default toy settings."""
    run = tmp_path_factory.mktemp("reference")
    summary, _ = W.train(run)
    assert summary["steps"] == 12 and summary["bad_steps"] == 0 and not summary["interrupted"]
    return W.final_state(run)


# --------------------------------------------------------------------------- config & pieces


@pytest.mark.parametrize("field,value,allowed", [
    ("lr", -1.0, "> 0"), ("epochs", 0, ">= 1"), ("accum_steps", 0, ">= 1"),
    ("amp", "fp16", "'none', 'bf16'"), ("ema_decay", 1.0, "[0, 1)"), ("min_lr", 1.0, "[0, lr"),
])
def test_config_validation_names_field(field, value, allowed):
    with pytest.raises(ValueError, match=rf"train\.{field} must be .*{re.escape(allowed)}"):
        TrainConfig(**{field: value})


def test_config_from_dict_rejects_unknown_and_converts_betas():
    assert TrainConfig.from_dict({"betas": [0.9, 0.95]}).betas == (0.9, 0.95)
    with pytest.raises(ValueError, match="unknown TrainConfig field.*'learning_rate'"):
        TrainConfig.from_dict({"learning_rate": 1e-3})


def test_param_groups_exclude_biases_norms_and_no_weight_decay_names():
    task = W.make_task()
    opt = build_optimizer(task, TrainConfig(weight_decay=0.1))
    names = {id(p): n for n, p in task.named_parameters()}
    decay, no_decay = ({names[id(p)] for p in g["params"]} for g in opt.param_groups)
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[1]["weight_decay"] == 0.0
    assert decay == {"student.0.weight", "student.4.weight"}
    assert no_decay == {"pos", "student.0.bias", "student.1.weight", "student.1.bias", "student.4.bias"}
    assert not any(n.startswith("teacher.") for n in decay | no_decay)  # frozen: not optimised


def test_layer_decay_scales_each_student_layer_and_keeps_weight_decay_split():
    import timm

    import vitlinearizer  # noqa: F401
    from vitlinearizer.finetune import ClassificationTask
    task = ClassificationTask(timm.create_model("adventurer_micro_patch4_28", num_classes=10))
    depth = len(task.student.blocks)  # timm's grouping: stem 0, block i at i + 1 (final norm with the last), head
    opt = build_optimizer(task, TrainConfig(lr=1e-3, weight_decay=0.1, layer_decay=0.5))
    lr_of = {n: g["lr"] for g in opt.param_groups for n, p in task.named_parameters() if any(p is q for q in g["params"])}
    assert len(lr_of) == sum(1 for p in task.parameters() if p.requires_grad)  # every parameter exactly once
    assert lr_of["student.head.weight"] == pytest.approx(1e-3)
    assert lr_of[f"student.blocks.{depth - 1}.mlp.fc2.weight"] == lr_of["student.norm.weight"] == pytest.approx(1e-3 * 0.5)
    assert lr_of["student.blocks.0.mixer.in_proj.weight"] == pytest.approx(1e-3 * 0.5 ** depth)
    assert lr_of["student.patch_embed.proj.weight"] == lr_of["student.cls_token"] == pytest.approx(1e-3 * 0.5 ** (depth + 1))
    for group in opt.param_groups:  # weight decay still skips 1-d parameters and tokens
        names = {n for n, p in task.named_parameters() if any(p is q for q in group["params"])}
        assert (group["weight_decay"] == 0.0) == all(task.get_parameter(n).ndim <= 1 or n.endswith("_token") or
                                                     n.endswith("pos_embed") for n in names)
    sched = build_scheduler(opt, TrainConfig(epochs=1, lr=1e-3, warmup_steps=2, layer_decay=0.5), 10)
    first = sched.get_last_lr()
    assert max(first) == pytest.approx(1e-3 / 2) and min(first) == pytest.approx(1e-3 * 0.5 ** (depth + 1) / 2)


def test_layer_decay_needs_a_student_with_layers():
    with pytest.raises(ValueError, match="group_matcher.*layer_decay: 1.0"):
        build_optimizer(W.make_task(), TrainConfig(layer_decay=0.75))
    with pytest.raises(ValueError, match=r"train\.layer_decay must be in \(0, 1\]"):
        TrainConfig(layer_decay=0.0)


def _schedule(steps_per_epoch: int = 7):
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    cfg = TrainConfig(epochs=2, lr=1.0, min_lr=0.1, warmup_steps=4)  # 14 steps in all
    return opt, build_scheduler(opt, cfg, steps_per_epoch)


def test_schedule_warmup_then_cosine():
    opt, sched = _schedule()
    lrs = [sched.get_last_lr()[0]]
    for _ in range(15):
        opt.step()
        sched.step()
        lrs.append(sched.get_last_lr()[0])
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0)
    assert lrs[9] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))  # halfway: 0.55
    assert lrs[14] == pytest.approx(0.1) and lrs[15] == pytest.approx(0.1)  # stays at min_lr
    opt, sched = _schedule()
    for _ in range(9):
        opt.step()
        sched.step()
    buf = io.BytesIO()
    torch.save(sched.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)  # what a checkpoint stores
    opt2, resumed = _schedule()
    resumed.load_state_dict(state)
    assert resumed.get_last_lr()[0] == pytest.approx(lrs[9])
    # warm-up given in epochs: half of 8 steps per epoch
    assert build_scheduler(opt2, TrainConfig(epochs=2, lr=1.0, warmup_epochs=0.5), 8).lr_lambdas[0].warmup_steps == 4
    with pytest.warns(UserWarning, match=r"warm-up \(24 steps\) is as long as the whole run \(16 steps\)"):
        build_scheduler(opt2, TrainConfig(epochs=2, lr=1.0, warmup_epochs=3), 8)


def test_sampler_is_pure_splits_ranks_and_skips_on_resume():
    full = EpochBatchSampler(20, 4, seed=3, drop_last=True)
    ranks = [EpochBatchSampler(20, 2, seed=3, rank=r, world_size=2) for r in range(2)]
    for s in (full, *ranks):
        s.set_epoch(1)
    single = list(full)
    assert len(single) == 5 and single == list(full)  # pure function of (seed, epoch)
    for step, (a, b) in enumerate(zip(*ranks)):
        assert sorted(a + b) == sorted(single[step])  # union of rank batches = single batch
    full.set_epoch(1, start_batch=3)
    assert list(full) == single[3:] and len(full) == 2
    full.set_epoch(2)
    assert list(full) != single
    assert EpochBatchSampler(20, 4, seed=3, accum_steps=2).steps_per_epoch == 2  # whole steps only
    # drop_last=False: one process gets a short last batch, ranks get it padded to full size
    assert [len(b) for b in EpochBatchSampler(10, 4, seed=3, drop_last=False)] == [4, 4, 2]
    padded = [list(EpochBatchSampler(10, 4, seed=3, rank=r, world_size=2, drop_last=False)) for r in range(2)]
    assert [len(b) for b in padded[0] + padded[1]] == [4, 4, 4, 4]
    assert {i for b in padded[0] + padded[1] for _, i in b} == set(range(10))


def test_seeded_dataset_is_order_and_worker_independent():
    ds = SeededDataset(W.AugDataset(8), seed=5)
    state = torch.get_rng_state()
    a = [ds[(1, i)] for i in range(8)]
    b = [ds[(1, i)] for i in reversed(range(8))][::-1]
    assert torch.equal(torch.get_rng_state(), state)  # the caller's stream is untouched
    assert all(torch.equal(x[0], y[0]) for x, y in zip(a, b))
    assert not torch.equal(ds[(2, 0)][0], a[0][0])  # new epoch, new augmentation
    sampler = EpochBatchSampler(8, 2, seed=5)
    loaded = [torch.cat([x for x, _ in DataLoader(ds, batch_sampler=sampler, num_workers=w)]) for w in (0, 2)]
    assert torch.equal(loaded[0], loaded[1])


# --------------------------------------------------------------------------- resume


def test_resume_mid_epoch_is_bit_identical(tmp_path, reference):
    # SIGTERM ourselves during forward call 7 (step 4 with accum_steps=2, mid-epoch 1).
    task = W.make_task(signal_at_call=7)
    with pytest.raises(TrainingInterrupted) as info:
        W.train(tmp_path, task=task)
    assert info.value.exit_code == 128 + signal.SIGTERM
    assert info.value.checkpoint.name == "step_00000004"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    assert json.loads((tmp_path / "summary.json").read_text())["interrupted"] is True
    # Starting over without --resume would delete these checkpoints: refused, naming the fix.
    with pytest.raises(CheckpointError, match=r"checkpoints of an earlier run \(newest: step_00000004\).*--resume"):
        W.train(tmp_path)
    # Records logged after the checkpoint (a hard kill) and a line cut short by the crash are logged afresh.
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 6, "loss": 1.0}) + "\n" + '{"step": 8, "lo')
    # Resume with data workers this time: augmentation must not depend on the worker count.
    summary, _ = W.train(tmp_path, resume=True, cfg={"num_workers": 2})
    assert summary["steps"] == 12
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 12 and 6 in steps
    model, ema = W.final_state(tmp_path)
    assert_same(model, reference[0])
    assert_same(ema, reference[1])


def _join(proc, timeout: float = 120.0) -> int:
    # A hung child must fail the test, not block the whole session.
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join()
        pytest.fail(f"worker {proc.pid} did not finish within {timeout} s")
    return proc.exitcode


def _wait_for_checkpoint(run_dir: Path, proc, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not list_checkpoints(run_dir / "checkpoints"):
        assert proc.is_alive(), f"worker exited early with {proc.exitcode}"
        assert time.monotonic() < deadline, "worker wrote no checkpoint in time"
        time.sleep(0.01)


def test_sigkill_then_resume_in_new_process_matches(tmp_path, reference):
    # Slow steps and a checkpoint every 2 steps, so the kill lands mid-run.
    cfg = {"save_every_steps": 2}
    proc = FORK.Process(target=W.main, args=(str(tmp_path), False, cfg, {"sleep": 0.05}))
    proc.start()
    _wait_for_checkpoint(tmp_path, proc)
    time.sleep(0.15)
    proc.kill()
    assert _join(proc) == -signal.SIGKILL
    killed_at = load_latest_checkpoint(tmp_path).step
    assert killed_at < 12
    proc = FORK.Process(target=W.main, args=(str(tmp_path), True, cfg, {}))
    proc.start()
    assert _join(proc) == 0
    model, ema = W.final_state(tmp_path)
    assert_same(model, reference[0])
    assert_same(ema, reference[1])


def test_sigterm_writes_checkpoint_and_exits_143(tmp_path, reference):
    proc = FORK.Process(target=W.main, args=(str(tmp_path), False, {"save_every_steps": 2}, {"sleep": 0.05}))
    proc.start()
    _wait_for_checkpoint(tmp_path, proc)
    proc.terminate()  # SIGTERM
    assert _join(proc) == 128 + signal.SIGTERM
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["interrupted"] is True
    assert load_latest_checkpoint(tmp_path).step == summary["steps"] < 12  # saved where it stopped
    W.train(tmp_path, resume=True)
    model, ema = W.final_state(tmp_path)
    assert_same(model, reference[0])
    assert_same(ema, reference[1])


# --------------------------------------------------------------------------- failures


def test_nan_steps_are_skipped_and_counted(tmp_path):
    # accum_steps=1: forward call i runs step i + 1, so steps 3 and 4 get a NaN loss.
    task = W.make_task(nan_calls={2, 3})
    summary, trainer = W.train(tmp_path, cfg={"accum_steps": 1, "epochs": 1, "save_every_steps": 1}, task=task)
    assert summary["bad_steps"] == 2 and summary["steps"] == 12
    seen = task.weights_seen  # student weights at the start of every forward call
    assert torch.equal(seen[2], seen[3]) and torch.equal(seen[3], seen[4])  # NaN steps change nothing
    assert not torch.equal(seen[1], seen[2]) and not torch.equal(seen[4], seen[5])
    assert trainer.optimizer.state[trainer.params[0]]["step"] == 10  # AdamW never saw the bad steps
    assert math.isfinite(summary["final_metrics"]["loss"])


@pytest.mark.parametrize("clip_grad", [None, 1.0])
def test_steps_with_a_finite_loss_but_nan_gradients_are_skipped(tmp_path, clip_grad):
    task = W.make_task(nan_grad_calls={2, 3})
    summary, trainer = W.train(tmp_path, cfg={"accum_steps": 1, "epochs": 1, "clip_grad": clip_grad}, task=task)
    assert summary["bad_steps"] == 2 and summary["steps"] == 12
    seen = task.weights_seen
    assert torch.equal(seen[2], seen[3]) and torch.equal(seen[3], seen[4])
    assert all(torch.isfinite(p).all() for p in trainer.params)


def test_a_failing_evaluation_keeps_the_epochs_training(tmp_path, reference):
    def failing_eval(model):
        raise RuntimeError("holdout unreadable")

    cfg = {"save_every_steps": 0}  # without the fix, nothing would have been saved before the evaluation
    with pytest.raises(RuntimeError, match="holdout unreadable"):
        W.train(tmp_path, cfg=cfg, eval_fn=failing_eval)
    assert load_latest_checkpoint(tmp_path).step == 6  # the end of epoch 1 (48 samples, 4 x 2 per step)
    W.train(tmp_path, resume=True, cfg=cfg)
    model, ema = W.final_state(tmp_path)
    assert_same(model, reference[0])
    assert_same(ema, reference[1])


def test_always_nan_raises_diverged_and_keeps_last_good_checkpoint(tmp_path):
    cfg = {"accum_steps": 1, "epochs": 1, "save_every_steps": 2, "max_bad_steps": 3}
    with pytest.raises(TrainingDivergedError, match="3 consecutive steps.*last good checkpoint is .*step_00000004"):
        W.train(tmp_path, cfg=cfg, task=W.make_task(nan_from=5))
    ckpt = load_latest_checkpoint(tmp_path)
    assert ckpt.step == 4 and all(torch.isfinite(t).all() for t in ckpt.model.values())
    assert json.loads((tmp_path / "summary.json").read_text())["diverged"] is True


def test_metrics_up_to_a_checkpoint_reach_the_disk_before_it(tmp_path, monkeypatch):
    import vitlinearizer.engine as engine

    events = []
    real_save = engine.save_training_checkpoint

    def fsync(path):
        if path.name == "metrics.jsonl":
            logged = [json.loads(line)["step"] for line in path.read_text().splitlines()]
            events.append(("fsync", max(logged, default=0)))

    def save(root, step, *args, **kwargs):
        events.append(("checkpoint", step))
        return real_save(root, step, *args, **kwargs)

    monkeypatch.setattr(engine, "fsync_path", fsync)
    monkeypatch.setattr(engine, "save_training_checkpoint", save)
    W.train(tmp_path, cfg={"accum_steps": 1, "epochs": 1, "save_every_steps": 4})
    checkpoints = [i for i, (kind, _) in enumerate(events) if kind == "checkpoint"]
    assert [events[i][1] for i in checkpoints] == [4, 8, 12]
    for i in checkpoints:  # each checkpoint follows an fsync of a log that reached its step
        assert events[i - 1][0] == "fsync" and events[i - 1][1] == events[i][1]


# --------------------------------------------------------------------------- outputs


def test_frozen_teacher_untouched_and_never_checkpointed(tmp_path):
    task = W.make_task()
    before = {k: v.clone() for k, v in task.teacher.state_dict().items()}
    evals = []
    summary, trainer = W.train(tmp_path, task=task, eval_fn=lambda m: evals.append(m.training) or {"acc": 1.0})
    assert_same(task.teacher.state_dict(), before)  # incl. BatchNorm running stats: kept in eval mode
    model, ema = W.final_state(tmp_path)
    assert not any(k.startswith("teacher.") for k in model) and "student.0.weight" in model
    assert set(ema) == set(task.student.state_dict())
    assert torch.load(trainer.last_checkpoint / STATE_FILE, weights_only=True)["step"] == 12
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_lines = [l for l in lines if "loss" in l]
    assert [l["step"] for l in train_lines] == [2, 4, 6, 8, 10, 12]
    assert {"lr", "ce", "kd", "images_per_s", "epoch"} <= train_lines[0].keys()
    assert [l["eval"] for l in lines if "eval" in l] == [{"acc": 1.0}] * 2 and evals == [False, False]
    assert summary["last_eval"] == {"acc": 1.0} and (tmp_path / "summary.json").exists()
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000012"
    assert len(list_checkpoints(tmp_path / "checkpoints")) == 2  # keep_checkpoints default


def test_ema_warmup_follows_the_student_at_first_and_resume_refuses_a_change(tmp_path):
    cfg = {"ema_decay": 0.9999, "epochs": 1, "accum_steps": 1, "save_every_steps": 4}
    _, plain = W.train(tmp_path / "plain", cfg=cfg)
    _, warm = W.train(tmp_path / "warm", cfg={**cfg, "ema_warmup": True})
    def gap(trainer):  # how far the exported EMA is from the trained student
        ema = dict(trainer.ema.module.named_parameters())
        return max((p - ema[n]).abs().max().item() for n, p in trainer.student.named_parameters())
    # 12 steps at 0.9999 leave the EMA at its initial weights; warmed up (decay ~0.8 at step 12), it follows.
    assert gap(warm) < 0.2 * gap(plain)
    with pytest.raises(CheckpointError, match="ema_warmup"):
        W.train(tmp_path / "warm", cfg={**cfg, "ema_warmup": False}, resume=True)


def test_bf16_autocast_runs(tmp_path):
    summary, _ = W.train(tmp_path, cfg={"amp": "bf16", "epochs": 1, "accum_steps": 1})
    assert summary["steps"] == 12 and math.isfinite(summary["final_metrics"]["loss"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_ranks_match_single_process_double_batch(tmp_path):
    cfg = {"epochs": 1, "batch_size": 2, "accum_steps": 2}
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        procs.append(FORK.Process(target=W.main, args=(str(tmp_path / "ddp"), False, cfg, {"dropout": 0.0}, env)))
        procs[-1].start()
    assert [_join(p) for p in procs] == [0, 0]
    W.train(tmp_path / "single", cfg={**cfg, "batch_size": 4}, task=W.make_task(dropout=0.0))
    ddp, single = W.final_state(tmp_path / "ddp"), W.final_state(tmp_path / "single")
    for a, b in zip(ddp, single):
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    assert json.loads((tmp_path / "ddp" / "summary.json").read_text())["world_size"] == 2


def test_evaluate_classifier_top1_top5():
    model = nn.Linear(3, 6)
    with torch.no_grad():  # logits: x_0, x_1, x_2, 0.3, 0.2, 0.1 (no ties)
        model.weight.copy_(torch.eye(6, 3))
        model.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.3, 0.2, 0.1]))
    x = torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, 1.0], [1.0, 2.0, 3.0], [-1.0, -2.0, -3.0]])
    y = torch.tensor([0, 1, 5, 4])  # hit, hit, outside the top 5, only in the top 5
    out = evaluate_classifier(model, TensorDataset(x, y), batch_size=3)
    assert out["n"] == 4 and out["top1"] == pytest.approx(50.0) and out["top5"] == pytest.approx(75.0)
    expected = torch.nn.functional.cross_entropy(model(x), y).item()
    assert out["loss"] == pytest.approx(expected, rel=1e-5) and model.training


# --------------------------------------------------------------------------- timm's task protocol


CLASSES_TIMM = 3


def _tiny_vit():
    import timm
    return timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=8, depth=1, embed_dim=16, num_heads=2,
                             num_classes=CLASSES_TIMM)


def test_trainer_trains_timm_own_distillation_task(tmp_path):
    """timm's LogitDistillationTask trains its ``trainable_module``; its teacher, given as a module with
    requires_grad=True, is frozen as timm's prepare_distributed would, and never checkpointed; the batch
    logits it returns as ``output`` are not logged."""
    from timm.task import LogitDistillationTask

    torch.manual_seed(0)
    student, teacher = _tiny_vit(), _tiny_vit()
    task = LogitDistillationTask(student, teacher, criterion=nn.CrossEntropyLoss(), task_loss_weight=0.5,
                                 verbose=False)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(16, 3, 16, 16, generator=g), torch.randint(0, CLASSES_TIMM, (16,), generator=g))
    summary, trainer = W.train(tmp_path, task=task, cfg={"epochs": 1, "accum_steps": 1, "log_every": 1},
                               dataset=data)
    assert summary["steps"] == 4 and not any(p.requires_grad for p in teacher.parameters())
    assert_same(teacher.state_dict(), teacher_before)
    assert any(not torch.equal(student.state_dict()[k], v) for k, v in student_before.items())
    model, ema = W.final_state(tmp_path)
    assert set(model) == {f"trainable_module.{k}" for k in student.state_dict()}
    assert set(ema) == set(student.state_dict())
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    assert {"task_loss", "kd_loss"} <= lines[0].keys() and "output" not in lines[0]


def test_trainer_needs_the_task_to_name_its_model(tmp_path):
    from timm.task import TrainingTask

    class Bare(TrainingTask):  # get_trainable_module() falls back to the task itself
        def __init__(self):
            super().__init__(verbose=False)
            self.net = nn.Linear(W.DIM, W.CLASSES)

        def forward(self, x, y):
            return {"loss": F.cross_entropy(self.net(x), y)}

    with pytest.raises(TypeError, match="get_trainable_module"):
        W.train(tmp_path, task=Bare())


# --------------------------------------------------------------------------- resuming what changed or finished


def _metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the rates, which depend on the machine's speed."""
    return [{k: v for k, v in json.loads(l).items() if k != "images_per_s"}
            for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_resume_within_a_logging_window_logs_what_an_uninterrupted_run_logs(tmp_path):
    W.train(tmp_path / "whole")
    # SIGTERM during forward call 5: the checkpoint at step 3 falls between the log lines of steps 2 and 4.
    with pytest.raises(TrainingInterrupted) as info:
        W.train(tmp_path / "cut", task=W.make_task(signal_at_call=5))
    assert info.value.checkpoint.name == "step_00000003"
    summary, _ = W.train(tmp_path / "cut", resume=True)
    assert _metrics(tmp_path / "cut") == _metrics(tmp_path / "whole")
    assert summary["final_metrics"]["loss"] == json.loads((tmp_path / "whole" / "summary.json").read_text())[
        "final_metrics"]["loss"]


def test_resuming_a_finished_run_keeps_its_results(tmp_path):
    first, _ = W.train(tmp_path, eval_fn=lambda m: {"acc": 0.5})
    again, _ = W.train(tmp_path, resume=True, eval_fn=lambda m: {"acc": 0.5})
    assert again["steps"] == first["steps"] == 12 and not again["interrupted"]
    assert again["final_metrics"] == first["final_metrics"] and again["last_eval"] == {"acc": 0.5}
    # Over the whole run, not the seconds of the process that only found the run finished.
    assert again["wall_time_s"] > 0.5 * first["wall_time_s"] and again["images_per_s"] < 2 * first["images_per_s"]


def test_a_signal_after_the_last_step_still_stops_the_run(tmp_path):
    def eval_fn(model):
        if evals.append(1) or len(evals) == 2:  # the final epoch's evaluation
            os.kill(os.getpid(), signal.SIGINT)
        return {"acc": 1.0}

    evals = []
    with pytest.raises(TrainingInterrupted) as info:
        W.train(tmp_path, eval_fn=eval_fn)
    assert info.value.exit_code == 130 and info.value.checkpoint.name == "step_00000012"
    assert json.loads((tmp_path / "summary.json").read_text())["interrupted"] is True
    summary, _ = W.train(tmp_path, resume=True)  # nothing left to train: completes, results kept
    assert not summary["interrupted"] and summary["last_eval"] == {"acc": 1.0}


@pytest.mark.parametrize("change,named", [
    ({"n": 40}, "dataset_len"),  # fewer samples: other batches, and a mid-epoch position that may not exist
    ({"cfg": {"lr": 0.05}}, "lr"),
    ({"cfg": {"epochs": 3}}, "epochs"),  # the cosine schedule was laid out for 2
])
def test_resume_refuses_changed_data_or_schedule(tmp_path, change, named):
    with pytest.raises(TrainingInterrupted):
        W.train(tmp_path, task=W.make_task(signal_at_call=7))
    with pytest.raises(CheckpointError, match=rf"cannot resume .*'{named}'"):
        W.train(tmp_path, resume=True, **change)


@pytest.mark.parametrize("cfg,fixes", [
    ({"batch_size": 32, "accum_steps": 1}, {"batch_size": 29, "drop_last": False}),
    ({"batch_size": 32, "accum_steps": 2}, {"batch_size": 14}),  # drop_last false alone leaves 1 batch < 2
    ({"batch_size": 32, "accum_steps": 2, "drop_last": False}, {"batch_size": 14, "accum_steps": 1}),
])
def test_a_dataset_smaller_than_one_step_names_the_options_that_fix_it(tmp_path, cfg, fixes):
    from vitlinearizer.engine import Trainer

    def trainer(**override):
        config = TrainConfig(**{**W.BASE_CFG, "warmup_steps": 0, **cfg, **override})
        return Trainer(W.make_task(), W.AugDataset(29), config, tmp_path, device="cpu")

    with pytest.raises(ValueError, match=r"the dataset \(29 samples\) is too small for one step") as err:
        trainer()
    message = str(err.value)
    named = {"batch_size": f"--train.batch_size ({fixes.get('batch_size')} fits)",
             "drop_last": "--train.drop_last false",
             "accum_steps": f"--train.accum_steps ({fixes.get('accum_steps')} fits)"}
    for field, text in named.items():
        assert (text in message) == (field in fixes), (field, message)
    for field, value in fixes.items():  # every option named really gives a step
        assert trainer(**{field: value}).steps_per_epoch >= 1
