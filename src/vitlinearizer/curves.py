"""Training curves of run directories, from their ``metrics.jsonl``: one PNG to look at after (or during) a run,
or to compare runs.

Every training command writes ``<run>/curves.png`` when it ends (also when it diverged or was interrupted);
``vitlinearizer plot RUN [RUN ...]`` draws the same figure for any runs, finished or not.
"""
from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .checkpoint import check_output_dir, check_writable, write_bytes_atomic

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
    if run_dir.is_file():
        raise FileNotFoundError(f"{run_dir} is a file; pass the run directory that holds it ({run_dir.parent})")
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
    """(steps, values) of the records that logged ``key``; a non-finite value is kept as NaN, which breaks the
    line there (a window of skipped bad steps shows as a gap, not as a straight line across it)."""
    points = [(r["step"], float(r[key]) if _is_number(r[key]) else math.nan) for r in records
              if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
    return [p[0] for p in points], [p[1] for p in points]


FORMATS = ("png", "pdf", "svg")


def plot_curves(runs: str | Path | RunMetrics | Sequence[str | Path | RunMetrics], path: str | Path,
                labels: Sequence[str] | None = None) -> Path:
    """Draws the runs' curves (run directories, or what :func:`read_metrics` read from them) into one figure at
    ``path`` (``.png``, ``.pdf`` or ``.svg``; replaced atomically) and returns the path.

    Panels: the training loss (log scale when it spans a decade), the objective's terms (activation matching and
    masked prediction for distillation, cross-entropy and logit distillation for fine-tuning), accuracy (training
    batches, each evaluation of the holdout and the final test) and the learning rate, all against the optimiser
    step. Each run keeps one colour across the panels; ``labels`` name them (default: the directory names).
    """
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in FORMATS:
        raise ValueError(f"{path}: the figure is written as {', '.join(FORMATS)}; give a file name ending in one")
    if path.is_dir():
        raise ValueError(f"{path} is a directory; give a file name such as {path / 'curves.png'}")
    check_output_dir(path.parent, "output path")
    check_writable(path.parent, "output path")
    buffer = io.BytesIO()
    curves_figure(runs, labels).savefig(buffer, format=fmt, dpi=100)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, buffer.getvalue())
    return path


