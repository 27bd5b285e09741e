"""Backend selection for every torchnova op, with reasons (the xformers ``not_supported_reasons`` model).

Each op registers its backends in priority order (fastest first, as measured). A backend is a name plus a
``reasons(**inputs) -> list[str]`` function that says, from metadata only (device, dtype, shapes, compute
capability, what was built), why it cannot run these inputs; an empty list means it can.

* ``backend="auto"`` (or ``TORCHNOVA_BACKEND`` unset/"auto") picks the first backend with no reasons, in the
  order ``auto_order`` gives: on CUDA tensors the order a ``python -m benchmarks --tune`` run measured on this GPU
  (``_tuning``), else the roofline model's prediction (``_roofline``, docs/performance.md); elsewhere the
  registration order.
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


def _first_tensor(inputs: dict) -> torch.Tensor | None:
    return next((v for v in inputs.values() if isinstance(v, torch.Tensor)), None)


def auto_order(op: str, **inputs) -> tuple[list[str], str]:
    """(backend names in the order ``auto`` tries them, where that order comes from)."""
    names = backends_for(op)
    x = _first_tensor(inputs)
    if x is None or x.device.type != "cuda":
        return names, "registration order"
    from . import _roofline

    gpu = _roofline.device_name(_roofline.device_index(x.device))
    return gpu_order(op, gpu, x.dtype, **inputs)


def gpu_order(op: str, gpu: str, dtype: torch.dtype, **inputs) -> tuple[list[str], str]:
    """The order on the GPU named ``gpu``: measured (tune cache) if this (GPU, op, dtype, bucket) was tuned, else
    the roofline model's. Split from ``auto_order`` so tests can ask for any GPU on CPU tensors."""
    from . import _roofline, _tuning

    names = backends_for(op)
    work = _roofline.workload(op, **inputs)
    if work is None:
        return names, "registration order"
    measured = _tuning.cached_order(gpu, op, _tuning.dtype_name(dtype), work.bucket)
    if measured:
        order = [b for b in measured if b in names]
        return order + [b for b in names if b not in order], f"measured ({_tuning.cache_path()})"
    peaks = _roofline.peaks_for(gpu)
    return _roofline.roofline_order(names, work, dtype, peaks), f"roofline model ({peaks.name} peaks)"


def select(op: str, requested: str | None, **inputs) -> str:
    """Resolve ``requested`` ("auto", None or a backend name) to a backend that can run these inputs."""
    if requested is None or requested == "auto":
        requested = os.environ.get(ENV_VAR, "auto") or "auto"
    if requested == "auto":
        by_name = {b.name: b for b in _REGISTRY[op]}
        all_reasons = {}
        token = _AUTO_SELECTING.set(True)  # "auto" never picks the CUDA emulation (cuda_device_reasons)
        try:
            for name in auto_order(op, **inputs)[0]:
                why = by_name[name].reasons(**inputs)
                if not why:
                    return name
                all_reasons[name] = why
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
    if not why and device.type == "cuda":
        why += built_arch_reasons(device_capability(device), _ext.BUILD_INFO.get("cuda_archs", ""))
    return why


def built_arch_reasons(capability: tuple[int, int], cuda_archs: str) -> list[str]:
    """Whether the extension holds code this GPU can run: a cubin of the same major version and a minor <= the
    device's (binary compatible), or PTX of an arch <= the device's (JIT-compiled by the driver). ``cuda_archs`` is
    the build's tag from TORCH_CUDA_ARCH_LIST, e.g. "sm80_90" for "8.0;9.0", "sm80_90_PTX" for "8.0;9.0+PTX"."""
    tokens = cuda_archs.removeprefix("sm").split("_")
    cubins, ptx = [], []
    for i, token in enumerate(tokens):
        if token.isdigit() and len(token) >= 2:
            arch = (int(token[:-1]), int(token[-1]))
            (ptx if i + 1 < len(tokens) and tokens[i + 1] == "PTX" else cubins).append(arch)
            if i + 1 < len(tokens) and tokens[i + 1] == "PTX":
                cubins.append(arch)  # "+PTX" builds the cubin as well
    if not cubins and not ptx:
        return []  # unknown tag: let the launch decide
    major, minor = capability
    if any(a[0] == major and a[1] <= minor for a in cubins) or any(a <= (major, minor) for a in ptx):
        return []
    built = ", ".join(f"sm_{a}{b}" for a, b in cubins) + (" + PTX" if ptx else "")
    return [f"the extension holds no code for this GPU (sm_{major}{minor}; built for {built}): rebuild on this "
            "GPU (bash scripts/setup.sh builds for the visible arch) or with TORCH_CUDA_ARCH_LIST including it"]


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


# Device properties go through these two small helpers, so that tests can simulate any GPU on a CPU machine
# (monkeypatch them: sm_120 has 101376 bytes of opt-in shared memory per block, sm_86/89 101376, sm_80 166912,
# sm_90 232448). Both are cached by torch, so selection stays cheap and never syncs. They and
# cuda_shared_memory_bytes are constants to torch.compile (evaluated once while tracing, no graph break).


@torch.compiler.assume_constant_result
def device_capability(device: torch.device) -> tuple[int, int]:
    """(major, minor) compute capability of a CUDA device."""
    return tuple(torch.cuda.get_device_capability(device))


