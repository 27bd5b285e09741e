"""Shared benchmark harness: every torchnova op benchmark is an ``OpBenchmark`` run through ``run_benchmark``.

Conventions
-----------
* A measurement is one (op, shape, dtype, mode, provider). A ``Provider`` is a torchnova backend
  (``is_baseline=False``) or a baseline such as eager PyTorch; ``make(inputs)`` returns a zero-argument callable
  that runs the op's forward and returns its output tensor; ``reasons(inputs)`` says why it cannot run (empty
  list: it can).
* Modes. ``fwd``: forward only, with the differentiable inputs requiring grad as in training, so autograd
  bookkeeping and whatever the forward saves for backward are included. ``bwd``: backward only: the forward runs
  once outside the timed region and each timed call is ``out.backward(grad, retain_graph=True)``.
  ``fwd_bwd``: forward + backward per call. Input grads are reset to None before every call, outside the
  timed region. Scalar outputs (losses) get grad 1, as in training; other outputs a fixed random grad.
* Timing. CUDA: ``triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])``, which flushes L2 before every call
  (without triton: CUDA events around each call, with the same 256 MB flush). CPU: warm-up, then
  ``time.perf_counter`` around each call; the providers of one (shape, dtype) take turns in ``CPU_ROUNDS``
  rounds of warm-up + ``rep_ms / CPU_ROUNDS`` (at least ``MIN_REPS`` calls each), so a slow phase of a shared
  machine lands on all of them and the ratios stay fair; CPU caches stay warm. Reported: p50 (median), p20 and
  p80 in ms. ``first_call_ms`` is the case's first call, which carries compilation / autotuning
  (torch.compile, Triton) and is excluded from the quantiles.
* Peak memory (``peak_mem_mb``): memory one call allocates beyond what already exists (the inputs and, for
  ``bwd``, the retained forward graph). CUDA: ``max_memory_allocated`` after ``reset_peak_memory_stats`` minus
  ``memory_allocated`` before. CPU: high-water mark of the allocations that ``torch.profiler``
  (``profile_memory=True``) records during one call (torch's CPU allocator only); None if that fails.
* Derived metrics from the op's formulas: ``gbps`` = bytes / p50 (effective bandwidth: the bytes the op must
  minimally move, not what an implementation actually moves), ``pct_bw`` = gbps / the device's peak bandwidth,
  ``tflops`` = FLOPs / p50, ``pct_tflops`` = tflops / the device's peak matmul TFLOP/s for that dtype class.
  Peaks come from ``KNOWN_DEVICES`` (PERF-ANCHORS.md §3: bandwidth and dense bf16 TFLOP/s), matched by whole
  words of the device name; unknown GPUs and CPUs use measured peaks: a 256 MB ``copy_`` (read + write, p20
  time) for bandwidth and a large matmul (bf16 on GPUs, fp32 on CPUs, p20 time) for TFLOP/s. ``pct_tflops``
  is only filled where the row's dtype matches the peak's (bf16/fp16 rows vs a bf16 peak; fp32 vs fp32).
* Energy (``j_per_iter``, ``gco2_per_1k_iter``): where ``torchnova.energy`` finds a counter (NVML on NVIDIA
  GPUs, RAPL on CPUs), each ok row also runs its step back to back for at least ``ENERGY_MIN_SECONDS`` and
  divides the counter's joules by the calls; CO2 = joules × the header's grid intensity
  (``grid_intensity_source`` says which grid and where its figure comes from). The counters cover the whole
  GPU board / CPU package, idle power included. Without a counter both are empty and the header's
  ``energy_counter`` says why. ``carbon_line`` prices one row's energy of 1,000 iterations in several regions
  (and, given an hourly profile, at the cheapest and the most expensive start hour).
* ``speedup`` (torchnova rows only) = best baseline p50 / this p50 in the same (op, shape, dtype, mode):
  > 1 means faster than every baseline.
* Failures never stop a run: a provider with reasons is recorded with status ``skipped``, an exception
  (compile failure, OOM, ...) with status ``error`` and its message.
* Output: aligned tables on stdout, and ``<out>/<op>.csv`` (long format, ``CSV_COLUMNS``, one row per
  provider × shape × dtype × mode), ``<op>.json`` (``{"header": machine header, "rows": [...]}``) and, when
  matplotlib is importable, ``<op>.png``. Files are overwritten by each run.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import json
import os
import platform
import re
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from torchnova.energy import (
    GridIntensity,
    HourlyIntensity,
    as_grid_intensity,
    energy_counter,
    grams_co2,
    region_prices,
    start_hours_line,
)

MODES = ("fwd", "bwd", "fwd_bwd")
QUANTILES = (0.5, 0.2, 0.8)
MIN_REPS = 5
CPU_ROUNDS = 5  # CPU: the providers of a case take turns in this many timing rounds (CpuTimer)
WARMUP_MS = 25.0
L2_FLUSH_BYTES = 256 * 2**20
BANDWIDTH_PROBE_BYTES = 256 * 2**20
MATMUL_PROBE_SIZE = {"cuda": 8192, "cpu": 1024}
ENERGY_MIN_SECONDS = 0.5

CSV_COLUMNS = (
    "op", "provider", "is_baseline", "mode", "dtype", "shape", "status",
    "p50_ms", "p20_ms", "p80_ms", "first_call_ms", "peak_mem_mb",
    "bytes", "flops", "gbps", "pct_bw", "tflops", "pct_tflops", "speedup", "j_per_iter", "gco2_per_1k_iter", "error",
    "device", "torch", "triton", "git_sha", "timestamp",
)  # fmt: skip

Inputs = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Provider:
    """``make(inputs)`` returns the forward as a zero-argument callable; ``reasons(inputs)`` why it cannot run."""

    name: str
    is_baseline: bool
    make: Callable[[Inputs], Callable[[], torch.Tensor]]
    reasons: Callable[[Inputs], list[str]] = lambda inputs: []


@dataclass(frozen=True)
class Case:
    """One measurement point; ``shape`` names the op's sizes, e.g. {"rows": 4096, "classes": 32000}."""

    op: str
    shape: dict[str, int]
    dtype: torch.dtype
    mode: str

    @property
    def shape_str(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.shape.items())


