"""Fresh-process measurements of ``vitlinearizer bench``: peak memory and timing of a forward.

Each task runs in its own ``python -m vitlinearizer.bench.worker SPEC.json OUT.json`` process (``run_worker``),
so that the CPU RSS high-water mark belongs to one model and configuration and every timing starts cold.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .models import build_model
from .openmp import OPENMP_VARIABLES, openmp_env


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


def _reset_rss_peak() -> bool:
    """Start the process's RSS high-water mark (VmHWM) afresh at the current RSS (Linux clear_refs "5").

    Without it the mark after the forward may be one set BEFORE it: building the model in float32 and casting
    it to bf16 frees half the weights, so a bf16 forward that needs less than that never raises the mark, and
    "peak minus pre-forward RSS" measures the freed float32 weights at every size (flat memory curves).
    getrusage's ru_maxrss cannot be reset, hence VmHWM."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return _vm_hwm() is not None
    except OSError:
        return False


def _vm_hwm() -> int | None:
    try:
        with open("/proc/self/status") as fh:
            line = next((l for l in fh if l.startswith("VmHWM:")), None)
        return None if line is None else int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None


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
        reset = _reset_rss_peak()
        before = _rss_now()
        mark_before = None if reset else _max_rss()
    start = time.perf_counter()
    with torch.inference_mode():
        model(x)
    _sync(torch, device)
    elapsed = time.perf_counter() - start
    act = None
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        kind = "cuda max_memory_allocated"
    elif reset:
        peak = _vm_hwm()
        kind = "RSS high-water (VmHWM, reset before the forward)"
    else:
        peak = _max_rss()
        kind = "RSS high-water (getrusage)"
        if before is not None and mark_before > before:
            # The mark was already above the pre-forward RSS: peak - before would count memory freed before
            # the forward, and a forward below the old mark would not show at all.
            kind += "; set before the forward, so the forward's own peak is unknown"
            before = None
    if before is not None:
        act = peak - before
    return dict(peak_bytes=peak, before_bytes=before, act_bytes=act, cold_s=elapsed, memory_kind=kind)


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


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    task = {"memory": worker_memory, "timing": worker_timing}[spec["task"]]
    result = task(spec)
    result["openmp"] = {name: os.environ.get(name) for name in OPENMP_VARIABLES}  # as it ran
    Path(argv[1]).write_text(json.dumps(result))
    return 0


def run_worker(spec: dict, timeout: float | None = None) -> dict:
    """Run a worker task in a fresh ``python -m vitlinearizer.bench.worker`` process."""
    with tempfile.TemporaryDirectory(prefix="vl_bench_") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        env = openmp_env(spec.get("omp_wait_policy", "inherit"), dict(os.environ))
        src = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        proc = subprocess.run([sys.executable, "-m", "vitlinearizer.bench.worker", str(spec_path), str(out_path)],
                              env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not out_path.exists():
            # The exception is the traceback's last line; it leads, since the row's note keeps only the start.
            lines = [l for l in (proc.stderr or proc.stdout or "").strip().splitlines() if l.strip()]
            error = lines[-1].strip() if lines else "no output (killed?)"
            context = " | ".join(l.strip() for l in lines[-5:-1])
            raise RuntimeError(f"bench worker failed ({spec['task']}, rc={proc.returncode}): {error}"
                               + (f" [{context}]" if context else ""))
        return json.loads(out_path.read_text())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
