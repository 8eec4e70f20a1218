"""The CLI as a user with their own data meets it: options that would be silently ignored, mistakes that must be
one-line errors naming the option, and --help / --print-config / --dry-run telling the truth."""
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import timm
import yaml
from PIL import Image

import vitlinearizer  # noqa: F401  (registers the Adventurer models with timm)
from vitlinearizer import cli
from vitlinearizer.checkpoint import export_model
from vitlinearizer.cli import build_parser, main
from vitlinearizer.config import ConfigError, all_keys, build_config, load_yaml, merge
from vitlinearizer.data import DataConfig
from vitlinearizer.runner import model_metadata, read_metadata

CONFIGS = sorted((Path(__file__).parent.parent / "configs").rglob("*.yaml"))
TINY_KWARGS = {"depth": 2, "embed_dim": 32, "mixer_kwargs": {"d_state": 8, "head_dim": 16}}


def _export_tiny_student(path, kind="distilled-student"):
    """A 2-block student exported as distill/finetune would, architecture in the file's metadata."""
    model = timm.create_model("adventurer_nano_patch4_28", num_classes=3, img_size=(28, 28), mixer="mamba2",
                              **TINY_KWARGS)
    info = {"num_classes": 3, "class_names": ["a", "b", "c"], "mean": [0.5] * 3, "std": [0.25] * 3}
    meta = model_metadata(kind, "adventurer_nano_patch4_28", dict(TINY_KWARGS, mixer="mamba2"),
                          DataConfig(name="synthetic", img_size=28), info)
    return export_model(model.state_dict(), path, meta)


