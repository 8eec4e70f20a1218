"""``vitlinearizer bench``: speed, FLOPs and peak memory vs resolution, student vs teacher.

For pairs of equal depth (and width, except Small: Adventurer-S is 512 wide, ViT-S 384), at each input size
and dtype, it measures

- latency at batch 1: both models in ONE fresh process, repetitions alternating student/teacher (so both
  see the same background load), reported as min and median;
- throughput at ``--batch`` images per forward, the same way (skipped where the time budget does not allow);
- peak memory of one batch-1 forward: on CPU the RSS high-water mark (``resource.getrusage``) of a FRESH
  subprocess per model and configuration, minus the RSS just before the forward (``act_mb``); on CUDA
  ``torch.cuda.max_memory_allocated`` minus the allocation before the forward;
- FLOPs with ``torch.utils.flop_counter.FlopCounterMode`` on the meta device (shapes only, no compute):
  matmul-type ops (mm, addmm, bmm, baddbmm, convolution, and scaled-dot-product attention, which on the meta
  device runs as two bmm). Element-wise work (norms, activations, exp/cumsum of the recurrence, the Mamba-2
  depthwise conv, which runs as shifted multiply-adds) is not counted: it is < 1% of either model's matmul
  FLOPs. ``ideal`` = teacher FLOPs / student FLOPs is the speed-up a FLOP-proportional runtime would give.

Every model runs its fastest default path: the teacher is timm's ViT with fused SDPA; the student runs the
chunked recurrence (fla on CUDA when installed) and, without autograd, its streaming block.

Outputs (``--output-dir``): ``bench_<device>.json`` (all numbers), ``bench_<device>.md`` (table with the
student/teacher ratio per row) and ``bench_<device>.png`` (log-log time and memory vs tokens with fitted
slopes). Large configurations are skipped when their estimated cost exceeds ``--time-budget`` (per config)
or the run's ``--max-minutes``; skipped entries are kept in the outputs with the reason.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

# Pairs: student and teacher of equal depth (and width except "small"), built with pretrained=False.
PAIRS: dict[str, dict] = {
    "small": dict(student=("adventurer_small_patch16_224", {}),
                  teacher=("vit_small_patch16_224", {})),
    "base": dict(student=("adventurer_base_patch16_224", {}),
                 teacher=("vit_base_patch16_224", {})),
    # The demo pair of `vitlinearizer demo`: width 192, depth 6, patch 4 (a ViT-Tiny cut to 6 blocks).
    "demo": dict(student=("adventurer_micro_patch4_28", {}),
                 teacher=("vit_tiny_patch16_224", dict(patch_size=4, embed_dim=192, depth=6, num_heads=3,
                                                       img_size=28, num_classes=10))),
}
DEFAULT_SIZES = ("224", "448", "768", "1024", "2048", "1024x2048")
DTYPES = {"float32": "float32", "fp32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
          "fp16": "float16", "float16": "float16"}
# First guesses of the achieved FLOP rate, used to budget a configuration before anything was measured.
RATE_GUESS = {("cpu", "float32"): 40e9, ("cpu", "bfloat16"): 6e9, ("cpu", "float16"): 3e9,
              ("cuda", "float32"): 20e12, ("cuda", "bfloat16"): 150e12, ("cuda", "float16"): 150e12}
QUICK = dict(pairs=["demo"], sizes=["32", "64"], dtypes=["float32"], repeats=2, batch=2, warmup=1,
             time_budget=60.0, max_minutes=3.0)


# ------------------------------------------------------------------------------------------- CLI
def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``vitlinearizer bench`` (documented in docs/performance.md)."""
    parser.add_argument("--pairs", nargs="+", choices=sorted(PAIRS), default=argparse.SUPPRESS, metavar="PAIR",
                        help="student/teacher pairs: small (Adventurer-S vs ViT-S/16), base (Adventurer-B vs "
                             "ViT-B/16), demo (adventurer_micro_patch4_28 vs a 6-block ViT, width 192, patch 4) "
                             "(default: small demo base)")
    parser.add_argument("--sizes", nargs="+", default=argparse.SUPPRESS, metavar="SIZE",
                        help=f"input sizes, S or HxW (default: {' '.join(DEFAULT_SIZES)})")
    parser.add_argument("--dtypes", nargs="+", default=argparse.SUPPRESS, metavar="DTYPE",
                        help="float32 | bf16 | fp16 (default: float32 bf16; on CPU bf16 runs after every "
                             "float32 configuration, within the time budget)")
    parser.add_argument("--batch", type=int, default=argparse.SUPPRESS, help="images per forward for throughput (default 8)")
    parser.add_argument("--repeats", type=int, default=argparse.SUPPRESS,
                        help="timed repetitions per model (default 5; fewer where the budget requires)")
    parser.add_argument("--warmup", type=int, default=argparse.SUPPRESS, help="untimed forwards per model first (default 1)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--threads", type=int, default=argparse.SUPPRESS,
                        help="CPU threads (torch.set_num_threads) in every measuring process (default: torch's)")
    parser.add_argument("--time-budget", type=float, default=argparse.SUPPRESS, metavar="SECONDS",
                        help="skip what a configuration (pair, size, dtype) cannot finish in this time, by an "
                             "estimate from FLOPs and the rates measured so far (default: 120 on CPU, 60 on CUDA)")
    parser.add_argument("--max-minutes", type=float, default=argparse.SUPPRESS,
                        help="stop starting configurations after this much time (default: 12 on CPU, 6 on CUDA; "
                             "a configuration already started may run its --time-budget past it)")
    parser.add_argument("--omp-wait-policy", choices=["passive", "active", "inherit"], default=argparse.SUPPRESS,
                        help="OMP_WAIT_POLICY of the measuring processes (default: passive on CPU: idle OpenMP "
                             "threads sleep instead of spinning, which on a CPU shared with other processes "
                             "keeps them from stealing the core of the thread doing the work; inherit: leave "
                             "the environment as it is)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--output-dir", default="benchmarks/results", help="where the JSON/markdown/plot go")
    parser.add_argument("--tag", default=argparse.SUPPRESS, help="file name stem (default: bench_<device>[_<gpu name>])")
    parser.add_argument("--quick", action="store_true",
                        help="CI smoke test: demo pair at 32 and 64 px, float32, 2 repeats, batch 2")
    parser.add_argument("--dry-run", action="store_true", help="print the plan (FLOPs, estimates) and exit")


