"""torchnova: Triton, CUDA and C++ kernels for factorized space-time attention, CogVideo dual-channel attention
and the MESA / SAF KL regularizer, as torch.library autograd ops with plain-PyTorch references.

Public API::

    torchnova.mesa_kl(student_logits, teacher_logits, *, temperature=5.0, reduction="batchmean", mask=None,
                      backend="auto")
    torchnova.MESA(model, decay=0.9998, temperature=5.0, weight=0.8, start_epoch=5, end_epoch=None)
    torchnova.SAF(num_samples, num_classes, epochs_ago=3, temperature=5.0, weight=0.3, start_epoch=5)

Backends: "reference" (PyTorch), "cpp" (C++/OpenMP, CPU), "triton" and "cuda" (GPU). ``backend="auto"`` or the
``TORCHNOVA_BACKEND`` environment variable choose; ``python -m torchnova.info`` shows what can run here.
"""

from . import _backend, _ext
from . import nn
from .mesa import MESA, SAF, mesa_kl

__version__ = "0.1.0"
__all__ = ["mesa_kl", "MESA", "SAF", "nn", "__version__"]
