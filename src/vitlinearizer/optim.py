"""What a task trains and how: the model it names (timm's task protocol), AdamW parameter groups (no weight
decay on biases, norms and ``no_weight_decay()`` names; layer-wise lr decay from timm's ``group_matcher``) and the
warm-up + cosine schedule. :class:`vitlinearizer.engine.Trainer` builds its optimiser and schedule from here.
"""
from __future__ import annotations

import fnmatch
import math
import warnings
from typing import TYPE_CHECKING, Any

import torch
from timm.models import group_parameters
from timm.task import TrainingTask
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

if TYPE_CHECKING:
    from .engine import TrainConfig

__all__ = ["trained_module", "student_layer_ids", "param_groups", "build_optimizer", "WarmupCosine", "build_scheduler"]


def trained_module(task: nn.Module) -> tuple[str, nn.Module]:
    """``(name inside the task, module)`` of the model a task trains and exports (see
    :class:`vitlinearizer.engine.Task`)."""
    module = task.get_trainable_module() if isinstance(task, TrainingTask) else getattr(task, "student", None)
    name = next((n for n, m in task.named_modules() if m is module and n), None)
    if not isinstance(module, nn.Module) or name is None:
        raise TypeError("the task must name the model it trains: a timm TrainingTask whose get_trainable_module() "
                        "returns one of its submodules, or a `student` submodule")
    # torch.compile's wrapper: the model's own names (group_matcher, no_weight_decay) and its export are inside it.
    while isinstance(getattr(module, "_orig_mod", None), nn.Module):
        name, module = f"{name}._orig_mod", module._orig_mod
    return name, module


def student_layer_ids(task: nn.Module) -> tuple[dict[str, int], int]:
    """Depth index of each parameter of the trained model (full name in the task) from its timm ``group_matcher``
    (stem 0, block i at i + 1, final norm and head last), and the number of layers; ({}, 1) without a matcher."""
    prefix, student = trained_module(task)
    if not hasattr(student, "group_matcher"):
        return {}, 1
    layers = group_parameters(student, student.group_matcher(coarse=False), reverse=True)
    return {f"{prefix}.{name}": layer for name, layer in layers.items()}, max(layers.values()) + 1


def param_groups(task: nn.Module, weight_decay: float, layer_decay: float = 1.0) -> list[dict[str, Any]]:
    """Trainable parameters as AdamW groups: decayed / not decayed, times one lr scale per layer.

    Biases and norm gains (``ndim <= 1``) and ``no_weight_decay()`` names (tokens,
    position embeddings) are not decayed: pulling them towards zero only hurts. As in timm's optimiser factory,
    a ``no_weight_decay()`` entry may be a wildcard pattern (timm's XCiT returns ``"pos_embed.*"``).
    ``layer_decay`` < 1 scales the lr of student layer i by ``layer_decay ** (last - i)`` (``lr_scale``):
    fine-tuning a pre-trained (distilled) student then adapts the new head fast while the early layers,
    whose features the pre-training paid for, move slowly. Parameters outside the student (heads of the
    task) count as the last layer.
    """
    skip = set(task.no_weight_decay()) if hasattr(task, "no_weight_decay") else set()
    prefix, student = trained_module(task)
    if hasattr(student, "no_weight_decay"):
        skip |= {f"{prefix}.{n}" for n in student.no_weight_decay()}
    patterns = [n for n in skip if any(c in n for c in "*?[")]
    layer_of, num_layers = student_layer_ids(task) if layer_decay < 1.0 else ({}, 1)
    if layer_decay < 1.0 and num_layers == 1:
        raise ValueError("train.layer_decay < 1 needs a student with a timm group_matcher() (its layers); "
                         "this task has none: set train.layer_decay: 1.0")
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, p in task.named_parameters():
        if not p.requires_grad:
            continue
        decayed = not (p.ndim <= 1 or name in skip or any(fnmatch.fnmatchcase(name, pat) for pat in patterns))
        layer = layer_of.get(name, num_layers - 1)
        group = groups.setdefault((layer, decayed), {
            "params": [], "weight_decay": weight_decay if decayed else 0.0,
            "lr_scale": layer_decay ** (num_layers - 1 - layer)})
        group["params"].append(p)
    if not groups:
        raise ValueError("the task has no parameters with requires_grad=True; nothing to train")
    return [groups[key] for key in sorted(groups, key=lambda k: (k[0], not k[1]))]


def build_optimizer(task: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the task's trainable parameters (see :func:`param_groups`); each group's lr is
    ``cfg.lr * lr_scale``, and the schedule multiplies every group's lr alike."""
    groups = param_groups(task, cfg.weight_decay, cfg.layer_decay)
    for group in groups:
        group["lr"] = cfg.lr * group["lr_scale"]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


class WarmupCosine:
    """LR multiplier for ``LambdaLR``: step ``s`` (0-based) gets ``(s + 1) / warmup`` during
    warm-up, then a cosine from 1 down to ``min_ratio`` (= ``min_lr / lr``) at ``total_steps``.
    A plain object rather than a closure, so ``LambdaLR.state_dict()`` stores its fields."""

    def __init__(self, warmup_steps: int, total_steps: int, min_ratio: float):
        self.warmup_steps, self.total_steps, self.min_ratio = warmup_steps, total_steps, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> LambdaLR:
    """Per-step warm-up + cosine to ``cfg.min_lr`` over ``cfg.epochs``; call ``.step()`` once per step."""
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round(cfg.warmup_epochs * steps_per_epoch)
    total = steps_per_epoch * cfg.epochs
    if warmup >= total > 0:
        warnings.warn(f"the warm-up ({warmup} steps) is as long as the whole run ({total} steps): the learning rate "
                      f"never reaches train.lr={cfg.lr:g}; shorten train.warmup_epochs / train.warmup_steps",
                      UserWarning, stacklevel=2)
    return LambdaLR(optimizer, WarmupCosine(warmup, total, cfg.min_lr / cfg.lr))
