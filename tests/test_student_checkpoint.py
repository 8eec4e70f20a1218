"""A student checkpoint carries its architecture: fine-tuning it needs no repeated model options."""
import pytest
import timm
import torch

from vitlinearizer import runner
from vitlinearizer.checkpoint import export_model
from vitlinearizer.config import build_config, merge
from vitlinearizer.data import DataConfig


def _export(tmp_path, img_size=(32, 48)):
    model = timm.create_model("adventurer_micro_patch4_28", patch_size=8, mixer="gla", img_size=img_size,
                              num_classes=3, use_mask_token=True)
    info = dict(num_classes=3, class_names=["a", "b", "c"], mean=(0.5,) * 3, std=(0.5,) * 3)
    data = DataConfig(name="synthetic", img_size=list(img_size))
    meta = runner.model_metadata("distilled-student", "adventurer_micro_patch4_28",
                                 {"patch_size": 8, "mixer": "gla"}, data, info)
    path = tmp_path / "student.safetensors"
    export_model(model, path, meta)
    return model, path


def _config(path, **overrides):
    return build_config(merge({}, {"student.checkpoint": str(path), "data.name": "synthetic",
                                   "data.img_size": 64, **overrides}))


def test_the_architecture_comes_from_the_checkpoint(tmp_path):
    original, path = _export(tmp_path)
    cfg = runner.resolve_student(_config(path))
    assert (cfg.student.model, cfg.student.mixer, cfg.student.model_kwargs) == (
        "adventurer_micro_patch4_28", "gla", {"patch_size": 8})
    student = runner.build_student(cfg, num_classes=5, use_mask_token=False)
    assert torch.equal(student.blocks[3].mixer.q_proj.weight, original.blocks[3].mixer.q_proj.weight)
    # The 4x6 grid of the non-square checkpoint, resampled to 8x8: only the metadata tells it from 6x4.
    expected = torch.nn.functional.interpolate(
        original.pos_embed[:, :-1].reshape(1, 4, 6, -1).permute(0, 3, 1, 2), size=(8, 8), mode="bicubic",
        antialias=True, align_corners=False).permute(0, 2, 3, 1).reshape(1, 64, -1)
    torch.testing.assert_close(student.pos_embed[:, :-1], expected, rtol=1e-4, atol=1e-5)


def test_options_that_contradict_the_weights_are_named(tmp_path):
    _, path = _export(tmp_path)
    cfg = runner.resolve_student(_config(path, **{"student.mixer": "hgrn"}))
    with pytest.raises(ValueError, match=r"does not fit student.model adventurer_micro_patch4_28 with mixer=hgrn.*"
                                         r"in the file.*Set student.model, student.mixer"):
        runner.build_student(cfg, num_classes=3, use_mask_token=False)
