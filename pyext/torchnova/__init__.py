"""torchnova: Triton, CUDA and C++ kernels for factorized space-time attention, CogVideo dual-channel attention
and the MESA / SAF KL regularizer, as torch.library autograd ops with plain-PyTorch references.

Public API::

    torchnova.mesa_kl(student_logits, teacher_logits, *, temperature=5.0, reduction="batchmean", mask=None,
                      backend="auto")

Backends: "reference" (PyTorch), "cpp" (C++/OpenMP, CPU), "triton" and "cuda" (GPU). ``backend="auto"`` or the
``TORCHNOVA_BACKEND`` environment variable choose; ``python -m torchnova.info`` shows what can run here.
"""

from . import _backend, _ext
from .dual_channel.ops import cogvideo_attention, dual_channel_mix
from .mesa.ops import mesa_kl

__version__ = "0.1.0"
__all__ = ["cogvideo_attention", "dual_channel_mix", "mesa_kl", "__version__"]
