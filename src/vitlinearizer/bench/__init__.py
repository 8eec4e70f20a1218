"""``vitlinearizer bench``: speed, FLOPs and peak memory vs resolution, student vs teacher.

For pairs of equal depth (and width, except ``small``: Adventurer-S is 512 wide, ViT-S 384; ``small384`` is
Adventurer-S built 384 wide against ViT-S), at each input size and dtype, it measures

- latency at batch 1: both models in ONE fresh process (``bench.worker``), repetitions alternating
  student/teacher (so both see the same background load), reported as min and median;
- throughput at ``--batch`` images per forward, the same way (skipped where the time budget does not allow);
- peak memory of one batch-1 forward: on CPU the RSS high-water mark of a FRESH subprocess per model and
  configuration (VmHWM, reset just before the forward; ``resource.getrusage`` where it cannot be reset),
  minus the RSS just before the forward (``act_mb``); on CUDA
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
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..checkpoint import check_output_dir, check_writable
from ..data import parse_size
from .models import (PAIRS, build_model, count_flops, model_flops, model_label, model_spec, token_count,
                     token_patch)
from .openmp import OMP_POLICIES, SHORT_SPIN_COUNT, describe_openmp_env
from .report import _lat, compute_slopes, fit_loglog_slope, markdown_table, write_outputs, write_plot

__all__ = ["PAIRS", "BenchOptions", "add_bench_arguments", "build_model", "compute_slopes", "count_flops",
           "fit_loglog_slope", "markdown_table", "model_flops", "model_label", "model_spec", "parse_size",
           "plan_lines", "run_bench", "run_bench_from_args", "token_count", "write_outputs", "write_plot"]

DEFAULT_SIZES = ("224", "448", "768", "1024", "2048", "1024x2048")
DTYPES = {"float32": "float32", "fp32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
          "fp16": "float16", "float16": "float16"}
# First guesses of the achieved FLOP rate, used to budget a configuration before anything was measured.
RATE_GUESS = {("cpu", "float32"): 40e9, ("cpu", "bfloat16"): 6e9, ("cpu", "float16"): 3e9,
              ("cuda", "float32"): 20e12, ("cuda", "bfloat16"): 150e12, ("cuda", "float16"): 150e12}
# Not benchmarks/results: a quick run would overwrite the results the repository publishes (pass --output-dir
# benchmarks/results to update those on purpose).
DEFAULT_OUTPUT_DIR = "runs/bench"
QUICK = dict(pairs=["demo"], sizes=["32", "64"], dtypes=["float32"], repeats=2, batch=2, warmup=1,
             time_budget=60.0, max_minutes=3.0)


# ------------------------------------------------------------------------------------------- CLI
def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``vitlinearizer bench`` (documented in docs/performance.md)."""
    parser.add_argument("--pairs", nargs="+", choices=sorted(PAIRS), default=argparse.SUPPRESS, metavar="PAIR",
                        help="student/teacher pairs: small (Adventurer-S, 512 wide, vs ViT-S/16, 384 wide), "
                             "small384 (Adventurer-S built 384 wide vs ViT-S/16: equal width and depth), base "
                             "(Adventurer-B vs ViT-B/16), demo (adventurer_micro_patch4_28 vs a 6-block ViT, width "
                             "192, patch 4) (default: small small384 demo base)")
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
    parser.add_argument("--omp-wait-policy", choices=OMP_POLICIES, default=argparse.SUPPRESS,
                        help="how idle OpenMP threads of the measuring processes wait (default on CPU: short-spin, "
                             f"GOMP_SPINCOUNT={SHORT_SPIN_COUNT}: they spin ~50 us, then sleep; passive: they sleep "
                             "at once, and every parallel op pays a wake-up; active: they spin; inherit: the "
                             "environment as it is, i.e. torch's default ~3 ms spin; docs/performance.md)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR, help="where the JSON/markdown/plot go")
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
    print(markdown_table(results))
    try:
        paths = write_outputs(results, Path(opts.output_dir), opts.tag)
    except OSError as exc:
        # The directory was writable at the start; the measurements (up to an hour) must not go with it.
        rescue = rescue_results(results)
        print(f"vitlinearizer bench: could not write to --output-dir {opts.output_dir}: {exc}; the results are in "
              f"{rescue}", file=sys.stderr)
        return 1
    print("\nwrote " + ", ".join(str(p) for p in paths))
    if results["meta"].get("interrupted_at"):
        print(f"interrupted at {results['meta']['interrupted_at']}: the files hold the rows measured before it",
              file=sys.stderr)
        return 130
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
    omp_wait_policy: str = "short-spin"
    output_dir: str = DEFAULT_OUTPUT_DIR
    tag: str | None = None
    command: list[str] = field(default_factory=list)

    def __post_init__(self):
        # The CLI's options and ones built in Python alike; all before anything is measured, since the outputs
        # are written only at the end of a run that can take an hour.
        check_sizes(self.pairs, self.sizes)
        if self.batch < 1 or self.repeats < 1 or self.warmup < 0:
            raise ValueError("--batch and --repeats must be >= 1 and --warmup >= 0")
        if self.threads is not None and self.threads < 0:
            # Every measuring process would fail in torch.set_num_threads, each row only noting "timing failed".
            raise ValueError(f"--threads must be >= 1 (or 0 for torch's default), got {self.threads}")
        for flag, value in (("--time-budget", self.time_budget), ("--max-minutes", self.max_minutes)):
            if not value > 0:  # also NaN; 0 or less would skip every configuration
                raise ValueError(f"{flag} must be > 0, got {value:g}")
        if self.tag is not None:
            check_tag(self.tag)
        if self.omp_wait_policy not in OMP_POLICIES:
            raise ValueError(f"omp_wait_policy must be one of {', '.join(OMP_POLICIES)}, got {self.omp_wait_policy!r}")

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
            pairs=list(pick("pairs", ["small", "small384", "demo", "base"])),
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
            omp_wait_policy=getattr(args, "omp_wait_policy", None) or ("short-spin" if cpu else "inherit"),
            output_dir=args.output_dir,
            tag=getattr(args, "tag", None),
            command=sys.argv[:],
        )
        check_output_dir(opts.output_dir, "--output-dir")
        check_writable(opts.output_dir, "--output-dir")
        return opts


