"""Tests for the frozen ViT teacher adapter (tiny models, CPU only, no downloads)."""
import argparse
import pickle
import warnings

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.layers import to_2tuple

from vitlinearizer.teacher import Teacher, TeacherOutput, UnsafeCheckpointError, load_state_dict_safely

NAME = "vit_tiny_patch16_224"
TINY = dict(img_size=32, patch_size=4, depth=4, embed_dim=32, num_heads=2, num_classes=10)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _source(name=NAME, seed=0, **over):
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, **{**TINY, **over}).eval()


def _images(h=32, w=32, seed=1):
    torch.manual_seed(seed)
    return torch.randn(2, 3, h, w)


def _save(sd, path):
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save(sd, path)
    return path


def _block_output(teacher, block, x):
    """Output of one block (prefix tokens included) from a plain forward_features pass."""
    seen = {}
    handle = teacher.model.blocks[block].register_forward_hook(lambda m, i, o: seen.setdefault("x", o))
    with torch.no_grad():
        final = teacher.model.forward_features(x)
    handle.remove()
    return seen["x"], final


@pytest.fixture(scope="module")
def vit():
    """Shared read-only teacher for tests that neither load weights nor change settings."""
    return Teacher(NAME, **TINY)


class _Payload:
    """Pickles to a call of exec that creates a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


class _Settings:
    """A harmless class: still refused, as the loader cannot tell it from one that runs code."""


# ----------------------------------------------------------------------------- loading


@pytest.mark.parametrize("name", [NAME, "deit_tiny_distilled_patch16_224", "vit_base_patch16_clip_224",
                                  "eva02_tiny_patch14_224"])
def test_round_trip_safetensors(tmp_path, name):
    src = _source(name)
    path = _save(src.state_dict(), tmp_path / "w.safetensors")
    teacher = Teacher(name, weights=path, **TINY)
    x = _images()
    with torch.no_grad():
        assert torch.allclose(teacher(x), src(x), atol=1e-6, rtol=0)
        feats = src.forward_features(x)
    out = teacher.forward_features_aligned(x, [1, 3])
    assert torch.allclose(out.last, feats[:, src.num_prefix_tokens:], atol=1e-6, rtol=0)


@pytest.mark.parametrize("suffix,wrap", [
    (".pth", lambda sd: {"state_dict": sd, "epoch": 3}),
    (".bin", lambda sd: {"model": {f"module.{k}": v for k, v in sd.items()}}),
    (".pt", lambda sd: sd),
])
def test_round_trip_torch_formats(tmp_path, suffix, wrap):
    src = _source()
    path = _save(wrap(src.state_dict()), tmp_path / f"w{suffix}")
    teacher = Teacher(NAME, weights=path, **TINY)
    x = _images()
    with torch.no_grad():
        assert torch.allclose(teacher(x), src(x), atol=1e-6, rtol=0)


def _timm_train_checkpoint(model, ema):
    """What timm's train.py (CheckpointSaver) writes to model_best.pth.tar."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(_images()).sum().backward()
    optimizer.step()
    model.zero_grad()
    args = argparse.Namespace(model=NAME, lr=0.1, epochs=3, aa=None, mean=[0.5, 0.5, 0.5], amp=False)
    return {"epoch": 2, "arch": NAME, "optimizer": optimizer.state_dict(), "version": 2, "args": args,
            "state_dict": model.state_dict(), "state_dict_ema": ema.state_dict(), "metric": 81.5,
            "saver": {"checkpoint_files": [("checkpoint-2.pth.tar", 81.5)], "best_epoch": 2, "best_metric": 81.5,
                      "pending": (2, 81.5)}}


def _outputs_equal(teacher, src):
    x = _images()
    with torch.no_grad():
        return torch.allclose(teacher(x), src(x), atol=1e-6, rtol=0)


