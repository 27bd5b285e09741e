"""torchnova: Triton, CUDA and C++ kernels for factorized space-time attention, CogVideo dual-channel attention
and the MESA / SAF KL regularizer, as torch.library autograd ops with plain-PyTorch references.

Public API::

    torchnova.mesa_kl(student_logits, teacher_logits, *, temperature=5.0, reduction="batchmean", mask=None,
                      backend="auto")
    torchnova.MESA(model, decay=0.9998, temperature=5.0, weight=0.8, start_epoch=5, end_epoch=None)
    torchnova.SAF(num_samples, num_classes, epochs_ago=3, temperature=5.0, weight=0.3, start_epoch=5)
    torchnova.temporal_attention(q, k, v, *, bias=None, segment_ids=None, causal=False, scale=None, backend="auto")
    torchnova.spatial_attention(q, k, v, *, scale=None, backend="auto")
    torchnova.temporal_attention_qkvpacked(qkv, ...), torchnova.spatial_attention_qkvpacked(qkv, ...)
                                   # qkv (B, T, S, 3, H, D): one gradient for a fused projection, no stack
    torchnova.relative_position_buckets(T, num_buckets=32, max_distance=32)
    torchnova.cogvideo_attention(q, k, v, *, text_len, frames, grid, channel, attention="full", window=10,
                                 shifted=False, stage="sequential", text_pad_mask=None, backend="auto")
    torchnova.dual_channel_mix(o_base, o_plus, alpha_logit, *, text_len, backend="auto")

Backends: "reference" (PyTorch), "cpp" (C++/OpenMP, CPU), "triton" and "cuda" (GPU). ``backend="auto"`` or the
``TORCHNOVA_BACKEND`` environment variable choose; ``python -m torchnova.info`` shows what can run here.
"""

from . import _backend, _ext
from . import nn
from .dual_channel.ops import cogvideo_attention, dual_channel_mix
from .mesa import MESA, SAF, mesa_kl
from .spacetime import (
    relative_position_buckets,
    spatial_attention,
    spatial_attention_qkvpacked,
    temporal_attention,
    temporal_attention_qkvpacked,
)

__version__ = "0.1.0"
__all__ = [
    "mesa_kl", "MESA", "SAF", "spatial_attention", "temporal_attention", "spatial_attention_qkvpacked",
    "temporal_attention_qkvpacked", "relative_position_buckets",
    "cogvideo_attention", "dual_channel_mix", "nn", "__version__",
]  # fmt: skip
