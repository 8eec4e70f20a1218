"""Wall-clock timing of several implementations against each other, for the scripts in ``benchmarks/``.

Repetitions alternate between the implementations, so a slow phase of a shared machine hits all of them alike;
ratios taken from one call are then comparable. The order rotates every round (and, for more than two, runs
backwards every other cycle of rounds), so that no implementation always runs next to the same one: a call
that frees a lot of memory can make the next one page-fault its buffers afresh, which a fixed order would
charge to one neighbour in every round.
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
        items = list(fns.items())
        for rep in range(repeats):
            shift = rep % len(items)
            order = items[shift:] + items[:shift]
            if len(items) > 2 and (rep // len(items)) % 2:
                order.reverse()
            for name, fn in order:
                synchronize(device)
                start = time.perf_counter()
                fn()
                synchronize(device)
                times[name].append(time.perf_counter() - start)
    return times


def summarize(times: dict[str, list[float]]) -> dict[str, dict]:
    """{name: {min_s, median_s, n}}: the minimum is the least disturbed run, the median shows the spread."""
    return {name: dict(min_s=min(ts), median_s=sorted(ts)[len(ts) // 2], n=len(ts)) for name, ts in times.items()}
