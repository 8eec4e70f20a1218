"""Tiny task, dataset and training entry point shared by the engine tests.

Run in a forked child by the tests (fast: torch is already imported), or by hand:
``torchrun --nproc_per_node 2 tests/_engine_worker.py RUN_DIR '{"batch_size": 2}' [--resume]``.
Exit status: 0 when training finished, ``128 + signum`` when interrupted by a signal.
"""
from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from vitlinearizer.checkpoint import load_latest_checkpoint
from vitlinearizer.engine import TrainConfig, Trainer, TrainingInterrupted, cleanup_distributed

DIM, CLASSES = 8, 4


class AugDataset(Dataset):
    """Synthetic vectors whose augmentation draws from torch, python and numpy global RNGs,
    so only the engine's per-sample seeding makes it reproducible."""

    def __init__(self, n: int = 48):
        g = torch.Generator().manual_seed(1234)
        self.x = torch.randn(n, DIM, generator=g)
        self.y = torch.randint(0, CLASSES, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        x = self.x[i] + 0.1 * torch.randn(DIM)
        if random.random() < 0.5:
            x = x.flip(0)
        return x * float(np.random.uniform(0.8, 1.2)), self.y[i]


class ToyTask(nn.Module):
    """Student MLP (with dropout, a no-decay 2-D `pos` parameter) plus a frozen teacher with
    BatchNorm buffers. ``nan_calls``: forward-call indices whose loss becomes NaN
    (and every call from ``nan_from`` on); ``nan_grad_calls``: calls whose loss stays finite but whose gradient is
    NaN; ``signal_at_call``: send SIGTERM to ourselves then."""

    frozen_prefixes = ("teacher.",)

    def __init__(self, dropout: float = 0.1, sleep: float = 0.0, nan_calls=(), nan_from=None,
                 signal_at_call=None, nan_grad_calls=()):
        super().__init__()
        self.student = nn.Sequential(nn.Linear(DIM, 16), nn.LayerNorm(16), nn.GELU(), nn.Dropout(dropout),
                                     nn.Linear(16, CLASSES))
        self.pos = nn.Parameter(torch.zeros(1, DIM))
        self.teacher = nn.Sequential(nn.Linear(DIM, CLASSES), nn.BatchNorm1d(CLASSES))
        self.teacher.requires_grad_(False)
        self.sleep, self.nan_calls, self.nan_from = sleep, set(nan_calls), nan_from
        self.nan_grad_calls = set(nan_grad_calls)
        self.signal_at_call, self.calls, self.weights_seen = signal_at_call, 0, []

    def no_weight_decay(self):
        return {"pos"}

    def forward(self, images, targets):
        call, self.calls = self.calls, self.calls + 1
        self.weights_seen.append(self.student[0].weight.detach().clone())
        if self.sleep:
            time.sleep(self.sleep)
        if self.signal_at_call is not None and call == self.signal_at_call:
            os.kill(os.getpid(), signal.SIGTERM)
        logits = self.student(images + self.pos)
        with torch.no_grad():
            t = self.teacher(images)
        ce = F.cross_entropy(logits, targets)
        kd = F.mse_loss(logits, t)
        loss = ce + 0.1 * kd
        if call in self.nan_calls or (self.nan_from is not None and call >= self.nan_from):
            loss = loss * float("nan")
        if call in self.nan_grad_calls:  # adds sqrt(0) = 0, whose gradient is inf * 0 = NaN
            loss = loss + (self.pos.abs().sum() * 0).sqrt()
        return {"loss": loss, "ce": ce, "kd": kd}


def make_task(**kw) -> ToyTask:
    torch.manual_seed(0)  # identical init (and identical, never-checkpointed teacher) every time
    return ToyTask(**kw)


BASE_CFG = dict(epochs=2, batch_size=4, lr=1e-2, min_lr=1e-4, warmup_steps=2, weight_decay=0.05,
                accum_steps=2, ema_decay=0.9, seed=7, log_every=2, clip_grad=1.0, progress=False)


def train(run_dir, resume=False, cfg=None, task=None, n=48, eval_fn=None, dataset=None):
    """Build and fit a trainer; returns (summary, trainer)."""
    task = task if task is not None else make_task()
    dataset = dataset if dataset is not None else AugDataset(n)
    trainer = Trainer(task, dataset, TrainConfig(**{**BASE_CFG, **(cfg or {})}), run_dir,
                      eval_fn=eval_fn, device="cpu")
    return trainer.fit(resume=resume), trainer


def final_state(run_dir):
    """(model, ema) state dicts of the newest checkpoint."""
    ckpt = load_latest_checkpoint(Path(run_dir) / "checkpoints")
    return ckpt.model, ckpt.ema


def main(run_dir: str, resume: bool, cfg: dict, task_kw: dict, env: dict | None = None) -> None:
    """Child-process entry: train and exit with the documented status."""
    # A forked child must not reuse the parent's OpenMP pool (it can deadlock); the toy
    # tensors are far below torch's parallel grain size, so results do not change.
    torch.set_num_threads(1)
    os.environ.update(env or {})
    try:
        train(run_dir, resume=resume, cfg=cfg, task=make_task(**task_kw))
    except TrainingInterrupted as e:
        sys.exit(e.exit_code)
    finally:
        cleanup_distributed()
    sys.exit(0)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--resume"]
    main(args[0], resume="--resume" in sys.argv, cfg=json.loads(args[1]) if len(args) > 1 else {},
         task_kw={"dropout": 0.0})