def _help(command, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # one option per line: the assertions do not depend on wrapping
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return sub.choices[command].format_help()


@pytest.mark.parametrize("argv,note", [
    (["train-teacher", "--teacher.weights", "vit.pth", "--student.model", "x"],
     "ignoring --teacher.weights, --student.model (train-teacher does not read them)"),
    (["distill", "--finetune.kd_weight", "1"], "ignoring --finetune.kd_weight (distill does not read it)"),
    (["finetune", "--distill.mask_ratio", "0.5"], "ignoring --distill.mask_ratio (finetune does not read it)"),
    (["finetune", "--teacher.weights", "vit.pth"],
     "ignoring --teacher.weights (finetune reads teacher.* only with finetune.kd_weight > 0)"),
])
def test_a_flag_the_command_does_not_read_is_named(argv, note, capsys):
    # train-teacher --teacher.weights used to train from scratch without a word, as if the weights were used.
    assert main([*argv, "--print-config"]) == 0
    assert f"vitlinearizer {argv[0]}: note: {note}\n" == capsys.readouterr().err


def test_flags_that_are_read_bring_no_note(capsys):
    assert main(["finetune", "--teacher.weights", "vit.pth", "--finetune.kd_weight", "0.5", "--train.lr", "0.01",
                 "--print-config"]) == 0
    assert capsys.readouterr().err == ""


def test_help_lists_what_each_command_reads(monkeypatch):
    teacher = _help("train-teacher", monkeypatch)
    assert "--teacher.model " in teacher and "--finetune.label_smoothing" in teacher
    for unread in ("--student.", "--distill.", "--teacher.weights", "--finetune.kd_weight"):
        assert unread not in teacher, unread
    assert "--finetune." not in _help("distill", monkeypatch) and "--distill." not in _help("finetune", monkeypatch)
    assert "--data.augment" not in _help("eval", monkeypatch) and "--data.crop_pct" in _help("eval", monkeypatch)
    every = "".join(_help(c, monkeypatch) for c in cli.TRAINING_COMMANDS)
    assert all(f"--{key} " in every for key in all_keys())


def test_help_metavars_and_defaults_are_accurate(monkeypatch):
    distill = _help("distill", monkeypatch)
    assert "--data.img_size SIZE" in distill and "--data.mean LIST" in distill and "--train.betas LIST" in distill
    assert " ANY" not in distill and "SEQUENCE" not in distill
    # eval takes the preprocessing from the model's file, not DataConfig's defaults.
    evaluation = _help("eval", monkeypatch)
    img_size = next(line for line in evaluation.splitlines() if line.lstrip().startswith("--data.img_size"))
    assert "(default: the model's, from its file)" in img_size and "224" not in img_size
    seed = next(line for line in evaluation.splitlines() if line.lstrip().startswith("--data.seed"))
    assert "with --split holdout, the training run's" in seed
    from vitlinearizer.evaluation import _PREPROCESSING
    assert set(cli.EVAL_FROM_MODEL) == set(_PREPROCESSING)
    predict = _help("predict", monkeypatch)
    assert "(default: None)" not in predict and "--checkpoint FILE  exported model (.safetensors)\n" in predict


def test_an_empty_output_dir_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where the run would have landed
    with pytest.raises(ConfigError, match="output_dir must not be empty"):
        build_config(merge({}, {"output_dir": " "}))
    assert main(["finetune", "--data.name", "synthetic", "--output_dir", ""]) == 2
    assert "output_dir must not be empty" in capsys.readouterr().err and not list(tmp_path.iterdir())


def test_an_output_dir_that_cannot_be_written_is_a_one_line_error(capsys):
    # Used to surface as a bare "[Errno 2] ..." (or a PermissionError traceback) after data and models were built.
    assert main(["finetune", "--data.name", "synthetic", "--output_dir", "/proc/self/run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vitlinearizer finetune: error: output_dir /proc/self/run: cannot write in /proc/self")
    assert len(err.splitlines()) == 1


def test_a_key_given_twice_is_refused_not_silently_dropped(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 3\n  lr: 0.01\n  epochs: 5\n")
    with pytest.raises(ConfigError, match=r"key 'epochs' appears twice in .*c.yaml \(line 4\)"):
        load_yaml(path)
    with pytest.raises(ConfigError, match="key 'depth' appears twice in a command-line value"):
        build_config(merge({}, {"student.model_kwargs": "{depth: 2, depth: 3}"}))
    path.write_text("train:\n  <<: {epochs: 3, lr: 0.01}\n  epochs: 5\n")  # a merge key's override is no repeat
    assert build_config(load_yaml(path)).train.epochs == 5


def test_a_config_that_is_a_directory_says_so(tmp_path, capsys):
    assert main(["finetune", "--config", str(tmp_path), "--print-config"]) == 2
    assert f"config file {tmp_path} is a directory" in capsys.readouterr().err


def test_eval_and_predict_size_options_are_checked_and_named(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--checkpoint", "m.safetensors", "--batch-size", "0"])
    assert exit_.value.code == 2 and "argument --batch-size: must be an integer >= 1, got '0'" in capsys.readouterr().err
    assert main(["predict", "--checkpoint", "m.safetensors", "--img-size", "0", "x.png"]) == 2
    assert "error: --img-size 0: size must be S or HxW" in capsys.readouterr().err


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_print_config_reads_back_as_the_same_config(path, tmp_path, capsys):
    command = path.stem.split("_")[0]
    assert main([command, "--config", str(path), "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert build_config(yaml.safe_load(printed)) == build_config(load_yaml(path))
    (tmp_path / "printed.yaml").write_text(printed)
    assert main([command, "--config", str(tmp_path / "printed.yaml"), "--print-config"]) == 0
    assert capsys.readouterr().out == printed


def test_print_config_and_dry_run_use_the_checkpoints_architecture(tmp_path, capsys):
    """README: finetune takes the student's architecture from student.checkpoint. --print-config showed, and
    --dry-run built, the default student instead (dry_run_config drops the checkpoint before the run reads it)."""
    ckpt = _export_tiny_student(tmp_path / "distilled.safetensors")
    args = ["finetune", "--student.checkpoint", str(ckpt), "--data.name", "synthetic", "--data.img_size", "28",
            "--data.num_classes", "3", "--train.progress", "false", "--output_dir", str(tmp_path / "ft")]
    assert main([*args, "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["student"]["model_kwargs"] == TINY_KWARGS
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # --resume has nothing to resume in a dry run: no "resume requested" warning
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        assert main([*args, "--dry-run", "--resume"]) == 0
    meta = read_metadata(tmp_path / "ft-dry-run" / "student.safetensors")
    assert meta["model_kwargs"] == dict(TINY_KWARGS, mixer="mamba2")


def test_library_warnings_print_as_one_line(tmp_path):
    ckpt = _export_tiny_student(tmp_path / "distilled.safetensors")
    Image.new("RGB", (28, 28), (10, 200, 30)).save(tmp_path / "x.png")
    proc = subprocess.run([sys.executable, "-m", "vitlinearizer", "predict", "--checkpoint", str(ckpt),
                           "--json", str(tmp_path / "x.png")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)[0]["top"]) == 3
    # Not "cli.py:232: UserWarning: ..." followed by a line of the library's source.
    assert proc.stderr.startswith("vitlinearizer predict: warning: ") and "distilled, not fine-tuned" in proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and "cli.py" not in proc.stderr
    # Warnings from elsewhere keep Python's format.
    other = warnings.formatwarning("careful", UserWarning, "/elsewhere/lib.py", 7, "x()")
    assert other.startswith("/elsewhere/lib.py:7: UserWarning: careful")


@pytest.mark.parametrize("model, message", [
    ("vit_tinyy", "unknown timm model 'vit_tinyy'; close matches: vit_tiny_patch16_224"),
    ("resnet18", "teacher must be a ViT-family timm model with patch tokens; got 'resnet18'"),
    ("swin_tiny_patch4_window7_224", "got 'swin_tiny_patch4_window7_224' (SwinTransformer, lacks blocks"),
])
def test_train_teacher_refuses_a_teacher_distill_would_refuse_before_reading_data(model, message, tmp_path, capsys):
    # The data root does not exist: the model is checked first, as distill would check it, not after a data scan.
    argv = ["train-teacher", "--data.name", "imagefolder", "--data.root", str(tmp_path / "absent"),
            "--teacher.model", model, "--output_dir", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command, flags, message", [
    ("distill", ["--student.model_kwargs", "{patch_sz: 8}"], "student.model_kwargs: adventurer_nano_patch4_28 does not "
                                                             "accept patch_sz"),
    ("distill", ["--teacher.model", "resnet18"], "teacher must be a ViT-family timm model with patch tokens"),
    ("finetune", ["--student.model", "adventurer_nano"], "student.model 'adventurer_nano' is unknown"),
    ("finetune", ["--data.img_size", "30"], "30"),  # not a multiple of the patch (4)
])
def test_distill_and_finetune_refuse_unbuildable_models_before_reading_data(command, flags, message, tmp_path, capsys):
    argv = [command, "--data.name", "imagefolder", "--data.root", str(tmp_path / "absent"), "--train.final_test",
            "false", *flags, "--output_dir", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "absent" not in err and "Traceback" not in err
