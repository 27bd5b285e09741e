"""Factorized space-time attention (Video Diffusion Models): spatial and temporal attention ops."""

from .ops import spatial_attention, spatial_attention_qkvpacked, temporal_attention, temporal_attention_qkvpacked
from .reference import relative_position_buckets

__all__ = [
    "spatial_attention", "temporal_attention", "spatial_attention_qkvpacked", "temporal_attention_qkvpacked",
    "relative_position_buckets",
]  # fmt: skip
