"""Distillation objectives for ViT -> linear-time student training.

All functions are pure (no state, inputs are never modified) and compute in at
least float32 with autocast disabled, because bf16 cosine/Gram products lose
too much precision for a loss that is a difference of near-equal numbers.
Nothing is detached: pass teacher tensors produced under ``torch.no_grad()``
(or ``.detach()`` them) if no gradient should reach the teacher.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

__all__ = ["cosine_similarity_map", "activation_matching_loss", "masked_prediction_loss", "logit_kd_loss"]

_EPS = 1e-6
Feats = Union[torch.Tensor, Sequence[torch.Tensor]]


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return functools.reduce(torch.promote_types, (t.dtype for t in tensors), torch.float32)


def _no_autocast(device: torch.device):
    return torch.autocast(device_type=device.type, enabled=False)


def _check_float(x, name: str, shape: str = "(B, L, C)") -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or (shape == "(B, L, C)" and x.dim() != 3):
        raise ValueError(f"{name} must be a floating {shape} tensor")


def _check_mask(mask: Optional[torch.Tensor], name: str, batch: int, length: int) -> None:
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise ValueError(f"{name} must be a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
    if tuple(mask.shape) != (batch, length):
        raise ValueError(f"{name} must have shape (B, L)=({batch}, {length}), got {tuple(mask.shape)}")


def _unit_tokens(feats: torch.Tensor, visible: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    # Zeroing invisible tokens (with where, so NaN/garbage there cannot leak)
    # makes their rows and columns of the Gram matrix exactly zero, which is
    # what "only visible columns enter the row and its norm" requires.
    f = F.normalize(feats.to(dtype), dim=-1, eps=_EPS)
    if visible is not None:
        f = torch.where(visible.unsqueeze(-1), f, torch.zeros((), dtype=dtype, device=f.device))
    return f


def cosine_similarity_map(feats: torch.Tensor, visible: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Token-token cosine-similarity matrix.

    ``A[b, i, j] = <F[b,i], F[b,j]> / (max(||F[b,i]||, eps) * max(||F[b,j]||, eps))``
    for visible ``i, j``; rows and columns of invisible tokens are 0.

    Args:
        feats: (B, L, C) floating tensor.
        visible: optional (B, L) bool mask; None means all tokens visible.

    Returns:
        (B, L, L) tensor in ``promote(feats.dtype, float32)``. Uses O(L^2) memory.
    """
    _check_float(feats, "feats")
    _check_mask(visible, "visible", feats.shape[0], feats.shape[1])
    with _no_autocast(feats.device):
        f = _unit_tokens(feats, visible, _compute_dtype(feats))
        return f @ f.transpose(1, 2)


def _as_stage_list(feats: Feats, name: str) -> list:
    if isinstance(feats, torch.Tensor):
        return [feats]  # a lone tensor is treated as K = 1
    try:
        stages = list(feats)
    except TypeError:
        raise ValueError(f"{name} must be a tensor or a sequence of tensors") from None
    if not stages:
        raise ValueError(f"{name} is empty: need at least one stage")
    for k, t in enumerate(stages):
        _check_float(t, f"{name}[{k}]")
    return stages


def _block_cosines(rows_t, rows_s, cols_t, cols_s) -> torch.Tensor:
    a_t = rows_t @ cols_t.transpose(1, 2)  # (B, rows, L)
    a_s = rows_s @ cols_s.transpose(1, 2)
    dot = (a_t * a_s).sum(-1)
    return dot / (a_t.norm(dim=-1).clamp_min(_EPS) * a_s.norm(dim=-1).clamp_min(_EPS))


def _row_cosines(rows_t, rows_s, cols_t, cols_s, block: Optional[int]) -> torch.Tensor:
    """cos(row of A_t, row of A_s) for each given row, ``block`` rows at a time."""
    if block is None or block >= rows_t.shape[1]:
        return _block_cosines(rows_t, rows_s, cols_t, cols_s)
    # Without checkpointing autograd would keep every block's (block x L) maps
    # alive for backward, i.e. O(L^2) again; recomputing them keeps the peak at
    # O(block * L) at the price of a second forward per block.
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (rows_t, rows_s, cols_t, cols_s))
    out = []
    for start in range(0, rows_t.shape[1], block):
        args = (rows_t[:, start : start + block], rows_s[:, start : start + block], cols_t, cols_s)
        out.append(checkpoint(_block_cosines, *args, use_reentrant=False) if grad else _block_cosines(*args))
    return torch.cat(out, dim=1)


