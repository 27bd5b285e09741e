"""Plain-PyTorch reference of factorized space-time attention (Video Diffusion Models): the tests' ground truth.

Layout (B, T, S, H, D) = batch, frames, spatial tokens, heads, head dim.

temporal: for every (b, s, h), attention over the T frames
    scores[i, j] = scale · q_i · k_j + bias[h, i, j],   key j visible to query i iff
                   segment_ids[b, i] == segment_ids[b, j] and (not causal or j <= i)
spatial: for every (b, t, h), attention over the S tokens of the frame, no mask, no bias.

rotary (temporal only, optional): q and k are first rotated, on their first rot_dim head dims, by
    x' = x o cos[t] + rotate_half(x) o sin[t]          cos, sin: (T, rot_dim)
with rotate_half pairing (2i, 2i+1) -> (-x_{2i+1}, x_{2i}) when interleaved (rotary-embedding-torch) or
(i, i + rot_dim/2) -> (-x_{i+r/2}, x_i) (GPT-NeoX / HF); the other dims pass through. Autograd differentiates
everything here, the tables included.

Softmax in fp32 (fp64 for fp64 inputs), masked scores at -inf; the diagonal is always visible, so no row is
empty. Output in the input dtype. ``relative_position_buckets`` is the T5 bucketing of lucidrains'
video-diffusion-pytorch ``RelativePositionBias`` (VDM's Unet3D: 32 buckets, max_distance 32), as integers.
"""

from __future__ import annotations

import math

import torch

from .._library import accumulation_dtype


def relative_position_buckets(T: int, num_buckets: int = 32, max_distance: int = 32) -> torch.Tensor:
    """(T, T) int64 bucket of (query i, key j), from n = i − j (query minus key).

    Half the buckets for keys after the query (n < 0, offset num_buckets/2); inside a half, |n| below
    num_buckets/4 is its own bucket, larger |n| log-spaced up to max_distance and clipped at the half's last
    bucket. Computed on the host with exact integer/log2 arithmetic, so bucket edges do not depend on float
    rounding of torch.log (16 → 12 exactly for the defaults)."""
    for name, value in (("T", T), ("num_buckets", num_buckets), ("max_distance", max_distance)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"relative_position_buckets: {name} must be an int >= 1, got {value!r}")
    if num_buckets < 4 or num_buckets % 2:
        raise ValueError(f"relative_position_buckets: num_buckets must be even and >= 4, got {num_buckets}")
    half = num_buckets // 2
    max_exact = half // 2
    if max_distance <= max_exact:
        raise ValueError(f"relative_position_buckets: max_distance must be > {max_exact}, got {max_distance}")

    def bucket(n: int) -> int:
        base = half if n < 0 else 0
        n = abs(n)
        if n < max_exact:
            return base + n
        large = max_exact + int(math.log2(n / max_exact) / math.log2(max_distance / max_exact) * (half - max_exact))
        return base + min(large, half - 1)

    lut = [bucket(n) for n in range(-(T - 1), T)]  # index n + T - 1
    i = torch.arange(T).unsqueeze(1)
    j = torch.arange(T).unsqueeze(0)
    return torch.tensor(lut, dtype=torch.int64)[i - j + T - 1]


def temporal_visibility(T: int, segment_ids: torch.Tensor | None, causal: bool, device) -> torch.Tensor | None:
    """(B or 1, T, T) bool: key j visible to query i; None when everything is visible."""
    mask = None
    if segment_ids is not None:
        mask = segment_ids.unsqueeze(-1) == segment_ids.unsqueeze(-2)
    if causal:
        lower = torch.ones(T, T, dtype=torch.bool, device=device).tril().unsqueeze(0)
        mask = lower if mask is None else mask & lower
    return mask


def _attention(q, k, v, scale, bias=None, visible=None):
    """q, k, v (..., L, D) -> (..., L, D); bias broadcastable to (..., L, L); softmax in the accumulation dtype."""
    acc = accumulation_dtype(q.dtype)
    scores = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias.to(acc)
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, v.to(acc)).to(q.dtype)


def rotate_half(x: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """(..., r) -> (..., r): pairs (2i, 2i+1) -> (-x_{2i+1}, x_{2i}) when interleaved, else halves (-x2, x1)."""
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((-x2, x1), dim=-1).flatten(-2)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """x (B, T, S, H, D) rotated on its first rot_dim dims by cos, sin (T, rot_dim), in x's dtype."""
    r = cos.shape[-1]
    cos = cos.to(x.dtype)[None, :, None, None, :]
    sin = sin.to(x.dtype)[None, :, None, None, :]
    head, tail = x[..., :r], x[..., r:]
    return torch.cat((head * cos + rotate_half(head, interleaved) * sin, tail), dim=-1)


def temporal_attention_ref(q, k, v, bias=None, segment_ids=None, causal=False, scale=None, rotary=None,
                           rotary_interleaved=False):  # fmt: skip
    B, T, S, H, D = q.shape
    scale = D**-0.5 if scale is None else scale
    dtype = q.dtype
    if rotary is not None:  # rotate in the accumulation dtype, as the kernels do
        acc = accumulation_dtype(dtype)
        cos, sin = rotary
        q = apply_rotary_ref(q.to(acc), cos, sin, rotary_interleaved)
        k = apply_rotary_ref(k.to(acc), cos, sin, rotary_interleaved)
        v = v.to(acc)
    to_problems = lambda x: x.permute(0, 2, 3, 1, 4)  # (B, S, H, T, D)  # noqa: E731
    visible = temporal_visibility(T, segment_ids, causal, q.device)
    if visible is not None:
        visible = visible[:, None, None]  # (B or 1, 1, 1, T, T)
    out = _attention(to_problems(q), to_problems(k), to_problems(v), scale, bias, visible)
    return out.permute(0, 3, 1, 2, 4).to(dtype)


def spatial_attention_ref(q, k, v, scale=None):
    D = q.shape[-1]
    scale = D**-0.5 if scale is None else scale
    to_problems = lambda x: x.permute(0, 1, 3, 2, 4)  # (B, T, H, S, D)  # noqa: E731
    out = _attention(to_problems(q), to_problems(k), to_problems(v), scale)
    return out.permute(0, 1, 3, 2, 4)
