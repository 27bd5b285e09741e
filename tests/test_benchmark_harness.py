"""The benchmark harness on CPU with a fake op: output files, speedups, failures, device peaks, timer, memory.

Independent of torchnova's kernels: only ``benchmarks/harness.py`` is exercised.
"""

import csv
import json
import math
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks` lives at the repo root

from benchmarks import harness  # noqa: E402
from benchmarks.harness import Case, OpBenchmark, Provider  # noqa: E402

NUMERIC_COLUMNS = ("p50_ms", "p20_ms", "p80_ms", "first_call_ms", "peak_mem_mb", "bytes", "gbps", "pct_bw")


def _raise(message):
    raise RuntimeError(message)


def fake_op() -> OpBenchmark:
    def make_inputs(shape, dtype, device):
        return {"x": torch.randn(shape["n"], device=device, dtype=dtype, requires_grad=True)}

    return OpBenchmark(
        name="fake",
        make_inputs=make_inputs,
        providers=[
            Provider("eager", True, lambda inputs: lambda: (inputs["x"] * 2).sum()),
            Provider("torchnova-fast", False, lambda inputs: lambda: inputs["x"].sum()),
            Provider("torchnova-broken", False, lambda inputs: lambda: _raise("kernel exploded")),
            Provider("compiled", True, lambda inputs: _raise("compile failed")),
            Provider("torchnova-gpu", False, lambda inputs: None, reasons=lambda inputs: ["needs a GPU"]),
        ],
        shapes=[{"n": 1000}, {"n": 4000}],
        quick_shapes=[{"n": 1000}],
        bytes_moved=lambda case: case.shape["n"] * case.dtype.itemsize,
    )


@pytest.fixture(scope="module")
def cpu_header():
    spec = harness.DeviceSpec("CPU fake", 10.0, 0.5, "float32", "measured")
    return harness.machine_header(torch.device("cpu"), spec)


@pytest.fixture(scope="module")
def fake_rows(cpu_header):
    bench = fake_op()
    return harness.run_benchmark(
        bench, torch.device("cpu"), cpu_header, shapes=bench.shapes, dtypes=[torch.float32], rep_ms=2.0
    )


def test_grid_rows_cover_every_provider_shape_mode(fake_rows):
    assert len(fake_rows) == 5 * 2 * 3
    status = {(r["provider"], r["shape"], r["mode"]): r["status"] for r in fake_rows}
    assert status[("eager", "n=4000", "bwd")] == "ok"
    assert status[("torchnova-fast", "n=1000", "fwd_bwd")] == "ok"
    assert status[("torchnova-broken", "n=1000", "fwd")] == "error"
    assert status[("compiled", "n=4000", "bwd")] == "error"
    assert status[("torchnova-gpu", "n=1000", "fwd")] == "skipped"


def test_failing_and_unsupported_providers_are_recorded(fake_rows):
    broken = [r for r in fake_rows if r["provider"] == "torchnova-broken"]
    assert all(r["error"] == "RuntimeError: kernel exploded" and r["p50_ms"] is None for r in broken)
    assert all("compile failed" in r["error"] for r in fake_rows if r["provider"] == "compiled")
    assert all(r["error"] == "needs a GPU" for r in fake_rows if r["provider"] == "torchnova-gpu")
    table = harness.format_table(fake_rows)
    assert "error: RuntimeError: kernel exploded" in table
    assert "torchnova-gpu: needs a GPU" in table


def test_measured_rows_have_consistent_metrics(fake_rows, cpu_header):
    for row in (r for r in fake_rows if r["status"] == "ok"):
        assert 0 < row["p20_ms"] <= row["p50_ms"] <= row["p80_ms"]
        assert row["bytes"] == int(row["shape"].split("=")[1]) * 4
        assert row["gbps"] == pytest.approx(row["bytes"] / (row["p50_ms"] * 1e-3) / 1e9)
        assert row["pct_bw"] == pytest.approx(100 * row["gbps"] / cpu_header["peak_bandwidth_gbps"])
        assert row["tflops"] is None and row["flops"] is None
        if row["provider"] == "torchnova-fast":
            assert row["speedup"] == pytest.approx(_p50(fake_rows, "eager", row) / row["p50_ms"])
        else:
            assert row["speedup"] is None


def _p50(rows, provider, like):
    (match,) = [
        r for r in rows if r["provider"] == provider and (r["shape"], r["mode"]) == (like["shape"], like["mode"])
    ]
    return match["p50_ms"]


def test_csv_and_json_are_well_formed(fake_rows, cpu_header, tmp_path):
    written = harness.write_results(fake_rows, cpu_header, tmp_path, "fake")
    assert tmp_path / "fake.csv" in written and tmp_path / "fake.json" in written

    with open(tmp_path / "fake.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == harness.CSV_COLUMNS
        csv_rows = list(reader)
    assert len(csv_rows) == len(fake_rows)
    ok = [r for r in csv_rows if r["status"] == "ok"]
    assert len(ok) == 2 * 2 * 3
    for row in ok:
        assert all(math.isfinite(float(row[column])) for column in NUMERIC_COLUMNS)
        assert row["op"] == "fake" and row["dtype"] == "float32" and row["torch"] == torch.__version__
    fast = [r for r in ok if r["provider"] == "torchnova-fast"]
    assert all(float(r["speedup"]) > 0 for r in fast)

    document = json.loads((tmp_path / "fake.json").read_text())
    assert document["header"]["cpu_cores"] == cpu_header["cpu_cores"]
    assert document["header"]["peak_source"] == "measured"
    assert [r["provider"] for r in document["rows"]] == [r["provider"] for r in fake_rows]
    assert set(document["rows"][0]) == set(harness.CSV_COLUMNS)


def test_speedup_is_best_baseline_over_own_time():
    def row(provider, is_baseline, p50, shape="a", status="ok"):
        return {"op": "op", "provider": provider, "is_baseline": is_baseline, "shape": shape, "dtype": "float32",
                "mode": "fwd", "status": status, "p50_ms": p50, "speedup": None}  # fmt: skip

    rows = [
        row("eager", True, 4.0),
        row("compile", True, 2.0),
        row("liger", True, None, status="error"),
        row("torchnova-triton", False, 0.5),
        row("torchnova-reference", False, 8.0),
        row("torchnova-triton", False, 1.0, shape="no-baseline"),
    ]
    harness.add_speedups(rows)
    assert [r["speedup"] for r in rows] == [None, None, None, 4.0, 0.25, None]


def test_known_devices_match_by_whole_words():
    assert harness.lookup_device("NVIDIA H100 80GB HBM3") == (3350.0, 989.4)
    assert harness.lookup_device("NVIDIA H100 PCIe") == (2000.0, 756.0)
    assert harness.lookup_device("NVIDIA H200") == (4800.0, 989.0)
    assert harness.lookup_device("NVIDIA A100-SXM4-40GB") == (1555.0, 312.0)
    assert harness.lookup_device("NVIDIA A100-SXM4-80GB") == (2039.0, 312.0)
    assert harness.lookup_device("NVIDIA A100 80GB PCIe") == (1935.0, 312.0)
    assert harness.lookup_device("NVIDIA L40S") == (864.0, 362.0)
    assert harness.lookup_device("NVIDIA L4") == (300.0, 121.0)
    assert harness.lookup_device("NVIDIA RTX A5000") == (768.0, 111.0)
    assert harness.lookup_device("NVIDIA RTX A4000") == (448.0, 76.7)
    assert harness.lookup_device("NVIDIA GeForce RTX 4090") == (1008.0, 165.2)
    assert harness.lookup_device("NVIDIA GeForce RTX 3090") == (936.0, 71.0)
    assert harness.lookup_device("NVIDIA GH200 480GB") is None
    assert harness.lookup_device("CPU AMD EPYC") is None


def test_cpu_falls_back_to_measured_copy_bandwidth(monkeypatch):
    monkeypatch.setattr(harness, "BANDWIDTH_PROBE_BYTES", 16 * 2**20)
    spec = harness.device_spec(torch.device("cpu"))
    assert spec.source == "measured" and spec.tflops_dtype == "float32" and 0.001 < spec.peak_tflops < 100
    assert spec.name.startswith("CPU ")
    assert 0.1 < spec.bandwidth_gbps < 10_000
    assert harness.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


def test_cpu_timer_measures_a_known_duration():
    timing = harness.measure_time(lambda: time.sleep(0.002), torch.device("cpu"), rep_ms=20.0)
    assert 2.0 <= timing.p20_ms <= timing.p50_ms <= timing.p80_ms < 50.0
    assert timing.first_call_ms >= 2.0


def test_bwd_step_repeats_backward_with_fresh_grads():
    x = torch.ones(5, requires_grad=True)
    step, grad_inputs = harness.mode_step(lambda: (3 * x).sum(), "bwd", {"x": x})
    assert grad_inputs == [x]
    timing = harness.measure_time(step, torch.device("cpu"), grad_to_none=grad_inputs, rep_ms=1.0)
    assert timing.p50_ms > 0
    # Grads are reset between calls, so the last call leaves one backward's gradient, not an accumulation.
    torch.testing.assert_close(x.grad, torch.full((5,), 3.0))
    with pytest.raises(ValueError, match="mode"):
        harness.mode_step(lambda: x.sum(), "sideways", {"x": x})


def test_cpu_peak_memory_sees_a_temporary_allocation():
    allocate_4mb = lambda: torch.empty(4 * 2**20, dtype=torch.uint8).fill_(1)  # noqa: E731
    megabytes = harness.measure_peak_memory_mb(allocate_4mb, torch.device("cpu"))
    assert megabytes is not None and 4.0 <= megabytes < 16.0


def test_select_providers_by_substring():
    names = [p.name for p in harness.select_providers(fake_op().providers, ["torchnova", "eager"])]
    assert names == ["eager", "torchnova-fast", "torchnova-broken", "torchnova-gpu"]
    assert len(harness.select_providers(fake_op().providers, None)) == 5


def test_case_shape_string():
    assert Case("op", {"rows": 2, "classes": 3}, torch.float32, "fwd").shape_str == "rows=2 classes=3"


# ---------------------------------------------------------------------------------------------------------
# Summary, energy columns, compare and the regression gate
# ---------------------------------------------------------------------------------------------------------


def test_summary_pairs_fastest_torchnova_with_fastest_baseline(fake_rows):
    summary = harness.summarize(fake_rows)
    assert len(summary) == 2 * 3  # (shape, mode) groups of the fake op, one dtype
    assert all(s["torchnova"] == "torchnova-fast" and s["baseline"] == "eager" for s in summary)
    assert all(s["speedup"] == pytest.approx(s["baseline_ms"] / s["torchnova_ms"]) for s in summary)
    assert all(s["peak_kind"] == "BW" and s["pct_peak"] > 0 for s in summary)
    assert "torchnova's fastest backend" in harness.format_summary(fake_rows)


class _FakeCounter:
    """1 J per read, so every measured row gets (1 J) / its number of calls."""

    name = "fake"

    def __init__(self):
        self.joules = 0.0

    def read(self):
        self.joules += 1.0
        return self.joules


def test_energy_columns_filled_from_a_counter(cpu_header, monkeypatch):
    monkeypatch.setattr(harness, "ENERGY_MIN_SECONDS", 0.01)
    bench = fake_op()
    rows = harness.run_benchmark(
        bench, torch.device("cpu"), cpu_header, shapes=bench.quick_shapes, dtypes=[torch.float32], modes=["fwd"],
        rep_ms=2.0, counter=_FakeCounter(),
    )  # fmt: skip
    ok = [r for r in rows if r["status"] == "ok"]
    assert ok and all(0 < r["j_per_iter"] <= 1.0 / harness.MIN_REPS for r in ok)
    intensity = cpu_header["grid_intensity_gco2_per_kwh"]
    assert all(r["gco2_per_1k_iter"] == pytest.approx(1000 * r["j_per_iter"] / 3.6e6 * intensity) for r in ok)
    assert "J/iter" in harness.format_table(rows)


def test_energy_is_na_without_counter(fake_rows, cpu_header):
    assert all(r["j_per_iter"] is None and r["gco2_per_1k_iter"] is None for r in fake_rows)
    if cpu_header["energy_counter"] != "rapl":
        assert cpu_header["energy_counter"].startswith("n/a: ")


def _results_file(path, rows):
    path.write_text(json.dumps({"header": {}, "rows": rows}))
    return path


def _timed_row(provider, p50, is_baseline=False, shape="n=1", status="ok"):
    return {"op": "fake", "provider": provider, "mode": "fwd", "dtype": "float32", "shape": shape,
            "status": status, "p50_ms": p50, "is_baseline": is_baseline}  # fmt: skip


def test_compare_ratios_and_regression_gate(tmp_path):
    from benchmarks import compare

    old = [_timed_row("torchnova-cpp", 1.0), _timed_row("eager", 2.0, True)]
    old.append(_timed_row("torchnova-x", 1.0, shape="gone"))
    new = [_timed_row("torchnova-cpp", 1.25), _timed_row("eager", 3.0, True), _timed_row("torchnova-new", 9.0)]
    comparison = compare.compare(old, new)
    assert [(c["provider"], c["ratio"]) for c in comparison] == [("torchnova-cpp", 1.25), ("eager", 1.5)]
    # Baselines never trip the gate; torchnova rows do above the threshold only.
    assert [c["provider"] for c in compare.regressions(comparison, 20.0)] == ["torchnova-cpp"]
    assert compare.regressions(comparison, 25.0) == []
    assert "REGRESSION" in compare.format_comparison(comparison, 20.0)

    # The same through CSV: types are restored from strings.
    csv_path = tmp_path / "old.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(old[0]))
        writer.writeheader()
        writer.writerows(old)
    assert compare.compare(compare.load_rows(csv_path), new) == comparison
    with pytest.raises(ValueError, match="expected a .json or .csv"):
        compare.load_rows(tmp_path / "results.txt")


def test_cli_gate_exit_codes_on_saved_files(tmp_path, capsys):
    from benchmarks.__main__ import main

    old = _results_file(tmp_path / "old.json", [_timed_row("torchnova-cpp", 1.0)])
    slower = _results_file(tmp_path / "slower.json", [_timed_row("torchnova-cpp", 1.5)])
    faster = _results_file(tmp_path / "faster.json", [_timed_row("torchnova-cpp", 0.5)])
    assert main(["--compare", str(old), "--current", str(slower), "--fail-if-regression", "10"]) == 1
    assert "1 torchnova row(s) more than 10% slower" in capsys.readouterr().out
    assert main(["--compare", str(old), "--current", str(faster), "--fail-if-regression", "10"]) == 0
    assert main(["--compare", str(tmp_path), "--current", str(slower)]) == 0  # a folder of results; no gate
    with pytest.raises(SystemExit):
        main(["--fail-if-regression", "10"])  # needs --compare


def test_cpu_providers_take_turns_in_rounds(cpu_header):
    # A slow phase of the machine must fall on every provider of a case: their timed calls interleave in
    # CPU_ROUNDS rounds instead of one provider's calls all running before the next provider's.
    calls = []

    def recording(name):
        return lambda inputs: lambda: calls.append(name) or inputs["x"].sum()

    bench = fake_op()
    bench = OpBenchmark(
        name="turns",
        make_inputs=bench.make_inputs,
        providers=[Provider("eager", True, recording("eager")), Provider("torchnova-a", False, recording("a"))],
        shapes=[{"n": 10}],
        quick_shapes=[{"n": 10}],
    )
    rows = harness.run_benchmark(
        bench, torch.device("cpu"), cpu_header, shapes=bench.shapes, dtypes=[torch.float32], modes=["fwd"], rep_ms=1.0
    )
    assert [r["status"] for r in rows] == ["ok", "ok"]
    switches = sum(1 for before, after in zip(calls, calls[1:]) if before != after)
    assert switches >= 2 * harness.CPU_ROUNDS - 1