def run_bench_from_args(args: argparse.Namespace) -> int:
    opts = BenchOptions.from_args(args)
    if getattr(args, "dry_run", False):
        for line in plan_lines(opts):
            print(line)
        return 0
    results = run_bench(opts)
    paths = write_outputs(results, Path(opts.output_dir), opts.tag)
    print(markdown_table(results))
    print("\nwrote " + ", ".join(str(p) for p in paths))
    return 0


@dataclass
class BenchOptions:
    pairs: list[str]
    sizes: list[tuple[int, int]]
    dtypes: list[str]
    batch: int = 8
    repeats: int = 5
    warmup: int = 1
    device: str = "cpu"
    threads: int | None = None
    time_budget: float = 120.0
    max_minutes: float = 12.0
    memory: bool = True
    omp_wait_policy: str = "passive"
    output_dir: str = "benchmarks/results"
    tag: str | None = None
    command: list[str] = field(default_factory=list)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "BenchOptions":
        device = resolve_device(args.device)
        quick = QUICK if args.quick else {}
        cpu = device == "cpu"

        def pick(name, default):
            value = getattr(args, name, None)
            return value if value is not None else quick.get(name, default)

        dtypes = [_dtype_name(d) for d in pick("dtypes", ["float32", "bf16"])]
        opts = cls(
            pairs=list(pick("pairs", ["small", "demo", "base"])),
            sizes=[parse_size(s) for s in pick("sizes", list(DEFAULT_SIZES))],
            dtypes=list(dict.fromkeys(dtypes)),
            batch=int(pick("batch", 8)),
            repeats=int(pick("repeats", 5)),
            warmup=int(pick("warmup", 1)),
            device=device,
            threads=getattr(args, "threads", None),
            time_budget=float(pick("time_budget", 120.0 if cpu else 60.0)),
            max_minutes=float(pick("max_minutes", 12.0 if cpu else 6.0)),
            memory=not args.no_memory,
            omp_wait_policy=getattr(args, "omp_wait_policy", None) or ("passive" if cpu else "inherit"),
            output_dir=args.output_dir,
            tag=getattr(args, "tag", None),
            command=sys.argv[:],
        )
        if opts.batch < 1 or opts.repeats < 1 or opts.warmup < 0:
            raise ValueError("--batch and --repeats must be >= 1 and --warmup >= 0")
        return opts


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but CUDA is not available")
    return device


