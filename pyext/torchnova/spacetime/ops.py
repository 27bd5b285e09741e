"""Factorized space-time attention ops: validation, backend selection, torch.library registration.

    spatial_attention(q, k, v, *, scale=None, backend="auto")
    temporal_attention(q, k, v, *, bias=None, segment_ids=None, causal=False, scale=None, rotary=None,
                       rotary_interleaved=False, backend="auto")

    temporal_attention_qkvpacked(qkv, *, bias=None, segment_ids=None, causal=False, scale=None, backend="auto")
    spatial_attention_qkvpacked(qkv, *, scale=None, backend="auto")

Layout (B, T, S, H, D); q, k, v may be strided views (e.g. slices of one fused qkv projection): the kernels
read them through their strides, and only a view whose last dim is not contiguous is copied. The ``qkvpacked``
forms (flash-attn's ``*_qkvpacked_func``) take the fused (B, T, S, 3, H, D) tensor itself: same results, but
the backward writes one (B, T, S, 3, H, D) gradient (CPU and Triton kernels write it directly; CUDA stacks its
three), where q, k, v slices make autograd ``torch.stack`` three gradients. Semantics in ``reference.py``.
Backends in "auto" order: ``cuda`` (CUDA tensors, sm_80+, fp32/fp16/bf16, D <= 256, T <= 128), ``cpp`` (CPU
tensors), ``triton`` (CUDA tensors, fp32/fp16/bf16, D <= 256; temporal T <= 64; on CPU only under
TRITON_INTERPRET=1, for tests), ``reference``. ``cuda`` and ``cpp`` call the same ops
(csrc/spacetime_ops.cpp), dispatched by device; ``triton`` calls the ``*_triton`` ops of the same signatures
(triton_kernels.py). All return (out, lse) and the backward recomputes the probabilities from lse. The bias
gradient is reduced in a fixed order and the spatial backward uses no atomics (bit-identical across runs).

Rotary position embedding (``rotary=(cos, sin)``, temporal ops): the ``temporal_attention_rotary_*`` ops (the
temporal ones plus the tables and the pair layout) rotate q and k inside the kernels (cuda, cpp, triton) as they
are loaded; the CUDA kernels need no more shared memory for it. The kernels give no gradient to the tables:
tables that require grad (a learned rotary frequency) go to the reference.
"""

from __future__ import annotations

import numbers

import torch

from .. import _backend, _ext
from .._library import accumulation_dtype, define_triton_op, once_differentiable
from . import triton_kernels
from .reference import spatial_attention_ref, temporal_attention_ref

_CPP_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CUDA_MAX_HEAD_DIM = 256
CUDA_MAX_FRAMES = 128
# The temporal kernels keep T x T tiles per warp in shared memory, so which T runs depends on the device's opt-in
# limit per block: e.g. on 99 KB cards (sm_86/89/120/121) the backward fits up to T = 97 and the forward up to 128.
# The reasons compare the device's shared_memory_per_block_optin with the bytes the launchers request
# (_backend.cuda_shared_memory_bytes, from csrc/cuda/shared_memory_plan.h).


# ---------------------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------------------


def _cpp_reasons(q, **_):
    return _backend.extension_reasons() + _backend.device_reasons(q.device, ("cpu",)) + _backend.dtype_reasons(
        q.dtype, _CPP_DTYPES
    )


def _cuda_reasons(q, **_):
    why = _backend.cuda_device_reasons(q.device) + _backend.dtype_reasons(q.dtype, _CUDA_DTYPES)
    if q.shape[-1] > CUDA_MAX_HEAD_DIM:
        why.append(f"head dim D={q.shape[-1]} > {CUDA_MAX_HEAD_DIM}")
    return why + _backend.compute_capability_reasons(q.device, (8, 0))


def _rotary_kernel_reasons(rotary_cos=None, rotary_sin=None, **_):
    """The kernels rotate q and k but give the tables no gradient: tables that need one go to the reference."""
    if rotary_cos is None or not torch.is_grad_enabled():
        return []
    if rotary_cos.requires_grad or rotary_sin.requires_grad:
        return ["rotary tables require grad (the kernels give them no gradient; the reference does)"]
    return []


def _cpp_temporal_reasons(q, **inputs):
    why = _cpp_reasons(q, **inputs) + _rotary_kernel_reasons(**inputs)
    if inputs.get("rotary_cos") is not None and _ext.HAS_CPP and not HAS_NATIVE_ROTARY:
        why.append("rotary: the C++ extension was built without the rotary ops (rebuild it)")
    return why


