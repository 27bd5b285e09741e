"""A small VDM-style video denoiser trained on CPU, with joint image-video batches through segment ids.

    python examples/train_video_denoiser.py                      # ~2-4 min on 2 CPU cores
    python examples/train_video_denoiser.py --backend reference  # the same run on the PyTorch reference
    python examples/train_video_denoiser.py --quick              # a few steps (the test suite runs it)

Data, generated in code: scikit-learn's 8×8 digits moving across a 16×16 canvas for F frames (a random start
and velocity, bouncing off the borders), plus K still digit images appended after the video frames along the
time axis. Segment ids (B, F + K) keep them apart: the video frames share id 0 and each image has its own, so
temporal attention never mixes an image with the video or with another image (VDM's joint training).

Model (VDM's 3D U-Net reduced to its factorized core): 1×3×3 space-only convolutions and
``torchnova.nn.FactorizedSpaceTimeAttention`` blocks (spatial attention, then temporal attention with one
T5 relative-position bias shared by all blocks), zero-initialised attention outputs so each block starts as
the identity. Trained to predict the clean video from a noisy one (x₀-prediction, noise level drawn per
sample). Prints the loss falling, the energy per epoch where a counter exists, and saves a PNG strip of
noisy / denoised / clean frames. ``--backend`` switches the attention kernels; the loss curve is the same.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn

import torchnova
from torchnova.energy import EnergyMeter

CANVAS = 16


def digit_images(seed: int = 0) -> torch.Tensor:
    from sklearn.datasets import load_digits  # ships with scikit-learn: no download

    images = torch.tensor(load_digits().images, dtype=torch.float32) / 16.0  # (1797, 8, 8) in [0, 1]
    return images[torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))]


def make_batch(digits: torch.Tensor, batch: int, frames: int, images: int, generator: torch.Generator):
    """(B, 1, frames + images, 16, 16) clips in [-1, 1] and their (B, frames + images) segment ids."""
    clips = torch.zeros(batch, 1, frames + images, CANVAS, CANVAS)
    picks = torch.randint(len(digits), (batch, 1 + images), generator=generator)
    span = CANVAS - 8
    for b in range(batch):
        position = torch.randint(0, span + 1, (2,), generator=generator).float()
        velocity = torch.randint(-2, 3, (2,), generator=generator).float()
        for t in range(frames):
            y, x = int(position[0]), int(position[1])
            clips[b, 0, t, y : y + 8, x : x + 8] = digits[picks[b, 0]]
            position += velocity
            for axis in range(2):  # bounce off the borders
                if not 0 <= position[axis] <= span:
                    velocity[axis] = -velocity[axis]
                    position[axis] = position[axis].clamp(0, span)
        for i in range(images):
            y, x = torch.randint(0, span + 1, (2,), generator=generator).tolist()
            clips[b, 0, frames + i, y : y + 8, x : x + 8] = digits[picks[b, 1 + i]]
    segment_ids = torch.tensor([0] * frames + list(range(1, images + 1))).expand(batch, -1)
    return clips * 2 - 1, segment_ids


class SpaceConv(nn.Module):
    """1×3×3 convolution (space only), GroupNorm, SiLU: VDM's replacement of 2D convolutions."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.conv = nn.Conv3d(dim_in, dim_out, (1, 3, 3), padding=(0, 1, 1))
        self.norm = nn.GroupNorm(8, dim_out)

    def forward(self, x):
        return nn.functional.silu(self.norm(self.conv(x)))


