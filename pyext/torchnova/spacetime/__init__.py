"""Factorized space-time attention (Video Diffusion Models): spatial and temporal attention ops."""

from .ops import spatial_attention, temporal_attention
from .reference import relative_position_buckets

__all__ = ["spatial_attention", "temporal_attention", "relative_position_buckets"]
