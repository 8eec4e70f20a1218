"""Outputs of ``vitlinearizer bench``: fitted log-log slopes, the markdown table, the plot and the files."""
from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import BinaryIO

from ..checkpoint import write_bytes_atomic, write_text_atomic
from .models import PAIRS


def _lat(entry: dict | None) -> float | None:
    return ((entry or {}).get("latency") or {}).get("min_s")


def fit_loglog_slope(xs, ys) -> tuple[float, float]:
    """Least-squares fit of log(y) = slope * log(x) + intercept; (nan, nan) with fewer than 2 points."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x and y and x > 0 and y > 0]
    if len(pts) < 2:
        return float("nan"), float("nan")
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    if sxx == 0:
        return float("nan"), float("nan")
    slope = sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx
    return slope, my - slope * mx


def compute_slopes(rows: list[dict]) -> dict:
    """Fitted log-log slope of latency and of activation memory vs tokens, per (model, dtype)."""
    series: dict[str, dict] = {}
    for row in rows:
        for role in ("student", "teacher"):
            entry = row.get(role) or {}
            key = f"{entry.get('model')} [{row['dtype']}]"
            s = series.setdefault(key, dict(model=entry.get("model"), role=role, dtype=row["dtype"], pair=row["pair"],
                                            points=[]))
            s["points"].append((entry.get("tokens"), _lat(entry), entry.get("act_mb")))
    out = {}
    for key, s in series.items():
        pts = sorted(p for p in s["points"] if p[0])
        timed = [(n, t) for n, t, _ in pts if t]
        mem = [(n, m) for n, _, m in pts if m and m > 0]
        slope = fit_loglog_slope([p[0] for p in timed], [p[1] for p in timed])[0]
        # The large-input regime: the fit over inputs of at least 4096 tokens (64x64 patches).
        big = [p for p in timed if p[0] >= 4096]
        slope_big = fit_loglog_slope([p[0] for p in big], [p[1] for p in big])[0]
        mem_slope = fit_loglog_slope([p[0] for p in mem], [p[1] for p in mem])[0]
        out[key] = dict(model=s["model"], role=s["role"], dtype=s["dtype"], pair=s["pair"],
                        time_slope=_finite(slope), time_slope_large=_finite(slope_big),
                        memory_slope=_finite(mem_slope), points=len(timed))
    return out


def _finite(v: float) -> float | None:
    return None if v is None or not math.isfinite(v) else v


def _fmt_ms(v):
    return "–" if v is None else (f"{v * 1e3:.0f}" if v >= 1 else f"{v * 1e3:.1f}")


def _fmt(v, spec=".2f", suffix=""):
    return "–" if v is None else f"{v:{spec}}{suffix}"


def markdown_table(results: dict) -> str:
    env = results["meta"]["environment"]
    head = (f"Device: {env.get('gpu') or env.get('cpu') or env['device']} ({env['device']}, {env['threads']} threads, "
            f"OpenMP wait: {env.get('omp_wait_policy')}), "
            f"torch {env['torch']}, timm {env['timm']}. Latency: batch 1, min over alternating repetitions "
            f"(n = repetitions); throughput: images/s at the given batch. Ideal = teacher FLOPs / student FLOPs. "
            f"Memory: peak minus pre-forward ({'CUDA allocator' if env['device'] == 'cuda' else 'process RSS'}), MB.")
    pairs = dict.fromkeys(row["pair"] for row in results["rows"])
    pair_notes = [PAIRS[p]["note"] for p in pairs if PAIRS.get(p, {}).get("note")]
    if pair_notes:
        head += " Pairs: " + "; ".join(pair_notes) + "."
    if results["meta"].get("interrupted_at"):
        head += f" **Interrupted at {results['meta']['interrupted_at']}**: later configurations were not run."
    lines = [head, "",
             "| pair | size | tokens | dtype | student ms | teacher ms | speed-up | ideal | % of ideal "
             "| student GFLOP | teacher GFLOP | throughput s / t (img/s) | act. mem s / t (MB) | notes |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row in results["rows"]:
        s, t = row.get("student") or {}, row.get("teacher") or {}
        n = max(((s.get("latency") or {}).get("n") or 0), ((t.get("latency") or {}).get("n") or 0))
        tps = (s.get("throughput") or {}).get("img_per_s")
        tpt = (t.get("throughput") or {}).get("img_per_s")
        tp_batch = (s.get("throughput") or t.get("throughput") or {}).get("batch")
        notes = list(row.get("notes") or [])
        for role, entry in (("student", s), ("teacher", t)):
            if entry.get("skipped"):
                notes.append(f"{role} skipped ({entry['skipped']})")
        lines.append(
            f"| {row['pair']} | {row['size']} | {s.get('tokens', '–')} | {row['dtype']} "
            f"| {_fmt_ms(_lat(s))} | {_fmt_ms(_lat(t))} | {_fmt(row.get('speedup'), '.2f', 'x')} "
            f"| {_fmt(row.get('ideal_speedup'), '.2f', 'x')} "
            f"| {_fmt(None if row.get('fraction_of_ideal') is None else 100 * row['fraction_of_ideal'], '.0f', '%')} "
            f"| {_fmt(s.get('flops') and s['flops'] / 1e9, '.1f')} | {_fmt(t.get('flops') and t['flops'] / 1e9, '.1f')} "
            f"| {_fmt(tps, '.2f')} / {_fmt(tpt, '.2f')}{f' (b{tp_batch})' if tp_batch else ''} "
            f"| {_fmt(s.get('act_mb'), '.0f')} / {_fmt(t.get('act_mb'), '.0f')} "
            f"| {'; '.join(notes)}{f' n={n}' if n else ''} |")
    lines += ["", "Fitted log-log slopes vs tokens (time: all sizes / inputs >= 4096 tokens; memory: activation MB):",
              "", "| model | dtype | time slope | time slope (>= 4096 tokens) | memory slope | points |",
              "|---|---|---:|---:|---:|---:|"]
    for key, s in results.get("slopes", {}).items():
        if s["points"]:
            lines.append(f"| {s['model']} | {s['dtype']} | {_fmt(s['time_slope'])} | {_fmt(s['time_slope_large'])} "
                         f"| {_fmt(s['memory_slope'])} | {s['points']} |")
    return "\n".join(lines)


def write_plot(results: dict, path: Path | BinaryIO) -> Path | BinaryIO:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    tokens = sorted({entry["tokens"] for row in results["rows"] for role in ("student", "teacher")
                     if (entry := row.get(role) or {}).get("tokens")})
    styles = {"float32": "-", "bfloat16": "--", "float16": ":"}
    for key, s in results.get("slopes", {}).items():
        pts = []
        for row in results["rows"]:
            entry = row.get(s["role"]) or {}
            if row["dtype"] == s["dtype"] and entry.get("model") == s["model"]:
                pts.append((entry.get("tokens"), _lat(entry), entry.get("act_mb")))
        # A teacher shared by two pairs is measured twice per size: one point each, the faster time and the
        # mean memory, so the line does not zigzag between the two runs.
        by_tokens: dict = {}
        for n, t, m in pts:
            by_tokens.setdefault(n, []).append((t, m))
        pts = [(n, min((t for t, _ in v if t), default=None),
                (sum(ms) / len(ms)) if (ms := [m for _, m in v if m]) else None) for n, v in by_tokens.items()]
        pts.sort(key=lambda p: p[0] or 0)
        marker = "o" if s["role"] == "student" else "s"
        timed = [(n, t) for n, t, _ in pts if n and t]
        if timed:
            label = f"{s['model']} {s['dtype']} (slope {_fmt(s['time_slope'])})"
            axes[0].plot([p[0] for p in timed], [p[1] * 1e3 for p in timed], styles.get(s["dtype"], "-"),
                         marker=marker, label=label)
        mem = [(n, m) for n, _, m in pts if n and m and m > 0]
        if mem:
            label = f"{s['model']} {s['dtype']} (slope {_fmt(s['memory_slope'])})"
            axes[1].plot([p[0] for p in mem], [p[1] for p in mem], styles.get(s["dtype"], "-"), marker=marker,
                         label=label)
    env = results["meta"]["environment"]
    where = env.get("gpu") or f"{env['device']}, {env['threads']} threads"
    for ax, title, ylabel in ((axes[0], f"Latency, batch 1 ({where})", "ms"),
                              (axes[1], "Activation memory, batch 1", "MB")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        # Ticks at the measured token counts: log-axis minor labels overlap across two decades.
        ax.xaxis.set_major_locator(FixedLocator(tokens))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("tokens")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
    return path


def default_tag(results: dict) -> str:
    env = results["meta"]["environment"]
    tag = f"bench_{env['device']}"
    if env.get("gpu"):
        tag += "_" + "".join(c if c.isalnum() else "_" for c in env["gpu"]).strip("_").lower()
    return tag


def write_outputs(results: dict, output_dir: Path, tag: str | None = None) -> list[Path]:
    """JSON, markdown table and plot; each file replaced atomically, and the plot rendered before any is
    replaced: with --output-dir benchmarks/results a failed write must leave the published files whole."""
    output_dir.mkdir(parents=True, exist_ok=True)
    stem = tag or default_tag(results)
    json_path, md_path, png_path = (output_dir / f"{stem}.{ext}" for ext in ("json", "md", "png"))
    png = io.BytesIO()
    write_plot(results, png)
    write_text_atomic(json_path, json.dumps(results, indent=1, default=str))
    write_text_atomic(md_path, markdown_table(results) + "\n")
    write_bytes_atomic(png_path, png.getvalue())
    return [json_path, md_path, png_path]
