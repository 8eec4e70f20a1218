"""Audit of `vitlinearizer bench` and the benchmark scripts: FLOPs against a hand count, the CPU memory probe,
output directories that cannot be written, the warm-up rule. No wall-clock assertions."""
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch

from vitlinearizer import bench
from vitlinearizer.bench import worker
from vitlinearizer.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
UNWRITABLE = "/proc/self/bench_out"  # no file can be created in /proc/self, not even by root


def _adventurer_flops(tokens, dim, depth, d_state, head_dim, in_proj_out, mlp_hidden, patch_in, classes, chunk=64):
    """2*M*N*K per matmul of one batch-1 forward: patch GEMM, per block in_proj, the chunked recurrence (the
    heading token makes it tokens + 1 long; one unpadded chunk when it fits), out_proj and the SwiGLU, head."""
    positions, heads = tokens + 1, 2 * dim // head_dim
    q = min(chunk, positions)
    chunks = math.ceil(positions / q)
    rec = 2 * chunks * q * q * d_state + 2 * chunks * q * q * heads * head_dim  # scores, scores @ v
    if chunks > 1:  # chunk states k^T v and the inter-chunk product q @ state
        rec += 2 * 2 * chunks * q * d_state * heads * head_dim
    block = 2 * positions * dim * in_proj_out + rec + 2 * positions * 2 * dim * dim + 3 * 2 * tokens * dim * mlp_hidden
    return depth * block + 2 * (tokens - 1) * patch_in * dim + 2 * dim * classes


def _vit_flops(tokens, dim, depth, mlp_hidden, patch_in, classes):
    block = 2 * tokens * dim * 3 * dim + 4 * tokens * tokens * dim + 2 * tokens * dim * dim + 2 * 2 * tokens * dim * mlp_hidden
    return depth * block + 2 * (tokens - 1) * patch_in * dim + 2 * dim * classes


@pytest.mark.parametrize("size", [28, 56])
def test_demo_flops_match_a_hand_count(size):
    """At 56 px (198 positions: four chunks) the kernel adds q @ state with the in-place baddbmm_, which
    FlopCounterMode counted as 0: the student came out 2.7% low and the ideal speed-up 2.7% high."""
    tokens = (size // 4) ** 2 + 1
    # micro: width 192, d_state 32, head_dim 32: in_proj 384 + 448 + 12 = 844 outputs, padded to 848
    student = _adventurer_flops(tokens, 192, 6, 32, 32, 848, 480, 48, 10)
    teacher = _vit_flops(tokens, 192, 6, 768, 48, 10)
    assert bench.model_flops("demo", "student", (size, size))[0] == pytest.approx(student, rel=1e-3)
    assert bench.model_flops("demo", "teacher", (size, size))[0] == pytest.approx(teacher, rel=1e-3)


def test_in_place_matmuls_are_counted():
    a, b, c = torch.randn(2, 3, 4), torch.randn(2, 4, 5), torch.randn(2, 3, 5)
    assert bench.count_flops(lambda: c.baddbmm_(a, b))[0] == 2 * 2 * 3 * 4 * 5
    m, n, o = torch.randn(3, 4), torch.randn(4, 5), torch.randn(3, 5)
    assert bench.count_flops(lambda: o.addmm_(m, n))[0] == 2 * 3 * 4 * 5


class _SpikeThenSmallForward(torch.nn.Module):
    """Stands in for a model built in float32 and cast to bf16: memory touched and freed before the forward
    leaves the RSS high-water mark above the pre-forward RSS; the forward itself needs ~4 MB."""

    def forward(self, x):
        return torch.ones(1 << 20) + 1


def _memory_spec():
    return dict(pair="demo", role="student", size=[8, 8], dtype="float32", device="cpu", threads=1)


def _spiked_worker_memory(monkeypatch):
    def build(*args, **kwargs):
        spike = torch.ones(96 << 20, dtype=torch.uint8)  # 96 MB, written: resident, then given back
        del spike
        return _SpikeThenSmallForward()

    monkeypatch.setattr(worker, "build_model", build)
    return worker.worker_memory(_memory_spec())


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="Linux only")
def test_memory_probe_measures_the_forward_not_an_earlier_peak(monkeypatch):
    """The committed bf16 rows showed it: ViT-B / Adventurer-B at 224, 448 and 1024 all ~165 / ~190 MB (the
    freed float32 weights), memory slopes -0.01 and 0.03."""
    mem = _spiked_worker_memory(monkeypatch)
    assert "VmHWM" in mem["memory_kind"]
    assert mem["act_bytes"] < 48 << 20, mem
    assert mem["peak_bytes"] >= mem["before_bytes"]