@dataclass
class OpBenchmark:
    """One op's benchmark: inputs, providers, grids and the formulas for derived metrics."""

    name: str
    make_inputs: Callable[[dict[str, int], torch.dtype, torch.device], Inputs]
    providers: list[Provider]
    shapes: list[dict[str, int]]
    quick_shapes: list[dict[str, int]]
    cuda_dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16)
    cpu_dtypes: tuple[torch.dtype, ...] = (torch.float32,)
    bytes_moved: Callable[[Case], int] | None = None
    flops: Callable[[Case], float] | None = None
    modes: tuple[str, ...] = MODES  # the modes that mean something for this op (a training step: "fwd" only)


@dataclass(frozen=True)
class Timing:
    p50_ms: float
    p20_ms: float
    p80_ms: float
    first_call_ms: float


# ---------------------------------------------------------------------------------------------------------
# Devices
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    bandwidth_gbps: float
    peak_tflops: float | None  # dense matmul, FP32 accumulate (what attention kernels use)
    tflops_dtype: str  # the dtype of peak_tflops: "bfloat16" (table, GPUs) or "float32" (measured on CPUs)
    source: str  # "table" or "measured"


# (words that must all occur in the device name, peak bandwidth GB/s, bf16 dense TFLOP/s with FP32 accumulate).
# First match wins, so the specific variants come before the generic name. Values: PERF-ANCHORS.md §3, except
# the A100 40GB / 80GB PCIe bandwidths (NVIDIA A100 datasheet).
KNOWN_DEVICES: tuple[tuple[tuple[str, ...], float, float], ...] = (
    (("H100", "PCIe"), 2000.0, 756.0),
    (("H100",), 3350.0, 989.4),  # SXM5, reported as "H100 80GB HBM3"
    (("H200",), 4800.0, 989.0),
    (("A100", "40GB"), 1555.0, 312.0),
    (("A100", "80GB", "PCIe"), 1935.0, 312.0),
    (("A100",), 2039.0, 312.0),
    (("L40S",), 864.0, 362.0),
    (("L4",), 300.0, 121.0),
    (("RTX", "A5000"), 768.0, 111.0),
    (("RTX", "A4000"), 448.0, 76.7),
    (("4090",), 1008.0, 165.2),  # GeForce: FP32-accumulate MMA runs at half rate
    (("3090",), 936.0, 71.0),
)


