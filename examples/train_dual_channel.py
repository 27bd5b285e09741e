"""Train CogVideo-style dual-channel attention on top of a frozen text-to-image model.

1. Pretrain a tiny text-to-image token transformer on single frames: text = (shape, direction) tokens, image =
   a g x g grid of tokens (a square at some position), predicted autoregressively (text first, raster order).
2. Freeze it, replace every attention layer by torchnova.nn.DualChannelAttention.from_base (base channel =
   the frozen layer: text + own frame; plus channel: causal over all frames), and train on 5-frame videos of the
   square moving in the text's direction. Only the plus channels and alpha_logit train; the base weights stay
   bit-identical (checked at the end).

    python examples/train_dual_channel.py          # a few minutes on CPU
    python examples/train_dual_channel.py --quick  # seconds (used by the tests)
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import torchnova
from torchnova.nn import DualChannelAttention

TEXT_LEN, FRAMES, GRID, VOCAB_TEXT, VOCAB_IMAGE = 2, 5, 6, 8, 3
DIRECTIONS = ((0, 1), (1, 0), (0, -1), (-1, 0))


def make_videos(batch, generator):
    """Text (B, 2): [direction, 4 + start row parity]; frames (B, F, g, g) tokens 0 background / 1 square."""
    direction = torch.randint(0, 4, (batch,), generator=generator)
    start = torch.randint(1, GRID - 1, (batch, 2), generator=generator)
    frames = torch.zeros(batch, FRAMES, GRID, GRID, dtype=torch.long)
    for b in range(batch):
        dy, dx = DIRECTIONS[int(direction[b])]
        for f in range(FRAMES):
            y, x = (int(start[b, 0]) + dy * f) % GRID, (int(start[b, 1]) + dx * f) % GRID
            frames[b, f, y, x] = 1
    text = torch.stack([direction, 4 + start[:, 0] % 2], dim=1)
    return text, frames


class FrameAttention(nn.Module):
    """The pretrained layer: text + own frame, as torchnova's base channel (single-frame pretraining)."""

    def __init__(self, hidden, heads, text_len, frames, grid):
        super().__init__()
        self.heads, self.text_len, self.frames, self.grid = heads, text_len, frames, grid
        self.qkv, self.dense = nn.Linear(hidden, 3 * hidden), nn.Linear(hidden, hidden)

    def forward(self, u, text_pad_mask=None):
        b, length, hidden = u.shape
        q, k, v = self.qkv(u).view(b, length, 3, self.heads, -1).unbind(2)
        out = torchnova.cogvideo_attention(q, k, v, text_len=self.text_len, frames=self.frames, grid=self.grid,
                                           channel="base")
        return self.dense(out.reshape(b, length, hidden))


class TokenTransformer(nn.Module):
    def __init__(self, hidden=32, heads=2, layers=2, frames=1):
        super().__init__()
        self.text_emb = nn.Embedding(VOCAB_TEXT, hidden)
        self.image_emb = nn.Embedding(VOCAB_IMAGE, hidden)  # token 2 = start of image
        self.pos = nn.Parameter(torch.randn(TEXT_LEN + 5 * GRID * GRID, hidden) * 0.02)
        self.norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(layers))
        self.attns = nn.ModuleList(FrameAttention(hidden, heads, TEXT_LEN, frames, GRID) for _ in range(layers))
        self.mlps = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden))
            for _ in range(layers)
        )
        self.head = nn.Linear(hidden, 2)

    def forward(self, text, frames):
        b, f = frames.shape[:2]
        inputs = frames.reshape(b, f, -1).roll(1, dims=2)
        inputs[:, :, 0] = 2  # <start_of_image> overwrites each frame's first slot, as in CogVideo
        x = torch.cat([self.text_emb(text), self.image_emb(inputs.reshape(b, -1))], dim=1)
        x = x + self.pos[: x.shape[1]]
        for norm, attn, mlp in zip(self.norms, self.attns, self.mlps):
            x = x + attn(norm(x))
            x = x + mlp(x)
        return self.head(x[:, TEXT_LEN:])

    def loss(self, text, frames):
        logits = self.forward(text, frames)
        return nn.functional.cross_entropy(logits.reshape(-1, 2), frames.reshape(-1))


def train(model, params, steps, batch, frames, generator, lr, label):
    opt = torch.optim.Adam(params, lr=lr)
    losses = []
    for step in range(steps):
        text, video = make_videos(batch, generator)
        loss = model.loss(text, video[:, :frames])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % max(1, steps // 5) == 0 or step == steps - 1:
            print(f"{label} step {step:4d}  loss {loss.item():.4f}")
    return losses


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    pre_steps, steps = (30, 30) if args.quick else (400, 400)
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)

    model = TokenTransformer(frames=1)
    train(model, model.parameters(), pre_steps, 16, 1, generator, 3e-3, "pretrain (single frames)")
    for p in model.parameters():
        p.requires_grad_(False)
    for i, attn in enumerate(model.attns):
        attn.frames = FRAMES
        model.attns[i] = DualChannelAttention.from_base(attn, attention="full", stage="sequential")
    base = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    trainable = [p for p in model.parameters() if p.requires_grad]
    losses = train(model, trainable, steps, 8, FRAMES, generator, 3e-3, "dual-channel (videos)")
    unchanged = all(torch.equal(p, base[name]) for name, p in model.named_parameters() if name in base)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    print(f"video loss {first:.4f} -> {last:.4f}; base weights bit-identical: {unchanged}")
    return first, last, unchanged


if __name__ == "__main__":
    main()
