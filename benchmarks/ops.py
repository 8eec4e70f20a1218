"""Linear-recurrence kernel benchmark: naive / chunked / step (and on CUDA fla and torch.compile'd chunked).

Times ``vitlinearizer.ops.linear_recurrence`` forward (inference mode) for both decay kinds:

- ``mamba2``: per-head decay, Mamba-2 / Adventurer-S shapes: B=1, H=16 heads, N=64 (d_state), P=64 (head dim),
  one q/k group shared by all heads;
- ``gla``: per-key-channel decay, GLA shapes of a width-512 GLAMixer: B=1, H=4, N=64, P=128 (q/k per head);

at L in {197, 1025, 4097} (224², 512², 1024² at patch 16, plus the class token), and the chunked path over
chunk sizes (the data behind DEFAULT_CHUNK_SIZE_PER_HEAD / _PER_CHANNEL in ops/chunked.py).
Repetitions of the implementations alternate inside one process; the table reports the min (and median).

    .venv/bin/python benchmarks/ops.py                     # CPU, writes benchmarks/results/ops_cpu.{json,md}
    .venv/bin/python benchmarks/ops.py --device cuda       # + fla and torch.compile rows
    .venv/bin/python benchmarks/ops.py --quick             # smoke test (small L, 1 repetition; results/tmp/)
"""
from __future__ import annotations

import argparse
import json
import os

# The bench's short-spin OpenMP policy (vitlinearizer.bench.openmp), set before torch loads OpenMP.
os.environ.setdefault("GOMP_SPINCOUNT", "5000")
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from vitlinearizer.ops import linear_recurrence  # noqa: E402
from vitlinearizer.ops import chunked as chunked_mod  # noqa: E402
from vitlinearizer.ops.fla_bridge import fla_available  # noqa: E402
from vitlinearizer.bench import check_script_target, non_negative_int, positive_int  # noqa: E402
from vitlinearizer.bench.timing import alternating_times, summarize  # noqa: E402
from vitlinearizer.bench.openmp import OPENMP_VARIABLES  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

SHAPES = {
    "mamba2": dict(heads=16, groups=1, key_dim=64, value_dim=64, per_channel=False),
    "gla": dict(heads=4, groups=4, key_dim=64, value_dim=128, per_channel=True),
}


def make_inputs(kind: str, length: int, device, dtype=torch.float32, batch: int = 1, seed: int = 0):
    s = SHAPES[kind]
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, length, s["groups"], s["key_dim"], generator=gen) / s["key_dim"] ** 0.5
    k = torch.randn(batch, length, s["groups"], s["key_dim"], generator=gen)
    v = torch.randn(batch, length, s["heads"], s["value_dim"], generator=gen)
    shape = (batch, length, s["heads"], s["key_dim"]) if s["per_channel"] else (batch, length, s["heads"])
    # Decays as the models produce them at initialisation (Mamba-2: -dt*A, dt in [1e-3, 0.1], A in [1, 16]).
    log_decay = -(torch.rand(shape, generator=gen) * 0.2 + 0.005)
    return [t.to(device=device, dtype=dtype) for t in (q, k, v, log_decay)]


def implementations(inputs, device, chunk_sizes, include_slow: bool, compile_ok: bool) -> dict:
    q, k, v, a = inputs
    fns = {}
    if include_slow:
        fns["naive"] = lambda: linear_recurrence(q, k, v, a, impl="naive")
        fns["step"] = lambda: linear_recurrence(q, k, v, a, impl="step")
    for size in chunk_sizes:
        fns[f"chunked Q={size}"] = lambda size=size: linear_recurrence(q, k, v, a, impl="chunked", chunk_size=size)
    fns["chunked (default)"] = lambda: linear_recurrence(q, k, v, a, impl="chunked")
    fns["chunked exact (default)"] = lambda: chunked_mod.chunked_linear_recurrence(q, k, v, a, method="exact")
    if torch.device(device).type == "cuda":
        if fla_available(torch.device(device)):
            fns["fla"] = lambda: linear_recurrence(q, k, v, a, impl="fla")
        if compile_ok:
            # Under compilation the chunked kernel takes its exact method (no data-dependent branches).
            compiled = torch.compile(chunked_mod.chunked_linear_recurrence, dynamic=False)
            fns["chunked exact + torch.compile"] = lambda: compiled(q, k, v, a)
    return fns