def _cuda_spatial_reasons(q, k=None, v=None, **inputs):
    why = _cuda_reasons(q, **inputs)
    if why:
        return why
    D = int(q.shape[-1])
    needs = {f"the spatial forward (D={D})": _backend.cuda_shared_memory_bytes("spatial_fwd", head_dim=D)}
    if _backend.may_need_backward(q, k, v):
        needs[f"the spatial dk/dv backward (D={D})"] = _backend.cuda_shared_memory_bytes("spatial_dkdv", head_dim=D)
        needs[f"the spatial dq backward (D={D})"] = _backend.cuda_shared_memory_bytes("spatial_dq", head_dim=D)
        needs.update(_backend.tensor_core_backward_needs("spatial", q))
    return _backend.shared_memory_reasons(q.device, needs)


def _cuda_rotary_reasons(q, rotary_cos=None, **_):
    """An extension built from sources before the rotary CUDA kernels still imports; it then says so."""
    built = HAS_EMULATED_ROTARY if q.device.type == "cpu" else HAS_CUDA_ROTARY  # cpu: testing.cuda_emulation
    if rotary_cos is None or built:
        return []
    return ["rotary: the CUDA kernels were built without the rotary ops (rebuild the extension)"]


def _cuda_temporal_reasons(q, k=None, v=None, bias=None, **inputs):
    why = _cuda_reasons(q, **inputs) + _rotary_kernel_reasons(**inputs)
    if not why:  # a device the kernels run on: were the rotary ones built?
        why += _cuda_rotary_reasons(q, **inputs)
    T = int(q.shape[1])
    if T > CUDA_MAX_FRAMES:
        why.append(f"T={T} frames > {CUDA_MAX_FRAMES}")
    if why:
        return why
    # One warp per block at least; the launchers fit as many warps (up to 4) as the limit allows. The backward
    # is checked whenever autograd may call it, so "auto" never picks a forward whose backward cannot launch.
    # Rotary inputs need the same bytes (q and k are rotated in registers as their tiles are loaded).
    needs = {f"the temporal forward (T={T})": _backend.cuda_shared_memory_bytes("temporal_fwd", frames=T)}
    if _backend.may_need_backward(q, k, v, bias):
        needs[f"the temporal backward (T={T})"] = _backend.cuda_shared_memory_bytes("temporal_bwd", frames=T)
    return _backend.shared_memory_reasons(q.device, needs)


def _triton_reasons(q, **_):
    why = _backend.triton_reasons(q.device) + _backend.dtype_reasons(q.dtype, _CUDA_DTYPES)
    if q.device.type == "cpu" and q.dtype == torch.bfloat16 and not why:
        why.append("dtype=bfloat16 on cpu: bfloat16 tl.dot is wrong in the Triton interpreter")
    D = q.shape[-1]
    if D > triton_kernels.MAX_HEAD_DIM:
        why.append(f"head dim D={D} > {triton_kernels.MAX_HEAD_DIM}")
    return why


def _triton_spatial_reasons(q, **inputs):
    why = _triton_reasons(q, **inputs)
    if not why:  # launch configurations are picked by the device's shared memory per block
        shared = triton_kernels.spatial_shared_memory_reason(q.shape[-1], q.dtype, q.device)
        why += [shared] if shared else []
    return why


