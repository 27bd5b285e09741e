"""temporal_attention_qkvpacked / spatial_attention_qkvpacked: the packed (B, T, S, 3, H, D) forms against the
float64 reference (forward, dqkv, dbias) on every backend, the CompositeExplicitAutograd stacking kernels (what
CUDA tensors get) against the CPU kernels that write dqkv directly, gradcheck, opcheck, bad input."""

import itertools

import pytest
import torch

import torchnova
from torchnova.spacetime import triton_kernels
from torchnova.spacetime.reference import spatial_attention_ref, temporal_attention_ref
from utils import assert_close, backend_device_params, needs_cpp, segments_for, skip_unless_runs, upstream

OPTIONS = list(itertools.product([False, True], [False, True], [False, True]))  # (bias, segments, causal)
TEMPORAL_SHAPES = [(1, 1, 1, 1, 8), (2, 7, 5, 3, 40), (1, 24, 3, 2, 72)]  # T = 24: a half vector of keys
SPATIAL_SHAPES = [(1, 1, 1, 1, 8), (2, 2, 5, 3, 40), (1, 1, 70, 2, 88)]


def packed(shape, dtype, device="cpu"):
    B, T, S, H, D = shape
    return torch.randn(B, T, S, 3, H, D, dtype=dtype, device=device, requires_grad=True)


