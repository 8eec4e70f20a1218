"""The demo's report: a results table, latency vs resolution, wall time per stage, configs and PNG plots."""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
from pathlib import Path

import safetensors
import torch

from .checkpoint import write_text_atomic
from .curves import read_metrics


def _param_count(path: Path) -> int:
    if path.suffix != ".safetensors":  # a teacher given as a torch checkpoint (--teacher-weights x.pth)
        from .teacher import load_state_dict_safely

        state = load_state_dict_safely(path)
        return sum(v.numel() for k, v in state.items() if k != "mask_token")
    with safetensors.safe_open(str(path), "pt") as f:  # shapes only: no tensor is read
        return sum(torch.Size(f.get_slice(k).get_shape()).numel() for k in f.keys() if k != "mask_token")


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, {platform.python_version()}"


def _fmt(values: list[float], sign: str = "") -> str:
    """Mean ± sample std; ``sign="+"`` prints differences with their sign."""
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:{sign}.2f}"
    return f"{statistics.fmean(values):{sign}.2f} ± {statistics.stdev(values):.2f}"


def _group(results: dict) -> dict[str, dict]:
    """Group stage summaries over seeds: 'finetune-both-mamba2-s1' -> 'finetune-both-mamba2'."""
    groups: dict[str, dict] = {}
    for name, summary in results.items():
        if name == "teacher":
            continue
        key = name.rsplit("-s", 1)[0]
        g = groups.setdefault(key, {"test": [], "holdout": [], "exported": summary.get("exported")})
        g["test"].append(summary["test"]["top1"])
        if summary.get("last_eval"):
            g["holdout"].append(summary["last_eval"]["holdout_top1"])
    return groups


def _cls_target(preset) -> str:
    return f", class-token target at weight {preset.distill_cls_weight:g}" if preset.distill_cls_weight else ""


def _label(key: str) -> str:
    kind, *rest = key.split("-")
    if kind == "scratch":
        return f"Student from scratch ({rest[0]})"
    objective, mixer = rest
    what = {"both": "act + mask", "act": "act only", "mask": "mask only"}[objective]
    return f"Distilled student, {what} ({mixer})"


def results_table(results: dict) -> tuple[str, dict]:
    teacher = results["teacher"]
    rows = ["| Model | Params | Holdout top-1 | Test top-1 | Runs |", "|---|---|---|---|---|"]
    t_test = [teacher["summary"]["test"]["top1"]]
    t_hold = [teacher["summary"]["last_eval"]["holdout_top1"]] if teacher["summary"].get("last_eval") else []
    t_params = _param_count(Path(teacher["weights"]))
    rows.append(f"| Teacher ViT (patch 4) | {t_params / 1e6:.2f}M | {_fmt(t_hold)} | {_fmt(t_test)} | 1 |")
    groups = _group(results)
    for key in sorted(groups, key=lambda k: (not k.startswith("finetune-both"), k)):
        g = groups[key]
        params = _param_count(Path(g["exported"])) if g["exported"] else 0
        rows.append(f"| {_label(key)} | {params / 1e6:.2f}M | {_fmt(g['holdout'])} | {_fmt(g['test'])} | {len(g['test'])} |")
    return "\n".join(rows), groups


def _holdout(summary: dict) -> float | None:
    return summary["last_eval"]["holdout_top1"] if summary.get("last_eval") else None


