"""A signal to a run's whole process group (Ctrl-C in a terminal, `kill -TERM -PGID`, Slurm's scancel) reaches its
DataLoader workers too: the run must still checkpoint and exit as when only the main process is signalled."""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time

import pytest

import _engine_worker as W
from vitlinearizer.checkpoint import list_checkpoints, load_latest_checkpoint

FORK = multiprocessing.get_context("fork")  # torch is already imported: children start in milliseconds


def _group_leader(run_dir: str, cfg: dict) -> None:
    os.setsid()  # its own process group, as a batch job's: the group signal must not reach pytest
    W.main(run_dir, False, cfg, {"sleep": 0.05})


def _workers(pid: int) -> list[str]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return f.read().split()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_the_process_group_with_data_workers_checkpoints(tmp_path, sig):
    proc = FORK.Process(target=_group_leader, args=(str(tmp_path), {"save_every_steps": 2, "num_workers": 2}))
    proc.start()
    deadline = time.monotonic() + 60
    while not (list_checkpoints(tmp_path / "checkpoints") and len(_workers(proc.pid)) == 2):
        assert proc.is_alive(), f"worker exited early with {proc.exitcode}"
        assert time.monotonic() < deadline, "no checkpoint and data workers in time"
        time.sleep(0.01)
    os.killpg(proc.pid, sig)
    proc.join(60)
    if proc.is_alive():
        os.killpg(proc.pid, signal.SIGKILL)
        proc.join()
        pytest.fail("the run did not stop within 60 s")
    assert proc.exitcode == 128 + sig  # not 1: a DataLoader worker killed by the signal would crash the run
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["interrupted"] is True
    assert load_latest_checkpoint(tmp_path).step == summary["steps"] < 12  # saved where it stopped
