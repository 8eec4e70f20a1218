"""Fixtures shared by several test modules."""
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
