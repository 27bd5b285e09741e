"""The tensor-core backward (csrc/cuda/attention_tc_bwd.cu: mma.sync m16n8k16 dK/dV and dQ kernels) of
spatial_attention and cogvideo_attention, executed on the CPU through the CUDA emulation layer
(docs/cuda_emulation.md): dq, dk, dv vs the float64 reference for float16 and bfloat16, D in {1, 33, 64, 128}, S in
{1, 17, 97, 130}, strided and unaligned inputs (the element-wise loader) and aligned ones (cp.async), CogVideo
visibility options including rows that see no key; bit-identical reruns; agreement with the SIMT kernels; and
that TORCHNOVA_CUDA_ATTENTION_KERNEL routes the backward (the tensor-core path is forced in every gradient test,
so a test that silently ran SIMT instead would have raised).

The forward is whatever backend="cuda" runs (the SIMT forward today): the backward consumes the same saved out and
lse either way. Shapes are small: every mma is a warp rendezvous of 32 fibers in the emulation.

Needs the layer (TORCHNOVA_CUDA_EMULATION=1, which scripts/setup.sh and CI set); skipped, with that reason,
without it.
"""

from __future__ import annotations

import pytest
import torch

import torchnova
from torchnova import _ext, testing
from utils import assert_close

pytestmark = pytest.mark.skipif(
    not _ext.HAS_CUDA_EMULATION, reason=f"CUDA emulation layer not built: {_ext.CUDA_EMULATION_IMPORT_ERROR}"
)

LOW = [torch.float16, torch.bfloat16]
ENV = "TORCHNOVA_CUDA_ATTENTION_KERNEL"


def _grads(fn, tensors, upstream, **kwargs):
    """fn(*tensors, backend="cuda", **kwargs) under emulation; the gradients of the tensors for `upstream`."""
    leaves = [x.detach().requires_grad_() for x in tensors]
    with testing.cuda_emulation():
        # Contiguous inputs copied inside the context end at a guard page: a read past their end faults.
        guarded = [x.clone() if x.is_contiguous() else x for x in leaves]
        out = fn(*guarded, backend="cuda", **kwargs)
        out.backward(upstream.to(out.dtype))
    return [x.grad for x in leaves]


def _check(fn, tensors, dtype, what, monkeypatch, **kwargs):
    """Gradients through the forced tensor-core backward vs the float64 reference for the same upstream."""
    monkeypatch.setenv(ENV, "tensor_core")
    shape = fn(*[x.detach() for x in tensors], backend="reference", **kwargs).shape
    upstream = torch.randn(shape, dtype=torch.float64)
    got = _grads(fn, tensors, upstream, **kwargs)
    ref_inputs = [x.detach().double().requires_grad_() for x in tensors]
    fn(*ref_inputs, backend="reference", **kwargs).backward(upstream)
    for name, g, r in zip("qkv", got, ref_inputs):
        assert_close(g, r.grad, dtype, "grad", f"{what} d{name}")
    return got


def _qkv(shape, dtype):
    return [torch.randn(shape).to(dtype) for _ in range(3)]


# ---------------------------------------------------------------------------------------------------------------
# spatial_attention

SPATIAL = [  # (B, T, S, H, D): S in {1, 17, 97, 130} (one and several 64-row blocks, ragged tails); D in
    (1, 1, 1, 1, 1),  # {1, 33, 64, 128} (padded widths 32, 64, 128; odd D takes the element-wise loader)
    (1, 2, 17, 2, 33),
    (1, 1, 97, 1, 64),
    (1, 1, 130, 1, 128),
]


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("shape", SPATIAL, ids=lambda s: "x".join(map(str, s)))
def test_spatial_gradients(dtype, shape, monkeypatch):
    _check(torchnova.spatial_attention, _qkv(shape, dtype), dtype, f"spatial {shape}", monkeypatch)


@pytest.mark.parametrize("dtype", LOW)
def test_spatial_strided_inputs(dtype, monkeypatch):
    """q, k, v slices of one fused projection: token strides of 3 H D; D = 64 with aligned rows (cp.async), then
    rows shifted by one element (not 16-byte aligned: the element-wise loader) and D = 40 (not whole packets)."""
    B, T, S, H = 1, 2, 70, 2
    for D, offset in ((64, 0), (64, 1), (40, 0)):
        qkv = torch.randn(B, T, S, 3, H, D + offset).to(dtype)[..., offset:]
        q, k, v = qkv.unbind(3)
        assert not q.is_contiguous()
        _check(torchnova.spatial_attention, [q, k, v], dtype, f"spatial strided D={D} offset={offset}", monkeypatch)


def test_spatial_custom_scale(monkeypatch):
    _check(torchnova.spatial_attention, _qkv((1, 1, 20, 1, 16), torch.float16), torch.float16, "spatial scale=0.7",
           monkeypatch, scale=0.7)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# cogvideo_attention: the same kernels with the visibility rule as their policy


def _cogvideo_inputs(B, H, D, text_len, frames, grid, dtype):
    L = text_len + frames * grid[0] * grid[1]
    q, k, v = _qkv((B, L, H, D), dtype)
    return [q, k, v], L


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize(
    "channel, attention, shifted, stage, D",
    [
        ("base", "full", False, "sequential", 33),
        ("plus", "full", False, "sequential", 64),  # text rows see no key: lse = +inf, P = 0
        ("plus", "window", True, "sequential", 33),
        ("plus", "full", False, "interpolation", 16),
    ],
)
def test_cogvideo_gradients(dtype, channel, attention, shifted, stage, D, monkeypatch):
    # L = 4 + 5 * 16 = 84: two 64-row blocks, and with window 2 many tile pairs that see nothing (skipped).
    tensors, _ = _cogvideo_inputs(2, 1, D, 4, 5, (4, 4), dtype)
    pad = torch.ones(2, 4, dtype=torch.bool)
    pad[1, 2:] = False  # padded text keys of batch 1
    _check(torchnova.cogvideo_attention, tensors, dtype, f"cogvideo {channel}/{attention}/{stage}", monkeypatch,
           text_len=4, frames=5, grid=(4, 4), channel=channel, attention=attention, window=2, shifted=shifted,
           stage=stage, text_pad_mask=pad)  # fmt: skip