def lookup_device(name: str) -> tuple[float, float] | None:
    """(bandwidth GB/s, bf16 TFLOP/s) of a known device, matching whole words so "L4" does not match "L40S"."""
    for words, bandwidth, tflops in KNOWN_DEVICES:
        if all(re.search(rf"\b{re.escape(w)}\b", name, re.IGNORECASE) for w in words):
            return bandwidth, tflops
    return None


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU {cpu_model()}"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def measure_copy_bandwidth(device: torch.device) -> float:
    """GB/s of a large ``copy_`` (bytes read + bytes written) on ``device``."""
    src = torch.ones(BANDWIDTH_PROBE_BYTES // 4, device=device)
    dst = torch.empty_like(src)
    timing = measure_time(lambda: dst.copy_(src), device, rep_ms=100.0)
    return 2 * src.nbytes / (timing.p20_ms * 1e-3) / 1e9


def measure_matmul_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """TFLOP/s of a large square matmul on ``device`` (2·n³ FLOPs at the p20 time)."""
    n = MATMUL_PROBE_SIZE[device.type]
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    timing = measure_time(lambda: a @ b, device, rep_ms=100.0)
    return 2 * n**3 / (timing.p20_ms * 1e-3) / 1e12


def device_spec(device: torch.device) -> DeviceSpec:
    name = device_name(device)
    known = lookup_device(name) if device.type == "cuda" else None
    if known is not None:
        return DeviceSpec(name, known[0], known[1], "bfloat16", "table")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return DeviceSpec(
        name, measure_copy_bandwidth(device), measure_matmul_tflops(device, dtype), str(dtype)[6:], "measured"
    )


def _run_text(cmd: list[str]) -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=10, cwd=Path(__file__).parent)
        if result.returncode == 0:
            return result.stdout.strip() or None
    return None


def triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def machine_header(
    device: torch.device, spec: DeviceSpec, grid_intensity: GridIntensity | float | None = None
) -> dict:
    """What ran where; ``energy_counter`` names the counter used, or "n/a: <why>"."""
    cuda = device.type == "cuda"
    grid = as_grid_intensity(grid_intensity)
    counter, why = energy_counter(device)
    driver = _run_text(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]) if cuda else None
    return {
        "device": spec.name,
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        # other work on the machine makes CPU timings noisy: keep the evidence
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "gpu": torch.cuda.get_device_name(device) if cuda else None,
        "gpu_driver": driver.splitlines()[0] if driver else None,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": triton_version(),
        "python": platform.python_version(),
        "git_sha": _run_text(["git", "rev-parse", "--short", "HEAD"]),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "peak_bandwidth_gbps": round(spec.bandwidth_gbps, 1),
        "peak_tflops": round(spec.peak_tflops, 2) if spec.peak_tflops is not None else None,
        "peak_tflops_dtype": spec.tflops_dtype,
        "peak_source": spec.source,
        "energy_counter": counter.name if counter is not None else f"n/a: {why}",
        "grid_intensity_gco2_per_kwh": grid.g_per_kwh,
        "grid_intensity_source": f"{grid.name}: {grid.source}",
    }


def format_header(header: dict) -> str:
    return "\n".join(f"  {key:<20} {value}" for key, value in header.items())


# ---------------------------------------------------------------------------------------------------------
# Timing and memory
# ---------------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _quantiles_ms(samples: list[float]) -> tuple[float, float, float]:
    p50, p20, p80 = torch.tensor(samples, dtype=torch.float64).quantile(torch.tensor(QUANTILES, dtype=torch.float64))
    return float(p50), float(p20), float(p80)