class VideoDenoiser(nn.Module):
    def __init__(self, dim: int = 32, depth: int = 2, heads: int = 4, dim_head: int = 16, backend: str = "auto"):
        super().__init__()
        self.inp = SpaceConv(2, dim)  # the noisy video and its noise level as a second channel
        self.rel_pos_bias = torchnova.nn.RelativePositionBias(heads)
        self.convs = nn.ModuleList(SpaceConv(dim, dim) for _ in range(depth))
        self.attentions = nn.ModuleList(
            torchnova.nn.FactorizedSpaceTimeAttention(
                dim, heads, dim_head, rel_pos_bias=self.rel_pos_bias, zero_init_output=True, backend=backend
            )
            for _ in range(depth)
        )
        self.out = nn.Conv3d(dim, 1, (1, 3, 3), padding=(0, 1, 1))

    def forward(self, noisy, sigma, segment_ids):
        x = self.inp(torch.cat([noisy, sigma.view(-1, 1, 1, 1, 1).expand_as(noisy)], dim=1))
        for conv, attention in zip(self.convs, self.attentions):
            x = attention(x + conv(x), segment_ids=segment_ids)
        return self.out(x)


def save_strip(noisy, denoised, clean, frames: int, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [("noisy", noisy), ("denoised", denoised), ("clean", clean)]
    T = noisy.shape[2]
    fig, axes = plt.subplots(3, T, figsize=(1.2 * T, 3.8), squeeze=False)
    for r, (name, clip) in enumerate(rows):
        for t in range(T):
            axes[r][t].imshow(clip[0, 0, t].clamp(-1, 1).numpy(), cmap="gray", vmin=-1, vmax=1)
            axes[r][t].set_xticks([])
            axes[r][t].set_yticks([])
            if r == 0:
                axes[r][t].set_title(f"frame {t}" if t < frames else "image", fontsize=7)
        axes[r][0].set_ylabel(name, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", default="auto", help="attention backend: auto, cpp, reference, ...")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--images", type=int, default=2, help="still images appended after the video frames")
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--quick", action="store_true", help="6 steps of a tiny batch")
    parser.add_argument("--out", type=Path, default=Path("examples/output"))
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.batch, args.frames, args.log_every = 6, 2, 4, 2
    torch.manual_seed(0)
    digits = digit_images()
    model = VideoDenoiser(backend=args.backend)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(1)
    print(
        f"VDM-style denoiser, {sum(p.numel() for p in model.parameters()):,} parameters, attention backend "
        f"{args.backend!r}; batches of {args.batch} clips: {args.frames} video frames + {args.images} images"
    )
    losses, start = [], time.perf_counter()
    with EnergyMeter("cpu") as meter:
        for step in range(1, args.steps + 1):
            clean, segment_ids = make_batch(digits, args.batch, args.frames, args.images, generator)
            sigma = torch.rand(args.batch, generator=generator) * 0.8 + 0.2
            noisy = clean + sigma.view(-1, 1, 1, 1, 1) * torch.randn(clean.shape, generator=generator)
            loss = nn.functional.mse_loss(model(noisy, sigma, segment_ids), clean)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if step % args.log_every == 0 or step == 1:
                recent = sum(losses[-args.log_every :]) / len(losses[-args.log_every :])
                print(f"step {step:4d}  loss {loss.item():.4f}  (mean of last {min(step, args.log_every)}: "
                      f"{recent:.4f})  {time.perf_counter() - start:.0f} s", flush=True)  # fmt: skip
    print(f"\ntraining: {meter.summary()}")
    with torch.no_grad():
        clean, segment_ids = make_batch(digits, 1, args.frames, args.images, generator)
        sigma = torch.tensor([0.6])
        noisy = clean + 0.6 * torch.randn(clean.shape, generator=generator)
        denoised = model(noisy, sigma, segment_ids)
        print(f"held-out clip, noise 0.6: mse noisy {nn.functional.mse_loss(noisy, clean):.4f} -> "
              f"denoised {nn.functional.mse_loss(denoised, clean):.4f}")  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    path = save_strip(noisy, denoised, clean, args.frames, args.out / "video_denoiser.png")
    if path is not None:
        print(f"strip of noisy / denoised / clean frames: {path}")
    return losses


if __name__ == "__main__":
    main()
