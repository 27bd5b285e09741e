"""Property-based tests of factorized space-time attention: temporal_attention(+_qkvpacked),
spatial_attention(+_qkvpacked) on every backend vs the float64 reference (forward and every gradient), and
relative_position_buckets vs the float64 T5 formula.

Drawn: B = 0 and S = 0 (empty), size-1 dims, odd and prime T, S, D (tails of every tile size); contiguous,
strided (slice of a wider buffer), transposed and stride(-1) != 1 inputs and packed qkv (B, T, S, 3, H, D)
slices; bias (with gradient), segment_ids, causal, scale; an upstream gradient that is random or the
stride-0 ones of ``out.sum().backward()``. Profiles: tests/hypothesis_profiles.py (HYPOTHESIS_PROFILE=ci|long).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from properties import (
    LAYOUTS, check_property, compare, device_of, fuzz_backends, grad_like, laid_out, op_backend, randn, running_on,
    seeds, supported_dtypes,
)  # fmt: skip
from torchnova import (
    relative_position_buckets, spatial_attention, spatial_attention_qkvpacked, temporal_attention,
    temporal_attention_qkvpacked,
)  # fmt: skip
from torchnova.spacetime.reference import spatial_attention_ref, temporal_attention_ref

HEAD_DIMS = (1, 2, 3, 5, 8, 13, 16, 17, 24, 40)  # powers of two, odd, prime, the non-power-of-two model dims
DTYPES = (torch.float32, torch.float64, torch.float16)


def _dtypes(op, backend):
    device = device_of(backend)
    probe = lambda d: dict(q=torch.empty(1, 1, 1, 1, 8, dtype=d, device=device))  # noqa: E731
    return supported_dtypes(op, backend, probe, DTYPES)


@st.composite
def spacetime_cases(draw, dtypes, temporal: bool, small: bool):
    """One problem: shapes, dtype, layout, options, seeds."""
    frames = (1, 2, 3, 5, 7, 8, 9, 13) if temporal else (0, 1, 2, 3)
    tokens = (0, 1, 2, 3, 5, 7) if temporal else (0, 1, 2, 3, 5, 7, 16, 17, 31)
    case = dict(
        B=draw(st.sampled_from((0, 1, 1, 2) if small else (0, 1, 2, 3))),
        T=draw(st.sampled_from(frames[:6] if small else frames)),
        S=draw(st.sampled_from(tokens[:6] if small else tokens)),
        H=draw(st.sampled_from((1, 2, 3))),
        D=draw(st.sampled_from(HEAD_DIMS[:8] if small else HEAD_DIMS)),
        dtype=draw(st.sampled_from(dtypes)),
        packed=draw(st.booleans()),
        layout=draw(st.sampled_from(LAYOUTS)),
        scale=draw(st.one_of(st.none(), st.floats(0.05, 2.0))),
        grad=draw(st.sampled_from(("random", "ones"))),
        magnitude=draw(st.sampled_from((1.0, 1.0, 4.0))),
        seed=draw(seeds),
    )
    if temporal:
        case.update(
            bias=draw(st.booleans()),
            segments=draw(st.one_of(st.none(), st.integers(1, 3))),
            causal=draw(st.booleans()),
        )
    return case


def _qkv(case, device):
    """Leaves (what gets the gradient: qkv packed, or q, k, v) and q, k, v views, in the drawn layout."""
    B, T, S, H, D, dtype = (case[n] for n in ("B", "T", "S", "H", "D", "dtype"))
    values = randn((B, T, S, 3, H, D), torch.float64, case["seed"], scale=case["magnitude"])
    if case["packed"]:
        qkv = laid_out(values, case["layout"] if case["layout"] != "strided" else "contiguous", swap=(1, 2))
        if case["layout"] == "strided":  # a (B, T, S, 3, H, D) view of a wider fused projection
            wide = torch.zeros((B, T, S, 3, H + 1, D), dtype=torch.float64)
            wide[..., :H, :] = values
            qkv = wide[..., :H, :]
        leaf = qkv.to(device=device, dtype=dtype).detach().requires_grad_(True)
        return [leaf], leaf.unbind(3)
    leaves = [laid_out(values[:, :, :, i].to(device=device, dtype=dtype), case["layout"]).detach().requires_grad_(True)
              for i in range(3)]  # fmt: skip
    return leaves, leaves


def _ref_grads(ref_out, ref_leaves, grad):
    return torch.autograd.grad(ref_out, ref_leaves, grad.to(torch.float64), allow_unused=True)


def _check_temporal(backend, case):
    op = "temporal_attention"
    device = device_of(backend)
    B, T, H, dtype = case["B"], case["T"], case["H"], case["dtype"]
    leaves, (q, k, v) = _qkv(case, device)
    bias = segments = None
    if case["bias"]:
        bias_dtype = torch.float64 if dtype == torch.float64 else torch.float32  # the accumulation dtype
        bias = randn((H, T, T), bias_dtype, case["seed"] + 1, device).requires_grad_(True)
    if case["segments"] is not None:
        g = torch.Generator().manual_seed(case["seed"] + 2)
        segments = torch.randint(0, case["segments"], (B, T), generator=g).to(device)
    kw = dict(bias=bias, segment_ids=segments, causal=case["causal"], scale=case["scale"])
    with running_on(op, backend, q=q, k=k, v=v, bias=bias, segment_ids=segments):
        if case["packed"]:
            out = temporal_attention_qkvpacked(leaves[0], backend=op_backend(backend), **kw)
        else:
            out = temporal_attention(*leaves, backend=op_backend(backend), **kw)
        grad = grad_like(out, case["grad"], case["seed"] + 3)
        wrt = leaves + ([bias] if bias is not None else [])
        grads = torch.autograd.grad(out, wrt, grad)
    ref_leaves = [x.detach().cpu().double().requires_grad_(True) for x in wrt]
    ref_q, ref_k, ref_v = ref_leaves[0].unbind(3) if case["packed"] else ref_leaves[:3]
    ref_bias = ref_leaves[-1] if bias is not None else None
    ref_segments = segments.cpu() if segments is not None else None
    ref = temporal_attention_ref(ref_q, ref_k, ref_v, bias=ref_bias, segment_ids=ref_segments,
                                 causal=case["causal"], scale=case["scale"])  # fmt: skip
    ref_grads = _ref_grads(ref, ref_leaves, grad.cpu())
    # the same reference in the kernel's dtype: the yardstick of DESIGN.md's "<= 2x the reference's error"
    low_leaves = [x.detach().cpu().requires_grad_(True) for x in wrt]
    low_q, low_k, low_v = low_leaves[0].unbind(3) if case["packed"] else low_leaves[:3]
    low = temporal_attention_ref(low_q, low_k, low_v, bias=low_leaves[-1] if bias is not None else None,
                                 segment_ids=ref_segments, causal=case["causal"], scale=case["scale"])  # fmt: skip
    low_grads = torch.autograd.grad(low, low_leaves, grad.cpu(), allow_unused=True)
    if backend == "reference" and case["magnitude"] == 1.0:  # unit-scale inputs: the table alone
        low, low_grads = None, [None] * len(low_grads)
    assert out.dtype == dtype and out.shape == q.shape
    compare(out, ref, dtype, "fwd", f"{backend} temporal out {case}", low)
    names = (["dqkv"] if case["packed"] else ["dq", "dk", "dv"]) + (["dbias"] if bias is not None else [])
    for name, got, want, yardstick in zip(names, grads, ref_grads, low_grads):
        # dbias sums B·S·... problems: an fp32 bias gradient of fp16 inputs is held to fp16's tolerance
        compare(got, want, dtype, "grad", f"{backend} temporal {name} {case}", yardstick)


def _check_spatial(backend, case):
    op = "spatial_attention"
    device = device_of(backend)
    dtype = case["dtype"]
    leaves, (q, k, v) = _qkv(case, device)
    with running_on(op, backend, q=q, k=k, v=v):
        if case["packed"]:
            out = spatial_attention_qkvpacked(leaves[0], scale=case["scale"], backend=op_backend(backend))
        else:
            out = spatial_attention(*leaves, scale=case["scale"], backend=op_backend(backend))
        grad = grad_like(out, case["grad"], case["seed"] + 3)
        grads = torch.autograd.grad(out, leaves, grad)
    ref_leaves = [x.detach().cpu().double().requires_grad_(True) for x in leaves]
    ref_q, ref_k, ref_v = ref_leaves[0].unbind(3) if case["packed"] else ref_leaves
    ref = spatial_attention_ref(ref_q, ref_k, ref_v, scale=case["scale"])
    ref_grads = _ref_grads(ref, ref_leaves, grad.cpu())
    low_leaves = [x.detach().cpu().requires_grad_(True) for x in leaves]  # the reference in the kernel's dtype
    low = spatial_attention_ref(*(low_leaves[0].unbind(3) if case["packed"] else low_leaves), scale=case["scale"])
    low_grads = torch.autograd.grad(low, low_leaves, grad.cpu())
    if backend == "reference" and case["magnitude"] == 1.0:  # unit-scale inputs: the table alone
        low, low_grads = None, [None] * len(low_grads)
    assert out.dtype == dtype and out.shape == q.shape
    compare(out, ref, dtype, "fwd", f"{backend} spatial out {case}", low)
    names = ["dqkv"] if case["packed"] else ["dq", "dk", "dv"]
    for name, got, want, yardstick in zip(names, grads, ref_grads, low_grads):
        compare(got, want, dtype, "grad", f"{backend} spatial {name} {case}", yardstick)


@pytest.mark.parametrize("backend", fuzz_backends("temporal_attention"))
def test_temporal_attention_matches_float64(backend):
    small = backend in ("triton", "cuda-emulated")
    strategy = spacetime_cases(_dtypes("temporal_attention", backend), temporal=True, small=small)
    check_property(backend, strategy, lambda case: _check_temporal(backend, case), weight=2)


@pytest.mark.parametrize("backend", fuzz_backends("spatial_attention"))
def test_spatial_attention_matches_float64(backend):
    small = backend in ("triton", "cuda-emulated")
    strategy = spacetime_cases(_dtypes("spatial_attention", backend), temporal=False, small=small)
    check_property(backend, strategy, lambda case: _check_spatial(backend, case), weight=2)


# ---------------------------------------------------------------------------------------------------------
# relative_position_buckets: integer T5 bucketing vs the float64 formula of video-diffusion-pytorch
# ---------------------------------------------------------------------------------------------------------


def _bucket_float64(n: int, num_buckets: int, max_distance: int):
    """lucidrains' RelativePositionBias._relative_position_bucket for one n = query - key, in float64; None where
    the log-spaced value lies within 1e-9 of an integer (float rounding decides the bucket there)."""
    half = num_buckets // 2
    ret = half if n < 0 else 0
    n = abs(n)
    max_exact = half // 2
    if n < max_exact:
        return ret + n
    x = math.log(n / max_exact) / math.log(max_distance / max_exact) * (half - max_exact)
    if abs(x - round(x)) < 1e-9:
        return None
    return ret + min(max_exact + int(x), half - 1)


@given(
    T=st.integers(1, 90),
    half_quarter=st.integers(1, 12),
    extra_distance=st.integers(1, 200),
)
def test_relative_position_buckets_match_float64(T, half_quarter, extra_distance):
    num_buckets = 4 * half_quarter if half_quarter % 2 else 4 * half_quarter + 2  # even, >= 4
    max_exact = num_buckets // 4
    max_distance = max_exact + extra_distance
    table = relative_position_buckets(T, num_buckets=num_buckets, max_distance=max_distance)
    assert table.shape == (T, T) and table.dtype == torch.int64
    assert int(table.min()) >= 0 and int(table.max()) < num_buckets
    for n in range(-(T - 1), T):
        want = _bucket_float64(n, num_buckets, max_distance)
        i, j = (n, 0) if n >= 0 else (0, -n)
        if want is not None:  # None: float rounding decides, nothing to compare
            assert int(table[i, j]) == want, f"T={T} buckets={num_buckets} max_distance={max_distance} n={n}"
    # a bucket depends on i - j only (Toeplitz)
    assert torch.equal(table[1:, 1:], table[:-1, :-1])


@pytest.mark.parametrize("packed", [False, True], ids=["qkv", "packed"])
@pytest.mark.parametrize("op", ["temporal_attention", "spatial_attention"])
@pytest.mark.parametrize("backend", fuzz_backends("temporal_attention"))
def test_empty_batch_backward(backend, op, packed):
    # B = 0 with out.sum().backward(): autograd hands the backward a stride-0 empty gradient, which contiguous()
    # leaves as it is; the backward used to raise "grad_out needs stride(-1) == 1".
    device = device_of(backend)
    _dtypes(op, backend)  # skips, with the reasons, where the backend cannot run here
    qkv = torch.randn(0, 3, 2, 3, 2, 8, device=device).requires_grad_(True)
    fn = {
        ("temporal_attention", False): temporal_attention, ("temporal_attention", True): temporal_attention_qkvpacked,
        ("spatial_attention", False): spatial_attention, ("spatial_attention", True): spatial_attention_qkvpacked,
    }  # fmt: skip
    with running_on(op, backend, q=qkv[:, :, :, 0]):
        args = (qkv,) if packed else qkv.unbind(3)
        out = fn[(op, packed)](*args, backend=op_backend(backend))
        out.sum().backward()
    assert out.shape == (0, 3, 2, 2, 8) and qkv.grad.shape == qkv.shape
