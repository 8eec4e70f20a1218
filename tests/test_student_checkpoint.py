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
    cfg = runner.resolve_architectures(_config(path))
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
    cfg = runner.resolve_architectures(_config(path, **{"student.mixer": "hgrn"}))
    with pytest.raises(ValueError, match=r"does not fit student.model adventurer_micro_patch4_28 with mixer=hgrn.*"
                                         r"in the file.*Set student.model, student.mixer"):
        runner.build_student(cfg, num_classes=3, use_mask_token=False)


def test_an_option_the_user_set_wins_even_at_its_default_value(tmp_path):
    # The file is a micro (GLA) student; nano and mamba2 are the config's defaults. Named on the command line (or in
    # a YAML file), they are the user's choice, not "left unset": they must reach the weights check, not yield.
    _, path = _export(tmp_path)
    cfg = _config(path, **{"student.model": "adventurer_nano_patch4_28", "student.mixer": "mamba2"})
    assert runner.resolve_architectures(cfg).student.model == "adventurer_micro_patch4_28"  # values alone
    chosen = runner.resolve_architectures(cfg, explicit={"student.model", "student.mixer"})
    assert (chosen.student.model, chosen.student.mixer) == ("adventurer_nano_patch4_28", "mamba2")
    with pytest.raises(ValueError, match="does not fit student.model adventurer_nano_patch4_28 with mixer=mamba2"):
        runner.build_student(chosen, num_classes=3, use_mask_token=False)


def _teacher_export(tmp_path, kwargs=None):
    kwargs = kwargs or {"patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 2}
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=3, **kwargs)
    info = dict(num_classes=3, class_names=["a", "b", "c"], mean=(0.5,) * 3, std=(0.5,) * 3)
    path = tmp_path / "teacher.safetensors"
    export_model(model, path, runner.model_metadata("teacher", "vit_tiny_patch16_224", kwargs,
                                                    DataConfig(name="synthetic", img_size=32), info))
    return model, path


def test_a_trained_teacher_is_rebuilt_from_its_export_description(tmp_path):
    model, path = _teacher_export(tmp_path)
    cfg = build_config(merge({}, {"teacher.weights": str(path), "data.name": "synthetic", "data.img_size": 32}))
    resolved = runner.resolve_architectures(cfg)
    assert resolved.teacher.model_kwargs == {"patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 2}
    teacher = runner.build_teacher(resolved, 0, (0.5,) * 3, (0.5,) * 3)
    assert torch.equal(teacher.model.blocks[1].attn.qkv.weight, model.blocks[1].attn.qkv.weight)
    # A key the config sets wins over the file's (and is then checked against the weights).
    deeper = runner.resolve_architectures(build_config(merge({}, {
        "teacher.weights": str(path), "teacher.model_kwargs": {"depth": 3}})))
    assert deeper.teacher.model_kwargs["depth"] == 3 and deeper.teacher.model_kwargs["embed_dim"] == 48
    # Another architecture named explicitly: the file's kwargs describe a different model and are not mixed in.
    other = runner.resolve_architectures(build_config(merge({}, {
        "teacher.weights": str(path), "teacher.model": "vit_small_patch16_224"})))
    assert (other.teacher.model, other.teacher.model_kwargs) == ("vit_small_patch16_224", {})


def test_an_export_in_the_other_role_is_refused_by_name(tmp_path):
    _, student = _export(tmp_path)
    _, teacher = _teacher_export(tmp_path)
    with pytest.raises(ValueError, match=r"teacher.weights .*student.safetensors is an export of kind "
                                         r"'distilled-student'.*a student goes in student.checkpoint"):
        runner.resolve_architectures(build_config(merge({}, {"teacher.weights": str(student)})))
    with pytest.raises(ValueError, match=r"student.checkpoint .*teacher.safetensors is an export of kind 'teacher'"
                                         r".*a teacher goes in teacher.weights"):
        runner.resolve_architectures(build_config(merge({}, {"student.checkpoint": str(teacher)})))


def test_the_cli_passes_what_the_user_named(tmp_path, capsys):
    import yaml

    from vitlinearizer.cli import main
    _, path = _export(tmp_path)
    common = ["finetune", "--student.checkpoint", str(path), "--data.name", "synthetic", "--print-config"]
    assert main(common) == 0
    assert yaml.safe_load(capsys.readouterr().out)["student"]["model"] == "adventurer_micro_patch4_28"
    assert main([*common, "--student.model", "adventurer_nano_patch4_28"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["student"]["model"] == "adventurer_nano_patch4_28"
    config = tmp_path / "run.yaml"
    config.write_text("student:\n  model: adventurer_nano_patch4_28\n")
    assert main([*common, "--config", str(config)]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["student"]["model"] == "adventurer_nano_patch4_28"


def test_a_run_without_a_teacher_leaves_the_teacher_settings_alone(tmp_path, capsys):
    from vitlinearizer.cli import main
    _, student = _export(tmp_path)
    # finetune without logit distillation reads no teacher.*: the CLI says it ignores the flag, and must not fail on it.
    argv = ["finetune", "--student.checkpoint", str(student), "--teacher.weights", str(student), "--data.name",
            "synthetic", "--print-config"]
    assert main(argv) == 0
    assert "ignoring --teacher.weights" in capsys.readouterr().err
    assert main([*argv, "--finetune.kd_weight", "0.5"]) == 2
    assert "teacher.weights" in capsys.readouterr().err
