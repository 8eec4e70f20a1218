"""`vitlinearizer bench` and the benchmark scripts: they run end to end at tiny sizes and write valid outputs.
No wall-clock assertions: timings on a shared CPU are only checked for being present and positive."""
import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vitlinearizer import bench
from vitlinearizer.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_quick_cli_end_to_end_writes_json_markdown_and_plot(tmp_path, capsys):
    rc = cli_main(["bench", "--quick", "--sizes", "32", "--threads", "1", "--output-dir", str(tmp_path),
                   "--tag", "quick"])
    assert rc == 0
    data = json.loads((tmp_path / "quick.json").read_text())
    (row,) = data["rows"]
    assert row["pair"] == "demo" and row["size"] == "32" and row["dtype"] == "float32"
    for role in ("student", "teacher"):
        entry = row[role]
        assert entry["flops"] > 0 and entry["tokens"] == 65
        assert entry["latency"]["n"] == 2 and entry["latency"]["min_s"] > 0
        assert entry["throughput"]["batch"] == 2 and entry["throughput"]["img_per_s"] > 0
        assert entry["peak_mb"] > 0 and entry["act_mb"] is not None  # fresh-process RSS high-water
    assert row["speedup"] > 0 and row["ideal_speedup"] == pytest.approx(row["teacher"]["flops"] / row["student"]["flops"])
    assert data["meta"]["environment"]["teacher_fused_attn"] is True
    md = (tmp_path / "quick.md").read_text()
    assert "| pair | size | tokens |" in md and "| demo | 32 | 65 | float32 |" in md and "ideal" in md
    assert (tmp_path / "quick.png").read_bytes()[:8] == PNG_MAGIC
    assert "speed-up" in capsys.readouterr().out


def test_default_output_is_not_the_published_results(tmp_path):
    """A plain `vitlinearizer bench` writes under runs/bench, never over benchmarks/results; --output-dir still
    chooses."""
    from vitlinearizer.cli import build_parser

    opts = bench.BenchOptions.from_args(build_parser().parse_args(["bench", "--device", "cpu"]))
    assert opts.output_dir == "runs/bench" == bench.BenchOptions(pairs=[], sizes=[], dtypes=[]).output_dir
    explicit = build_parser().parse_args(["bench", "--device", "cpu", "--output-dir", str(tmp_path)])
    assert bench.BenchOptions.from_args(explicit).output_dir == str(tmp_path)


def test_budget_skips_are_marked_without_running_anything(tmp_path):
    opts = bench.BenchOptions(pairs=["demo"], sizes=[(512, 512)], dtypes=["float32"], time_budget=1.0,
                              max_minutes=1.0, device="cpu", output_dir=str(tmp_path))
    results = bench.run_bench(opts, log=lambda *_: None)
    (row,) = results["rows"]
    assert "skipped" in row["student"] and "skipped" in row["teacher"] and row["speedup"] is None
    assert row["teacher"]["flops"] > 3 * row["student"]["flops"]  # quadratic attention at 16385 tokens
    paths = bench.write_outputs(results, tmp_path, "skip")
    assert "skipped" in paths[1].read_text() and paths[2].read_bytes()[:8] == PNG_MAGIC


def test_flop_counter_counts_a_known_matmul_and_cpu_attention():
    a, b = torch.randn(3, 5), torch.randn(5, 7)
    total, by_op = bench.count_flops(lambda x, y: x @ y, a, b)
    assert total == 2 * 3 * 5 * 7 and by_op == {"aten.mm": 2 * 3 * 5 * 7}
    linear = torch.nn.Linear(5, 4)
    assert bench.count_flops(linear, torch.randn(2, 6, 5))[0] == 2 * 12 * 5 * 4
    # Attention on real CPU tensors runs the flash kernel, which FlopCounterMode only counts through our formula.
    q = torch.randn(1, 2, 9, 4)
    total, _ = bench.count_flops(F.scaled_dot_product_attention, q, q, q)
    assert total == 2 * (2 * 1 * 2 * 9 * 9 * 4)


def test_model_flops_on_meta_count_the_recurrence_matmuls():
    total, by_op = bench.model_flops("demo", "student", (32, 32))
    assert total > 0 and "aten.bmm" in by_op  # the chunked kernel's intra-chunk and state products
    t_total, t_by_op = bench.model_flops("demo", "teacher", (32, 32))
    assert "aten.bmm" in t_by_op  # attention (SDPA decomposes to bmm on the meta device)


