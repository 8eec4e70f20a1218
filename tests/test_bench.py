"""`vitlinearizer bench` and the benchmark scripts: they run end to end at tiny sizes and write valid outputs.
No wall-clock assertions: timings on a shared CPU are only checked for being present and positive."""
import argparse
import json
import math
import os
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
    assert {c["kind"] for c in result["cases"]} == {t["kind"] for t in result["timings"]} == {"per_head", "per_channel", "scalar"}


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


def _no_measuring(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("measured before the inputs were checked")
    monkeypatch.setattr(bench, "_measure_config", fail)


def test_bad_inputs_fail_before_anything_is_measured(tmp_path, monkeypatch, capsys):
    """A size off the patch grid, an --output-dir under a file, negative --threads, a --tag with a directory in
    it or a budget of 0 minutes: exit 2 naming the value, at once, not after the configurations before it were
    measured (and their results lost)."""
    _no_measuring(monkeypatch)
    common = ["bench", "--device", "cpu", "--pairs", "demo", "--dtypes", "float32"]
    assert cli_main(common + ["--sizes", "32", "34", "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--sizes 34 for pair demo" in err and "multiple of the patch size 4x4" in err and "32x32" in err
    with pytest.raises(ValueError, match="34"):
        bench.run_bench(bench.BenchOptions(pairs=["demo"], sizes=[(32, 32), (34, 34)], dtypes=["float32"]))
    afile = tmp_path / "afile"
    afile.write_text("")
    assert cli_main(common + ["--sizes", "32", "--output-dir", str(afile / "sub")]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err
    assert cli_main(common + ["--sizes", "32", "--threads", "-1", "--output-dir", str(tmp_path)]) == 2
    assert "--threads must be >= 1" in capsys.readouterr().err
    for flags, message in ((["--tag", "runs/x"], "must be a plain file-name stem"), (["--tag", ""], "plain file-name"),
                           (["--time-budget", "0"], "--time-budget must be > 0"),
                           (["--max-minutes", "-1"], "--max-minutes must be > 0"),
                           (["--max-minutes", "nan"], "--max-minutes must be > 0")):
        assert cli_main(common + ["--sizes", "32", "--output-dir", str(tmp_path)] + flags) == 2, flags
        assert message in capsys.readouterr().err, flags
    with pytest.raises(ValueError, match="--repeats"):
        bench.BenchOptions(pairs=["demo"], sizes=[(32, 32)], dtypes=["float32"], repeats=0)
    assert not list(tmp_path.glob("*.json"))


def test_cpu_runs_float32_before_bf16_whatever_the_order_given():
    opts = bench.BenchOptions(pairs=["demo"], sizes=[(32, 32)], dtypes=["bfloat16", "float32"], device="cpu")
    assert [c[2] for c in bench._configs(opts)] == ["float32", "bfloat16"]
    opts.device = "cuda"  # benchmarks/gpu.sh asks for bf16 first on purpose
    assert [c[2] for c in bench._configs(opts)] == ["bfloat16", "float32"]


def test_no_memory_row_keeps_one_timed_repetition_when_the_budget_is_tight(bench_worker_specs):
    """Without the memory probe there is no cold forward to fall back on: a budget that leaves less than a
    warm-up plus a repetition still times one (cold) repetition, as documented ("min 1")."""
    specs = bench_worker_specs
    opts = bench.BenchOptions(pairs=["demo"], sizes=[(32, 32)], dtypes=["float32"], memory=False, device="cpu")
    rates = bench.RateBook("cpu")
    for role in ("student", "teacher"):  # both estimated at 6 s per forward
        rates.rates[(bench.model_label("demo", role), "float32")] = bench.model_flops("demo", role, (32, 32))[0] / 6
    opts.time_budget = 2 * 6 + 2 * bench._startup_cost("cpu")  # both fit the probe rule, not warm-up + 1 each
    row = bench._measure_config(opts, "demo", (32, 32), "float32", rates, deadline=1e18)
    assert len(specs) == 1 and specs[0]["repeats"] == 1 and specs[0]["warmup"] == 0
    assert row["student"]["latency"]["n"] == row["teacher"]["latency"]["n"] == 1 and row["speedup"] == 1.0


def test_worker_failure_note_names_the_exception():
    """The row's note keeps the first 200 characters: the exception must be in them, not a traceback frame."""
    from vitlinearizer.bench.worker import run_worker

    with pytest.raises(RuntimeError) as info:
        run_worker(dict(task="timing", pair="nope", role="student", size=[32, 32], dtype="float32", device="cpu",
                        roles=["student"], warmup=0, repeats=1))
    assert "KeyError: 'nope'" in str(info.value)[:200]


@pytest.mark.parametrize("policy, expected", [
    ("short-spin", {"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": "5000"}),
    ("passive", {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": None}),
    ("inherit", {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "7"}),
])
def test_measuring_process_runs_under_the_requested_openmp_policy(monkeypatch, policy, expected):
    """The policy reaches the worker as it starts (libgomp reads its variables once, when torch loads it), and
    replaces both inherited variables: a leftover GOMP_SPINCOUNT would override OMP_WAIT_POLICY."""
    from vitlinearizer.bench.worker import run_worker

    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    monkeypatch.setenv("GOMP_SPINCOUNT", "7")
    result = run_worker(dict(task="timing", pair="demo", size=[32, 32], dtype="float32", device="cpu",
                             roles=["student"], warmup=0, repeats=1, omp_wait_policy=policy))
    assert result["openmp"] == expected


def test_openmp_policy_defaults_and_errors():
    from vitlinearizer.bench.openmp import describe_openmp_env

    parser = argparse.ArgumentParser()
    bench.add_bench_arguments(parser)
    assert bench.BenchOptions.from_args(parser.parse_args(["--device", "cpu"])).omp_wait_policy == "short-spin"
    assert describe_openmp_env("short-spin", {"OMP_WAIT_POLICY": "PASSIVE"}) == "short-spin (GOMP_SPINCOUNT=5000)"
    assert describe_openmp_env("inherit", {}) == "inherit (OpenMP defaults)"
    with pytest.raises(ValueError, match="omp_wait_policy must be one of short-spin, passive, active, inherit"):
        bench.BenchOptions(pairs=["demo"], sizes=[(32, 32)], dtypes=["float32"], omp_wait_policy="PASSIVE")


def test_outputs_are_replaced_atomically(tmp_path, monkeypatch):
    """Rewriting benchmarks/results: a write that fails half-way leaves the previous file whole."""
    from vitlinearizer.bench import report

    results = dict(meta=dict(environment=dict(device="cpu", threads=1, torch="t", timm="t")),
                   rows=[], slopes={})
    bench.write_outputs(results, tmp_path, "r")
    old_png = (tmp_path / "r.png").read_bytes()

    def broken_plot(results, out):
        out.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(report, "write_plot", broken_plot)
    with pytest.raises(OSError):
        bench.write_outputs(results, tmp_path, "r")
    assert (tmp_path / "r.png").read_bytes() == old_png
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "r.md", "r.png"]


def test_benchmark_scripts_reject_bad_values_up_front(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import distill_cost
        import ops as ops_bench
    finally:
        sys.path.pop(0)
    afile = tmp_path / "afile"
    afile.write_text("")
    for main, argv, message in (
            (ops_bench.main, ["--repeats", "0"], "--repeats: must be an integer >= 1"),
            (ops_bench.main, ["--lengths", "0"], "--lengths: must be an integer >= 1"),
            (ops_bench.main, ["--chunk-sizes", "0"], "--chunk-sizes: must be an integer >= 1"),
            (ops_bench.main, ["--output-dir", str(afile)], "is a file, not a directory"),
            (distill_cost.main, ["--repeats", "0"], "--repeats: must be an integer >= 1"),
            (distill_cost.main, ["--batch", "0"], "--batch: must be an integer >= 1"),
            (distill_cost.main, ["--sides", "8"], "must be >= 16 px"),
            (distill_cost.main, ["--visible", "0"], "in (0, 1]"),
            (distill_cost.main, ["--output-dir", str(afile)], "is a file, not a directory")):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2 and message in capsys.readouterr().err, argv
    if not torch.cuda.is_available():
        for main in (ops_bench.main, distill_cost.main):
            with pytest.raises(SystemExit):
                main(["--device", "cuda"])
            assert "CUDA is not available" in capsys.readouterr().err
    # Their --quick smoke tests write beside, not over, the committed results the docs quote.
    for script in (ops_bench, distill_cost):
        results = ROOT / "benchmarks" / "results"
        assert script.resolve_output_dir(argparse.Namespace(output_dir=None, quick=True)) == results / "tmp"
        assert script.resolve_output_dir(argparse.Namespace(output_dir=None, quick=False)) == results
        assert script.resolve_output_dir(argparse.Namespace(output_dir="x", quick=True)) == Path("x")


def test_module_entry_point_reports_a_bad_value_like_the_cli(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "vitlinearizer.bench", "--device", "cpu", "--pairs", "demo",
                           "--sizes", "34", "--dry-run"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "--sizes 34 for pair demo" in proc.stderr


def test_gpu_script_dry_run_end_to_end(tmp_path):
    """benchmarks/gpu.sh runs only on a lent GPU, once per session: its steps must be known to run here first
    (--dry-run: the same Python steps on the CPU at tiny sizes), writing only under benchmarks/results/tmp."""
    results = ROOT / "benchmarks" / "results"
    before = {p: p.stat().st_mtime_ns for p in results.iterdir() if p.is_file()}
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    env.update(PYTHON=sys.executable, OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--dry-run"], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "checks passed" in proc.stdout and "done (status 0)" in proc.stdout
    assert {p: p.stat().st_mtime_ns for p in results.iterdir() if p.is_file()} == before
    assert (results / "tmp" / "gpu_check_cpu_dry.json").is_file()


def test_an_interrupted_run_writes_the_rows_it_measured(tmp_path, monkeypatch, capsys):
    """Ctrl-C during a long run (the committed CPU table takes 34 min) keeps the measured rows, says where it
    stopped, and exits 130."""
    measured = []

    def measure(opts, pair, size, dtype, rates, deadline):
        if measured:
            raise KeyboardInterrupt
        measured.append(size)
        row = dict(pair=pair, size=bench.size_label(size), height=size[0], width=size[1], dtype=dtype, notes=[])
        for role in ("student", "teacher"):
            row[role] = dict(model=bench.model_label(pair, role), tokens=bench.token_count(pair, role, size),
                             flops=1e9, latency=dict(min_s=0.01, n=1))
        bench._derive(row)
        return row

    monkeypatch.setattr(bench, "_measure_config", measure)
    rc = cli_main(["bench", "--pairs", "demo", "--sizes", "32", "64", "--dtypes", "float32", "--no-memory",
                   "--output-dir", str(tmp_path), "--tag", "cut"])
    assert rc == 130 and measured == [(32, 32)]
    data = json.loads((tmp_path / "cut.json").read_text())
    assert [row["size"] for row in data["rows"]] == ["32"] and data["meta"]["interrupted_at"] == "demo 64 float32"
    assert "Interrupted at demo 64 float32" in (tmp_path / "cut.md").read_text()
    assert "interrupted at demo 64 float32" in capsys.readouterr().err
