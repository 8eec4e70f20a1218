"""The CLI end to end on tiny synthetic data: every command, config checking, and the exported files."""
import contextlib
import io
import json
import shutil
import subprocess
import sys
import warnings

import pytest
import safetensors.torch
import timm
import torch
from PIL import Image

import vitlinearizer  # noqa: F401
from vitlinearizer.cli import main
from vitlinearizer.config import HELP, all_keys

TINY = [
    "--data.name", "synthetic", "--data.img_size", "28", "--data.synthetic_length", "48", "--data.num_classes", "3",
    "--data.holdout_fraction", "0.25",
    "--train.epochs", "1", "--train.batch_size", "8", "--train.progress", "false",
    "--teacher.model_kwargs", "{patch_size: 4, embed_dim: 32, depth: 2, num_heads: 2}",
    "--student.model_kwargs", "{depth: 2, embed_dim: 32, mixer_kwargs: {d_state: 8, head_dim: 16}}",
    "--distill.num_stages", "2",
]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """train-teacher -> distill -> finetune, once for the module."""
    root = tmp_path_factory.mktemp("cli")
    assert main(["train-teacher", *TINY, "--output_dir", str(root / "teacher")]) == 0
    teacher = root / "teacher" / "teacher.safetensors"
    assert main(["distill", *TINY, "--output_dir", str(root / "distill"), "--teacher.weights", str(teacher)]) == 0
    distilled = root / "distill" / "student.safetensors"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["finetune", *TINY, "--output_dir", str(root / "finetune"), "--student.checkpoint",
                     str(distilled)]) == 0
    (root / "finetune" / "printed.json").write_text(printed.getvalue())
    return root


def test_a_training_command_prints_its_results(pipeline):
    printed = json.loads((pipeline / "finetune" / "printed.json").read_text())
    summary = json.loads((pipeline / "finetune" / "summary.json").read_text())
    assert printed["exported"] == str(pipeline / "finetune" / "student.safetensors")
    assert printed["test"] == summary["test"] and printed["steps"] == 4
    # The holdout metrics (data.holdout_fraction 0.25): a run without a final test has no other measurement.
    assert printed["last_eval"] == summary["last_eval"] and 0 <= printed["last_eval"]["holdout_top1"] <= 100
    assert printed["last_eval"]["holdout_n"] == 12 and isinstance(printed["last_eval"]["holdout_n"], int)


def test_every_run_directory_is_complete(pipeline):
    for stage, exported in (("teacher", "teacher"), ("distill", "student"), ("finetune", "student")):
        run = pipeline / stage
        assert (run / f"{exported}.safetensors").is_file()
        assert (run / "config.yaml").is_file() and (run / "metrics.jsonl").read_text().strip()
        summary = json.loads((run / "summary.json").read_text())
        assert summary["complete"] and summary["steps"] == 4  # 36 training images / batch 8
        assert any((run / "checkpoints").glob("step_*"))
        assert summary["curves"] == str(run / "curves.png")
        with Image.open(run / "curves.png") as image:
            assert image.format == "PNG"
    assert 0 <= json.loads((pipeline / "finetune" / "summary.json").read_text())["test"]["top1"] <= 100


def test_plot_compares_runs_and_refuses_what_is_not_a_run(pipeline, tmp_path, capsys):
    output = tmp_path / "figures" / "compare.png"
    assert main(["plot", str(pipeline / "distill"), str(pipeline / "finetune"), "-o", str(output),
                 "--labels", "distilled", "fine-tuned"]) == 0
    assert capsys.readouterr().out.strip() == str(output)
    with Image.open(output) as image:
        assert image.format == "PNG"
    assert main(["plot", str(tmp_path / "nowhere")]) == 2
    assert "nowhere does not exist" in capsys.readouterr().err
    assert not (tmp_path / "nowhere").exists()  # the default output's folder is not created for a failed plot
    assert main(["plot", str(pipeline / "distill"), "-o", str(tmp_path / "curves.jpg")]) == 2
    assert "written as png, pdf, svg" in capsys.readouterr().err
    # The file instead of its run directory: named as such, not as a bad output path.
    assert main(["plot", str(pipeline / "distill" / "metrics.jsonl")]) == 2
    assert f"metrics.jsonl is a file; pass the run directory that holds it ({pipeline / 'distill'})" in \
        capsys.readouterr().err
    # --labels before the runs takes them as labels: the error says so instead of argparse's "RUN_DIR required".
    assert main(["plot", "--labels", "a", str(pipeline / "distill")]) == 2
    assert f"--labels took every word after it (a {pipeline / 'distill'}); put it after the run directories" in \
        capsys.readouterr().err


