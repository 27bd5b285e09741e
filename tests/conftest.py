"""Test configuration: seeds, the Triton interpreter on machines without a GPU, the CUDA emulation layer for the
(backend="cuda", device="cpu") test cases, and device/backend params.

TRITON_INTERPRET must be set before triton or torchnova is imported, so it is decided here: on a machine
without a CUDA GPU the Triton kernels run in the interpreter on CPU tensors (set TORCHNOVA_TEST_NO_INTERPRET=1
to skip them instead).
"""

import os

import torch

if not torch.cuda.is_available() and os.environ.get("TORCHNOVA_TEST_NO_INTERPRET", "0") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

try:  # hypothesis profiles of the property-based tests (HYPOTHESIS_PROFILE=ci|long); pinned in scripts/setup.sh
    import hypothesis_profiles  # noqa: E402, F401
except ImportError:  # hypothesis not installed: only tests/test_properties_*.py need it (and then fail to import)
    pass


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _cuda_kernels_on_cpu(request):
    """A case parametrized (backend="cuda", device="cpu") runs the CUDA kernels on CPU tensors through the CUDA
    emulation layer (torchnova.testing.cuda_emulation()) when it is built: every test written with
    utils.backend_device_params gets the CUDA kernels checked on a machine without a GPU. Without the layer, the
    case skips through its usual reasons ("device=cpu")."""
    params = getattr(getattr(request.node, "callspec", None), "params", {})
    if params.get("backend") != "cuda" or params.get("device") != "cpu":
        yield
        return
    from torchnova import _ext

    if not _ext.HAS_CUDA_EMULATION:
        yield
        return
    from torchnova.testing import cuda_emulation

    with cuda_emulation():
        yield
