"""Training curves (vitlinearizer.curves): reading metrics.jsonl and what the figure draws from it."""
import io
import json
import math

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


def _data(line):
    return list(line.get_xdata()), [round(float(y), 6) for y in line.get_ydata()]


def _legend(legend):
    return [t.get_text() for t in legend.get_texts()]


def test_figure_draws_each_runs_loss_terms_accuracy_and_lr_in_one_colour(tmp_path):
    distill = _write_run(tmp_path / "a" / "student", _distill_records([10, 20, 40], start=4.0))
    finetune = _write_run(tmp_path / "b" / "student", _finetune_records([10, 20, 30]),
                          evals=[(15, {"holdout_top1": 40.0}), (30, {"holdout_top1": 55.0})], test={"top1": 57.0})
    fig = curves_figure([distill, finetune])
    ax_loss, ax_terms, ax_acc, ax_lr = fig.axes
    # Runs with the same directory name are told apart by their parent, in one legend for all panels.
    assert _legend(fig.legends[0]) == ["a/student", "b/student"]
    colour_a, colour_b = (line.get_color() for line in fig.legends[0].get_lines())
    assert [(_data(line), line.get_color()) for line in ax_loss.lines] == [
        (([10, 20, 40], [0.5, 0.25, 0.125]), colour_a), (([10, 20, 30], [0.1, 0.05, 0.033333]), colour_b)]
    assert _legend(ax_terms.get_legend()) == ["act", "mask", "ce"]  # styles name the terms, colours the runs
    assert [_data(line)[1] for line in ax_terms.lines if line.get_color() == colour_a] == [[0.1, 0.05, 0.025],
                                                                                            [0.4, 0.2, 0.1]]
    assert ax_terms.lines[0].get_linestyle() != ax_terms.lines[1].get_linestyle()
    acc = [(_data(line), line.get_marker()) for line in ax_acc.lines]
    assert acc == [(([10, 20, 30], [100.0, 200.0, 300.0]), "None"),  # fractions shown as %; distill logs none
                   (([15, 30], [40.0, 55.0]), "o"), (([30], [57.0]), "*")]  # holdout, final test at the last step
    assert _legend(ax_acc.get_legend()) == ["train batches", "holdout_top1", "final test top1"]
    assert _data(ax_lr.lines[0]) == ([10, 20, 40], [0.01, 0.02, 0.04])
    assert ax_loss.get_yscale() == ax_terms.get_yscale() == "log"  # losses from 1/30 to 0.5 span a decade


def test_figure_marks_a_short_run_and_names_it_in_the_title(tmp_path):
    run = _write_run(tmp_path / "r", _distill_records([4]))
    fig = curves_figure(run, labels=["tiny"])  # one run needs no list
    (line,) = fig.axes[0].lines
    assert line.get_marker() == "o" and fig.axes[0].get_yscale() == "linear"
    assert fig.get_suptitle() == "tiny" and not fig.legends  # one run: no legend of runs
    assert [t.get_text() for t in fig.axes[2].texts] == ["nothing logged"]
    with pytest.raises(ValueError, match="2 labels for 1 run"):
        curves_figure([run], labels=["a", "b"])
    with pytest.raises(ValueError, match="no run directory"):
        curves_figure([])
    with pytest.raises(ValueError, match="is given twice"):
        curves_figure([run, tmp_path / "r" / ".." / "r"])


def test_windows_of_bad_steps_are_gaps_and_said_so(tmp_path):
    records = _distill_records([1, 2, 3, 4, 5])
    for rec in records[1:3]:
        rec["loss"] = float("nan")
    fig = curves_figure(_write_run(tmp_path / "r", records))
    _, values = _data(fig.axes[0].lines[0])
    assert math.isnan(values[1]) and math.isnan(values[2]) and values[3] == 0.625  # the line breaks there
    assert any("2 logging window(s) of non-finite loss" in t.get_text() for t in fig.axes[0].texts)
    all_bad = _write_run(tmp_path / "bad", [dict(r, loss=float("nan")) for r in _distill_records([1, 2])])
    assert "no finite values logged" in [t.get_text() for t in curves_figure(all_bad).axes[0].texts]


def test_names_show_as_written_and_the_callers_backend_is_kept(tmp_path):
    runs = [_write_run(tmp_path / name, _finetune_records([1, 2, 3])) for name in ("_baseline", "cost $5 vs $6")]
    matplotlib.use("svg")
    try:
        fig = curves_figure(runs)
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use("Agg")
    # A leading underscore would hide a run from matplotlib's legends; $...$ would be read as math.
    assert _legend(fig.legends[0]) == ["_baseline", r"cost \$5 vs \$6"]
    fig.savefig(io.BytesIO(), format="png")


def test_plot_curves_writes_png_pdf_or_svg_and_refuses_other_paths(tmp_path):
    run = _write_run(tmp_path / "r", _finetune_records([1, 2, 3]), test={"top1": 50.0})
    path = plot_curves(run, tmp_path / "figures" / "curves.png")
    assert path == tmp_path / "figures" / "curves.png"
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 600
    assert [p.name for p in path.parent.iterdir()] == ["curves.png"]  # no temporary file left behind
    assert plot_curves([run], tmp_path / "curves.pdf").read_bytes().startswith(b"%PDF")
    assert b"<svg" in plot_curves([run], tmp_path / "curves.svg").read_bytes()[:2000]
    with pytest.raises(ValueError, match="written as png, pdf, svg"):
        plot_curves([run], tmp_path / "curves.jpg")
    (tmp_path / "figures.png").mkdir()
    with pytest.raises(ValueError, match="is a directory"):
        plot_curves([run], tmp_path / "figures.png")
    with pytest.raises(ValueError, match="is a file, not a directory"):
        plot_curves([run], run / "metrics.jsonl" / "curves.png")
