"""`python -m torchnova.info` reports versions, the build, and every backend's verdict with reasons."""

import re
import subprocess
import sys

import torch

from torchnova import _ext


def verdicts(out: str) -> dict:
    """{(op, device, dtype): {backend: "can run" | "cannot run: ..."}} from the report's backend sections."""
    table, current = {}, None
    for line in out.splitlines():
        header = re.fullmatch(r"(\w+) on (\w+) (\w+):", line)
        if header:
            current = table.setdefault(header.groups(), {})
        elif current is not None and line.startswith("  "):
            name, verdict = line.strip().split(maxsplit=1)
            current[name] = verdict
    return table


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
    table = verdicts(out)
    ops = {"mesa_kl", "temporal_attention", "spatial_attention", "cogvideo_attention", "dual_channel_mix"}
    assert {op for op, _, _ in table} == ops
    for (op, device, dtype), backends in table.items():
        assert backends["reference"] == "can run", (op, device, dtype)
        if device == "cpu":  # facts, not the registry's opinion: the CUDA kernels never take CPU tensors
            assert backends["cuda"].startswith("cannot run:") and "device=cpu" in backends["cuda"], (op, dtype)
            assert (backends["cpp"] == "can run") == _ext.HAS_CPP, (op, dtype, backends["cpp"])
            if not _ext.HAS_CPP:
                assert "extension is not available" in backends["cpp"]
        else:
            assert backends["cpp"].startswith("cannot run:") and "device=cuda" in backends["cpp"], (op, dtype)
            if dtype == "float32":
                assert (backends["cuda"] == "can run") == (
                    _ext.HAS_CUDA_KERNELS and torch.cuda.get_device_capability() >= (8, 0)
                ), (op, backends["cuda"])
