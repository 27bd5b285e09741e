"""torch.library.opcheck of every torchnova op on CUDA tensors (schema, fake/meta kernels, autograd registration,
dynamic-shape AOT dispatch), for both op families: the C++ ops (CUDA kernels) and the ``*_triton`` ops. The CPU
forms are checked in test_opcheck.py, test_spacetime*.py and test_dual_channel.py; these run on a GPU.
"""

from __future__ import annotations

import pytest
import torch

from torchnova import _ext

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="opcheck on CUDA tensors needs a GPU")
OPS = torch.ops.torchnova


def families():
    return [
        pytest.param("", marks=pytest.mark.skipif(not _ext.HAS_CUDA_KERNELS, reason="built without CUDA kernels"),
                     id="cuda"),
        pytest.param("_triton", marks=pytest.mark.skipif(not _ext.HAS_TRITON, reason="triton not importable"),
                     id="triton"),
    ]  # fmt: skip


def _op(name, suffix):
    return getattr(OPS, f"{name}{suffix}").default


@pytest.mark.parametrize("suffix", families())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck_mesa_kl_cuda(suffix, dtype):
    z, t = (torch.randn(5, 33, device="cuda", dtype=dtype) for _ in range(2))
    fwd, bwd = _op("mesa_kl_fwd", suffix), _op("mesa_kl_bwd", suffix)
    for with_grad in (False, True):
        torch.library.opcheck(fwd, (z.clone().requires_grad_(True), t, 2.0, with_grad))
    _, lse, _ = fwd(z, t, 2.0, False)
    torch.library.opcheck(bwd, (torch.rand(5, device="cuda", dtype=lse.dtype), z, t, lse, 2.0))


@pytest.mark.parametrize("suffix", families())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_opcheck_spacetime_cuda(suffix, dtype):
    qkv = torch.randn(2, 4, 3, 3, 2, 16, device="cuda", dtype=dtype)
    q, k, v = qkv.unbind(3)
    bias = torch.randn(2, 4, 4, device="cuda")
    segments = torch.tensor([[0, 0, 1, 2], [0, 1, 1, 1]], device="cuda")
    for b, s, causal in [(bias, segments, True), (None, None, False)]:
        b_grad = b.clone().requires_grad_(True) if b is not None else None
        fwd, bwd = _op("temporal_attention_fwd", suffix), _op("temporal_attention_bwd", suffix)
        torch.library.opcheck(fwd, (q.clone().requires_grad_(True), k, v, b_grad, s, causal, 0.5))
        out, lse = fwd(q, k, v, b, s, causal, 0.5)
        torch.library.opcheck(bwd, (torch.randn_like(out), q, k, v, out, lse, b, s, causal, 0.5, b is not None, True))
        fwd, bwd = _op("temporal_attention_qkvpacked_fwd", suffix), _op("temporal_attention_qkvpacked_bwd", suffix)
        torch.library.opcheck(fwd, (qkv.clone().requires_grad_(True), b_grad, s, causal, 0.5))
        out, lse = fwd(qkv, b, s, causal, 0.5)
        torch.library.opcheck(bwd, (torch.randn_like(out), qkv, out, lse, b, s, causal, 0.5, b is not None, True))
    fwd, bwd = _op("spatial_attention_fwd", suffix), _op("spatial_attention_bwd", suffix)
    torch.library.opcheck(fwd, (q.clone().requires_grad_(True), k, v, 0.5))
    out, lse = fwd(q, k, v, 0.5)
    torch.library.opcheck(bwd, (torch.randn_like(out), q, k, v, out, lse, 0.5))
    fwd, bwd = _op("spatial_attention_qkvpacked_fwd", suffix), _op("spatial_attention_qkvpacked_bwd", suffix)
    torch.library.opcheck(fwd, (qkv.clone().requires_grad_(True), 0.5))
    out, lse = fwd(qkv, 0.5)
    torch.library.opcheck(bwd, (torch.randn_like(out), qkv, out, lse, 0.5))


@pytest.mark.parametrize("suffix", families())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck_dual_channel_cuda(suffix, dtype):
    q, k, v = (torch.randn(1, 2 + 5 * 4, 2, 16, device="cuda", dtype=dtype) for _ in range(3))
    args = (torch.tensor([[True, False]], device="cuda"), 2, 5, 2, 2, "plus", "window", 1, True, "interpolation")
    fwd, bwd = _op("cogvideo_attention_fwd", suffix), _op("cogvideo_attention_bwd", suffix)
    torch.library.opcheck(fwd, (q.clone().requires_grad_(True), k, v, *args))
    out, lse = fwd(q, k, v, *args)
    torch.library.opcheck(bwd, (torch.randn_like(out), q, k, v, out, lse, *args))
    base, plus = (torch.randn(2, 5, 3, device="cuda", dtype=dtype, requires_grad=True) for _ in range(2))
    logit = torch.randn(3, device="cuda", dtype=dtype, requires_grad=True)
    fwd, bwd = _op("dual_channel_mix_fwd", suffix), _op("dual_channel_mix_bwd", suffix)
    torch.library.opcheck(fwd, (base, plus, logit, 2))
    torch.library.opcheck(bwd, (torch.randn(2, 5, 3, device="cuda", dtype=dtype), base.detach(), plus.detach(),
                                logit.detach(), 2))  # fmt: skip
