"""Logit distillation in finetune: runs end to end, and refuses a teacher whose logits are not for these classes."""
import json
import re

import pytest

from vitlinearizer.cli import main

DATA = ["--data.name", "synthetic", "--data.img_size", "28", "--data.synthetic_length", "32",
        "--data.holdout_fraction", "0", "--train.epochs", "1", "--train.batch_size", "8", "--train.progress", "false"]
TEACHER = ["--teacher.model_kwargs", "{patch_size: 4, embed_dim: 32, depth: 2, num_heads: 2}"]
STUDENT = ["--student.model_kwargs", "{depth: 2, embed_dim: 32, mixer_kwargs: {d_state: 8, head_dim: 16}}"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    root = tmp_path_factory.mktemp("kd")
    assert main(["train-teacher", *DATA, "--data.num_classes", "3", *TEACHER, "--output_dir", str(root / "t")]) == 0
    return root / "t" / "teacher.safetensors"


def test_finetune_with_logit_distillation(teacher, tmp_path, capsys):
    run = tmp_path / "kd"
    args = [*DATA, "--data.num_classes", "3", *TEACHER, *STUDENT, "--teacher.weights", str(teacher),
            "--finetune.kd_weight", "0.5", "--output_dir", str(run)]
    assert main(["finetune", *args]) == 0
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["kd"] >= 0 and logged[-1]["ce"] > 0  # both terms of the loss were computed


@pytest.mark.parametrize("change,message", [
    (["--teacher.ignore_head", "true"], "teacher.ignore_head drops its classifier"),
    (["--data.num_classes", "4"], r"trained on the classes \['class_0', 'class_1', 'class_2'\].*same classes"),
])
def test_a_teacher_without_logits_for_these_classes_is_refused(teacher, tmp_path, capsys, change, message):
    args = [*DATA, "--data.num_classes", "3", *TEACHER, *STUDENT, "--teacher.weights", str(teacher),
            "--finetune.kd_weight", "0.5", "--output_dir", str(tmp_path / "bad"), *change]
    assert main(["finetune", *args]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "bad" / "checkpoints").exists()
