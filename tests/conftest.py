"""Fixtures shared by several test modules."""
import ctypes
import gc

import pytest
import torch


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for a module that compares weights bit for bit: the thread count can change float
    summation order (and the forked engine workers run single-threaded, see _engine_worker.main)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def bench_worker_specs(monkeypatch):
    """Replaces bench's worker subprocess with one that times every forward at 0.5 s; returns the list of the
    specs it was given, to check what the scheduler asked for (warm-ups, repetitions)."""
    from vitlinearizer.bench import worker

    specs = []

    def fake_worker(spec, timeout=None):
        specs.append(spec)
        return {r: dict(latency=dict(batch=1, warmup=spec["warmup"], times_s=[0.5] * spec["repeats"]))
                for r in spec["roles"]}

    monkeypatch.setattr(worker, "run_worker", fake_worker)
    return specs


def _return_freed_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


@pytest.fixture
def freed_memory():
    """Hands the heap that earlier tests freed back to the OS, before and after the test. glibc keeps freed blocks
    in the process: the paper presets' dry runs (hundreds of millions of parameters, ~11 GB at their peak) left up
    to 6 GB resident each, and in one process with the rest of the suite that exhausted the CI machine's 24 GB."""
    _return_freed_memory()
    yield
    _return_freed_memory()
