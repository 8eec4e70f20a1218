"""The distiller: masks, stage mapping, the combined objective, frozen teacher, gradients, exact resume."""
import pytest
import timm
import torch

import vitlinearizer  # noqa: F401
from vitlinearizer.distill import (DistillConfig, DistillationTask, block_mask, default_num_stages, random_mask,
                                  stage_taps)
from vitlinearizer.teacher import Teacher

TEACHER_KW = dict(patch_size=4, embed_dim=32, depth=4, num_heads=2)


def make_task(objective="both", student_depth=4, teacher_depth=4, **cfg):
    torch.manual_seed(0)
    student = timm.create_model("adventurer_nano_patch4_28", depth=student_depth, embed_dim=48, num_classes=3,
                                use_mask_token=True, mixer_kwargs=dict(d_state=8, head_dim=16))
    teacher = Teacher("vit_tiny_patch16_224", img_size=28, num_classes=3, **{**TEACHER_KW, "depth": teacher_depth})
    return DistillationTask(student, teacher, DistillConfig(objective=objective, num_stages=cfg.pop("num_stages", 2),
                                                            **cfg))


def test_random_mask_exact_count_and_independent_per_image():
    gen = torch.Generator().manual_seed(0)
    mask = random_mask(8, 49, 0.75, generator=gen)
    assert mask.dtype == torch.bool and mask.shape == (8, 49)
    assert (mask.sum(1) == 37).all()
    assert len({tuple(m.tolist()) for m in mask}) == 8


def test_block_mask_exact_count_and_contiguous():
    gen = torch.Generator().manual_seed(0)
    mask = block_mask(4, (14, 14), 0.4, generator=gen)
    assert (mask.sum(1) == round(0.4 * 196)).all()
    grid = mask.view(4, 14, 14).float()
    # Blocks: a masked token's neighbours are mostly masked, unlike uniform masking (~40%).
    neighbours = torch.nn.functional.avg_pool2d(grid[:, None], 3, 1, 1)[:, 0]
    assert (neighbours[grid.bool()].mean()) > 0.6


def test_stage_taps_for_equal_and_different_depths():
    assert stage_taps(12, 4) == [2, 5, 8, 11]
    assert stage_taps(24, 4) == [5, 11, 17, 23]
    with pytest.raises(ValueError, match=r"depth 10 cannot be split into num_stages=4.*\[1, 2, 5, 10\]"):
        stage_taps(10, 4)


def test_default_stage_count_is_the_papers_where_it_fits():
    assert default_num_stages(12, 12) == 4 and default_num_stages(24, 12) == 4
    assert default_num_stages(6, 12) == 3  # the default student (nano) under the default teacher (ViT-Ti)
    assert default_num_stages(6, 4) == 2 and default_num_stages(5, 12) == 1
    task = make_task(student_depth=6, teacher_depth=4, num_stages=None)
    assert task.student_taps == [2, 5] and task.teacher_taps == [1, 3]


def test_student_and_teacher_depths_may_differ():
    task = make_task(student_depth=8, teacher_depth=4, num_stages=4)
    assert task.student_taps == [1, 3, 5, 7] and task.teacher_taps == [0, 1, 2, 3]
    out = task(torch.randn(2, 3, 28, 28))
    assert torch.isfinite(out["loss"])


@pytest.mark.parametrize("objective,keys", [("both", {"act", "mask"}), ("act", {"act"}), ("mask", {"mask"}),
                                            ("none", {"ce"})])
def test_objectives_select_their_losses(objective, keys):
    task = make_task(objective)
    out = task(torch.randn(2, 3, 28, 28), torch.tensor([0, 2]))
    assert keys <= set(out) and not ({"act", "mask", "ce"} - keys) & set(out)
    if objective == "both":
        torch.testing.assert_close(out["loss"], out["act"] + out["mask"])
    assert (task.predictor is not None) == (objective in ("both", "mask"))


@pytest.mark.parametrize("objective,cls_weight", [("both", 0.0), ("act", 0.0), ("act", 1.0), ("mask", 0.0),
                                                  ("none", 0.0)])
def test_every_trainable_parameter_gets_a_gradient(objective, cls_weight):
    # What DDP needs: a trainable parameter without a gradient stalls its reduction (the run fails at step 2).
    task = make_task(objective, cls_weight=cls_weight)
    task(torch.randn(2, 3, 28, 28), torch.tensor([0, 2]))["loss"].backward()
    without = [n for n, p in task.named_parameters() if p.requires_grad and p.grad is None]
    assert not without, without
    frozen = {n for n, p in task.student.named_parameters() if not p.requires_grad}
    assert frozen == {"none": {"mask_token"}, "act": {"head.weight", "head.bias"} | (
        set() if cls_weight else {"norm.weight"})}.get(objective, {"head.weight", "head.bias"})