def check_sizes(pairs, sizes) -> None:
    """Fail before anything is measured: a size that does not fit a pair's patch would otherwise stop the run
    at its first configuration, after the ones before it were measured, and nothing would be written."""
    from ..models.adventurer import patch_grid

    for pair in pairs:
        for size in sizes:
            for role in ("student", "teacher"):
                patch = token_patch(pair, role)
                try:
                    patch_grid(size[0], size[1], (patch, patch))
                except ValueError as exc:
                    raise ValueError(f"--sizes {size_label(size)} for pair {pair}: {exc}") from None


def check_tag(tag: str) -> None:
    """--tag names the output files inside --output-dir: a plain file-name stem (ValueError otherwise)."""
    if not tag or tag in (".", "..") or any(sep in tag for sep in ("/", "\\", "\0")):
        raise ValueError(f"--tag {tag!r} must be a plain file-name stem (no '/', not empty); choose the directory "
                         "with --output-dir")


def rescue_results(results: dict) -> Path:
    """The run's JSON in the temporary directory, for when --output-dir failed at the end."""
    import json
    import tempfile

    fd, name = tempfile.mkstemp(prefix="vitlinearizer_bench_", suffix=".json")
    with os.fdopen(fd, "w") as fh:
        json.dump(results, fh, indent=1, default=str)
    return Path(name)


def check_script_target(parser: argparse.ArgumentParser, output_dir: Path, device: str) -> None:
    """The benchmark scripts' checks before measuring: an output directory that can be written at the end and
    a device that exists (a parser error, exit 2, otherwise)."""
    try:
        check_output_dir(output_dir, "--output-dir")
        check_writable(output_dir, "--output-dir")
    except ValueError as exc:
        parser.error(str(exc))
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            parser.error(f"--device {device}: CUDA is not available here; use --device cpu")


def non_negative_int(text: str) -> int:
    """argparse type of counts where 0 means something (e.g. --threads 0: torch's default)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type of sizes and repetition counts."""
    value = non_negative_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


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


def size_label(size: tuple[int, int]) -> str:
    return f"{size[0]}" if size[0] == size[1] else f"{size[0]}x{size[1]}"