def _dtype_name(name: str) -> str:
    if name.lower() not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose float32, bf16 or fp16")
    return DTYPES[name.lower()]


def parse_size(text) -> tuple[int, int]:
    """'1024' -> (1024, 1024); '1024x2048' -> (1024, 2048) (height x width)."""
    if isinstance(text, (tuple, list)):
        return int(text[0]), int(text[1])
    parts = str(text).lower().split("x")
    try:
        dims = [int(p) for p in parts]
    except ValueError:
        dims = []
    if len(dims) not in (1, 2) or min(dims) < 1:
        raise ValueError(f"size must be S or HxW with positive integers, got {text!r}")
    return (dims[0], dims[0]) if len(dims) == 1 else (dims[0], dims[1])


def size_label(size: tuple[int, int]) -> str:
    return f"{size[0]}" if size[0] == size[1] else f"{size[0]}x{size[1]}"


# ------------------------------------------------------------------------------------------- models
def model_spec(pair: str, role: str) -> tuple[str, dict]:
    name, kwargs = PAIRS[pair][role]
    kwargs = dict(kwargs)
    if role == "teacher":
        kwargs["dynamic_img_size"] = True  # any resolution; timm's fused SDPA stays on (its default)
    return name, kwargs


def build_model(pair: str, role: str, device="cpu", dtype=None):
    import timm
    import torch

    import vitlinearizer  # noqa: F401  (registers the students)

    name, kwargs = model_spec(pair, role)
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    return model.to(device=device, dtype=dtype if dtype is not None else torch.float32)


