"""Audit of the distillation objective end to end: token alignment against a slow reference built from raw patch
embeddings, odd grids, tiny grids, bf16 autocast, degenerate tokens and option validation."""
import pytest
import timm
import torch
import torch.nn.functional as F

import vitlinearizer  # noqa: F401
from vitlinearizer.distill import DistillConfig, DistillationTask, random_mask
from vitlinearizer.objectives import activation_matching_loss
from vitlinearizer.teacher import Teacher


def make_task(objective="both", student_depth=2, teacher_depth=2, num_stages=2, **cfg):
    torch.manual_seed(0)
    student = timm.create_model("adventurer_nano_patch4_28", depth=student_depth, embed_dim=32, num_classes=3,
                                use_mask_token=True, mixer_kwargs=dict(d_state=8, head_dim=16))
    teacher = Teacher("vit_tiny_patch16_224", img_size=28, num_classes=3, patch_size=4, embed_dim=24,
                      depth=teacher_depth, num_heads=2)
    return DistillationTask(student, teacher, DistillConfig(objective=objective, num_stages=num_stages, **cfg))


def _slow_act(s_tokens, t_tokens, visible):
    """1 - cos between L2-normalised rows of the visible-token cosine maps, mean over rows then images."""
    per_image = []
    for b in range(s_tokens.shape[0]):
        idx = visible[b].nonzero().flatten()
        rows = []
        for x in (s_tokens[b, idx].double(), t_tokens[b, idx].double()):
            a = F.cosine_similarity(x[:, None], x[None, :], dim=-1)
            rows.append(a / a.norm(dim=-1, keepdim=True))
        per_image.append((1 - (rows[0] * rows[1]).sum(-1)).mean())
    return torch.stack(per_image).mean()


def _identity_blocks(task):
    """Zeroes every residual branch and position embedding, so each stage output is the raw patch embedding:
    what a token holds is then known from the image alone, independent of the wiring under test."""
    with torch.no_grad():
        for block in task.student.blocks:
            block.mixer.out_proj.weight.zero_()
            block.mlp.fc2.weight.zero_()
            block.mlp.fc2.bias.zero_()
        task.student.pos_embed.zero_()
        vit = task.teacher.model
        for block in vit.blocks:
            for lin in (block.attn.proj, block.mlp.fc2):
                lin.weight.zero_()
                lin.bias.zero_()
        vit.pos_embed.zero_()


def _conv_tokens(conv, images):
    return conv(images).flatten(2).transpose(1, 2)  # raster order, as an image is read


@pytest.mark.parametrize("batch,size,mask_type", [(1, (12, 20), "random"), (2, (12, 20), "block"),
                                                  (2, (20, 12), "random"), (2, (28, 28), "block")])
def test_losses_match_a_reference_built_from_raw_patches(batch, size, mask_type):
    # Odd, non-square grids (3x5, 5x3): a transposed or shifted teacher grid, a class token taken for a patch
    # token, or visible/masked swapped would each change these values.
    task = make_task(mask_type=mask_type)
    _identity_blocks(task)
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(batch, 3, *size, generator=gen)
    grid = task.student.patch_grid(*size)
    mask = task.sample_mask(batch, grid, images.device)
    task.sample_mask = lambda *args: mask
    out = task(images)

    with torch.no_grad():
        t_tok = _conv_tokens(task.teacher.model.patch_embed.proj, task.teacher.normalize_input(images))
        s_tok = _conv_tokens(task.student.patch_embed.proj, images)
        s_tok = torch.where(mask[..., None], task.student.mask_token, s_tok)
        act = _slow_act(s_tok, t_tok, ~mask)
        pred = task.predictor(task.student.norm(s_tok))[mask]
        target = task.teacher.model.norm(t_tok)[mask]
        masked = F.smooth_l1_loss(pred, target)
    assert act > 1e-3  # different patch embeddings: a non-trivial value to compare
    torch.testing.assert_close(out["act"].double(), act, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out["mask"], masked, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["loss"], out["act"] + out["mask"])


def test_identical_patch_embeddings_give_zero_act_loss_only_when_aligned():
    task = make_task(objective="act")
    _identity_blocks(task)
    with torch.no_grad():  # the student's embedding is the teacher's padded with zero channels: same Gram matrix
        s_proj, t_proj = task.student.patch_embed.proj, task.teacher.model.patch_embed.proj
        s_proj.weight.zero_()
        s_proj.bias.zero_()
        s_proj.weight[:24] = t_proj.weight
        s_proj.bias[:24] = t_proj.bias
    images = torch.randn(2, 3, 12, 20)
    assert task(images)["act"] < 1e-5
    # The same check fails when the image is read in another order (e.g. the student's flipped blocks leaking).
    with torch.no_grad():
        s_stage = _conv_tokens(s_proj, images)
        t_stage = _conv_tokens(t_proj, images).view(2, 3, 5, 24).flip(2).reshape(2, 15, 24)
    assert activation_matching_loss(s_stage, t_stage) > 1e-2