def test_memory_probe_without_a_resettable_mark_reports_no_number(monkeypatch):
    monkeypatch.setattr(worker, "_reset_rss_peak", lambda: False)
    monkeypatch.setattr(worker, "_max_rss", lambda: 10 << 30)  # a mark set long before the forward
    mem = _spiked_worker_memory(monkeypatch)
    assert mem["act_bytes"] is None and "unknown" in mem["memory_kind"]


def _fake_row(opts, pair, size, dtype, rates, deadline):
    row = dict(pair=pair, size=bench.size_label(size), height=size[0], width=size[1], dtype=dtype, notes=[])
    for role in ("student", "teacher"):
        row[role] = dict(model=bench.model_label(pair, role), tokens=bench.token_count(pair, role, size),
                         flops=1e9, latency=dict(min_s=0.01, n=1))
    bench._derive(row)
    return row


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")
def test_unwritable_output_dir_fails_before_measuring(monkeypatch, capsys):
    def fail(*args, **kwargs):
        raise AssertionError("measured before the output directory was checked")

    monkeypatch.setattr(bench, "_measure_config", fail)
    rc = cli_main(["bench", "--device", "cpu", "--pairs", "demo", "--sizes", "32", "--output-dir", UNWRITABLE])
    assert rc == 2 and "cannot write in /proc/self" in capsys.readouterr().err
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import block_parts
        import distill_cost
        import ops as ops_bench
    finally:
        sys.path.pop(0)
    for main in (ops_bench.main, distill_cost.main, block_parts.main):
        with pytest.raises(SystemExit) as info:
            main(["--output-dir", UNWRITABLE])
        assert info.value.code == 2 and "cannot write" in capsys.readouterr().err, main


def test_a_failed_write_at_the_end_keeps_the_results(tmp_path, monkeypatch, capsys):
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(bench, "_measure_config", _fake_row)
    monkeypatch.setattr(bench, "write_outputs", disk_full)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    rc = cli_main(["bench", "--device", "cpu", "--pairs", "demo", "--sizes", "32", "--no-memory",
                   "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 1 and "could not write" in err
    (rescued,) = tmp_path.glob("vitlinearizer_bench_*.json")
    assert str(rescued) in err and json.loads(rescued.read_text())["rows"][0]["size"] == "32"


def test_benchmark_scripts_reject_bad_threads_and_repeats(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import block_parts
        import distill_cost
    finally:
        sys.path.pop(0)
    for main, argv, message in ((distill_cost.main, ["--threads", "-1"], "--threads: must be an integer >= 0"),
                                (block_parts.main, ["--threads", "-1"], "--threads: must be an integer >= 0"),
                                (block_parts.main, ["--repeats", "0"], "--repeats: must be an integer >= 1"),
                                (block_parts.main, ["--slabs", "-5"], "--slabs: must be an integer >= 0")):
        with pytest.raises(SystemExit) as info:
            main(argv + ["--output-dir", str(tmp_path)])
        assert info.value.code == 2 and message in capsys.readouterr().err, argv
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("teacher_s, warmup", [(16.0, 1), (25.0, 0)])
def test_warmup_is_dropped_only_for_a_forward_over_20_s(bench_worker_specs, teacher_s, warmup):
    """docs: "one warm-up forward each (none when a forward is estimated > 20 s)": per forward, not the pair's
    sum (5 s + 16 s dropped both warm-ups)."""
    specs = bench_worker_specs
    opts = bench.BenchOptions(pairs=["demo"], sizes=[(32, 32)], dtypes=["float32"], memory=False, device="cpu",
                              batch=1, repeats=1, time_budget=1000.0)
    rates = bench.RateBook("cpu")
    for role, seconds in (("student", 5.0), ("teacher", teacher_s)):
        rates.rates[(bench.model_label("demo", role), "float32")] = bench.model_flops("demo", role, (32, 32))[0] / seconds
    bench._measure_config(opts, "demo", (32, 32), "float32", rates, deadline=1e18)
    assert [s["warmup"] for s in specs] == [warmup]
