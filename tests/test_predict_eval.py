"""`vitlinearizer predict` and `eval` on exported models (random weights, no training): bad inputs, directories,
the export's own preprocessing and holdout split, distilled students, and the CLI's one-line errors."""
import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from vitlinearizer import config as C
from vitlinearizer import evaluation, runner
from vitlinearizer.checkpoint import CheckpointError, export_model, read_export_metadata
from vitlinearizer.cli import main
from vitlinearizer.data import DataConfig, build_dataset, build_transform, dataset_info, load_rgb

STUDENT = ("adventurer_nano_patch4_28", {"depth": 2, "embed_dim": 32, "mixer": "mamba2",
                                         "mixer_kwargs": {"d_state": 8, "head_dim": 16}})
TEACHER = ("vit_tiny_patch16_224", {"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2})
SYNTHETIC = ["--data.name", "synthetic", "--data.synthetic_length", "48", "--data.num_classes", "3"]


def _export(path, kind="student", arch=STUDENT, data=None, **meta_changes):
    data = data or DataConfig(name="synthetic", img_size=28, num_classes=3)
    torch.manual_seed(0)
    model = timm.create_model(arch[0], num_classes=3, img_size=data.img_size, **arch[1])
    meta = {**runner.model_metadata(kind, arch[0], arch[1], data, dataset_info(data)), **meta_changes}
    return str(export_model(model, path, meta))


def _images(folder, n=2, size=(40, 31)):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    rng = np.random.default_rng(len(str(folder)))
    for i in range(n):
        paths.append(folder / f"img{i}.png")
        # Noise, not one colour: crops and resizes of a flat image are all the same image.
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(paths[-1])
    return [str(p) for p in paths]


@pytest.fixture
def student(tmp_path):
    return _export(tmp_path / "run" / "student.safetensors")


def test_predict_names_every_missing_path_before_any_work(student, tmp_path, capsys):
    good = _images(tmp_path / "img")[0]
    assert main(["predict", "--checkpoint", student, good, "nope1.jpg", str(tmp_path / "nope2.png")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "2 image path(s) do not exist" in err and "nope1.jpg" in err and "nope2.png" in err


def test_predict_reports_unreadable_images_and_still_classifies_the_others(student, tmp_path, capsys):
    good = _images(tmp_path / "img", n=2)
    corrupt, text = tmp_path / "corrupt.jpg", tmp_path / "notes.txt"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    text.write_text("not an image")
    argv = ["predict", "--checkpoint", student, good[0], str(corrupt), str(text), good[1]]
    assert main(argv) == 1
    out, err = capsys.readouterr()
    assert [line.split(":")[0] for line in out.splitlines()] == good
    assert f"{corrupt}: cannot read the image" in err and f"{text}: cannot read the image" in err
    assert "2 of 4 image(s) could not be read" in err and "Traceback" not in err
    assert main([*argv, "--json"]) == 1
    results = json.loads(capsys.readouterr().out)
    assert [("top" in r, "error" in r) for r in results] == [(True, False), (False, True), (False, True), (True, False)]


def test_predict_in_batches_keeps_the_file_order_and_the_answers(student, tmp_path):
    files = _images(tmp_path / "img", n=5)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not a png")
    files.insert(2, str(corrupt))
    single = evaluation.predict(student, files, topk=2, device="cpu", batch_size=1)
    seen = []
    batched = evaluation.predict(student, files, topk=2, device="cpu", batch_size=4, on_result=seen.append)
    assert [r["image"] for r in batched] == [r["image"] for r in seen] == files
    assert "error" in batched[2] and "top" not in batched[2]
    for one, many in zip(single, batched):
        assert one.keys() == many.keys()
        if "top" in one:
            assert [t["index"] for t in one["top"]] == [t["index"] for t in many["top"]]
            assert [t["prob"] for t in one["top"]] == pytest.approx([t["prob"] for t in many["top"]], abs=2e-4)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        evaluation.predict(student, files, batch_size=0)
    # From Python an int size means a square, as timm's img_size does.
    square = evaluation.predict(student, files[:2], topk=2, device="cpu", img_size=32)
    assert square == evaluation.predict(student, files[:2], topk=2, device="cpu", img_size=(32, 32))


def test_an_export_described_in_part_loads_and_names_what_it_lacks(tmp_path):
    model = timm.create_model(STUDENT[0], num_classes=3, img_size=28, **STUDENT[1])
    # Only what rebuilding needs: no classes, statistics or resize settings (timm's defaults stand in).
    path = export_model(model, tmp_path / "minimal.safetensors",
                        {"model": STUDENT[0], "model_kwargs": STUDENT[1], "num_classes": 3, "img_size": [28, 28]})
    loaded, _ = runner.load_exported_model(path)
    assert timm.data.resolve_data_config(model=loaded)["input_size"] == (3, 28, 28)
    (result,) = evaluation.predict(path, _images(tmp_path / "img", n=1), topk=3, device="cpu")
    assert sorted(t["label"] for t in result["top"]) == ["0", "1", "2"]  # indices stand in for class names
    incomplete = export_model(model, tmp_path / "incomplete.safetensors", {"model": STUDENT[0], "num_classes": 3})
    with pytest.raises(ValueError, match="description lacks img_size, needed to rebuild the model"):
        runner.load_exported_model(incomplete)


def test_an_export_without_its_preprocessing_is_read_as_timm_reads_it(tmp_path):
    model = timm.create_model(TEACHER[0], num_classes=3, img_size=28, **TEACHER[1])
    path = export_model(model, tmp_path / "vit.safetensors",
                        {"model": TEACHER[0], "model_kwargs": TEACHER[1], "num_classes": 3, "img_size": 28})
    image = _images(tmp_path / "img", n=1)
    (result,) = evaluation.predict(path, image[0], topk=3, device="cpu")  # one path needs no list
    loaded, _ = runner.load_exported_model(path)
    timm_transform = timm.data.create_transform(**timm.data.resolve_data_config(model=loaded))
    with torch.no_grad():
        probs = loaded(timm_transform(load_rgb(image[0]))[None]).softmax(-1)[0]
    assert {t["index"]: t["prob"] for t in result["top"]} == pytest.approx(
        {i: round(float(p), 4) for i, p in enumerate(probs)}, abs=1e-4)


def test_eval_on_a_test_only_tree_needs_the_exports_class_names(tmp_path):
    model = timm.create_model(STUDENT[0], num_classes=3, img_size=28, **STUDENT[1])
    path = export_model(model, tmp_path / "s.safetensors",
                        {"model": STUDENT[0], "model_kwargs": STUDENT[1], "num_classes": 3, "img_size": [28, 28]})
    for name in "abc":
        _images(tmp_path / "data" / "test" / name, n=1)
    data = DataConfig(name="imagefolder", root=str(tmp_path / "data"))
    with pytest.raises(ValueError, match="records no class names and .* has no train/ folder"):
        evaluation.evaluate(path, data, "test", 4, "cpu")


@pytest.mark.parametrize("field,value,message", [
    ("model", None, "model must be a timm model name"),
    ("model_kwargs", None, "model_kwargs must be a mapping"),
    ("num_classes", "3", "num_classes must be an int >= 0"),
    ("img_size", [28], r"img_size must be a positive int or \[H, W\]"),
    ("mean", 0.5, "mean must be a list of numbers"),
    ("classes", ["a", "b"], "2 classes named for num_classes=3"),
])
def test_export_descriptions_are_checked_when_written(tmp_path, field, value, message):
    model = timm.create_model(STUDENT[0], num_classes=3, img_size=28, **STUDENT[1])
    description = {"model": STUDENT[0], "model_kwargs": STUDENT[1], "num_classes": 3, "img_size": 28, field: value}
    with pytest.raises(ValueError, match=message):
        export_model(model, tmp_path / "s.safetensors", description)
    assert not (tmp_path / "s.safetensors").exists()


def test_an_export_that_does_not_fit_its_description_fails_in_one_line(tmp_path):
    kwargs = {"depth": 2, "embed_dim": 32}
    gla = timm.create_model(STUDENT[0], num_classes=3, img_size=28, mixer="gla", **kwargs)
    # The mixer left out of the description: a Mamba-2 student is built for GLA weights.
    path = export_model(gla, tmp_path / "gla.safetensors",
                        {"model": STUDENT[0], "model_kwargs": kwargs, "num_classes": 3, "img_size": 28})
    assert read_export_metadata(path)["img_size"] == [28, 28]
    with pytest.raises(ValueError, match=r"tensors do not fit the model its description names .*mixer other than"):
        runner.load_exported_model(path)
    unknown = export_model(gla, tmp_path / "u.safetensors", {"model": "no_such_model", "num_classes": 3, "img_size": 28})
    with pytest.raises(ValueError, match="names model 'no_such_model', which timm does not know"):
        runner.load_exported_model(unknown)


def test_predict_expands_a_directory_to_its_images(student, tmp_path, capsys):
    folder = tmp_path / "photos"
    _images(folder / "b", n=1)
    _images(folder / "a", n=2)
    (folder / "readme.txt").write_text("skipped: not an image extension")
    _images(folder / ".thumbs", n=1)  # hidden, as ImageFolder skips them
    assert main(["predict", "--checkpoint", student, "--json", str(folder)]) == 0
    images = [r["image"] for r in json.loads(capsys.readouterr().out)]
    assert images == [str(folder / "a" / "img0.png"), str(folder / "a" / "img1.png"), str(folder / "b" / "img0.png")]
    # A symlinked folder (a symlink farm) is walked too, as ImageFolder walks it; a link back up is not followed.
    _images(tmp_path / "elsewhere", n=2)
    (folder / "c").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (folder / "a" / "up").symlink_to(folder, target_is_directory=True)
    assert main(["predict", "--checkpoint", student, "--json", str(folder)]) == 0
    images = [r["image"] for r in json.loads(capsys.readouterr().out)]
    assert images == [str(folder / name) for name in ("a/img0.png", "a/img1.png", "b/img0.png", "c/img0.png",
                                                       "c/img1.png")]
    (tmp_path / "empty").mkdir()
    assert main(["predict", "--checkpoint", student, str(tmp_path / "empty")]) == 2
    assert "holds no images" in capsys.readouterr().err


@pytest.mark.parametrize("topk", ["-1", "0", "two"])
def test_predict_refuses_a_topk_below_one(student, tmp_path, topk, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["predict", "--checkpoint", student, "--topk", topk, *_images(tmp_path / "img", n=1)])
    assert exc.value.code == 2 and "--topk: must be an integer >= 1" in capsys.readouterr().err


def test_predict_clamps_topk_to_the_class_count(student, tmp_path, capsys):
    assert main(["predict", "--checkpoint", student, "--topk", "10", "--json", *_images(tmp_path / "img", n=1)]) == 0
    assert len(json.loads(capsys.readouterr().out)[0]["top"]) == 3


def test_predict_runs_a_teacher_at_another_size(tmp_path, capsys):
    teacher = _export(tmp_path / "teacher.safetensors", kind="teacher", arch=TEACHER)
    image = _images(tmp_path / "img", n=1)
    assert main(["predict", "--checkpoint", teacher, "--img-size", "64x48", "--json", *image]) == 0
    top = json.loads(capsys.readouterr().out)[0]["top"]
    assert len(top) == 3 and sum(t["prob"] for t in top) == pytest.approx(1, abs=1e-3)
    assert main(["predict", "--checkpoint", teacher, "--img-size", "30", *image]) == 2
    assert "30x30 is not a multiple of the patch size 4x4; resize or crop to a multiple, e.g. 32x32" in \
        capsys.readouterr().err


def test_a_distilled_student_warns_that_its_head_is_untrained(tmp_path, capsys):
    distilled = _export(tmp_path / "student.safetensors", kind="distilled-student")
    with pytest.warns(UserWarning, match="distilled, not fine-tuned, student: its classification head is untrained"):
        evaluation.predict(distilled, _images(tmp_path / "img", n=1))
    with pytest.warns(UserWarning, match="vitlinearizer finetune --student.checkpoint"):
        evaluation.evaluate(distilled, DataConfig(name="synthetic", synthetic_length=12, num_classes=3))


def test_eval_of_the_train_split_uses_the_eval_transform(student):
    data = dict(name="synthetic", synthetic_length=48, num_classes=3, holdout_fraction=0.0)
    first = evaluation.evaluate(student, DataConfig(**data), split="train")
    # Random crops and flips would give another loss on each call.
    assert evaluation.evaluate(student, DataConfig(**data), split="train") == first


def test_eval_takes_preprocessing_from_the_export_unless_given(tmp_path, monkeypatch):
    ckpt = _export(tmp_path / "student.safetensors", crop_pct=0.875, interpolation="bilinear",
                   mean=[0.2, 0.3, 0.4], std=[0.5, 0.6, 0.7])
    seen = []
    monkeypatch.setattr(evaluation, "evaluate_classifier", lambda model, ds, batch_size, amp: seen.append(ds) or {"n": len(ds)})
    image = load_rgb(_images(tmp_path / "img", size=(50, 37))[0])

    def expected(**changes):
        export = dict(name="synthetic", img_size=28, mean=(0.2, 0.3, 0.4), std=(0.5, 0.6, 0.7), crop_pct=0.875,
                      interpolation="bilinear")
        return build_transform(DataConfig(**{**export, **changes}), train=False)(image)

    evaluation.evaluate(ckpt, DataConfig(name="synthetic", num_classes=3, synthetic_length=6))
    assert torch.equal(seen[-1].transform(image), expected())
    # What the user sets wins (here crop_pct=1 and a size of 32, both also DataConfig defaults or not).
    evaluation.evaluate(ckpt, DataConfig(name="synthetic", num_classes=3, synthetic_length=6, crop_pct=1.0, img_size=32),
                    explicit={"crop_pct", "img_size"})
    assert torch.equal(seen[-1].transform(image), expected(crop_pct=1.0, img_size=32))


def test_eval_holdout_uses_the_training_runs_split(tmp_path, capsys):
    # The export's metadata records the split (holdout 0.25 of 48 images: 12).
    recorded = _export(tmp_path / "recorded.safetensors", data=DataConfig(
        name="synthetic", img_size=28, num_classes=3, holdout_fraction=0.25, seed=3))
    assert main(["eval", "--checkpoint", recorded, "--split", "holdout", *SYNTHETIC]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 12
    # An export from before that record: the config.yaml of its run beside it.
    run = tmp_path / "run"
    ckpt = _export(run / "student.safetensors", holdout_fraction=None, data_seed=None)
    trained = C.build_config({"data": {"name": "synthetic", "img_size": 28, "num_classes": 3, "synthetic_length": 48,
                                       "holdout_fraction": 0.25, "seed": 3}, "student": {"model": STUDENT[0]}})
    (run / "config.yaml").write_text(C.dump_yaml(trained))
    assert main(["eval", "--checkpoint", ckpt, "--split", "holdout", *SYNTHETIC]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 12  # 0.25 of 48, not the default 0.1
    (run / "config.yaml").unlink()
    with pytest.warns(UserWarning, match="does not record the holdout split"):
        assert evaluation.evaluate(ckpt, DataConfig(name="synthetic", synthetic_length=48, num_classes=3),
                               split="holdout")["n"] == 5


def test_eval_of_an_imagefolder_needs_no_train_folder(tmp_path, capsys):
    data = DataConfig(name="imagefolder", root=str(tmp_path), img_size=28)
    for name in ("circle", "square", "star"):
        _images(tmp_path / "train" / name, n=1)
        _images(tmp_path / "val" / name, n=2)
    ckpt = _export(tmp_path / "student.safetensors", data=data)
    import shutil
    shutil.rmtree(tmp_path / "train")  # the export's metadata names the classes
    assert main(["eval", "--checkpoint", ckpt, "--data.name", "imagefolder", "--data.root", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 6
    _images(tmp_path / "val" / "moon", n=1)
    assert main(["eval", "--checkpoint", ckpt, "--data.name", "imagefolder", "--data.root", str(tmp_path)]) == 2
    assert "class folder(s) the model was not trained on: ['moon']" in capsys.readouterr().err


def test_eval_hints_at_imagefolder_for_a_folder_tree(student, tmp_path, capsys):
    _images(tmp_path / "data" / "train" / "a", n=1)
    assert main(["eval", "--checkpoint", student, "--data.root", str(tmp_path / "data")]) == 2
    assert "looks like an ImageFolder tree (it has train/ or val/): pass --data.name imagefolder" in \
        capsys.readouterr().err


TINY = ["--data.name", "synthetic", "--data.img_size", "28", "--data.synthetic_length", "16",
        "--data.num_classes", "3", "--train.epochs", "1", "--train.batch_size", "8", "--train.progress", "false"]


def test_a_refused_resume_is_one_line_not_a_traceback(tmp_path, monkeypatch, capsys):
    def refuse(cfg, resume, explicit=None):
        raise CheckpointError("cannot resume run/checkpoints/step_00000004 exactly, these settings changed")
    monkeypatch.setattr(runner, "finetune", refuse)
    assert main(["finetune", *TINY, "--output_dir", str(tmp_path / "run"), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error: cannot resume" in err


def test_broken_yaml_names_the_file_or_the_value(tmp_path, capsys):
    cfg = tmp_path / "broken.yaml"
    cfg.write_text("train:\n  epochs: [1, 2\n")
    assert main(["finetune", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert str(cfg) in err and "Traceback" not in err
    assert main(["finetune", *TINY, "--student.model_kwargs", "{depth: [2", "--print-config"]) == 2
    err = capsys.readouterr().err
    assert "invalid YAML in a command-line value" in err and err.count("\n") == 1


def test_an_output_dir_that_is_a_file_fails_before_any_work(tmp_path, capsys):
    (tmp_path / "taken").write_text("")
    for out in ("taken", "taken/run"):
        assert main(["finetune", *TINY, "--output_dir", str(tmp_path / out)]) == 2
        assert f"{tmp_path / 'taken'} is a file, not a directory" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["finetune", *TINY, "--device", "gpu"],
    ["eval", "--checkpoint", "x.safetensors", "--device", "gpu"],
    ["predict", "--checkpoint", "x.safetensors", "--device", "gpu", "x.png"],
])
def test_an_unknown_device_is_refused_early(tmp_path, argv, capsys):
    assert main([*argv, "--output_dir", str(tmp_path / "run")] if argv[0] == "finetune" else argv) == 2
    assert "device='gpu' is not a device; use auto, cpu, cuda or cuda:N" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["xla", "meta", "cuda:x", "cuda:-1", "cpu:0", "CPU", ""])
def test_a_device_the_project_does_not_run_on_is_refused(name, monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"^device=.* is not a device; use auto, cpu, cuda or cuda:N$"):
        runner.resolve_device(name)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    with pytest.raises(ValueError, match=r"use auto, cpu, cuda, cuda:N or mps$"):
        runner.resolve_device(name)


def test_a_device_this_machine_lacks_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    for name in ("cuda", "cuda:0"):
        with pytest.raises(ValueError, match="but CUDA is not available; use device=cpu or auto"):
            runner.resolve_device(name)
    with pytest.raises(ValueError, match="device='mps' but MPS is not available"):
        runner.resolve_device("mps")
    assert runner.resolve_device("auto") == runner.resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert runner.resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ValueError, match="only 2 CUDA device"):
        runner.resolve_device("cuda:2")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert runner.resolve_device("mps") == torch.device("mps")


def test_eval_reads_its_config_file_once(student, tmp_path, monkeypatch, capsys):
    cfg = tmp_path / "eval.yaml"
    # crop_pct is the DataConfig default: only the file says the user set it, so the export's 0.875 must not win.
    cfg.write_text("data: {name: synthetic, num_classes: 3, synthetic_length: 6, crop_pct: 1.0}\n")
    reads, load_yaml = [], C.load_yaml
    monkeypatch.setattr(C, "load_yaml", lambda path: reads.append(path) or load_yaml(path))
    seen = []
    monkeypatch.setattr(evaluation, "evaluate_classifier", lambda model, ds, batch_size, amp: seen.append(ds) or {"n": len(ds)})
    ckpt = _export(tmp_path / "cropped.safetensors", crop_pct=0.875)
    assert main(["eval", "--checkpoint", ckpt, "--config", str(cfg)]) == 0
    assert reads == [str(cfg)] and json.loads(capsys.readouterr().out)["n"] == 6
    image = load_rgb(_images(tmp_path / "img", size=(50, 37))[0])
    expected = build_transform(DataConfig(name="synthetic", img_size=28, crop_pct=1.0), train=False)(image)
    assert torch.equal(seen[-1].transform(image), expected)


def test_eval_amp_runs_the_forward_under_bf16_autocast(student, capsys):
    args = ["eval", "--checkpoint", student, *SYNTHETIC, "--device", "cpu"]
    assert main(args) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main([*args, "--amp", "bf16"]) == 0
    mixed = json.loads(capsys.readouterr().out)
    assert (plain["amp"], mixed["amp"]) == ("none", "bf16")
    # bf16 rounding moves the logits a little: the same samples, a close but not identical loss.
    assert mixed["n"] == plain["n"] and mixed["loss"] != plain["loss"]
    assert mixed["loss"] == pytest.approx(plain["loss"], abs=0.05)


def test_holdout_and_final_test_run_under_the_trainings_autocast(tmp_path, monkeypatch):
    from vitlinearizer.engine import evaluate_classifier

    seen = []

    def recording(model, dataset, *args, **kwargs):
        hook = model.register_forward_pre_hook(lambda *_: seen.append(torch.is_autocast_enabled("cpu")))
        try:
            return evaluate_classifier(model, dataset, *args, **kwargs)
        finally:
            hook.remove()

    monkeypatch.setattr(runner, "evaluate_classifier", recording)
    kwargs = "{depth: 2, embed_dim: 32, mixer_kwargs: {d_state: 8, head_dim: 16}}"
    common = [*SYNTHETIC, "--data.img_size", "28", "--data.holdout_fraction", "0.25", "--train.epochs", "1",
              "--train.batch_size", "12", "--train.progress", "false", "--train.save_checkpoints", "false",
              "--student.model_kwargs", kwargs]
    for amp, autocast in (("bf16", True), ("none", False)):
        seen.clear()
        assert main(["finetune", *common, "--train.amp", amp, "--output_dir", str(tmp_path / amp)]) == 0
        assert len(seen) >= 2 and set(seen) == {autocast}  # the holdout at the end of the epoch and the test


def test_evaluation_builds_no_autograd_graph(tmp_path):
    from vitlinearizer.engine import evaluate_classifier

    torch.manual_seed(0)
    model = timm.create_model(STUDENT[0], num_classes=3, **STUDENT[1])
    grad_enabled = []
    model.register_forward_pre_hook(lambda *_: grad_enabled.append(torch.is_grad_enabled()))
    data = DataConfig(name="synthetic", img_size=28, num_classes=3, synthetic_length=8)
    evaluate_classifier(model, build_dataset(data, "test"), batch_size=4)
    assert grad_enabled == [False, False]


def test_eval_leaves_the_callers_data_config_as_given(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(evaluation, "evaluate_classifier",
                        lambda model, ds, batch_size, amp: seen.append(ds.transform) or {"n": len(ds)})
    small = _export(tmp_path / "small.safetensors", mean=[0.5, 0.5, 0.5])
    large = _export(tmp_path / "large.safetensors", data=DataConfig(name="synthetic", img_size=56, num_classes=3),
                    mean=[0.2, 0.2, 0.2])
    data = DataConfig(name="synthetic", num_classes=3, synthetic_length=6)
    before = repr(data)
    evaluation.evaluate(small, data)
    assert repr(data) == before
    # Reused for another export, the config gives that export's own preprocessing, not the previous one's.
    evaluation.evaluate(large, data)
    image = Image.new("RGB", (70, 60), (128, 128, 128))
    assert seen[-1](image).shape == (3, 56, 56)
    normalize = seen[-1].transforms[-1]
    assert torch.allclose(torch.as_tensor(normalize.mean, dtype=torch.float32), torch.tensor([0.2] * 3))


def test_eval_without_data_options_uses_the_data_the_export_was_trained_on(tmp_path, capsys):
    root = tmp_path / "data"
    for name in ("circle", "square", "star"):
        _images(root / "train" / name, n=2)
        _images(root / "val" / name, n=1)
    ckpt = _export(tmp_path / "run" / "student.safetensors",
                   data=DataConfig(name="imagefolder", root=str(root), img_size=28, holdout_fraction=0.5))
    assert read_export_metadata(ckpt)["data_root"] == str(root)
    assert main(["eval", "--checkpoint", ckpt]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 3
    assert main(["eval", "--checkpoint", ckpt, "--split", "holdout"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 3  # half of train/'s 6 images
    # A data set the user names is theirs: another ImageFolder root, or another kind of data.
    other = tmp_path / "other"
    for name in ("circle", "square", "star"):
        _images(other / "val" / name, n=2)
    assert main(["eval", "--checkpoint", ckpt, "--data.root", str(other)]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 6
    assert main(["eval", "--checkpoint", ckpt, *SYNTHETIC]) == 2  # read, and refused for its other class names
    assert "data 'class_0' vs model 'circle'" in capsys.readouterr().err
    # Only train/ (no val/): the error names the split that exists.
    import shutil
    shutil.rmtree(root / "val")
    assert main(["eval", "--checkpoint", ckpt]) == 2
    assert "or evaluate on the training images the model was trained without: --split holdout" in \
        capsys.readouterr().err
    shutil.rmtree(root)
    assert main(["eval", "--checkpoint", ckpt]) == 2
    assert f"was trained on imagefolder data at {root}, which does not exist here" in capsys.readouterr().err