def test_a_diverged_run_still_draws_its_curves(tmp_path):
    run = tmp_path / "diverged"
    assert main(["train-teacher", *TINY, "--train.lr", "1e30", "--train.log_every", "1", "--train.max_bad_steps",
                 "2", "--output_dir", str(run)]) == 1
    with Image.open(run / "curves.png") as image:
        assert image.format == "PNG"


def test_a_figure_that_fails_does_not_fail_the_run(tmp_path, monkeypatch):
    from vitlinearizer import runner

    def broken(*args, **kwargs):
        raise RuntimeError("no fonts")

    monkeypatch.setattr(runner, "plot_curves", broken)
    with pytest.warns(UserWarning, match="could not draw .*curves.png: RuntimeError: no fonts"):
        assert main(["train-teacher", *TINY, "--train.save_checkpoints", "false", "--output_dir", str(tmp_path / "t")]) == 0
    summary = json.loads((tmp_path / "t" / "summary.json").read_text())
    assert summary["complete"] and "curves" not in summary and (tmp_path / "t" / "teacher.safetensors").is_file()


def test_finetuned_student_loads_with_plain_timm_and_its_own_preprocessing(pipeline, tmp_path):
    from vitlinearizer.checkpoint import export_model, pretrained_cfg_overlay, read_export_metadata
    from vitlinearizer.runner import load_exported_model

    state = safetensors.torch.load_file(str(pipeline / "finetune" / "student.safetensors"))
    # Statistics of a dataset of its own (the synthetic data's are ImageNet's, which timm's registry has too).
    meta = {**read_export_metadata(pipeline / "finetune" / "student.safetensors"), "mean": [0.3] * 3, "std": [0.4] * 3}
    path = export_model(state, tmp_path / "student.safetensors", meta)
    model = timm.create_model("adventurer_nano_patch4_28", pretrained=True, img_size=meta["img_size"],
                              **meta["model_kwargs"], pretrained_cfg_overlay=pretrained_cfg_overlay(path))
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    # timm's data config is the one the student was trained with, not the registry's defaults.
    registry = timm.data.resolve_data_config(model=timm.create_model("adventurer_nano_patch4_28"))
    for loaded in (model, load_exported_model(path)[0]):
        config = timm.data.resolve_data_config(model=loaded)
        assert config["mean"] == tuple(meta["mean"]) != registry["mean"]
        assert config["std"] == tuple(meta["std"]) and config["input_size"] == (3, 28, 28)
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), load_exported_model(path)[0](x))
    with pytest.raises(ValueError, match="no vitlinearizer description"):
        pretrained_cfg_overlay(_plain_copy(state, tmp_path / "plain.safetensors"))


def _plain_copy(state, path):
    safetensors.torch.save_file(state, str(path))
    return path


def test_eval_and_predict(pipeline, tmp_path, capsys):
    ckpt = str(pipeline / "finetune" / "student.safetensors")
    assert main(["eval", "--checkpoint", ckpt, "--data.name", "synthetic", "--data.synthetic_length", "48",
                 "--data.num_classes", "3"]) == 0
    result = json.loads(capsys.readouterr().out)
    summary = json.loads((pipeline / "finetune" / "summary.json").read_text())
    assert result["n"] == 48 and result["top1"] == pytest.approx(summary["test"]["top1"])
    images = []
    for i, mode in enumerate(["RGB", "L", "RGBA"]):
        images.append(tmp_path / f"img{i}.png")
        Image.new(mode, (40, 31), color=100 if mode == "L" else (10 * i, 80, 200, 255)[: len(mode)]).save(images[-1])
    assert main(["predict", "--checkpoint", ckpt, "--topk", "2", "--json", *map(str, images)]) == 0
    preds = json.loads(capsys.readouterr().out)
    assert [len(p["top"]) for p in preds] == [2, 2, 2]
    assert all(0 <= t["prob"] <= 1 and t["label"].startswith("class") for p in preds for t in p["top"])
    # At another resolution (the student runs at any multiple of its patch size): other inputs, other scores.
    assert main(["predict", "--checkpoint", ckpt, "--img-size", "56x44", "--json", str(images[0])]) == 0
    wide = json.loads(capsys.readouterr().out)[0]["top"]
    assert len(wide) == 3 and wide != preds[0]["top"] and sum(t["prob"] for t in wide) == pytest.approx(1, abs=1e-3)
    assert main(["predict", "--checkpoint", ckpt, "--img-size", "30", str(images[0])]) == 2
    assert "not a multiple of the patch size 4x4" in capsys.readouterr().err
    assert main(["predict", "--checkpoint", ckpt, "--img-size", "big", str(images[0])]) == 2
    assert "S or HxW" in capsys.readouterr().err


