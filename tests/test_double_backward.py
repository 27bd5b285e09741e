"""Double backward on every op and backend: the reference supports it (gradgradcheck), every kernel backend
raises a clear RuntimeError when a second derivative is asked for (the once_differentiable contract), and a
first-order gradient taken with create_graph=True still works and is unchanged.

Before, the cpp (and cuda) ops let a second derivative through their non-differentiable backward ops: mesa_kl's
gradgradcheck failed with a Jacobian mismatch (a silently wrong Hessian-vector product), while the test asserted
True for every backend but the reference.
"""

from __future__ import annotations

import pytest
import torch

import torchnova
from utils import devices, skip_unless_runs

ERROR = r"does not support double backward"


def _randn(*shape, dtype, device):
    return torch.randn(*shape, dtype=torch.float64).to(device=device, dtype=dtype).requires_grad_(True)


def mesa_case(dtype, device):
    z, t = _randn(3, 5, dtype=dtype, device=device), torch.randn(3, 5, dtype=dtype, device=device)
    return "mesa_kl", dict(student_logits=z, teacher_logits=t), (lambda z, backend: torchnova.mesa_kl(
        z, t, temperature=2.0, reduction="sum", backend=backend)), (z,)  # fmt: skip


def temporal_case(dtype, device):
    q, k, v = (_randn(1, 3, 2, 1, 4, dtype=dtype, device=device) for _ in range(3))
    bias = _randn(1, 3, 3, dtype=dtype, device=device)

    def fn(q, k, v, bias, backend):
        return torchnova.temporal_attention(q, k, v, bias=bias, causal=True, backend=backend)

    return "temporal_attention", dict(q=q, k=k, v=v), fn, (q, k, v, bias)


def temporal_packed_case(dtype, device):
    qkv = _randn(1, 3, 2, 3, 1, 4, dtype=dtype, device=device)
    fn = lambda qkv, backend: torchnova.temporal_attention_qkvpacked(qkv, backend=backend)  # noqa: E731
    return "temporal_attention", dict(q=qkv[:, :, :, 0]), fn, (qkv,)


def spatial_case(dtype, device):
    q, k, v = (_randn(1, 1, 3, 1, 4, dtype=dtype, device=device) for _ in range(3))
    fn = lambda q, k, v, backend: torchnova.spatial_attention(q, k, v, backend=backend)  # noqa: E731
    return "spatial_attention", dict(q=q, k=k, v=v), fn, (q, k, v)


def spatial_packed_case(dtype, device):
    qkv = _randn(1, 1, 3, 3, 1, 4, dtype=dtype, device=device)
    fn = lambda qkv, backend: torchnova.spatial_attention_qkvpacked(qkv, backend=backend)  # noqa: E731
    return "spatial_attention", dict(q=qkv[:, :, :, 0]), fn, (qkv,)


def cogvideo_case(dtype, device):
    q, k, v = (_randn(1, 1 + 2 * 1, 1, 4, dtype=dtype, device=device) for _ in range(3))

    def fn(q, k, v, backend):
        return torchnova.cogvideo_attention(q, k, v, text_len=1, frames=2, grid=1, channel="plus", backend=backend)

    return "cogvideo_attention", dict(x=q, head_dim=4), fn, (q, k, v)


def mix_case(dtype, device):
    base, plus = (_randn(1, 3, 2, dtype=dtype, device=device) for _ in range(2))
    logit = _randn(2, dtype=dtype, device=device)
    fn = lambda a, b, c, backend: torchnova.dual_channel_mix(a, b, c, text_len=1, backend=backend)  # noqa: E731
    return "dual_channel_mix", dict(x=base), fn, (base, plus, logit)


CASES = {
    "mesa_kl": mesa_case, "temporal": temporal_case, "temporal_qkvpacked": temporal_packed_case,
    "spatial": spatial_case, "spatial_qkvpacked": spatial_packed_case, "cogvideo": cogvideo_case, "mix": mix_case,
}  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_reference_supports_double_backward(case):
    _, _, fn, inputs = CASES[case](torch.float64, "cpu")
    assert torch.autograd.gradgradcheck(lambda *x: fn(*x, backend="reference"), inputs, fast_mode=True)


def kernel_params():
    return [pytest.param(b, d, id=f"{b}-{d}") for d in devices() for b in ("cpp", "triton", "cuda")]


def _upstream(out):
    return torch.randn(out.shape, dtype=torch.float64).to(out.device, out.dtype)


@pytest.mark.parametrize("backend, device", kernel_params())
@pytest.mark.parametrize("case", CASES)
def test_kernels_refuse_double_backward(case, backend, device):
    dtype = torch.float64 if backend == "cpp" else torch.float32
    op, selection_inputs, fn, inputs = CASES[case](dtype, device)
    skip_unless_runs(op, backend, **selection_inputs)
    out = fn(*inputs, backend=backend)
    upstream = _upstream(out)

    # First order, with and without create_graph: the same gradients.
    plain = torch.autograd.grad(out, inputs, upstream, retain_graph=True)
    graphed = torch.autograd.grad(out, inputs, upstream, retain_graph=True, create_graph=True)
    for a, b in zip(plain, graphed):
        assert torch.equal(a, b.detach())

    # A second derivative through the saved inputs (upstream needs no grad): raises instead of a wrong answer.
    with pytest.raises(RuntimeError, match=ERROR):
        sum((g * torch.randn_like(g)).sum() for g in graphed).backward()

    # ... and through the upstream gradient (what gradgradcheck and Hessian-vector products do).
    upstream = upstream.clone().requires_grad_(True)
    graphed = torch.autograd.grad(fn(*inputs, backend=backend), inputs, upstream, create_graph=True)
    with pytest.raises(RuntimeError, match=ERROR):
        torch.autograd.grad(sum(g.sum() for g in graphed), upstream)


@pytest.mark.parametrize("case", CASES)
def test_cpp_gradgradcheck_raises(case):
    """The check the old mesa_kl test skipped for cpp: now a clear error, not a Jacobian mismatch."""
    op, selection_inputs, fn, inputs = CASES[case](torch.float64, "cpu")
    skip_unless_runs(op, "cpp", **selection_inputs)
    assert torch.autograd.gradcheck(lambda *x: fn(*x, backend="cpp"), inputs)
    with pytest.raises(RuntimeError, match=ERROR):
        torch.autograd.gradgradcheck(lambda *x: fn(*x, backend="cpp"), inputs)

