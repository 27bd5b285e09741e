"""Backend selection for every torchnova op, with reasons (the xformers ``not_supported_reasons`` model).

Each op registers its backends in priority order (fastest first, as measured). A backend is a name plus a
``reasons(**inputs) -> list[str]`` function that says, from metadata only (device, dtype, shapes, compute
capability, what was built), why it cannot run these inputs; an empty list means it can.

* ``backend="auto"`` (or ``TORCHNOVA_BACKEND`` unset/"auto") picks the first backend with no reasons.
* A named backend (argument, or ``TORCHNOVA_BACKEND``) that cannot run raises ``ValueError`` naming the inputs
  and every reason, instead of silently falling back to something else.

Selection never calls ``.item()``, never syncs and never logs, so it is safe under ``torch.compile``.
"""

from __future__ import annotations

import contextvars
import os
from dataclasses import dataclass
from typing import Callable

import torch

BACKEND_NAMES = ("reference", "cpp", "triton", "cuda")
ENV_VAR = "TORCHNOVA_BACKEND"


@dataclass(frozen=True)
class Backend:
    name: str
    reasons: Callable[..., list[str]]


_REGISTRY: dict[str, list[Backend]] = {}


def register(op: str, name: str, reasons: Callable[..., list[str]]) -> None:
    """Append a backend to ``op``'s priority list (call in order: fastest first)."""
    if name not in BACKEND_NAMES:
        raise ValueError(f"backend name must be one of {BACKEND_NAMES}, got {name!r}")
    _REGISTRY.setdefault(op, []).append(Backend(name, reasons))


def backends_for(op: str) -> list[str]:
    """Backend names of ``op`` in priority order."""
    return [b.name for b in _REGISTRY[op]]


def reasons(op: str, backend: str, **inputs) -> list[str]:
    """Why ``backend`` cannot run ``op`` on these inputs (empty list: it can)."""
    for b in _REGISTRY[op]:
        if b.name == backend:
            return b.reasons(**inputs)
    raise ValueError(f"backend must be one of {['auto', *backends_for(op)]}, got {backend!r}")


def describe_inputs(**inputs) -> str:
    parts = []
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor):
            parts.append(
                f"{key}=Tensor(shape={tuple(value.shape)}, dtype={value.dtype}, device={value.device}, "
                f"stride={tuple(value.stride())})"
            )
        elif value is not None:
            parts.append(f"{key}={value!r}")
    return ", ".join(parts)


def select(op: str, requested: str | None, **inputs) -> str:
    """Resolve ``requested`` ("auto", None or a backend name) to a backend that can run these inputs."""
    if requested is None or requested == "auto":
        requested = os.environ.get(ENV_VAR, "auto") or "auto"
    if requested == "auto":
        all_reasons = {}
        token = _AUTO_SELECTING.set(True)  # "auto" never picks the CUDA emulation (cuda_device_reasons)
        try:
            for b in _REGISTRY[op]:
                why = b.reasons(**inputs)
                if not why:
                    return b.name
                all_reasons[b.name] = why
        finally:
            _AUTO_SELECTING.reset(token)
        raise ValueError(_no_backend_message(op, "auto", all_reasons, inputs))
    why = reasons(op, requested, **inputs)
    if why:
        raise ValueError(_no_backend_message(op, requested, {requested: why}, inputs))
    return requested


def _no_backend_message(op: str, requested: str, all_reasons: dict[str, list[str]], inputs) -> str:
    lines = [f"torchnova.{op}: backend={requested!r} cannot run these inputs: {describe_inputs(**inputs)}"]
    for name, why in all_reasons.items():
        lines.append(f"  `{name}` is not supported because:")
        lines.extend(f"    {w}" for w in why)
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Reason helpers shared by the ops. Each returns a list of human-readable reasons.
# ---------------------------------------------------------------------------------------------------------


def device_reasons(device: torch.device, allowed: tuple[str, ...]) -> list[str]:
    if device.type not in allowed:
        return [f"device={device.type} (supported: {', '.join(allowed)})"]
    return []


def dtype_reasons(dtype: torch.dtype, allowed: tuple[torch.dtype, ...]) -> list[str]:
    if dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        return [f"dtype={str(dtype).replace('torch.', '')} (supported: {names})"]
    return []


def extension_reasons(need_cuda: bool = False) -> list[str]:
    from . import _ext

    if not _ext.HAS_CPP:
        return [f"the torchnova C++ extension is not available ({_ext.CPP_IMPORT_ERROR})"]
    if need_cuda and not _ext.HAS_CUDA_KERNELS:
        return ["the torchnova C++ extension was built without CUDA kernels (rebuild with FORCE_CUDA=1 or a GPU)"]
    return []


# Inside torchnova.testing.cuda_emulation(): backend="cuda" runs the CUDA kernels on CPU tensors through the
# emulation layer (the ops torch.ops.torchnova.<op>_cuda_emu). "auto" never picks it.
CUDA_EMULATION_ACTIVE: contextvars.ContextVar[bool] = contextvars.ContextVar("torchnova_cuda_emulation", default=False)
_AUTO_SELECTING: contextvars.ContextVar[bool] = contextvars.ContextVar("torchnova_auto_selecting", default=False)


def cuda_emulated(device: torch.device) -> bool:
    """Whether backend="cuda" runs these (CPU) inputs through the CUDA emulation layer."""
    return device.type == "cpu" and CUDA_EMULATION_ACTIVE.get() and not _AUTO_SELECTING.get()


def cuda_device_reasons(device: torch.device) -> list[str]:
    """The cuda backend's extension and device reasons: CUDA kernels built and a CUDA tensor, or, inside
    torchnova.testing.cuda_emulation() with backend="cuda" named, a CPU tensor and the emulation layer built."""
    from . import _ext

    if cuda_emulated(device):
        if not _ext.HAS_CUDA_EMULATION:
            return [f"the CUDA emulation layer is not built ({_ext.CUDA_EMULATION_IMPORT_ERROR})"]
        return []
    why = extension_reasons(need_cuda=True) + device_reasons(device, ("cuda",))
    if device.type == "cpu" and CUDA_EMULATION_ACTIVE.get():
        why.append("backend='auto' never picks the CUDA emulation layer (name backend='cuda')")
    return why


def cuda_op_suffix(device: torch.device) -> str:
    """Suffix of the op the cuda backend calls: "_cuda_emu" for the emulated kernels, else ""."""
    return "_cuda_emu" if device.type == "cpu" else ""


def triton_reasons(device: torch.device) -> list[str]:
    from . import _ext

    if not _ext.HAS_TRITON:
        return [f"triton is not importable ({_ext.TRITON_IMPORT_ERROR})"]
    if device.type == "cpu" and not _ext.TRITON_INTERPRET:
        return ["device=cpu needs TRITON_INTERPRET=1 (the Triton interpreter)"]
    if device.type not in ("cuda", "cpu"):
        return [f"device={device.type} (supported: cuda, or cpu under TRITON_INTERPRET=1)"]
    return []


def compute_capability_reasons(device: torch.device, minimum: tuple[int, int]) -> list[str]:
    if device.type != "cuda":
        return []
    cap = torch.cuda.get_device_capability(device)
    if cap < minimum:
        return [f"compute capability {cap[0]}.{cap[1]} < required {minimum[0]}.{minimum[1]}"]
    return []