def gap_table(results: dict) -> tuple[str, dict]:
    """What distillation buys: each distilled student minus the scratch student of the same mixer and seed (and
    minus the teacher), in points, as mean ± std over the seeds. Pairing by seed removes the seed-to-seed spread
    the two students share (data order, initialisation of the common layers)."""
    teacher = results["teacher"]["summary"]
    gaps: dict[str, dict[str, list[float]]] = {}
    for name, summary in results.items():
        if not name.startswith("finetune-"):
            continue
        key, seed = name.rsplit("-s", 1)
        mixer = key.rsplit("-", 1)[1]
        scratch = results.get(f"scratch-{mixer}-s{seed}")
        g = gaps.setdefault(key, {"scratch_holdout": [], "scratch_test": [], "teacher_test": []})
        g["teacher_test"].append(summary["test"]["top1"] - teacher["test"]["top1"])
        if scratch is None:
            continue
        g["scratch_test"].append(summary["test"]["top1"] - scratch["test"]["top1"])
        if _holdout(summary) is not None and _holdout(scratch) is not None:
            g["scratch_holdout"].append(_holdout(summary) - _holdout(scratch))
    rows = ["| Distilled student | Seeds | − scratch, holdout | − scratch, test | − teacher, test |", "|---|---|---|---|---|"]
    for key, g in gaps.items():  # the demo's order: per mixer, its objectives
        rows.append(f"| {_label(key)} | {len(g['teacher_test'])} | {_fmt(g['scratch_holdout'], '+')} | "
                    f"{_fmt(g['scratch_test'], '+')} | {_fmt(g['teacher_test'], '+')} |")
    return "\n".join(rows), gaps


