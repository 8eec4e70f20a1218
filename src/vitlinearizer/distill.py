"""The distiller: masking, teacher/student wiring and the combined ViT-Linearizer objective.

    L = w_act * L_act(student stages, teacher stages | visible tokens) + w_mask * L_mask(head(student last), teacher last | masked)
        [+ w_cls * SmoothL1(head(student class token), teacher class token)]   (not in the paper; off by default)

The teacher sees the full image; the student sees it with ``mask_ratio`` of its patch tokens replaced by a
learnable mask token. ``objective`` selects the paper's ablation: ``both`` (default), ``act``, ``mask``, or
``none`` (supervised cross-entropy on labels, the from-scratch baseline trained through the same task API).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.task import TrainingTask

from .objectives import activation_matching_loss, masked_prediction_loss

OBJECTIVES = ("both", "act", "mask", "none")
MASK_TYPES = ("random", "block")
ACT_TOKENS = ("visible", "all")


@dataclass
class DistillConfig:
    """Distillation objective. Defaults follow the paper (K=4, 75% masking, lambda=1, visible tokens)."""

    objective: str = "both"  # both | act | mask | none
    mask_ratio: float = 0.75  # fraction of patch tokens replaced by the mask token
    mask_type: str = "random"  # random (uniform per image, as MAE) | block (BEiT-style rectangles)
    # K: teacher and student depths are both split into K equal stages; None: the paper's 4 where it divides both
    # depths, else the largest K below 4 that does (the demo's depth-6 models: 3).
    num_stages: int | None = None
    act_weight: float = 1.0  # weight of activation matching
    mask_weight: float = 1.0  # lambda, weight of masked prediction
    act_tokens: str = "visible"  # visible (paper) | all (leaks the target; the paper's 83.4 ablation)
    row_block_size: int = 0  # >0: compute the L x L similarity maps in row blocks of this size (bounded memory)
    num_anchors: int = 0  # >0: k random anchor rows per image, O(L k) (high-resolution distillation)
    normalize_target: bool = False  # LayerNorm (no affine) on teacher targets, as MaskDistill
    smooth_l1_beta: float = 1.0  # Smooth-L1 transition point
    label_smoothing: float = 0.1  # objective=none only: CE label smoothing
    # Not in the paper: the class token, which fine-tuning classifies from, predicts the teacher's final class
    # token (through the same head as masked prediction). Neither paper loss targets it directly.
    cls_weight: float = 0.0

    def validate(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"distill.objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"distill.mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if self.mask_type not in MASK_TYPES:
            raise ValueError(f"distill.mask_type must be one of {', '.join(MASK_TYPES)}, got {self.mask_type!r}")
        if self.act_tokens not in ACT_TOKENS:
            raise ValueError(f"distill.act_tokens must be one of {', '.join(ACT_TOKENS)}, got {self.act_tokens!r}")
        if self.num_stages is not None and (not _is_int(self.num_stages) or self.num_stages < 1):
            raise ValueError(f"distill.num_stages must be a positive int, got {self.num_stages!r}")
        for name in ("row_block_size", "num_anchors"):
            if not _is_int(getattr(self, name)):
                raise ValueError(f"distill.{name} must be an int (0: off), got {getattr(self, name)!r}")
        for name in ("act_weight", "mask_weight", "cls_weight", "row_block_size", "num_anchors", "smooth_l1_beta"):
            if not getattr(self, name) >= 0:  # also rejects NaN, which would poison every step
                raise ValueError(f"distill.{name} must be >= 0, got {getattr(self, name)}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


PAPER_NUM_STAGES = 4


def default_num_stages(student_depth: int, teacher_depth: int) -> int:
    """The paper's K=4 when it divides both depths, else the largest smaller K that does (1 always does)."""
    return next(k for k in range(PAPER_NUM_STAGES, 0, -1) if student_depth % k == 0 and teacher_depth % k == 0)


def stage_taps(depth: int, num_stages: int, who: str = "model") -> list[int]:
    """Index of the last block of each of ``num_stages`` equal stages (depth 12, K 4 -> [2, 5, 8, 11])."""
    if depth % num_stages:
        divisors = [k for k in range(1, depth + 1) if depth % k == 0]
        raise ValueError(
            f"{who} depth {depth} cannot be split into num_stages={num_stages} equal stages; "
            f"use one of {divisors} (distill.num_stages)"
        )
    per_stage = depth // num_stages
    return [per_stage * (s + 1) - 1 for s in range(num_stages)]


