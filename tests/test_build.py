"""The build that was made is the one that runs: a missing or unloadable extension fails here instead of turning
every cpp (and cuda) test into a skip.

``scripts/setup.sh`` leaves ``<venv>/.torchnova-expect-cpp`` after building the extension (not with
TORCHNOVA_SKIP_CPP_BUILD=1); ``.ci/run`` also sets TORCHNOVA_EXPECT_CPP=1 and TORCHNOVA_EXPECT_CUDA_KERNELS=1.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from torchnova import _ext

MARKER = Path(sys.prefix) / ".torchnova-expect-cpp"


def test_extension_imports_when_it_was_built():
    expected = os.environ.get("TORCHNOVA_EXPECT_CPP") == "1" or MARKER.exists()
    if not expected:
        pytest.skip(f"no build to check: TORCHNOVA_EXPECT_CPP is not 1 and {MARKER} does not exist")
    assert _ext.HAS_CPP, f"scripts/setup.sh built torchnova._C but it does not import: {_ext.CPP_IMPORT_ERROR}"


def test_extension_has_its_cuda_kernels_when_asked():
    if os.environ.get("TORCHNOVA_EXPECT_CUDA_KERNELS") != "1":
        pytest.skip("TORCHNOVA_EXPECT_CUDA_KERNELS is not 1")
    assert _ext.HAS_CPP, _ext.CPP_IMPORT_ERROR
    assert _ext.HAS_CUDA_KERNELS, f"torchnova._C was built without its CUDA kernels: {_ext.BUILD_INFO}"


def test_without_the_extension_every_cpp_backend_says_why(monkeypatch):
    """TORCHNOVA_SKIP_CPP_BUILD=1 (or a failed load): the package still works, cpp names the reason."""
    import torch

    import torchnova
    from torchnova import _backend

    monkeypatch.setattr(_ext, "HAS_CPP", False)
    monkeypatch.setattr(_ext, "CPP_IMPORT_ERROR", "ImportError: simulated")
    z = torch.randn(2, 3)
    why = _backend.reasons("mesa_kl", "cpp", student_logits=z, teacher_logits=z)
    assert why == ["the torchnova C++ extension is not available (ImportError: simulated)"]
    assert _backend.select("mesa_kl", "auto", student_logits=z, teacher_logits=z) in ("triton", "reference")
    with pytest.raises(ValueError, match="extension is not available"):
        torchnova.mesa_kl(z, z, backend="cpp")
