"""Plain training vs SAF vs MESA on a real offline dataset (scikit-learn's 8×8 handwritten digits), with sharpness.

    python examples/train_mesa.py                 # 3 seeds × 3 methods × 40 epochs, ~1-2 min on 2 CPU cores
    python examples/train_mesa.py --quick         # 1 seed, 4 epochs: a smoke test (the test suite runs it)

For each method and seed: a small CNN trained with SGD + cosine schedule; SAF adds 0.3·τ²·KL against the
model's own logits from `epochs_ago` epochs before, MESA adds 0.8·τ²·KL against an EMA of the weights (both from
`start_epoch` on, τ = 5, the paper's defaults). The EMA decay is scaled to this tiny dataset: the paper's 0.9998
averages over ~5000 steps ≈ one ImageNet epoch at its batch size; here an epoch is ~23 steps, so 0.95.

Sharpness, measured on the training set at the end (the papers' claim is flatter minima), is the increase of the
training loss when the weights w move by ε with ‖ε‖ = ρ (SAM's definition):
  random:       mean over draws of L(w + ρ·u/‖u‖) − L(w), u ~ N(0, I)
  adversarial:  L(w + ρ·g/‖g‖) − L(w), g = ∇L(w) (SAM's one-step ascent)
Prints a table (test accuracy mean ± std over seeds, final train loss, time per epoch, extra memory, energy,
sharpness) and saves a PNG of the curves when matplotlib is available.

Then the carbon study's comparison: the CO2 of one whole training of each method priced in contrasting regions
(Norway, France, US central, Germany, India, and yours: --country FRA, --cloud gcp:europe-west1 or
--grid-intensity G) from the same measured energy, with CodeCarbon's bundled intensities (pip install
torchnova[carbon]). Where the machine has no energy counter (RAPL/NVML) the CO2 cells say n/a and only the
intensities are shown. --hourly-csv PATH (hour, gCO2/kWh of your grid) adds the cheapest and the most expensive
hour to start a training of the measured length.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import torchnova
from torchnova.energy import (
    EnergyMeter,
    comparison_regions,
    describe_regions,
    grid_intensity,
    load_hourly_intensity,
    start_hours_line,
)
from torchnova.mesa import memory_estimate


def load_digits_tensors(seed: int = 0):
    from sklearn.datasets import load_digits  # ships with scikit-learn: no download

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8) in [0, 1]
    y = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    split = int(0.75 * len(x))
    mean, std = x[:split].mean(), x[:split].std()
    x = (x - mean) / std
    return (x[:split], y[:split]), (x[split:], y[split:])


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),  # 4×4
        nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(32, 10),
    )  # fmt: skip


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    model.eval()
    logits = model(x)
    return nn.functional.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def train_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    model.eval()  # BN running statistics: the loss is a function of the weights only
    return nn.functional.cross_entropy(model(x), y)


@torch.no_grad()
def _shift(params: list[torch.Tensor], direction: list[torch.Tensor], scale: float) -> None:
    torch._foreach_add_(params, direction, alpha=scale)


def sharpness(model: nn.Module, x: torch.Tensor, y: torch.Tensor, rho: float, draws: int = 10) -> tuple[float, float]:
    """(random, adversarial) increase of the training loss at radius ``rho``."""
    params = [p for p in model.parameters()]
    with torch.no_grad():
        base = train_loss(model, x, y).item()
    generator = torch.Generator().manual_seed(1234)
    increases = []
    for _ in range(draws):
        u = [torch.randn(p.shape, generator=generator) for p in params]
        scale = rho / math.sqrt(sum(float((t * t).sum()) for t in u))
        _shift(params, u, scale)
        with torch.no_grad():
            increases.append(train_loss(model, x, y).item() - base)
        _shift(params, u, -scale)
    grads = torch.autograd.grad(train_loss(model, x, y), params)
    scale = rho / math.sqrt(sum(float((g * g).sum()) for g in grads))
    _shift(params, list(grads), scale)
    with torch.no_grad():
        adversarial = train_loss(model, x, y).item() - base
    _shift(params, list(grads), -scale)
    return statistics.mean(increases), adversarial


def warm_up(x: torch.Tensor) -> None:
    """oneDNN builds its conv kernels on first use: keep that out of the first method's time per epoch."""
    model = small_cnn()
    for _ in range(3):
        model(x).sum().backward()