def activation_matching_loss(
    student_feats: Feats,
    teacher_feats: Feats,
    visible: Optional[torch.Tensor] = None,
    row_block_size: Optional[int] = None,
    num_anchors: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Row-normalised cosine-similarity-map matching, averaged over K stages.

    For stage k and image b with visible set V (n = |V|), let ``A`` be the
    cosine-similarity matrix over V (see :func:`cosine_similarity_map`) and
    ``r_i = A[i, V] / max(||A[i, V]||, eps)``. Then::

        loss_kb = (1/n) * sum_{i in V} (1 - <r_i^teacher, r_i^student>)
        loss_k  = mean of loss_kb over images with n > 0
        loss    = mean_k loss_k                      (a scalar in [0, 2])

    Images are weighted equally regardless of n; images with no visible token
    contribute nothing (an all-invisible batch yields 0, still in the graph).
    The value depends only on visible tokens, is invariant to per-token positive
    scaling and to any orthogonal map of the channels, so C_s != C_t is fine.
    A zero-norm token has an all-zero row and contributes loss 1.

    Args:
        student_feats: K tensors (B, L, C_s_k), or one tensor (K = 1).
        teacher_feats: K tensors (B, L, C_t_k), position-aligned with the student.
        visible: (B, L) bool, True where the student saw the token; None = all.
        row_block_size: if set, process this many rows at a time, so peak
            memory is O(B * row_block_size * L) instead of O(B * L^2), also in
            backward (each block is recomputed there: ~1.5x the matmul cost).
            Same value and gradients.
        num_anchors: if set to k, use k rows per image drawn uniformly without
            replacement from its visible tokens (all of them if k >= n); columns
            stay all visible tokens. Cost O(L * k); an unbiased estimate of the
            full loss. The same anchors are used for every stage.
        generator: RNG for the anchor draw; may live on CPU while feats are on GPU.

    Returns:
        Scalar tensor in ``promote(float32, input dtypes)``.

    Raises:
        ValueError: on empty/mismatched stage lists, B or L mismatch, a bad mask,
            or a non-positive ``row_block_size`` / ``num_anchors``.
    """
    s_list = _as_stage_list(student_feats, "student_feats")
    t_list = _as_stage_list(teacher_feats, "teacher_feats")
    if len(s_list) != len(t_list):
        raise ValueError(f"number of stages differs: student has {len(s_list)}, teacher has {len(t_list)}")
    batch, length = s_list[0].shape[:2]
    for name, x in [(f"student_feats[{k}]", x) for k, x in enumerate(s_list)] + [
        (f"teacher_feats[{k}]", x) for k, x in enumerate(t_list)
    ]:
        if x.shape[0] != batch:
            raise ValueError(f"batch size mismatch: {name} has B={x.shape[0]}, expected {batch}")
        if x.shape[1] != length:
            raise ValueError(f"token count mismatch: {name} has L={x.shape[1]}, expected {length}")
    _check_mask(visible, "visible", batch, length)
    for name, v in (("row_block_size", row_block_size), ("num_anchors", num_anchors)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{name} must be a positive int or None, got {v!r}")

    device = s_list[0].device
    dtype = _compute_dtype(*s_list, *t_list)
    vis = torch.ones(batch, length, dtype=torch.bool, device=device) if visible is None else visible.to(device)

    # Row selection: all rows, or k random visible rows per image (random-key top-k
    # over visible tokens is a uniform draw without replacement).
    anchor_idx = None
    row_valid = vis
    if num_anchors is not None and num_anchors < length:
        gen_device = generator.device if generator is not None else device
        keys = torch.rand(batch, length, generator=generator, device=gen_device).to(device)
        keys = keys.masked_fill(~vis, -1.0)
        anchor_idx = keys.topk(num_anchors, dim=1).indices  # (B, k)
        row_valid = vis.gather(1, anchor_idx)  # False where the image had < k visible
    rows_per_image = row_valid.sum(1)  # min(k, n) or n
    has_rows = rows_per_image > 0

    stage_losses = []
    with _no_autocast(device):
        for s, t in zip(s_list, t_list):
            fs, ft = _unit_tokens(s, vis, dtype), _unit_tokens(t, vis, dtype)
            rs, rt = fs, ft
            if anchor_idx is not None:
                rs = fs.gather(1, anchor_idx.unsqueeze(-1).expand(-1, -1, fs.shape[-1]))
                rt = ft.gather(1, anchor_idx.unsqueeze(-1).expand(-1, -1, ft.shape[-1]))
            cos = _row_cosines(rt, rs, ft, fs, row_block_size)
            per_row = torch.where(row_valid, 1.0 - cos, torch.zeros((), dtype=dtype, device=device))
            per_image = per_row.sum(1) / rows_per_image.clamp_min(1).to(dtype)
            stage_losses.append(per_image.sum() / has_rows.sum().clamp_min(1).to(dtype))
    return torch.stack(stage_losses).mean()


def masked_prediction_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    masked: torch.Tensor,
    beta: float = 1.0,
    normalize_target: bool = False,
) -> torch.Tensor:
    """Smooth-L1 feature regression on masked tokens (MaskDistill style).

    With ``y = LayerNorm_C(target)`` (no affine, eps=1e-6) if ``normalize_target``
    else ``target``, and M the set of masked (b, l) over the whole batch::

        loss = (1/|M|) * sum_{(b,l) in M} (1/C) * sum_c SmoothL1_beta(pred[b,l,c] - y[b,l,c])
        SmoothL1_beta(x) = 0.5 x^2 / beta if |x| < beta else |x| - 0.5 beta   (beta=0: L1)

    i.e. per-token loss is the mean over channels, and tokens are pooled across
    the batch (images with more masked tokens weigh more). Values at visible
    positions are never read into the loss. If no token is masked the result is
    ``pred.sum() * 0`` (zero, still in the graph).

    Args:
        pred: (B, L, C) student predictions.
        target: (B, L, C) teacher targets (not detached here).
        masked: (B, L) bool, True for tokens to predict.
        beta: Smooth-L1 threshold, >= 0.
        normalize_target: apply per-token LayerNorm over C to the target.

    Returns:
        Scalar tensor in ``promote(float32, input dtypes)``.
    """
    _check_float(pred, "pred")
    _check_float(target, "target")
    if pred.shape != target.shape:
        raise ValueError(f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    if masked is None:
        raise ValueError("masked must be a (B, L) bool tensor, got None")
    _check_mask(masked, "masked", pred.shape[0], pred.shape[1])
    if not beta >= 0:
        raise ValueError(f"beta must be >= 0, got {beta}")

    dtype = _compute_dtype(pred, target)
    with _no_autocast(pred.device):
        # Boolean indexing (not multiply-by-mask) so non-finite values at
        # visible positions cannot poison the loss or its gradient.
        p = pred[masked].to(dtype)  # (N, C)
        y = target[masked].to(dtype)
        if p.shape[0] == 0:
            return pred.sum().to(dtype) * 0.0
        if normalize_target:
            y = F.layer_norm(y, (y.shape[-1],), eps=1e-6)
        return F.smooth_l1_loss(p, y, reduction="mean", beta=float(beta))


def logit_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Hinton logit distillation.

    ``loss = T^2 * mean_b KL(softmax(t_b / T) || softmax(s_b / T))`` with
    ``KL(p || q) = sum_c p_c (log p_c - log q_c)``; classes are the last dim,
    every leading dim is averaged.

    Args:
        student_logits: (..., num_classes).
        teacher_logits: same shape as ``student_logits``.
        temperature: T > 0.

    Returns:
        Scalar tensor in ``promote(float32, input dtypes)``.
    """
    _check_float(student_logits, "student_logits", "(..., num_classes)")
    _check_float(teacher_logits, "teacher_logits", "(..., num_classes)")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"logit shapes differ: student {tuple(student_logits.shape)} vs teacher {tuple(teacher_logits.shape)}"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    dtype = _compute_dtype(student_logits, teacher_logits)
    with _no_autocast(student_logits.device):
        log_q = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
        log_p = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
        # A class the teacher rules out (logit -inf, p = 0) adds 0, not 0 * (-inf) = NaN.
        gap = torch.where(torch.isneginf(log_p), 0.0, log_p - log_q)
        kl = (log_p.exp() * gap).sum(-1)
        return kl.mean() * temperature**2
