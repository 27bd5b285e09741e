"""The tensor-core backward (csrc/cuda/attention_tc_bwd.cu: mma.sync m16n8k16 dK/dV and dQ kernels) of
spatial_attention and cogvideo_attention, executed on the CPU through the CUDA emulation layer
(docs/cuda_emulation.md): dq, dk, dv vs the float64 reference for float16 and bfloat16, D in {1, 33, 64, 128}, S in
{1, 17, 97, 130}, strided and unaligned inputs (the plain loader) and aligned ones (cp.async), CogVideo
visibility options including rows that see no key; the same backward after the SIMT and after the tensor-core
forward (it consumes their saved out and lse); bit-identical reruns; agreement with the SIMT kernels; and the
kernel choice (TORCHNOVA_CUDA_ATTENTION_KERNEL; the emulation module's launch counter shows which kernels ran:
every gradient test checks that the tensor-core pair did).

Shapes are small: every thread of an emulated block is a fiber and every mma / ldmatrix a warp rendezvous.

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


def _launches() -> int:
    return _ext._C_cuda_emu.tensor_core_backward_launches()


def _grads(fn, tensors, upstream, emulation=None, **kwargs):
    """fn(*tensors, backend="cuda", **kwargs) under emulation (options `emulation` of cuda_emulation()); the
    gradients of the tensors for `upstream`."""
    leaves = [x.detach().requires_grad_() for x in tensors]
    with testing.cuda_emulation(**(emulation or {})):
        # Contiguous inputs copied inside the context end at a guard page: a read past their end faults.
        guarded = [x.clone() if x.is_contiguous() else x for x in leaves]
        out = fn(*guarded, backend="cuda", **kwargs)
        out.backward(upstream.to(out.dtype))
    return [x.grad for x in leaves]


def _reference_grads(fn, tensors, upstream, **kwargs):
    """float64 gradients of fn(*tensors, backend="reference") for `upstream`."""
    ref_inputs = [x.detach().double().requires_grad_() for x in tensors]
    fn(*ref_inputs, backend="reference", **kwargs).backward(upstream)
    return [x.grad for x in ref_inputs]


def _check(fn, tensors, dtype, what, monkeypatch, **kwargs):
    """Gradients through the forced tensor-core backward vs the float64 reference for the same upstream."""
    monkeypatch.setenv(ENV, "tensor_core")
    shape = fn(*[x.detach() for x in tensors], backend="reference", **kwargs).shape
    upstream = torch.randn(shape, dtype=torch.float64)
    before = _launches()
    got = _grads(fn, tensors, upstream, **kwargs)
    assert _launches() == before + 1, f"{what}: the tensor-core backward did not run"
    for name, g, r in zip("qkv", got, _reference_grads(fn, tensors, upstream, **kwargs)):
        assert_close(g, r, dtype, "grad", f"{what} d{name}")
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


@pytest.mark.parametrize("forward", ["simt", "tensor_core"])
def test_backward_after_either_forward(forward, monkeypatch):
    """The backward op on the out and lse that the SIMT or the tensor-core forward saved."""
    q, k, v = _qkv((1, 1, 70, 2, 40), torch.bfloat16)
    scale = 40**-0.5
    monkeypatch.setenv(ENV, forward)
    with testing.cuda_emulation():
        out, lse = torch.ops.torchnova.spatial_attention_fwd_cuda_emu(q, k, v, scale)
    grad_out = torch.randn(out.shape).to(torch.bfloat16)
    monkeypatch.setenv(ENV, "tensor_core")
    before = _launches()
    with testing.cuda_emulation():
        grads = torch.ops.torchnova.spatial_attention_bwd_cuda_emu(grad_out, q, k, v, out, lse, scale)
    assert _launches() == before + 1
    ref = [x.double().requires_grad_() for x in (q, k, v)]
    torchnova.spatial_attention(*ref, backend="reference").backward(grad_out.double())
    for name, g, r in zip("qkv", grads, ref):
        assert_close(g, r.grad, torch.bfloat16, "grad", f"d{name} after the {forward} forward")


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
    tensors, _ = _cogvideo_inputs(1, 2, 64, 7, 3, (2, 4), torch.bfloat16)
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


def _spatial_grads(dtype, seed=0, **emulation):
    torch.manual_seed(seed)
    tensors = _qkv((1, 1, 75, 2, 48), dtype)
    upstream = torch.randn(1, 1, 75, 2, 48, dtype=torch.float64)
    return _grads(torchnova.spatial_attention, tensors, upstream, emulation)


def test_reruns_are_bit_identical(monkeypatch):
    monkeypatch.setenv(ENV, "tensor_core")
    first, second = _spatial_grads(torch.bfloat16), _spatial_grads(torch.bfloat16)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_race_check_schedules_agree(monkeypatch):
    """A shared-memory race (a word written by one thread and read by another with no barrier between, e.g. a
    stage refilled while another warp still reads it) would make the result depend on the order the emulated
    threads run in: thread 0 first, or last. S = 200 streams 4 tiles through the 2 stages (each refilled), D = 20
    takes the plain loads (stored at once; cp.async copies land only at the wait in the emulation) and
    D = 64 the cp.async path."""
    monkeypatch.setenv(ENV, "tensor_core")
    for D in (20, 64):
        tensors = _qkv((1, 1, 200, 1, D), torch.float16)
        upstream = torch.randn(1, 1, 200, 1, D, dtype=torch.float64)
        forward, reverse = (_grads(torchnova.spatial_attention, tensors, upstream, {"schedule": schedule})
                            for schedule in ("forward", "reverse"))  # fmt: skip
        for a, b in zip(forward, reverse):
            assert torch.equal(a, b), f"D={D}: the schedules disagree"
    tensors, _ = _cogvideo_inputs(1, 1, 32, 4, 5, (4, 4), torch.bfloat16)
    options = dict(text_len=4, frames=5, grid=(4, 4), channel="plus", attention="window", window=2, shifted=True)
    upstream = torch.randn(tensors[0].shape, dtype=torch.float64)
    forward, reverse = (_grads(torchnova.cogvideo_attention, tensors, upstream, {"schedule": schedule}, **options)
                        for schedule in ("forward", "reverse"))  # fmt: skip
    for a, b in zip(forward, reverse):
        assert torch.equal(a, b)


def test_exact_tensor_ends(monkeypatch):
    """Tensors ending exactly at the guard page: a read just past the end faults, and the unaligned data start
    sends every tile down the plain-load path."""
    monkeypatch.setenv(ENV, "tensor_core")
    tensors = _qkv((1, 1, 37, 1, 24), torch.float16)
    upstream = torch.randn(1, 1, 37, 1, 24, dtype=torch.float64)
    got = _grads(torchnova.spatial_attention, tensors, upstream, {"exact_ends": True})
    for name, g, r in zip("qkv", got, _reference_grads(torchnova.spatial_attention, tensors, upstream)):
        assert_close(g, r, torch.float16, "grad", f"exact ends d{name}")


@pytest.mark.parametrize("dtype", LOW)
def test_tensor_core_and_simt_agree(dtype, monkeypatch):
    """Both kernel families within the gradient tolerance of each other; "simt" runs no tensor-core backward."""
    monkeypatch.setenv(ENV, "tensor_core")
    tc = _spatial_grads(dtype)
    monkeypatch.setenv(ENV, "simt")
    before = _launches()
    simt = _spatial_grads(dtype)
    assert _launches() == before
    for name, a, b in zip("qkv", tc, simt):
        assert_close(a, b, dtype, "grad", f"tensor-core vs SIMT d{name}")


def test_auto_picks_tensor_cores_for_16_bit_and_simt_otherwise(monkeypatch):
    for setting in (None, "auto", ""):
        if setting is None:
            monkeypatch.delenv(ENV, raising=False)
        else:
            monkeypatch.setenv(ENV, setting)
        for dtype, D, tensor_cores in ((torch.float16, 64, True), (torch.bfloat16, 128, True),
                                       (torch.float32, 64, False), (torch.float16, 129, False)):
            tensors = [x.requires_grad_() for x in _qkv((1, 1, 3, 1, D), dtype)]
            before = _launches()
            with testing.cuda_emulation():
                torchnova.spatial_attention(*tensors, backend="cuda").sum().backward()
            assert _launches() == before + tensor_cores, (setting, dtype, D)


@pytest.mark.parametrize(
    "dtype, D, reason",
    [(torch.float32, 16, "dtype is Float .*float16 or bfloat16"), (torch.float16, 129, "D = 129 exceeds 128")],
)
def test_forcing_tensor_cores_where_they_cannot_run_says_why(dtype, D, reason, monkeypatch):
    tensors = [x.requires_grad_() for x in _qkv((1, 1, 3, 1, D), dtype)]
    with testing.cuda_emulation():
        out = torchnova.spatial_attention(*tensors, backend="cuda")  # the forward under auto
        monkeypatch.setenv(ENV, "tensor_core")  # read again by the backward
        with pytest.raises(ValueError, match=f"TORCHNOVA_CUDA_ATTENTION_KERNEL=tensor_core.*backward.*{reason}"):
            out.sum().backward()


def test_bad_override_value_is_an_error(monkeypatch):
    tensors = [x.requires_grad_() for x in _qkv((1, 1, 3, 1, 8), torch.float16)]
    with testing.cuda_emulation():
        out = torchnova.spatial_attention(*tensors, backend="cuda")
        monkeypatch.setenv(ENV, "tensorcore")
        with pytest.raises(ValueError, match='must be auto, tensor_core or simt, got "tensorcore"'):
            out.sum().backward()


def test_shared_memory_plan_of_the_tensor_core_backward():
    """Swizzled 2-byte tiles of P columns (P = D padded to 32 / 64 / 128): 64 own rows of two tensors and R
    streamed rows of two tensors in two stages (R = 64, or 32 at P = 128), plus lse and delta of the streamed rows
    (two stages) in the dK/dV kernel."""
    plan = _ext._C.cuda_shared_memory_bytes
    for D, padded, streamed in ((1, 32, 64), (32, 32, 64), (33, 64, 64), (64, 64, 64), (65, 128, 32), (128, 128, 32)):
        tiles = 2 * (2 * 64 + 2 * 2 * streamed) * padded
        assert plan("tc_bwd_dq", 1, D) == tiles
        assert plan("tc_bwd_dkdv", 1, D) == tiles + 4 * 2 * 2 * streamed
    assert plan("tc_bwd_dkdv", 1, 129) == -1 and plan("tc_bwd_dq", 1, 129) == -1


def test_a_device_without_the_shared_memory_falls_back_to_simt(monkeypatch):
    """At 48 KiB per block (no opt-in) the dK/dV kernel at D = 64 (50,176 bytes) does not fit: auto runs the SIMT
    backward (still correct), tensor_core raises saying why."""
    emu = _ext._C_cuda_emu
    limits = emu.device_limits()
    tensors = _qkv((1, 1, 9, 1, 64), torch.float16)
    upstream = torch.randn(1, 1, 9, 1, 64, dtype=torch.float64)
    try:
        emu.set_device_limits(limits["multiprocessors"], 48 * 1024)
        before = _launches()
        got = _grads(torchnova.spatial_attention, tensors, upstream)
        assert _launches() == before
        for name, g, r in zip("qkv", got, _reference_grads(torchnova.spatial_attention, tensors, upstream)):
            assert_close(g, r, torch.float16, "grad", f"SIMT fallback d{name}")
        monkeypatch.setenv(ENV, "tensor_core")
        leaves = [x.detach().requires_grad_() for x in tensors]
        with testing.cuda_emulation():
            out = torchnova.spatial_attention(*leaves, backend="cuda")
            with pytest.raises(ValueError, match="needs 50176 bytes of shared memory per block, the device allows "
                                                 "49152"):
                out.sum().backward()
    finally:
        emu.set_device_limits(limits["multiprocessors"], limits["smem_optin_bytes"])
