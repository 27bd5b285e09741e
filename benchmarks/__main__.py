"""``python -m benchmarks``: run every op's benchmark on this machine (see ``benchmarks/harness.py``).

Examples:
  python -m benchmarks                          # all ops; --quick grid on CPU, full grid on a GPU
  python -m benchmarks --ops mesa_kl --providers torchnova,torch-eager --dtype bf16 --modes fwd,fwd_bwd
  python -m benchmarks --full --out /tmp/results
  python -m benchmarks --compare saved/ --fail-if-regression 10   # exit 1 if a torchnova row got >10% slower
  python -m benchmarks --current new/ --compare old/             # compare two saved runs, measure nothing
  python -m benchmarks --grid-intensity 56                        # gCO2/kWh of your grid (default: 475)
  python -m benchmarks --tune                                     # GPU: measure the backends, write auto's order
  python -m benchmarks --country FRA                              # your grid from CodeCarbon's data (or --cloud
                                                                  #   gcp:europe-west1); pip install torchnova[carbon]
  python -m benchmarks --hourly-csv grid.csv                      # + cheapest / most expensive start hour

After each op's table, one line prices the energy of 1,000 iterations in contrasting regions (Norway, France, US
central, Germany, India, and yours) from CodeCarbon's bundled data; where the energy cannot be measured (no RAPL
or NVML), the line says so and shows the regions' intensities only.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

import torch

from torchnova.energy import (
    DEFAULT_GRID_INTENSITY,
    comparison_regions,
    describe_regions,
    energy_counter,
    grid_intensity,
    load_hourly_intensity,
)

from . import compare, harness

# op name -> "module" with a ``benchmark() -> OpBenchmark``, or "module:function"; a new op adds its line here.
OP_MODULES = {
    "mesa_kl": "benchmarks.bench_mesa_kl",
    "mesa_step": "benchmarks.bench_mesa_training:mesa_step_benchmark",
    "ema_update": "benchmarks.bench_mesa_training:ema_benchmark",
    "temporal_attention": "benchmarks.bench_spacetime:temporal_benchmark",
    "spatial_attention": "benchmarks.bench_spacetime:spatial_benchmark",
    "dual_channel": "benchmarks.bench_dual_channel",
    # torchnova.integrations.diffusers (needs diffusers): patched vs diffusers' own SDPA processors
    "diffusers_temporal_attn": "benchmarks.bench_diffusers:temporal_attn_benchmark",
    "diffusers_spatial_attn": "benchmarks.bench_diffusers:spatial_attn_benchmark",
    "diffusers_motion_module": "benchmarks.bench_diffusers:motion_module_benchmark",
    "diffusers_unet3d": "benchmarks.bench_diffusers:unet3d_benchmark",
    # torchnova.integrations.video_diffusion_pytorch (needs video-diffusion-pytorch)
    "vdp_model": "benchmarks.bench_integrations:model_benchmark",
    "vdp_attention": "benchmarks.bench_integrations:attention_benchmark",
}
DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}  # fmt: skip
# Timing budget per measurement in ms, by (device type, quick): do_bench's rep on CUDA (100 is its default),
# the sampling budget of the perf_counter timer on CPU, where calls are slower and noisier.
REP_MS = {("cuda", True): 25.0, ("cuda", False): 100.0, ("cpu", True): 150.0, ("cpu", False): 1000.0}


def _csv_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmark torchnova's ops against PyTorch baselines (conventions: benchmarks/harness.py).",
    )
    parser.add_argument("--ops", type=_csv_list, default=list(OP_MODULES), help=f"comma list from {list(OP_MODULES)}")
    parser.add_argument(
        "--providers", type=_csv_list, default=None,
        help="comma list; a provider runs if its name contains any item (e.g. torchnova,torch-eager,liger)",
    )  # fmt: skip
    parser.add_argument("--dtype", type=_csv_list, default=None, help=f"comma list from {list(DTYPES)}")
    parser.add_argument("--modes", type=_csv_list, default=list(harness.MODES), help="comma list of fwd,bwd,fwd_bwd")
    grid = parser.add_mutually_exclusive_group()
    grid.add_argument("--quick", action="store_true", help="small shapes, short timing (the default on CPU)")
    grid.add_argument("--full", action="store_true", help="every shape (the default on a GPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results/<device>)")
    carbon = parser.add_mutually_exclusive_group()
    carbon.add_argument(
        "--grid-intensity", type=float, default=None, metavar="G",
        help=f"grid carbon intensity in gCO2/kWh for the CO2 columns (default {DEFAULT_GRID_INTENSITY:g}, "
        "IEA 2019 world average; or TORCHNOVA_GRID_INTENSITY)",
    )  # fmt: skip
    carbon.add_argument(
        "--country", default=None, metavar="ISO3",
        help="your grid: a country's intensity from CodeCarbon's bundled data, ISO 3166-1 alpha-3 (e.g. FRA)",
    )  # fmt: skip
    carbon.add_argument(
        "--cloud", default=None, metavar="PROVIDER:REGION",
        help="your grid: a cloud region's intensity from CodeCarbon's bundled data (e.g. gcp:europe-west1)",
    )  # fmt: skip
    parser.add_argument(
        "--hourly-csv", type=Path, default=None, metavar="PATH",
        help="CSV of (hour, gCO2/kWh) of your grid: adds the cheapest and most expensive start hour per op",
    )  # fmt: skip
    parser.add_argument("--compare", type=Path, default=None, metavar="PATH",
                        help="saved results (.json/.csv file or results folder) to compare this run with")  # fmt: skip
    parser.add_argument("--fail-if-regression", type=float, default=None, metavar="PCT",
                        help="with --compare: exit 1 when a torchnova row is more than PCT%% slower")  # fmt: skip
    parser.add_argument("--current", type=Path, default=None, metavar="PATH",
                        help="with --compare: take the current results from PATH instead of measuring")  # fmt: skip
    parser.add_argument("--tune", action="store_true",
                        help="GPU only: time the cuda and triton backends per (op, dtype, shape bucket) and write the "
                        "order backend='auto' follows on this GPU to the tune cache (torchnova._tuning)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.tune and not args.device.startswith("cuda"):
        parser.error("--tune measures GPU backends: it needs a CUDA device")
    if (args.fail_if_regression is not None or args.current is not None) and args.compare is None:
        parser.error("--fail-if-regression and --current need --compare PATH")
    if args.fail_if_regression is not None and args.fail_if_regression < 0:
        parser.error(f"--fail-if-regression must be >= 0, got {args.fail_if_regression}")
    unknown = [op for op in args.ops if op not in OP_MODULES] + [m for m in args.modes if m not in harness.MODES]
    unknown += [d for d in args.dtype or () if d not in DTYPES]
    if unknown:
        parser.error(f"unknown value(s): {', '.join(unknown)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.current is None:  # a measuring run: resolve the grid and the hourly profile now, errors as usage errors
        try:
            args.grid = grid_intensity(args.grid_intensity, country=args.country, cloud=args.cloud)
            args.hourly = load_hourly_intensity(args.hourly_csv) if args.hourly_csv is not None else None
        except (ValueError, TypeError, OSError) as exc:
            parser.error(str(exc))
    return args


def _progress(total: int):
    """(step, write, close): a tqdm bar over the grid when tqdm is importable; ``write`` prints above it."""
    try:
        from tqdm import tqdm
    except ImportError:
        return (lambda description: None), print, (lambda: None)
    bar = tqdm(total=total, unit="case", dynamic_ncols=True)

    def step(description: str) -> None:
        bar.set_description_str(description[:48])
        bar.update(1)

    return step, tqdm.write, bar.close


def main(argv: list[str] | None = None) -> int:
    start = time.perf_counter()
    args = parse_args(argv)
    # Read the saved run first: the new run may overwrite the very files it came from.
    baseline_rows = compare.load_rows(args.compare) if args.compare is not None else None
    if args.current is not None:
        return _report_comparison(baseline_rows, compare.load_rows(args.current), args.fail_if_regression)
    device = torch.device(args.device)
    if args.tune:
        from . import tune

        dtypes = [DTYPES[d] for d in args.dtype] if args.dtype else [torch.bfloat16, torch.float32]
        tune.tune(device, [op for op in args.ops if op in tune.TUNE_GRID], dtypes)
        return 0
    quick = args.quick or (device.type == "cpu" and not args.full)
    rep_ms = REP_MS[device.type, quick]
    spec = harness.device_spec(device)
    header = harness.machine_header(device, spec, args.grid)
    counter, why_no_counter = energy_counter(device)
    regions, regions_note = comparison_regions(args.grid)
    out_dir = args.out or Path(__file__).parent / "results" / harness.slug(spec.name)
    print(f"torchnova benchmarks ({'quick' if quick else 'full'} grid)\n{harness.format_header(header)}", flush=True)
    print(f"grid carbon intensity of the regions priced after each op{f' ({regions_note})' if regions_note else ''}:")
    print(describe_regions(regions) + "\n", flush=True)

    plans = []
    for op in args.ops:
        module, _, function = OP_MODULES[op].partition(":")
        bench = getattr(importlib.import_module(module), function or "benchmark")()
        dtypes = (
            [DTYPES[d] for d in args.dtype]
            if args.dtype
            else list(bench.cuda_dtypes if device.type == "cuda" else bench.cpu_dtypes)
        )
        shapes = bench.quick_shapes if quick else bench.shapes
        providers = harness.select_providers(bench.providers, args.providers)
        modes = [m for m in args.modes if m in bench.modes]
        if modes:
            plans.append((bench, shapes, dtypes, providers, modes))

    step, write, close = _progress(sum(len(s) * len(d) * len(p) * len(m) for _, s, d, p, m in plans))
    all_rows = []
    for bench, shapes, dtypes, providers, modes in plans:
        rows = harness.run_benchmark(
            bench, device, header, shapes=shapes, dtypes=dtypes, modes=modes, providers=providers,
            rep_ms=rep_ms, on_step=step, counter=counter,
        )  # fmt: skip
        written = harness.write_results(rows, header, out_dir, bench.name)
        write(f"\n{harness.format_table(rows)}\n\n{harness.format_summary(rows)}\n")
        carbon = harness.carbon_line(rows, regions, why_na=why_no_counter or "not measured", hourly=args.hourly)
        if carbon:
            write(f"{carbon}\n")
        write(f"wrote {', '.join(str(p) for p in written)}\n")
        all_rows += rows
    close()
    print(f"total {time.perf_counter() - start:.1f} s")
    if baseline_rows is not None:
        return _report_comparison(baseline_rows, all_rows, args.fail_if_regression)
    return 0


def _report_comparison(old_rows: list[dict], new_rows: list[dict], fail_pct: float | None) -> int:
    comparison = compare.compare(old_rows, new_rows)
    print("\ncomparison with the saved run (new/old p50; > 1 is slower now)")
    print(compare.format_comparison(comparison, fail_pct))
    if fail_pct is None:
        return 0
    slower = compare.regressions(comparison, fail_pct)
    if slower:
        print(f"\n{len(slower)} torchnova row(s) more than {fail_pct:g}% slower than the saved run")
        return 1
    print(f"\nno torchnova row more than {fail_pct:g}% slower than the saved run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
