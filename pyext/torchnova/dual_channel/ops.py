"""``torchnova.cogvideo_attention`` and ``torchnova.dual_channel_mix`` on four backends.

Op chain: ``torchnova::cogvideo_attention_fwd`` / ``_bwd`` and ``dual_channel_mix_fwd`` / ``_bwd`` (schemas in
csrc/dual_channel_ops.cpp; CPU kernels csrc/cpu/dual_channel_cpu.cpp = backend "cpp", CUDA kernels
csrc/cuda/dual_channel_*.cu = backend "cuda"), and ``torchnova::cogvideo_attention_fwd_triton`` / ``_bwd_triton``
and ``dual_channel_mix_fwd_triton`` / ``_bwd_triton`` (triton_kernels.py, same arguments and outputs, registered
from Python = backend "triton"); one fake and one autograd formula per pair, shared by both op families. The
visibility rule is masks.py / csrc/dual_channel_visibility.h (and its @triton.jit port in triton_kernels.py).
The forward saves the row log-sum-exp (B, L, H) in the accumulation dtype; the backward recomputes the
probabilities from it.

``auto`` order: cuda, cpp, triton, reference. cpp runs CPU tensors only and triton CUDA tensors (or CPU tensors
under TRITON_INTERPRET=1, the slow interpreter of the tests), so on a GPU this is "cuda, then triton" and on a
CPU "cpp"; the interpreter is only used when asked for by name (or when the C++ extension is missing).
"""

from __future__ import annotations

import torch

from .. import _backend, _ext
from .._library import accumulation_dtype, define_triton_op, once_differentiable
from . import triton_kernels
from .masks import ATTENTIONS, CHANNELS, STAGES
from .reference import cogvideo_attention_ref, dual_channel_mix_ref

OP = "cogvideo_attention"
MIX_OP = "dual_channel_mix"
_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CUDA_MAX_HEAD_DIM = 256


def _cpp_reasons(x, head_dim=None, **_):
    return (
        _backend.extension_reasons()
        + _backend.device_reasons(x.device, ("cpu",))
        + _backend.dtype_reasons(x.dtype, _FLOAT_DTYPES)
    )


def _cuda_reasons(x, head_dim=None, **_):
    why = (
        _backend.cuda_device_reasons(x.device)
        + _backend.dtype_reasons(x.dtype, _CUDA_DTYPES)
    )
    if head_dim is not None and head_dim > CUDA_MAX_HEAD_DIM:
        why.append(f"head dim D={head_dim} > {CUDA_MAX_HEAD_DIM}")
    if x.device.type == "cuda":
        why += _backend.compute_capability_reasons(x.device, (8, 0))
    if not why and head_dim is not None:  # attention: fixed tiles per head-dim bucket (at most 82 KiB, backward)
        needs = {
            f"the cogvideo {part} (D={head_dim})": _backend.cuda_shared_memory_bytes(kernel, head_dim=int(head_dim))
            for part, kernel in (("forward", "cogvideo_fwd"), ("backward", "cogvideo_bwd"))
        }
        needs.update(_backend.tensor_core_backward_needs("cogvideo", x))
        why += _backend.shared_memory_reasons(x.device, needs)
    return why


def _triton_reasons(x, head_dim=None, **_):
    why = _backend.triton_reasons(x.device) + _backend.dtype_reasons(x.dtype, _CUDA_DTYPES)
    if head_dim is not None:  # attention (x = q, (B, L, H, D))
        if head_dim > triton_kernels.MAX_HEAD_DIM:
            why.append(f"head dim D={head_dim} > {triton_kernels.MAX_HEAD_DIM}")
        if x.dim() == 4 and x.shape[0] * x.shape[2] > triton_kernels.MAX_BATCH_HEADS:
            why.append(f"B*H = {x.shape[0] * x.shape[2]} > {triton_kernels.MAX_BATCH_HEADS} (grid axis 1)")
        if not why:  # launch configurations are picked by the device's shared memory per block
            shared = triton_kernels.shared_memory_reason(head_dim, x.dtype, x.device)
            why += [shared] if shared else []
    return why


def _reference_reasons(x, head_dim=None, **_):
    return []


for _op in (OP, MIX_OP):  # "auto" order (module docstring)
    _backend.register(_op, "cuda", _cuda_reasons)
    _backend.register(_op, "cpp", _cpp_reasons)
    _backend.register(_op, "triton", _triton_reasons)
    _backend.register(_op, "reference", _reference_reasons)


# ---------------------------------------------------------------------------------------------------------
# fake + autograd
# ---------------------------------------------------------------------------------------------------------


def _dense(x: torch.Tensor) -> torch.Tensor:
    """x contiguous with the strides of its shape. ``contiguous()`` returns an empty tensor as it is, and torch
    gives empty results odd strides (0, or those of an expanded scalar gradient), which the kernels reject."""
    return x.contiguous() if x.numel() else x.clone(memory_format=torch.contiguous_format)


