"""Fine-tuning task and optimiser setup: logit distillation with a plain timm teacher, the KD weight's range, the
loss's terms, timm's wildcard no-weight-decay names, and layer-wise lr decay over every mixer (tiny models, CPU)."""
from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import vitlinearizer  # noqa: F401  (registers the students with timm)
from vitlinearizer.engine import TrainConfig, Trainer, build_optimizer, build_scheduler
from vitlinearizer.finetune import ClassificationTask
from vitlinearizer.optim import param_groups

pytestmark = pytest.mark.usefixtures("single_thread")

CLASSES = 3


def tiny_student(mixer: str = "mamba2", **kwargs) -> nn.Module:
    mixer_kwargs = {"d_state": 8, "head_dim": 16} if mixer == "mamba2" else {}
    return timm.create_model("adventurer_nano_patch4_28", depth=2, embed_dim=32, mixer=mixer,
                             mixer_kwargs=mixer_kwargs, num_classes=kwargs.pop("num_classes", CLASSES), **kwargs)


def tiny_vit(num_classes: int = CLASSES) -> nn.Module:
    return timm.create_model("vit_tiny_patch16_224", img_size=28, patch_size=4, embed_dim=32, depth=1, num_heads=2,
                             num_classes=num_classes)


def names_in(opt: torch.optim.Optimizer, task: nn.Module) -> list[list[str]]:
    name = {id(p): n for n, p in task.named_parameters()}
    return [[name[id(p)] for p in g["params"]] for g in opt.param_groups]


# --------------------------------------------------------------------------- logit distillation


def test_a_plain_timm_teacher_is_frozen_and_trains(tmp_path):
    """A timm classifier arrives with requires_grad=True: the task freezes it (as timm's distillation tasks do), so
    the Trainer accepts it (it refused: "parameters under frozen_prefixes must have requires_grad=False") and no
    optimiser built from the task holds teacher weights."""
    torch.manual_seed(0)
    teacher = tiny_vit()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    task = ClassificationTask(tiny_student(), teacher=teacher, kd_weight=0.5, kd_temperature=2.0)
    assert not any(p.requires_grad for p in task.teacher.parameters())
    assert not any(n.startswith("teacher.") for group in names_in(build_optimizer(task, TrainConfig()), task)
                   for n in group)
    data = TensorDataset(torch.randn(8, 3, 28, 28), torch.randint(0, CLASSES, (8,)))
    cfg = TrainConfig(epochs=1, batch_size=4, lr=1e-3, progress=False, save_checkpoints=False, log_every=1)
    summary = Trainer(task, data, cfg, tmp_path, device="cpu").fit()
    assert summary["steps"] == 2 and summary["final_metrics"]["kd"] >= 0
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())  # the teacher did not move


@pytest.mark.parametrize("kd_weight", [1.5, -0.1])
def test_kd_weight_outside_0_1_is_refused(kd_weight):
    """Above 1 the loss (1 - w) * CE + w * KD weighs the cross-entropy negatively: training would push the label
    loss up (a 1.5 gave a negative loss)."""
    with pytest.raises(ValueError, match=r"kd_weight must be in \[0, 1\]"):
        ClassificationTask(tiny_student(), teacher=tiny_vit(), kd_weight=kd_weight)
    ClassificationTask(tiny_student(), teacher=tiny_vit(), kd_weight=1.0)  # pure distillation is allowed


@pytest.mark.parametrize("teacher_classes,message", [(5, "has 5 .*other classes"), (0, "has 0 .*headless")])
def test_a_teacher_with_other_classes_is_refused_when_the_task_is_built(teacher_classes, message):
    with pytest.raises(ValueError, match=rf"student's {CLASSES} classes; the teacher {message}"):
        ClassificationTask(tiny_student(), teacher=tiny_vit(teacher_classes), kd_weight=0.5)


def test_loss_is_smoothed_ce_plus_t2_scaled_kl():
    """loss = (1 - w) * CE(label smoothing) + w * T^2 * KL(teacher_T || student_T), in eval and in train mode
    (the teacher stays in eval mode)."""
    torch.manual_seed(0)
    student, teacher = tiny_student(), tiny_vit()
    task = ClassificationTask(student, label_smoothing=0.2, teacher=teacher, kd_weight=0.3, kd_temperature=4.0)
    task.train()
    assert student.training and not teacher.training
    student.eval()  # deterministic logits for the reference below (no drop path in these models anyway)
    images, labels = torch.randn(4, 3, 28, 28), torch.tensor([0, 1, 2, 1])
    out = task(images, labels)
    s, t = student(images), teacher(images)
    ce = F.cross_entropy(s, labels, label_smoothing=0.2)
    kl = F.kl_div(F.log_softmax(s / 4, -1), F.log_softmax(t / 4, -1), reduction="batchmean", log_target=True) * 16
    assert out["ce"] == pytest.approx(ce.item(), rel=1e-5) and out["kd"] == pytest.approx(kl.item(), rel=1e-4)
    assert out["loss"].item() == pytest.approx(0.7 * ce.item() + 0.3 * kl.item(), rel=1e-4)
    out["loss"].backward()
    assert all(p.grad is None for p in teacher.parameters())


