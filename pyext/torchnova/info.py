"""``python -m torchnova.info``: versions, how the extension was built, and which backends can run here."""

from __future__ import annotations

import platform
import sys

import torch

import torchnova
from torchnova import _backend, _ext, _tuning


def _example_inputs(device: torch.device, dtype: torch.dtype) -> dict:
    """Tiny inputs on ``device`` used only to ask each backend whether it can run there."""
    logits = torch.empty(2, 8, device=device, dtype=dtype)
    video = torch.empty(1, 16, 64, 8, 64, device=device, dtype=dtype)  # (B, T, S, H, D)
    qkv = {"q": video, "k": video, "v": video}
    return {
        "mesa_kl": {"student_logits": logits, "teacher_logits": logits},
        "temporal_attention": qkv,
        "spatial_attention": qkv,
        "cogvideo_attention": {"x": torch.empty(1, 1, 1, 64, device=device, dtype=dtype), "head_dim": 64},
        "dual_channel_mix": {"x": logits},
    }


def report() -> str:
    lines = [
        f"torchnova {torchnova.__version__}",
        f"python    {sys.version.split()[0]} ({platform.machine()})",
        f"torch     {torch.__version__} (CUDA {torch.version.cuda or 'none: CPU build'})",
    ]
    try:
        import triton

        lines.append(f"triton    {triton.__version__}" + ("  [TRITON_INTERPRET=1]" if _ext.TRITON_INTERPRET else ""))
    except ImportError:
        lines.append("triton    not installed")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            cap = torch.cuda.get_device_capability(i)
            lines.append(f"gpu {i}     {torch.cuda.get_device_name(i)} (sm_{cap[0]}{cap[1]})")
    else:
        lines.append("gpu       none visible")
    lines.append("")
    if _ext.HAS_CPP:
        info = _ext.BUILD_INFO
        cuda = f"yes, archs {info['cuda_archs']}" if info.get("with_cuda") else "no (CPU kernels only)"
        lines.append(f"extension torchnova._C: built against torch {info.get('torch_version')}, "
                     f"OpenMP {'yes' if info.get('openmp') else 'no'}, CUDA kernels: {cuda}")
        # The CPU kernels are compiled in several ISA copies; the best one this CPU has runs
        # (TORCHNOVA_CPU_ISA=avx2|baseline caps it).
        lines.append(f"CPU kernels: {_ext._C.cpu_isa()} copy running (this CPU runs: {', '.join(_ext._C.cpu_isas())})")
    else:
        lines.append(f"extension torchnova._C: NOT available ({_ext.CPP_IMPORT_ERROR})")
    if _ext.HAS_CUDA_EMULATION:
        lines.append("CUDA emulation layer (torchnova.testing.cuda_emulation): built (torchnova._C_cuda_emu)")
    else:
        lines.append("CUDA emulation layer (torchnova.testing.cuda_emulation): not built "
                     "(test-only; build with TORCHNOVA_CUDA_EMULATION=1)")
    lines.append("")

    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for device in devices:
        for dtype in (torch.float32, torch.bfloat16):
            for op, inputs in _example_inputs(device, dtype).items():
                lines.append(f"{op} on {device.type} {str(dtype).replace('torch.', '')}:")
                order, source = _backend.auto_order(op, **inputs)
                lines.append(f"  auto tries {', '.join(order)} ({source})")
                for name in _backend.backends_for(op):
                    why = _backend.reasons(op, name, **inputs)
                    lines.append(f"  {name:<10} " + ("can run" if not why else "cannot run: " + "; ".join(why)))
    lines.append("")
    lines.append(f"auto on a GPU: {_tuning.status()}; buckets not in it follow the roofline model (docs/performance.md)")
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