def _triton_temporal_reasons(q, **inputs):
    why = _triton_reasons(q, **inputs)
    T = q.shape[1]
    if T > triton_kernels.MAX_FRAMES:
        why.append(f"T={T} frames > {triton_kernels.MAX_FRAMES} (the T x T tile lives in registers)")
    # Grid (H, cdiv(B·S, BLOCK_P)): the problems of one head sit on grid axis 1, at most MAX_GRID_YZ programs.
    problems, per_program = q.shape[0] * q.shape[2], triton_kernels.BLOCK_P
    if -(-problems // per_program) > triton_kernels.MAX_GRID_YZ:
        why.append(f"B*S = {problems} problems per head > {triton_kernels.MAX_GRID_YZ * per_program} (grid axis 1: "
                   f"{triton_kernels.MAX_GRID_YZ} programs of {per_program} problems)")
    if not why:  # whole T x D tiles on chip: the forward's and the backward's must fit the shared memory
        shared = triton_kernels.temporal_shared_memory_reason(T, q.shape[-1], q.dtype, q.device,
                                                              inputs.get("rotary_cos") is not None)
        why += [shared] if shared else []
    return why + _rotary_kernel_reasons(**inputs)


def _reference_reasons(q, **_):
    return []


# Priority for "auto": cpp comes before triton because cpp runs only on CPU tensors, where Triton could only run
# in its (slow) interpreter; on a GPU the order is cuda, triton.
for _op, _cuda, _cpp, _triton in (
    ("temporal_attention", _cuda_temporal_reasons, _cpp_temporal_reasons, _triton_temporal_reasons),
    ("spatial_attention", _cuda_spatial_reasons, _cpp_reasons, _triton_spatial_reasons),
):
    _backend.register(_op, "cuda", _cuda)
    _backend.register(_op, "cpp", _cpp)
    _backend.register(_op, "triton", _triton)
    _backend.register(_op, "reference", _reference_reasons)


# ---------------------------------------------------------------------------------------------------------
# Op registration (fake shapes, autograd)
# ---------------------------------------------------------------------------------------------------------


def _outputs_like(q):
    lse = q.new_empty(q.shape[:4], dtype=accumulation_dtype(q.dtype))
    return q.new_empty(q.shape), lse


def _temporal_fwd_fake(q, k, v, bias, segment_ids, causal, scale):
    return _outputs_like(q)


def _temporal_bwd_fake(grad_out, q, k, v, out, lse, bias, segment_ids, causal, scale, needs_bias_grad, deterministic):
    T, H = q.shape[1], q.shape[3]
    acc = accumulation_dtype(q.dtype)
    dbias = q.new_empty((H, T, T) if needs_bias_grad else (0,), dtype=acc)
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape), dbias


def _temporal_setup(ctx, inputs, output):
    q, k, v, bias, segment_ids, causal, scale = inputs
    out, lse = output
    ctx.causal, ctx.scale = causal, scale
    ctx.has_bias = bias is not None
    ctx.save_for_backward(q, k, v, out, lse, bias, segment_ids)


def _make_temporal_backward(bwd_op):
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, bias, segment_ids = ctx.saved_tensors
        needs_bias_grad = ctx.has_bias and ctx.needs_input_grad[3]
        dq, dk, dv, dbias = bwd_op(
            _dense(grad_out), q, k, v, out, lse, bias, segment_ids, ctx.causal, ctx.scale, needs_bias_grad,
            torch.are_deterministic_algorithms_enabled(),
        )  # fmt: skip
        return dq, dk, dv, (dbias if needs_bias_grad else None), None, None, None

    return backward


def _spatial_fwd_fake(q, k, v, scale):
    return _outputs_like(q)


