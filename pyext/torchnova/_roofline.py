"""Roofline model behind ``backend="auto"`` on CUDA devices until a ``--tune`` run has measured there.

Each op registers a *workload* function that turns its inputs' metadata into FLOPs and minimal bytes of one
forward+backward (the unit autograd pays for the backend ``auto`` picks). Each backend is described by the unit
its kernels run on and an *achieved fraction* of that unit's peak, assumed until a GPU measures it
(docs/performance.md gives the numbers and the reasons). The predicted time of a backend is

    t = max(FLOPs / (compute peak of its unit * achieved compute fraction),
            bytes / (memory bandwidth * achieved bandwidth fraction))

and ``auto`` tries the backends in increasing predicted time (ties keep the registration order). Everything
here is metadata arithmetic: no tensor is read, nothing syncs.

Units: the Triton kernels use ``tl.dot``, which runs on the tensor cores for fp16/bf16 inputs (wgmma on sm_90,
mma.sync before) and as IEEE fp32 FMA (``input_precision="ieee"``) for fp32 inputs. The CUDA kernels of
spatial_attention and cogvideo_attention run fp16/bf16 inputs with D <= 128 on their tensor-core kernels (mma.sync,
csrc/cuda/attention_tc_*.cu); everything else on the CUDA backend is SIMT (fp32 FMA, whatever the input dtype).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class GpuPeaks:
    """Dense peaks (no sparsity) from the vendors' datasheets; shared/PERF-ANCHORS.md §3 lists the sources."""

    name: str
    bandwidth: float  # bytes/s of HBM/GDDR
    fp32_simt: float  # FLOP/s of non-tensor fp32 FMA
    half_tensor: float  # FLOP/s of fp16/bf16 tensor-core MMA with fp32 accumulation (halved on GeForce cards)
    wgmma: bool = False  # sm_90: the dense peak needs wgmma; mma.sync reaches about two thirds of it


# Matched against torch.cuda.get_device_name() by substring, first match wins (so "H100 PCIe" before "H100").
GPU_PEAKS: tuple[tuple[str, GpuPeaks], ...] = (
    ("H200", GpuPeaks("H200", 4.8e12, 66.9e12, 989.4e12, wgmma=True)),
    ("H100 PCIe", GpuPeaks("H100 PCIe", 2.0e12, 51.2e12, 756.0e12, wgmma=True)),
    ("H100", GpuPeaks("H100 SXM", 3.35e12, 66.9e12, 989.4e12, wgmma=True)),
    ("A100", GpuPeaks("A100 SXM", 2.039e12, 19.5e12, 312.0e12)),
    ("L40S", GpuPeaks("L40S", 0.864e12, 91.6e12, 362.0e12)),
    ("RTX 5090", GpuPeaks("RTX 5090", 1.792e12, 104.8e12, 209.5e12)),
    ("RTX 4090", GpuPeaks("RTX 4090", 1.008e12, 82.6e12, 165.2e12)),
    ("RTX 3090", GpuPeaks("RTX 3090", 0.936e12, 35.6e12, 71.0e12)),
    ("A5000", GpuPeaks("RTX A5000", 0.768e12, 27.8e12, 111.0e12)),
)
# An unknown GPU is priced like an A100: what matters for the order is the ratio of tensor-core to SIMT peak
# (>= 2x on every card since Ampere) and the ridge point, both of which an A100 represents in the middle.
FALLBACK_PEAKS = GPU_PEAKS[3][1]

# Achieved fractions assumed until a GPU has measured (docs/performance.md, "assumed fractions"):
# - compute: FlashAttention-2 reaches 50-73 % of an A100's tensor peak and ~35 % of an H100's; FlexAttention
#   (Triton) 85-90 % of FA2. SIMT attention kernels rarely reach half of their own fp32 peak.
# - memory: Liger's Triton KL streams at ~99 % of HBM bandwidth; 80 % is what a tuned streaming kernel keeps at
#   the shapes users run (short rows, tails), for Triton and hand-written CUDA alike.
# - mma.sync on sm_90: FlashAttention-2 (mma.sync) reaches ~35 % of an H100's dense peak where FlashAttention-3
#   (wgmma) reaches 75 %; Triton's tl.dot compiles to wgmma there. So the package's mma.sync kernels are assumed at
#   0.35 on Hopper and at the tensor fraction elsewhere.
COMPUTE_FRACTION = {"tensor": 0.45, "simt": 0.40, "mma_sync_on_hopper": 0.35}
MEMORY_FRACTION = {"cuda": 0.80, "triton": 0.80}