def run(args) -> dict:
    device = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    lengths = args.lengths or ([33, 65] if args.quick else [197, 1025, 4097])
    chunk_sizes = args.chunk_sizes or ([16, 32] if args.quick else [16, 32, 64, 128])
    repeats = 1 if args.quick else args.repeats
    rows = []
    for kind in args.kinds:
        for length in lengths:
            inputs = make_inputs(kind, length, device, getattr(torch, args.dtype))
            fns = implementations(inputs, device, chunk_sizes, include_slow=not args.no_slow,
                                  compile_ok=not args.no_compile)
            # The slow loops get fewer repetitions at long L (they take seconds each).
            slow = {n: f for n, f in fns.items() if n in ("naive", "step")}
            fast = {n: f for n, f in fns.items() if n not in slow}
            t_fast = alternating_times(fast, repeats, device=device)
            t_slow = (alternating_times(slow, max(1, repeats // 3) if length > 1000 else repeats, warmup=0, device=device)
                      if slow else {})
            results = summarize({**t_slow, **t_fast})
            best = {n: r["min_s"] for n, r in results.items()}
            row = dict(kind=kind, length=length, **SHAPES[kind], results=results)
            if "naive" in best:
                row["speedup_vs_naive"] = {n: best["naive"] / b for n, b in best.items()}
            rows.append(row)
            print(f"{kind:6s} L={length:5d} " + "  ".join(f"{n}: {b * 1e3:.1f} ms" for n, b in best.items()),
                  flush=True)
    env = dict(device=device, device_name=torch.cuda.get_device_name() if device == "cuda" else platform.processor()
               or platform.machine(), threads=torch.get_num_threads(), torch=torch.__version__,
               python=platform.python_version(), dtype=args.dtype,
               default_chunk_per_head=chunked_mod.DEFAULT_CHUNK_SIZE_PER_HEAD,
               default_chunk_per_channel=chunked_mod.DEFAULT_CHUNK_SIZE_PER_CHANNEL,
               openmp={name: os.environ.get(name) for name in OPENMP_VARIABLES})
    try:
        with open("/proc/cpuinfo") as fh:
            env["cpu"] = next((l.split(":", 1)[1].strip() for l in fh if l.startswith("model name")), None)
    except OSError:
        pass
    return dict(meta=dict(environment=env, created=time.strftime("%Y-%m-%d %H:%M:%S"), command=sys.argv),
                rows=rows)


def markdown(results: dict) -> str:
    env = results["meta"]["environment"]
    lines = [f"Linear-recurrence forward, {env['dtype']}, {env['device']} ({env.get('cpu') or env['device_name']}, "
             f"{env['threads']} threads), torch {env['torch']}. Min over alternating repetitions, ms "
             f"(speed-up vs naive in brackets).", ""]
    names = []
    for row in results["rows"]:
        for n in row["results"]:
            if n not in names:
                names.append(n)
    lines.append("| kind | shape (H, N, P, groups) | L | " + " | ".join(names) + " |")
    lines.append("|---|---|---:|" + "---:|" * len(names))
    for row in results["rows"]:
        cells = []
        for n in names:
            r = row["results"].get(n)
            if r is None:
                cells.append("–")
                continue
            sp = (row.get("speedup_vs_naive") or {}).get(n)
            cells.append(f"{r['min_s'] * 1e3:.1f}" + (f" ({sp:.1f}x)" if sp and n != "naive" else ""))
        shape = f"{row['heads']}, {row['key_dim']}, {row['value_dim']}, {row['groups']}"
        lines.append(f"| {row['kind']} | {shape} | {row['length']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def resolve_output_dir(args) -> Path:
    # A smoke test must not overwrite the committed ops_cpu.{json,md} that README and docs quote; results/tmp/
    # is git-ignored.
    return Path(args.output_dir or (RESULTS / "tmp" if args.quick else RESULTS))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--kinds", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--lengths", nargs="+", type=positive_int, default=None)
    parser.add_argument("--chunk-sizes", nargs="+", type=positive_int, default=None)
    parser.add_argument("--repeats", type=positive_int, default=6)
    parser.add_argument("--threads", type=non_negative_int, default=2, help="torch.set_num_threads (0: torch's default)")
    parser.add_argument("--no-slow", action="store_true", help="skip naive and step")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (CUDA only anyway)")
    parser.add_argument("--quick", action="store_true", help="small L, one repetition (smoke test)")
    parser.add_argument("--output-dir", default=None,
                        help="default: benchmarks/results (with --quick: benchmarks/results/tmp, not committed)")
    parser.add_argument("--tag", default=None, help="file stem (default ops_<device>[_<gpu>])")
    args = parser.parse_args(argv)
    out = resolve_output_dir(args)
    check_script_target(parser, out, args.device)
    results = run(args)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.tag or ("ops_cpu" if args.device == "cpu" else
                        "ops_cuda_" + "".join(c if c.isalnum() else "_" for c in
                                               results["meta"]["environment"]["device_name"]).strip("_").lower())
    (out / f"{stem}.json").write_text(json.dumps(results, indent=1))
    (out / f"{stem}.md").write_text(markdown(results) + "\n")
    print(markdown(results))
    print(f"\nwrote {out / (stem + '.json')} and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