def _spatial_bwd_fake(grad_out, q, k, v, out, lse, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


def _spatial_setup(ctx, inputs, output):
    q, k, v, scale = inputs
    out, lse = output
    ctx.scale = scale
    ctx.save_for_backward(q, k, v, out, lse)


def _make_spatial_backward(bwd_op):
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = bwd_op(_dense(grad_out), q, k, v, out, lse, ctx.scale)
        return dq, dk, dv, None

    return backward


def _packed_grad_fake(qkv):
    return qkv.new_empty(qkv.shape)  # contiguous, like the kernels' dqkv


def _temporal_packed_fwd_fake(qkv, bias, segment_ids, causal, scale):
    return _outputs_like(qkv.select(3, 0))


def _temporal_packed_bwd_fake(grad_out, qkv, out, lse, bias, segment_ids, causal, scale, needs_bias_grad,
                              deterministic):  # fmt: skip
    T, H = qkv.shape[1], qkv.shape[4]
    dbias = qkv.new_empty((H, T, T) if needs_bias_grad else (0,), dtype=accumulation_dtype(qkv.dtype))
    return _packed_grad_fake(qkv), dbias


def _temporal_packed_setup(ctx, inputs, output):
    qkv, bias, segment_ids, causal, scale = inputs
    out, lse = output
    ctx.causal, ctx.scale = causal, scale
    ctx.has_bias = bias is not None
    ctx.save_for_backward(qkv, out, lse, bias, segment_ids)


def _make_temporal_packed_backward(bwd_op):
    def backward(ctx, grad_out, grad_lse):
        qkv, out, lse, bias, segment_ids = ctx.saved_tensors
        needs_bias_grad = ctx.has_bias and ctx.needs_input_grad[1]
        dqkv, dbias = bwd_op(
            _dense(grad_out), qkv, out, lse, bias, segment_ids, ctx.causal, ctx.scale, needs_bias_grad,
            torch.are_deterministic_algorithms_enabled(),
        )  # fmt: skip
        return dqkv, (dbias if needs_bias_grad else None), None, None, None

    return backward


def _spatial_packed_fwd_fake(qkv, scale):
    return _outputs_like(qkv.select(3, 0))


def _spatial_packed_bwd_fake(grad_out, qkv, out, lse, scale):
    return _packed_grad_fake(qkv)


def _spatial_packed_setup(ctx, inputs, output):
    qkv, scale = inputs
    out, lse = output
    ctx.scale = scale
    ctx.save_for_backward(qkv, out, lse)


def _make_spatial_packed_backward(bwd_op):
    def backward(ctx, grad_out, grad_lse):
        qkv, out, lse = ctx.saved_tensors
        return bwd_op(_dense(grad_out), qkv, out, lse, ctx.scale), None

    return backward


def _rotary_fwd_fake(q, k, v, bias, segment_ids, causal, scale, rotary_cos, rotary_sin, rotary_interleaved):
    return _outputs_like(q)


def _rotary_bwd_fake(grad_out, q, k, v, out, lse, bias, segment_ids, causal, scale, rotary_cos, rotary_sin,
                     rotary_interleaved, needs_bias_grad, deterministic):  # fmt: skip
    return _temporal_bwd_fake(grad_out, q, k, v, out, lse, bias, segment_ids, causal, scale, needs_bias_grad,
                              deterministic)  # fmt: skip


def _rotary_setup(ctx, inputs, output):
    q, k, v, bias, segment_ids, causal, scale, rotary_cos, rotary_sin, rotary_interleaved = inputs
    out, lse = output
    ctx.causal, ctx.scale, ctx.interleaved = causal, scale, rotary_interleaved
    ctx.has_bias = bias is not None
    ctx.save_for_backward(q, k, v, out, lse, bias, segment_ids, rotary_cos, rotary_sin)


def _make_rotary_backward(bwd_op):
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, bias, segment_ids, rotary_cos, rotary_sin = ctx.saved_tensors
        needs_bias_grad = ctx.has_bias and ctx.needs_input_grad[3]
        dq, dk, dv, dbias = bwd_op(
            grad_out.contiguous(), q, k, v, out, lse, bias, segment_ids, ctx.causal, ctx.scale, rotary_cos,
            rotary_sin, ctx.interleaved, needs_bias_grad, torch.are_deterministic_algorithms_enabled(),
        )  # fmt: skip
        return dq, dk, dv, (dbias if needs_bias_grad else None), None, None, None, None, None, None

    return backward


def _rotary_packed_fwd_fake(qkv, bias, segment_ids, causal, scale, rotary_cos, rotary_sin, rotary_interleaved):
    return _outputs_like(qkv.select(3, 0))


def _rotary_packed_bwd_fake(grad_out, qkv, out, lse, bias, segment_ids, causal, scale, rotary_cos, rotary_sin,
                            rotary_interleaved, needs_bias_grad, deterministic):  # fmt: skip
    return _temporal_packed_bwd_fake(grad_out, qkv, out, lse, bias, segment_ids, causal, scale, needs_bias_grad,
                                     deterministic)  # fmt: skip


def _rotary_packed_setup(ctx, inputs, output):
    qkv, bias, segment_ids, causal, scale, rotary_cos, rotary_sin, rotary_interleaved = inputs
    out, lse = output
    ctx.causal, ctx.scale, ctx.interleaved = causal, scale, rotary_interleaved
    ctx.has_bias = bias is not None
    ctx.save_for_backward(qkv, out, lse, bias, segment_ids, rotary_cos, rotary_sin)


def _make_rotary_packed_backward(bwd_op):
    def backward(ctx, grad_out, grad_lse):
        qkv, out, lse, bias, segment_ids, rotary_cos, rotary_sin = ctx.saved_tensors
        needs_bias_grad = ctx.has_bias and ctx.needs_input_grad[1]
        dqkv, dbias = bwd_op(
            grad_out.contiguous(), qkv, out, lse, bias, segment_ids, ctx.causal, ctx.scale, rotary_cos, rotary_sin,
            ctx.interleaved, needs_bias_grad, torch.are_deterministic_algorithms_enabled(),
        )  # fmt: skip
        return dqkv, (dbias if needs_bias_grad else None), None, None, None, None, None, None

    return backward


# op (the name before _fwd / _bwd): (forward fake, backward fake, make_backward(bwd_op), setup_context)
_FWD_BWD_REGISTRATION = {
    "temporal_attention": (_temporal_fwd_fake, _temporal_bwd_fake, _make_temporal_backward, _temporal_setup),
    "spatial_attention": (_spatial_fwd_fake, _spatial_bwd_fake, _make_spatial_backward, _spatial_setup),
    "temporal_attention_qkvpacked": (
        _temporal_packed_fwd_fake, _temporal_packed_bwd_fake, _make_temporal_packed_backward, _temporal_packed_setup
    ),
    "spatial_attention_qkvpacked": (
        _spatial_packed_fwd_fake, _spatial_packed_bwd_fake, _make_spatial_packed_backward, _spatial_packed_setup
    ),
    "temporal_attention_rotary": (_rotary_fwd_fake, _rotary_bwd_fake, _make_rotary_backward, _rotary_setup),
    "temporal_attention_rotary_qkvpacked": (
        _rotary_packed_fwd_fake, _rotary_packed_bwd_fake, _make_rotary_packed_backward, _rotary_packed_setup
    ),
}  # fmt: skip


def _register(op: str, suffix: str = "") -> None:
    """Fake kernels for the ops torchnova::{op}_fwd{suffix} and {op}_bwd{suffix} and the forward's autograd,
    which calls the backward op."""
    fwd_fake, bwd_fake, make_backward, setup_context = _FWD_BWD_REGISTRATION[op]
    fwd_name, bwd_name = f"torchnova::{op}_fwd{suffix}", f"torchnova::{op}_bwd{suffix}"
    torch.library.register_fake(fwd_name)(fwd_fake)
    torch.library.register_fake(bwd_name)(bwd_fake)
    bwd_op = getattr(torch.ops.torchnova, f"{op}_bwd{suffix}").default
    backward = once_differentiable(make_backward(bwd_op), fwd_name)
    torch.library.register_autograd(fwd_name, backward, setup_context=setup_context)


def _has_native_op(name: str) -> bool:
    try:
        getattr(torch.ops.torchnova, name)
    except (AttributeError, RuntimeError):
        return False
    return True


# An extension built from older sources (before the rotary ops) still imports; its cpp backend then says why it
# cannot run rotary inputs instead of torchnova failing to import.
HAS_NATIVE_ROTARY = _ext.HAS_CPP and _has_native_op("temporal_attention_rotary_fwd")
# The same for the CUDA kernels (csrc/cuda/spacetime_temporal.cu registers the rotary ops' CUDA kernels).
HAS_CUDA_ROTARY = HAS_NATIVE_ROTARY and torch._C._dispatch_has_kernel_for_dispatch_key(
    "torchnova::temporal_attention_rotary_fwd", "CUDA"
)  # fmt: skip

if _ext.HAS_CPP:
    for _op in _FWD_BWD_REGISTRATION:
        if "rotary" not in _op or HAS_NATIVE_ROTARY:
            _register(_op)

# The CUDA kernels run on the CPU (torchnova.testing.cuda_emulation); an emulation module built from sources before
# the rotary CUDA kernels lacks the rotary ops, and then the cuda backend says so for rotary inputs.
HAS_EMULATED_ROTARY = _ext.HAS_CUDA_EMULATION and _has_native_op("temporal_attention_rotary_fwd_cuda_emu")
if _ext.HAS_CUDA_EMULATION:
    for _op in _FWD_BWD_REGISTRATION:
        if "rotary" not in _op or HAS_EMULATED_ROTARY:
            _register(_op, "_cuda_emu")

if triton_kernels.HAS_TRITON:
    for _op in _FWD_BWD_REGISTRATION:
        for _half in ("fwd", "bwd"):
            define_triton_op(f"torchnova::{_op}_{_half}_triton", getattr(triton_kernels, f"{_op}_{_half}_triton"))
        _register(_op, "_triton")


# ---------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------


def _validate_qkv(op: str, q, k, v, scale) -> float:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.dtype.is_floating_point:
            raise TypeError(f"{op}: {name} must be a floating-point tensor, got dtype={x.dtype}")
        if x.dim() != 5:
            raise ValueError(f"{op}: {name} must have shape (B, T, S, H, D) (5 dims), got {tuple(x.shape)}")
    for name, x in (("k", k), ("v", v)):
        if x.shape != q.shape:
            raise ValueError(f"{op}: {name} must have q's shape {tuple(q.shape)}, got {tuple(x.shape)}")
        if x.dtype != q.dtype:
            raise TypeError(f"{op}: {name} must have q's dtype {q.dtype}, got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{op}: {name} must be on q's device {q.device}, got {x.device}")
    if q.shape[-1] == 0:
        raise ValueError(f"{op}: the head dim D must be >= 1, got q of shape {tuple(q.shape)}")
    if scale is None:
        return q.shape[-1] ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not (0 < float(scale) < float("inf")):
        raise ValueError(f"{op}: scale must be a finite number > 0 or None, got {scale!r}")
    return float(scale)


def _validate_temporal_extras(q, bias, segment_ids, causal) -> None:
    op = "temporal_attention"
    B, T, _, H, _ = q.shape
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or not bias.dtype.is_floating_point:
            got = bias.dtype if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise TypeError(f"{op}: bias must be a floating-point tensor of shape (H, T, T), got {got}")
        if tuple(bias.shape) != (H, T, T):
            raise ValueError(f"{op}: bias must have shape (H, T, T) = {(H, T, T)}, got {tuple(bias.shape)}")
        if bias.device != q.device:
            raise ValueError(f"{op}: bias must be on q's device {q.device}, got {bias.device}")
    if segment_ids is not None:
        if not isinstance(segment_ids, torch.Tensor) or segment_ids.dtype.is_floating_point or segment_ids.dtype in (
            torch.bool, torch.complex64, torch.complex128
        ):  # fmt: skip
            got = segment_ids.dtype if isinstance(segment_ids, torch.Tensor) else type(segment_ids).__name__
            raise TypeError(f"{op}: segment_ids must be an integer tensor of shape (B, T), got {got}")
        if tuple(segment_ids.shape) != (B, T):
            raise ValueError(f"{op}: segment_ids must have shape (B, T) = {(B, T)}, got {tuple(segment_ids.shape)}")
        if segment_ids.device != q.device:
            raise ValueError(f"{op}: segment_ids must be on q's device {q.device}, got {segment_ids.device}")
    if not isinstance(causal, bool):
        raise TypeError(f"{op}: causal must be a bool, got {type(causal).__name__}")


def _validate_rotary(op: str, q, rotary, rotary_interleaved):
    """(cos, sin) of ``rotary`` after checking them against q (B, T, S, H, D), or None."""
    if not isinstance(rotary_interleaved, bool):
        raise TypeError(f"{op}: rotary_interleaved must be a bool, got {type(rotary_interleaved).__name__}")
    if rotary is None:
        return None
    if not isinstance(rotary, (tuple, list)) or len(rotary) != 2:
        raise TypeError(f"{op}: rotary must be a (cos, sin) pair of tensors of shape (T, rot_dim), got {rotary!r}")
    cos, sin = rotary
    T, D = q.shape[1], q.shape[4]
    for name, x in (("cos", cos), ("sin", sin)):
        if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
            got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
            raise TypeError(f"{op}: rotary {name} must be a floating-point tensor of shape (T, rot_dim), got {got}")
        if x.dim() != 2 or x.shape[0] != T:
            raise ValueError(f"{op}: rotary {name} must have shape (T, rot_dim) with T={T}, got {tuple(x.shape)}")
        if x.device != q.device:
            raise ValueError(f"{op}: rotary {name} must be on q's device {q.device}, got {x.device}")
    if sin.shape != cos.shape:
        raise ValueError(f"{op}: rotary sin must have cos's shape {tuple(cos.shape)}, got {tuple(sin.shape)}")
    rot_dim = cos.shape[1]
    if rot_dim < 2 or rot_dim % 2 or rot_dim > D:
        raise ValueError(f"{op}: rotary rot_dim (the tables' last dim) must be even and in [2, D={D}], got {rot_dim}")
    return cos, sin


def _unpack_qkv(op: str, qkv) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v (views) of a packed (B, T, S, 3, H, D) qkv, after checking it."""
    if not isinstance(qkv, torch.Tensor):
        raise TypeError(f"{op}: qkv must be a torch.Tensor, got {type(qkv).__name__}")
    if not qkv.dtype.is_floating_point:
        raise TypeError(f"{op}: qkv must be a floating-point tensor, got dtype={qkv.dtype}")
    if qkv.dim() != 6 or qkv.shape[3] != 3:
        raise ValueError(f"{op}: qkv must have shape (B, T, S, 3, H, D), got {tuple(qkv.shape)}")
    return qkv.unbind(3)


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    """x itself when its last dim is contiguous (other strides are read in place), else a dense copy. An empty
    tensor with another stride(-1) (torch gives empty results stride 0) is made dense too: ``contiguous()``
    would return it unchanged, and the kernels check stride(-1)."""
    return x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.clone(memory_format=torch.contiguous_format)


def _dense(x: torch.Tensor) -> torch.Tensor:
    """x contiguous with the strides of its shape (see _last_dim_contiguous): autograd hands the backward an
    expanded stride-0 gradient after ``out.sum().backward()``, which ``contiguous()`` keeps when it is empty."""
    return x.contiguous() if x.numel() else x.clone(memory_format=torch.contiguous_format)


# ---------------------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------------------


def temporal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
    rotary_interleaved: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention across the T frames at every (batch, spatial token, head) of (B, T, S, H, D) tensors.

    Args:
        q, k, v: (B, T, S, H, D), same dtype and device; any strides.
        bias: optional (H, T, T) float added to the scaled scores (e.g. ``RelativePositionBias``); gets a
            gradient, reduced over all B·S problems in a fixed order.
        segment_ids: optional (B, T) integers; key j is visible to query i iff their ids are equal (joint
            image-video training: video frames share an id, every appended image has its own).
        causal: keys after the query are invisible. Combines with segment_ids; the diagonal stays visible.
        scale: score scale, default D ** -0.5.
        rotary: optional (cos, sin), each (T, rot_dim) with rot_dim even and <= D: rotary position embedding
            applied to q and k inside the kernel, before the scores, on their first rot_dim head dims (the rest
            pass through): x' = x * cos[t] + rotate_half(x) * sin[t]. The full-width tables that
            rotary-embedding-torch (``freqs.cos()``, ``freqs.sin()``) and HF (``cos``, ``sin``) build; for
            flash-attn's (T, rot_dim / 2) tables pass ``cos.repeat_interleave(2, -1)`` (interleaved) or
            ``torch.cat([cos, cos], -1)`` (half-split). q and k get their gradients; the tables get none from
            the kernels (tables that require grad run on the reference backend, which differentiates them).
        rotary_interleaved: pair layout of ``rotary``: True pairs dims (2i, 2i+1) (rotary-embedding-torch, used
            by video-diffusion-pytorch); False (default, as flash-attn and HF) pairs (i, i + rot_dim / 2).
        backend: "auto", "cuda", "triton", "cpp" or "reference" (``TORCHNOVA_BACKEND`` overrides "auto").

    Returns:
        (B, T, S, H, D) in q's dtype; softmax in fp32 (fp64 for fp64 inputs).
    """
    return _temporal(
        q, k, v, None, bias, segment_ids, causal, scale, rotary, rotary_interleaved, backend, "temporal_attention"
    )  # fmt: skip


def temporal_attention_qkvpacked(
    qkv: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
    rotary_interleaved: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """``temporal_attention(*qkv.unbind(3), ...)`` for a packed qkv (B, T, S, 3, H, D), e.g. one fused projection
    viewed as ``(B, T, S, 3, H, D)``. Same result; the backward produces qkv's gradient as one tensor instead of
    autograd stacking three (flash-attn's ``flash_attn_qkvpacked_func``). Arguments as ``temporal_attention``."""
    q, k, v = _unpack_qkv("temporal_attention_qkvpacked", qkv)
    return _temporal(
        q, k, v, qkv, bias, segment_ids, causal, scale, rotary, rotary_interleaved, backend,
        "temporal_attention_qkvpacked",
    )  # fmt: skip


def _temporal(q, k, v, qkv, bias, segment_ids, causal, scale, rotary, rotary_interleaved, backend, op):
    """Both temporal entry points: validation, backend selection, the op (the packed one when qkv is given)."""
    scale = _validate_qkv(op, q, k, v, scale)
    _validate_temporal_extras(q, bias, segment_ids, causal)
    rotary = _validate_rotary(op, q, rotary, rotary_interleaved)
    cos, sin = rotary if rotary is not None else (None, None)
    name = _backend.select(
        "temporal_attention", backend, q=q, k=k, v=v, bias=bias, segment_ids=segment_ids, rotary_cos=cos,
        rotary_sin=sin,
    )  # fmt: skip
    if name == "reference":
        return temporal_attention_ref(
            q, k, v, bias=bias, segment_ids=segment_ids, causal=causal, scale=scale, rotary=rotary,
            rotary_interleaved=rotary_interleaved,
        )  # fmt: skip
    acc = accumulation_dtype(q.dtype)
    bias_acc = bias.to(acc).contiguous() if bias is not None else None
    segments = segment_ids.to(torch.int64).contiguous() if segment_ids is not None else None
    suffix = "_triton" if name == "triton" else _backend.cuda_op_suffix(q.device) if name == "cuda" else ""
    if rotary is not None:
        tables = (cos.detach().to(acc).contiguous(), sin.detach().to(acc).contiguous(), rotary_interleaved)
        if qkv is not None:
            fwd = getattr(torch.ops.torchnova, f"temporal_attention_rotary_qkvpacked_fwd{suffix}")
            out, _ = fwd(_last_dim_contiguous(qkv), bias_acc, segments, causal, scale, *tables)
        else:
            fwd = getattr(torch.ops.torchnova, f"temporal_attention_rotary_fwd{suffix}")
            out, _ = fwd(*(_last_dim_contiguous(x) for x in (q, k, v)), bias_acc, segments, causal, scale, *tables)
        return out
    if qkv is not None:
        fwd = getattr(torch.ops.torchnova, f"temporal_attention_qkvpacked_fwd{suffix}")
        out, _ = fwd(_last_dim_contiguous(qkv), bias_acc, segments, causal, scale)
    else:
        fwd = getattr(torch.ops.torchnova, f"temporal_attention_fwd{suffix}")
        out, _ = fwd(*(_last_dim_contiguous(x) for x in (q, k, v)), bias_acc, segments, causal, scale)
    return out


def spatial_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None, backend: str = "auto"
) -> torch.Tensor:
    """Attention among the S tokens of every (batch, frame, head) of (B, T, S, H, D) tensors (no mask).

    Args:
        q, k, v: (B, T, S, H, D), same dtype and device; any strides (read through them, e.g. slices of one
            fused qkv projection; only a last dim that is not contiguous is copied).
        scale: score scale, default D ** -0.5.
        backend: "auto", "cuda" (FlashAttention-2-style CUDA kernels), "triton" (FlashAttention-2 in Triton:
            CUDA tensors, fp32/fp16/bf16, D <= 256; deterministic backward), "cpp" or "reference"
            (``TORCHNOVA_BACKEND`` overrides "auto"). "auto" takes the first of these that can run.

    Returns:
        (B, T, S, H, D) in q's dtype; softmax in fp32 (fp64 for fp64 inputs).
    """
    return _spatial(q, k, v, None, scale, backend, "spatial_attention")


def spatial_attention_qkvpacked(
    qkv: torch.Tensor, *, scale: float | None = None, backend: str = "auto"
) -> torch.Tensor:
    """``spatial_attention(*qkv.unbind(3), ...)`` for a packed qkv (B, T, S, 3, H, D): same result, qkv's gradient
    produced as one tensor (see ``temporal_attention_qkvpacked``). Arguments as ``spatial_attention``."""
    q, k, v = _unpack_qkv("spatial_attention_qkvpacked", qkv)
    return _spatial(q, k, v, qkv, scale, backend, "spatial_attention_qkvpacked")


def _spatial(q, k, v, qkv, scale, backend, op):
    """Both spatial entry points: validation, backend selection, the op (the packed one when qkv is given)."""
    scale = _validate_qkv(op, q, k, v, scale)
    name = _backend.select("spatial_attention", backend, q=q, k=k, v=v)
    if name == "reference":
        return spatial_attention_ref(q, k, v, scale=scale)
    suffix = "_triton" if name == "triton" else _backend.cuda_op_suffix(q.device) if name == "cuda" else ""
    if qkv is not None:
        fwd = getattr(torch.ops.torchnova, f"spatial_attention_qkvpacked_fwd{suffix}")
        out, _ = fwd(_last_dim_contiguous(qkv), scale)
    else:
        fwd = getattr(torch.ops.torchnova, f"spatial_attention_fwd{suffix}")
        out, _ = fwd(*(_last_dim_contiguous(x) for x in (q, k, v)), scale)
    return out
