"""``torchnova.nn.DualChannelAttention``: CogVideo's attention layer with a frozen base and a trainable plus
channel (THUDM/CogVideo ``cogvideo_model.py``; DESIGN.md section 2).

    u (B, L, hidden) -> base:  q, k, v = u W_qkv^b + b;  o_b = attn_base(q, k, v) W_o^b + b_o^b       (frozen)
                        plus:  q, k, v = u W_qkv^p + b;  o_p = attn_plus(q, k, v) W_o^p + b_o^p       (trained)
                        y = o_b on text rows, sigmoid(a) o_b + (1 - sigmoid(a)) o_p on frame rows

W_qkv^p starts as a copy of W_qkv^b, W_o^p ~ N(0, 0.02) with zero bias, a = 0 (alpha = 0.5).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .ops import cogvideo_attention, dual_channel_mix


class DualChannelAttention(nn.Module):
    def __init__(self, hidden, heads, text_len, frames, grid, attention="full", window=10, shifted=False,
                 stage="sequential", backend="auto"):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"DualChannelAttention: hidden ({hidden}) must be divisible by heads ({heads})")
        self.hidden, self.heads = hidden, heads
        self.text_len, self.frames, self.grid = text_len, frames, grid
        self.layout = dict(text_len=text_len, frames=frames, grid=grid)
        self.plus_options = dict(attention=attention, window=window, shifted=shifted)
        self.stage, self.backend = stage, backend
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.dense = nn.Linear(hidden, hidden)
        self.plus_qkv = nn.Linear(hidden, 3 * hidden)
        self.plus_dense = nn.Linear(hidden, hidden)
        self.alpha_logit = nn.Parameter(torch.zeros(hidden))
        self._init_plus()

    @torch.no_grad()
    def _init_plus(self):
        for p in (*self.qkv.parameters(), *self.dense.parameters()):
            p.requires_grad_(False)
        self.plus_qkv.weight.copy_(self.qkv.weight)
        self.plus_qkv.bias.copy_(self.qkv.bias)
        nn.init.normal_(self.plus_dense.weight, std=0.02)
        nn.init.zeros_(self.plus_dense.bias)
        self.alpha_logit.zero_()

    @classmethod
    def from_base(cls, attn, **overrides):
        """Wrap a pretrained attention layer with ``qkv`` (hidden -> 3 hidden) and ``dense`` Linear layers and
        ``heads``, ``text_len``, ``frames``, ``grid`` (attributes, or given in ``overrides``)."""
        keys = ("heads", "text_len", "frames", "grid")
        kwargs = {k: overrides.pop(k) if k in overrides else getattr(attn, k) for k in keys}
        module = cls(attn.qkv.in_features, **kwargs, **overrides)
        module.qkv = copy.deepcopy(attn.qkv)
        module.dense = copy.deepcopy(attn.dense)
        module.to(attn.qkv.weight.device, attn.qkv.weight.dtype)
        module._init_plus()
        return module

    def _attend(self, u, qkv, channel, **options):
        batch, length, _ = u.shape
        q, k, v = qkv(u).view(batch, length, 3, self.heads, -1).unbind(2)
        return cogvideo_attention(q, k, v, channel=channel, stage=self.stage, backend=self.backend, **self.layout,
                                  **options).reshape(batch, length, self.hidden)

    def forward(self, u, text_pad_mask=None):
        o_base = self.dense(self._attend(u, self.qkv, "base", text_pad_mask=text_pad_mask))
        o_plus = self.plus_dense(self._attend(u, self.plus_qkv, "plus", text_pad_mask=text_pad_mask,
                                              **self.plus_options))
        return dual_channel_mix(o_base, o_plus, self.alpha_logit.to(o_base.dtype),
                                text_len=self.layout["text_len"], backend=self.backend)