def write_plots(run_dir: Path, results: dict, groups: dict, latency: list[dict]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for kind, ax in zip(("teacher", "distill", "finetune|scratch"), axes):
        for stage_dir in sorted(p for p in run_dir.iterdir() if p.is_dir()):
            if not any(stage_dir.name.startswith(k) for k in kind.split("|")):
                continue
            if not (stage_dir / "metrics.jsonl").is_file():
                continue
            rows = [r for r in read_metrics(stage_dir).train if "loss" in r]
            if rows:
                ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=stage_dir.name)
        ax.set(title=f"{kind} loss", xlabel="optimiser step", ylabel="loss")
        if ax.lines:
            ax.legend(fontsize=7)
        else:  # a teacher given with --teacher-weights is not trained here
            ax.text(0.5, 0.5, "not trained in this run", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(run_dir / "loss_curves.png", dpi=110)
    written.append("loss_curves.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    names = ["teacher"] + list(groups)
    means = [results["teacher"]["summary"]["test"]["top1"]] + [statistics.fmean(g["test"]) for g in groups.values()]
    errs = [0.0] + [statistics.stdev(g["test"]) if len(g["test"]) > 1 else 0.0 for g in groups.values()]
    ax.bar(range(len(names)), means, yerr=errs, color=["tab:gray"] + ["tab:blue"] * len(groups), capsize=3)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(min(means) - 5, min(100, max(means) + 2))
    ax.set(ylabel="test top-1 (%)", title="Accuracy per model")
    fig.tight_layout()
    fig.savefig(run_dir / "accuracy.png", dpi=110)
    written.append("accuracy.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    tokens = [r["tokens"] for r in latency]
    for who in ("teacher", "student"):
        ax.loglog(tokens, [r[f"{who}_latency_ms"] for r in latency], "o-", label=who)
    ax.set(xlabel="tokens (log)", ylabel="batch-1 latency, ms (log)", title="CPU latency vs resolution")
    ax.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "latency.png", dpi=110)
    written.append("latency.png")
    plt.close(fig)
    return written


def _epochs(n: int) -> str:
    return f"{n} epoch" + ("" if n == 1 else "s")


def write_report(run_dir: Path, preset_name: str, preset, results: dict, latency: list[dict], log: list[dict],
                 total_wall_s: float) -> dict:
    table, groups = results_table(results)
    gaps_md, gaps = gap_table(results)
    latency_rows = ["| Size | Tokens | Teacher ms | Student ms | Speed-up | Batch | Teacher img/s | Student img/s |",
                    "|---|---|---|---|---|---|---|---|"]
    for r in latency:
        latency_rows.append(
            f"| {r['size']}² | {r['tokens']} | {r['teacher_latency_ms']:.1f} | {r['student_latency_ms']:.1f} | "
            f"{r['speedup']:.2f}x | {r.get('throughput_batch', 32)} | {r['teacher_img_per_s']:.1f} | "
            f"{r['student_img_per_s']:.1f} |")
    stage_rows = ["| Stage | Wall time | Reused |", "|---|---|---|"]
    for s in log:
        reused = "yes" if s["reused"] else "resumed: this invocation's time only" if s.get("resumed") else "no"
        stage_rows.append(f"| {s['stage']} | {s['wall_s'] / 60:.1f} min | {reused} |")
    plots = write_plots(run_dir, results, groups, latency)
    configs = []
    for name in ("teacher", f"distill-{preset.main_objective}-{preset.mixers[0]}-s{preset.seeds[0]}",
                 f"finetune-{preset.main_objective}-{preset.mixers[0]}-s{preset.seeds[0]}",
                 f"scratch-{preset.mixers[0]}-s{preset.seeds[0]}"):
        path = run_dir / name / "config.yaml"
        if path.is_file():
            configs.append(f"<details><summary>{name}</summary>\n\n```yaml\n{path.read_text()}```\n</details>\n")
    train = "all" if preset.train_samples is None else f"a class-balanced subset of {preset.train_samples}"
    teacher_data = {"same": "the same images", None: "all non-holdout training images"}.get(
        preset.teacher_train_samples, f"a class-balanced subset of {preset.teacher_train_samples} images")
    teacher_training = (f"the weights given with --teacher-weights (`{results['teacher']['weights']}`; tested only: "
                        "they may have been trained on the holdout images)"
                        if results["teacher"].get("given") else f"{_epochs(preset.teacher_epochs)} on {teacher_data}")
    stages_wall_s = sum(s["wall_s"] for s in log)
    text = f"""# ViT-Linearizer demo report (preset: {preset_name})

Date {datetime.datetime.now().isoformat(timespec='seconds')}, commit {_commit()}, machine: {machine()}.
Wall time of all stages {stages_wall_s / 60:.1f} min (stages reused from an earlier invocation count with
their original time, a resumed stage with this invocation's part); this invocation {total_wall_s / 60:.1f} min.

Data: Fashion-MNIST (Debian `dataset-fashion-mnist`), 28x28, {train} training images ({preset.holdout_fraction:.0%} of
the training set is held out for validation: the holdout column; augmentation: {preset.augment}), the
{'full 10k' if preset.eval_samples is None else f'class-balanced {preset.eval_samples}-image subset of the 10k'}
test set (the test column; never used for any choice). Teacher: timm ViT, width 192, depth 6, patch 4 (49 tokens),
{teacher_training}. Student: `{preset.student}`, distilled for
{_epochs(preset.distill_epochs)} (K={preset.num_stages} stages, 75% masking{_cls_target(preset)}, no labels; peak lr {preset.distill_lr:g}, warm-up
{preset.distill_warmup_epochs:g} epochs) then fine-tuned for {_epochs(preset.finetune_epochs)} (peak lr {preset.finetune_lr:g}, warm-up {preset.finetune_warmup_epochs:g} epochs,
layer-wise lr decay {preset.finetune_layer_decay:g}); the scratch student gets {_epochs(preset.distill_epochs + preset.finetune_epochs)} with labels (equal student
epochs; peak lr {preset.scratch_lr:g}, warm-up {preset.scratch_warmup_epochs:g} epochs). Batch {preset.batch_size}.
Seeds: {preset.seeds}.

## Results

{table}

Differences in top-1 points, paired by seed (mean ± std over seeds): each distilled student against the
scratch student of the same mixer and seed (equal student epochs), and against the teacher.

{gaps_md}

![accuracy](accuracy.png)

## Latency vs resolution (CPU, batch 1; throughput at the batch given)

{chr(10).join(latency_rows)}

![latency](latency.png)

## Training curves

![loss curves](loss_curves.png)

## Wall time per stage

{chr(10).join(stage_rows)}

## Configs used

{chr(10).join(configs)}
"""
    write_text_atomic(run_dir / "report.md", text)
    summary = {"preset": preset_name, "results": {k: {"test": g["test"], "holdout": g["holdout"]} for k, g in groups.items()},
               "gaps": gaps, "teacher_test": results["teacher"]["summary"]["test"]["top1"], "latency": latency, "stages": log,
               "total_wall_s": total_wall_s, "stages_wall_s": stages_wall_s, "plots": plots}
    write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=2))
    return {"table": f"{table}\n\n{gaps_md}", **summary}