def _sample_calls(call_ms: Callable[[], float], rep_ms: float) -> list[float]:
    """Warm up, then sample enough calls to fill ``rep_ms`` (never fewer than MIN_REPS)."""
    warmup = [call_ms()]
    while sum(warmup) < WARMUP_MS:
        warmup.append(call_ms())
    estimate = sorted(warmup)[len(warmup) // 2]
    reps = max(MIN_REPS, int(rep_ms / max(estimate, 1e-3)))
    return [call_ms() for _ in range(reps)]


class CpuTimer:
    """CPU samples of one step, taken in one or more rounds: ``run_benchmark`` lets the providers of a case take
    turns (CPU_ROUNDS rounds), so that a slow phase of a shared machine (the host's neighbours, frequency
    changes) falls on all of them instead of on whichever ran during it. The first call is timed apart; a
    round warms up (WARMUP_MS) and then samples ``rep_ms``."""

    def __init__(self, fn: Callable[[], object], grad_to_none: Iterable[torch.Tensor] = ()):
        self.fn, self.grad_to_none = fn, list(grad_to_none)
        self.samples: list[float] = []
        self.first_call_ms: float | None = None

    def _call_ms(self) -> float:
        for t in self.grad_to_none:
            t.grad = None
        start = time.perf_counter()
        self.fn()
        return (time.perf_counter() - start) * 1e3

    def sample(self, rep_ms: float) -> None:
        if self.first_call_ms is None:
            self.first_call_ms = self._call_ms()
        self.samples += _sample_calls(self._call_ms, rep_ms)

    def timing(self) -> Timing:
        return Timing(*_quantiles_ms(self.samples), self.first_call_ms)


def measure_time(
    fn: Callable[[], object], device: torch.device, *, grad_to_none: list[torch.Tensor] = (), rep_ms: float = 100.0
) -> Timing:
    """Quantiles of ``fn``'s time; the grads of ``grad_to_none`` are reset before every call, untimed."""
    if device.type != "cuda":
        timer = CpuTimer(fn, grad_to_none)
        timer.sample(rep_ms)
        return timer.timing()

    def reset() -> None:
        for t in grad_to_none:
            t.grad = None

    reset()
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    first_call_ms = (time.perf_counter() - start) * 1e3
    try:
        from triton.testing import do_bench
    except ImportError:
        samples = _sample_calls(_cuda_event_timer(fn, reset, device), rep_ms)
        return Timing(*_quantiles_ms(samples), first_call_ms)
    quantiles = do_bench(fn, warmup=25, rep=rep_ms, grad_to_none=list(grad_to_none), quantiles=list(QUANTILES))
    return Timing(*quantiles, first_call_ms)


def _cuda_event_timer(fn, reset, device) -> Callable[[], float]:
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=device)

    def call_ms() -> float:
        reset()
        flush.zero_()  # evict L2 so every call reads from HBM, as do_bench does
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    return call_ms