# --------------------------------------------------------------------------- parameter groups


def test_wildcard_no_weight_decay_names_are_honoured_as_in_timm():
    """timm's optimiser factory matches no_weight_decay() entries with fnmatch; XCiT returns "pos_embed.*" (a
    Fourier position-encoding module whose 4-D conv weight was decayed here)."""
    model = timm.create_model("xcit_nano_12_p16_224", img_size=32, embed_dim=32, depth=1, num_heads=2,
                              cls_attn_layers=1, num_classes=CLASSES)
    assert "pos_embed.*" in model.no_weight_decay()
    task = ClassificationTask(model)
    decay_of = {n: g["weight_decay"] for g in param_groups(task, 0.05) for n, p in task.named_parameters()
                if any(p is q for q in g["params"])}
    pos = [n for n in decay_of if n.startswith("student.pos_embed.")]
    assert any(task.get_parameter(n).ndim > 1 for n in pos)
    assert all(decay_of[n] == 0.0 for n in pos)
    assert decay_of["student.head.weight"] == 0.05  # other weights keep their decay


@pytest.mark.parametrize("mixer", ["mamba2", "gla", "hgrn"])
def test_layer_decay_covers_every_trainable_parameter_once(mixer):
    """Every mixer's student: each trainable parameter in exactly one group, frozen ones in none; the distilled
    student's mask token with the stem (lowest lr, no weight decay); the final norm with the last block; the head at
    the full lr."""
    task = ClassificationTask(tiny_student(mixer, use_mask_token=True))
    task.student.patch_embed.proj.bias.requires_grad_(False)
    opt = build_optimizer(task, TrainConfig(lr=1.0, weight_decay=0.05, layer_decay=0.5))
    groups = names_in(opt, task)
    flat = [n for g in groups for n in g]
    assert len(flat) == len(set(flat))
    assert set(flat) == {n for n, p in task.named_parameters() if p.requires_grad}
    info = {n: (g["lr"], g["weight_decay"]) for g, ns in zip(opt.param_groups, groups) for n in ns}
    depth = len(task.student.blocks)
    stem = 0.5 ** (depth + 1)
    for name in ("student.mask_token", "student.cls_token", "student.pos_embed"):
        assert info[name] == (pytest.approx(stem), 0.0)
    assert info["student.patch_embed.proj.weight"] == (pytest.approx(stem), 0.05)
    assert info["student.norm.weight"][0] == pytest.approx(0.5)
    assert info["student.head.weight"] == (pytest.approx(1.0), 0.05)
    assert {n for n, (lr, _) in info.items() if n.startswith("student.blocks.0.")} and all(
        lr == pytest.approx(0.5 ** depth) for n, (lr, _) in info.items() if n.startswith("student.blocks.0."))


def test_schedule_keeps_layer_scales_from_warm_up_to_the_last_step():
    """Warm-up + cosine multiplies every group alike: the ratio between layers holds at each step, the peak is
    reached at the end of warm-up, and the step after the last one sits at min_lr times the group's scale."""
    task = ClassificationTask(tiny_student())
    cfg = TrainConfig(epochs=1, lr=1.0, min_lr=0.1, warmup_steps=2, layer_decay=0.5)
    opt = build_optimizer(task, cfg)
    sched = build_scheduler(opt, cfg, 6)
    scales = [g["lr_scale"] for g in opt.param_groups]
    seen = []
    for _ in range(6):
        lrs = sched.get_last_lr()
        factor = lrs[-1] / scales[-1]
        assert lrs == pytest.approx([s * factor for s in scales])
        seen.append(factor)
        opt.step()
        sched.step()
    assert seen[:3] == pytest.approx([0.5, 1.0, 1.0])
    assert seen[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 3 / 4)))
    assert sched.get_last_lr() == pytest.approx([0.1 * s for s in scales])


def test_a_compiled_student_keeps_its_layer_decay_and_weight_decay_exclusions():
    # torch.compile wraps the model (parameters under `_orig_mod.`); compiling happens only at the first call.
    plain = ClassificationTask(tiny_student())
    compiled = ClassificationTask(torch.compile(tiny_student()))
    groups = [param_groups(task, weight_decay=0.05, layer_decay=0.7) for task in (plain, compiled)]

    def summary(task, task_groups):
        name = {id(p): n.replace("._orig_mod", "") for n, p in task.named_parameters()}
        return sorted((g["lr_scale"], g["weight_decay"], sorted(name[id(p)] for p in g["params"])) for g in task_groups)

    assert summary(compiled, groups[1]) == summary(plain, groups[0])
    assert any("student.pos_embed" in names and wd == 0.0 for _, wd, names in summary(compiled, groups[1]))
