"""Claims of the space-time docs that no other test checked (issue 18): a non-default scale, frame counts above 32
up to each backend's limit and the refusals beyond, half-precision backward, q/k/v with different strides and a
non-contiguous last dim, grid limits, the auto order and overrides, packed gradients without a stack, and the
references themselves against PyTorch's SDPA. Tiny shapes in the Triton interpreter; GPU cases run on a GPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import torchnova
from torchnova import _backend, _ext
from torchnova.spacetime import triton_kernels
from torchnova.spacetime.reference import spatial_attention_ref, temporal_attention_ref
from utils import (
    assert_close, assert_within_low_precision_error, auto_cpu_backend, backend_device_params, record_chosen_backends,
    skip_unless_runs, upstream,
)  # fmt: skip

ON_GPU = torch.cuda.is_available()


def make_qkv(shape, dtype, device, layout="fused"):
    """q, k, v leaves-or-views (B, T, S, H, D) and the leaves to differentiate.

    fused: three slices of one (B, T, S, 3, H, D) tensor (one stride set); different: q contiguous, k a slice of
    a wider tensor, v a permuted (B, S, T, H, D) tensor (three stride sets); lastdim: every tensor with a
    non-contiguous last dim (the copy path)."""
    B, T, S, H, D = shape
    rand = lambda *s: torch.randn(*s, dtype=torch.float64).to(device, dtype).requires_grad_(True)  # noqa: E731
    if layout == "fused":
        qkv = rand(B, T, S, 3, H, D)
        return qkv.unbind(3), [qkv]
    if layout == "different":
        q, wide, v_base = rand(B, T, S, H, D), rand(B, T, S, H, D + 5), rand(B, S, T, H, D)
        return (q, wide[..., 3 : 3 + D], v_base.transpose(1, 2)), [q, wide, v_base]
    assert layout == "lastdim"
    bases = [rand(B, T, S, D, H) for _ in range(3)]
    return tuple(b.transpose(-1, -2) for b in bases), bases


def check_temporal(backend, device, dtype, shape, *, layout="fused", scale=None, bias=False, segments=False,
                   causal=False, packed=False, monkeypatch=None):  # fmt: skip
    B, T, S, H, D = shape
    (q, k, v), leaves = make_qkv(shape, dtype, device, "fused" if packed else layout)
    skip_unless_runs("temporal_attention", backend, q=q, k=k, v=v)
    b = torch.randn(H, T, T, dtype=torch.float64).to(device, dtype).requires_grad_(True) if bias else None
    seg = torch.tensor([[0] * (T - T // 3) + list(range(1, T // 3 + 1))] * B, device=device) if segments else None
    kw = dict(bias=b, segment_ids=seg, causal=causal, scale=scale, backend=backend)
    out = (torchnova.temporal_attention_qkvpacked(leaves[0], **kw) if packed
           else torchnova.temporal_attention(q, k, v, **kw))  # fmt: skip
    leaves64 = [x.detach().cpu().double().requires_grad_(True) for x in leaves]
    b64 = b.detach().cpu().double().requires_grad_(True) if bias else None
    if packed:
        q64, k64, v64 = leaves64[0].unbind(3)
    else:
        (q64, k64, v64), _ = _views_like(layout, leaves64)
    seg64 = seg.cpu() if seg is not None else None
    expected = temporal_attention_ref(q64, k64, v64, bias=b64, segment_ids=seg64, causal=causal, scale=scale)
    assert out.dtype == dtype and out.shape == q.shape
    assert_close(out, expected, dtype, "fwd", "out")
    if dtype in (torch.float16, torch.bfloat16):  # DESIGN.md: also within 2x the same-dtype reference's error
        low = temporal_attention_ref(q.detach(), k.detach(), v.detach(), bias=None if b is None else b.detach(),
                                     segment_ids=seg, causal=causal, scale=scale)  # fmt: skip
        assert_within_low_precision_error(out, low, expected, dtype, "out")
    inputs, inputs64 = leaves + ([b] if bias else []), leaves64 + ([b64] if bias else [])
    got = torch.autograd.grad(out, inputs, upstream(out))
    want = torch.autograd.grad(expected, inputs64, upstream(out).cpu().double())
    for i, (g, w) in enumerate(zip(got, want)):
        assert_close(g, w, dtype, "grad", f"gradient {i}")


def _views_like(layout, leaves):
    if layout == "fused":
        return leaves[0].unbind(3), None
    if layout == "different":
        q, wide, v_base = leaves
        D = q.shape[-1]
        return (q, wide[..., 3 : 3 + D], v_base.transpose(1, 2)), None
    return tuple(b.transpose(-1, -2) for b in leaves), None


def check_spatial(backend, device, dtype, shape, *, layout="fused", scale=None, packed=False):
    (q, k, v), leaves = make_qkv(shape, dtype, device, "fused" if packed else layout)
    skip_unless_runs("spatial_attention", backend, q=q, k=k, v=v)
    out = (torchnova.spatial_attention_qkvpacked(leaves[0], scale=scale, backend=backend) if packed
           else torchnova.spatial_attention(q, k, v, scale=scale, backend=backend))  # fmt: skip
    leaves64 = [x.detach().cpu().double().requires_grad_(True) for x in leaves]
    (q64, k64, v64), _ = _views_like("fused" if packed else layout, leaves64)
    expected = spatial_attention_ref(q64, k64, v64, scale=scale)
    assert_close(out, expected, dtype, "fwd", "out")
    if dtype in (torch.float16, torch.bfloat16):
        low = spatial_attention_ref(q.detach(), k.detach(), v.detach(), scale=scale)
        assert_within_low_precision_error(out, low, expected, dtype, "out")
    got = torch.autograd.grad(out, leaves, upstream(out))
    want = torch.autograd.grad(expected, leaves64, upstream(out).cpu().double())
    for i, (g, w) in enumerate(zip(got, want)):
        assert_close(g, w, dtype, "grad", f"gradient {i}")


def interpreted(backend, device):
    return backend == "triton" and device == "cpu"


@pytest.fixture
def small_triton_tiles(monkeypatch):
    monkeypatch.setattr(triton_kernels, "BLOCK_P", 4)
    monkeypatch.setattr(triton_kernels, "SPATIAL_MAX_BLOCK", 16)


# ------------------------------------------------------------------------------------------------------------
# scale
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend, device", backend_device_params("temporal_attention"))
@pytest.mark.parametrize("packed", [False, True], ids=["sliced", "packed"])
def test_temporal_non_default_scale(backend, device, packed, small_triton_tiles):
    check_temporal(backend, device, torch.float32, (2, 5, 3, 2, 16), scale=0.37, bias=True, causal=True,
                   packed=packed)  # fmt: skip


# ------------------------------------------------------------------------------------------------------------
# frame counts: T > 32 up to each backend's limit, and the refusals beyond
# ------------------------------------------------------------------------------------------------------------

FRAME_LIMITS = {"cpp": [33, 100], "triton": [33, triton_kernels.MAX_FRAMES], "cuda": [33, 97, 128],
                "reference": [33]}  # fmt: skip


def frame_params():
    return [pytest.param(b, d, T, id=f"{b}-{d}-T{T}") for b, d in
            [p.values for p in backend_device_params("temporal_attention")] for T in FRAME_LIMITS[b]]  # fmt: skip


@pytest.mark.parametrize("backend, device, T", frame_params())
def test_temporal_many_frames(backend, device, T):
    shape = (1, T, 1, 1, 8) if interpreted(backend, device) else (2, T, 3, 2, 16)
    check_temporal(backend, device, torch.float32, shape, bias=True, segments=True, causal=True)


def test_triton_refuses_more_frames_than_its_limit_with_the_reason():
    q = torch.empty(1, triton_kernels.MAX_FRAMES + 1, 1, 1, 8, device="meta")
    why = _backend.reasons("temporal_attention", "triton", q=q)
    assert f"T={triton_kernels.MAX_FRAMES + 1} frames > {triton_kernels.MAX_FRAMES}" in " ".join(why)
    at_limit = torch.empty(1, triton_kernels.MAX_FRAMES, 1, 1, 8, device="meta")
    assert not any("frames" in w for w in _backend.reasons("temporal_attention", "triton", q=at_limit))


def test_cuda_refuses_more_frames_than_its_limit_with_the_reason():
    """T > 128 on every card. Below that the limit is the device's shared memory per block against the forward's
    and (when autograd may call it) the backward's need: T <= 97 for training on 99 KB cards (sm_86/89/120),
    checked per simulated card in tests/test_cuda_review.py."""
    over = torch.empty(1, 129, 1, 1, 8, device="meta")
    assert "T=129 frames > 128" in " ".join(_backend.reasons("temporal_attention", "cuda", q=over))


# ------------------------------------------------------------------------------------------------------------
# half precision, forward and backward
# ------------------------------------------------------------------------------------------------------------


def half_params(op):
    params = []
    for backend, device in (p.values for p in backend_device_params(op)):
        for dtype in (torch.float16, torch.bfloat16):
            if backend == "reference":
                continue
            marks = ()
            if interpreted(backend, device) and dtype == torch.bfloat16:
                marks = pytest.mark.skip(reason="bf16 tl.dot is wrong in the Triton interpreter: bf16 on a GPU")
            params.append(pytest.param(backend, device, dtype, id=f"{backend}-{device}-{dtype}", marks=marks))
    return params


@pytest.mark.parametrize("backend, device, dtype", half_params("temporal_attention"))
@pytest.mark.parametrize("packed", [False, True], ids=["sliced", "packed"])
def test_temporal_half_precision_forward_and_backward(backend, device, dtype, packed, small_triton_tiles):
    check_temporal(backend, device, dtype, (2, 5, 3, 2, 16), bias=True, segments=True, causal=True, packed=packed)


@pytest.mark.parametrize("backend, device, dtype", half_params("spatial_attention"))
@pytest.mark.parametrize("packed", [False, True], ids=["sliced", "packed"])
def test_spatial_half_precision_forward_and_backward(backend, device, dtype, packed, small_triton_tiles):
    check_spatial(backend, device, dtype, (1, 2, 19, 2, 16), scale=0.3, packed=packed)


# ------------------------------------------------------------------------------------------------------------
# strides: q, k, v with three different stride sets; a non-contiguous last dim (copied)
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend, device", backend_device_params("temporal_attention"))
@pytest.mark.parametrize("layout", ["different", "lastdim"])
def test_temporal_strides(backend, device, layout, small_triton_tiles):
    check_temporal(backend, device, torch.float32, (2, 5, 3, 2, 16), layout=layout, bias=True, causal=True)


@pytest.mark.parametrize("backend, device", backend_device_params("spatial_attention"))
@pytest.mark.parametrize("layout", ["different", "lastdim"])
def test_spatial_strides(backend, device, layout, small_triton_tiles):
    check_spatial(backend, device, torch.float32, (1, 2, 19, 2, 16), layout=layout)


# ------------------------------------------------------------------------------------------------------------
# grid limits
# ------------------------------------------------------------------------------------------------------------


def test_triton_temporal_grid_limit_has_a_reason():
    """Grid (H, cdiv(B·S, BLOCK_P)): above 65,535 programs on axis 1 the launch would fail; the backend says so."""
    limit = triton_kernels.MAX_GRID_YZ * triton_kernels.BLOCK_P
    over = torch.empty(1, 2, limit + 1, 1, 8, device="meta")
    assert any(f"B*S = {limit + 1} problems per head > {limit}" in w
               for w in _backend.reasons("temporal_attention", "triton", q=over))  # fmt: skip
    at_limit = torch.empty(1, 2, limit, 1, 8, device="meta")
    assert not any("problems per head" in w for w in _backend.reasons("temporal_attention", "triton", q=at_limit))


@pytest.mark.skipif(not ON_GPU, reason="GPU: more than 65,535 problems in one launch")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_spatial_more_than_65535_problems_on_gpu(backend):
    check_spatial(backend, "cuda", torch.float32, (7, 10, 3, 1_000, 16))  # B·T·H = 70,000


# ------------------------------------------------------------------------------------------------------------
# auto order and overrides
# ------------------------------------------------------------------------------------------------------------


def test_auto_order():
    for op in ("temporal_attention", "spatial_attention"):
        assert _backend.backends_for(op) == ["cuda", "cpp", "triton", "reference"]


def test_auto_picks_and_env_and_explicit_override(monkeypatch):
    chosen = record_chosen_backends(monkeypatch)
    q = torch.randn(1, 3, 2, 1, 8)
    monkeypatch.delenv("TORCHNOVA_BACKEND", raising=False)
    torchnova.temporal_attention(q, q, q)
    torchnova.spatial_attention(q, q, q)
    monkeypatch.setenv("TORCHNOVA_BACKEND", "reference")
    torchnova.temporal_attention(q, q, q)
    torchnova.spatial_attention_qkvpacked(torch.stack([q, q, q], 3), backend=auto_cpu_backend())  # explicit wins
    expected = [("temporal_attention", auto_cpu_backend()), ("spatial_attention", auto_cpu_backend()),
                ("temporal_attention", "reference"), ("spatial_attention", auto_cpu_backend())]  # fmt: skip
    assert chosen == expected
    if ON_GPU:
        qg = q.cuda()
        monkeypatch.delenv("TORCHNOVA_BACKEND")
        torchnova.temporal_attention(qg, qg, qg)
        assert chosen[-1][1] == ("cuda" if _ext.HAS_CUDA_KERNELS else "triton")


@pytest.mark.skipif(not _ext.HAS_CPP, reason="C++ extension not available")
def test_cpu_isa_environment_variable_caps_the_copy():
    """TORCHNOVA_CPU_ISA is read when the extension loads, so a fresh interpreter: capped at the baseline copy
    (every x86-64 CPU has it; the other copies are selected in-process by test_cpu_isa.py)."""
    import os
    import subprocess
    import sys

    code = "from torchnova import _ext; print(_ext._C.cpu_isa(), _ext.BUILD_INFO['cpu_isa'])"
    env = {**os.environ, "TORCHNOVA_CPU_ISA": "baseline"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    running, best = out.stdout.split()
    assert running == "baseline" and best == _ext.BUILD_INFO["cpu_isa"]


# ------------------------------------------------------------------------------------------------------------
# memory: packed gradients are written as one tensor (no torch.stack) on the CPU and Triton kernels
# ------------------------------------------------------------------------------------------------------------


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend, device", [p for p in backend_device_params("temporal_attention")
                                             if p.values[0] in ("cpp", "triton")])  # fmt: skip
@pytest.mark.parametrize("op", ["temporal_attention_qkvpacked", "spatial_attention_qkvpacked"])
def test_packed_backward_has_no_stack(backend, device, op, small_triton_tiles):
    qkv = torch.randn(1, 3, 4, 3, 1, 16, device=device, requires_grad=True)
    skip_unless_runs(op.replace("_qkvpacked", ""), backend, q=qkv[:, :, :, 0])
    out = getattr(torchnova, op)(qkv, backend=backend)
    with _RecordOps() as recorded:
        (grad,) = torch.autograd.grad(out, qkv, torch.ones_like(out))
    assert grad.shape == qkv.shape
    assert not any(name.endswith(("stack", "cat")) for name in recorded.names), recorded.names


# ------------------------------------------------------------------------------------------------------------
# the references themselves against PyTorch
# ------------------------------------------------------------------------------------------------------------


def test_temporal_reference_equals_sdpa_with_the_equivalent_mask_and_bias():
    B, T, S, H, D = 2, 6, 3, 2, 8
    q, k, v = (torch.randn(B, T, S, H, D, dtype=torch.float64) for _ in range(3))
    bias = torch.randn(H, T, T, dtype=torch.float64)
    segments = torch.tensor([[0, 0, 0, 0, 1, 2], [0, 1, 1, 1, 1, 1]])
    visible = (segments[:, :, None] == segments[:, None, :]) & torch.ones(T, T, dtype=torch.bool).tril()
    mask = bias[None] + torch.zeros(B, 1, T, T, dtype=torch.float64).masked_fill(~visible[:, None], float("-inf"))
    to = lambda x: x.permute(0, 2, 3, 1, 4).reshape(B, S * H, T, D)  # noqa: E731  (B, S·H, T, D)
    mask = mask[:, None].expand(B, S, H, T, T).reshape(B, S * H, T, T)
    sdpa = F.scaled_dot_product_attention(to(q), to(k), to(v), attn_mask=mask, scale=0.4)
    ref = temporal_attention_ref(q, k, v, bias=bias, segment_ids=segments, causal=True, scale=0.4)
    assert_close(ref.permute(0, 2, 3, 1, 4).reshape(B, S * H, T, D), sdpa, torch.float64, "fwd", "temporal ref")


def test_spatial_reference_equals_sdpa():
    B, T, S, H, D = 2, 3, 7, 2, 8
    q, k, v = (torch.randn(B, T, S, H, D, dtype=torch.float64) for _ in range(3))
    to = lambda x: x.permute(0, 1, 3, 2, 4)  # noqa: E731  (B, T, H, S, D)
    sdpa = F.scaled_dot_product_attention(to(q), to(k), to(v))
    assert_close(to(spatial_attention_ref(q, k, v)), sdpa, torch.float64, "fwd", "spatial ref")


# ------------------------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(bias=torch.zeros(2, 4, 4, dtype=torch.int64)), TypeError, r"bias must be a floating-point tensor.*int64"),
        (dict(bias=[[0.0]]), TypeError, r"bias must be a floating-point tensor.*list"),
        (dict(bias=torch.zeros(2, 4, 4, device="meta")), ValueError, r"bias must be on q's device cpu, got meta"),
        (dict(segment_ids=torch.zeros(2, 4, dtype=torch.int64, device="meta")), ValueError,
         r"segment_ids must be on q's device cpu, got meta"),
        (dict(segment_ids=torch.zeros(2, 4, dtype=torch.bool)), TypeError, r"segment_ids must be an integer tensor"),
        (dict(scale=float("nan")), ValueError, r"scale must be a finite number > 0 or None, got nan"),
        (dict(scale=float("inf")), ValueError, r"scale must be a finite number > 0 or None, got inf"),
        (dict(scale=True), ValueError, r"scale must be a finite number > 0 or None, got True"),
        (dict(scale="0.5"), ValueError, r"scale must be a finite number > 0 or None, got '0.5'"),
        (dict(scale=0.0), ValueError, r"scale must be a finite number > 0 or None, got 0.0"),
    ],
)
def test_temporal_validation(change, error, match):
    q = torch.randn(2, 4, 3, 2, 8)
    with pytest.raises(error, match=match):
        torchnova.temporal_attention(q, q, q, backend="reference", **change)


@pytest.mark.parametrize(
    "args, match",
    [
        ((0,), r"T must be an int >= 1, got 0"),
        ((2.0,), r"T must be an int >= 1, got 2.0"),
        ((True,), r"T must be an int >= 1, got True"),
        ((4, 3), r"num_buckets must be even and >= 4, got 3"),
        ((4, 2), r"num_buckets must be even and >= 4, got 2"),
        ((4, 0), r"num_buckets must be an int >= 1, got 0"),
        ((4, 32, 8), r"max_distance must be > 8, got 8"),
        ((4, 32, 0), r"max_distance must be an int >= 1, got 0"),
    ],
)
def test_relative_position_buckets_validation(args, match):
    with pytest.raises(ValueError, match=match):
        torchnova.relative_position_buckets(*args)
