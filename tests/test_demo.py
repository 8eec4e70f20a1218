"""The demo pipeline on a tiny Fashion-MNIST subset: interrupted with Ctrl-C, resumed, every artefact checked."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from vitlinearizer import demo as demo_module
from vitlinearizer.data import DEFAULT_FASHION_MNIST_ROOT

needs_fashion_mnist = pytest.mark.skipif(
    not Path(DEFAULT_FASHION_MNIST_ROOT, "train-images-idx3-ubyte.gz").is_file(),
    reason="needs Debian's dataset-fashion-mnist (make test installs it as root)")


def test_full_preset_runs_the_ablation_on_the_first_mixer_and_baselines_for_all():
    full = demo_module.PRESETS["full"]
    assert full.objectives_for("mamba2") == ["both", "none", "mask", "act"]
    assert full.objectives_for("gla") == full.objectives_for("hgrn") == ["both", "none"]
    assert full.main_objective == "both" and len(full.seeds) == 3
    # Per seed: Mamba-2 distil + fine-tune for both, mask and act, scratch; GLA and HGRN distil + fine-tune, scratch.
    assert demo_module.stage_count(full, trains_teacher=True) == 1 + 3 * (7 + 3 + 3)
    assert demo_module.stage_count(demo_module.PRESETS["quick"], trains_teacher=False) == 3
    quick = demo_module.PRESETS["quick"]
    assert quick.objectives_for("mamba2") == ["both", "none"]
    # The paper's regime in both: the teacher sees more labelled images than the students, who get the same
    # settings in both presets (the full one adds a stronger teacher, the ablation, mixers and seeds).
    for preset in (quick, full):
        teacher_images = preset.teacher_train_samples or 58_800
        assert teacher_images >= 16 * preset.train_samples
    student_settings = ("train_samples", "distill_epochs", "finetune_epochs", "distill_lr", "finetune_lr", "scratch_lr",
                        "distill_warmup_epochs", "finetune_warmup_epochs", "scratch_warmup_epochs", "augment")
    assert {k: getattr(full, k) for k in student_settings} == {k: getattr(quick, k) for k in student_settings}


def test_stage_with_another_configuration_is_refused(tmp_path):
    preset = demo_module.PRESETS["tiny"]
    values = demo_module._base_config(preset, None, "cpu")
    values["train"]["epochs"] = 1
    stage_dir = tmp_path / "teacher"
    stage_dir.mkdir()
    (stage_dir / "config.yaml").write_text(
        demo_module.dump_yaml(demo_module.build_config(dict(values, output_dir=str(stage_dir)))))
    demo_module._check_same_config("teacher", stage_dir, dict(values, output_dir=str(stage_dir)))  # same: accepted
    values["train"]["lr"] = 0.5
    with pytest.raises(demo_module.DemoConfigMismatch, match=r"changed: train\.lr\).*--fresh"):
        demo_module._check_same_config("teacher", stage_dir, dict(values, output_dir=str(stage_dir)))


def test_an_option_added_later_counts_as_unchanged_while_it_has_its_default(tmp_path):
    values = dict(demo_module._base_config(demo_module.PRESETS["tiny"], None, "cpu"), output_dir=str(tmp_path))
    saved = demo_module.yaml.safe_load(demo_module.dump_yaml(demo_module.build_config(values)))
    del saved["train"]["layer_decay"]  # a stage run before the option existed
    (tmp_path / "config.yaml").write_text(demo_module.yaml.safe_dump(saved))
    demo_module._check_same_config("scratch", tmp_path, values)
    values["train"]["layer_decay"] = 0.75
    with pytest.raises(demo_module.DemoConfigMismatch, match=r"changed: train\.layer_decay"):
        demo_module._check_same_config("scratch", tmp_path, values)


def _export_gla_student(path, **mixer_kwargs):
    import timm
    from vitlinearizer.checkpoint import export_model
    model = timm.create_model("adventurer_nano_patch4_28", num_classes=10, mixer="gla", use_mask_token=True,
                              mixer_kwargs=mixer_kwargs)
    meta = dict(kind="distilled-student", model="adventurer_nano_patch4_28", model_kwargs={"mixer": "gla"},
                num_classes=10, img_size=[28, 28])
    return export_model(model, path, meta)


def test_architecture_changes_name_what_the_library_builds_differently(tmp_path):
    today = _export_gla_student(tmp_path / "today.safetensors")
    assert demo_module.exports.architecture_changes(today) == []  # its mask token does not count
    # A GLA student from before the short convolution became the default: it still loads, as that older layer.
    older = _export_gla_student(tmp_path / "older.safetensors", conv_size=0)
    changes = demo_module.exports.architecture_changes(older)
    assert changes and all(c.endswith(": new") and ".conv." in c for c in changes), changes
    assert any(c.startswith("blocks.0.mixer.") for c in changes)


def test_a_finished_stage_from_another_architecture_is_not_reused(tmp_path):
    stage_dir = tmp_path / "distill-both-gla-s0"
    stage_dir.mkdir()
    _export_gla_student(stage_dir / "student.safetensors", conv_size=0)
    # The summary names the file where the stage wrote it, which may be another working directory.
    summary = dict(complete=True, exported=str(tmp_path / "elsewhere" / "student.safetensors"))
    (stage_dir / "summary.json").write_text(json.dumps(summary))
    values = demo_module._base_config(demo_module.PRESETS["tiny"], None, "cpu")

    def must_not_run(cfg, resume):
        raise AssertionError("the stage must be refused, not retrained")
    with pytest.raises(demo_module.DemoConfigMismatch, match=r"built this model differently .*conv.*--fresh"):
        demo_module._stage("distill-both-gla-s0", tmp_path, values, must_not_run, [], 1)
    (stage_dir / "student.safetensors").unlink()
    with pytest.raises(demo_module.DemoConfigMismatch, match=r"finished earlier, but its model .* is missing.*--fresh"):
        demo_module._stage("distill-both-gla-s0", tmp_path, values, must_not_run, [], 1)
    _export_gla_student(stage_dir / "student.safetensors")
    log = []
    assert demo_module._stage("distill-both-gla-s0", tmp_path, values, must_not_run, log, 1) == summary
    assert log[0]["reused"]


def demo(run_dir, *extra):
    cmd = [sys.executable, "-m", "vitlinearizer", "demo", "--preset", "tiny", "--output-dir", str(run_dir), *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


@needs_fashion_mnist
def test_demo_interrupt_resume_and_artefacts(tmp_path):
    run_dir = tmp_path / "demo"
    proc = demo(run_dir)
    deadline = time.time() + 300
    # Interrupt while the distillation stage runs, after the teacher finished.
    while not (run_dir / "distill-both-mamba2-s0" / "metrics.jsonl").exists() and proc.poll() is None:
        assert time.time() < deadline, "demo did not reach the distillation stage"
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, out
    assert "Run the same command again to resume" in out
    teacher_summary = json.loads((run_dir / "teacher" / "summary.json").read_text())
    assert teacher_summary["complete"]

    proc = demo(run_dir)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    assert "(1/4) teacher: finished earlier, reusing" in out
    assert "(2/4) distill-both-mamba2-s0: resuming" in out
    done = re.search(r"\(4/4\) scratch-mamba2-s0: done in [0-9.]+ min, test top-1 ([0-9.]+)%", out)
    assert done and 0 < float(done.group(1)) <= 100, out

    report = (run_dir / "report.md").read_text()
    assert "| Teacher ViT (patch 4) |" in report and "Distilled student" in report and "from scratch" in report
    assert "| Distilled student | Seeds | − scratch, holdout | − scratch, test | − teacher, test |" in report
    assert re.search(r"\| teacher \| [0-9.]+ min \| yes \|", report)
    assert re.search(r"\| distill-both-mamba2-s0 \| [0-9.]+ min \| resumed: this invocation's time only \|", report)
    for png in ("loss_curves.png", "accuracy.png", "latency.png"):
        with Image.open(run_dir / png) as im:
            assert im.size[0] > 100
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["results"]) == {"finetune-both-mamba2", "scratch-mamba2"}
    assert len(summary["gaps"]["finetune-both-mamba2"]["scratch_test"]) == 1
    assert [r["size"] for r in summary["latency"]] == [28, 56]
    for stage in ("teacher", "distill-both-mamba2-s0", "finetune-both-mamba2-s0", "scratch-mamba2-s0"):
        stage_summary = json.loads((run_dir / stage / "summary.json").read_text())
        assert stage_summary["complete"] and any((run_dir / stage / "checkpoints").glob("step_*"))
    # A third run reuses everything: no stage trains again.
    proc = demo(run_dir)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "starting" not in out and "resuming" not in out, out
    # Another preset in the same directory would silently mix configurations: refused, naming the fix.
    proc = demo(run_dir, "--preset", "quick")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, out
    assert "stage 'teacher'" in out and "data.max_train_samples" in out and "--fresh" in out
    # An experiment with this teacher's weights and other student settings: no teacher stage, a labelled report.
    other = tmp_path / "experiment"
    proc = demo(other, "--teacher-weights", str(run_dir / "teacher" / "teacher.safetensors"),
                "--objectives", "mask", "--scratch-warmup-epochs", "0.2", "--distill-lr", "2e-3",
                "--distill-warmup-epochs", "0", "--distill-cls-weight", "0.5")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    assert not (other / "teacher").exists() and (other / "finetune-mask-mamba2-s0" / "student.safetensors").is_file()
    report = (other / "report.md").read_text()
    assert ("preset: tiny, with objectives=['mask'], distill_lr=0.002, distill_warmup_epochs=0.0, "
            "scratch_warmup_epochs=0.2, distill_cls_weight=0.5") in report
    assert "the weights given with --teacher-weights" in report and "class-token target at weight 0.5" in report
    assert "tested only" in report
    distill_config = demo_module.yaml.safe_load((other / "distill-mask-mamba2-s0" / "config.yaml").read_text())
    assert distill_config["distill"]["cls_weight"] == 0.5
    assert "cls" in (other / "distill-mask-mamba2-s0" / "metrics.jsonl").read_text().splitlines()[-1]
    def train_config(stage):
        return demo_module.yaml.safe_load((other / stage / "config.yaml").read_text())["train"]
    # Each student stage has its own lr and warm-up.
    tiny = demo_module.PRESETS["tiny"]
    assert (train_config("distill-mask-mamba2-s0")["lr"], train_config("distill-mask-mamba2-s0")["warmup_epochs"]) == (2e-3, 0)
    assert (train_config("finetune-mask-mamba2-s0")["lr"], train_config("finetune-mask-mamba2-s0")["warmup_epochs"]) == \
        (tiny.finetune_lr, tiny.finetune_warmup_epochs)
    assert (train_config("scratch-mamba2-s0")["lr"], train_config("scratch-mamba2-s0")["warmup_epochs"]) == \
        (tiny.scratch_lr, 0.2)


def test_preset_overrides_replace_student_settings_and_are_named_in_the_label():
    preset = demo_module.resolve_preset("quick", distill_epochs=4, seeds=[3], objectives=["mask", "none"])
    assert (preset.distill_epochs, preset.finetune_epochs, preset.seeds) == (4, 8, [3])
    warm = demo_module.resolve_preset("quick", scratch_warmup_epochs=0.2, scratch_lr=2e-3)
    assert demo_module._base_config(warm, None, "cpu")["train"]["warmup_epochs"] == 0.2
    assert demo_module._base_config(warm, None, "cpu")["train"]["lr"] == 2e-3
    assert preset.main_objective == "mask" and preset.objectives_for("mamba2") == ["mask", "none"]
    assert demo_module.PRESETS["quick"].distill_epochs == 8  # the registered preset is untouched
    assert demo_module.preset_label("quick", demo_module.PRESETS["quick"]) == "quick"
    assert demo_module.preset_label("quick", preset) == \
        "quick, with distill_epochs=4, seeds=[3], objectives=['mask', 'none']"
    fewer = demo_module.resolve_preset("tiny", train_samples=128)  # tiny's teacher sees the students' images
    assert (fewer.train_samples, fewer.teacher_train_samples) == (128, 256)  # the teacher keeps its images
    values = demo_module._base_config(fewer, None, "cpu")
    assert values["data"]["max_train_samples"] == 128


@pytest.mark.parametrize("kwargs, match", [
    (dict(distill_epochs=0), r"--distill-epochs must be >= 1, got 0"),
    (dict(train_samples=0), r"--train-samples must be >= 1, got 0"),
    (dict(objectives=["both", "kd"]), r"--objectives: unknown 'kd'; choose from both, act, mask, none"),
    (dict(objectives=["none"]), r"at least one distillation objective"),
    (dict(mixers=["lstm"]), r"--mixers: unknown 'lstm'; choose from mamba2, gla, hgrn"),
    (dict(scratch_warmup_epochs=-0.1), r"--scratch-warmup-epochs must be >= 0"),
    (dict(scratch_lr=-1e-3), r"--scratch-lr must be > 0"),
    (dict(distill_warmup_epochs=-1.0), r"--distill-warmup-epochs must be >= 0, got -1.0"),
    (dict(distill_lr=0.0), r"--distill-lr must be > 0, got 0.0"),
    (dict(finetune_layer_decay=1.5), r"--finetune-layer-decay must be in \(0, 1\]"),
    (dict(distill_cls_weight=-1.0), r"--distill-cls-weight must be >= 0 \(0 = off\), got -1.0"),
    (dict(seeds=[0, -1]), r"--seeds must be integers >= 0, got -1"),
    (dict(seeds=[0, 1, 0]), r"--seeds names 0 more than once; give each once"),
    (dict(mixers=["gla", "gla"]), r"--mixers names gla more than once"),
])
def test_bad_preset_overrides_are_refused_with_the_allowed_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        demo_module.resolve_preset("quick", **kwargs)


def test_an_unknown_preset_override_is_a_programming_error():
    with pytest.raises(TypeError, match="teacher_epochs cannot be overridden"):
        demo_module.resolve_preset("quick", teacher_epochs=3)


def test_every_override_has_a_flag_and_unset_flags_keep_the_preset(capsys):
    import argparse
    parser = argparse.ArgumentParser()
    demo_module.add_demo_arguments(parser)
    values = dict(train_samples="500", distill_epochs="2", finetune_epochs="3", seeds=["4", "5"], objectives=["mask", "none"],
                  mixers=["gla"], distill_lr="0.02", distill_warmup_epochs="0.3", distill_cls_weight="0.1", finetune_lr="0.04",
                  finetune_warmup_epochs="0.6", finetune_layer_decay="0.7", scratch_lr="0.08", scratch_warmup_epochs="0.9")
    assert set(values) == set(demo_module.OVERRIDABLE)
    argv = ["--preset", "full"]
    for key, value in values.items():
        argv += ["--" + key.replace("_", "-"), *([value] if isinstance(value, str) else value)]
    given = vars(parser.parse_args(argv))
    preset = demo_module.resolve_preset("full", **{key: given[key] for key in demo_module.OVERRIDABLE})
    assert preset.seeds == [4, 5] and preset.objectives == ["mask", "none"] and preset.mixers == ["gla"]
    assert (preset.distill_epochs, preset.finetune_epochs, preset.scratch_warmup_epochs) == (2, 3, 0.9)
    assert preset.train_samples == 500 and preset.teacher_train_samples is None  # full: the teacher sees every image

    unset = parser.parse_args([])
    assert not any(hasattr(unset, key) for key in demo_module.OVERRIDABLE)
    assert (getattr(unset, "teacher_weights", None), getattr(unset, "data_root", None)) == (None, None)
    parser.print_help()
    assert "(default: None)" not in capsys.readouterr().out


def test_cli_reports_a_bad_override_without_a_traceback(capsys):
    from vitlinearizer.cli import main
    assert main(["demo", "--preset", "tiny", "--mixers", "lstm"]) == 2
    assert "unknown 'lstm'" in capsys.readouterr().err


def test_gap_table_pairs_each_distilled_student_with_the_scratch_student_of_its_seed():
    from vitlinearizer.report import gap_table

    def stage(test, holdout=None):
        return {"test": {"top1": test}, **({"last_eval": {"holdout_top1": holdout}} if holdout is not None else {})}
    results = {"teacher": {"summary": stage(80.0, 79.0)},
               "finetune-both-mamba2-s0": stage(78.0, 77.0), "scratch-mamba2-s0": stage(76.0, 75.0),
               "finetune-both-mamba2-s1": stage(79.0, 78.0), "scratch-mamba2-s1": stage(76.0, 77.0),
               "finetune-mask-mamba2-s0": stage(77.0),
               "finetune-both-gla-s0": stage(70.0, 70.0)}  # its scratch stage is missing
    table, gaps = gap_table(results)
    both = gaps["finetune-both-mamba2"]
    assert both["scratch_test"] == [2.0, 3.0] and both["scratch_holdout"] == [2.0, 1.0]
    assert both["teacher_test"] == [-2.0, -1.0]
    assert gaps["finetune-mask-mamba2"] == {"scratch_holdout": [], "scratch_test": [1.0], "teacher_test": [-3.0]}
    assert gaps["finetune-both-gla"]["scratch_test"] == []
    lines = table.splitlines()
    assert lines[2] == "| Distilled student, act + mask (mamba2) | 2 | +1.50 ± 0.71 | +2.50 ± 0.71 | -1.50 ± 0.71 |"
    assert "| Distilled student, mask only (mamba2) | 1 | — | +1.00 | -3.00 |" in lines


def test_the_report_counts_a_torch_checkpoint_teachers_parameters(tmp_path):
    # --teacher-weights may be a .pth: the report must not read it as safetensors (it crashed after every stage ran).
    import safetensors.torch
    import torch

    from vitlinearizer.report import _param_count

    state = {"w": torch.zeros(3, 4), "b": torch.zeros(4), "mask_token": torch.zeros(1, 1, 4)}
    torch.save({"state_dict": state}, tmp_path / "teacher.pth")
    safetensors.torch.save_file(state, str(tmp_path / "teacher.safetensors"))
    assert _param_count(tmp_path / "teacher.pth") == _param_count(tmp_path / "teacher.safetensors") == 16