def _unit_head_stride(x: torch.Tensor) -> torch.Tensor:
    """x itself when its head dim is contiguous (any other strides are read in place); empty or D = 1 tensors
    with another stride(-1) are made dense (a copy of nothing, or of a view whose last dim has one element)."""
    return x if x.stride(-1) == 1 else x.clone(memory_format=torch.contiguous_format)


def _attn_fwd_fake(q, k, v, text_pad_mask, text_len, frames, grid_h, grid_w, channel, attention, window, shifted,
                   stage):
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = q.new_empty(q.shape[:3], dtype=accumulation_dtype(q.dtype))
    return out, lse


def _attn_bwd_fake(grad_out, q, k, v, out, lse, text_pad_mask, *args):
    new = lambda: torch.empty_like(q, memory_format=torch.contiguous_format)  # noqa: E731
    return new(), new(), new()


def _attn_setup(ctx, inputs, output):
    q, k, v, text_pad_mask, *layout = inputs
    out, lse = output
    ctx.layout = layout
    ctx.save_for_backward(q, k, v, out, lse, text_pad_mask)


def _make_attn_backward(bwd_op):
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, text_pad_mask = ctx.saved_tensors
        dq, dk, dv = bwd_op(_dense(grad_out), q, k, v, out, lse, text_pad_mask, *ctx.layout)
        return (dq, dk, dv) + (None,) * 10

    return backward


def _mix_fwd_fake(o_base, o_plus, alpha_logit, text_len):
    return torch.empty_like(o_base, memory_format=torch.contiguous_format)


def _mix_bwd_fake(grad_y, o_base, o_plus, alpha_logit, text_len):
    new = lambda: torch.empty_like(o_base, memory_format=torch.contiguous_format)  # noqa: E731
    return new(), new(), alpha_logit.new_empty(alpha_logit.shape, dtype=accumulation_dtype(o_base.dtype))


def _mix_setup(ctx, inputs, output):
    o_base, o_plus, alpha_logit, text_len = inputs
    ctx.text_len = text_len
    ctx.save_for_backward(o_base, o_plus, alpha_logit)


def _make_mix_backward(bwd_op):
    def backward(ctx, grad_y):
        o_base, o_plus, alpha_logit = ctx.saved_tensors
        d_base, d_plus, d_alpha = bwd_op(_dense(grad_y), o_base, o_plus, alpha_logit, ctx.text_len)
        return d_base, d_plus, d_alpha.to(alpha_logit.dtype), None

    return backward


def _register(fwd_name, bwd_name, fwd_fake, bwd_fake, make_backward, setup_context) -> None:
    torch.library.register_fake(fwd_name)(fwd_fake)
    torch.library.register_fake(bwd_name)(bwd_fake)
    bwd_op = getattr(torch.ops.torchnova, bwd_name.split("::")[1]).default
    backward = once_differentiable(make_backward(bwd_op), fwd_name)
    torch.library.register_autograd(fwd_name, backward, setup_context=setup_context)


def _register_pair(suffix: str) -> None:
    """Fakes + autograd of the attention and mix ops named ``..._fwd{suffix}`` / ``..._bwd{suffix}``."""
    _register(f"torchnova::cogvideo_attention_fwd{suffix}", f"torchnova::cogvideo_attention_bwd{suffix}",
              _attn_fwd_fake, _attn_bwd_fake, _make_attn_backward, _attn_setup)  # fmt: skip
    _register(f"torchnova::dual_channel_mix_fwd{suffix}", f"torchnova::dual_channel_mix_bwd{suffix}",
              _mix_fwd_fake, _mix_bwd_fake, _make_mix_backward, _mix_setup)  # fmt: skip


if _ext.HAS_CPP:
    _register_pair("")

if _ext.HAS_CUDA_EMULATION:  # the CUDA kernels run on the CPU (torchnova.testing.cuda_emulation)
    _register_pair("_cuda_emu")

if triton_kernels.HAS_TRITON:
    define_triton_op("torchnova::cogvideo_attention_fwd_triton", triton_kernels.cogvideo_attention_fwd_triton)
    define_triton_op("torchnova::cogvideo_attention_bwd_triton", triton_kernels.cogvideo_attention_bwd_triton)
    define_triton_op("torchnova::dual_channel_mix_fwd_triton", triton_kernels.dual_channel_mix_fwd_triton)
    define_triton_op("torchnova::dual_channel_mix_bwd_triton", triton_kernels.dual_channel_mix_bwd_triton)
    _register_pair("_triton")


# ---------------------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------------------


