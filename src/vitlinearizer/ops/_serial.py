"""Small CPU updates cut into pieces that ATen runs on the calling thread, when OpenMP threads sleep at once.

ATen hands an element-wise CPU op of more than ``ATEN_GRAIN_SIZE`` elements (``at::internal::GRAIN_SIZE``) to its
OpenMP threads. Whether that pays for the recurrences' per-chunk and per-token state updates (one state: ~50k
floats for Adventurer-S) depends on what an idle OpenMP thread does (docs/performance.md, "The carry on the
calling thread"):

- it sleeps at once (``OMP_WAIT_POLICY=passive``): waking it costs ~50-70 us against ~8 us for the whole update
  on one thread, so a chain of such updates runs piece by piece, each piece below the grain;
- it spins first (torch's default, or any ``GOMP_SPINCOUNT``): two threads do the update in ~half the time, and
  pieces on the calling thread would only let the other one fall asleep (recurrent step path: 50 us per token
  whole against 123 us in pieces with ``GOMP_SPINCOUNT=5000``), so the update stays whole.

libgomp reads these variables once, when torch loads it; so does this module, when it is imported.
"""
from __future__ import annotations

import os

import torch

ATEN_GRAIN_SIZE = 32768


def threads_sleep_at_once(env) -> bool:
    """Whether libgomp's idle threads sleep without spinning under ``env``. ``GOMP_SPINCOUNT`` (a count with an
    optional k/M/G/T suffix, or "infinite") takes precedence over ``OMP_WAIT_POLICY``, whose ``passive`` means 0."""
    spins = env.get("GOMP_SPINCOUNT", "").strip().lower()
    if spins:
        return spins.rstrip("kmgt").strip() == "0"
    return env.get("OMP_WAIT_POLICY", "").strip().lower() == "passive"


SERIAL_UPDATES = threads_sleep_at_once(os.environ)


def serial_slices(tensor: torch.Tensor, dim: int) -> list[slice]:
    """Slices of ``dim`` that cut ``tensor`` into pieces of at most ``ATEN_GRAIN_SIZE`` elements.

    One slice (the whole tensor) unless ``SERIAL_UPDATES``; off the CPU; when the tensor is under the grain
    already; or when a single index of ``dim`` is above it (a large batch), where threads pay off.
    """
    rows = tensor.shape[dim]
    if not SERIAL_UPDATES or tensor.device.type != "cpu" or tensor.numel() <= ATEN_GRAIN_SIZE:
        return [slice(None)]
    per_row = tensor.numel() // rows
    if per_row > ATEN_GRAIN_SIZE:
        return [slice(None)]
    step = ATEN_GRAIN_SIZE // per_row
    return [slice(start, start + step) for start in range(0, rows, step)]