def test_teacher_is_frozen_and_student_gets_all_gradients():
    task = make_task()
    before = {k: v.clone() for k, v in task.teacher.state_dict().items()}
    params = [p for p in task.parameters() if p.requires_grad]
    assert not any(p.requires_grad for p in task.teacher.parameters())
    opt = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(3):
        out = task(torch.randn(2, 3, 28, 28))
        opt.zero_grad()
        out["loss"].backward()
        no_grad = [n for n, p in task.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
        assert not no_grad, no_grad  # the class head, which no distillation loss reaches, is frozen
        opt.step()
    for k, v in task.teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in task.teacher.parameters())


@pytest.mark.parametrize("objective", ["both", "act"])
def test_class_token_target_regresses_the_teachers_class_token(objective):
    task = make_task(objective, cls_weight=0.5)
    images = torch.randn(2, 3, 28, 28)
    mask = random_mask(2, 49, 0.75, generator=torch.Generator().manual_seed(0))
    task.sample_mask = lambda *args: mask
    out = task(images)
    with torch.no_grad():
        teacher_cls = task.teacher.forward_features_aligned(images, [-1]).cls
        student_cls = task.student.forward_intermediates(images, indices=[0], output_fmt="NLC", mask=mask)[0][:, -1]
    expected = torch.nn.functional.smooth_l1_loss(task.predictor(student_cls), teacher_cls)
    torch.testing.assert_close(out["cls"], expected)
    others = sum(out[k] for k in ("act", "mask") if k in out)
    torch.testing.assert_close(out["loss"], others + 0.5 * out["cls"])
    out["loss"].backward()
    assert task.student.cls_token.grad.abs().sum() > 0 and task.predictor.weight.grad.abs().sum() > 0
    assert "cls" not in make_task(objective)(images)  # off by default: the paper's objective


def test_class_token_target_needs_a_teacher_class_token():
    student = timm.create_model("adventurer_nano_patch4_28", depth=2, embed_dim=48, use_mask_token=True,
                                mixer_kwargs=dict(d_state=8, head_dim=16))
    teacher = Teacher("vit_tiny_patch16_224", img_size=28, class_token=False, global_pool="avg",
                      **{**TEACHER_KW, "depth": 2})
    with pytest.raises(ValueError, match="needs a teacher with a class token"):
        DistillationTask(student, teacher, DistillConfig(num_stages=2, cls_weight=1.0))


@pytest.mark.parametrize("bad,match", [
    (dict(cls_weight=-1.0), r"distill.cls_weight must be >= 0"),
    (dict(mask_ratio=1.0), r"mask_ratio must be in \(0, 1\)"),
    (dict(mask_ratio=0.0), r"mask_ratio must be in \(0, 1\)"),
    (dict(objective="kd"), "objective must be one of both, act, mask, none"),
    (dict(num_stages=3), r"distill.num_stages=3 must divide both the student depth 4 and the teacher depth 4; "
                         r"use one of \[1, 2, 4\]"),
    (dict(mask_type="grid"), "mask_type must be one of random, block"),
])
def test_bad_config_fails_before_training(bad, match):
    with pytest.raises(ValueError, match=match):
        make_task(**bad)


def test_student_without_mask_token_is_rejected():
    student = timm.create_model("adventurer_nano_patch4_28", depth=2, embed_dim=48, mixer_kwargs=dict(d_state=8, head_dim=16))
    teacher = Teacher("vit_tiny_patch16_224", img_size=28, **{**TEACHER_KW, "depth": 2})
    with pytest.raises(ValueError, match="use_mask_token=True"):
        DistillationTask(student, teacher, DistillConfig(num_stages=2))


def test_distillation_resume_reproduces_uninterrupted_run(tmp_path):
    """Resuming from a mid-epoch checkpoint replays the same masks, batches and augmentations."""
    import shutil

    from vitlinearizer.data import DataConfig, SyntheticDataset, build_transform
    from vitlinearizer.engine import TrainConfig, Trainer

    transform = build_transform(DataConfig(name="synthetic", img_size=28, num_classes=3), train=True)
    dataset = SyntheticDataset(num_classes=3, length=48, img_size=28, transform=transform)
    cfg = TrainConfig(epochs=2, batch_size=8, lr=1e-3, save_every_steps=4, progress=False, keep_checkpoints=10)
    full = Trainer(make_task(), dataset, cfg, tmp_path / "full")
    full.fit()
    # A run that died after step 8 (mid-epoch 2) left exactly the checkpoints up to step 8.
    crashed = tmp_path / "crashed" / "checkpoints"
    crashed.mkdir(parents=True)
    for step in (4, 6, 8):
        shutil.copytree(tmp_path / "full" / "checkpoints" / f"step_{step:08d}", crashed / f"step_{step:08d}")
    (crashed / "latest").write_text("step_00000008")
    resumed = Trainer(make_task(), dataset, cfg, tmp_path / "crashed")
    resumed.fit(resume=True)
    assert resumed.step == full.step == 12
    for (name, a), (_, b) in zip(full.task.student.state_dict().items(), resumed.task.student.state_dict().items()):
        assert torch.equal(a, b), name