def _grid_pair(grid):
    if isinstance(grid, bool):
        raise TypeError(f"cogvideo_attention: grid must be an int or an (h, w) pair, got {grid!r}")
    if isinstance(grid, int):
        grid = (grid, grid)
    if not (isinstance(grid, (tuple, list)) and len(grid) == 2 and all(isinstance(g, int) for g in grid)):
        raise TypeError(f"cogvideo_attention: grid must be an int or an (h, w) pair of ints, got {grid!r}")
    if min(grid) < 1:
        raise ValueError(f"cogvideo_attention: grid sides must be >= 1, got {tuple(grid)}")
    return int(grid[0]), int(grid[1])


def _validate_attention(q, k, v, text_len, frames, grid, channel, attention, window, shifted, stage, text_pad_mask):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"cogvideo_attention: {name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.dtype.is_floating_point:
            raise TypeError(f"cogvideo_attention: {name} must be floating point, got dtype={x.dtype}")
        if x.dim() != 4:
            raise ValueError(f"cogvideo_attention: {name} must be 4-D (B, L, H, D), got shape {tuple(x.shape)}")
    for name, x in (("k", k), ("v", v)):
        if x.shape != q.shape:
            raise ValueError(f"cogvideo_attention: {name} must have q's shape {tuple(q.shape)}, got {tuple(x.shape)}")
        if x.dtype != q.dtype:
            raise TypeError(f"cogvideo_attention: {name} must have q's dtype {q.dtype}, got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"cogvideo_attention: {name} must be on q's device {q.device}, got {x.device}")
    for name, value in (("text_len", text_len), ("frames", frames), ("window", window)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"cogvideo_attention: {name} must be an int, got {value!r}")
    if text_len < 0:
        raise ValueError(f"cogvideo_attention: text_len must be >= 0, got {text_len}")
    if frames < 1:
        raise ValueError(f"cogvideo_attention: frames must be >= 1, got {frames}")
    grid_h, grid_w = _grid_pair(grid)
    if channel not in CHANNELS:
        raise ValueError(f"cogvideo_attention: channel must be one of {CHANNELS}, got {channel!r}")
    if attention not in ATTENTIONS:
        raise ValueError(f"cogvideo_attention: attention must be one of {ATTENTIONS}, got {attention!r}")
    if stage not in STAGES:
        raise ValueError(f"cogvideo_attention: stage must be one of {STAGES}, got {stage!r}")
    if not isinstance(shifted, bool):
        raise TypeError(f"cogvideo_attention: shifted must be a bool, got {shifted!r}")
    if channel == "plus" and attention == "window":
        if window < 1 or grid_h % window or grid_w % window:
            raise ValueError(
                f"cogvideo_attention: window must be >= 1 and divide grid {grid_h}x{grid_w}, got window={window}"
            )
    expected = text_len + frames * grid_h * grid_w
    if q.shape[1] != expected:
        raise ValueError(
            f"cogvideo_attention: L = q.shape[1] must equal text_len + frames * grid_h * grid_w = {text_len} + "
            f"{frames} * {grid_h} * {grid_w} = {expected}, got {q.shape[1]}"
        )
    for name, x in (("q", q), ("k", k), ("v", v)):
        # stride(-1) matters only where there are elements to read along it (D > 1, not empty)
        if x.stride(-1) != 1 and x.shape[-1] > 1 and x.numel() > 0:
            raise ValueError(f"cogvideo_attention: {name} needs stride(-1) == 1 (contiguous head dim), "
                             f"got strides {tuple(x.stride())}")
    if text_pad_mask is not None:
        if not isinstance(text_pad_mask, torch.Tensor) or text_pad_mask.dtype != torch.bool:
            got = text_pad_mask.dtype if isinstance(text_pad_mask, torch.Tensor) else type(text_pad_mask).__name__
            raise TypeError(f"cogvideo_attention: text_pad_mask must be a bool tensor, got {got}")
        if tuple(text_pad_mask.shape) != (q.shape[0], text_len):
            raise ValueError(
                f"cogvideo_attention: text_pad_mask must have shape (B, text_len) = {(q.shape[0], text_len)}, "
                f"got {tuple(text_pad_mask.shape)}"
            )
        if text_pad_mask.device != q.device:
            raise ValueError(f"cogvideo_attention: text_pad_mask must be on q's device {q.device}, "
                             f"got {text_pad_mask.device}")
    return grid_h, grid_w


def cogvideo_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    text_len: int,
    frames: int,
    grid,
    channel: str,
    attention: str = "full",
    window: int = 10,
    shifted: bool = False,
    stage: str = "sequential",
    text_pad_mask: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """CogVideo dual-channel attention (one channel), layout (B, L, H, D), L = text_len + frames * h * w.

    Args:
        q, k, v: (B, L, H, D) floating tensors (stride(-1) == 1); scale D^-1/2.
        text_len, frames, grid: the layout; ``grid`` is an int (square) or an (h, w) pair.
        channel: ``"base"`` (text + own frame) or ``"plus"`` (cross-frame; text rows give 0).
        attention: plus channel ``"full"`` (causal over all frames) or ``"window"`` (window x window spatial
            windows through every frame; ``shifted`` shifts them by window // 2 with the Swin region rule).
        stage: ``"sequential"`` (causal) or ``"interpolation"`` (any frame count: the even frames 0, 2, 4, ...
            are the given key frames, the odd ones are interpolated between them).
        text_pad_mask: optional (B, text_len) bool, True = real token; padded text keys are invisible.
        backend: ``"auto"`` (``TORCHNOVA_BACKEND`` overrides it), ``"reference"``, ``"cpp"``, ``"triton"``
            (CUDA tensors, fp32/fp16/bf16, D <= 256; CPU under TRITON_INTERPRET=1) or ``"cuda"``.

    Returns:
        (B, L, H, D) tensor of q's dtype. Rows with no visible key give 0.
    """
    grid_h, grid_w = _validate_attention(q, k, v, text_len, frames, grid, channel, attention, window, shifted,
                                         stage, text_pad_mask)
    chosen = _backend.select(OP, backend, x=q, head_dim=q.shape[-1], text_len=text_len, frames=frames,
                             grid=(grid_h, grid_w), channel=channel, attention=attention, window=window)
    args = (text_len, frames, grid_h, grid_w, channel, attention, window, shifted, stage)
    if chosen == "reference":
        return cogvideo_attention_ref(q, k, v, text_pad_mask, *args)[0]
    mask = text_pad_mask.contiguous() if text_pad_mask is not None else None
    ops = torch.ops.torchnova
    fwd = ops.cogvideo_attention_fwd_triton if chosen == "triton" else ops.cogvideo_attention_fwd
    if chosen == "cuda":
        fwd = getattr(ops, "cogvideo_attention_fwd" + _backend.cuda_op_suffix(q.device))
    out, _ = fwd.default(*(_unit_head_stride(x) for x in (q, k, v)), mask, *args)
    return out


def dual_channel_mix(
    o_base: torch.Tensor, o_plus: torch.Tensor, alpha_logit: torch.Tensor, *, text_len: int, backend: str = "auto"
) -> torch.Tensor:
    """y_text = o_base_text; y_frame = a o_base + (1 - a) o_plus, a = sigmoid(alpha_logit) (hidden,).

    o_base, o_plus: (B, L, hidden), same dtype; alpha_logit: (hidden,). backend: "auto", "reference", "cpp",
    "triton" or "cuda". d alpha_logit is reduced over batch and frame tokens in a fixed order (deterministic).
    """
    for name, x in (("o_base", o_base), ("o_plus", o_plus), ("alpha_logit", alpha_logit)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"dual_channel_mix: {name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.dtype.is_floating_point:
            raise TypeError(f"dual_channel_mix: {name} must be floating point, got dtype={x.dtype}")
        if x.device != o_base.device:
            raise ValueError(f"dual_channel_mix: {name} must be on o_base's device {o_base.device}, got {x.device}")
    if o_base.dim() != 3:
        raise ValueError(f"dual_channel_mix: o_base must be 3-D (B, L, hidden), got shape {tuple(o_base.shape)}")
    if o_plus.shape != o_base.shape:
        raise ValueError(f"dual_channel_mix: o_plus must have o_base's shape {tuple(o_base.shape)}, "
                         f"got {tuple(o_plus.shape)}")
    if o_plus.dtype != o_base.dtype:
        raise TypeError(f"dual_channel_mix: o_plus must have o_base's dtype {o_base.dtype}, got {o_plus.dtype}")
    if tuple(alpha_logit.shape) != (o_base.shape[2],):
        raise ValueError(f"dual_channel_mix: alpha_logit must have shape (hidden,) = ({o_base.shape[2]},), "
                         f"got {tuple(alpha_logit.shape)}")
    if isinstance(text_len, bool) or not isinstance(text_len, int) or not 0 <= text_len <= o_base.shape[1]:
        raise ValueError(f"dual_channel_mix: text_len must be an int in [0, L={o_base.shape[1]}], got {text_len!r}")
    chosen = _backend.select(MIX_OP, backend, x=o_base)
    if chosen == "reference":
        return dual_channel_mix_ref(o_base, o_plus, alpha_logit, text_len)
    ops = torch.ops.torchnova
    fwd = ops.dual_channel_mix_fwd_triton if chosen == "triton" else ops.dual_channel_mix_fwd
    if chosen == "cuda":
        fwd = getattr(ops, "dual_channel_mix_fwd" + _backend.cuda_op_suffix(o_base.device))
    return fwd.default(o_base, o_plus, alpha_logit, text_len)