def num_masked_tokens(num_tokens: int, ratio: float) -> int:
    """round(ratio * N) kept within [1, N - 1]: masked prediction needs a target, activation matching a row."""
    return min(num_tokens - 1, max(1, round(ratio * num_tokens)))


def random_mask(batch: int, num_tokens: int, ratio: float, generator=None, device=None) -> torch.Tensor:
    """(B, N) bool, :func:`num_masked_tokens` tokens masked per image, uniformly at random."""
    num_masked = num_masked_tokens(num_tokens, ratio)
    noise = torch.rand(batch, num_tokens, generator=generator, device=device)
    ranks = noise.argsort(dim=1).argsort(dim=1)
    return ranks < num_masked


def block_mask(batch: int, grid: tuple[int, int], ratio: float, generator=None, device=None) -> torch.Tensor:
    """(B, N) bool from random rectangles (aspect 0.3-3.3, as BEiT), topped up/trimmed to
    :func:`num_masked_tokens` masked tokens."""
    gh, gw = grid
    n = gh * gw
    num_masked = num_masked_tokens(n, ratio)
    masks = torch.zeros(batch, gh, gw, dtype=torch.bool)
    for b in range(batch):
        m = masks[b]
        for _ in range(100):
            if m.sum() >= num_masked:
                break
            area = max(1.0, float(torch.empty(1).uniform_(1, max(2, num_masked - int(m.sum())), generator=generator)))
            aspect = math.exp(float(torch.empty(1).uniform_(math.log(0.3), math.log(1 / 0.3), generator=generator)))
            h = min(gh, max(1, round(math.sqrt(area * aspect))))
            w = min(gw, max(1, round(math.sqrt(area / aspect))))
            top = int(torch.randint(0, gh - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, gw - w + 1, (1,), generator=generator))
            m[top:top + h, left:left + w] = True
        # Make the count exact so every image has the same number of visible tokens.
        flat = m.flatten()
        score = torch.rand(n, generator=generator) + flat.float() * 2  # masked first, random tie-break
        flat[:] = False
        flat[score.argsort(descending=True)[:num_masked]] = True
    return masks.flatten(1).to(device)


