"""Every compiled ISA copy of the C++ CPU kernels (baseline SSE2, AVX2+FMA, AVX-512: csrc/cpu/cpu_dispatch.h) that
this CPU can run, against the float64 reference, at shapes whose rows, columns and head dims leave tails in each
copy's register tiles (T = 7, 24; S = 37; D = 40, 72, 88; the 64-byte copy takes 32-byte and scalar tails)."""

import pytest
import torch

import torchnova
from torchnova import _ext
from torchnova.mesa.reference import mesa_kl_rows_ref
from torchnova.spacetime.reference import spatial_attention_ref, temporal_attention_ref
from utils import assert_close, cpu_isas

pytestmark = pytest.mark.skipif(not _ext.HAS_CPP, reason="C++ extension not built")


@pytest.fixture(params=cpu_isas() or ["none"])
def isa(request):
    previous = _ext._C.cpu_isa()
    _ext._C.set_cpu_isa(request.param)
    assert _ext._C.cpu_isa() == request.param
    yield request.param
    _ext._C.set_cpu_isa(previous)


def check(out, expected, inputs, inputs64, names):
    assert_close(out, expected, torch.float32, "fwd", "out")
    grad = torch.randn(out.shape, dtype=torch.float64)
    got = torch.autograd.grad(out, inputs, grad.float())
    for name, g, want in zip(names, got, torch.autograd.grad(expected, inputs64, grad)):
        assert_close(g, want, torch.float32, "grad", name)


def leaves(*tensors):
    """fp32 leaves for the kernel and float64 leaves for the reference, from the same values."""
    return [t.clone().requires_grad_(True) for t in tensors], [t.double().requires_grad_(True) for t in tensors]


@pytest.mark.parametrize("shape", [(2, 7, 5, 3, 40), (1, 24, 3, 2, 88)], ids=["T7-D40", "T24-D88"])
def test_temporal_every_isa(isa, shape):
    B, T, S, H, D = shape
    (qkv, bias), (qkv64, bias64) = leaves(torch.randn(B, T, S, 3, H, D), torch.randn(H, T, T))
    out = torchnova.temporal_attention_qkvpacked(qkv, bias=bias, causal=True, backend="cpp")
    expected = temporal_attention_ref(*qkv64.unbind(3), bias=bias64, causal=True)
    check(out, expected, [qkv, bias], [qkv64, bias64], ["dqkv", "dbias"])


@pytest.mark.parametrize("shape", [(1, 2, 37, 2, 72), (1, 1, 300, 1, 40)], ids=["S37-D72", "S300-D40"])
def test_spatial_every_isa(isa, shape):
    B, T, S, H, D = shape
    (qkv,), (qkv64,) = leaves(torch.randn(B, T, S, 3, H, D))
    out = torchnova.spatial_attention_qkvpacked(qkv, backend="cpp")
    check(out, spatial_attention_ref(*qkv64.unbind(3)), [qkv], [qkv64], ["dqkv"])


@pytest.mark.parametrize("mode", [("base", "full", False), ("plus", "window", True)], ids=["base", "window-shifted"])
def test_dual_channel_every_isa(isa, mode):
    channel, attention, shifted = mode
    kw = dict(text_len=3, frames=5, grid=(8, 8), channel=channel, attention=attention, window=4, shifted=shifted)
    L = 3 + 5 * 64
    (q, k, v), (q64, k64, v64) = leaves(*(torch.randn(1, L, 2, 40) for _ in range(3)))
    out = torchnova.cogvideo_attention(q, k, v, backend="cpp", **kw)
    expected = torchnova.cogvideo_attention(q64, k64, v64, backend="reference", **kw)
    check(out, expected, [q, k, v], [q64, k64, v64], ["dq", "dk", "dv"])


def test_mesa_kl_every_isa(isa):
    (z, t), (z64, t64) = leaves(torch.randn(5, 1003) * 3, torch.randn(5, 1003) * 3)
    loss = torchnova.mesa_kl(z, t, temperature=2.0, reduction="sum", backend="cpp")
    expected = mesa_kl_rows_ref(z64, t64, 2.0).sum()
    assert_close(loss, expected, torch.float32, "fwd", "loss")
    assert_close(torch.autograd.grad(loss, z)[0], torch.autograd.grad(expected, z64)[0], torch.float32, "grad", "dz")


def test_isa_names():
    assert _ext.BUILD_INFO["cpu_isa"] == cpu_isas()[-1]
    assert cpu_isas()[0] == "baseline"
    with pytest.raises(ValueError, match="set_cpu_isa: name must be one of baseline, avx2, avx512, got 'sse9'"):
        _ext._C.set_cpu_isa("sse9")