def test_timm_train_checkpoint_with_namespace_args(tmp_path):
    src, ema = _source(depth=2, num_classes=5).train(), _source(seed=1, depth=2, num_classes=5)
    path = tmp_path / "model_best.pth.tar"
    torch.save(_timm_train_checkpoint(src, ema), path)
    src.eval()
    over = {**TINY, "depth": 2, "num_classes": 5}
    assert _outputs_equal(Teacher(NAME, weights=path, **over), src)
    assert _outputs_equal(Teacher(NAME, weights=path, prefer_ema=True, **over), ema)
    # The same choice from the command line / YAML: teacher.prefer_ema.
    from vitlinearizer import config as C
    from vitlinearizer.runner import build_teacher

    kwargs = {k: v for k, v in over.items() if k not in ("img_size", "num_classes")}
    for prefer_ema, expected in ((False, src), (True, ema)):
        cfg = C.build_config({"data": {"name": "synthetic", "img_size": 32, "num_classes": 5},
                              "teacher": {"model": NAME, "model_kwargs": kwargs, "weights": str(path),
                                          "prefer_ema": prefer_ema}})
        teacher = build_teacher(cfg, 5, None, None)
        assert _outputs_equal(teacher, expected), prefer_ema


@pytest.mark.parametrize("prefix", ["model.", "net.", "teacher.", "backbone.", "encoder.", "model._orig_mod."])
def test_lightning_checkpoint_with_module_prefix(tmp_path, prefix):
    src = _source(depth=2, num_classes=5)
    sd = {prefix + k: v for k, v in src.state_dict().items()}
    path = _save({"epoch": 1, "global_step": 10, "pytorch-lightning_version": "2.4.0", "state_dict": sd,
                  "optimizer_states": [], "lr_schedulers": [], "hyper_parameters": {"lr": 0.1}},
                 tmp_path / "epoch=1-step=10.ckpt")
    assert _outputs_equal(Teacher(NAME, weights=path, **{**TINY, "depth": 2, "num_classes": 5}), src)
    model_keys = set(src.state_dict())
    assert set(load_state_dict_safely(path, model_keys=model_keys)) == model_keys
    assert set(load_state_dict_safely(path)) == set(sd)  # without the model nothing but module. is guessed


def test_plain_state_dict_without_suffix(tmp_path):
    src = _source(depth=2, num_classes=5)
    path = _save(src.state_dict(), tmp_path / "weights")
    assert _outputs_equal(Teacher(NAME, weights=path, **{**TINY, "depth": 2, "num_classes": 5}), src)


def test_two_prefixed_models_in_one_checkpoint_are_named(tmp_path):
    sd = _source(depth=2).state_dict()
    both = {**{f"student.{k}": v for k, v in sd.items()}, **{f"teacher.{k}": v for k, v in sd.items()}}
    with pytest.raises(ValueError, match="unexpected keys: student.blocks.0") as info:
        Teacher(NAME, weights=_save({"state_dict": both}, tmp_path / "both.ckpt"), **{**TINY, "depth": 2})
    msg = str(info.value)
    assert "missing keys: blocks.0" in msg and "under a prefix (student., teacher.;" in msg


@pytest.mark.parametrize("name", ["evil.pth.tar", "evil.ckpt", "evil"])
def test_any_suffix_still_refuses_code_and_unlisted_classes(tmp_path, name):
    marker = tmp_path / "marker.txt"
    sd = {"w": torch.zeros(1)}
    for args in (_Payload(marker), _Settings()):  # only argparse.Namespace is allowed
        torch.save({"state_dict": sd, "args": args}, tmp_path / name)
        with pytest.raises(UnsafeCheckpointError, match="refused for safety"):
            load_state_dict_safely(tmp_path / name)
    assert not marker.exists()


