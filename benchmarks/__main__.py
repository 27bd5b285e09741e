"""``python -m benchmarks``: run every op's benchmark on this machine (see ``benchmarks/harness.py``).

Examples:
  python -m benchmarks                          # all ops; --quick grid on CPU, full grid on a GPU
  python -m benchmarks --ops mesa_kl --providers torchnova,torch-eager --dtype bf16 --modes fwd,fwd_bwd
  python -m benchmarks --full --out /tmp/results
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

import torch

from . import harness

# op name -> module with a ``benchmark() -> OpBenchmark``; a new op adds its module here.
OP_MODULES = {
    "mesa_kl": "benchmarks.bench_mesa_kl",
    "dual_channel": "benchmarks.bench_dual_channel",
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
    args = parser.parse_args(argv)
    unknown = [op for op in args.ops if op not in OP_MODULES] + [m for m in args.modes if m not in harness.MODES]
    unknown += [d for d in args.dtype or () if d not in DTYPES]
    if unknown:
        parser.error(f"unknown value(s): {', '.join(unknown)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
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
    device = torch.device(args.device)
    quick = args.quick or (device.type == "cpu" and not args.full)
    rep_ms = REP_MS[device.type, quick]
    spec = harness.device_spec(device)
    header = harness.machine_header(device, spec)
    out_dir = args.out or Path(__file__).parent / "results" / harness.slug(spec.name)
    print(f"torchnova benchmarks ({'quick' if quick else 'full'} grid)\n{harness.format_header(header)}\n", flush=True)

    plans = []
    for op in args.ops:
        bench = importlib.import_module(OP_MODULES[op]).benchmark()
        dtypes = (
            [DTYPES[d] for d in args.dtype]
            if args.dtype
            else list(bench.cuda_dtypes if device.type == "cuda" else bench.cpu_dtypes)
        )
        shapes = bench.quick_shapes if quick else bench.shapes
        providers = harness.select_providers(bench.providers, args.providers)
        plans.append((bench, shapes, dtypes, providers))

    step, write, close = _progress(sum(len(s) * len(d) * len(p) * len(args.modes) for _, s, d, p in plans))
    for bench, shapes, dtypes, providers in plans:
        rows = harness.run_benchmark(
            bench, device, header, shapes=shapes, dtypes=dtypes, modes=args.modes, providers=providers,
            rep_ms=rep_ms, on_step=step,
        )  # fmt: skip
        written = harness.write_results(rows, header, out_dir, bench.name)
        write(f"\n{harness.format_table(rows)}\n\nwrote {', '.join(str(p) for p in written)}\n")
    close()
    print(f"total {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
