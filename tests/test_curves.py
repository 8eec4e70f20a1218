"""Training curves (vitlinearizer.curves): reading metrics.jsonl and what the figure draws from it."""
import json

import matplotlib
import pytest
from PIL import Image

from vitlinearizer.curves import curves_figure, plot_curves, read_metrics

matplotlib.use("Agg")


def _write_run(path, train, evals=(), test=None, torn_tail=False):
    path.mkdir(parents=True)
    lines = [json.dumps(r) for r in train] + [json.dumps({"step": s, "epoch": 1, "eval": e}) for s, e in evals]
    text = "\n".join(lines) + "\n" + ('{"step": 99, "lo' if torn_tail else "")
    (path / "metrics.jsonl").write_text(text)
    if test is not None:
        (path / "summary.json").write_text(json.dumps({"complete": True, "test": test}))
    return path


def _distill_records(steps, start=2.0):
    return [{"step": s, "epoch": s / 10, "lr": 1e-3 * s, "act": start / s / 4, "mask": start / s, "loss": 1.25 * start / s,
             "images_per_s": 10.0, "bad_steps": 0} for s in steps]


def _finetune_records(steps):
    return [{"step": s, "epoch": s / 10, "lr": 1e-3, "ce": 1.0 / s, "acc": 0.1 * s, "loss": 1.0 / s,
             "images_per_s": 10.0, "bad_steps": 0} for s in steps]


def test_read_metrics_splits_training_and_evaluation_records_and_skips_a_torn_line(tmp_path):
    run = _write_run(tmp_path / "r", _distill_records([1, 2, 3]), evals=[(3, {"holdout_top1": 50.0, "holdout_n": 8})],
                     test={"top1": 61.5}, torn_tail=True)
    metrics = read_metrics(run)
    assert [r["step"] for r in metrics.train] == [1, 2, 3]
    assert metrics.evals == [(3, {"holdout_top1": 50.0, "holdout_n": 8})]
    assert metrics.test == {"top1": 61.5}
    assert metrics.loss_terms == ["act", "mask"]  # not loss, lr, epoch, throughput or the bad-step count


def test_read_metrics_names_a_missing_or_empty_run_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_metrics(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no metrics.jsonl"):
        read_metrics(tmp_path / "empty")


def _lines(ax):
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.lines}


def test_figure_draws_each_runs_loss_terms_accuracy_and_lr(tmp_path):
    distill = _write_run(tmp_path / "a" / "student", _distill_records([10, 20, 40], start=4.0))
    finetune = _write_run(tmp_path / "b" / "student", _finetune_records([10, 20, 30]),
                          evals=[(15, {"holdout_top1": 40.0}), (30, {"holdout_top1": 55.0})], test={"top1": 57.0})
    fig = curves_figure([distill, finetune])
    ax_loss, ax_terms, ax_acc, ax_lr = fig.axes
    # Runs with the same directory name are told apart by their parent.
    assert _lines(ax_loss) == {"a/student": ([10, 20, 40], [0.5, 0.25, 0.125]), "b/student": ([10, 20, 30], [0.1, 0.05, 1 / 30])}
    terms = _lines(ax_terms)
    assert set(terms) == {"a/student: act", "a/student: mask", "b/student: ce"}
    assert terms["a/student: mask"] == ([10, 20, 40], [0.4, 0.2, 0.1])
    acc = _lines(ax_acc)
    assert acc["b/student: train batches"] == ([10, 20, 30], [100.0, 200.0, 300.0])  # fractions shown as %
    assert acc["b/student: holdout_top1"] == ([15, 30], [40.0, 55.0])
    assert acc["b/student: test top1"] == ([30], [57.0])  # at the run's last step
    assert "a/student: train batches" not in acc  # distillation logs no accuracy
    assert _lines(ax_lr)["a/student"] == ([10, 20, 40], [0.01, 0.02, 0.04])
    assert ax_loss.get_yscale() == ax_terms.get_yscale() == "log"  # losses from 1/30 to 0.5 span a decade


def test_figure_marks_a_run_too_short_to_draw_a_line_and_takes_labels(tmp_path):
    run = _write_run(tmp_path / "r", _distill_records([4]))
    fig = curves_figure([run], labels=["tiny"])
    (line,) = fig.axes[0].lines
    assert line.get_label() == "tiny" and line.get_marker() == "o"
    assert fig.axes[0].get_yscale() == "linear"
    assert fig.axes[2].texts and fig.axes[2].texts[0].get_text() == "nothing logged"
    with pytest.raises(ValueError, match="2 labels for 1 run"):
        curves_figure([run], labels=["a", "b"])
    with pytest.raises(ValueError, match="no run directory"):
        curves_figure([])


def test_plot_curves_writes_a_png_into_a_new_folder(tmp_path):
    run = _write_run(tmp_path / "r", _finetune_records([1, 2, 3]), test={"top1": 50.0})
    path = plot_curves([run], tmp_path / "figures" / "curves.png")
    assert path == tmp_path / "figures" / "curves.png"
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 600
    assert [p.name for p in path.parent.iterdir()] == ["curves.png"]  # no temporary file left behind