class DistillationTask(TrainingTask):
    """The ViT-Linearizer objective as a :class:`timm.task.TrainingTask`: ``forward(images, labels) -> dict(loss,
    ...)``, the loss terms logged beside it (and the logits as ``output`` for ``objective="none"``); labels are
    used only by ``none``. :class:`vitlinearizer.engine.Trainer` trains it.

    Unlike timm's feature-distillation task, the student is not wrapped in a trainable module: the objective calls
    its ``forward_intermediates`` and ``patch_grid``, so distributed training wraps the whole task (the teacher is
    frozen) rather than the student alone.

    Args:
        student: an Adventurer (or any model with ``patch_grid``, ``forward_intermediates(mask=...)`` and a
            ``mask_token``) — the module that is trained and exported.
        teacher: a frozen :class:`vitlinearizer.teacher.Teacher`.
        cfg: the objective.
    """

    frozen_prefixes = ("teacher.",)

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg: DistillConfig):
        super().__init__(verbose=False)
        cfg.validate()
        self.cfg = cfg
        self.student = student
        self.teacher = teacher
        depth = len(student.blocks)
        self.num_stages = cfg.num_stages or default_num_stages(depth, teacher.depth)
        if cfg.objective != "none" and (depth % self.num_stages or teacher.depth % self.num_stages):
            # Checked for both models at once: naming only the one that fails sends the user to a K that the
            # other then rejects.
            common = [k for k in range(1, min(depth, teacher.depth) + 1) if depth % k == 0 and teacher.depth % k == 0]
            raise ValueError(f"distill.num_stages={self.num_stages} must divide both the student depth {depth} and "
                             f"the teacher depth {teacher.depth}; use one of {common} (or null for the default)")
        self.student_taps = stage_taps(depth, self.num_stages, "student") if cfg.objective != "none" else []
        self.teacher_taps = teacher.stage_indices(self.num_stages) if cfg.objective != "none" else []
        if cfg.objective != "none" and getattr(student, "mask_token", None) is None:
            raise ValueError("the student needs a mask token for distillation; create it with use_mask_token=True")
        self.cls_weight = cfg.cls_weight if cfg.objective != "none" else 0.0
        if self.cls_weight and not getattr(teacher, "has_class_token", False):
            raise ValueError("distill.cls_weight > 0 needs a teacher with a class token; set distill.cls_weight=0")
        # Widths may differ: a linear head maps student tokens to the teacher's feature space.
        needs_predictor = cfg.objective in ("both", "mask") or self.cls_weight > 0
        self.predictor = nn.Linear(student.embed_dim, teacher.embed_dim) if needs_predictor else None
        # Parameters the objective never reaches are frozen: DDP's gradient reduction would otherwise wait for them
        # and fail at the second step (and AdamW would decay them for nothing). Fine-tuning trains the head.
        unreached = self._unreached_prefixes()
        for name, param in student.named_parameters():
            if name.startswith(unreached):
                param.requires_grad_(False)

    def _unreached_prefixes(self) -> tuple[str, ...]:
        if self.cfg.objective == "none":  # supervised: everything but the mask token
            return ("mask_token",)
        unreached = ("head.",)  # feature objectives: no logits
        if self.cfg.objective == "act" and not self.cls_weight:
            unreached += ("norm.",)  # stage taps are block outputs; the final norm feeds only the other losses
        return unreached

    def get_trainable_module(self, ema: bool = False) -> nn.Module | None:
        """The student, which is exported (the predictor head is trained beside it but only serves the loss)."""
        return super().get_trainable_module(ema=True) if ema else self.student

    def train(self, mode: bool = True) -> "DistillationTask":
        super().train(mode)
        self.teacher.eval()  # the target stays deterministic
        return self

    def no_weight_decay(self) -> set[str]:
        return {f"student.{name}" for name in self.student.no_weight_decay()}

    def _check_grid(self, grid: tuple[int, int], image_size: tuple[int, int]) -> None:
        """Fails where a loss would be identically zero: training would silently learn nothing from it."""
        n = grid[0] * grid[1]
        where = f"{image_size[0]}x{image_size[1]} images give a {grid[0]}x{grid[1]} patch grid"
        if n < 2:
            raise ValueError(f"{where}; distillation needs at least 2 patch tokens (one masked, one visible): "
                             "use larger images or a student with a smaller patch size")
        if self.cfg.objective in ("both", "act") and self.cfg.act_tokens == "visible":
            visible = n - num_masked_tokens(n, self.cfg.mask_ratio)
            if visible < 2:  # a 1x1 similarity map always matches
                raise ValueError(f"{where}, where distill.mask_ratio={self.cfg.mask_ratio} leaves {visible} visible "
                                 f"token of {n}; activation matching needs at least 2: lower distill.mask_ratio "
                                 "(or use larger images)")

    def sample_mask(self, batch: int, grid: tuple[int, int], device) -> torch.Tensor:
        if self.cfg.mask_type == "block":
            return block_mask(batch, grid, self.cfg.mask_ratio, device=device)
        return random_mask(batch, grid[0] * grid[1], self.cfg.mask_ratio, device=device)

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if self.cfg.objective == "none":
            logits = self.student(images)
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.cfg.label_smoothing)
            return {"loss": loss, "output": logits, "ce": loss.detach()}

        grid = self.student.patch_grid(images.shape[-2], images.shape[-1])
        self._check_grid(grid, tuple(images.shape[-2:]))
        mask = self.sample_mask(images.shape[0], grid, images.device)
        with torch.no_grad():
            target = self.teacher.forward_features_aligned(images, self.teacher_taps, out_grid=grid)
        final, stages = self.student.forward_intermediates(
            images, indices=self.student_taps, output_fmt="NLC", mask=mask
        )
        out: dict[str, torch.Tensor] = {}
        loss = final.new_zeros((), dtype=torch.float32)
        if self.cfg.objective in ("both", "act"):
            visible = ~mask if self.cfg.act_tokens == "visible" else None
            act = activation_matching_loss(
                stages, target.stages, visible,
                row_block_size=self.cfg.row_block_size or None, num_anchors=self.cfg.num_anchors or None,
            )
            loss = loss + self.cfg.act_weight * act
            out["act"] = act.detach()
        if self.cfg.objective in ("both", "mask"):
            pred = self.predictor(final[:, :-1])  # patch tokens; the class token is last
            masked = masked_prediction_loss(
                pred, target.last, mask, beta=self.cfg.smooth_l1_beta, normalize_target=self.cfg.normalize_target
            )
            loss = loss + self.cfg.mask_weight * masked
            out["mask"] = masked.detach()
        if self.cls_weight:
            pred_cls = self.predictor(final[:, -1:])
            every = torch.ones(pred_cls.shape[:2], dtype=torch.bool, device=pred_cls.device)
            cls = masked_prediction_loss(pred_cls, target.cls[:, None], every, beta=self.cfg.smooth_l1_beta,
                                         normalize_target=self.cfg.normalize_target)
            loss = loss + self.cls_weight * cls
            out["cls"] = cls.detach()
        out["loss"] = loss
        return out