@contextlib.contextmanager
def _stderr_silenced():
    """Kineto prints profiler start/stop lines to fd 2 from C++; keep them out of the tables."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_peak_bytes(fn: Callable[[], object]) -> int:
    from torch.profiler import ProfilerActivity, profile

    with _stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Allocation records carry signed sizes (frees are negative); their running sum in time order is the
    # memory held on top of what existed before the call.
    records = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    held = peak = 0
    for record in records:
        held += record.nbytes()
        peak = max(peak, held)
    return peak


def measure_peak_memory_mb(
    fn: Callable[[], object], device: torch.device, *, grad_to_none: list[torch.Tensor] = ()
) -> float | None:
    for t in grad_to_none:
        t.grad = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    try:
        return _cpu_peak_bytes(fn) / 2**20
    except Exception:  # profiler internals differ between torch versions: no number beats a wrong one
        return None


# ---------------------------------------------------------------------------------------------------------
# Running a grid
# ---------------------------------------------------------------------------------------------------------


def mode_step(forward: Callable[[], torch.Tensor], mode: str, inputs: Inputs) -> tuple[Callable[[], object], list]:
    """The callable to time for ``mode`` and the inputs whose grads are reset between calls."""
    grad_inputs = [t for t in inputs.values() if isinstance(t, torch.Tensor) and t.requires_grad]
    if mode == "fwd":
        return forward, grad_inputs
    out = forward()
    grad = torch.ones_like(out) if out.dim() == 0 else torch.randn_like(out)
    if mode == "bwd":
        return (lambda: out.backward(grad, retain_graph=True)), grad_inputs
    if mode == "fwd_bwd":
        del out  # only its shape was needed; don't hold its graph during the timed calls
        return (lambda: forward().backward(grad)), grad_inputs
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def _error_text(exc: BaseException) -> str:
    # One line for the CSV; the cause often sits on a later line (torch.compile's "backend='inductor' raised:").
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:300]


def _empty_row(case: Case, provider: Provider, header: dict, status: str, error: str = "") -> dict:
    row = dict.fromkeys(CSV_COLUMNS)
    row.update(
        op=case.op,
        provider=provider.name,
        is_baseline=provider.is_baseline,
        mode=case.mode,
        dtype=str(case.dtype).removeprefix("torch."),
        shape=case.shape_str,
        status=status,
        error=error,
        **{key: header[key] for key in ("device", "torch", "triton", "git_sha", "timestamp")},
    )
    return row


def measure_case(
    bench: OpBenchmark,
    provider: Provider,
    forward: Callable[[], torch.Tensor],
    case: Case,
    inputs: Inputs,
    device: torch.device,
    header: dict,
    rep_ms: float,
    counter=None,
    prepared: "PendingCase | None" = None,
) -> dict:
    """One row. ``prepared``: the step already built, and timed in rounds on CPU (run_benchmark)."""
    try:
        if prepared is None:
            step, grad_inputs = mode_step(forward, case.mode, inputs)
            timing = measure_time(step, device, grad_to_none=grad_inputs, rep_ms=rep_ms)
        else:
            if prepared.error is not None:
                return _empty_row(case, provider, header, "error", prepared.error)
            step, grad_inputs, timing = prepared.step, prepared.grad_inputs, prepared.timer.timing()
        peak_mem_mb = measure_peak_memory_mb(step, device, grad_to_none=grad_inputs)
        joules = None if counter is None else measure_energy_j(step, device, counter, timing.p50_ms, grad_inputs)
    except Exception as exc:  # a failing provider (compile error, OOM, ...) must not end the run
        return _empty_row(case, provider, header, "error", _error_text(exc))
    row = _empty_row(case, provider, header, "ok")
    seconds = timing.p50_ms * 1e-3
    row.update(
        p50_ms=timing.p50_ms,
        p20_ms=timing.p20_ms,
        p80_ms=timing.p80_ms,
        first_call_ms=timing.first_call_ms,
        peak_mem_mb=peak_mem_mb,
    )
    if bench.bytes_moved is not None:
        row["bytes"] = bench.bytes_moved(case)
        row["gbps"] = row["bytes"] / seconds / 1e9
        row["pct_bw"] = 100.0 * row["gbps"] / header["peak_bandwidth_gbps"]
    if bench.flops is not None:
        row["flops"] = bench.flops(case)
        row["tflops"] = row["flops"] / seconds / 1e12
        if header["peak_tflops"] and _same_precision_class(row["dtype"], header["peak_tflops_dtype"]):
            row["pct_tflops"] = 100.0 * row["tflops"] / header["peak_tflops"]
    if joules is not None:
        row["j_per_iter"] = joules
        row["gco2_per_1k_iter"] = 1000 * grams_co2(joules, header["grid_intensity_gco2_per_kwh"])
    return row


def _same_precision_class(dtype: str, peak_dtype: str) -> bool:
    """fp16 and bf16 share the tensor-core peak; fp32 rows compare only with an fp32 peak."""
    half = ("bfloat16", "float16")
    return dtype == peak_dtype or (dtype in half and peak_dtype in half)


def measure_energy_j(
    fn: Callable[[], object], device: torch.device, counter, p50_ms: float, grad_to_none: list[torch.Tensor] = ()
) -> float:
    """Joules per call: ``fn`` back to back for at least ENERGY_MIN_SECONDS between two counter reads."""
    calls = max(MIN_REPS, int(ENERGY_MIN_SECONDS * 1e3 / max(p50_ms, 1e-3)) + 1)
    _sync(device)
    start = counter.read()
    for _ in range(calls):
        for t in grad_to_none:
            t.grad = None
        fn()
    _sync(device)
    return (counter.read() - start) / calls


def add_speedups(rows: list[dict]) -> None:
    """speedup = best baseline p50 / this p50 for every torchnova row with a baseline in its group."""
    best: dict[tuple, float] = {}
    for row in rows:
        if row["is_baseline"] and row["status"] == "ok":
            key = (row["op"], row["shape"], row["dtype"], row["mode"])
            best[key] = min(best.get(key, float("inf")), row["p50_ms"])
    for row in rows:
        key = (row["op"], row["shape"], row["dtype"], row["mode"])
        if not row["is_baseline"] and row["status"] == "ok" and key in best:
            row["speedup"] = best[key] / row["p50_ms"]


def select_providers(providers: list[Provider], patterns: Iterable[str] | None) -> list[Provider]:
    """Providers whose name contains any of ``patterns`` (all of them when None): "torchnova" picks every backend."""
    if not patterns:
        return list(providers)
    return [p for p in providers if any(pattern in p.name for pattern in patterns)]


def run_benchmark(
    bench: OpBenchmark,
    device: torch.device,
    header: dict,
    *,
    shapes: list[dict[str, int]],
    dtypes: Iterable[torch.dtype],
    modes: Iterable[str] = MODES,
    providers: list[Provider] | None = None,
    rep_ms: float = 100.0,
    on_step: Callable[[str], None] = lambda description: None,
    counter=None,
) -> list[dict]:
    """Measure every provider × shape × dtype × mode; ``on_step`` is called once per measurement (progress).
    ``counter``: an energy counter of ``torchnova.energy`` (None: no energy columns)."""
    providers = bench.providers if providers is None else providers
    dtypes, modes = list(dtypes), list(modes)
    rows = []
    for shape in shapes:
        for dtype in dtypes:
            cases = [Case(bench.name, shape, dtype, mode) for mode in modes]
            try:
                inputs = bench.make_inputs(shape, dtype, device)
            except Exception as exc:
                error = _error_text(exc)
                rows += [_empty_row(c, p, header, "error", f"inputs: {error}") for p in providers for c in cases]
                _advance(on_step, cases[0], len(providers) * len(cases))
                continue
            rows += _run_cases(bench, providers, cases, inputs, device, header, rep_ms, on_step, counter)
            del inputs
            if device.type == "cuda":
                torch.cuda.empty_cache()
    add_speedups(rows)
    return rows


def _advance(on_step: Callable[[str], None], case: Case, n: int) -> None:
    for _ in range(n):
        on_step(case.shape_str)


@dataclass
class PendingCase:
    """A provider's step for one case: built before the CPU timing rounds, or (GPU) measured at once into row."""

    provider: Provider
    forward: Callable[[], torch.Tensor]
    case: Case
    step: Callable[[], object] | None = None
    grad_inputs: list = field(default_factory=list)
    timer: CpuTimer | None = None
    error: str | None = None
    row: dict | None = None


