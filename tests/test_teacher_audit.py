"""Teacher loading as a user with their own timm checkpoint meets it (tiny models, CPU only, no downloads)."""
import os
import warnings

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

from vitlinearizer.checkpoint import export_model
from vitlinearizer.teacher import Teacher, UnsafeCheckpointError, load_state_dict_safely, pixels_per_token

NAME = "vit_tiny_patch16_224"
ARCH = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2)


def _vit(name=NAME, img_size=32, num_classes=3, **over):
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, img_size=img_size, num_classes=num_classes,
                             **{**ARCH, **over}).eval()


def _safetensors(model, path):
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


class _HarmlessGlobal:
    """Pickles to a call of a module-level function: refused like any other global outside the allow-list."""

    def __reduce__(self):
        return os.getcwd, ()


class _Plain:
    """An instance of a class outside the allow-list: torch words this refusal differently."""


# ----------------------------------------------------------------------------- unreadable files


def test_truncated_or_fake_safetensors_is_a_clear_error(tmp_path):
    # safetensors raises its own SafetensorError, which used to escape as a traceback from the CLI.
    good = _safetensors(_vit(), tmp_path / "good.safetensors")
    data = good.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:len(data) // 2])
    (tmp_path / "text.safetensors").write_text("not a checkpoint")
    for name in ("cut.safetensors", "text.safetensors"):
        with pytest.raises(ValueError, match=rf"{name} is not a readable \.safetensors file \(truncated or corrupt"):
            load_state_dict_safely(tmp_path / name)


@pytest.mark.parametrize("payload", [_HarmlessGlobal(), _Plain()])
def test_refused_pickle_names_the_global_and_never_advises_weights_only_false(tmp_path, payload):
    # This torch's text does not mark its cause with "WeightsUnpickler error:"; the whole text, which suggests
    # re-running with weights_only=False, was passed on.
    path = tmp_path / "ckpt.pth"
    torch.save({"model": _vit().state_dict(), "extra": payload}, path)
    with pytest.raises(UnsafeCheckpointError, match="refused for safety") as info:
        load_state_dict_safely(path)
    msg = str(info.value)
    assert "weights_only" not in msg and "GLOBAL" in msg and "\n" not in msg


# ----------------------------------------------------------------------------- architectures


@pytest.mark.parametrize("name", ["cait_xxs24_224", "xcit_nano_12_p16_224"])
def test_class_token_after_the_blocks_is_refused_when_built(name):
    # These have patch_embed, blocks and forward_intermediates, but crashed only at the first training step.
    with pytest.raises(ValueError, match=rf"got '{name}' \(\w+\), whose class token joins only after the patch"):
        Teacher(name, img_size=32, num_classes=0, depth=1)


def test_a_checkpoint_of_another_width_or_depth_names_the_setting(tmp_path):
    built = dict(img_size=32, num_classes=0, **ARCH)
    wide = _safetensors(_vit(embed_dim=48), tmp_path / "wide.safetensors")
    with pytest.raises(ValueError, match=r"ViT with embed_dim 48, the teacher 'vit_tiny_patch16_224' is built with "
                                         r"embed_dim 32: .*\{embed_dim: 48\} \(and its num_heads\)"):
        Teacher(NAME, weights=wide, **built)
    deep = _safetensors(_vit(depth=3), tmp_path / "deep.safetensors")
    with pytest.raises(ValueError, match=r"ViT with depth 3, .* built with depth 2: .*\{depth: 3\}$"):
        Teacher(NAME, weights=deep, **built)
    resnet = timm.create_model("resnet18", pretrained=False, num_classes=3)
    with pytest.raises(ValueError, match=r"holds no ViT weights .*e\.g\. bn1\.bias.*another architecture"):
        Teacher(NAME, weights=_safetensors(resnet, tmp_path / "resnet.safetensors"), **built)


def test_a_plain_vit_checkpoint_for_a_distilled_deit_names_the_missing_token(tmp_path):
    path = _safetensors(_vit(), tmp_path / "vit.safetensors")
    with pytest.raises(ValueError, match=r"could not adapt .*the file has no dist_token, which "
                                         r"'deit_tiny_distilled_patch16_224' has: is it the checkpoint of another"):
        Teacher("deit_tiny_distilled_patch16_224", weights=path, img_size=32, num_classes=0, **ARCH)


def test_too_many_stages_names_the_option():
    with pytest.raises(ValueError, match=r"distill\.num_stages\) must divide 2: one of \[1, 2\]"):
        Teacher(NAME, img_size=32, num_classes=0, **ARCH).stage_indices(4)


# ----------------------------------------------------------------------------- position embeddings


def test_a_non_square_teacher_exported_by_the_library_loads_at_other_sizes(tmp_path):
    """Its file records the size it was trained at; timm assumed a square grid (or 224 px) instead: the export at
    32x48 failed at 64x96 and, at 48x32, had its 4x6 position grid silently read as 6x4."""
    source = _vit(img_size=(32, 48))
    path = export_model(source, tmp_path / "teacher.safetensors",
                        dict(kind="teacher", model=NAME, img_size=[32, 48], mean=[0.5] * 3, std=[0.5] * 3))
    for size, grid in (((64, 96), (8, 12)), ((48, 32), (6, 4)), ((32, 48), (4, 6))):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            teacher = Teacher(NAME, weights=path, img_size=size, num_classes=0, **ARCH)
        want = resample_abs_pos_embed(source.pos_embed.detach(), new_size=grid, old_size=(4, 6))
        torch.testing.assert_close(teacher.model.pos_embed, want)