# ------------------------------------------------------------------------------------------- planning
def _configs(opts: BenchOptions):
    """(pair, size, dtype) in run order: on CPU every float32 configuration before any other dtype, whatever the
    order of --dtypes (emulated bf16 is ~6x slower there and would spend --max-minutes first); on CUDA the
    order given (benchmarks/gpu.sh puts bf16, the fast path there, first)."""
    dtypes = opts.dtypes
    if opts.device == "cpu":
        dtypes = sorted(dtypes, key=lambda d: d != "float32")
    for dtype in dtypes:
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
            name = model_label(pair, role)
            flops = model_flops(pair, role, size)[0]
            parts.append(f"{role} {name} {flops / 1e9:.1f} GFLOP ~{rates.estimate(name, dtype, flops):.1f} s")
        lines.append(f"{pair:8s} {size_label(size):>9s} {dtype:8s} " + "; ".join(parts))
    return lines


# ------------------------------------------------------------------------------------------- running
def _stats(times: list[float] | None) -> dict:
    if not times:
        return dict(min_s=None, median_s=None, n=0)
    ordered = sorted(times)
    return dict(min_s=ordered[0], median_s=ordered[len(ordered) // 2], n=len(ordered))


def _measure_config(opts: BenchOptions, pair: str, size: tuple[int, int], dtype: str, rates: RateBook,
                    deadline: float) -> dict:
    # Not a top-level import: `python -m vitlinearizer.bench.worker` imports this package first, and runpy
    # warns when the module it is about to run as __main__ is already in sys.modules.
    from .worker import run_worker

    row = dict(pair=pair, size=size_label(size), height=size[0], width=size[1], dtype=dtype, notes=[])
    models = {}
    for role in ("student", "teacher"):
        name = model_label(pair, role)
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
    # A forward this long amortises its own warm-up: per model, as documented, not the pair's sum (a 5 s student
    # next to a 16 s teacher would lose both warm-ups).
    warmup = opts.warmup if max(models[r]["est_s"] for r in active) < 20 else 0
    repeats = max(0, min(opts.repeats, int(left // max(per_forward, 1e-9)) - warmup))
    if repeats < 1 and any(models[r].get("cold_s") is None for r in active):
        # No probe forward to fall back on (--no-memory, or the probe failed): one cold repetition, the
        # documented minimum, rather than a row without any latency.
        warmup, repeats = 0, 1
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
               omp_wait_policy=describe_openmp_env(opts.omp_wait_policy, dict(os.environ)))
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
            from ..ops.fla_bridge import fla_kernels

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
    rows, interrupted_at = [], None
    for pair, size, dtype in _configs(opts):
        label = f"{pair} {size_label(size)} {dtype}"
        if time.time() >= deadline:
            row = dict(pair=pair, size=size_label(size), height=size[0], width=size[1], dtype=dtype,
                       notes=[f"skipped: --max-minutes {opts.max_minutes:g} reached"])
            for role in ("student", "teacher"):
                row[role] = dict(model=model_label(pair, role), tokens=token_count(pair, role, size))
            _derive(row)
            rows.append(row)
            log(f"[bench] {label}: skipped (run time budget)")
            continue
        t0 = time.time()
        try:
            row = _measure_config(opts, pair, size, dtype, rates, deadline)
        except KeyboardInterrupt:  # a long run stopped by hand keeps what it measured
            interrupted_at = label
            log(f"[bench] {label}: interrupted")
            break
        row["wall_s"] = time.time() - t0
        rows.append(row)
        log(f"[bench] {label}: " + _row_summary(row) + f" ({row['wall_s']:.0f} s)")
    results = dict(meta=dict(environment=_environment(opts), options=_options_dict(opts), total_s=time.time() - start,
                             created=time.strftime("%Y-%m-%d %H:%M:%S"), flops_note=FLOPS_NOTE,
                             interrupted_at=interrupted_at),
                   rows=rows)
    results["slopes"] = compute_slopes(rows)
    return results


FLOPS_NOTE = ("FlopCounterMode on the meta device, batch 1: mm/addmm/bmm/baddbmm (also in place)/convolution and attention "
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


