"""What this installation can run: the compiled extension (CPU and maybe CUDA kernels) and Triton.

The package imports without the extension; backends that need it then list ``CPP_IMPORT_ERROR`` as their
reason (NATTEN's ``_libnatten`` model). Importing ``torchnova._C`` loads the shared library, whose static
initialisers register the ``torch.ops.torchnova.*`` schemas and their CPU/CUDA kernels.
"""

from __future__ import annotations

import os

import torch  # noqa: F401  (the extension links against libtorch: import torch first)

HAS_CPP = False
HAS_CUDA_KERNELS = False
CPP_IMPORT_ERROR = ""
BUILD_INFO: dict = {}

try:
    from . import _C  # type: ignore[attr-defined]

    HAS_CPP = True
    BUILD_INFO = dict(_C.build_info())
    HAS_CUDA_KERNELS = bool(BUILD_INFO.get("with_cuda", False))
except ImportError as exc:  # not built, or built against another torch
    CPP_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

# The CUDA emulation layer (test-only, built with TORCHNOVA_CUDA_EMULATION=1): the CUDA kernels compiled for the
# CPU, as the ops torch.ops.torchnova.<op>_cuda_emu, used only inside torchnova.testing.cuda_emulation().
HAS_CUDA_EMULATION = False
CUDA_EMULATION_IMPORT_ERROR = "torchnova._C is not available" if not HAS_CPP else ""
if HAS_CPP:
    try:
        from . import _C_cuda_emu  # type: ignore[attr-defined]

        _C_cuda_emu.register_ops()
        HAS_CUDA_EMULATION = True
    except ImportError as exc:
        CUDA_EMULATION_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
HAS_TRITON = False
TRITON_IMPORT_ERROR = ""
try:
    import triton  # noqa: F401
    import triton.language  # noqa: F401

    HAS_TRITON = True
except ImportError as exc:
    TRITON_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"