def test_load_state_dict_safely_containers_and_errors(tmp_path):
    a, b = {"w": torch.zeros(2)}, {"w": torch.ones(2)}
    path = _save({"model": a, "model_ema": b, "epoch": 1}, tmp_path / "ckpt.pth")
    assert torch.equal(load_state_dict_safely(path)["w"], a["w"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the EMA weights exist: no warning
        assert torch.equal(load_state_dict_safely(path, prefer_ema=True)["w"], b["w"])
    plain = _save({"state_dict": a}, tmp_path / "plain.pth")
    with pytest.warns(UserWarning, match="plain.pth holds no EMA weights.*prefer_ema has no effect"):
        assert torch.equal(load_state_dict_safely(plain, prefer_ema=True)["w"], a["w"])
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_state_dict_safely(tmp_path / "nope.safetensors")
    assert torch.equal(load_state_dict_safely(_save(a, tmp_path / "w.npz"))["w"], a["w"])  # any suffix is torch
    np.savez(tmp_path / "real.npz", w=np.zeros(2))
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    for other in ("real.npz", "notes.txt"):
        with pytest.raises(ValueError, match="neither a .safetensors file nor a torch checkpoint") as info:
            load_state_dict_safely(tmp_path / other)
        assert not isinstance(info.value, UnsafeCheckpointError), other
    with pytest.raises(ValueError, match="no tensor"):
        load_state_dict_safely(_save({"epoch": 1}, tmp_path / "empty.pth"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_malicious_pickle_is_refused(tmp_path, writer):
    marker = tmp_path / "marker.txt"
    path = tmp_path / "evil.pth"
    payload = {"state_dict": {"w": torch.zeros(1)}, "evil": _Payload(marker)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    with pytest.raises(UnsafeCheckpointError, match="arbitrary Python objects") as info:
        load_state_dict_safely(path)
    assert "refused for safety" in str(info.value) and "safetensors" in str(info.value)
    with pytest.raises(ValueError, match="arbitrary Python objects"):
        Teacher(NAME, weights=path, **TINY)
    assert not marker.exists()
    # Prove the payload is live: an unrestricted unpickler would have run it.
    if writer == "pickle.dump":
        with open(path, "rb") as f:
            pickle.load(f)
        assert marker.exists()


def test_shape_mismatch_lists_keys(tmp_path):
    path = _save(_source(embed_dim=48, num_heads=2).state_dict(), tmp_path / "wide.safetensors")
    with pytest.raises(ValueError) as info:
        Teacher(NAME, weights=path, **TINY)
    msg = str(info.value)
    assert NAME in msg and "wide.safetensors" in msg and "shape mismatches" in msg
    assert "cls_token: checkpoint (1, 1, 48) vs model (1, 1, 32)" in msg and "more)" in msg


def test_missing_and_unexpected_keys_listed(tmp_path):
    deeper = _save(_source(depth=5).state_dict(), tmp_path / "deep.safetensors")
    with pytest.raises(ValueError, match=r"12 unexpected keys: blocks\.4\.") as info:
        Teacher(NAME, weights=deeper, **TINY)
    assert "(+2 more)" in str(info.value)
    shallower = _save(_source(depth=3).state_dict(), tmp_path / "shallow.safetensors")
    with pytest.raises(ValueError, match=r"12 missing keys: blocks\.3\."):
        Teacher(NAME, weights=shallower, **TINY)


def test_head_mismatch_needs_ignore_head(tmp_path):
    src = _source(num_classes=5)
    path = _save(src.state_dict(), tmp_path / "w5.safetensors")
    with pytest.raises(ValueError, match="ignore_head=True") as info:
        Teacher(NAME, weights=path, **TINY)
    assert "head.weight" in str(info.value) and "head outputs: 5" in str(info.value)
    teacher = Teacher(NAME, weights=path, ignore_head=True, **TINY)
    x = _images()
    with torch.no_grad():
        ref = src.forward_features(x)
    assert torch.allclose(teacher.forward_features_aligned(x, []).cls, ref[:, 0], atol=1e-6, rtol=0)
    assert Teacher(NAME, weights=path, **{**TINY, "num_classes": 5})(x).shape == (2, 5)
    # A headless teacher (what distillation builds) takes the backbone of any checkpoint, head or not.
    headless = Teacher(NAME, weights=path, **{**TINY, "num_classes": 0})
    assert torch.allclose(headless.forward_features_aligned(x, []).cls, ref[:, 0], atol=1e-6, rtol=0)


def _to_openai_clip(sd):
    """timm CLIP ViT state dict -> OpenAI CLIP layout (inverse of timm's converter)."""
    out = {"logit_scale": torch.tensor(4.6), "token_embedding.weight": torch.zeros(8, 4)}
    swaps = [("patch_embed.proj", "conv1"), ("norm_pre", "ln_pre"), ("blocks.", "transformer.resblocks."),
             ("norm1", "ln_1"), ("norm2", "ln_2"), ("attn.qkv.", "attn.in_proj_"),
             ("attn.proj", "attn.out_proj"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")]
    for k, v in sd.items():
        if k == "cls_token":
            out["visual.class_embedding"] = v[0, 0]
        elif k == "pos_embed":
            out["visual.positional_embedding"] = v[0]
        elif k == "head.weight":
            out["visual.proj"] = v.t()
        elif k != "head.bias":
            for a, b in swaps:
                k = k.replace(a, b)
            out["visual." + ("ln_post." + k[5:] if k.startswith("norm.") else k)] = v
    return out


def test_openai_clip_layout_goes_through_timm_filter(tmp_path):
    name = "vit_base_patch16_clip_224"
    src = _source(name, num_classes=16)
    torch.nn.init.zeros_(src.head.bias)  # OpenAI's projection has no bias
    path = _save(_to_openai_clip(src.state_dict()), tmp_path / "openai.pt")
    teacher = Teacher(name, weights=path, **{**TINY, "num_classes": 16})
    x = _images()
    with torch.no_grad():
        assert torch.allclose(teacher(x), src(x), atol=1e-5, rtol=0)
    # A different resolution needs the filter's pos-embed resampling (8x8 -> 12x12 grid).
    big = Teacher(name, weights=path, **{**TINY, "num_classes": 16, "img_size": 48})
    assert big.forward_features_aligned(_images(48, 48), [-1]).last.shape == (2, 144, 32)
    assert teacher.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))


# ----------------------------------------------------------------------------- model checks


def test_rejects_non_vit_and_suggests_names():
    with pytest.raises(ValueError, match="ViT-family timm model with patch tokens; got 'resnet18'"):
        Teacher("resnet18")
    with pytest.raises(ValueError, match="ViT-family.*got 'resnet18'"):
        Teacher("resnet18", img_size=32)
    with pytest.raises(ValueError, match="unknown timm model 'vit_tiny_patch16_2244'.*vit_tiny_patch16_224"):
        Teacher("vit_tiny_patch16_2244")
    # A misspelt prefix: the names sharing it come first, not difflib's shorter look-alikes (gcvit_tiny, ...).
    with pytest.raises(ValueError, match="unknown timm model 'vit_tinyy'; close matches: vit_tiny_patch16_224"):
        Teacher("vit_tinyy")
    # Shaped like a ViT, but with the class token last: refused, not misread.
    with pytest.raises(ValueError, match="class token first; got 'adventurer_nano_patch4_28'.*class token last"):
        Teacher("adventurer_nano_patch4_28")


def test_properties():
    teacher = Teacher("deit_tiny_distilled_patch16_224", **TINY)
    assert (teacher.embed_dim, teacher.depth, teacher.patch_size) == (32, 4, (4, 4))
    assert teacher.num_prefix_tokens == 2 and teacher.has_class_token
    assert teacher.mean == pytest.approx(IMAGENET_MEAN) and teacher.std == pytest.approx(IMAGENET_STD)
    no_cls = Teacher(NAME, class_token=False, global_pool="avg", **TINY)
    assert no_cls.num_prefix_tokens == 0 and not no_cls.has_class_token
    out = no_cls.forward_features_aligned(_images(), [0])
    assert out.cls is None and out.stages[0].shape == (2, 64, 32)


def test_frozen_under_training():
    teacher = Teacher(NAME, drop_rate=0.5, drop_path_rate=0.5, **TINY)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    assert all(not p.requires_grad for p in teacher.parameters())
    student = torch.nn.Linear(32, 32)
    # Teacher params in the optimizer too: a frozen teacher must survive that mistake.
    opt = torch.optim.AdamW(list(student.parameters()) + list(teacher.parameters()), lr=0.1, weight_decay=0.5)
    teacher.train()
    x = _images()
    out = teacher.forward_features_aligned(x, [1, 3])
    assert not out.last.requires_grad and not out.stages[0].requires_grad
    loss = (student(out.stages[0]) - out.last).pow(2).mean() + student(out.cls).pow(2).mean()
    loss.backward()
    opt.step()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    assert not teacher.training and not any(m.training for m in teacher.modules())
    teacher.train(True)
    assert not any(m.training for m in teacher.modules())
    # Dropout/drop-path stay off, so repeated calls agree exactly.
    assert torch.equal(teacher.forward_features_aligned(x, [3]).last, out.last)


@pytest.mark.parametrize("depth,k,expected", [(12, 4, [2, 5, 8, 11]), (24, 4, [5, 11, 17, 23]), (12, 1, [11])])
def test_stage_indices(depth, k, expected):
    assert Teacher(NAME, **{**TINY, "depth": depth}).stage_indices(k) == expected


def test_stage_indices_rejects_uneven_split():
    with pytest.raises(ValueError, match=r"depth 10 into K=4.*\[1, 2, 5, 10\]"):
        Teacher(NAME, **{**TINY, "depth": 10}).stage_indices(4)


# ----------------------------------------------------------------------------- aligned features


@pytest.mark.parametrize("reg_tokens", [0, 4])
def test_native_grid_matches_manual_forward_in_raster_order(reg_tokens):
    teacher = Teacher(NAME, reg_tokens=reg_tokens, **TINY)
    npt = teacher.num_prefix_tokens
    assert npt == 1 + reg_tokens
    x = _images()
    block2, final = _block_output(teacher, 2, x)
    for grid in (None, (8, 8)):
        out = teacher.forward_features_aligned(x, [2], out_grid=grid)
        assert isinstance(out, TeacherOutput)
        # timm puts the class token first, then registers; patch tokens follow in raster order.
        assert torch.equal(out.stages[0], block2[:, npt:])
        assert torch.equal(out.last, final[:, npt:])
        assert torch.equal(out.cls, final[:, 0])
    assert not torch.allclose(out.stages[0][:, 0], block2[:, 0])  # the class token is not a patch


def test_non_square_resampling_keeps_row_major_layout(vit):
    teacher = vit
    x = _images(32, 48)  # dynamic size: native grid 8 x 12
    native = teacher.forward_features_aligned(x, [1, 3])
    assert native.stages[0].shape == (2, 96, 32)
    out = teacher.forward_features_aligned(x, [3, 1], out_grid=(7, 5))
    maps = native.stages[1].transpose(1, 2).reshape(2, 32, 8, 12)
    expected = F.interpolate(maps, size=(7, 5), mode="bilinear", align_corners=False, antialias=True)
    assert torch.allclose(out.stages[0], expected.flatten(2).transpose(1, 2), atol=1e-6)
    assert torch.equal(out.stages[1], teacher.forward_features_aligned(x, [1], out_grid=(7, 5)).stages[0])


@pytest.mark.parametrize("grid", [(8, 8), (7, 7), (4, 4), (16, 16)])
def test_aligned_shapes(vit, grid):
    teacher = vit
    out = teacher.forward_features_aligned(_images(), teacher.stage_indices(2), out_grid=grid)
    n = grid[0] * grid[1]
    assert [s.shape for s in out.stages] == [(2, n, 32)] * 2
    assert out.last.shape == (2, n, 32) and out.cls.shape == (2, 32)
    assert all(s.is_contiguous() for s in out.stages)


def test_constant_map_survives_resampling():
    teacher = Teacher(NAME, **TINY)
    torch.nn.init.zeros_(teacher.model.pos_embed)
    # Identical patches and no position signal -> every token equal, at any grid.
    out = teacher.forward_features_aligned(torch.ones(1, 3, 32, 32), [3], out_grid=(5, 3))
    assert torch.allclose(out.stages[0], out.stages[0][:, :1].expand_as(out.stages[0]), atol=1e-5)


def test_bad_stage_index(vit):
    with pytest.raises(ValueError, match="out of range for depth 4"):
        vit.forward_features_aligned(_images(), [4])


# ----------------------------------------------------------------------------- normalisation


def test_input_renormalisation_matches_manual():
    teacher = Teacher(NAME, **TINY)
    t_mean = torch.tensor(teacher.mean).view(1, 3, 1, 1)
    t_std = torch.tensor(teacher.std).view(1, 3, 1, 1)
    assert not torch.allclose(t_mean, torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
    torch.manual_seed(2)
    raw = torch.rand(2, 3, 32, 32)
    data = (raw - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    manual = (raw - t_mean) / t_std
    ref_logits, ref_feats = teacher(manual), teacher.forward_features_aligned(manual, [1])
    teacher.set_input_normalization(IMAGENET_MEAN, IMAGENET_STD)
    assert torch.allclose(teacher.normalize_input(data), manual, atol=1e-5)
    assert torch.allclose(teacher(data), ref_logits, atol=1e-4)
    assert torch.allclose(teacher.forward_features_aligned(data, [1]).stages[0], ref_feats.stages[0], atol=1e-4)
    assert "input_scale" not in teacher.state_dict() and "input_shift" not in teacher.state_dict()
    teacher.set_input_normalization()
    assert torch.equal(teacher(manual), ref_logits)
    teacher.set_input_normalization(teacher.mean, teacher.std)
    assert teacher.normalize_input(manual) is manual
    with pytest.raises(ValueError, match="both"):
        teacher.set_input_normalization(IMAGENET_MEAN)


def test_a_teacher_exported_by_the_library_reads_its_inputs_with_its_training_statistics(tmp_path):
    """The demo teacher is trained on data normalised with the dataset's mean/std, which its file records; taking
    timm's architecture default (0.5) instead mis-scaled every input the demo's teacher saw (~3 points)."""
    from vitlinearizer.checkpoint import export_model

    source = _source()
    data_mean, data_std = (0.29, 0.29, 0.29), (0.35, 0.35, 0.35)
    path = export_model(source, tmp_path / "teacher.safetensors",
                        dict(kind="teacher", model=NAME, mean=list(data_mean), std=list(data_std)))
    teacher = Teacher(NAME, weights=path, **TINY)
    assert (teacher.mean, teacher.std) == (data_mean, data_std)
    assert Teacher(NAME, **TINY).mean != data_mean  # timm's default, not changed for other teachers
    teacher.set_input_normalization(data_mean, data_std)  # the data pipeline of its own training
    x = _images()
    assert teacher.normalize_input(x) is x  # nothing to re-map: the inputs are what it was trained on
    with torch.no_grad():
        assert torch.allclose(teacher(x), source(x), atol=1e-5)
    # A plain file without the library's description keeps timm's statistics.
    plain = Teacher(NAME, weights=_save(source.state_dict(), tmp_path / "plain.safetensors"), **TINY)
    assert plain.mean == Teacher(NAME, **TINY).mean


def test_input_not_divisible_by_teacher_patch_is_resized():
    """A /6 teacher on 28-px images (a /14 teacher beside a /16 student at 64 px is the real case)."""
    teacher = Teacher("vit_tiny_patch16_224", img_size=30, patch_size=6, embed_dim=32, depth=2, num_heads=2)
    images = torch.randn(2, 3, 28, 28)
    out = teacher.forward_features_aligned(images, [0, 1], out_grid=(7, 7))
    assert [s.shape for s in out.stages] == [(2, 49, 32)] * 2 and out.last.shape == (2, 49, 32)
    resized = torch.nn.functional.interpolate(images, size=(30, 30), mode="bilinear", antialias=True)
    torch.testing.assert_close(teacher(images), teacher(resized))


def test_a_checkpoint_with_another_patch_size_warns(tmp_path):
    # timm resamples a 8x8 patch embedding to 4x4 without a word; the teacher then computes other features.
    path = _save(_source(patch_size=8).state_dict(), tmp_path / "p8.safetensors")
    with pytest.warns(UserWarning, match=r"\(8, 8\) patches but the teacher is built with \(4, 4\).*patch_size: 8"):
        Teacher(NAME, weights=path, **TINY)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Teacher(NAME, weights=path, **{**TINY, "patch_size": 8})


def test_timms_logit_distillation_normalises_inputs_for_this_teacher():
    # timm's LogitDistillationTask wraps a module teacher in its DistillationTeacher, which maps the student's
    # normalisation to the teacher's pretrained_cfg statistics: ours must be the ones it reads (a CLIP teacher's).
    from timm.task import LogitDistillationTask

    clip_mean, clip_std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    teacher = Teacher(NAME, **TINY, pretrained_cfg_overlay=dict(mean=clip_mean, std=clip_std))
    student = timm.create_model("adventurer_nano_patch4_28", num_classes=teacher.model.num_classes,
                                img_size=TINY["img_size"])
    task = LogitDistillationTask(student, teacher, verbose=False)
    assert torch.allclose(task.teacher.mean_kd.flatten(), torch.tensor(clip_mean))
    raw = torch.rand(2, 3, *to_2tuple(TINY["img_size"]))
    student_view = (raw - task.student_mean) / task.student_std
    with torch.no_grad():
        through_timm = task.teacher(task.teacher.normalize_input(student_view, task.student_mean, task.student_std))
        direct = teacher((raw - torch.tensor(clip_mean).view(1, 3, 1, 1)) / torch.tensor(clip_std).view(1, 3, 1, 1))
    torch.testing.assert_close(through_timm, direct, rtol=1e-4, atol=1e-4)
