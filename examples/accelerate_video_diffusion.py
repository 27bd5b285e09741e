"""lucidrains' video-diffusion-pytorch, trained twice from the same seed: once as the library ships it, once with
its attention routed through torchnova by one line, ``torchnova.integrations.video_diffusion_pytorch.patch``.

    pip install video-diffusion-pytorch==0.7.0        # or: pip install 'torchnova[integrations]'
    python examples/accelerate_video_diffusion.py                # 200 steps each (a few minutes on 2 CPU cores)
    python examples/accelerate_video_diffusion.py --steps 2      # a smoke run (the test suite runs this)

Data, generated in code: videos of a coloured square or disc moving in a straight line (bouncing off the
borders) across a dark canvas, F frames of S×S pixels. Model: a small ``Unet3D`` (temporal attention with the
model's relative position bias and rotary embedding, one full spatial attention in the middle) inside
``GaussianDiffusion`` (cosine schedule, L1 noise-prediction loss), Adam.

Prints both loss curves side by side (same seed, same batches, same diffusion noise: the first steps agree to
fp32 rounding, ~1e-7; after that the rounding differences of two fp32 computations in a different order grow
through Adam as they would between any two such runs, so later steps differ by up to a few percent while the
curves take the same course), the mean loss of the last tenth of the steps, the median step time of each run, the
peak memory of one training step (CUDA: max_memory_allocated; CPU: torch.profiler's allocator high-water
mark), and saves ``<out>/accelerate_video_diffusion.png``: noisy, denoised (one x0 prediction from the
patched model at t = T/2) and clean frames of one video.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch


def moving_shapes(batch: int, frames: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """(B, 3, frames, size, size) videos in [0, 1]: one square or disc per video, constant velocity, bouncing."""
    videos = torch.full((batch, 3, frames, size, size), 0.05)
    ys, xs = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    for b in range(batch):
        radius = float(torch.randint(2, max(3, size // 4) + 1, (1,), generator=generator))
        position = torch.rand(2, generator=generator) * (size - 2 * radius) + radius
        velocity = (torch.rand(2, generator=generator) - 0.5) * size / 4
        colour = torch.rand(3, generator=generator) * 0.7 + 0.3
        disc = bool(torch.randint(0, 2, (1,), generator=generator))
        for t in range(frames):
            dy, dx = ys - position[0], xs - position[1]
            inside = (dy**2 + dx**2 <= radius**2) if disc else (dy.abs() <= radius) & (dx.abs() <= radius)
            videos[b, :, t][:, inside] = colour[:, None]
            position += velocity
            for axis in range(2):
                if not radius <= position[axis] <= size - radius:
                    velocity[axis] = -velocity[axis]
                    position[axis] = position[axis].clamp(radius, size - radius)
    return videos


def build(args, device):
    from video_diffusion_pytorch import GaussianDiffusion, Unet3D

    torch.manual_seed(args.seed)
    model = Unet3D(dim=args.dim, dim_mults=(1, 2), channels=3, attn_heads=args.heads, attn_dim_head=args.dim_head)
    diffusion = GaussianDiffusion(model, image_size=args.size, num_frames=args.frames, timesteps=args.timesteps)
    return diffusion.to(device)


def peak_memory_mb(step, device) -> float | None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
    except Exception:  # the profiler is optional here
        return None
    events = sorted((e.time_range.start, e.cpu_memory_usage) for e in prof.events() if e.cpu_memory_usage)
    level = peak = 0
    for _, delta in events:
        level += delta
        peak = max(peak, level)
    return peak / 2**20


def train(args, device, patched: bool) -> dict:
    import torchnova.integrations.video_diffusion_pytorch as tn_vdp

    diffusion = build(args, device)
    replaced = tn_vdp.patch(diffusion) if patched else 0
    optimizer = torch.optim.Adam(diffusion.parameters(), lr=args.lr)
    data = torch.Generator().manual_seed(args.seed + 1)
    torch.manual_seed(args.seed + 2)  # the diffusion's timesteps and noise: the same draws in both runs
    losses, times = [], []
    for _ in range(args.steps):
        videos = moving_shapes(args.batch, args.frames, args.size, data).to(device)
        start = time.perf_counter()
        loss = diffusion(videos)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    videos = moving_shapes(args.batch, args.frames, args.size, data).to(device)

    def one_step():
        diffusion(videos).backward()

    memory = peak_memory_mb(one_step, device)
    optimizer.zero_grad(set_to_none=True)
    return {"diffusion": diffusion, "losses": losses, "step_s": statistics.median(times), "peak_mb": memory,
            "replaced": replaced}  # fmt: skip


@torch.no_grad()
def denoise_picture(diffusion, args, device, path: Path) -> Path | None:
    """Noisy / denoised (one x0 prediction at t = T/2) / clean frames of one fresh video, as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no picture")
        return None
    clean = moving_shapes(1, args.frames, args.size, torch.Generator().manual_seed(12345)).to(device) * 2 - 1
    t = torch.full((1,), diffusion.num_timesteps // 2, device=device, dtype=torch.long)
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(7)).to(device)
    noisy = diffusion.q_sample(clean, t, noise=noise)
    predicted_noise = diffusion.denoise_fn(noisy, t)
    denoised = diffusion.predict_start_from_noise(noisy, t, predicted_noise).clamp(-1, 1)
    rows = {"noisy": noisy, "denoised": denoised, "clean": clean}
    fig, axes = plt.subplots(3, args.frames, figsize=(1.2 * args.frames, 3.8), squeeze=False)
    for r, (name, video) in enumerate(rows.items()):
        for f in range(args.frames):
            image = ((video[0, :, f].permute(1, 2, 0).cpu() + 1) / 2).clamp(0, 1).numpy()
            axes[r, f].imshow(image, interpolation="nearest")
            axes[r, f].set_xticks([])
            axes[r, f].set_yticks([])
        axes[r, 0].set_ylabel(name)
    fig.suptitle(f"torchnova-patched Unet3D after {args.steps} steps, t = {int(t)} of {diffusion.num_timesteps}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--dim-head", type=int, default=16)
    parser.add_argument("--timesteps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "output")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    runs = {"library": train(args, device, patched=False), "torchnova": train(args, device, patched=True)}
    lib, tn = runs["library"]["losses"], runs["torchnova"]["losses"]
    print(f"Unet3D(dim={args.dim}, dim_mults=(1, 2), heads={args.heads}x{args.dim_head}) + GaussianDiffusion, "
          f"{args.batch} videos x {args.frames} frames x {args.size}x{args.size}, {args.steps} steps on {device}; "
          f"patch replaced {runs['torchnova']['replaced']} attention modules")  # fmt: skip
    print(f"{'step':>6} {'library loss':>14} {'torchnova loss':>15} {'|diff|':>10}")
    every = max(1, args.steps // 15)
    for i in list(range(0, args.steps, every)) + ([args.steps - 1] if (args.steps - 1) % every else []):
        print(f"{i + 1:>6} {lib[i]:>14.6f} {tn[i]:>15.6f} {abs(lib[i] - tn[i]):>10.2e}")
    tail = max(1, args.steps // 10)
    print(f"mean loss of the last {tail} steps: library {statistics.fmean(lib[-tail:]):.6f}, "
          f"torchnova {statistics.fmean(tn[-tail:]):.6f}")  # fmt: skip
    fmt_mb = lambda mb: "n/a" if mb is None else f"{mb:.1f} MB"  # noqa: E731
    for name, run in runs.items():
        print(f"{name:>10}: median step {1e3 * run['step_s']:.1f} ms, peak memory of a step {fmt_mb(run['peak_mb'])}")
    print(f"step-time ratio library / torchnova: {runs['library']['step_s'] / runs['torchnova']['step_s']:.2f}x")
    picture = denoise_picture(runs["torchnova"]["diffusion"], args, device, args.out / "accelerate_video_diffusion.png")
    if picture is not None:
        print(f"saved {picture}")
    results = {name: {k: v for k, v in run.items() if k != "diffusion"} for name, run in runs.items()}
    return results | {"picture": picture}


if __name__ == "__main__":
    main()
