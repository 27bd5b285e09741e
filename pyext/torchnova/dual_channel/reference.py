"""Dense references for CogVideo dual-channel attention and the alpha mix (DESIGN.md section 2).

Attention: a dense (B, L, L) boolean mask from masks.visibility and the text padding, scores q.k / sqrt(D)
in fp32 (float64 for float64 inputs), -inf masking, softmax. A row with no visible key gives out = 0 and
lse = +inf (the kernels' convention), with no NaN in values or gradients.
"""

from __future__ import annotations

import torch

from .._library import accumulation_dtype
from .masks import key_mask, visibility


def cogvideo_attention_ref(q, k, v, text_pad_mask, text_len, frames, grid_h, grid_w, channel, attention, window,
                           shifted, stage):
    """q, k, v (B, L, H, D) -> out (B, L, H, D) q.dtype, lse (B, L, H) acc; differentiable."""
    batch, length, _, dim = q.shape
    acc = accumulation_dtype(q.dtype)
    visible = visibility(text_len, frames, grid_h, grid_w, channel, attention, window, shifted, stage, q.device)
    visible = visible[None] & key_mask(text_pad_mask, batch, text_len, length, q.device)[:, None, :]  # (B, L, L)
    scores = torch.einsum("bihd,bjhd->bhij", q.to(acc), k.to(acc)) * dim**-0.5
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    empty = ~visible.any(-1)[:, None]  # (B, 1, L)
    lse = torch.logsumexp(scores, dim=-1)
    safe_lse = torch.where(empty, torch.zeros_like(lse), lse)
    probs = torch.exp(scores - safe_lse[..., None])
    out = torch.einsum("bhij,bjhd->bihd", probs, v.to(acc))
    lse = torch.where(empty, torch.full_like(lse, float("inf")), lse)
    return out.to(q.dtype), lse.permute(0, 2, 1)


def dual_channel_mix_ref(o_base, o_plus, alpha_logit, text_len):
    """y = o_base on text rows, sigmoid(a) o_base + (1 - sigmoid(a)) o_plus on frame rows; differentiable."""
    acc = accumulation_dtype(o_base.dtype)
    alpha = torch.sigmoid(alpha_logit.to(acc))
    base, plus = o_base.to(acc), o_plus.to(acc)
    mixed = alpha * base + (1 - alpha) * plus
    is_text = (torch.arange(o_base.shape[1], device=o_base.device) < text_len)[None, :, None]
    return torch.where(is_text, base, mixed).to(o_base.dtype)