def test_cogvideo_rows_with_no_visible_key_get_zero_gradient(monkeypatch):
    """Plus channel: text queries see nothing; their dq is exactly 0, and no gradient is NaN."""
    tensors, L = _cogvideo_inputs(1, 2, 64, 7, 3, (2, 4), torch.bfloat16)
    dq, dk, dv = _check(torchnova.cogvideo_attention, tensors, torch.bfloat16, "cogvideo plus text rows",
                        monkeypatch, text_len=7, frames=3, grid=(2, 4), channel="plus")  # fmt: skip
    assert torch.equal(dq[:, :7], torch.zeros_like(dq[:, :7]))
    assert all(torch.isfinite(g).all() for g in (dq, dk, dv))


def test_cogvideo_strided_inputs(monkeypatch):
    B, H, D, text_len, frames, grid = 1, 2, 32, 3, 4, (2, 4)
    L = text_len + frames * 8
    qkv = torch.randn(B, L, 3, H, D).to(torch.float16)
    q, k, v = qkv.unbind(2)
    _check(torchnova.cogvideo_attention, [q, k, v], torch.float16, "cogvideo strided", monkeypatch,
           text_len=text_len, frames=frames, grid=grid, channel="base")  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Determinism, agreement with SIMT, routing


def _spatial_grads(dtype, seed=0):
    torch.manual_seed(seed)
    tensors = _qkv((1, 1, 75, 2, 48), dtype)
    upstream = torch.randn(1, 1, 75, 2, 48, dtype=torch.float64)
    return _grads(torchnova.spatial_attention, tensors, upstream)


def test_reruns_are_bit_identical(monkeypatch):
    monkeypatch.setenv(ENV, "tensor_core")
    first, second = _spatial_grads(torch.bfloat16), _spatial_grads(torch.bfloat16)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", LOW)
def test_tensor_core_and_simt_agree_but_differ(dtype, monkeypatch):
    """Both kernel families within the gradient tolerance of each other, and not bit-identical: the tensor-core
    path rounds P and dS to 16 bits before its products, the SIMT path does not, so equal bits would mean the
    override did not switch kernels."""
    monkeypatch.setenv(ENV, "tensor_core")
    tc = _spatial_grads(dtype)
    monkeypatch.setenv(ENV, "simt")
    simt = _spatial_grads(dtype)
    for name, a, b in zip("qkv", tc, simt):
        assert_close(a, b, dtype, "grad", f"tensor-core vs SIMT d{name}")
    assert any(not torch.equal(a, b) for a, b in zip(tc, simt))


def test_auto_picks_tensor_cores_for_16_bit_and_simt_otherwise(monkeypatch):
    monkeypatch.setenv(ENV, "tensor_core")
    forced = _spatial_grads(torch.float16)
    monkeypatch.delenv(ENV)
    assert all(torch.equal(a, b) for a, b in zip(forced, _spatial_grads(torch.float16)))
    monkeypatch.setenv(ENV, "auto")
    assert all(torch.equal(a, b) for a, b in zip(forced, _spatial_grads(torch.float16)))


@pytest.mark.parametrize(
    "dtype, D, reason",
    [(torch.float32, 16, "float16 or bfloat16"), (torch.float16, 129, "head dims up to 128")],
)
def test_forcing_tensor_cores_where_they_cannot_run_says_why(dtype, D, reason, monkeypatch):
    monkeypatch.setenv(ENV, "tensor_core")
    tensors = [x.requires_grad_() for x in _qkv((1, 1, 3, 1, D), dtype)]
    with testing.cuda_emulation():
        out = torchnova.spatial_attention(*tensors, backend="cuda")
        with pytest.raises(ValueError, match=f"TORCHNOVA_CUDA_ATTENTION_KERNEL=tensor_core.*{reason}"):
            out.sum().backward()


def test_bad_override_value_is_an_error(monkeypatch):
    monkeypatch.setenv(ENV, "tensorcore")
    tensors = [x.requires_grad_() for x in _qkv((1, 1, 3, 1, 8), torch.float16)]
    with testing.cuda_emulation():
        out = torchnova.spatial_attention(*tensors, backend="cuda")
        with pytest.raises(ValueError, match='must be auto, tensor_core or simt, got "tensorcore"'):
            out.sum().backward()


def test_the_tensor_core_kernels_check_the_shared_memory_limit(monkeypatch):
    """D = 128 needs 52,480 bytes for the dK/dV kernel: on a device with only the 48 KiB default the launcher
    refuses, naming the tensor-core kernel (so the call did reach it)."""
    monkeypatch.setenv(ENV, "tensor_core")
    emu = _ext._C_cuda_emu
    limits = emu.device_limits()
    tensors = [x.requires_grad_() for x in _qkv((1, 1, 5, 1, 128), torch.float16)]
    try:
        with testing.cuda_emulation():
            out = torchnova.spatial_attention(*tensors, backend="cuda")
            emu.set_device_limits(limits["multiprocessors"], 48 * 1024)
            with pytest.raises(RuntimeError, match="the tensor-core dk/dv kernel needs 52480 bytes"):
                out.sum().backward()
    finally:
        emu.set_device_limits(limits["multiprocessors"], limits["smem_optin_bytes"])