def curves_figure(runs: str | Path | RunMetrics | Sequence[str | Path | RunMetrics],
                  labels: Sequence[str] | None = None):
    """The matplotlib ``Figure`` :func:`plot_curves` saves (axes: loss, loss terms, accuracy, learning rate). It is
    built without pyplot, so the caller's backend (a notebook's, say) is left as it was."""
    if isinstance(runs, (str, Path, RunMetrics)):
        runs = [runs]
    runs = [r if isinstance(r, RunMetrics) else read_metrics(r) for r in runs]
    if not runs:
        raise ValueError("no run directory given; pass at least one")
    dirs = [r.run_dir.resolve() for r in runs]
    twice = next((d for i, d in enumerate(dirs) if d in dirs[:i]), None)
    if twice is not None:
        raise ValueError(f"run directory {twice} is given twice; pass each run once")
    if labels is not None and len(labels) != len(runs):
        raise ValueError(f"{len(labels)} labels for {len(runs)} run directories; give one label per run")
    names = [_literal(n) for n in (labels if labels is not None else _distinct_names([r.run_dir for r in runs]))]

    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    fig = Figure(figsize=(12 if len(runs) == 1 else 14, 7.5), layout="constrained")
    ax_loss, ax_terms, ax_acc, ax_lr = fig.subplots(2, 2).flat
    colours = _run_colours(len(runs))
    terms = list(dict.fromkeys(t for run in runs for t in run.loss_terms))
    evals = sorted({k for run in runs for _, e in run.evals for k in e if k.endswith("top1")})
    bad_windows = 0
    for run, colour in zip(runs, colours):
        steps, loss = _series(run.train, "loss")
        bad_windows += sum(math.isnan(v) for v in loss)
        _line(ax_loss, steps, loss, color=colour)
        for term in run.loss_terms:
            _line(ax_terms, *_series(run.train, term), color=colour, **_TERM_STYLES[terms.index(term) % 4])
        steps, acc = _series(run.train, "acc")
        _line(ax_acc, steps, [100 * a for a in acc], color=colour, alpha=0.45)
        for metric in evals:
            points = [(s, e[metric]) for s, e in run.evals if metric in e]
            if points:
                ax_acc.plot(*zip(*points), "o-", color=colour, markersize=4)
        if run.test and _is_number(run.test.get("top1")):
            last = max([r["step"] for r in run.train] + [s for s, _ in run.evals] + [0])
            ax_acc.plot([last], [run.test["top1"]], "*", markersize=13, color=colour)
        _line(ax_lr, *_series(run.train, "lr"), color=colour)

    grey = dict(color="0.35")
    _finish_axis(ax_loss, "training loss", "loss", log=_spans_a_decade(ax_loss))
    if bad_windows:
        ax_loss.text(0.99, 0.98, f"gaps: {bad_windows} logging window(s) of non-finite loss (skipped steps)",
                     ha="right", va="top", fontsize=7, color="tab:red", transform=ax_loss.transAxes)
    _finish_axis(ax_terms, "loss terms", "value", log=_spans_a_decade(ax_terms),
                 legend=[(Line2D([], [], **grey, **_TERM_STYLES[i % 4]), _literal(t)) for i, t in enumerate(terms)])
    _finish_axis(ax_acc, "accuracy", "top-1 (%)", legend=[
        (Line2D([], [], alpha=0.45, **grey), "train batches"),
        *[(Line2D([], [], marker="o", markersize=4, **grey), _literal(m)) for m in evals],
        (Line2D([], [], marker="*", markersize=10, linestyle="", **grey), "final test top1")])
    _finish_axis(ax_lr, "learning rate", "lr")
    if len(runs) > 1:  # colours name the runs, once for all four panels
        fig.legend([Line2D([], [], color=c, linewidth=2) for c in colours], names, loc="outside right upper",
                   fontsize=8, ncols=1 + len(runs) // 30, title="runs")
    fig.suptitle(names[0] if len(runs) == 1 else f"{len(runs)} runs", fontsize=10)
    return fig


_TERM_STYLES = [dict(linestyle="-", marker="o"), dict(linestyle="--", marker="s"), dict(linestyle=":", marker="^"),
                dict(linestyle="-.", marker="D")]


def _literal(text: str) -> str:
    """Text shown as written: matplotlib reads ``$...$`` as math."""
    return str(text).replace("$", r"\$")


def _run_colours(count: int) -> list:
    from matplotlib import colormaps

    if count <= 10:
        return [colormaps["tab10"](i) for i in range(count)]
    if count <= 20:
        return [colormaps["tab20"](i) for i in range(count)]
    return [colormaps["turbo"](i / (count - 1)) for i in range(count)]


def _line(ax, steps: list, values: list, marker: str | None = None, **style) -> None:
    """A line; its markers only when it has too few points to show as one (a short run logs once or twice)."""
    if steps:
        few = sum(math.isfinite(v) for v in values) < 3
        ax.plot(steps, values, marker=(marker or "o") if few else None, **style)


def _spans_a_decade(ax) -> bool:
    values = [y for line in ax.lines for y in line.get_ydata() if math.isfinite(y)]
    return bool(values) and min(values) > 0 and max(values) / min(values) > 10


def _finish_axis(ax, title: str, ylabel: str, log: bool = False, legend: list | None = None) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set(title=title, xlabel="optimiser step", ylabel=ylabel)
    ax.set_xlim(left=0)  # the same origin in every panel, and whole steps even for a run of one logged point
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    drawn = any(math.isfinite(y) for line in ax.lines for y in line.get_ydata())
    if not drawn:
        message = "no finite values logged" if ax.lines else "nothing logged"
        ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="gray")
        return
    if log:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(*zip(*legend), fontsize=7)


def _distinct_names(run_dirs: list[Path]) -> list[str]:
    """The shortest trailing path of each directory that tells it apart from the others (``a/student`` and
    ``b/student`` rather than ``student`` twice)."""
    parts = [d.resolve().parts for d in run_dirs]
    for depth in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [str(d) for d in run_dirs]