@pytest.mark.parametrize("backend, device", backend_device_params("temporal_attention"))
@pytest.mark.parametrize("shape", TEMPORAL_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("use_bias, use_segments, causal", OPTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_temporal_qkvpacked_matches_reference(backend, device, shape, use_bias, use_segments, causal, dtype,
                                              monkeypatch):  # fmt: skip
    if backend == "triton" and device == "cpu" and (shape != TEMPORAL_SHAPES[1] or dtype != torch.float32):
        pytest.skip("the Triton interpreter is slow: every option on one odd shape in fp32")
    monkeypatch.setattr(triton_kernels, "BLOCK_P", 4)
    B, T, S, H, D = shape
    qkv = packed(shape, dtype, device)
    skip_unless_runs("temporal_attention", backend, q=qkv[:, :, :, 0])
    bias = torch.randn(H, T, T, dtype=dtype, device=device, requires_grad=True) if use_bias else None
    segments = segments_for(B, T).to(device) if use_segments else None
    out = torchnova.temporal_attention_qkvpacked(qkv, bias=bias, segment_ids=segments, causal=causal, backend=backend)

    qkv64 = qkv.detach().double().requires_grad_(True)
    bias64 = bias.detach().double().requires_grad_(True) if use_bias else None
    expected = temporal_attention_ref(*qkv64.unbind(3), bias=bias64, segment_ids=segments, causal=causal)
    assert_close(out, expected, dtype, "fwd", "out")
    inputs, inputs64 = ([qkv, bias], [qkv64, bias64]) if use_bias else ([qkv], [qkv64])
    got = torch.autograd.grad(out, inputs, upstream(out))
    want = torch.autograd.grad(expected, inputs64, upstream(expected))
    assert got[0].shape == qkv.shape
    for name, g, w in zip(["dqkv", "dbias"], got, want):
        assert_close(g, w, dtype, "grad", name)


@pytest.mark.parametrize("backend, device", backend_device_params("spatial_attention"))
@pytest.mark.parametrize("shape", SPATIAL_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_spatial_qkvpacked_matches_reference(backend, device, shape, dtype, monkeypatch):
    if backend == "triton" and device == "cpu" and dtype != torch.float32:
        pytest.skip("the Triton interpreter is slow: fp32 only")
    monkeypatch.setattr(triton_kernels, "SPATIAL_MAX_BLOCK", 16)  # several query/key blocks on small inputs
    qkv = packed(shape, dtype, device)
    skip_unless_runs("spatial_attention", backend, q=qkv[:, :, :, 0])
    out = torchnova.spatial_attention_qkvpacked(qkv, scale=0.3, backend=backend)
    qkv64 = qkv.detach().double().requires_grad_(True)
    expected = spatial_attention_ref(*qkv64.unbind(3), scale=0.3)
    assert_close(out, expected, dtype, "fwd", "out")
    (got,) = torch.autograd.grad(out, qkv, upstream(out))
    (want,) = torch.autograd.grad(expected, qkv64, upstream(expected))
    assert_close(got, want, dtype, "grad", "dqkv")


@needs_cpp
def test_packed_gradient_equals_the_unpacked_one_bit_for_bit():
    """Same kernels, only where the gradients are written: the packed and the sliced paths agree exactly."""
    qkv = packed((2, 6, 9, 2, 40), torch.float32)
    bias = torch.randn(2, 6, 6, requires_grad=True)
    out_packed = torchnova.temporal_attention_qkvpacked(qkv, bias=bias, causal=True, backend="cpp")
    out_sliced = torchnova.temporal_attention(*qkv.unbind(3), bias=bias, causal=True, backend="cpp")
    grad = upstream(out_packed)
    assert torch.equal(out_packed, out_sliced)
    packed_grads = torch.autograd.grad(out_packed, (qkv, bias), grad)
    for a, b in zip(packed_grads, torch.autograd.grad(out_sliced, (qkv, bias), grad)):
        assert torch.equal(a, b)
    out_packed = torchnova.spatial_attention_qkvpacked(qkv, backend="cpp")
    out_sliced = torchnova.spatial_attention(*qkv.unbind(3), backend="cpp")
    assert torch.equal(out_packed, out_sliced)
    assert torch.equal(torch.autograd.grad(out_packed, qkv, grad)[0], torch.autograd.grad(out_sliced, qkv, grad)[0])


@needs_cpp
def test_composite_stacking_kernels_match_the_cpu_kernels():
    """The CompositeExplicitAutograd kernels (unpacked op + torch.stack: what CUDA tensors run) give the CPU
    kernels' dqkv; called here on CPU tensors through their dispatch key."""
    composite = torch._C.DispatchKey.CompositeExplicitAutograd
    ops = torch.ops.torchnova
    qkv = torch.randn(2, 5, 3, 3, 2, 16)
    bias, segments = torch.randn(2, 5, 5), segments_for(2, 5)
    out, lse = ops.temporal_attention_qkvpacked_fwd.default._op_dk(composite, qkv, bias, segments, True, 0.4)
    ref_out, ref_lse = ops.temporal_attention_qkvpacked_fwd(qkv, bias, segments, True, 0.4)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    args = (torch.randn_like(out), qkv, out, lse, bias, segments, True, 0.4, True, True)
    stacked = ops.temporal_attention_qkvpacked_bwd.default._op_dk(composite, *args)
    for a, b in zip(stacked, ops.temporal_attention_qkvpacked_bwd(*args)):
        assert torch.equal(a, b)
    out, lse = ops.spatial_attention_qkvpacked_fwd.default._op_dk(composite, qkv, 0.4)
    assert torch.equal(out, ops.spatial_attention_qkvpacked_fwd(qkv, 0.4)[0])
    args = (torch.randn_like(out), qkv, out, lse, 0.4)
    stacked = ops.spatial_attention_qkvpacked_bwd.default._op_dk(composite, *args)
    assert torch.equal(stacked, ops.spatial_attention_qkvpacked_bwd(*args))


@needs_cpp
def test_strided_packed_input_gets_a_contiguous_gradient():
    big = torch.randn(2, 4, 5, 4, 2, 8, requires_grad=True)
    qkv = big[:, :, :, 1:]  # (B, T, S, 3, H, D) view, not contiguous
    seen = []
    hook = qkv.register_hook(seen.append)  # the op's dqkv, before autograd copies it into big's gradient
    out = torchnova.temporal_attention_qkvpacked(qkv, backend="cpp")
    expected = temporal_attention_ref(*qkv.double().unbind(3))
    assert_close(out, expected, torch.float32, "fwd", "out")
    (grad,) = torch.autograd.grad(out.sum(), big)
    hook.remove()
    (grad64,) = torch.autograd.grad(expected.sum(), big)
    assert_close(grad, grad64, torch.float32, "grad", "dqkv")
    assert torch.equal(grad[:, :, :, 0], torch.zeros_like(grad[:, :, :, 0]))
    assert len(seen) == 1 and seen[0].shape == qkv.shape and seen[0].is_contiguous()


@needs_cpp
def test_gradcheck_cpp_qkvpacked_float64():
    qkv = torch.randn(2, 4, 3, 3, 2, 5, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(2, 4, 4, dtype=torch.float64, requires_grad=True)
    segments = torch.tensor([[0, 0, 1, 2], [0, 1, 1, 1]])

    def temporal(qkv, bias):
        return torchnova.temporal_attention_qkvpacked(qkv, bias=bias, segment_ids=segments, causal=True, backend="cpp")

    assert torch.autograd.gradcheck(temporal, (qkv, bias))
    assert torch.autograd.gradcheck(lambda x: torchnova.spatial_attention_qkvpacked(x, backend="cpp"), (qkv,))


def _opcheck_packed(suffix, qkv, bias, segments, options=((True, True), (False, False))):
    ops = torch.ops.torchnova
    fwd = getattr(ops, f"temporal_attention_qkvpacked_fwd{suffix}")
    bwd = getattr(ops, f"temporal_attention_qkvpacked_bwd{suffix}")
    for with_extras, causal in options:
        b, s = (bias, segments) if with_extras else (None, None)
        b_grad = b.clone().requires_grad_(True) if b is not None else None
        torch.library.opcheck(fwd.default, (qkv.clone().requires_grad_(True), b_grad, s, causal, 0.5))
        out, lse = fwd(qkv, b, s, causal, 0.5)
        args = (torch.randn_like(out), qkv, out, lse, b, s, causal, 0.5, b is not None, True)
        torch.library.opcheck(bwd.default, args)
    fwd = getattr(ops, f"spatial_attention_qkvpacked_fwd{suffix}")
    bwd = getattr(ops, f"spatial_attention_qkvpacked_bwd{suffix}")
    torch.library.opcheck(fwd.default, (qkv.clone().requires_grad_(True), 0.5))
    out, lse = fwd(qkv, 0.5)
    torch.library.opcheck(bwd.default, (torch.randn_like(out), qkv, out, lse, 0.5))


@needs_cpp
def test_opcheck_qkvpacked_ops():
    qkv = torch.randn(2, 4, 3, 3, 2, 8)
    _opcheck_packed("", qkv, torch.randn(2, 4, 4), torch.tensor([[0, 0, 1, 2], [0, 1, 1, 1]]))


def test_opcheck_qkvpacked_triton_ops():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    qkv = torch.randn(2, 4, 3, 3, 2, 16, device=device)
    skip_unless_runs("temporal_attention", "triton", q=qkv[:, :, :, 0])
    segments = torch.tensor([[0, 0, 1, 2], [0, 1, 1, 1]], device=device)
    # One option set: opcheck runs each interpreted kernel many times (the sliced ops cover the others).
    _opcheck_packed("_triton", qkv, torch.randn(2, 4, 4, device=device), segments, options=((True, True),))


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: torch.randn(2, 3, 4, 3, 2), ValueError, r"shape \(B, T, S, 3, H, D\), got \(2, 3, 4, 3, 2\)"),
        (lambda: torch.randn(2, 3, 4, 2, 2, 8), ValueError, r"shape \(B, T, S, 3, H, D\), got \(2, 3, 4, 2, 2, 8\)"),
        (lambda: torch.ones(2, 3, 4, 3, 2, 8, dtype=torch.int64), TypeError, "qkv must be a floating-point tensor"),
        (lambda: [1.0], TypeError, "qkv must be a torch.Tensor, got list"),
    ],
)
@pytest.mark.parametrize("fn", [torchnova.temporal_attention_qkvpacked, torchnova.spatial_attention_qkvpacked])
def test_qkvpacked_bad_input_names_the_argument(make, error, match, fn):
    with pytest.raises(error, match=match):
        fn(make())


def test_qkvpacked_bad_bias_names_the_argument():
    with pytest.raises(ValueError, match=r"bias must have shape \(H, T, T\) = \(2, 3, 3\), got \(2, 4, 4\)"):
        torchnova.temporal_attention_qkvpacked(torch.randn(1, 3, 2, 3, 2, 8), bias=torch.randn(2, 4, 4))