def test_bf16_autocast_losses_are_float32_and_close_to_float32_run():
    task = make_task()
    images = torch.randn(2, 3, 28, 28)
    mask = random_mask(2, 49, 0.75, generator=torch.Generator().manual_seed(0))
    task.sample_mask = lambda *args: mask
    ref = task(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = task(images)
    for key in ("act", "mask", "loss"):
        assert out[key].dtype == torch.float32, key
        assert torch.isfinite(out[key]), key
        torch.testing.assert_close(out[key], ref[key], rtol=0.05, atol=0.02)
    out["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in task.parameters() if p.grad is not None)


@pytest.mark.parametrize("kwargs", [{}, {"row_block_size": 2}, {"num_anchors": 3}])
@pytest.mark.parametrize("value", [0.0, 1.0])
def test_degenerate_tokens_give_finite_loss_and_grad_under_bf16(kwargs, value):
    # All-equal tokens: an all-ones map; all-zero tokens: all-zero rows, whose norm the row normalisation divides by.
    s = torch.full((2, 6, 4), value, dtype=torch.bfloat16, requires_grad=True)
    t = torch.full((2, 6, 5), value, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = activation_matching_loss(s, t, torch.rand(2, 6) < 2, **kwargs)
    loss.backward()
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(1.0 if value == 0 else 0.0, abs=1e-6)
    assert torch.isfinite(s.grad.float()).all()


def test_constant_image_trains_without_nan():
    task = make_task()
    out = task(torch.zeros(1, 3, 28, 28))
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    assert all(torch.isfinite(p.grad).all() for p in task.parameters() if p.grad is not None)


@pytest.mark.parametrize("mask_type", ["random", "block"])
def test_tiny_grids(mask_type):
    # A 1x1 grid cannot be split into masked and visible tokens: both losses would silently be zero.
    with pytest.raises(ValueError, match=r"4x4 images give a 1x1 patch grid; distillation needs at least 2"):
        make_task(mask_type=mask_type)(torch.randn(2, 3, 4, 4))
    # 75% of a 2x2 grid leaves one visible token, whose 1x1 similarity map always matches the teacher's.
    with pytest.raises(ValueError, match=r"distill.mask_ratio=0.75 leaves 1 visible token of 4.*lower "
                                         r"distill.mask_ratio"):
        make_task(mask_type=mask_type)(torch.randn(2, 3, 8, 8))
    out = make_task(mask_type=mask_type, mask_ratio=0.5)(torch.randn(1, 3, 8, 8))
    assert out["act"] > 0 and out["mask"] > 0
    # Without visible-token matching one visible token is enough.
    assert torch.isfinite(make_task("mask", mask_type=mask_type)(torch.randn(2, 3, 8, 8))["loss"])
    assert make_task(act_tokens="all", mask_type=mask_type)(torch.randn(2, 3, 8, 8))["act"] > 0


def test_num_stages_error_lists_values_both_depths_accept():
    for k in (3, 4):  # 3 suits the student only, 4 the teacher only
        with pytest.raises(ValueError, match=rf"distill.num_stages={k} must divide both the student depth 6 and "
                                             r"the teacher depth 4; use one of \[1, 2\]"):
            make_task(student_depth=6, teacher_depth=4, num_stages=k)
    # The supervised baseline taps no stages, so K does not constrain it.
    assert make_task("none", student_depth=6, teacher_depth=4, num_stages=4).student_taps == []


@pytest.mark.parametrize("bad,match", [
    (dict(act_weight=float("nan")), r"distill.act_weight must be >= 0, got nan"),
    (dict(mask_weight=float("nan")), r"distill.mask_weight must be >= 0"),
    (dict(row_block_size=2.5), r"distill.row_block_size must be an int \(0: off\), got 2.5"),
    (dict(num_anchors=8.0), r"distill.num_anchors must be an int"),
    (dict(row_block_size=-4), r"distill.row_block_size must be >= 0"),
    (dict(num_anchors=-1), r"distill.num_anchors must be >= 0"),
    (dict(num_stages=True), r"distill.num_stages must be a positive int"),
])
def test_bad_options_fail_at_construction_naming_the_option(bad, match):
    with pytest.raises(ValueError, match=match):
        make_task(**bad)


def test_anchors_at_least_the_visible_count_equal_the_full_objective():
    images = torch.randn(2, 3, 28, 28)
    mask = random_mask(2, 49, 0.75, generator=torch.Generator().manual_seed(0))
    values = []
    for cfg in ({}, {"num_anchors": 12}, {"num_anchors": 49}, {"num_anchors": 1000}, {"row_block_size": 5}):
        task = make_task("act", **cfg)
        task.sample_mask = lambda *args: mask
        values.append(task(images)["act"])
    for v in values[1:]:
        torch.testing.assert_close(v, values[0])
    task = make_task("act", num_anchors=3)
    task.sample_mask = lambda *args: mask
    assert not torch.allclose(task(images)["act"], values[0])  # fewer anchors than visible tokens: a subset