@dataclass(frozen=True)
class Workload:
    """One forward+backward of an op on given shapes."""

    flops: float
    bytes: float
    bucket: str  # the shape bucket the tune cache is keyed by, e.g. "T16-D64"
    cuda_tensor_cores: bool = False  # the cuda backend has tensor-core kernels for these shapes (fp16/bf16 inputs)


def peaks_for(device_name: str) -> GpuPeaks:
    for key, peaks in GPU_PEAKS:
        if key in device_name:
            return peaks
    return FALLBACK_PEAKS


def compute_unit(backend: str, dtype: torch.dtype, work: Workload | None = None) -> str:
    """'tensor' for the Triton kernels' fp16/bf16 dots and the CUDA tensor-core kernels, 'simt' for the rest."""
    if dtype not in (torch.float16, torch.bfloat16):
        return "simt"
    if backend == "triton" or (backend == "cuda" and work is not None and work.cuda_tensor_cores):
        return "tensor"
    return "simt"


def compute_fraction(backend: str, unit: str, peaks: GpuPeaks) -> float:
    if unit == "tensor" and backend == "cuda" and peaks.wgmma:
        return COMPUTE_FRACTION["mma_sync_on_hopper"]
    return COMPUTE_FRACTION[unit]


def predicted_seconds(work: Workload, backend: str, dtype: torch.dtype, peaks: GpuPeaks) -> float:
    unit = compute_unit(backend, dtype, work)
    peak = peaks.half_tensor if unit == "tensor" else peaks.fp32_simt
    compute = work.flops / (peak * compute_fraction(backend, unit, peaks))
    memory = work.bytes / (peaks.bandwidth * MEMORY_FRACTION.get(backend, 0.5))
    return max(compute, memory)


def roofline_order(backends: list[str], work: Workload, dtype: torch.dtype, peaks: GpuPeaks) -> list[str]:
    """GPU backends (cuda, triton) sorted by predicted time, the others after them in registration order."""
    gpu = [b for b in backends if b in MEMORY_FRACTION]
    rest = [b for b in backends if b not in MEMORY_FRACTION]
    ranked = sorted(gpu, key=lambda b: (predicted_seconds(work, b, dtype, peaks), backends.index(b)))
    return ranked + rest


# ---------------------------------------------------------------------------------------------------------
# Workloads of the ops (forward + backward): FLOPs count multiply-adds as 2, attention as the GEMMs the kernels
# execute (attention_workload); bytes are the minimal HBM traffic (each tensor read or written once).
# ---------------------------------------------------------------------------------------------------------

_WORKLOADS: dict[str, Callable[..., Workload]] = {}


def register_workload(op: str, fn: Callable[..., Workload]) -> None:
    _WORKLOADS[op] = fn


def workload(op: str, **inputs) -> Workload | None:
    fn = _WORKLOADS.get(op)
    return fn(**inputs) if fn is not None else None