def run(method: str, seed: int, data, args) -> dict:
    (x_train, y_train), (x_test, y_test) = data
    torch.manual_seed(seed)
    model = small_cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps_per_epoch = math.ceil(len(x_train) / args.batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs * steps_per_epoch)
    regularizer, extra_bytes = None, 0.0
    if method == "mesa":
        regularizer = torchnova.MESA(model, decay=args.decay, temperature=5.0, weight=0.8, start_epoch=args.start_epoch)
        extra_bytes = memory_estimate(model, num_samples=1, num_classes=10)["teacher_bytes"]
    elif method == "saf":
        regularizer = torchnova.SAF(
            len(x_train), 10, epochs_ago=args.epochs_ago, temperature=5.0, weight=0.3, start_epoch=args.start_epoch
        )
        extra_bytes = float(regularizer.bank.numel() * regularizer.bank.element_size())

    history = {"test_acc": [], "train_loss": []}
    epoch_seconds, energy = [], []
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        total, seen = 0.0, 0
        with EnergyMeter("cpu", grid_intensity=args.grid) as meter:
            for indices in order.split(args.batch_size):
                x, y = x_train[indices], y_train[indices]
                logits = model(x)
                loss = nn.functional.cross_entropy(logits, y)
                if method == "mesa":
                    loss = loss + regularizer.loss(logits, x, epoch=epoch)
                elif method == "saf":
                    loss = loss + regularizer.loss(logits, indices, epoch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                if method == "mesa":
                    regularizer.update()
                total += loss.item() * len(indices)
                seen += len(indices)
        epoch_seconds.append(meter.seconds)
        energy.append(meter)
        history["train_loss"].append(total / seen)
        history["test_acc"].append(evaluate(model, x_test, y_test)[1])
    random_sharp, adversarial_sharp = sharpness(model, x_train, y_train, args.rho)
    joules = [m.joules for m in energy]
    return {
        "method": method, "seed": seed, "history": history, "test_acc": history["test_acc"][-1],
        "train_loss": history["train_loss"][-1], "s_per_epoch": statistics.median(epoch_seconds),
        "extra_mb": extra_bytes / 2**20, "sharp_random": random_sharp, "sharp_adversarial": adversarial_sharp,
        "j_per_epoch": statistics.mean(joules) if all(j is not None for j in joules) else None,
        "gco2_per_epoch": statistics.mean(m.grams_co2 for m in energy) if joules[0] is not None else None,
        "energy_note": energy[0].reason,
        "train_seconds": sum(epoch_seconds),  # the training loop itself: the evaluations in between excluded
        "train_joules": sum(joules) if all(j is not None for j in joules) else None,
    }  # fmt: skip


def _mean_std(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    mean = statistics.mean(values) * scale
    std = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def summarize(results: list[dict], methods: list[str], rho: float) -> str:
    header = ["method", "test acc %", "train loss", "s/epoch", "extra MB", "J/epoch",
              f"sharp. random ρ={rho:g}", f"sharp. adversarial ρ={rho:g}"]  # fmt: skip
    rows = []
    for method in methods:
        runs = [r for r in results if r["method"] == method]
        joules = [r["j_per_epoch"] for r in runs]
        rows.append([
            method, _mean_std([r["test_acc"] for r in runs], 100.0),
            _mean_std([r["train_loss"] for r in runs], digits=4),
            f"{statistics.median(r['s_per_epoch'] for r in runs):.3f}", f"{runs[0]['extra_mb']:.3f}",
            _mean_std(joules, digits=1) if None not in joules else "n/a",
            _mean_std([r["sharp_random"] for r in runs], digits=4),
            _mean_std([r["sharp_adversarial"] for r in runs], digits=4),
        ])  # fmt: skip
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = [" | ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines += [" | ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def region_table(results: list[dict], methods: list[str], regions) -> str:
    """The carbon study's comparison: one row per region (intensity, ratio to the cleanest), one column per
    method with the CO2 of one whole training (mean over seeds), all from the same measured energy."""
    cleanest = min(grid.g_per_kwh for _, grid in regions)
    header = ["region", "gCO2/kWh", "x cleanest"] + [f"{m} gCO2" for m in methods]
    rows = []
    for label, grid in regions:
        row = [label if label != "yours" else f"yours ({grid.name})", f"{grid.g_per_kwh:.0f}",
               f"{grid.g_per_kwh / cleanest:.1f}" if cleanest > 0 else "-"]  # fmt: skip
        for method in methods:
            joules = [r["train_joules"] for r in results if r["method"] == method]
            row.append("n/a" if None in joules else f"{grid.grams(statistics.mean(joules)):.3g}")
        rows.append(row)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = [" | ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines += [" | ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def plot(results: list[dict], methods: list[str], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 3.8))
    for method in methods:
        runs = [r["history"] for r in results if r["method"] == method]
        epochs = range(1, len(runs[0]["test_acc"]) + 1)
        acc = [statistics.mean(h["test_acc"][e] for h in runs) * 100 for e in range(len(epochs))]
        loss = [statistics.mean(h["train_loss"][e] for h in runs) for e in range(len(epochs))]
        ax_acc.plot(epochs, acc, label=method)
        ax_loss.plot(epochs, loss, label=method)
    ax_acc.set(xlabel="epoch", ylabel="test accuracy %", title="digits: test accuracy (mean over seeds)")
    ax_loss.set(xlabel="epoch", ylabel="train loss (incl. regularizer)", yscale="log", title="train loss")
    ax_acc.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 4 epochs (smoke test)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--start-epoch", type=int, default=5)
    parser.add_argument("--epochs-ago", type=int, default=2, help="SAF: the README's 2")
    parser.add_argument("--decay", type=float, default=0.95, help="MESA EMA decay (see the module docstring)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--rho", type=float, default=0.5, help="sharpness radius (absolute, as SAM's rho)")
    parser.add_argument("--out", type=Path, default=Path("examples/output"))
    carbon = parser.add_mutually_exclusive_group()
    carbon.add_argument("--country", default=None, metavar="ISO3", help="your grid (CodeCarbon's data), e.g. FRA")
    carbon.add_argument("--cloud", default=None, metavar="PROVIDER:REGION", help="your grid, e.g. gcp:europe-west1")
    carbon.add_argument("--grid-intensity", type=float, default=None, metavar="G", help="your grid in gCO2/kWh")
    parser.add_argument("--hourly-csv", type=Path, default=None, metavar="PATH", help="(hour, gCO2/kWh) of your grid")
    args = parser.parse_args(argv)
    try:
        args.grid = grid_intensity(args.grid_intensity, country=args.country, cloud=args.cloud)
        hourly = load_hourly_intensity(args.hourly_csv) if args.hourly_csv is not None else None
    except (ValueError, OSError) as exc:
        parser.error(str(exc))
    if args.quick:
        args.seeds, args.epochs, args.start_epoch, args.epochs_ago = 1, 4, 1, 1
    data = load_digits_tensors()
    methods = ["plain", "saf", "mesa"]
    warm_up(data[0][0][: args.batch_size])
    results = []
    start = time.perf_counter()
    for seed in range(args.seeds):
        for method in methods:
            result = run(method, seed, data, args)
            results.append(result)
            print(
                f"seed {seed} {method:5s}: test acc {100 * result['test_acc']:.2f}%  "
                f"train loss {result['train_loss']:.4f}  {result['s_per_epoch']:.3f} s/epoch",
                flush=True,
            )
    print(f"\n{args.seeds} seed(s) × {args.epochs} epochs, {len(data[0][0])} train / {len(data[1][0])} test digits, "
          f"{time.perf_counter() - start:.0f} s\n")  # fmt: skip
    print(summarize(results, methods, args.rho))
    if results[0]["j_per_epoch"] is None:
        print(f"\nenergy: n/a ({results[0]['energy_note']})")
    regions, note = comparison_regions(args.grid)
    print(f"\nCO2 of one training ({args.epochs} epochs, mean over seeds) by region, from the same measured energy")
    print(region_table(results, methods, regions))
    if results[0]["train_joules"] is None:
        print(f"(energy not measurable here: {results[0]['energy_note']}; the CO2 of any energy scales as gCO2/kWh)")
    print(f"intensities{f' ({note})' if note else ''}:\n{describe_regions(regions)}")
    if hourly is not None:
        for method in methods:
            runs = [r for r in results if r["method"] == method]
            joules = [r["train_joules"] for r in runs]
            seconds = statistics.mean(r["train_seconds"] for r in runs)
            energy = None if None in joules else statistics.mean(joules)
            print(start_hours_line(hourly, seconds, energy, what=f"one {method} training"))
    args.out.mkdir(parents=True, exist_ok=True)
    path = plot(results, methods, args.out / "train_mesa.png")
    if path is not None:
        print(f"\ncurves: {path}")
    return results


if __name__ == "__main__":
    main()
