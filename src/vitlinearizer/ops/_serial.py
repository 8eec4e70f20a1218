"""Small CPU updates cut into pieces that ATen runs on the calling thread.

ATen hands an element-wise CPU op of more than ``ATEN_GRAIN_SIZE`` elements (``at::internal::GRAIN_SIZE``) to its
OpenMP threads. For the recurrences' per-chunk and per-token state updates (one state: ~50k floats for
Adventurer-S) that is a loss: waking the sleeping second thread costs ~50 us under ``OMP_WAIT_POLICY=PASSIVE``
(the benchmarks' policy) against ~8 us for the whole update on one thread (docs/performance.md, "The carry on the
calling thread"). A chain of such updates therefore runs piece by piece, each piece below the grain.
"""
from __future__ import annotations

import torch

ATEN_GRAIN_SIZE = 32768


def serial_slices(tensor: torch.Tensor, dim: int) -> list[slice]:
    """Slices of ``dim`` that cut ``tensor`` into pieces of at most ``ATEN_GRAIN_SIZE`` elements.

    One slice (the whole tensor) off the CPU, when the tensor is under the grain already, or when a single index
    of ``dim`` is above it (a large batch), where threads pay off.
    """
    rows = tensor.shape[dim]
    if tensor.device.type != "cpu" or tensor.numel() <= ATEN_GRAIN_SIZE:
        return [slice(None)]
    per_row = tensor.numel() // rows
    if per_row > ATEN_GRAIN_SIZE:
        return [slice(None)]
    step = ATEN_GRAIN_SIZE // per_row
    return [slice(start, start + step) for start in range(0, rows, step)]
