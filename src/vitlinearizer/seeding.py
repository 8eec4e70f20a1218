"""The other half of exact resumption (:mod:`vitlinearizer.checkpoint` holds the files): seeds derived from
integers, RNG state capture and restore, and a data order and per-sample augmentation randomness that depend only
on the checkpointed position, not on process history (worker count, earlier epochs).
"""
from __future__ import annotations

import math
import random
import signal
from typing import Any, Mapping

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

__all__ = ["capture_rng_state", "gather_rng_states", "seed_all", "restore_rng_state", "derive_seed",
           "EpochBatchSampler", "SeededDataset", "worker_ignore_sigint"]


# --------------------------------------------------------------------------- RNG state


def capture_rng_state() -> dict[str, Any]:
    """Snapshot torch/CUDA/python/numpy RNG states as ``weights_only``-loadable values."""
    version, internal, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": [version, list(internal), gauss],
        "numpy": [np_kind, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss],
    }


def gather_rng_states(world_size: int = 1) -> list[dict[str, Any]]:
    """:func:`capture_rng_state` of every rank, in rank order (a collective if ``world_size > 1``)."""
    if world_size == 1:
        return [capture_rng_state()]
    states: list = [None] * world_size
    torch.distributed.all_gather_object(states, capture_rng_state())
    return states


def seed_all(seed: int) -> None:
    """Seed torch (CPU and CUDA), python ``random`` and numpy from one integer."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        # A run resumed on fewer GPUs restores the devices that still exist.
        cuda = list(state["cuda"])[: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


# --------------------------------------------------------------------------- exact-resume data order
# A resumed run only matches an uninterrupted one if the batches and each sample's
# augmentation depend on the checkpointed position alone, not on process history.


def derive_seed(*parts: int) -> int:
    """A 63-bit seed mixed from non-negative integers."""
    # SeedSequence mixes well and, unlike hash(), is stable across runs and platforms.
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> 1)


class EpochBatchSampler(Sampler[list]):
    """Batches whose order is a pure function of ``(seed, epoch)``.

    Each epoch draws one global permutation; global batch ``t`` is the slice
    ``perm[t*B*W:(t+1)*B*W]`` and rank ``r`` takes its ``r``-th chunk of ``B``, so the
    ranks' batches together equal the single-process batch of ``B*W``. Only whole
    optimiser steps (``accum_steps`` micro-batches) are yielded. Elements are
    ``(epoch, index)`` pairs, so :class:`SeededDataset` knows the epoch inside workers.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, drop_last: bool = True, accum_steps: int = 1):
        self.n, self.batch_size, self.seed, self.rank, self.world_size = num_samples, batch_size, seed, rank, world_size
        gb = batch_size * world_size
        self.steps_per_epoch = (num_samples // gb if drop_last else math.ceil(num_samples / gb)) // accum_steps
        self.batches_per_epoch = self.steps_per_epoch * accum_steps
        self.epoch = self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch and skip its first ``start_batch`` micro-batches (resume)."""
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self):
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(derive_seed(self.seed, self.epoch)))
        perm, gb = perm.tolist(), self.batch_size * self.world_size
        for t in range(self.start_batch, self.batches_per_epoch):  # slicing, not iterating, skips
            chunk = perm[t * gb:(t + 1) * gb]
            if len(chunk) < gb and self.world_size > 1:  # pad like DistributedSampler
                chunk = (chunk + perm * math.ceil(gb / self.n))[:gb]
            yield [(self.epoch, i) for i in chunk[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]]

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch


class SeededDataset(Dataset):
    """Runs each sample's transform under RNGs seeded from ``(seed, epoch, index)``.

    torch (CPU), python ``random`` and numpy are seeded and the caller's states restored
    afterwards, so augmentation does not depend on the worker count or resume point, and
    the training loop's own random stream is untouched. Keys are ``(epoch, index)`` pairs
    (plain indices mean epoch 0).
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        s = derive_seed(self.seed, epoch, index)
        saved = torch.get_rng_state(), random.getstate(), np.random.get_state()
        torch.default_generator.manual_seed(s)  # not torch.manual_seed: that also reseeds CUDA
        random.seed(s)
        np.random.seed(s % 2**32)
        try:
            return self.dataset[index]
        finally:
            torch.set_rng_state(saved[0])
            random.setstate(saved[1])
            np.random.set_state(saved[2])


def worker_ignore_sigint(_: int) -> None:
    # Ctrl-C, `kill -TERM -PGID` and Slurm's scancel signal the whole process group; only the main process should
    # react: it checkpoints, then shuts the workers down. A worker that died first would crash it instead.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
