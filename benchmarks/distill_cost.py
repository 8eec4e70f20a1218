"""Cost of the activation-matching loss vs resolution: step time and peak memory, forward + backward.

``vitlinearizer.objectives.activation_matching_loss`` compares K=4 stages of student and teacher token
features through their (L x L) cosine-similarity maps: O(L^2) time and, computed at once, O(L^2) memory.
Variants:

- ``full``: the whole map at once;
- ``rowblock``: ``row_block_size=512`` rows at a time, recomputed in backward: O(512 * L) memory, ~1.5x time;
- ``anchors``: ``num_anchors=256`` random visible rows per image: O(256 * L) time and memory, an unbiased
  estimate of the full loss.

Features: student (B, L, 512) (Adventurer-S), teacher (B, L, 768) (ViT-B), 25% of tokens visible (the
paper's 75% masking), B=1; L = patch tokens at 224..2048 px for patch 16. Each (L, variant) runs in a
FRESH subprocess: on CPU peak memory is the RSS high-water mark (getrusage) minus the RSS before the first
step; on CUDA ``max_memory_allocated``. Time: min over repetitions of loss + backward.

    .venv/bin/python benchmarks/distill_cost.py            # writes benchmarks/results/distill_cost_cpu.{json,md}
    .venv/bin/python benchmarks/distill_cost.py --quick    # smoke test (writes benchmarks/results/tmp/)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
sys.path.insert(0, str(SRC))
from vitlinearizer.bench import check_script_target, non_negative_int, positive_int  # noqa: E402
from vitlinearizer.bench.openmp import openmp_env  # noqa: E402
RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = {"full": {}, "rowblock": dict(row_block_size=512), "anchors": dict(num_anchors=256)}


def estimate(length: int, variant: str, batch: int, stages: int = 4, c_s: int = 512, c_t: int = 768):
    """(FLOPs of forward + backward, peak bytes) of one step: the Gram products dominate."""
    rows = length if variant != "anchors" else min(length, VARIANTS["anchors"]["num_anchors"])
    flops = 2 * batch * stages * rows * length * (c_s + c_t) * (3 if variant != "rowblock" else 4)
    block = rows if variant != "rowblock" else min(length, VARIANTS["rowblock"]["row_block_size"])
    peak = 4 * batch * block * length * 10 * (stages if variant == "full" else 1) + 4 * batch * length * (c_s + c_t) * stages * 3
    return flops, peak


def worker(spec: dict) -> dict:
    import resource

    import torch

    from vitlinearizer.objectives import activation_matching_loss

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    gen = torch.Generator().manual_seed(0)
    b, length, k = spec["batch"], spec["length"], spec["stages"]
    student = [torch.randn(b, length, 512, generator=gen).to(device).requires_grad_() for _ in range(k)]
    teacher = [torch.randn(b, length, 768, generator=gen).to(device) for _ in range(k)]
    visible = (torch.rand(b, length, generator=gen) < spec["visible"]).to(device)
    anchor_gen = torch.Generator(device="cpu").manual_seed(1)
    kwargs = dict(VARIANTS[spec["variant"]])
    if "num_anchors" in kwargs:
        kwargs["generator"] = anchor_gen

    def rss():
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = rss()
    times = []
    for _ in range(spec["warmup"] + spec["repeats"]):
        for t in student:
            t.grad = None
        start = time.perf_counter()
        loss = activation_matching_loss(student, teacher, visible, **kwargs)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return dict(times_s=times[spec["warmup"]:], loss=float(loss.detach()), peak_bytes=peak, before_bytes=before,
                act_bytes=peak - before)


def run_fresh(spec: dict, timeout: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="vl_distill_") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        env = dict(os.environ)
        if "OMP_WAIT_POLICY" not in env and "GOMP_SPINCOUNT" not in env:  # the bench's CPU default
            env = openmp_env("short-spin", env)
        proc = subprocess.run([sys.executable, __file__, "--worker", str(spec_path), str(out_path)],
                              capture_output=True, text=True, timeout=timeout, env=env)
        if proc.returncode != 0:
            raise RuntimeError((proc.stderr or proc.stdout).strip().splitlines()[-1:])
        return json.loads(out_path.read_text())


def markdown(results: dict) -> str:
    env = results["meta"]
    lines = [f"Activation-matching loss, forward + backward, K=4 stages, student 512 / teacher 768 channels, "
             f"{int(env['visible'] * 100)}% visible, batch {env['batch']}, {env['device']} ({env['threads']} threads). "
             "Time: min over repetitions; memory: peak minus before the first step (fresh process per row).", "",
             "| tokens L | image side (patch 16) | variant | step ms | peak extra MB | notes |",
             "|---:|---:|---|---:|---:|---|"]
    for r in results["rows"]:
        ms = "–" if r.get("min_s") is None else f"{r['min_s'] * 1e3:.1f}"
        mb = "–" if r.get("act_mb") is None else f"{r['act_mb']:.0f}"
        lines.append(f"| {r['length']} | {r['side']} | {r['variant']} | {ms} | {mb} | {r.get('note', '')} |")
    return "\n".join(lines)


def resolve_output_dir(args) -> Path:
    # A smoke test must not overwrite the committed distill_cost_cpu.{json,md} that docs/performance.md quotes;
    # results/tmp/ is git-ignored.
    return Path(args.output_dir or (RESULTS / "tmp" if args.quick else RESULTS))


def side_px(text: str) -> int:
    # Below one patch there are no tokens: the row would time an empty loss.
    value = positive_int(text)
    if value < 16:
        raise argparse.ArgumentTypeError(f"an image side must be >= 16 px (one patch), got {text!r}")
    return value


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text!r}")
    return value


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        Path(argv[2]).write_text(json.dumps(worker(json.loads(Path(argv[1]).read_text()))))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sides", nargs="+", type=side_px, default=None,
                        help="image sides in px at patch 16 (default 224 448 768 1024 1536 2048)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--batch", type=positive_int, default=1)
    parser.add_argument("--visible", type=fraction, default=0.25, help="share of visible tokens, in (0, 1]")
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=non_negative_int, default=2, help="torch.set_num_threads (0: torch's default)")
    parser.add_argument("--time-budget", type=float, default=120.0, help="skip rows estimated to take longer (s)")
    parser.add_argument("--max-gb", type=float, default=6.0, help="skip rows estimated to need more memory")
    parser.add_argument("--quick", action="store_true", help="smoke test: sides 64 and 128, 1 repetition")
    parser.add_argument("--output-dir", default=None,
                        help="default: benchmarks/results (with --quick: benchmarks/results/tmp, not committed)")
    args = parser.parse_args(argv)
    out = resolve_output_dir(args)
    check_script_target(parser, out, args.device)
    sides = args.sides or ([64, 128] if args.quick else [224, 448, 768, 1024, 1536, 2048])
    repeats = 1 if args.quick else args.repeats
    rate = 40e9 if args.device == "cpu" else 20e12
    rows = []
    for side in sides:
        length = (side // 16) ** 2
        for variant in args.variants:
            flops, mem = estimate(length, variant, args.batch)
            est_s = flops / rate * (repeats + 1)
            row = dict(length=length, side=side, variant=variant, est_s=est_s, est_gb=mem / 2**30)
            if est_s > args.time_budget or mem / 2**30 > args.max_gb:
                row["note"] = f"skipped (estimated {est_s:.0f} s, {mem / 2**30:.1f} GB)"
                rows.append(row)
                print(f"L={length:6d} {variant:8s} {row['note']}", flush=True)
                continue
            spec = dict(length=length, variant=variant, batch=args.batch, stages=4, visible=args.visible,
                        device=args.device, threads=args.threads, warmup=1, repeats=repeats)
            try:
                res = run_fresh(spec, timeout=max(60.0, 10 * est_s))
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                row["note"] = f"failed: {exc}"[:200]
                rows.append(row)
                continue
            row.update(min_s=min(res["times_s"]), times_s=res["times_s"], act_mb=res["act_bytes"] / 2**20,
                       peak_mb=res["peak_bytes"] / 2**20, loss=res["loss"])
            rows.append(row)
            print(f"L={length:6d} {variant:8s} {row['min_s'] * 1e3:9.1f} ms  {row['act_mb']:8.0f} MB", flush=True)
    import torch

    results = dict(meta=dict(device=args.device, threads=args.threads, batch=args.batch, visible=args.visible,
                             torch=torch.__version__, created=time.strftime("%Y-%m-%d %H:%M:%S"),
                             variants={k: v for k, v in VARIANTS.items()}), rows=rows)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"distill_cost_{args.device}"
    (out / f"{stem}.json").write_text(json.dumps(results, indent=1))
    (out / f"{stem}.md").write_text(markdown(results) + "\n")
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