def test_distill_takes_a_teacher_trained_on_other_classes(pipeline, tmp_path):
    """Distillation uses features only: a teacher checkpoint with a 7-class head distils into a 3-class student."""
    state = safetensors.torch.load_file(str(pipeline / "teacher" / "teacher.safetensors"))
    state["head.weight"], state["head.bias"] = torch.randn(7, state["head.weight"].shape[1]), torch.zeros(7)
    other = tmp_path / "teacher7.safetensors"
    safetensors.torch.save_file(state, str(other))
    assert main(["distill", *TINY, "--output_dir", str(tmp_path / "distill"), "--teacher.weights", str(other)]) == 0
    assert (tmp_path / "distill" / "student.safetensors").is_file()


def test_initialisation_follows_the_seed_not_the_process_history(tmp_path):
    """A stage run after other random work in the same process (as in the demo) exports the same model as
    when run alone, and another train.seed gives another model."""
    def finetune(name, seed=0):
        assert main(["finetune", *TINY, "--train.seed", str(seed), "--output_dir", str(tmp_path / name)]) == 0
        return safetensors.torch.load_file(str(tmp_path / name / "student.safetensors"))

    alone = finetune("alone")
    torch.rand(1000)  # what earlier stages would have drawn
    after_other_work = finetune("after")
    assert all(torch.equal(alone[k], after_other_work[k]) for k in alone)
    other_seed = finetune("seed1", seed=1)
    assert not torch.equal(alone["pos_embed"], other_seed["pos_embed"])


def _image_folder(root, classes=("circle", "square"), per_split=(6, 3)):
    """An ImageFolder tree of mixed sizes, modes and formats: root/{train,val}/<class>/*."""
    for split, count in zip(("train", "val"), per_split):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                mode, ext = (("RGB", "jpg"), ("L", "png"), ("RGBA", "png"))[i % 3]
                color = 60 + 120 * c if mode == "L" else (60 + 120 * c, 30 * i, 90, 255)[: len(mode)]
                Image.new(mode, (37 + 5 * i, 29 + 3 * c), color=color).save(folder / f"{i}.{ext}")


