"""Correctness of the GPU recurrence paths: impl='fla' and impl='chunked' on CUDA against the naive loop.

For per-head (Mamba-2), per-channel (GLA) and scalar-state (HGRN: N = P = 1, one head per channel) recurrences, odd lengths, with and without a carried state, in
float32 and bfloat16 inputs, it compares outputs, final states and the gradients of q, k, v, log_decay and
the initial state with the naive float32 loop (relative RMS error, as fla's own tests measure it), and
times each path once at Adventurer-S shapes of each kind. Writes ``gpu_check_<device>.json`` and exits 1 if a
check fails.

``--dry-run`` runs the same code on the CPU at tiny sizes (no fla): what tests/test_bench.py exercises, so
the script is known to run before a GPU machine is lent.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from vitlinearizer.ops import linear_recurrence  # noqa: E402
from vitlinearizer.ops.fla_bridge import fla_available  # noqa: E402

# (heads, groups, key_dim, value_dim, per_channel) per kind of recurrence, for real runs and for --dry-run.
KINDS = {
    "per_head": ((16, 1, 64, 64, False), (4, 1, 8, 8, False)),  # Mamba-2, Adventurer-S
    "per_channel": ((16, 16, 64, 64, True), (4, 4, 8, 8, True)),  # GLA
    "scalar": ((384, 1, 1, 1, False), (6, 1, 1, 1, False)),  # HGRN at width 384: fla's element-wise kernel
}

# Relative RMS error bounds vs the float32 naive loop (fla's tests use ~1e-3..5e-3 for fp32, more for bf16).
TOL = {torch.float32: 5e-3, torch.bfloat16: 3e-2}


def rel_err(ref: torch.Tensor, other: torch.Tensor) -> float:
    """Relative RMS error; the 1e-3 floor covers gradients that are exactly zero (L=1 without a state)."""
    ref, other = ref.double(), other.double()
    return ((ref - other).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-3)).item()


def make_case(batch, length, heads, groups, key_dim, value_dim, per_channel, device, dtype, with_state, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, length, groups, key_dim, generator=gen) / key_dim ** 0.5
    k = torch.randn(batch, length, groups, key_dim, generator=gen) / key_dim ** 0.5
    v = torch.randn(batch, length, heads, value_dim, generator=gen)
    shape = (batch, length, heads, key_dim) if per_channel else (batch, length, heads)
    a = -(torch.rand(shape, generator=gen) * 0.3 + 0.01)
    s0 = torch.randn(batch, heads, key_dim, value_dim, generator=gen) if with_state else None
    tensors = [q, k, v, a] + ([s0] if with_state else [])
    return [t.to(device=device, dtype=dtype if i < 3 else torch.float32).requires_grad_()
            for i, t in enumerate(tensors)]


def run_impl(impl, inputs, seed=1):
    state = inputs[4] if len(inputs) == 5 else None
    y, final = linear_recurrence(*inputs[:4], initial_state=state, return_final_state=True, impl=impl)
    gen = torch.Generator().manual_seed(seed)
    dy = torch.randn(y.shape, generator=gen).to(y)
    dstate = torch.randn(final.shape, generator=gen).to(final)
    grads = torch.autograd.grad((y.float() * dy.float()).sum() + (final * dstate).sum(), inputs)
    return y, final, grads


def check(device: str, impls: list[str], dry: bool) -> list[dict]:
    names = ["q", "k", "v", "log_decay", "initial_state"]
    lengths = [1, 37] if dry else [1, 63, 197, 1025]
    cases = []
    for kind, shapes in KINDS.items():
        heads, groups, key_dim, value_dim, per_channel = shapes[1 if dry else 0]
        for length in lengths:
            for with_state in (False, True):
                for dtype in (torch.float32, torch.bfloat16):
                    inputs = make_case(2, length, heads, groups, key_dim, value_dim, per_channel, device, dtype,
                                       with_state, seed=length)
                    ref_inputs = [t.detach().float().requires_grad_() for t in inputs]
                    y_ref, s_ref, g_ref = run_impl("naive", ref_inputs)
                    for impl in impls:
                        entry = dict(impl=impl, kind=kind, length=length, with_state=with_state,
                                     dtype=str(dtype).replace("torch.", ""))
                        try:
                            y, s, grads = run_impl(impl, inputs)
                            errs = dict(y=rel_err(y_ref, y), state=rel_err(s_ref, s))
                            errs.update({f"d{n}": rel_err(a, b) for n, a, b in zip(names, g_ref, grads)})
                            entry["errors"] = errs
                            entry["ok"] = max(errs.values()) <= TOL[dtype]
                        except Exception as exc:  # report, do not stop the other checks
                            entry.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:300])
                        cases.append(entry)
    return cases


def timings(device: str, impls: list[str], dry: bool) -> list[dict]:
    out = []
    length = 65 if dry else 4097
    for kind, shapes in KINDS.items():
        for dtype in (torch.float32, torch.bfloat16):
            inputs = [t.detach() for t in make_case(1, length, *shapes[1 if dry else 0], device, dtype, False, 0)]
            for impl in impls:
                try:
                    with torch.inference_mode():
                        linear_recurrence(*inputs, impl=impl)
                        if device == "cuda":
                            torch.cuda.synchronize()
                        best = float("inf")
                        for _ in range(1 if dry else 10):
                            start = time.perf_counter()
                            linear_recurrence(*inputs, impl=impl)
                            if device == "cuda":
                                torch.cuda.synchronize()
                            best = min(best, time.perf_counter() - start)
                    out.append(dict(impl=impl, kind=kind, length=length,
                                    dtype=str(dtype).replace("torch.", ""), min_ms=best * 1e3))
                except Exception as exc:
                    out.append(dict(impl=impl, kind=kind, error=f"{type(exc).__name__}: {exc}"[:300]))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, no fla: a smoke test of this script")
    parser.add_argument("--output-dir", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (default: 1 with --dry-run, else torch's)")
    args = parser.parse_args(argv)
    device = "cpu" if args.dry_run else args.device
    if args.threads or args.dry_run:
        torch.set_num_threads(args.threads or 1)
    if device == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available; use --dry-run on a CPU machine", file=sys.stderr)
        return 2
    impls = ["chunked"]
    if device == "cuda" and fla_available(torch.device("cuda")):
        impls.append("fla")
    elif device == "cuda":
        print("warning: fla-core not importable; only impl='chunked' is checked on CUDA", file=sys.stderr)
    cases = check(device, impls, args.dry_run)
    result = dict(device=device, device_name=torch.cuda.get_device_name() if device == "cuda" else "cpu",
                  torch=torch.__version__, impls=impls, dry_run=args.dry_run,
                  passed=sum(c["ok"] for c in cases), failed=[c for c in cases if not c["ok"]], cases=cases,
                  timings=timings(device, impls + ["naive"] if args.dry_run else impls, args.dry_run))
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = "gpu_check_cpu_dry.json" if args.dry_run else "gpu_check_" + "".join(
        c if c.isalnum() else "_" for c in result["device_name"]).strip("_").lower() + ".json"
    (out / name).write_text(json.dumps(result, indent=1))
    print(f"{result['passed']}/{len(cases)} checks passed ({', '.join(impls)} vs naive on {device}); wrote {out / name}")
    for c in result["failed"]:
        print("FAILED", {k: c[k] for k in c if k != "errors"}, c.get("errors"))
    for t in result["timings"]:
        print("time", t)
    return 0 if not result["failed"] else 1


if __name__ == "__main__":
    sys.exit(main())