def _run_cases(bench, providers, cases, inputs, device, header, rep_ms, on_step, counter) -> list[dict]:
    """Rows of every provider x mode of one (shape, dtype), in provider order. On a GPU each is measured as soon
    as it is built (one retained graph at a time); on CPU all are built first and timed in CPU_ROUNDS rounds
    in turn (CpuTimer), then their memory and energy are measured one by one."""
    slots: list = []  # a skipped / failed provider's row (dict) or a PendingCase
    for provider in providers:
        try:
            why = provider.reasons(inputs)
            forward = None if why else provider.make(inputs)
        except Exception as exc:
            slots += [_empty_row(c, provider, header, "error", _error_text(exc)) for c in cases]
            continue
        if why:
            slots += [_empty_row(c, provider, header, "skipped", "; ".join(why)) for c in cases]
            continue
        for case in cases:
            pending = PendingCase(provider, forward, case)
            slots.append(pending)
            if device.type == "cuda":
                on_step(f"{case.shape_str} {case.mode} {provider.name}")
                pending.row = measure_case(bench, provider, forward, case, inputs, device, header, rep_ms, counter)
                continue
            try:
                pending.step, pending.grad_inputs = mode_step(forward, case.mode, inputs)
                pending.timer = CpuTimer(pending.step, pending.grad_inputs)
            except Exception as exc:
                pending.error = _error_text(exc)
    pending_cases = [slot for slot in slots if isinstance(slot, PendingCase) and slot.row is None]
    for _ in range(CPU_ROUNDS if pending_cases else 0):
        for pending in pending_cases:
            if pending.error is None:
                try:
                    pending.timer.sample(rep_ms / CPU_ROUNDS)
                except Exception as exc:
                    pending.error = _error_text(exc)
    rows = []
    for slot in slots:
        if isinstance(slot, PendingCase) and slot.row is not None:
            rows.append(slot.row)
            continue
        if isinstance(slot, dict):
            on_step(slot["shape"])
            rows.append(slot)
            continue
        on_step(f"{slot.case.shape_str} {slot.case.mode} {slot.provider.name}")
        rows.append(
            measure_case(bench, slot.provider, slot.forward, slot.case, inputs, device, header, rep_ms, counter, slot)
        )
        slot.step = slot.timer = None  # release the retained graph before the next one is measured
    return rows


# ---------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------


