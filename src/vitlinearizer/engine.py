"""Generic, resumable training loop: trains a *task* (see :class:`Task`), knowing nothing of
teachers or losses. A run killed anywhere and resumed with ``fit(resume=True)`` ends with exactly
the weights of an uninterrupted run (CPU, same thread count): data order, per-sample augmentation
randomness and all optimiser/EMA/RNG state depend on the checkpointed position only.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import signal
import threading
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.task import TrainingTask
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, default_collate
from tqdm.auto import tqdm

from .checkpoint import (CheckpointError, fsync_path, list_checkpoints, load_latest_checkpoint, restore_training_state,
                         save_training_checkpoint, write_text_atomic)
from .optim import WarmupCosine, build_optimizer, build_scheduler, param_groups, trained_module
from .seeding import (EpochBatchSampler, SeededDataset, derive_seed, gather_rng_states, restore_rng_state, seed_all,
                      worker_ignore_sigint)

__all__ = [
    "Task", "TrainConfig", "Trainer", "TrainingDivergedError", "TrainingInterrupted",
    "WarmupCosine", "build_scheduler", "EpochBatchSampler", "SeededDataset", "build_optimizer",
    "param_groups", "init_distributed", "cleanup_distributed", "evaluate_classifier", "trained_module",
]


class Task(Protocol):
    """What :class:`Trainer` trains: timm's task protocol (:class:`timm.task.TrainingTask`), an ``nn.Module`` with

    * ``forward(images, targets) -> dict[str, Tensor]``: scalar ``"loss"`` (minimised) and optional
      other scalars (averaged over good steps, logged as floats); tensors that are not scalars, such as
      timm's ``"output"`` logits, are not logged;
    * the model trained and exported, which EMA tracks: ``get_trainable_module()`` for a
      ``TrainingTask`` (timm's own tasks: ``trainable_module``; ours: ``student``), else ``student``;
    * optional ``frozen_prefixes`` (default ``()``; ``("teacher.",)`` for a ``TrainingTask`` with a
      ``teacher``, which is then frozen as timm's ``prepare_distributed`` does): parameters there must
      have ``requires_grad=False``; kept in eval mode, never checkpointed;
    * optional ``no_weight_decay() -> set[str]`` of full names (relative to the task); the trained
      model's own ``no_weight_decay()`` (timm models) is honoured under its name in the task.
    """

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]: ...


class TrainingDivergedError(RuntimeError):
    """``max_bad_steps`` consecutive steps had a non-finite loss or gradient norm."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM stopped training after writing ``checkpoint`` (a Path, or None if
    impossible). ``exit_code`` is the conventional status ``128 + signum`` (130 / 143)."""

    def __init__(self, signum: int, checkpoint: Optional[Path]):
        super().__init__(f"training interrupted by {signal.Signals(signum).name}; checkpoint: {checkpoint}")
        self.signum, self.checkpoint, self.exit_code = signum, checkpoint, 128 + signum


@dataclasses.dataclass
class TrainConfig:
    """Optimisation settings. ``batch_size`` is per process: one optimiser step consumes
    ``batch_size * accum_steps * world_size`` samples."""

    epochs: int = 1
    batch_size: int = 32
    lr: float = 1e-3
    min_lr: float = 1e-6
    warmup_epochs: float = 0.0
    warmup_steps: Optional[int] = None  # overrides warmup_epochs when set
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    clip_grad: Optional[float] = None  # None or 0: off
    accum_steps: int = 1
    amp: str = "none"  # "none" | "bf16"
    ema_decay: float = 0.0  # 0: off
    # The EMA's decay ramps up from 0 (timm's use_warmup: 1 - (1 + step)^(-2/3), capped at ema_decay): a short run
    # with a decay of 0.9999 would otherwise export weights still mostly at their initial values.
    ema_warmup: bool = False
    layer_decay: float = 1.0  # < 1: layer-wise lr decay (BEiT), lr * layer_decay**(depth - layer); 1: off
    seed: int = 0
    num_workers: int = 0
    log_every: int = 50
    save_checkpoints: bool = True  # False: no checkpoints at all (dry runs; such a run cannot resume)
    save_every_steps: int = 0  # 0: only at epoch ends (always saved there)
    max_bad_steps: int = 10
    keep_checkpoints: int = 2  # 0: keep all
    drop_last: bool = True
    progress: bool = True  # tqdm bar on rank 0
    final_test: bool = True  # runner: test the exported classifier on the data's test split at the end

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # YAML/JSON give lists
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid field and what is allowed."""
        def need(ok: bool, field: str, allowed: str) -> None:
            if not ok:
                raise ValueError(f"train.{field} must be {allowed}, got {getattr(self, field)!r}")
        for f in ("epochs", "batch_size", "accum_steps", "log_every", "max_bad_steps"):
            need(isinstance(getattr(self, f), int) and getattr(self, f) >= 1, f, "an integer >= 1")
        for f in ("save_checkpoints", "drop_last", "progress", "final_test"):
            need(isinstance(getattr(self, f), bool), f, "true or false")
        for f in ("num_workers", "save_every_steps", "keep_checkpoints", "seed"):
            need(isinstance(getattr(self, f), int) and getattr(self, f) >= 0, f, "an integer >= 0")
        need(self.lr > 0, "lr", "> 0")
        need(0 <= self.min_lr <= self.lr, "min_lr", f"in [0, lr={self.lr}]")
        need(self.warmup_epochs >= 0, "warmup_epochs", ">= 0")
        need(self.warmup_steps is None or (isinstance(self.warmup_steps, int) and self.warmup_steps >= 0),
             "warmup_steps", "None or an integer >= 0")
        need(self.weight_decay >= 0, "weight_decay", ">= 0")
        need(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas", "two floats in [0, 1)")
        need(self.eps > 0, "eps", "> 0")
        need(self.clip_grad is None or self.clip_grad >= 0, "clip_grad", "None, 0 (off) or > 0")
        need(self.amp in ("none", "bf16"), "amp", "one of 'none', 'bf16'")
        need(0 <= self.ema_decay < 1, "ema_decay", "in [0, 1) (0 = off)")
        need(0 < self.layer_decay <= 1, "layer_decay", "in (0, 1] (1 = off)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """Build from a mapping, rejecting unknown keys (typos) with the allowed names."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s) {unknown}; allowed: {sorted(names)}")
        return cls(**d)


# --------------------------------------------------------------------------- distributed


def init_distributed() -> tuple[int, int, int]:
    """Join the process group if launched by ``torchrun`` (NCCL on CUDA, else gloo); return
    ``(rank, world_size, local_rank)``. Idempotent; ``(0, 1, 0)`` without ``RANK``/``WORLD_SIZE``."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), local_rank
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, 0
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size(), local_rank


def cleanup_distributed() -> None:
    """Destroy the process group if one is active (once, at program end)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# --------------------------------------------------------------------------- trainer


def _too_small_fixes(n: int, cfg: TrainConfig, world_size: int) -> str:
    """The settings that would give a dataset of ``n`` samples at least one optimiser step per epoch (as
    EpochBatchSampler counts them), phrased as command-line options."""
    b, a, w = cfg.batch_size, cfg.accum_steps, world_size
    fixes = []
    if n // (a * w) >= 1:  # with drop_last, a step needs accum_steps x world_size full batches
        fixes.append(f"a smaller --train.batch_size ({n // (a * w)} fits)")
    if cfg.drop_last and math.ceil(n / (b * w)) >= a:
        fixes.append("--train.drop_last false (an epoch then ends with an incomplete batch)")
    reach = math.ceil(n / (b * w)) if not cfg.drop_last else n // (b * w)
    if a > 1 and reach >= 1:
        fixes.append(f"a smaller --train.accum_steps ({reach} fits)")
    if not fixes:
        return "add training images" + (", or pass --train.drop_last false with a smaller --train.accum_steps"
                                        if a > 1 else "")
    return "pass " + ", or ".join(fixes) + "; or add training images"


class Trainer:
    """Trains a :class:`Task` with AdamW, warm-up + cosine LR, EMA, bf16 autocast and DDP.

    Args:
        task: The task module; moved to ``device``.
        train_dataset: Map-style dataset of ``(image, target, ...)`` tuples; its random
            augmentation is made reproducible by :class:`SeededDataset`.
        cfg: Optimisation settings.
        run_dir: Output directory: ``checkpoints/``, ``metrics.jsonl``, ``summary.json``.
        eval_fn: Optional ``eval_fn(student_or_ema) -> dict`` run on rank 0 after each
            epoch, with the EMA student when EMA is on.
        device: Default ``cuda:LOCAL_RANK`` when CUDA is available, else CPU.

    Under ``torchrun`` this joins the process group; call :func:`cleanup_distributed` at the end.
    """

    def __init__(self, task: nn.Module, train_dataset: Dataset, cfg: TrainConfig, run_dir: Union[str, os.PathLike],
                 eval_fn: Optional[Callable[[nn.Module], dict]] = None, device: Union[str, torch.device, None] = None):
        cfg.validate()
        _, self.student = trained_module(task)
        self.rank, self.world_size, self.local_rank = init_distributed()
        cuda = torch.cuda.is_available()
        self.device = torch.device(device if device is not None else f"cuda:{self.local_rank}" if cuda else "cpu")
        self.task, self.cfg, self.eval_fn = task.to(self.device), cfg, eval_fn
        self.frozen = tuple(getattr(task, "frozen_prefixes", ()))
        if not self.frozen and isinstance(task, TrainingTask) and isinstance(getattr(task, "teacher", None), nn.Module):
            task.teacher.requires_grad_(False)  # as timm's prepare_distributed: DDP would wait for its gradients
            self.frozen = ("teacher.",)
        trained = [n for n, p in task.named_parameters() if p.requires_grad and n.startswith(self.frozen)]
        if trained:
            raise ValueError(f"parameters under frozen_prefixes must have requires_grad=False: {trained[:5]}")
        self.run_dir, self.ckpt_dir = Path(run_dir), Path(run_dir) / "checkpoints"
        self.dataset = SeededDataset(train_dataset, cfg.seed)
        self.sampler = EpochBatchSampler(len(train_dataset), cfg.batch_size, cfg.seed, self.rank, self.world_size,
                                         cfg.drop_last, cfg.accum_steps)
        self.steps_per_epoch = self.sampler.steps_per_epoch
        if self.steps_per_epoch < 1:
            raise ValueError(f"the dataset ({len(train_dataset)} samples) is too small for one step of batch_size="
                             f"{cfg.batch_size} x accum_steps={cfg.accum_steps} x world_size={self.world_size}; "
                             + _too_small_fixes(len(train_dataset), cfg, self.world_size))
        self.optimizer = build_optimizer(task, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg, self.steps_per_epoch)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.model: nn.Module = task
        if self.world_size > 1:  # wrapping broadcasts rank 0's weights, so build the EMA afterwards
            self.model = DistributedDataParallel(task, device_ids=[self.local_rank] if cuda else None)
        self.ema = (ModelEmaV3(self.student, decay=cfg.ema_decay, use_warmup=cfg.ema_warmup) if cfg.ema_decay > 0
                    else None)
        self.epoch = self.step = self.step_in_epoch = self.bad_steps = self._consecutive_bad = 0
        self.last_checkpoint: Optional[Path] = None
        self._saved_step, self._stop_signal, self._last_log, self._last_eval = -1, None, {}, None
        self._window = _fresh_window(0.0)
        self._t0 = time.perf_counter()
        self._run_time_before = 0.0  # training seconds of earlier processes of this run (resumed)
        self._images = 0  # images trained on in this run, over every process (resumed)

    def fit(self, resume: bool = False) -> dict[str, Any]:
        """Train to ``cfg.epochs``; return the summary also written to ``summary.json``.

        Args:
            resume: Continue from the newest valid checkpoint (fresh start, with a warning, if none).

        Raises:
            TrainingInterrupted: SIGINT/SIGTERM arrived; a checkpoint was written first.
            TrainingDivergedError: Too many consecutive non-finite steps; nothing saved after the last good one.
        """
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        earlier = list_checkpoints(self.ckpt_dir)
        if earlier and not resume:
            # Starting over would delete them (only the newest are kept) and mix two runs' metrics.
            raise CheckpointError(
                f"{self.run_dir} holds checkpoints of an earlier run (newest: {earlier[-1].name}); pass --resume "
                "(Trainer.fit(resume=True)) to continue it, or another --output_dir (run_dir) to start over")
        if resume and self._resume():
            self._trim_metrics(self.step)
        else:
            seed_all(derive_seed(self.cfg.seed, self.rank, 2))
            self._trim_metrics(-1)  # a fresh run: records of an earlier one without checkpoints go
        self._t0, self._stop_signal, previous = time.perf_counter(), None, {}
        if threading.current_thread() is threading.main_thread():  # signal.signal works only there
            previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            interrupted = self._train()
            self._save(force=True)
            # A signal during the last evaluation or checkpoint write came after the last step: the run is complete
            # on disk, but the user asked to stop, which takes precedence over exporting and testing.
            interrupted = interrupted or self._stop_signal is not None
        except TrainingDivergedError:
            self._write_summary(interrupted=False, diverged=True)
            raise
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        summary = self._write_summary(interrupted=interrupted, diverged=False)
        if interrupted:
            raise TrainingInterrupted(self._stop_signal, self.last_checkpoint)
        return summary

    def _on_signal(self, signum, frame) -> None:
        if self._stop_signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once, without a checkpoint
        self._stop_signal = signum  # acted on at the next step boundary

    def _train(self) -> bool:
        """Run the remaining epochs; True when stopped by a signal."""
        cfg = self.cfg
        while self.epoch < cfg.epochs:
            self._set_train_mode()
            self.sampler.set_epoch(self.epoch, self.step_in_epoch * cfg.accum_steps)
            # Own generator: creating the iterator must not draw from the global RNG, or a
            # mid-epoch resume would shift the task's random stream (dropout, masking).
            loader = DataLoader(self.dataset, batch_sampler=self.sampler, num_workers=cfg.num_workers,
                                pin_memory=self.device.type == "cuda",
                                worker_init_fn=worker_ignore_sigint if cfg.num_workers else None,
                                generator=torch.Generator().manual_seed(derive_seed(cfg.seed, self.epoch, 1)))
            bar = tqdm(total=self.steps_per_epoch, initial=self.step_in_epoch, dynamic_ncols=True,
                       desc=f"epoch {self.epoch + 1}/{cfg.epochs}", disable=self.rank != 0 or not cfg.progress)
            self._window["t"] = time.perf_counter()  # the rate counts this process's time only
            batches, stop = iter(loader), False
            try:
                while self.step_in_epoch < self.steps_per_epoch:
                    stop = self._train_step(batches)
                    bar.update(1)
                    if self.step % cfg.log_every == 0 or self.step_in_epoch == self.steps_per_epoch:
                        self._log(bar)
                    if stop or self.step_in_epoch == self.steps_per_epoch:
                        break
                    if cfg.save_every_steps and self.step % cfg.save_every_steps == 0:
                        self._save()
            finally:
                bar.close()
                del batches  # shut workers down before the next epoch starts new ones
            if self.step_in_epoch == self.steps_per_epoch:
                self.epoch, self.step_in_epoch = self.epoch + 1, 0
                try:
                    self._evaluate()
                except Exception:
                    # The epoch's training is kept even when its evaluation fails (a bad holdout file, out of
                    # memory): a resume goes on from here. Not under DDP, where saving is collective and the other
                    # ranks wait in the evaluation's barrier.
                    if self.world_size == 1:
                        self._save(force=True)
                    raise
                self._save()
            if stop:
                self._save(force=True)
                return True
        return False

    def _train_step(self, batches) -> bool:
        """One optimiser step over ``accum_steps`` micro-batches; True if a stop was requested."""
        cfg, w = self.cfg, self._window
        sums: dict[str, torch.Tensor] = {}
        for i in range(cfg.accum_steps):
            images, targets = (t.to(self.device, non_blocking=True) for t in next(batches)[:2])
            sync = self.world_size == 1 or i == cfg.accum_steps - 1  # all-reduce grads once per step
            with nullcontext() if sync else self.model.no_sync():
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.amp == "bf16"):
                    out = self.model(images, targets)
                if not isinstance(out, dict) or "loss" not in out or out["loss"].ndim != 0:
                    raise ValueError("the task's forward must return a dict with a scalar 'loss'")
                # Backward even for a NaN loss: under DDP every rank must join the all-reduce.
                (out["loss"].float() / cfg.accum_steps).backward()
            for k, v in out.items():
                v = torch.as_tensor(v)
                if v.numel() == 1:  # not the batch's logits (timm tasks return them as "output")
                    sums[k] = sums.get(k, 0.0) + v.detach().float().reshape(()) / cfg.accum_steps
            w["images"] += images.shape[0] * self.world_size
            self._images += images.shape[0] * self.world_size
        flags = torch.stack([(~torch.isfinite(sums["loss"])).float(),
                             torch.tensor(float(self._stop_signal is not None), device=self.device)])
        if self.world_size > 1:  # all ranks must skip (and stop) at the same step
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        bad, stop = (bool(f) for f in flags.tolist())
        if not bad:  # grads are synced here, so every rank decides alike
            # A finite loss can still give inf/NaN gradients (e.g. sqrt at 0): never step on them, clipping or not.
            norm = (nn.utils.clip_grad_norm_(self.params, cfg.clip_grad) if cfg.clip_grad
                    else nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None]))
            bad = not math.isfinite(float(norm))
        w["lr"] = max(self.scheduler.get_last_lr())  # the unscaled lr (layer decay scales the rest down)
        if bad:
            self.bad_steps, self._consecutive_bad = self.bad_steps + 1, self._consecutive_bad + 1
        else:
            self.optimizer.step()
            if self.ema is not None:  # without the step, timm applies ema_decay from the first update
                self.ema.update(self.student, step=self.step if self.cfg.ema_warmup else None)
            self._consecutive_bad, w["good"] = 0, w["good"] + 1
            for k, v in sums.items():
                w["sums"][k] = w["sums"].get(k, 0.0) + v
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()  # the schedule follows the data position, so skipped steps advance it
        self.step, self.step_in_epoch = self.step + 1, self.step_in_epoch + 1
        if self._consecutive_bad >= cfg.max_bad_steps:
            raise TrainingDivergedError(
                f"training diverged: {self._consecutive_bad} consecutive steps with a non-finite loss or gradient "
                f"norm (up to step {self.step}, epoch {self.epoch}); the last good checkpoint is "
                f"{self.last_checkpoint or 'none (none was written)'}. Lower lr, set clip_grad or check the data.")
        return stop

    def _set_train_mode(self) -> None:
        self.task.train()
        for prefix in self.frozen:  # frozen parts (teachers) keep eval-mode norms and dropout
            try:
                self.task.get_submodule(prefix.rstrip(".")).eval()
            except AttributeError:
                pass

    def _log(self, bar) -> None:
        w, now = self._window, time.perf_counter()
        scalars = {k: float(v) / w["good"] for k, v in w["sums"].items()} if w["good"] else {"loss": float("nan")}
        rec = {"step": self.step, "epoch": self.epoch + self.step_in_epoch / self.steps_per_epoch, "lr": w["lr"],
               **scalars, "images_per_s": w["images"] / max(now - w["t"], 1e-9), "bad_steps": self.bad_steps}
        self._last_log, self._window = rec, _fresh_window(now, w["lr"])
        if self.rank == 0:
            bar.set_postfix(loss=f"{rec['loss']:.4g}", lr=f"{rec['lr']:.3g}", img_s=f"{rec['images_per_s']:.1f}")
            self._append_metrics(rec)

    def _trim_metrics(self, step: int) -> None:
        """Keep only the metrics records up to ``step``: a resumed run logs the steps after its checkpoint again."""
        path = self.run_dir / "metrics.jsonl"
        if self.rank != 0 or not path.is_file():
            return
        lines = path.read_text().splitlines(keepends=True)
        kept = [line for line in lines if (logged := _logged_step(line)) is not None and logged <= step]
        if len(kept) != len(lines):
            write_text_atomic(path, "".join(kept))

    def _append_metrics(self, rec: dict[str, Any]) -> None:
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")

    def _evaluate(self) -> None:
        if self.eval_fn is None:
            return
        if self.rank == 0:
            result = self.eval_fn(self.ema.module if self.ema is not None else self.student)
            # Plain numbers for JSON (tensors and numpy scalars have .item()); a count stays an int.
            self._last_eval = {k: v.item() if hasattr(v, "item") else v for k, v in result.items()}
            self._append_metrics({"step": self.step, "epoch": self.epoch, "eval": self._last_eval})
            self._set_train_mode()
        if self.world_size > 1:
            dist.barrier()

    def _save(self, force: bool = False) -> Optional[Path]:
        """Checkpoint the current step on rank 0 (collective under DDP). NaN/Inf weights are never
        written, and routine saves wait out a streak of bad steps so they cannot rotate the last
        good checkpoint away; ``force`` (interrupt, end of training) overrides the latter."""
        if not self.cfg.save_checkpoints or self.step == self._saved_step or (self._consecutive_bad and not force):
            return self.last_checkpoint
        ema = self.ema.module if self.ema is not None else None
        tensors = self.params + (list(ema.parameters()) if ema is not None else [])
        if not bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()):  # weights agree across ranks
            warnings.warn(f"not checkpointing step {self.step}: weights hold NaN/Inf; kept {self.last_checkpoint}")
            return None
        rng, error = gather_rng_states(self.world_size), None  # each rank resumes its own random stream
        if self.rank == 0:
            w = self._window
            state = {"epoch": self.epoch, "step": self.step, "step_in_epoch": self.step_in_epoch,
                     "bad_steps": self.bad_steps, "consecutive_bad": self._consecutive_bad,
                     "world_size": self.world_size, "dataset_len": len(self.dataset), "config": self.cfg.to_dict(),
                     "rng": rng, "last_log": self._last_log, "last_eval": self._last_eval,
                     # the steps since the last log line, so that a resumed run logs the same averages
                     "log_window": {"sums": {k: float(v) for k, v in w["sums"].items()}, "good": w["good"],
                                    "images": w["images"], "lr": w["lr"]},
                     "run_time_s": self._run_time(), "images": self._images}
            # The log up to this step is as durable as the checkpoint: a resume trims later records, never
            # earlier ones, so a power loss must not leave a gap before it.
            fsync_path(self.run_dir / "metrics.jsonl")
            try:
                save_training_checkpoint(self.ckpt_dir, self.step, self.task, self.optimizer, self.scheduler, state,
                                         ema, self.frozen, keep=self.cfg.keep_checkpoints)
            except OSError as e:
                error = e
        if self.world_size > 1:  # doubles as the barrier; the other ranks fail with rank 0
            msg = [str(error) if error else None]
            dist.broadcast_object_list(msg, src=0)
            if msg[0] and error is None:
                raise RuntimeError(f"rank 0 failed to write a checkpoint: {msg[0]}")
        if error is not None:
            raise error
        self._saved_step, self.last_checkpoint = self.step, self.ckpt_dir / f"step_{self.step:08d}"
        return self.last_checkpoint

    def _resume(self) -> bool:
        """Restore everything from the newest valid checkpoint; False when there is none."""
        ckpt = load_latest_checkpoint(self.ckpt_dir)
        if ckpt is None:
            warnings.warn(f"resume requested but no valid checkpoint in {self.ckpt_dir}; starting from scratch")
            return False
        ema, cfg = self.ema.module if self.ema is not None else None, self.cfg
        # The data order depends on these, and the optimiser and its lr schedule (restored from the checkpoint, which
        # fixed their totals and peaks when the run started) on the rest: a change cannot resume exactly.
        expect = dict(batch_size=cfg.batch_size, accum_steps=cfg.accum_steps, seed=cfg.seed, drop_last=cfg.drop_last,
                      world_size=self.world_size, **{k: getattr(cfg, k) for k in _SCHEDULE_FIELDS})
        if "dataset_len" in ckpt.state:  # not recorded by checkpoints of earlier versions
            expect["dataset_len"] = len(self.dataset)
        # These change what every later step computes, or (the EMA's decay, or EMA turned off) which weights are
        # exported. Turning EMA on is allowed: it starts afresh, with a warning below.
        saved = ckpt.state.get("config", {})
        expect["amp"] = cfg.amp
        if (saved.get("clip_grad") or 0) != (cfg.clip_grad or 0):  # None and 0 both mean off
            expect["clip_grad"] = cfg.clip_grad
        if ckpt.ema is not None:
            expect["ema_decay"] = cfg.ema_decay
            if bool(saved.get("ema_warmup", False)) != cfg.ema_warmup:  # checkpoints from before the option: off
                expect["ema_warmup"] = cfg.ema_warmup
        st = restore_training_state(ckpt, self.task, self.optimizer, self.scheduler, ema, self.frozen, expect)
        if ema is not None and ckpt.ema is None:
            warnings.warn(f"{ckpt.path} has no EMA weights; the EMA restarts from the restored student")
            self.ema.set(self.student)
        self.epoch, self.step, self.step_in_epoch = st["epoch"], st["step"], st["step_in_epoch"]
        self.bad_steps, self._consecutive_bad = st["bad_steps"], st["consecutive_bad"]
        self._last_log, self._last_eval = st.get("last_log", {}), st.get("last_eval")
        window = st.get("log_window")
        if window is not None:
            self._window = {**_fresh_window(0.0, window["lr"]), "good": window["good"], "images": window["images"],
                            "sums": {k: torch.tensor(v) for k, v in window["sums"].items()}}
        self._run_time_before, self._images = st.get("run_time_s", 0.0), st.get("images", 0)
        restore_rng_state(st["rng"][self.rank])
        self._saved_step, self.last_checkpoint = self.step, ckpt.path
        return True

    def _run_time(self) -> float:
        """Training seconds over every process of a (resumed) run."""
        return self._run_time_before + time.perf_counter() - self._t0

    def _write_summary(self, interrupted: bool, diverged: bool) -> dict[str, Any]:
        wall = self._run_time()
        summary = {"steps": self.step, "epochs_completed": self.epoch, "bad_steps": self.bad_steps,
                   "interrupted": interrupted, "diverged": diverged, "wall_time_s": wall,
                   "images_per_s": self._images / max(wall, 1e-9), "world_size": self.world_size,
                   "final_metrics": self._last_log, "last_eval": self._last_eval,
                   "checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None}
        if self.rank == 0:
            write_text_atomic(self.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        return summary


def _fresh_window(t: float, lr: float = 0.0) -> dict[str, Any]:
    """Running sums of the steps since the last log line."""
    return {"sums": {}, "good": 0, "images": 0, "t": t, "lr": lr}


# TrainConfig fields the optimiser and lr schedule take their values from when a run starts.
_SCHEDULE_FIELDS = ("epochs", "lr", "min_lr", "warmup_epochs", "warmup_steps", "weight_decay", "betas", "eps",
                    "layer_decay")


def _logged_step(line: str) -> int | None:
    """The step of one metrics.jsonl record; None for a line a crash cut short."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


# --------------------------------------------------------------------------- evaluation


def _collate_loaded(samples: list):
    """default_collate of the samples that loaded (a dataset in ``replace_failed=False`` mode gives None for the
    others); None when none did."""
    samples = [s for s in samples if s is not None]
    return default_collate(samples) if samples else None


@torch.no_grad()  # not inference_mode: tensors a model caches during evaluation must stay usable in training
def evaluate_classifier(model: nn.Module, dataset: Dataset, batch_size: int = 256, amp: str = "none",
                        device: Union[str, torch.device, None] = None, num_workers: int = 0) -> dict[str, float]:
    """``{"top1", "top5", "loss", "n"}``: accuracy in percent (top-5 is top-C for C < 5 classes)
    and mean cross-entropy of a model returning logits; single process."""
    if amp not in ("none", "bf16"):
        raise ValueError(f"amp must be one of 'none', 'bf16', got {amp!r}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    collate = None
    if getattr(dataset, "replace_failed", False):
        # Score each sample of the split once: a file that fails to load is left out, not replaced by the next
        # one. A shallow copy, so the caller's dataset keeps its mode and shares the skip records.
        dataset = copy.copy(dataset)
        dataset.replace_failed = False
        collate = _collate_loaded
    was_training, (n, hits1, hits5, loss) = model.training, (0, 0, 0, 0.0)
    model.eval()
    try:
        for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                collate_fn=collate):
            if batch is None:
                continue
            images, targets = batch[0].to(device), batch[1].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "bf16"):
                logits = model(images)
            logits = (logits[0] if isinstance(logits, (tuple, list)) else logits).float()
            loss += F.cross_entropy(logits, targets, reduction="sum").item()
            hit = logits.topk(min(5, logits.shape[-1]), dim=-1).indices == targets[:, None]
            hits1, hits5, n = hits1 + int(hit[:, 0].sum()), hits5 + int(hit.any(dim=1).sum()), n + len(targets)
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("evaluate_classifier: no sample to score (the dataset is empty, or none of its files "
                         "could be loaded: see its .skipped)")
    return {"top1": 100.0 * hits1 / n, "top5": 100.0 * hits5 / n, "loss": loss / n, "n": n}
