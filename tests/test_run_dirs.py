"""A run directory belongs to one run: starting over in it, or resuming it with other settings, is refused
before anything in it changes."""
import json
from pathlib import Path

import pytest
import yaml

from vitlinearizer.cli import main

TINY = [
    "--data.name", "synthetic", "--data.img_size", "28", "--data.synthetic_length", "32", "--data.num_classes", "3",
    "--data.holdout_fraction", "0", "--train.epochs", "1", "--train.batch_size", "8", "--train.progress", "false",
    "--student.model_kwargs", "{depth: 2, embed_dim: 32, mixer_kwargs: {d_state: 8, head_dim: 16}}",
]


def test_a_run_directory_is_not_started_over_or_resumed_differently(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["finetune", *TINY, "--output-dir", str(run)]) == 0  # demo and bench spell it so; both work
    config = (run / "config.yaml").read_text()
    metrics = (run / "metrics.jsonl").read_text()
    capsys.readouterr()

    assert main(["finetune", *TINY, "--output_dir", str(run), "--train.lr", "0.1"]) == 2
    assert "holds checkpoints of an earlier run" in capsys.readouterr().err
    assert main(["finetune", *TINY, "--output_dir", str(run), "--train.batch_size", "4", "--resume"]) == 2
    assert "batch_size" in capsys.readouterr().err
    # Refused by the Trainer, before the resume looks at the checkpoints.
    assert main(["finetune", *TINY, "--output_dir", str(run), "--train.batch_size", "64", "--resume"]) == 2
    assert "too small for one step" in capsys.readouterr().err
    # Settings the Trainer never sees (data, augmentation, the task's loss, the models) are checked against the
    # run's config.yaml: taken silently, they would be recorded as if the whole run had used them.
    changed = ["--data.augment", "none", "--finetune.label_smoothing", "0.3"]
    assert main(["finetune", *TINY, *changed, "--output_dir", str(run), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "data.augment 'simple' -> 'none', finetune.label_smoothing 0.1 -> 0.3" in err and len(err.splitlines()) == 1
    wider = TINY[:-1] + ["{depth: 2, embed_dim: 48, mixer_kwargs: {d_state: 8, head_dim: 16}}"]
    assert main(["finetune", *wider, "--output_dir", str(run), "--resume"]) == 2
    assert "student.model_kwargs.embed_dim 32 -> 48" in capsys.readouterr().err
    # The refusals left the directory describing the run its checkpoints belong to.
    assert (run / "config.yaml").read_text() == config
    assert yaml.safe_load(config)["train"]["batch_size"] == 8
    assert (run / "metrics.jsonl").read_text() == metrics
    # How the run is carried out may change (here logging and the final test).
    assert main(["finetune", *TINY, "--train.log_every", "7", "--train.final_test", "false", "--output_dir", str(run),
                 "--resume"]) == 0
    capsys.readouterr()
    # Without a config.yaml to compare with, the checkpoint itself refuses other shapes, in one line where torch
    # would list the tensors whose shapes differ over many.
    (run / "config.yaml").unlink()
    assert main(["finetune", *wider, "--output_dir", str(run), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "does not fit the task: " in err and "size mismatch" in err and len(err.splitlines()) == 1


def test_a_missing_evaluation_folder_fails_before_training(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    for name in ("cat", "dog"):
        (tmp_path / "data" / "train" / name).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.full((8, 8, 3), 40 * i, dtype=np.uint8)).save(tmp_path / "data" / "train" / name / f"{i}.png")
    run = tmp_path / "run"
    args = ["--data.name", "imagefolder", "--data.root", str(tmp_path / "data"), "--data.img_size", "28",
            "--output_dir", str(run), *TINY[8:]]
    assert main(["finetune", *args]) == 2
    err = capsys.readouterr().err
    assert "no evaluation folder" in err and "--train.final_test false" in err
    assert not (run / "checkpoints").exists()
    # Without a final test, train/ alone is enough: the summary reports the holdout (2 of 8 images) and no test.
    assert main(["finetune", *args, "--data.holdout_fraction", "0.25", "--train.batch_size", "2",
                 "--train.final_test", "false"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert "test" not in summary and summary["last_eval"]["holdout_n"] == 2 and summary["complete"]
    # Neither a test nor a holdout: the run is allowed, with a warning that nothing will measure it.
    with pytest.warns(UserWarning, match="is never evaluated; set data.holdout_fraction"):
        assert main(["finetune", *args, "--train.final_test", "false", "--output_dir", str(tmp_path / "blind")]) == 0
    # The same tree without --data.name imagefolder is read as the default Fashion-MNIST: named, with the fix.
    assert main(["finetune", *args[2:]]) == 2
    assert "looks like an ImageFolder tree (it has train/ or val/): pass --data.name imagefolder" in capsys.readouterr().err


def test_the_supervised_row_of_the_ablation_exports_a_tested_classifier(tmp_path, capsys):
    from vitlinearizer.checkpoint import read_export_metadata

    run = tmp_path / "none"
    teacher = ["--teacher.model_kwargs", "{patch_size: 4, embed_dim: 32, depth: 2, num_heads: 2}"]
    assert main(["distill", *TINY, *teacher, "--distill.objective", "none", "--output_dir", str(run)]) == 0
    assert "test" in capsys.readouterr().out  # objective none trains the head: it is tested, as finetune is
    assert read_export_metadata(run / "student.safetensors")["kind"] == "student"
    # Resumed as an activation-matching distillation: refused, naming the setting, by the config check...
    config = (run / "config.yaml").read_text()
    act = ["distill", *TINY, *teacher, "--distill.objective", "act", "--output_dir", str(run), "--resume"]
    assert main(act) == 2
    assert "distill.objective 'none' -> 'act'" in capsys.readouterr().err
    assert (run / "config.yaml").read_text() == config
    # ... and, without a config.yaml, by the checkpoint: the same tensors exist but others train (the mask token,
    # not the head and final norm), refused in one line, not with torch's error.
    (run / "config.yaml").unlink()
    assert main(act) == 2
    err = capsys.readouterr().err
    assert "the set of trained parameters or their optimizer groups changed" in err and len(err.splitlines()) == 1


def test_a_path_setting_compares_as_the_file_it_names(tmp_path, monkeypatch):
    from vitlinearizer.runner import config_changes

    monkeypatch.chdir(tmp_path)
    saved = {"teacher": {"weights": "tw/vit.pth"}, "data": {"root": "~/data"}}
    same = {"teacher": {"weights": str(tmp_path / "tw" / "vit.pth")}, "data": {"root": str(Path.home() / "data")}}
    assert config_changes(saved, same, {}) == []
    other = {"teacher": {"weights": "tw/other.pth"}, "data": {"root": "~/data"}}
    assert config_changes(saved, other, {}) == ["teacher.weights"]
    # Only settings that name files: a string elsewhere still compares as text.
    assert config_changes({"train": {"amp": "bf16"}}, {"train": {"amp": "./bf16"}}, {}) == ["train.amp"]


def test_a_run_directory_given_as_the_checkpoint_names_the_file_in_it(tmp_path, capsys):
    from PIL import Image

    (tmp_path / "student.safetensors").write_bytes(b"")
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    for argv in (["eval", "--checkpoint", str(tmp_path)],
                 ["predict", "--checkpoint", str(tmp_path), str(tmp_path / "x.png")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"checkpoint {tmp_path} is a directory; pass the exported model in it: " \
               f"{tmp_path / 'student.safetensors'}" in err