@torch.compiler.assume_constant_result
def device_smem_optin(device: torch.device) -> int:
    """Bytes of shared memory one block may opt into on a CUDA device (cudaDevAttrMaxSharedMemoryPerBlockOptin)."""
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "shared_memory_per_block_optin", props.shared_memory_per_block))


def compute_capability_reasons(device: torch.device, minimum: tuple[int, int]) -> list[str]:
    if device.type != "cuda":
        return []
    cap = device_capability(device)
    if cap < minimum:
        return [f"compute capability {cap[0]}.{cap[1]} < required {minimum[0]}.{minimum[1]}"]
    return []


@torch.compiler.assume_constant_result
def cuda_shared_memory_bytes(kernel: str, frames: int = 1, head_dim: int = 1) -> int:
    """Shared memory per block of the smallest launch of a torchnova CUDA kernel at this shape.

    The numbers come from the compiled extension (csrc/cuda/shared_memory_plan.h, the arithmetic the launchers
    use), so they cannot drift from the kernels. Kernel names: temporal_fwd, temporal_bwd, spatial_fwd,
    spatial_dkdv, spatial_dq, cogvideo_fwd, cogvideo_bwd, tc_bwd_dkdv, tc_bwd_dq (the tensor-core backward).
    Needs the extension (call after extension_reasons).
    """
    from . import _ext

    need = int(_ext._C.cuda_shared_memory_bytes(kernel, int(frames), int(head_dim)))
    if need < 0:
        raise ValueError(f"no shared-memory plan for kernel={kernel!r} at frames={frames}, head_dim={head_dim}")
    return need


# The CUDA backward of spatial and CogVideo attention runs the tensor-core kernels (csrc/cuda/attention_tc_bwd.cu)
# for these dtypes up to this head dim (csrc/cuda/attention_tc_bwd.h), the SIMT ones otherwise.
TENSOR_CORE_BACKWARD_DTYPES = (torch.float16, torch.bfloat16)
TENSOR_CORE_BACKWARD_MAX_HEAD_DIM = 128


def tensor_core_backward_needs(op: str, q) -> dict[str, int]:
    """{what: bytes per block} of the tensor-core backward kernels for q (its dtype and head dim q.shape[-1]), for
    shared_memory_reasons; empty where the backward stays SIMT, and off CUDA devices (nothing to compare with)."""
    head_dim = int(q.shape[-1])
    if (
        q.device.type != "cuda"
        or q.dtype not in TENSOR_CORE_BACKWARD_DTYPES
        or head_dim > TENSOR_CORE_BACKWARD_MAX_HEAD_DIM
    ):
        return {}
    return {
        f"the {op} tensor-core {part} backward (D={head_dim})": cuda_shared_memory_bytes(kernel, head_dim=head_dim)
        for part, kernel in (("dk/dv", "tc_bwd_dkdv"), ("dq", "tc_bwd_dq"))
    }


def shared_memory_reasons(device: torch.device, needs: dict[str, int]) -> list[str]:
    """Reasons for the launches in ``needs`` ({what: bytes per block}) that exceed the device's opt-in limit."""
    if device.type != "cuda" or not needs:
        return []
    limit = device_smem_optin(device)
    return [
        f"{what} needs {need} bytes of shared memory per block; this device allows {limit} "
        f"(shared_memory_per_block_optin)"
        for what, need in needs.items()
        if need > limit
    ]


def may_need_backward(*tensors) -> bool:
    """Whether autograd could call the backward of an op on these inputs (grad mode on, some input requires grad).

    Metadata only; used to check a backward's resources at selection time, so that "auto" never picks a
    backend whose forward runs and whose backward then cannot.
    """
    return torch.is_grad_enabled() and any(t is not None and getattr(t, "requires_grad", False) for t in tensors)


# ---------------------------------------------------------------------------------------------------------
# Shared memory per block: what the Triton launchers size their configurations by.
# ---------------------------------------------------------------------------------------------------------

# Opt-in shared memory per block (bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin) of the targets every Triton
# launch configuration is compile-checked for (scripts/compile_check_triton.py, docs/triton_configs.md).
SHARED_MEMORY_SM80 = 166_912  # A100, A30 (163 KB)
SHARED_MEMORY_SM86 = 101_376  # RTX 30xx / A10 / A40 (sm_86), RTX 40xx / L4 / L40 (sm_89), RTX 50xx (sm_120): 99 KB
SHARED_MEMORY_SM90 = 232_448  # H100 / H200 (227 KB)
# The limit the launchers assume where there is no device to ask (CPU tensors under the Triton interpreter): the
# smallest checked one, so the interpreter tests run the configurations of the consumer cards.
DEFAULT_SHARED_MEMORY = SHARED_MEMORY_SM86


def shared_memory_per_block(device: torch.device) -> int:
    """Opt-in shared memory per block (bytes) of ``device``: ``shared_memory_per_block_optin`` of a CUDA device
    (``device_smem_optin``), ``DEFAULT_SHARED_MEMORY`` for any other device (the Triton interpreter). Every
    Triton launcher picks its configuration from this value, so tests patch this one function to run the
    configuration of another card (the CUDA backends' reasons read ``device_smem_optin`` directly)."""
    if device.type != "cuda":
        return DEFAULT_SHARED_MEMORY
    return device_smem_optin(device)