def token_count(pair: str, role: str, size: tuple[int, int]) -> int:
    name, kwargs = model_spec(pair, role)
    patch = kwargs.get("patch_size") or int(name.split("patch")[1].split("_")[0])
    return (size[0] // patch) * (size[1] // patch) + 1


def _flop_formulas() -> dict:
    """FLOP formulas for attention ops FlopCounterMode does not know (the CPU flash kernel)."""
    import torch
    from torch.utils.flop_counter import sdpa_flop_count

    def cpu_flash(query, key, value, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(query, key, value)

    ops = {}
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None:
        ops[op] = cpu_flash
    return ops


def count_flops(fn, *inputs) -> tuple[int, dict[str, int]]:
    """FLOPs of ``fn(*inputs)`` with FlopCounterMode: (total, {op name: flops})."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping=_flop_formulas()) as counter, torch.no_grad():
        fn(*inputs)
    by_op = {str(k): int(v) for k, v in counter.get_flop_counts().get("Global", {}).items()}
    return int(counter.get_total_flops()), by_op


def model_flops(pair: str, role: str, size: tuple[int, int], batch: int = 1) -> tuple[int, dict[str, int]]:
    """FLOPs of one inference forward, counted on the meta device (shapes only: fast at any size)."""
    import torch

    with torch.device("meta"):
        model = build_model(pair, role, device="meta")
        x = torch.empty(batch, 3, size[0], size[1])
    return count_flops(model, x)


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


# ------------------------------------------------------------------------------------------- workers
def _rss_now() -> int | None:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _max_rss() -> int:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def _setup(spec: dict):
    import torch

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    device = torch.device(spec["device"])
    dtype = getattr(torch, spec["dtype"])
    return torch, device, dtype


def _sync(torch, device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def worker_memory(spec: dict) -> dict:
    """One batch-1 forward of one model in this (fresh) process: peak memory and the time it took."""
    torch, device, dtype = _setup(spec)
    model = build_model(spec["pair"], spec["role"], device, dtype)
    x = torch.randn(1, 3, *spec["size"], device=device, dtype=dtype)
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        before = _rss_now()
    start = time.perf_counter()
    with torch.inference_mode():
        model(x)
    _sync(torch, device)
    elapsed = time.perf_counter() - start
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        kind = "cuda max_memory_allocated"
    else:
        peak = _max_rss()
        kind = "RSS high-water (getrusage)"
    return dict(peak_bytes=peak, before_bytes=before, act_bytes=None if before is None else peak - before,
                cold_s=elapsed, memory_kind=kind)


def worker_timing(spec: dict) -> dict:
    """Latency (batch 1) and throughput (batch ``tp_batch``) of the given roles, repetitions alternating."""
    torch, device, dtype = _setup(spec)
    roles = spec["roles"]
    models = {r: build_model(spec["pair"], r, device, dtype) for r in roles}
    out = {r: {} for r in roles}

    def timed(model, x):
        _sync(torch, device)
        start = time.perf_counter()
        model(x)
        _sync(torch, device)
        return time.perf_counter() - start

    with torch.inference_mode():
        for phase, batch, warmup, repeats in (("latency", 1, spec["warmup"], spec["repeats"]),
                                              ("throughput", spec.get("tp_batch", 0), spec.get("tp_warmup", 0),
                                               spec.get("tp_repeats", 0))):
            if not batch or not repeats:
                continue
            x = torch.randn(batch, 3, *spec["size"], device=device, dtype=dtype)
            for _ in range(warmup):
                for r in roles:
                    timed(models[r], x)
            times = {r: [] for r in roles}
            for rep in range(repeats):
                for r in (roles if rep % 2 == 0 else roles[::-1]):  # alternate who goes first
                    times[r].append(timed(models[r], x))
            for r in roles:
                out[r][phase] = dict(batch=batch, warmup=warmup, times_s=times[r])
            del x
    return out


def _worker_main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    task = {"memory": worker_memory, "timing": worker_timing}[spec["task"]]
    result = task(spec)
    Path(argv[1]).write_text(json.dumps(result))
    return 0


def run_worker(spec: dict, timeout: float | None = None) -> dict:
    """Run a worker task in a fresh ``python -m vitlinearizer.bench --worker`` process."""
    with tempfile.TemporaryDirectory(prefix="vl_bench_") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        env = dict(os.environ)
        src = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        if spec.get("omp_wait_policy", "inherit") != "inherit":
            env["OMP_WAIT_POLICY"] = spec["omp_wait_policy"].upper()
        proc = subprocess.run([sys.executable, "-m", "vitlinearizer.bench", "--worker", str(spec_path), str(out_path)],
                              env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not out_path.exists():
            tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-5:]
            raise RuntimeError(f"bench worker failed ({spec['task']}, rc={proc.returncode}): " + " | ".join(tail))
        return json.loads(out_path.read_text())


# ------------------------------------------------------------------------------------------- planning
def _configs(opts: BenchOptions):
    """(pair, size, dtype) in run order: every float32 configuration before any other dtype."""
    for dtype in opts.dtypes:
        for pair in opts.pairs:
            for size in sorted(opts.sizes, key=lambda s: s[0] * s[1]):
                yield pair, size, dtype


class RateBook:
    """Achieved FLOP rate per (model, dtype) from the measurements so far, to estimate what comes next."""

    def __init__(self, device: str):
        self.device, self.rates = device, {}

    def estimate(self, model: str, dtype: str, flops: int) -> float:
        rate = self.rates.get((model, dtype))
        if rate is None:  # the same dtype on another model, else the guess
            others = [r for (m, d), r in self.rates.items() if d == dtype]
            rate = min(others) if others else RATE_GUESS.get((self.device, dtype), 1e10)
        return flops / rate

    def update(self, model: str, dtype: str, flops: int, seconds: float | None) -> None:
        # Small inputs run far below the peak rate; only learn from forwards long enough to be representative.
        if seconds and seconds > 0.05:
            self.rates[(model, dtype)] = flops / seconds


def _startup_cost(device: str) -> float:
    return 8.0 if device == "cpu" else 20.0  # a fresh process importing torch + timm and building a model


def plan_lines(opts: BenchOptions) -> list[str]:
    rates = RateBook(opts.device)
    lines = [f"device {opts.device}, threads {opts.threads or 'default'}, budget {opts.time_budget:.0f} s/config, "
             f"max {opts.max_minutes:.1f} min"]
    for pair, size, dtype in _configs(opts):
        parts = []
        for role in ("student", "teacher"):
            name = model_spec(pair, role)[0]
            flops = model_flops(pair, role, size)[0]
            parts.append(f"{role} {name} {flops / 1e9:.1f} GFLOP ~{rates.estimate(name, dtype, flops):.1f} s")
        lines.append(f"{pair:5s} {size_label(size):>9s} {dtype:8s} " + "; ".join(parts))
    return lines


# ------------------------------------------------------------------------------------------- running
def _stats(times: list[float] | None) -> dict:
    if not times:
        return dict(min_s=None, median_s=None, n=0)
    ordered = sorted(times)
    return dict(min_s=ordered[0], median_s=ordered[len(ordered) // 2], n=len(ordered))


def _measure_config(opts: BenchOptions, pair: str, size: tuple[int, int], dtype: str, rates: RateBook,
                    deadline: float) -> dict:
    row = dict(pair=pair, size=size_label(size), height=size[0], width=size[1], dtype=dtype, notes=[])
    models = {}
    for role in ("student", "teacher"):
        name = model_spec(pair, role)[0]
        flops, by_op = model_flops(pair, role, size)
        models[role] = dict(model=name, tokens=token_count(pair, role, size), flops=flops, flops_by_op=by_op,
                            est_s=rates.estimate(name, dtype, flops))
    row.update(models)
    budget = min(opts.time_budget, max(0.0, deadline - time.time()))
    startup = _startup_cost(opts.device)
    # A model is measured only if one probe forward plus one timed forward fit the budget.
    active = [r for r in ("student", "teacher") if 2 * models[r]["est_s"] + 2 * startup <= budget]
    for role in ("student", "teacher"):
        if role not in active:
            models[role]["skipped"] = f"estimated {models[role]['est_s']:.0f} s per forward exceeds the budget"
    if not active:
        row["notes"].append("skipped: over the time budget")
        _derive(row)
        return row
    spent = time.time()
    per_forward = sum(models[r]["est_s"] for r in active)
    base = dict(pair=pair, size=list(size), dtype=dtype, device=opts.device, threads=opts.threads,
                omp_wait_policy=opts.omp_wait_policy)

    # Peak memory: a fresh process per model (CPU RSS high-water is per process).
    if opts.memory:
        for role in active:
            try:
                mem = run_worker(dict(base, task="memory", role=role), timeout=max(60.0, 20 * budget))
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                models[role]["memory_error"] = str(exc)[:300]
                continue
            models[role].update(peak_mb=mem["peak_bytes"] / 2**20,
                                act_mb=None if mem["act_bytes"] is None else mem["act_bytes"] / 2**20,
                                cold_s=mem["cold_s"], memory_kind=mem["memory_kind"])
            rates.update(models[role]["model"], dtype, models[role]["flops"], mem["cold_s"])
            models[role]["est_s"] = rates.estimate(models[role]["model"], dtype, models[role]["flops"])
        per_forward = sum(models[r]["est_s"] for r in active)

    # Latency (and throughput) in one process, repetitions alternating between the models.
    left = budget - (time.time() - spent) - startup
    warmup = opts.warmup if per_forward < 20 else 0  # a forward this long amortises its own warm-up
    repeats = max(0, min(opts.repeats, int(left // max(per_forward, 1e-9)) - warmup))
    if repeats < 1:
        for role in active:
            if models[role].get("cold_s") is not None:
                models[role]["latency"] = dict(_stats([models[role]["cold_s"]]), method="single cold forward")
        row["notes"].append("latency from the memory probe's single forward (budget)")
    else:
        tp_batch, tp_repeats = opts.batch, min(opts.repeats, 3)
        tp_cost = per_forward * tp_batch * (tp_repeats + 1)
        if opts.batch <= 1 or tp_cost > left - per_forward * (repeats + warmup):
            tp_batch = 0
            row["notes"].append(f"throughput skipped (estimated {tp_cost:.0f} s)" if opts.batch > 1 else "")
        spec = dict(base, task="timing", roles=active, warmup=warmup, repeats=repeats, tp_batch=tp_batch,
                    tp_warmup=1 if tp_batch else 0, tp_repeats=tp_repeats if tp_batch else 0)
        try:
            timing = run_worker(spec, timeout=max(120.0, 20 * budget))
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            row["notes"].append(f"timing failed: {str(exc)[:200]}")
            timing = {}
        for role, res in timing.items():
            lat = res.get("latency")
            if lat:
                models[role]["latency"] = dict(_stats(lat["times_s"]), method="interleaved", warmup=lat["warmup"],
                                               times_s=lat["times_s"])
                rates.update(models[role]["model"], dtype, models[role]["flops"], models[role]["latency"]["min_s"])
            tp = res.get("throughput")
            if tp:
                stats = _stats(tp["times_s"])
                models[role]["throughput"] = dict(stats, batch=tp["batch"], img_per_s=tp["batch"] / stats["min_s"],
                                                  times_s=tp["times_s"])
    row["notes"] = [n for n in row["notes"] if n]
    _derive(row)
    return row


def _lat(entry: dict | None) -> float | None:
    return ((entry or {}).get("latency") or {}).get("min_s")


def _derive(row: dict) -> None:
    s, t = row.get("student", {}), row.get("teacher", {})
    ls, lt = _lat(s), _lat(t)
    row["speedup"] = lt / ls if ls and lt else None
    row["ideal_speedup"] = t["flops"] / s["flops"] if s.get("flops") and t.get("flops") else None
    row["fraction_of_ideal"] = (row["speedup"] / row["ideal_speedup"]
                                if row["speedup"] and row["ideal_speedup"] else None)
    ts, tt = (s.get("throughput") or {}).get("img_per_s"), (t.get("throughput") or {}).get("img_per_s")
    row["throughput_ratio"] = ts / tt if ts and tt else None
    ms, mt = s.get("act_mb"), t.get("act_mb")
    row["act_mem_ratio"] = mt / ms if ms and mt and ms > 0 else None
    for role in ("student", "teacher"):
        entry = row.get(role) or {}
        lat = _lat(entry)
        entry["achieved_gflops"] = entry["flops"] / lat / 1e9 if lat and entry.get("flops") else None


def _environment(opts: BenchOptions) -> dict:
    import timm
    import torch

    env = dict(python=platform.python_version(), torch=torch.__version__, timm=timm.__version__,
               platform=platform.platform(), machine=platform.machine(), cpu_count=os.cpu_count(),
               threads=opts.threads or torch.get_num_threads(), device=opts.device,
               omp_wait_policy=(opts.omp_wait_policy if opts.omp_wait_policy != "inherit"
                                else os.environ.get("OMP_WAIT_POLICY", "unset")))
    try:
        env["load_average"] = os.getloadavg()
    except OSError:
        env["load_average"] = None
    try:
        with open("/proc/cpuinfo") as fh:
            env["cpu"] = next((l.split(":", 1)[1].strip() for l in fh if l.startswith("model name")), None)
    except OSError:
        env["cpu"] = platform.processor() or None
    if opts.device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
        try:
            from .ops.fla_bridge import fla_kernels

            env["fla"] = fla_kernels() is not None
        except Exception:  # pragma: no cover - reporting only
            env["fla"] = False
    try:
        teacher_attn = build_model("demo", "teacher", "meta").blocks[0].attn
        env["teacher_fused_attn"] = bool(getattr(teacher_attn, "fused_attn", False))
    except Exception:  # pragma: no cover - reporting only
        env["teacher_fused_attn"] = None
    return env


def run_bench(opts: BenchOptions, log=print) -> dict:
    start = time.time()
    deadline = start + opts.max_minutes * 60
    rates = RateBook(opts.device)
    rows = []
    for pair, size, dtype in _configs(opts):
        label = f"{pair} {size_label(size)} {dtype}"
        if time.time() >= deadline:
            row = dict(pair=pair, size=size_label(size), height=size[0], width=size[1], dtype=dtype,
                       notes=[f"skipped: --max-minutes {opts.max_minutes:g} reached"])
            for role in ("student", "teacher"):
                row[role] = dict(model=model_spec(pair, role)[0], tokens=token_count(pair, role, size))
            _derive(row)
            rows.append(row)
            log(f"[bench] {label}: skipped (run time budget)")
            continue
        t0 = time.time()
        row = _measure_config(opts, pair, size, dtype, rates, deadline)
        row["wall_s"] = time.time() - t0
        rows.append(row)
        log(f"[bench] {label}: " + _row_summary(row) + f" ({row['wall_s']:.0f} s)")
    results = dict(meta=dict(environment=_environment(opts), options=_options_dict(opts), total_s=time.time() - start,
                             created=time.strftime("%Y-%m-%d %H:%M:%S"), flops_note=FLOPS_NOTE),
                   rows=rows)
    results["slopes"] = compute_slopes(rows)
    return results


FLOPS_NOTE = ("FlopCounterMode on the meta device, batch 1: mm/addmm/bmm/baddbmm/convolution and attention "
              "(SDPA runs as two bmm on meta); element-wise ops, exp/cumsum of the recurrence and the depthwise "
              "conv (shifted multiply-adds) are not counted")


def _options_dict(opts: BenchOptions) -> dict:
    d = dict(opts.__dict__)
    d["sizes"] = [size_label(s) for s in opts.sizes]
    return d


def _row_summary(row: dict) -> str:
    s, t = _lat(row.get("student")), _lat(row.get("teacher"))
    fmt = lambda v: "-" if v is None else f"{v * 1e3:.1f} ms"  # noqa: E731
    text = f"student {fmt(s)}, teacher {fmt(t)}"
    if row.get("speedup"):
        text += f", speed-up {row['speedup']:.2f}x (ideal {row['ideal_speedup']:.2f}x)"
    return text


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
        # The large-input regime: the fit over inputs of at least 1024 tokens (64x64 patches).
        big = [p for p in timed if p[0] >= 4096]
        slope_big = fit_loglog_slope([p[0] for p in big], [p[1] for p in big])[0]
        mem_slope = fit_loglog_slope([p[0] for p in mem], [p[1] for p in mem])[0]
        out[key] = dict(model=s["model"], role=s["role"], dtype=s["dtype"], pair=s["pair"],
                        time_slope=_finite(slope), time_slope_large=_finite(slope_big),
                        memory_slope=_finite(mem_slope), points=len(timed))
    return out


def _finite(v: float) -> float | None:
    return None if v is None or not math.isfinite(v) else v


# ------------------------------------------------------------------------------------------- outputs
def _fmt_ms(v):
    return "–" if v is None else (f"{v * 1e3:.0f}" if v >= 1 else f"{v * 1e3:.1f}")


def _fmt(v, spec=".2f", suffix=""):
    return "–" if v is None else f"{v:{spec}}{suffix}"


def markdown_table(results: dict) -> str:
    env = results["meta"]["environment"]
    head = (f"Device: {env.get('gpu') or env.get('cpu') or env['device']} ({env['device']}, {env['threads']} threads, "
            f"OMP_WAIT_POLICY={env.get('omp_wait_policy')}), "
            f"torch {env['torch']}, timm {env['timm']}. Latency: batch 1, min over alternating repetitions "
            f"(n = repetitions); throughput: images/s at the given batch. Ideal = teacher FLOPs / student FLOPs. "
            f"Memory: peak minus pre-forward ({'CUDA allocator' if env['device'] == 'cuda' else 'process RSS'}), MB.")
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


def write_plot(results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    styles = {"float32": "-", "bfloat16": "--", "float16": ":"}
    for key, s in results.get("slopes", {}).items():
        pts = []
        for row in results["rows"]:
            entry = row.get(s["role"]) or {}
            if row["dtype"] == s["dtype"] and entry.get("model") == s["model"]:
                pts.append((entry.get("tokens"), _lat(entry), entry.get("act_mb")))
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
        ax.set_xlabel("tokens")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def default_tag(results: dict) -> str:
    env = results["meta"]["environment"]
    tag = f"bench_{env['device']}"
    if env.get("gpu"):
        tag += "_" + "".join(c if c.isalnum() else "_" for c in env["gpu"]).strip("_").lower()
    return tag


def write_outputs(results: dict, output_dir: Path, tag: str | None = None) -> list[Path]:
    output_dir.mkdir(parents=True, exist_ok=True)
    stem = tag or default_tag(results)
    json_path, md_path, png_path = (output_dir / f"{stem}.{ext}" for ext in ("json", "md", "png"))
    json_path.write_text(json.dumps(results, indent=1, default=str))
    md_path.write_text(markdown_table(results) + "\n")
    write_plot(results, png_path)
    return [json_path, md_path, png_path]


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        sys.exit(_worker_main(sys.argv[2:]))
    parser = argparse.ArgumentParser(prog="python -m vitlinearizer.bench")
    add_bench_arguments(parser)
    sys.exit(run_bench_from_args(parser.parse_args()))