def test_a_plain_non_square_checkpoint_names_the_sizes_it_may_have(tmp_path):
    path = _safetensors(_vit(img_size=(32, 48)), tmp_path / "plain.safetensors")
    for size, model_tokens in ((32, 17), ((64, 96), 97)):
        with pytest.raises(ValueError) as info:
            Teacher(NAME, weights=path, img_size=size, num_classes=0, **ARCH)
        msg = str(info.value)
        # The file's own shape, not the 145 tokens timm's square-grid guess made of it.
        assert f"pos_embed: checkpoint (1, 25, 32) vs model (1, {model_tokens}, 32)" in msg
        assert "24 positions are a non-square grid" in msg and "32x48, 48x32" in msg
        assert "pretrained_cfg_overlay: {input_size: [3, H, W]}" in msg
    # The way out the message names works.
    teacher = Teacher(NAME, weights=path, img_size=(64, 96), num_classes=0,
                      pretrained_cfg_overlay=dict(input_size=(3, 32, 48)), **ARCH)
    assert teacher.model.pos_embed.shape == (1, 97, 32)


def test_same_token_count_on_another_grid_warns(tmp_path):
    # 7x28 positions are as many as 224 px gives /16 (14x14): timm resamples a file trained at 112x448, used at
    # 112x448, as if it were 14x14, and every teacher feature changes.
    arch = dict(ARCH, patch_size=16, depth=1)
    source = _vit(img_size=(112, 448), **arch)
    path = _safetensors(source, tmp_path / "wide.safetensors")
    with pytest.warns(UserWarning, match=r"from the grid of a 224x224 input .* to \(7, 28\).*pretrained_cfg_overlay"):
        Teacher(NAME, weights=path, img_size=(112, 448), num_classes=0, **arch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        teacher = Teacher(NAME, weights=path, img_size=(112, 448), num_classes=0,
                          pretrained_cfg_overlay=dict(input_size=(3, 112, 448)), **arch)
    assert torch.equal(teacher.model.pos_embed, source.pos_embed)


# ----------------------------------------------------------------------------- the tokens distilled from


@pytest.mark.parametrize("name,over,npt", [
    (NAME, {}, 1),
    (NAME, dict(class_token=False, global_pool="avg"), 0),
    (NAME, dict(reg_tokens=4), 5),
    ("deit_tiny_distilled_patch16_224", {}, 2),
    ("vit_base_patch16_clip_224", dict(pre_norm=True), 1),
    (NAME, dict(patch_size=14), 1),
])
def test_targets_are_timms_own_tokens_after_a_resolution_change(tmp_path, name, over, npt):
    """A checkpoint saved at 56 px, used at 56x112: the targets are the timm model's own patch tokens at that size
    (prefix tokens removed), loaded and resampled the way timm loads its own weights."""
    path = _safetensors(_vit(name, img_size=56, **over), tmp_path / "w.safetensors")
    teacher = Teacher(name, weights=path, img_size=(56, 112), num_classes=0, **{**ARCH, **over})
    reference = timm.create_model(name, pretrained=False, img_size=(56, 112), num_classes=0, **{**ARCH, **over})
    reference.load_state_dict(teacher.model.state_dict())  # what was loaded; checked against timm's filter below
    family = timm.models.vision_transformer
    torch.testing.assert_close(teacher.model.pos_embed,
                               family.checkpoint_filter_fn(load_state_dict_safely(path), reference)["pos_embed"])
    teacher.set_input_normalization()
    x = torch.randn(2, 3, 56, 112)
    out = teacher.forward_features_aligned(x, [0, 1])
    with torch.no_grad():
        final, inter = reference.eval().forward_intermediates(x, indices=[0, 1], norm=False)
        features = reference.forward_features(x)
    assert reference.num_prefix_tokens == teacher.num_prefix_tokens == npt
    torch.testing.assert_close(out.last, features[:, npt:])
    for got, want in zip(out.stages, inter):
        torch.testing.assert_close(got, want.flatten(2).transpose(1, 2))
    assert (out.cls is None) == (npt == 0) and (out.cls is None or torch.equal(out.cls, features[:, 0]))


def test_a_hybrid_vit_teacher_tiles_its_input_by_the_stem_stride_times_the_patch():
    """vit_tiny_r_s16_p8: a ResNet stem of stride 4, then 8x8 patches, i.e. 32 px per token, while its
    ``patch_embed.patch_size`` says 8: a 72 px input (a multiple of 8, not of 32) must be resized to 64 px first,
    where taking the patch size alone let timm's reshape of the 2x2 (floor of 72/32) token grid fail."""
    teacher = Teacher("vit_tiny_r_s16_p8_224", img_size=64, num_classes=0, depth=2)
    assert pixels_per_token(teacher.model) == teacher.patch_size == (32, 32)
    assert pixels_per_token(_vit()) == (8, 8)
    teacher.set_input_normalization()
    x = torch.rand(2, 3, 72, 72)
    out = teacher.forward_features_aligned(x, [0, 1])
    resized = torch.nn.functional.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False, antialias=True)
    with torch.no_grad():
        features = teacher.model.forward_features(teacher.normalize_input(resized))
    torch.testing.assert_close(out.last, features[:, 1:])
    assert out.stages[0].shape == (2, 4, 192)


def test_a_directory_or_missing_file_is_named_by_its_option(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"^teacher.weights .* is a directory; pass the weights file in it"):
        Teacher(NAME, weights=tmp_path, img_size=32, **ARCH)
    with pytest.raises(FileNotFoundError, match=r"^teacher.weights not found: .*absent.pth"):
        Teacher(NAME, weights=tmp_path / "absent.pth", img_size=32, **ARCH)
    with pytest.raises(FileNotFoundError, match=r"^checkpoint file not found"):  # the library call names no option
        load_state_dict_safely(tmp_path / "absent.pth")
