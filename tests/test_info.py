"""`python -m torchnova.info` reports versions, the build, and every backend's verdict with reasons."""

import subprocess
import sys

from torchnova import _ext


def test_info_reports_build_and_backends():
    out = subprocess.run([sys.executable, "-m", "torchnova.info"], capture_output=True, text=True, check=True).stdout
    assert "torchnova 0.1.0" in out and "torch " in out
    if _ext.HAS_CPP:
        expected = "CUDA kernels: yes" if _ext.HAS_CUDA_KERNELS else "CUDA kernels: no"
        assert expected in out
        assert "  cpp        can run" in out
        assert f"CPU kernels: {_ext._C.cpu_isa()} copy running" in out
    else:
        assert "extension torchnova._C: NOT available" in out
    assert "  reference  can run" in out
    assert "cuda       cannot run" in out or "cuda       can run" in out