def test_loglog_slope_fit_on_synthetic_data():
    xs = [100, 400, 1600, 6400]
    slope, intercept = bench.fit_loglog_slope(xs, [3.0 * x**1.5 for x in xs])
    assert slope == pytest.approx(1.5) and intercept == pytest.approx(math.log(3.0))
    noisy = [2.0 * x * f for x, f in zip(xs, [1.05, 0.95, 1.02, 0.98])]
    assert bench.fit_loglog_slope(xs, noisy)[0] == pytest.approx(1.0, abs=0.05)
    assert math.isnan(bench.fit_loglog_slope([10], [1.0])[0])
    rows = [dict(pair="p", dtype="float32", student=dict(model="s", tokens=n, latency=dict(min_s=1e-3 * n), act_mb=0.5 * n),
                 teacher=dict(model="t", tokens=n, latency=dict(min_s=1e-6 * n * n))) for n in (1024, 4096, 16384)]
    slopes = bench.compute_slopes(rows)
    assert slopes["s [float32]"]["time_slope"] == pytest.approx(1.0)
    assert slopes["s [float32]"]["memory_slope"] == pytest.approx(1.0)
    assert slopes["t [float32]"]["time_slope_large"] == pytest.approx(2.0)


def test_size_parsing_and_token_counts():
    assert bench.parse_size("1024") == (1024, 1024) and bench.parse_size("1024x2048") == (1024, 2048)
    with pytest.raises(ValueError):
        bench.parse_size("12x")
    assert bench.token_count("small", "student", (1024, 2048)) == 64 * 128 + 1
    assert bench.token_count("demo", "teacher", (32, 32)) == 65


def test_small384_pair_is_adventurer_s_at_vit_s_width_and_depth():
    assert bench.model_spec("small384", "student") == ("adventurer_small_patch16_224", {"embed_dim": 384})
    with torch.device("meta"):
        student = bench.build_model("small384", "student", device="meta")
        teacher = bench.build_model("small384", "teacher", device="meta")
        small_student = bench.build_model("small", "student", device="meta")
    assert (student.embed_dim, len(student.blocks)) == (teacher.embed_dim, len(teacher.blocks)) == (384, 12)
    assert small_student.embed_dim == 512  # the paper's Adventurer-S stays in "small"
    # Same timm name as "small"'s student: the label keeps the two apart in slopes, plot and rate estimates.
    assert bench.model_label("small384", "student") != bench.model_label("small", "student")
    parser = argparse.ArgumentParser()
    bench.add_bench_arguments(parser)
    opts = bench.BenchOptions.from_args(parser.parse_args(["--device", "cpu"]))
    assert opts.pairs == ["small", "small384", "demo", "base"]


def test_gpu_check_dry_run_on_cpu(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run",
                           "--output-dir", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "gpu_check_cpu_dry.json").read_text())
    assert result["impls"] == ["chunked"] and not result["failed"] and result["passed"] == len(result["cases"]) > 0
    assert any(t["impl"] == "naive" for t in result["timings"])


def test_ops_benchmark_and_distill_cost_smoke(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import distill_cost
        import ops as ops_bench
    finally:
        sys.path.pop(0)
    assert ops_bench.main(["--quick", "--lengths", "9", "--chunk-sizes", "4", "--repeats", "1", "--threads", "1",
                           "--output-dir", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "ops_cpu.json").read_text())
    assert {r["kind"] for r in data["rows"]} == {"mamba2", "gla"}
    assert all(r["results"]["naive"]["min_s"] > 0 and "chunked Q=4" in r["results"] for r in data["rows"])
    res = distill_cost.worker(dict(length=16, variant="rowblock", batch=1, stages=2, visible=0.5, device="cpu",
                                   threads=1, warmup=0, repeats=1))
    assert res["times_s"][0] > 0 and 0 <= res["loss"] <= 2


def test_alternating_times_rotates_the_order():
    from vitlinearizer.bench.timing import alternating_times, summarize
    calls = []
    times = alternating_times({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-up, then a-b, b-a, a-b
    assert [len(ts) for ts in times.values()] == [3, 3]
    calls.clear()
    alternating_times({name: (lambda n=name: calls.append(n)) for name in "abc"}, repeats=6, warmup=0)
    rounds = ["".join(calls[i:i + 3]) for i in range(0, 18, 3)]
    assert rounds == ["abc", "bca", "cab", "cba", "acb", "bac"]  # every position, and both neighbours of each
    predecessors = {name: {r[r.index(name) - 1] for r in rounds if r.index(name)} for name in "abc"}
    assert predecessors == {"a": {"b", "c"}, "b": {"a", "c"}, "c": {"a", "b"}}
    summary = summarize({"x": [3.0, 1.0, 2.0]})
    assert summary == {"x": dict(min_s=1.0, median_s=2.0, n=3)}
