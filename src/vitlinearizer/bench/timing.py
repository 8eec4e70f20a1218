"""Wall-clock timing of several implementations against each other, for the scripts in ``benchmarks/``.

Repetitions alternate between the implementations (and reverse their order every other round), so a slow
phase of a shared machine hits all of them alike; ratios taken from one call are then comparable.
"""
from __future__ import annotations

import time
from typing import Callable

import torch


def synchronize(device) -> None:
    """Wait for queued kernels, so that a timer brackets the work and not its launch."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def alternating_times(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1,
                      device="cpu") -> dict[str, list[float]]:
    """Seconds per call of each function, ``repeats`` calls each, under ``torch.inference_mode``."""
    times = {name: [] for name in fns}
    with torch.inference_mode():
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        for rep in range(repeats):
            order = list(fns.items())
            for name, fn in (order if rep % 2 == 0 else order[::-1]):
                synchronize(device)
                start = time.perf_counter()
                fn()
                synchronize(device)
                times[name].append(time.perf_counter() - start)
    return times


def summarize(times: dict[str, list[float]]) -> dict[str, dict]:
    """{name: {min_s, median_s, n}}: the minimum is the least disturbed run, the median shows the spread."""
    return {name: dict(min_s=min(ts), median_s=sorted(ts)[len(ts) // 2], n=len(ts)) for name, ts in times.items()}
