"""Space-time attention modules on video tensors (B, C, T, h, w), as in Video Diffusion Models' 3D U-Net.

Each attention block is pre-norm (LayerNorm over channels) + residual: ``x + out(attention(qkv(norm(x))))``,
with one fused qkv projection viewed as (B, T, S, 3, H, D) and passed whole to the ``*_qkvpacked`` ops: the
kernels read q, k, v through its strides (no copies) and the backward writes the projection's gradient as one
tensor (no stack of three).
``zero_init_output=True`` zero-initialises the output projection, so a block starts as the identity (how
VDM-style models add temporal layers to a pretrained image model).

Joint image-video training (VDM): append K images after the F video frames along T and pass ``segment_ids``
(B, T): video frames share an id, every image has its own, so images attend neither to the video nor to each
other. One ``RelativePositionBias`` (T5 buckets) is shared by all temporal layers of a model.
"""

from __future__ import annotations

import torch
from torch import nn

from .ops import spatial_attention_qkvpacked, temporal_attention_qkvpacked
from .reference import relative_position_buckets


class RelativePositionBias(nn.Module):
    """Learned T5-bucketed relative-position bias, (H, T, T) for ``temporal_attention``'s ``bias``."""

    def __init__(self, heads: int, num_buckets: int = 32, max_distance: int = 32):
        super().__init__()
        self.num_buckets, self.max_distance = num_buckets, max_distance
        self.embedding = nn.Embedding(num_buckets, heads)
        self._buckets: dict[tuple[int, torch.device], torch.Tensor] = {}

    def buckets(self, T: int, device: torch.device) -> torch.Tensor:
        """The (T, T) bucket table, built once per (T, device) on the host with integer arithmetic."""
        key = (T, device)
        if key not in self._buckets:
            self._buckets[key] = relative_position_buckets(T, self.num_buckets, self.max_distance).to(device)
        return self._buckets[key]

    def forward(self, T: int) -> torch.Tensor:
        device = self.embedding.weight.device
        return self.embedding(self.buckets(T, device)).permute(2, 0, 1)  # (H, T, T)


class _VideoAttention(nn.Module):
    def __init__(self, dim: int, heads: int = 8, dim_head: int = 32, zero_init_output: bool = False, backend="auto"):
        super().__init__()
        if dim < 1 or heads < 1 or dim_head < 1:
            raise ValueError(f"dim, heads, dim_head must be >= 1, got {dim}, {heads}, {dim_head}")
        self.heads, self.dim_head, self.backend = heads, dim_head, backend
        self.norm = nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim)
        if zero_init_output:
            nn.init.zeros_(self.to_out.weight)
            nn.init.zeros_(self.to_out.bias)

    def _qkv(self, x: torch.Tensor):
        if x.dim() != 5 or x.shape[1] != self.norm.normalized_shape[0]:
            raise ValueError(
                f"{type(self).__name__}: x must have shape (B, C={self.norm.normalized_shape[0]}, T, h, w), "
                f"got {tuple(x.shape)}"
            )
        B, C, T, h, w = x.shape
        tokens = x.permute(0, 2, 3, 4, 1).reshape(B, T, h * w, C)
        return self.to_qkv(self.norm(tokens)).view(B, T, h * w, 3, self.heads, self.dim_head)  # packed qkv

    def _residual(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        B, C, T, h, w = x.shape
        y = self.to_out(attended.reshape(B, T, h * w, self.heads * self.dim_head))
        return x + y.view(B, T, h, w, C).permute(0, 4, 1, 2, 3)


class SpatialAttention(_VideoAttention):
    """Each frame attends within itself: x + out(spatial_attention(qkv(norm(x))))."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._residual(x, spatial_attention_qkvpacked(self._qkv(x), backend=self.backend))


class TemporalAttention(_VideoAttention):
    """Each pixel attends across frames, with an optional shared ``RelativePositionBias``."""

    def __init__(self, dim, heads=8, dim_head=32, rel_pos_bias: RelativePositionBias | None = None, **kwargs):
        super().__init__(dim, heads, dim_head, **kwargs)
        if rel_pos_bias is not None and rel_pos_bias.embedding.embedding_dim != heads:
            raise ValueError(
                f"rel_pos_bias must have heads={heads} columns, got {rel_pos_bias.embedding.embedding_dim}"
            )
        self.rel_pos_bias = rel_pos_bias

    def forward(self, x: torch.Tensor, segment_ids: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        bias = self.rel_pos_bias(x.shape[2]) if self.rel_pos_bias is not None else None
        out = temporal_attention_qkvpacked(
            self._qkv(x), bias=bias, segment_ids=segment_ids, causal=causal, backend=self.backend
        )
        return self._residual(x, out)


class FactorizedSpaceTimeAttention(nn.Module):
    """Spatial attention, then temporal attention (VDM's block), on (B, C, T, h, w) videos."""

    def __init__(self, dim, heads=8, dim_head=32, rel_pos_bias=None, zero_init_output=False, backend="auto"):
        super().__init__()
        common = dict(zero_init_output=zero_init_output, backend=backend)
        self.spatial = SpatialAttention(dim, heads, dim_head, **common)
        self.temporal = TemporalAttention(dim, heads, dim_head, rel_pos_bias=rel_pos_bias, **common)

    def forward(self, x: torch.Tensor, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.temporal(self.spatial(x), segment_ids=segment_ids)