def pow2_bucket(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def attention_workload(problems: float, queries: float, keys_per_query: float, head_dim: int, itemsize: int,
                       tokens: float, bucket: str, backward_gemms: int = 7) -> Workload:
    """``problems`` independent attentions of ``queries`` rows seeing ``keys_per_query`` keys each, over
    ``tokens`` (token x head) rows of q, k, v, o in total. FLOPs: the forward's 2 GEMMs (S = Q K^T, O = P V) of
    2 * queries * keys * D each, plus the backward's: 7 for the deterministic two-kernel backwards of spatial and
    CogVideo attention on both GPU backends (S, dP, dV, dK key-parallel; S, dP, dQ recomputed query-parallel; no
    atomics), 5 for temporal attention, whose whole T x T problem sits in one block (flash-attention's convention
    counts 5). fwd+bwd traffic as benchmarks/bench_spacetime.py counts it: forward reads q, k, v and writes o;
    backward reads q, k, v, o, dO and writes dQ, dK, dV: 12 passes."""
    gemm = 2.0 * problems * queries * keys_per_query * head_dim
    return Workload((2 + backward_gemms) * gemm, 12.0 * tokens * head_dim * itemsize, bucket)


def _video_dims(q):
    B, T, S, H, D = q.shape
    return B, T, S, H, D, q.element_size()


def temporal_workload(q, **_) -> Workload:
    B, T, S, H, D, item = _video_dims(q)
    return attention_workload(B * S * H, T, T, D, item, B * T * S * H, f"T{pow2_bucket(T)}-D{pow2_bucket(D)}",
                              backward_gemms=5)


# The head dims the CUDA tensor-core attention kernels take (csrc/cuda/attention_tc_*.cu); larger ones run SIMT.
CUDA_TENSOR_CORE_MAX_HEAD_DIM = 128


def spatial_workload(q, **_) -> Workload:
    B, T, S, H, D, item = _video_dims(q)
    work = attention_workload(B * T * H, S, S, D, item, B * T * S * H, f"S{pow2_bucket(S)}-D{pow2_bucket(D)}")
    return dataclasses.replace(work, cuda_tensor_cores=D <= CUDA_TENSOR_CORE_MAX_HEAD_DIM)


def cogvideo_workload(x, head_dim=None, text_len=0, frames=1, grid=(1, 1), channel="plus", attention="full",
                      window=10, **_) -> Workload:
    B, L, H, D = x.shape
    gh, gw = (grid, grid) if isinstance(grid, int) else grid
    frame_tokens = max(1, gh * gw)
    if channel == "base":
        keys = text_len + frame_tokens / 2  # own frame, causal on average
    elif attention == "window":
        keys = text_len + min(window, gh) * min(window, gw) * frames / 2  # window through every frame, causal
    else:
        keys = text_len + frames * frame_tokens / 2  # causal over the whole frame raster
    bucket = f"{channel}-{attention if channel == 'plus' else 'frame'}-D{pow2_bucket(D)}"
    work = attention_workload(B * H, L, keys, D, x.element_size(), B * L * H, bucket)
    return dataclasses.replace(work, cuda_tensor_cores=D <= CUDA_TENSOR_CORE_MAX_HEAD_DIM)


def mesa_kl_workload(student_logits, **_) -> Workload:
    C = student_logits.shape[-1] if student_logits.dim() else 1
    rows = student_logits.numel() // max(C, 1)
    item = student_logits.element_size()
    # forward reads z and t and writes the stashed gradient; the backward scales it in place: 4 passes.
    return Workload(12.0 * rows * C, 4.0 * rows * C * item, f"C{pow2_bucket(C)}")


def mix_workload(x, **_) -> Workload:
    n = x.numel()
    return Workload(8.0 * n, 6.0 * n * x.element_size(), "mix")


register_workload("temporal_attention", temporal_workload)
register_workload("spatial_attention", spatial_workload)
register_workload("cogvideo_attention", cogvideo_workload)
register_workload("mesa_kl", mesa_kl_workload)
register_workload("dual_channel_mix", mix_workload)


def _assume_constant(fn):
    """Under torch.compile, run ``fn`` at trace time and bake its result in (no graph break, no guard on the
    host call); a plain call elsewhere."""
    dynamo = getattr(torch, "_dynamo", None)
    marker = getattr(dynamo, "assume_constant_result", None) if dynamo is not None else None
    return marker(fn) if marker is not None else fn


@_assume_constant
@functools.lru_cache(maxsize=None)
def device_name(index: int) -> str:
    """The CUDA device's name (cached: a host query, never a sync)."""
    return torch.cuda.get_device_name(index)


def device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def ridge_point(peaks: GpuPeaks, unit: str = "tensor") -> float:
    """FLOP per byte above which a kernel on ``unit`` is compute-bound."""
    return (peaks.half_tensor if unit == "tensor" else peaks.fp32_simt) / peaks.bandwidth


def intensity(work: Workload) -> float:
    return work.flops / work.bytes if work.bytes else math.inf
