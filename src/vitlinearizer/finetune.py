"""Supervised training task: cross-entropy with label smoothing, plus optional logit distillation from a teacher.

Used to train the demo teacher from scratch, to fine-tune a distilled student, and for the from-scratch
baseline. It is a :class:`timm.task.TrainingTask`, as timm's own tasks are; :class:`vitlinearizer.engine.Trainer`
trains any of them.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.task import TrainingTask

from .objectives import logit_kd_loss


def _num_classes(model: nn.Module) -> int | None:
    """A timm classifier's ``num_classes`` (0: headless), also through a wrapper's ``model`` (the Teacher)."""
    for m in (model, getattr(model, "model", None)):
        n = getattr(m, "num_classes", None)
        if isinstance(n, int) and not isinstance(n, bool):
            return n
    return None


class ClassificationTask(TrainingTask):
    """``forward(images, labels) -> dict(loss, output, ce, acc[, kd])`` training ``student`` (any timm classifier);
    ``output``: the student's logits, as in timm's tasks.

    Args:
        student: the model trained and exported.
        label_smoothing: cross-entropy label smoothing.
        teacher: optional classifier (same classes) for logit distillation; frozen here (``requires_grad=False``),
            as timm's distillation tasks freeze theirs, so that no optimiser trains it and the Trainer accepts it.
        kd_weight: in [0, 1]; loss = (1 - kd_weight) * CE + kd_weight * KD(teacher || student).
        kd_temperature: softmax temperature of the distillation term.
    """

    frozen_prefixes = ("teacher.",)

    def __init__(self, student: nn.Module, label_smoothing: float = 0.1, teacher: nn.Module | None = None,
                 kd_weight: float = 0.0, kd_temperature: float = 1.0):
        super().__init__(verbose=False)
        if not 0 <= kd_weight <= 1:
            # Above 1 the cross-entropy's weight (1 - kd_weight) turns negative: training would push the labels' loss up.
            raise ValueError(f"finetune.kd_weight must be in [0, 1] (loss = (1 - kd_weight) * CE + kd_weight * KD), "
                             f"got {kd_weight}")
        if kd_weight > 0 and teacher is None:
            raise ValueError("finetune.kd_weight > 0 needs a teacher (set teacher.weights)")
        self.student = student
        self.teacher = teacher if kd_weight > 0 else None
        if self.teacher is not None:
            self.teacher.requires_grad_(False)  # a plain timm model arrives trainable
            ours, theirs = _num_classes(student), _num_classes(self.teacher)
            if ours is not None and theirs is not None and ours != theirs:
                # Caught here, not at the first step's logit_kd_loss (after the data and the Trainer are set up).
                raise ValueError(f"logit distillation needs a teacher with the student's {ours} classes; the teacher "
                                 f"has {theirs} ({'a headless teacher: no logits' if theirs == 0 else 'other classes'})")
        self.label_smoothing, self.kd_weight, self.kd_temperature = label_smoothing, kd_weight, kd_temperature

    def get_trainable_module(self, ema: bool = False) -> nn.Module | None:
        return super().get_trainable_module(ema=True) if ema else self.student

    def train(self, mode: bool = True) -> "ClassificationTask":
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def no_weight_decay(self) -> set[str]:
        names = self.student.no_weight_decay() if hasattr(self.student, "no_weight_decay") else set()
        return {f"student.{n}" for n in names}

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.student(images).float()
        ce = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        out = {"output": logits, "ce": ce.detach(), "acc": (logits.argmax(-1) == labels).float().mean()}
        if self.teacher is None:
            out["loss"] = ce
            return out
        with torch.no_grad():
            teacher_logits = self.teacher(images).float()
        kd = logit_kd_loss(logits, teacher_logits, self.kd_temperature)
        out["kd"] = kd.detach()
        out["loss"] = (1 - self.kd_weight) * ce + self.kd_weight * kd
        return out