def _csv_value(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def write_results(rows: list[dict], header: dict, out_dir: Path, op: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = out_dir / f"{op}.csv", out_dir / f"{op}.json"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows({k: _csv_value(row[k]) for k in CSV_COLUMNS} for row in rows)
    json_path.write_text(json.dumps({"header": header, "rows": rows}, indent=1) + "\n")
    written = [csv_path, json_path]
    plot_path = plot_results(rows, header, out_dir / f"{op}.png")
    if plot_path is not None:
        written.append(plot_path)
    return written


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 10**digits else f"{value:.0f}"
    return str(value)


def format_table(rows: list[dict]) -> str:
    """One aligned table per (op, dtype, mode); skipped providers are listed once, with their reasons."""
    measured = [r for r in rows if r["status"] != "skipped"]
    columns = [
        ("shape", lambda r: r["shape"]),
        ("provider", lambda r: r["provider"]),
        ("p50 ms", lambda r: _fmt(r["p50_ms"])),
        ("p20-p80 ms", lambda r: f"{_fmt(r['p20_ms'])}-{_fmt(r['p80_ms'])}"),
        ("1st call ms", lambda r: _fmt(r["first_call_ms"])),
        ("peak MB", lambda r: _fmt(r["peak_mem_mb"])),
    ]
    if any(r["gbps"] is not None for r in measured):
        columns += [("GB/s", lambda r: _fmt(r["gbps"])), ("%BW", lambda r: _fmt(r["pct_bw"], 2))]
    if any(r["tflops"] is not None for r in measured):
        columns += [("TFLOP/s", lambda r: _fmt(r["tflops"]))]
    if any(r["pct_tflops"] is not None for r in measured):
        columns += [("%peak", lambda r: _fmt(r["pct_tflops"], 2))]
    if any(r["j_per_iter"] is not None for r in measured):
        columns += [("J/iter", lambda r: _fmt(r["j_per_iter"])), ("gCO2/1k", lambda r: _fmt(r["gco2_per_1k_iter"]))]
    columns += [("speedup", lambda r: f"{r['speedup']:.2f}x" if r["speedup"] is not None else "")]

    blocks = []
    for group_key in dict.fromkeys((r["op"], r["dtype"], r["mode"]) for r in measured):
        group = [r for r in measured if (r["op"], r["dtype"], r["mode"]) == group_key]
        # An error row fills the columns after shape and provider with its message.
        cells = [[get(r) for _, get in columns] if r["status"] == "ok" else [r["shape"], r["provider"]] for r in group]
        widths = [max([len(name)] + [len(c[i]) for c in cells if i < len(c)]) for i, (name, _) in enumerate(columns)]
        lines = [" | ".join(group_key), _aligned([name for name, _ in columns], widths)]
        for row, c in zip(group, cells):
            text = _aligned(c, widths)
            lines.append(text if row["status"] == "ok" else f"{text}  {row['status']}: {row['error']}")
        blocks.append("\n".join(lines))
    skipped = dict.fromkeys((r["provider"], r["error"]) for r in rows if r["status"] == "skipped")
    if skipped:
        blocks.append("skipped providers:\n" + "\n".join(f"  {name}: {why}" for name, why in skipped))
    return "\n\n".join(blocks)


def summarize(rows: list[dict]) -> list[dict]:
    """Per (op, shape, dtype, mode): torchnova's fastest backend against the fastest baseline."""
    summary = []
    ok = [r for r in rows if r["status"] == "ok"]
    for key in dict.fromkeys((r["op"], r["shape"], r["dtype"], r["mode"]) for r in ok):
        group = [r for r in ok if (r["op"], r["shape"], r["dtype"], r["mode"]) == key]
        ours = min((r for r in group if not r["is_baseline"]), key=lambda r: r["p50_ms"], default=None)
        theirs = min((r for r in group if r["is_baseline"]), key=lambda r: r["p50_ms"], default=None)
        if ours is None:
            continue
        summary.append(
            {
                "op": key[0], "shape": key[1], "dtype": key[2], "mode": key[3],
                "torchnova": ours["provider"], "torchnova_ms": ours["p50_ms"],
                "baseline": theirs["provider"] if theirs else None, "baseline_ms": theirs["p50_ms"] if theirs else None,
                "speedup": ours["speedup"],
                # % of the device's peak: bandwidth for memory-bound ops, matmul throughput for attention
                "pct_peak": ours["pct_bw"] if ours["pct_bw"] is not None else ours["pct_tflops"],
                "peak_kind": "BW" if ours["pct_bw"] is not None else ("TFLOP/s" if ours["pct_tflops"] else None),
                "j_per_iter": ours["j_per_iter"],
            }
        )  # fmt: skip
    return summary


def format_summary(rows: list[dict]) -> str:
    """One line per (shape, dtype, mode): best torchnova backend vs best baseline, speedup, % of peak, J/iter."""
    summary = summarize(rows)
    if not summary:
        return ""
    names = ["shape", "dtype", "mode", "torchnova", "ms", "best baseline", "ms", "speedup", "% peak", "J/iter"]
    cells = [
        [
            s["shape"], s["dtype"], s["mode"], s["torchnova"].removeprefix("torchnova-"), _fmt(s["torchnova_ms"]),
            s["baseline"] or "-", _fmt(s["baseline_ms"]), f"{s['speedup']:.2f}x" if s["speedup"] else "-",
            f"{_fmt(s['pct_peak'], 2)}% {s['peak_kind']}" if s["pct_peak"] is not None else "-", _fmt(s["j_per_iter"]),
        ]
        for s in summary
    ]  # fmt: skip
    widths = [max(len(names[i]), *(len(c[i]) for c in cells)) for i in range(len(names))]
    lines = [f"summary: {summary[0]['op']} (torchnova's fastest backend vs the fastest baseline)"]
    lines += ["  ".join(n.ljust(w) for n, w in zip(names, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(c, widths)) for c in cells]
    return "\n".join(lines)


def carbon_line(
    rows: list[dict],
    regions: list[tuple[str, GridIntensity]],
    *,
    why_na: str,
    note: str = "",
    hourly: HourlyIntensity | None = None,
    iterations: int = 1000,
) -> str:
    """The CO2 of ``iterations`` calls of one row priced in every region, from its measured energy (or the regions'
    intensities and ``why_na`` where it has none); with ``hourly``, the cheapest and most expensive start hour
    for a run of that length. The row: torchnova's fastest backend on the grid's last (largest) shape in
    ``fwd_bwd`` (a training step), else in the last mode measured."""
    summary = summarize(rows)
    if not summary:
        return ""
    mode = "fwd_bwd" if any(s["mode"] == "fwd_bwd" for s in summary) else summary[-1]["mode"]
    pick = [s for s in summary if s["mode"] == mode][-1]
    seconds = iterations * pick["torchnova_ms"] * 1e-3
    joules = None if pick["j_per_iter"] is None else iterations * pick["j_per_iter"]
    what = (
        f"{iterations:,} iterations of {pick['op']} {mode} {pick['shape']} {pick['dtype']} "
        f"({pick['torchnova']}, {seconds:.3g} s)"
    )
    lines = [region_prices(joules, regions, what=what, note=note, why_na=why_na)]
    if hourly is not None:
        lines.append(start_hours_line(hourly, seconds, joules, what=f"{iterations:,} iterations"))
    return "\n".join(lines)


def _aligned(values: list[str], widths: list[int]) -> str:
    """Shape and provider left-aligned, numbers right-aligned."""
    return "  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths)))


def plot_results(rows: list[dict], header: dict, path: Path) -> Path | None:
    """Grouped bars per shape and provider, one panel per (dtype, mode): GB/s if the op has a bytes formula,
    else TFLOP/s if it has a FLOP formula, else p50 ms. None when matplotlib is missing or nothing ran."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return None
    if ok[0]["gbps"] is not None:
        metric, label = "gbps", "GB/s"
    elif ok[0]["tflops"] is not None:
        metric, label = "tflops", "TFLOP/s"
    else:
        metric, label = "p50_ms", "p50 ms"
    dtypes, modes = list(dict.fromkeys(r["dtype"] for r in ok)), list(dict.fromkeys(r["mode"] for r in ok))
    shapes, providers = list(dict.fromkeys(r["shape"] for r in ok)), list(dict.fromkeys(r["provider"] for r in ok))
    fig, axes = plt.subplots(len(dtypes), len(modes), figsize=(5 * len(modes), 3.6 * len(dtypes)), squeeze=False)
    width = 0.8 / len(providers)
    for (i, dtype), (j, mode) in ((a, b) for a in enumerate(dtypes) for b in enumerate(modes)):
        ax = axes[i][j]
        values = {(r["shape"], r["provider"]): r[metric] for r in ok if (r["dtype"], r["mode"]) == (dtype, mode)}
        for k, provider in enumerate(providers):
            heights = [values.get((s, provider)) or 0.0 for s in shapes]
            ax.bar([x + k * width for x in range(len(shapes))], heights, width, label=provider)
        if metric == "gbps":
            ax.axhline(header["peak_bandwidth_gbps"], color="black", linestyle="--", linewidth=0.8, label="peak BW")
        centers = [x + 0.4 - width / 2 for x in range(len(shapes))]
        ax.set_xticks(centers, [s.replace(" ", "\n") for s in shapes], fontsize=7)
        ax.set_title(f"{dtype} {mode}", fontsize=9)
        ax.set_ylabel(label)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{ok[0]['op']} on {header['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
