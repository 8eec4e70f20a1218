"""Training curves of run directories, from their ``metrics.jsonl``: one PNG to look at after (or during) a run,
or to compare runs.

Every training command writes ``<run>/curves.png`` when it ends; ``vitlinearizer plot RUN [RUN ...]`` draws the
same figure for any runs, finished or not.
"""
from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .checkpoint import write_bytes_atomic

__all__ = ["RunMetrics", "read_metrics", "plot_curves", "curves_figure"]

# Keys of a training record that are not loss terms.
_NOT_LOSS_TERMS = {"step", "epoch", "lr", "loss", "acc", "images_per_s", "bad_steps"}


@dataclass
class RunMetrics:
    """One run's logged records: ``train`` (one per logging window) and ``evals`` (step, {metric: value}), plus the
    final ``test`` metrics of its ``summary.json`` when it has them."""

    run_dir: Path
    train: list[dict]
    evals: list[tuple[int, dict]]
    test: dict | None = None

    @property
    def loss_terms(self) -> list[str]:
        """The objective's logged terms besides the total (``act``, ``mask``; ``ce``, ``kd``), in logging order."""
        terms: dict[str, None] = {}
        for rec in self.train:
            terms.update((k, None) for k, v in rec.items() if k not in _NOT_LOSS_TERMS and _is_number(v))
        return list(terms)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_metrics(run_dir: str | Path) -> RunMetrics:
    """Reads ``run_dir/metrics.jsonl`` (a line a crash cut short is skipped) and the test metrics of
    ``summary.json``. Raises FileNotFoundError naming the directory when it holds no metrics."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        what = "does not exist" if not run_dir.exists() else "has no metrics.jsonl"
        raise FileNotFoundError(f"run directory {run_dir} {what}; pass the output_dir of a train-teacher, distill or "
                                "finetune run")
    train, evals = [], []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
            step = int(rec["step"])
        except (ValueError, KeyError, TypeError):
            continue
        if isinstance(rec.get("eval"), dict):
            evals.append((step, {k: v for k, v in rec["eval"].items() if _is_number(v)}))
        else:
            train.append(rec)
    test = None
    summary = run_dir / "summary.json"
    if summary.is_file():
        try:
            test = json.loads(summary.read_text()).get("test")
        except (ValueError, AttributeError):
            test = None
    return RunMetrics(run_dir, train, evals, test if isinstance(test, dict) else None)


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if _is_number(r.get(key))]
    return [p[0] for p in points], [p[1] for p in points]


def plot_curves(runs: Sequence[str | Path | RunMetrics], path: str | Path, labels: Sequence[str] | None = None) -> Path:
    """Draws the runs' curves (run directories, or what :func:`read_metrics` read from them) into one PNG at
    ``path`` (replaced atomically) and returns the path.

    Panels: the training loss (log scale when it spans a decade), the objective's terms (activation matching and
    masked prediction for distillation, cross-entropy and logit distillation for fine-tuning), accuracy (training
    batches, each evaluation of the holdout and the final test) and the learning rate, all against the optimiser
    step. Runs keep one colour across the panels; ``labels`` name them (default: the directory names).
    """
    fig = curves_figure(runs, labels)
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, buffer.getvalue())
    return path


def curves_figure(runs: Sequence[str | Path | RunMetrics], labels: Sequence[str] | None = None):
    """The matplotlib figure :func:`plot_curves` saves (axes: loss, loss terms, accuracy, learning rate)."""
    runs = [r if isinstance(r, RunMetrics) else read_metrics(r) for r in runs]
    if not runs:
        raise ValueError("no run directory given; pass at least one")
    if labels is not None and len(labels) != len(runs):
        raise ValueError(f"{len(labels)} labels for {len(runs)} run directories; give one label per run")
    names = list(labels) if labels is not None else _distinct_names([r.run_dir for r in runs])

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 7.5))
    ax_loss, ax_terms, ax_acc, ax_lr = axes.flat
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    term_styles = ["-", "--", ":", "-."]
    for i, (run, name) in enumerate(zip(runs, names)):
        colour = colours[i % len(colours)]
        _line(ax_loss, _series(run.train, "loss"), color=colour, label=name)
        for j, term in enumerate(run.loss_terms):
            _line(ax_terms, _series(run.train, term), color=colour, linestyle=term_styles[j % len(term_styles)],
                  label=f"{name}: {term}" if len(runs) > 1 else term)
        steps, acc = _series(run.train, "acc")
        _line(ax_acc, (steps, [100 * a for a in acc]), color=colour, alpha=0.5, label=f"{name}: train batches")
        for metric in sorted({k for _, e in run.evals for k in e if k.endswith("top1")}):
            points = [(s, e[metric]) for s, e in run.evals if metric in e]
            ax_acc.plot([p[0] for p in points], [p[1] for p in points], "o-", color=colour, label=f"{name}: {metric}")
        if run.test and _is_number(run.test.get("top1")):
            last = max([r["step"] for r in run.train] + [s for s, _ in run.evals] + [0])
            ax_acc.plot([last], [run.test["top1"]], "*", markersize=13, color=colour, label=f"{name}: test top1")
        _line(ax_lr, _series(run.train, "lr"), color=colour, label=name)

    _finish_axis(ax_loss, "training loss", "loss", log=_spans_a_decade(ax_loss))
    _finish_axis(ax_terms, "loss terms", "value", log=_spans_a_decade(ax_terms))
    _finish_axis(ax_acc, "accuracy", "top-1 (%)")
    _finish_axis(ax_lr, "learning rate", "lr")
    fig.suptitle(", ".join(names) if len(names) <= 3 else f"{len(names)} runs", fontsize=10)
    fig.tight_layout()
    return fig


def _line(ax, series: tuple[list, list], **style) -> None:
    """A line, with markers when it has too few points to show as one (a short run logs once or twice)."""
    steps, values = series
    if steps:
        ax.plot(steps, values, marker="o" if len(steps) < 3 else None, **style)


def _spans_a_decade(ax) -> bool:
    values = [y for line in ax.lines for y in line.get_ydata()]
    return bool(values) and min(values) > 0 and max(values) / min(values) > 10


def _finish_axis(ax, title: str, ylabel: str, log: bool = False) -> None:
    ax.set(title=title, xlabel="optimiser step", ylabel=ylabel)
    if log:
        ax.set_yscale("log")
    if ax.lines:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    else:
        ax.text(0.5, 0.5, "nothing logged", ha="center", va="center", transform=ax.transAxes, color="gray")


def _distinct_names(run_dirs: list[Path]) -> list[str]:
    """The shortest trailing path of each directory that tells it apart from the others (``a/student`` and
    ``b/student`` rather than ``student`` twice)."""
    parts = [d.resolve().parts for d in run_dirs]
    for depth in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [str(d) for d in run_dirs]