def test_own_imagefolder_at_a_non_default_resolution(tmp_path, capsys):
    """The README's own-data path: a student trained at 48 px with patch 8 (not its registered 28 px / patch 4)
    is exported, and eval/predict rebuild it at that resolution from the file alone."""
    _image_folder(tmp_path / "data")
    data = ["--data.name", "imagefolder", "--data.root", str(tmp_path / "data"), "--data.img_size", "48"]
    student = ["--student.model_kwargs", "{patch_size: 8, depth: 2, embed_dim: 32, mixer_kwargs: {d_state: 8, head_dim: 16}}"]
    run = tmp_path / "finetune"
    assert main(["finetune", *data, *student, "--train.epochs", "1", "--train.batch_size", "4",
                 "--train.progress", "false", "--output_dir", str(run)]) == 0
    ckpt = str(run / "student.safetensors")
    assert safetensors.torch.load_file(ckpt)["pos_embed"].shape[1] == (48 // 8) ** 2 + 1
    capsys.readouterr()
    assert main(["eval", "--checkpoint", ckpt, *data[:4]]) == 0
    result = json.loads(capsys.readouterr().out)
    summary = json.loads((run / "summary.json").read_text())
    assert result["n"] == 6 and result["top1"] == pytest.approx(summary["test"]["top1"])
    # Same number of classes, other names: refused with the names, not a meaningless accuracy.
    _image_folder(tmp_path / "other", classes=("circle", "star"))
    assert main(["eval", "--checkpoint", ckpt, "--data.name", "imagefolder", "--data.root", str(tmp_path / "other")]) == 2
    assert "1: data 'star' vs model 'square'" in capsys.readouterr().err
    # The holdout split is a seeded draw from train/'s listing: the same listing gives the same split, silently;
    # a changed one (a file added, removed or unreadable now) a different split, which must not pass silently.
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert main(["eval", "--checkpoint", ckpt, *data[:4], "--split", "holdout"]) == 0
    capsys.readouterr()
    Image.new("RGB", (40, 30), (10, 200, 10)).save(tmp_path / "data" / "train" / "circle" / "new.png")
    with pytest.warns(UserWarning, match=r"not the listing .* trained on \(12 files then, 13 now"):
        assert main(["eval", "--checkpoint", ckpt, *data[:4], "--split", "holdout"]) == 0
    _image_folder(tmp_path / "three", classes=("circle", "square", "star"))
    assert main(["eval", "--checkpoint", ckpt, "--data.name", "imagefolder", "--data.root", str(tmp_path / "three")]) == 2
    assert "3 classes (circle, square, star) but the model predicts 2 (circle, square)" in capsys.readouterr().err
    image = next((tmp_path / "data" / "val" / "square").glob("*.jpg"))
    assert main(["predict", "--checkpoint", ckpt, "--json", str(image)]) == 0
    preds = json.loads(capsys.readouterr().out)
    assert {t["label"] for t in preds[0]["top"]} <= {"circle", "square"}


def test_the_summary_records_the_files_a_run_skipped(tmp_path):
    from types import SimpleNamespace

    from vitlinearizer.data import DataWarning
    from vitlinearizer.runner import _skipped_files

    _image_folder(tmp_path / "data")
    broken, empty = tmp_path / "data" / "train" / "circle" / "bad.jpg", tmp_path / "data" / "val" / "square" / "0.png"
    broken.write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    empty.write_bytes(b"")
    run = tmp_path / "run"
    data = ["--data.name", "imagefolder", "--data.root", str(tmp_path / "data"), "--data.img_size", "28",
            "--data.holdout_fraction", "0.25"]
    student = ["--student.model_kwargs", "{depth: 2, embed_dim: 32, mixer_kwargs: {d_state: 8, head_dim: 16}}"]
    with pytest.warns(DataWarning, match="unreadable"):
        assert main(["finetune", *data, *student, "--train.epochs", "1", "--train.batch_size", "4",
                     "--train.progress", "false", "--output_dir", str(run)]) == 0
    skipped = json.loads((run / "summary.json").read_text())["skipped_files"]
    # The holdout is carved from train/ after its scan: the broken file is listed once, under train.
    assert skipped.keys() == {"train", "test"}
    assert [f["path"] for f in skipped["train"]["files"]] == [str(broken)] and skipped["train"]["count"] == 1
    assert skipped["test"] == {"count": 1, "files": [{"path": str(empty), "reason": "empty file (0 bytes)"}]}
    assert skipped["train"]["files"][0]["reason"]
    many = SimpleNamespace(skipped=[(f"{i}.jpg", "bad") for i in range(250)])
    listed = _skipped_files({"train": many, "holdout": None, "test": SimpleNamespace(skipped=[])})
    assert listed.keys() == {"train"} and listed["train"]["count"] == 250 and len(listed["train"]["files"]) == 100


def test_the_summary_records_files_that_fail_only_in_a_data_loader_worker(tmp_path):
    """With data.verify none a broken file passes the scan and fails in a worker process, whose own record of
    it dies with the worker: the summary must list it all the same, once."""
    from vitlinearizer.data import DataWarning

    _image_folder(tmp_path / "data")
    broken = tmp_path / "data" / "train" / "circle" / "bad.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    run = tmp_path / "run"
    args = ["finetune", "--data.name", "imagefolder", "--data.root", str(tmp_path / "data"), "--data.img_size", "28",
            "--data.verify", "none", "--student.model_kwargs", "{depth: 2, embed_dim: 32, mixer_kwargs: {d_state: 8, "
            "head_dim: 16}}", "--train.epochs", "2", "--train.batch_size", "4", "--train.num_workers", "2",
            "--train.progress", "false", "--output_dir", str(run)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        assert main(args) == 0
    skipped = json.loads((run / "summary.json").read_text())["skipped_files"]
    assert skipped.keys() == {"train"}  # the broken file is in train/ and never reached the holdout
    assert skipped["train"]["count"] == 1 and skipped["train"]["files"][0]["path"] == str(broken)
    assert "Error" in skipped["train"]["files"][0]["reason"]
    # A run refused for lack of --resume leaves the finished run's records alone...
    assert main(args) == 2 and (run / "skipped" / "train.jsonl").is_file()
    # ...while one that died before its first checkpoint leaves records the next run there replaces.
    shutil.rmtree(run / "checkpoints")
    broken.unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        assert main([*args, "--train.num_workers", "0"]) == 0
    assert json.loads((run / "summary.json").read_text())["skipped_files"] == {}


def test_skip_log_keeps_the_first_record_of_each_file_and_survives_a_cut_line(tmp_path):
    from vitlinearizer.data import read_skip_log

    log = tmp_path / "train.jsonl"
    assert read_skip_log(log) == []
    log.write_text('{"path": "a.jpg", "reason": "first"}\n{"path": "b.jpg", "reason": "x"}\n'
                   '{"path": "a.jpg", "reason": "again"}\n{"path": "c.j')
    assert read_skip_log(log) == [("a.jpg", "first"), ("b.jpg", "x")]


def test_resume_reproduces_uninterrupted_run(pipeline, tmp_path):
    """`--resume` after the run finished epoch 1 of 2 ends where the uninterrupted 2-epoch run ends."""
    teacher = str(pipeline / "teacher" / "teacher.safetensors")
    args = [*TINY, "--teacher.weights", teacher, "--train.epochs", "2"]
    assert main(["distill", *args, "--output_dir", str(tmp_path / "full")]) == 0
    # Same schedule (2 epochs) but stopped after epoch 1: keep only the epoch-1 checkpoint of the full run.
    import shutil
    partial = tmp_path / "partial" / "checkpoints"
    partial.mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step_00000004", partial / "step_00000004")
    (partial / "latest").write_text("step_00000004")
    assert main(["distill", *args, "--output_dir", str(tmp_path / "partial"), "--resume"]) == 0
    a = safetensors.torch.load_file(str(tmp_path / "full" / "student.safetensors"))
    b = safetensors.torch.load_file(str(tmp_path / "partial" / "student.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("args,message", [
    (["--train.lrr", "1e-3"], r"unrecognized arguments: --train.lrr 1e-3 \(--train.lrr: did you mean --train.lr\b"),
    (["--data.num_workers", "2"], r"unrecognized arguments: --data.num_workers 2 \(--data.num_workers: did you mean --train.num_workers\?\)"),
    (["--train.lr", "fast"], "train.lr expects a number, got 'fast'"),
    (["--train.lr", "-1"], "lr must be > 0"),
    (["--distill.mask_ratio", "1.5"], r"mask_ratio must be in \(0, 1\)"),
    (["--distill.objective", "kd"], "objective must be one of"),
    (["--student.mixer", "rwkv"], "unknown mixer 'rwkv'"),
    # timm's train-only "random" used to pass, train, and fail with a bare KeyError at the final test.
    (["--data.interpolation", "random"], r"data.interpolation must be one of \('nearest', 'bilinear', 'bicubic'"),
    (["--data.img_size", "30"], "not a multiple of the patch size"),
    (["--train.batch_size", "64"], "too small for one step of batch_size=64"),
])
def test_bad_input_fails_before_training(tmp_path, args, message, capsys):
    argv = ["distill", *TINY, "--output_dir", str(tmp_path / "bad"), *args]
    with pytest.raises(SystemExit) if "unrecognized" in message else _no_raise():
        code = main(argv)
        assert code == 2
    err = capsys.readouterr().err
    import re
    assert re.search(message, err), err
    assert not (tmp_path / "bad" / "checkpoints").exists()


class _no_raise:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_training_commands_refuse_a_single_class_and_a_teacher_size_off_its_patch(tmp_path, capsys):
    """One class trains to loss 0 and 100% whatever the images; a teacher at 30 px with patch 8 would have its
    last 6 px cropped silently (timm's ViT): both refused before training, naming the fix."""
    _image_folder(tmp_path / "one", classes=("circle",))
    data = ["--data.name", "imagefolder", "--data.root", str(tmp_path / "one"), "--data.img_size", "32"]
    for command in ("train-teacher", "finetune"):
        assert main([command, *TINY, *data, "--output_dir", str(tmp_path / command)]) == 2
        assert "has 1 class (circle): a classifier needs at least 2" in capsys.readouterr().err
        assert not (tmp_path / command / "checkpoints").exists()
    tiny_vit = ["--teacher.model_kwargs", "{patch_size: 8, embed_dim: 32, depth: 1, num_heads: 2}"]
    assert main(["train-teacher", *TINY, *tiny_vit, "--data.img_size", "30", "--output_dir", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err
    assert "data.img_size for teacher vit_tiny_patch16_224" in err and "not a multiple of the patch size 8x8" in err
    assert not (tmp_path / "t" / "checkpoints").exists()


def test_yaml_config_unknown_key_is_named(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  epoch: 3\n")
    assert main(["distill", "--config", str(cfg), *TINY]) == 2
    assert "unknown key 'train.epoch' (did you mean 'epochs'?)" in capsys.readouterr().err


@pytest.mark.parametrize("command,option,model", [
    ("finetune", "student.model_kwargs", "adventurer_nano_patch4_28"),
    ("train-teacher", "teacher.model_kwargs", "vit_tiny_patch16_224"),
    ("distill", "teacher.model_kwargs", "vit_tiny_patch16_224"),  # built by the Teacher, which wraps timm's error
])
def test_an_argument_the_model_does_not_take_is_named(tmp_path, capsys, command, option, model):
    kwargs = {"student.model_kwargs": "{num_head: 4}",
              "teacher.model_kwargs": "{patch_size: 4, embed_dim: 32, depth: 2, num_heads: 2, num_head: 4}"}
    assert main([command, *TINY, f"--{option}", kwargs[option], "--output_dir", str(tmp_path / "run")]) == 2
    err = _without_notes(capsys.readouterr().err)
    assert err.startswith(f"vitlinearizer {command}: error: {option}: {model} does not accept num_head ")
    assert len(err.splitlines()) == 1 and not (tmp_path / "run" / "checkpoints").exists()


def test_a_diverged_run_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    from vitlinearizer import runner
    from vitlinearizer.engine import TrainingDivergedError

    message = ("training diverged: 10 consecutive steps with a non-finite loss or gradient norm (up to step 18, "
               "epoch 1); the last good checkpoint is run/checkpoints/step_00000008. Lower lr, set clip_grad or check "
               "the data.")

    def diverge(cfg, resume=False, explicit=None):
        raise TrainingDivergedError(message)

    monkeypatch.setattr(runner, "finetune", diverge)
    assert main(["finetune", *TINY, "--output_dir", str(tmp_path / "run")]) == 1  # a failed run, not bad input
    assert _without_notes(capsys.readouterr().err) == f"vitlinearizer finetune: error: {message}\n"


def _without_notes(err):
    """stderr less the notes on TINY's options for other stages (one list serves every command)."""
    return "".join(line for line in err.splitlines(keepends=True) if ": note: ignoring --" not in line)


def test_help_documents_every_option():
    assert set(all_keys()) <= set(HELP), set(all_keys()) - set(HELP)
    out = subprocess.run([sys.executable, "-m", "vitlinearizer", "distill", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for key in all_keys():  # all but finetune's: distill does not read those, and leaves them out of its help
        assert (f"--{key}" in out) != key.startswith("finetune."), key


def test_gradient_checkpointing_trains_the_same_student(pipeline, tmp_path, monkeypatch):
    """--student.grad_checkpointing recomputes the blocks in the backward: the trained weights are those of the
    run without it (the recomputation replays the same random numbers), and the flag reaches the model."""
    import vitlinearizer.runner as runner
    built = []
    build_student = runner.build_student
    monkeypatch.setattr(runner, "build_student", lambda *a, **k: built.append(build_student(*a, **k)) or built[-1])
    teacher = str(pipeline / "teacher" / "teacher.safetensors")
    extra = ["--teacher.weights", teacher, "--student.drop_path_rate", "0.2"]
    assert main(["distill", *TINY, *extra, "--output_dir", str(tmp_path / "plain")]) == 0
    assert main(["distill", *TINY, *extra, "--student.grad_checkpointing", "true",
                 "--output_dir", str(tmp_path / "checkpointed")]) == 0
    assert [m.grad_checkpointing for m in built] == [False, True]
    plain = safetensors.torch.load_file(tmp_path / "plain" / "student.safetensors")
    checkpointed = safetensors.torch.load_file(tmp_path / "checkpointed" / "student.safetensors")
    assert plain.keys() == checkpointed.keys()
    for key in plain:
        torch.testing.assert_close(checkpointed[key], plain[key], rtol=1e-4, atol=1e-5, msg=key)
