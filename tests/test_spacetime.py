"""Factorized space-time attention: every backend vs the float64 reference, forward and every gradient.

Odd sizes (T = 1, 7; S = 1, 5, 37, 70 across query and key blocks; D = 40, 72, 88), every option combination,
strided q/k/v sliced out of one fused qkv tensor, a 70,000-problem temporal batch, the spatial Triton grid above
65,535 problems, determinism, gradcheck, opcheck, compile, bad input.
"""

import itertools
import warnings

import pytest
import torch

import torchnova
from torchnova.spacetime import triton_kernels
from torchnova.spacetime.reference import spatial_attention_ref, temporal_attention_ref
from utils import (
    assert_close, assert_within_low_precision_error, backend_device_params, gpu_meaningful, needs_cpp,
    skip_unless_runs,
)  # fmt: skip

TEMPORAL_SHAPES = [(1, 1, 1, 1, 8), (2, 7, 5, 3, 40), (1, 5, 3, 2, 72), (2, 3, 2, 1, 88)]  # (B, T, S, H, D)
SPATIAL_SHAPES = [(1, 1, 1, 1, 8), (2, 2, 5, 3, 40), (1, 1, 70, 2, 72), (1, 2, 3, 1, 88)]
OPTIONS = list(itertools.product([False, True], [False, True], [False, True]))  # (bias, segments, causal)


def fused_qkv(shape, dtype, device="cpu", requires_grad=True):
    """q, k, v as strided views of one (B, T, S, 3, H, D) projection, as a model produces them."""
    B, T, S, H, D = shape
    qkv = torch.randn(B, T, S, 3, H, D, dtype=dtype, device=device)
    if requires_grad:
        qkv.requires_grad_(True)
    return qkv, qkv.unbind(dim=3)


def segments_for(B, T):
    """Video frames share id 0, then every appended image has its own id (VDM joint training)."""
    video = max(1, T - 2)
    ids = [0] * video + list(range(1, T - video + 1))
    return torch.tensor([ids, list(range(T))][:B] if B <= 2 else [ids] * B, dtype=torch.int64)


def spatial_gradient_terms(q64, k64, v64, scale, seed=1):
    """Sizes of the terms that dq and dk sum (max over elements of scale · sum_j P_ij (|dP_ij| + |delta_i|) |k_j|,
    and the same over queries for dk), for ``grads``' upstream gradient. dS = P (dP - delta) is a cancellation:
    with one key (S = 1), or equal keys, dq is exactly 0 from terms of size |dO||v||k|, and an fp32 kernel can
    only resolve it to eps times that size, whatever the reference's own magnitude (0)."""
    to = lambda x: x.detach().double().cpu().permute(0, 1, 3, 2, 4)  # noqa: E731  (B, T, H, S, D)
    q, k, v = to(q64), to(k64), to(v64)
    generator = torch.Generator(device=q64.device).manual_seed(seed)  # as grads(), on the same device
    grad_out = torch.randn(q64.shape, generator=generator, dtype=torch.float64, device=q64.device).cpu()
    d_o = grad_out.permute(0, 1, 3, 2, 4)
    probs = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)
    out = probs @ v
    sizes = probs * ((d_o @ v.transpose(-1, -2)).abs() + (d_o * out).sum(-1, keepdim=True).abs())
    dq = (scale * sizes @ k.abs()).max().item() if sizes.numel() else 0.0
    dk = (scale * sizes.transpose(-1, -2) @ q.abs()).max().item() if sizes.numel() else 0.0
    return {"dq": dq, "dk": dk}


def grads(out, inputs, seed=1):
    generator = torch.Generator(device=out.device).manual_seed(seed)
    # Drawn in float64, then cast: the same upstream gradient for a kernel and for its float64 reference.
    grad_out = torch.randn(out.shape, generator=generator, dtype=torch.float64, device=out.device).to(out.dtype)
    return torch.autograd.grad(out, inputs, grad_out)


@pytest.mark.parametrize("backend, device", backend_device_params("temporal_attention"))
@pytest.mark.parametrize("shape", TEMPORAL_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("use_bias, use_segments, causal", OPTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_temporal_matches_reference(backend, device, shape, use_bias, use_segments, causal, dtype, monkeypatch):
    if backend == "triton" and device == "cpu" and (shape != TEMPORAL_SHAPES[1] or dtype != torch.float32):
        pytest.skip("the Triton interpreter is slow: every option on one odd shape in fp32 (fp16: its own test)")
    monkeypatch.setattr(triton_kernels, "BLOCK_P", 4)  # several programs per head even on small inputs
    B, T, S, H, D = shape
    qkv, (q, k, v) = fused_qkv(shape, dtype, device)
    skip_unless_runs("temporal_attention", backend, q=q, k=k, v=v)
    bias = torch.randn(H, T, T, dtype=dtype, device=device, requires_grad=True) if use_bias else None
    segments = segments_for(B, T).to(device) if use_segments else None
    out = torchnova.temporal_attention(q, k, v, bias=bias, segment_ids=segments, causal=causal, backend=backend)

    q64, k64, v64 = (x.detach().double().requires_grad_(True) for x in (q, k, v))
    bias64 = bias.detach().double().requires_grad_(True) if use_bias else None
    expected = temporal_attention_ref(q64, k64, v64, bias=bias64, segment_ids=segments, causal=causal)
    assert out.dtype == dtype and out.shape == q.shape
    assert_close(out, expected, dtype, "fwd", "out")
    inputs, inputs64 = [q, k, v], [q64, k64, v64]
    if use_bias:
        inputs.append(bias)
        inputs64.append(bias64)
    for name, got, want in zip(["dq", "dk", "dv", "dbias"], grads(out, inputs), grads(expected, inputs64)):
        assert_close(got, want, dtype, "grad", name)


@needs_cpp
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "contiguous"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpp_temporal_staged_and_in_place_rows(fused, dtype):
    """The CPU temporal kernels read float32/float64 frames in place, except where the frame stride is a multiple
    of 2 KiB (L1 set aliasing: staged copies instead). S * H * D = 512 makes every stride here such a multiple
    (fused: 3 * 512 elements; contiguous q, k, v and dO: 512), so this runs the staged path that the shapes of
    test_temporal_matches_reference (in place) do not; every option on, against the float64 reference."""
    B, T, S, H, D = 2, 5, 2, 8, 32
    if fused:
        qkv, (q, k, v) = fused_qkv((B, T, S, H, D), dtype)
    else:
        q, k, v = (torch.randn(B, T, S, H, D, dtype=dtype, requires_grad=True) for _ in range(3))
    bias = torch.randn(H, T, T, dtype=dtype, requires_grad=True)
    segments = segments_for(B, T)
    out = torchnova.temporal_attention(q, k, v, bias=bias, segment_ids=segments, causal=True, backend="cpp")
    inputs64 = [x.detach().double().requires_grad_(True) for x in (q, k, v, bias)]
    expected = temporal_attention_ref(*inputs64[:3], bias=inputs64[3], segment_ids=segments, causal=True)
    assert_close(out, expected, dtype, "fwd", "out")
    for name, got, want in zip(["dq", "dk", "dv", "dbias"], grads(out, [q, k, v, bias]), grads(expected, inputs64)):
        assert_close(got, want, dtype, "grad", name)


@pytest.mark.parametrize("backend, device", backend_device_params("spatial_attention"))
@pytest.mark.parametrize("shape", SPATIAL_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_spatial_matches_reference(backend, device, shape, dtype):
    qkv, (q, k, v) = fused_qkv(shape, dtype, device)
    skip_unless_runs("spatial_attention", backend, q=q, k=k, v=v)
    out = torchnova.spatial_attention(q, k, v, scale=0.3, backend=backend)
    q64, k64, v64 = (x.detach().double().requires_grad_(True) for x in (q, k, v))
    expected = spatial_attention_ref(q64, k64, v64, scale=0.3)
    assert_close(out, expected, dtype, "fwd", "out")
    terms = spatial_gradient_terms(q64, k64, v64, 0.3)
    for name, got, want in zip(["dq", "dk", "dv"], grads(out, [q, k, v]), grads(expected, [q64, k64, v64])):
        assert_close(got, want, dtype, "grad", name, terms=terms.get(name))


# Triton spatial: S = 1, 5, 37 (three query and three key blocks of 16), T = 1, D = 40, 72 (padded to 64, 128).
TRITON_SPATIAL_SHAPES = [(1, 1, 1, 1, 16), (2, 1, 5, 3, 40), (1, 2, 37, 2, 72)]
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# bf16 tl.dot is wrong in the Triton interpreter: bf16 runs on a GPU only.
TRITON_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if TRITON_DEVICE == "cuda" else [])


@pytest.fixture
def small_spatial_blocks(monkeypatch):
    """16 x 16 tiles: several query and key blocks per problem even on tiny (fast in the interpreter) inputs."""
    monkeypatch.setattr(triton_kernels, "SPATIAL_MAX_BLOCK", 16)


def spatial_triton_inputs(shape, dtype, requires_grad=True):
    qkv, (q, k, v) = fused_qkv(shape, dtype, TRITON_DEVICE, requires_grad)
    skip_unless_runs("spatial_attention", "triton", q=q, k=k, v=v)
    return qkv, (q, k, v)


def check_spatial_against_reference(q, k, v, dtype, scale=0.3):
    out = torchnova.spatial_attention(q, k, v, scale=scale, backend="triton")
    q64, k64, v64 = (x.detach().double().requires_grad_(True) for x in (q, k, v))
    expected = spatial_attention_ref(q64, k64, v64, scale=scale)
    assert out.dtype == dtype and out.shape == q.shape
    assert_close(out, expected, dtype, "fwd", "out")
    terms = spatial_gradient_terms(q64, k64, v64, scale)
    for name, got, want in zip(["dq", "dk", "dv"], grads(out, [q, k, v]), grads(expected, [q64, k64, v64])):
        assert_close(got, want, dtype, "grad", name, terms=terms.get(name))


@pytest.mark.parametrize("shape", TRITON_SPATIAL_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
def test_triton_spatial_matches_reference(shape, dtype, small_spatial_blocks):
    qkv, (q, k, v) = spatial_triton_inputs(shape, dtype)
    check_spatial_against_reference(q, k, v, dtype)


def test_triton_spatial_lse_is_logsumexp_of_the_scores(small_spatial_blocks):
    qkv, (q, k, v) = spatial_triton_inputs((1, 2, 37, 2, 40), torch.float32, requires_grad=False)
    out, lse = torch.ops.torchnova.spatial_attention_fwd_triton(q, k, v, 0.3)
    scores = torch.einsum("btihd,btjhd->btihj", q.double(), k.double()) * 0.3  # (B, T, S query, H, S key)
    assert out.is_contiguous() and lse.dtype == torch.float32 and lse.shape == q.shape[:4]
    assert_close(lse, scores.logsumexp(dim=-1), torch.float32, "fwd", "lse")


@gpu_meaningful
def test_triton_spatial_backward_is_bit_identical_across_runs(small_spatial_blocks):
    qkv, (q, k, v) = spatial_triton_inputs((1, 1, 37, 2, 40), torch.float32)
    results = [grads(torchnova.spatial_attention(q, k, v, backend="triton"), [q, k, v]) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_triton_spatial_padding_never_overflows(small_spatial_blocks):
    """Scores near -1600 (lse very negative): a padded (zero) key would score 0 and exp(0 - lse) overflow, so the
    kernels mask before exponentiating; in the interpreter an overflow shows as a numpy RuntimeWarning."""
    shape = (1, 1, 37, 1, 16)
    q = torch.full(shape, 10.0, device=TRITON_DEVICE, requires_grad=True)
    k = torch.full(shape, -10.0, device=TRITON_DEVICE, requires_grad=True)
    v = torch.randn(shape, device=TRITON_DEVICE, requires_grad=True)
    skip_unless_runs("spatial_attention", "triton", q=q, k=k, v=v)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        check_spatial_against_reference(q, k, v, torch.float32, scale=1.0)


@pytest.mark.parametrize(
    "blocks, problems",
    [(1, 1), (256, 65_535), (1, 65_536), (256, 131_072), (65_535, 4_000_000), (2**20, 64), (1, 2**31 - 1)],
)
def test_spatial_grid_never_puts_more_than_65535_on_axis_1(blocks, problems):
    grid, problems_on_axis0 = triton_kernels.spatial_grid(blocks, problems)
    assert len(grid) == 2 and grid[1] <= 65_535 and grid[0] <= 2**31 - 1
    assert grid == ((problems, blocks) if problems_on_axis0 else (blocks, problems))
    assert problems_on_axis0 == (problems > 65_535)


def test_spatial_grid_that_cannot_fit_raises():
    with pytest.raises(ValueError, match="do not fit a CUDA grid"):
        triton_kernels.spatial_grid(65_536, 65_536)


def test_triton_spatial_folded_grid(small_spatial_blocks, monkeypatch):
    """The problems-on-axis-0 path, on 6 problems with the axis-1 limit lowered to 4 (65,536 real problems would
    take minutes in the interpreter; the real size runs on a GPU below)."""
    monkeypatch.setattr(triton_kernels, "MAX_GRID_YZ", 4)
    assert triton_kernels.spatial_grid(2, 6) == ((6, 2), True)
    qkv, (q, k, v) = spatial_triton_inputs((2, 3, 20, 1, 16), torch.float32)
    check_spatial_against_reference(q, k, v, torch.float32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="65,536+ programs take minutes in the interpreter")
def test_triton_spatial_more_than_65535_problems():
    qkv, (q, k, v) = spatial_triton_inputs((7, 10, 3, 1_000, 16), torch.float32)  # B·T·H = 70,000
    check_spatial_against_reference(q, k, v, torch.float32)


def test_triton_spatial_head_dim_above_the_limit_names_the_reason():
    q = torch.randn(1, 1, 2, 1, triton_kernels.MAX_HEAD_DIM + 1, device=TRITON_DEVICE)
    with pytest.raises(ValueError, match=r"`triton` is not supported because:(.|\n)*head dim D=257 > 256"):
        torchnova.spatial_attention(q, q, q, backend="triton")


@pytest.mark.skipif(TRITON_DEVICE == "cuda", reason="the Triton interpreter's limitation (CPU tensors only)")
def test_triton_refuses_bf16_in_the_interpreter():
    """bf16 tl.dot is wrong in the interpreter: forced triton raises with the reason, auto takes another backend."""
    q = torch.randn(1, 1, 5, 1, 16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="bfloat16 tl.dot is wrong in the Triton interpreter|needs TRITON_INTERPRET"):
        torchnova.spatial_attention(q, q, q, backend="triton")
    out = torchnova.spatial_attention(q, q, q)
    assert_close(out, spatial_attention_ref(q.double(), q.double(), q.double()), torch.bfloat16, "fwd", "out")


def test_opcheck_triton_spatial_ops():
    qkv, (q, k, v) = spatial_triton_inputs((1, 2, 3, 2, 16), torch.float32, requires_grad=False)
    ops = torch.ops.torchnova
    torch.library.opcheck(ops.spatial_attention_fwd_triton.default, (q.clone().requires_grad_(True), k, v, 0.5))
    out, lse = ops.spatial_attention_fwd_triton(q, k, v, 0.5)
    args = (torch.randn_like(out), q, k, v, out, lse, 0.5)
    torch.library.opcheck(ops.spatial_attention_bwd_triton.default, args)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@needs_cpp
def test_cpp_half_precision_upcasts_inside(dtype):
    """fp16/bf16 on the cpp backend: fp32 math inside, error within the low-precision reference's own error."""
    qkv, (q, k, v) = fused_qkv((2, 5, 3, 2, 40), dtype)
    bias = torch.randn(2, 5, 5)
    out = torchnova.temporal_attention(q, k, v, bias=bias, causal=True, backend="cpp")
    low = temporal_attention_ref(q, k, v, bias=bias, causal=True)  # same inputs, reference in the same dtype
    exact = temporal_attention_ref(q.double(), k.double(), v.double(), bias=bias.double(), causal=True)
    assert out.dtype == dtype
    assert_within_low_precision_error(out, low, exact, dtype, "cpp out")


@pytest.mark.parametrize("device", ["cuda"] if torch.cuda.is_available() else ["cpu"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_half_precision(device, dtype):
    """fp16/bf16 Triton (tensor-core dots, fp32 accumulation): within 2x of the same-dtype reference's error."""
    qkv, (q, k, v) = fused_qkv((1, 5, 3, 2, 40), dtype, device, requires_grad=False)
    skip_unless_runs("temporal_attention", "triton", q=q, k=k, v=v)
    if device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("bf16 tl.dot is wrong in the Triton interpreter: bf16 runs on a GPU only")
    bias = torch.randn(2, 5, 5, device=device)
    segments = torch.tensor([[0, 0, 0, 1, 2]], device=device)
    out = torchnova.temporal_attention(q, k, v, bias=bias, segment_ids=segments, backend="triton")
    low = temporal_attention_ref(q, k, v, bias=bias, segment_ids=segments)
    exact = temporal_attention_ref(q.double(), k.double(), v.double(), bias=bias.double(), segment_ids=segments)
    assert out.dtype == dtype
    assert_within_low_precision_error(out, low, exact, dtype, "triton out")


def test_opcheck_triton_ops():
    qkv, (q, k, v) = fused_qkv((1, 3, 2, 2, 16), torch.float32, requires_grad=False)
    skip_unless_runs("temporal_attention", "triton", q=q, k=k, v=v)
    ops = torch.ops.torchnova
    bias, segments = torch.randn(2, 3, 3), torch.tensor([[0, 0, 1]])
    torch.library.opcheck(ops.temporal_attention_fwd_triton.default, (q.clone().requires_grad_(True), k, v, bias,
                                                                      segments, True, 0.5))  # fmt: skip
    out, lse = ops.temporal_attention_fwd_triton(q, k, v, bias, segments, True, 0.5)
    args = (torch.randn_like(out), q, k, v, out, lse, bias, segments, True, 0.5, True, True)
    torch.library.opcheck(ops.temporal_attention_bwd_triton.default, args)


@pytest.mark.parametrize("backend, device", backend_device_params("temporal_attention"))
def test_more_than_65535_temporal_problems(backend, device):
    """B·S·H = 70,000 problems in one launch (SDPA's flash/efficient kernels fail above 65,535): forward and every
    gradient, on every backend (Triton on a GPU only: 70,000 problems take minutes in the interpreter)."""
    if backend == "triton" and device == "cpu":
        pytest.skip("70,000 problems take minutes in the Triton interpreter: runs on a GPU")
    shape = (1, 3, 35_000, 2, 8)
    qkv, (q, k, v) = fused_qkv(shape, torch.float32, device)
    skip_unless_runs("temporal_attention", backend, q=q, k=k, v=v)
    bias = torch.randn(2, 3, 3, device=device, requires_grad=True)
    segments = torch.tensor([[0, 0, 1]], device=device)
    out = torchnova.temporal_attention(q, k, v, bias=bias, segment_ids=segments, backend=backend)
    q64, k64, v64, bias64 = (x.detach().double().requires_grad_(True) for x in (q, k, v, bias))
    expected = temporal_attention_ref(q64, k64, v64, bias=bias64, segment_ids=segments)
    assert_close(out, expected, torch.float32, "fwd", "out")
    got, want = grads(out, [q, k, v, bias]), grads(expected, [q64, k64, v64, bias64])
    for name, g, w in zip(["dq", "dk", "dv", "dbias"], got, want):
        assert_close(g, w, torch.float32, "grad", name)


@needs_cpp
def test_bias_gradient_is_bit_identical_across_runs():
    qkv, (q, k, v) = fused_qkv((2, 6, 300, 2, 16), torch.float32)
    bias = torch.randn(2, 6, 6, requires_grad=True)
    results = []
    for _ in range(2):
        out = torchnova.temporal_attention(q, k, v, bias=bias, causal=True, backend="cpp")
        results.append(grads(out, [bias, q]))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@needs_cpp
def test_gradcheck_cpp_float64():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 3, 2, 5, dtype=torch.float64, requires_grad=True) for _ in range(3))
    bias = torch.randn(2, 4, 4, dtype=torch.float64, requires_grad=True)
    segments = torch.tensor([[0, 0, 1, 2], [0, 1, 1, 1]])

    def temporal(q, k, v, bias):
        return torchnova.temporal_attention(q, k, v, bias=bias, segment_ids=segments, causal=True, backend="cpp")

    assert torch.autograd.gradcheck(temporal, (q, k, v, bias))
    assert torch.autograd.gradcheck(lambda q, k, v: torchnova.spatial_attention(q, k, v, backend="cpp"), (q, k, v))


@needs_cpp
def test_opcheck_every_op():
    qkv, (q, k, v) = fused_qkv((2, 4, 3, 2, 8), torch.float32, requires_grad=False)
    bias = torch.randn(2, 4, 4)
    segments = torch.tensor([[0, 0, 1, 2], [0, 1, 1, 1]])
    ops = torch.ops.torchnova
    for b, s, causal in [(bias, segments, True), (None, None, False)]:
        # Differentiable inputs exercise the registered autograd formula; the backward ops get plain tensors.
        q_grad, b_grad = q.clone().requires_grad_(True), b.clone().requires_grad_(True) if b is not None else None
        torch.library.opcheck(ops.temporal_attention_fwd.default, (q_grad, k, v, b_grad, s, causal, 0.5))
        out, lse = ops.temporal_attention_fwd(q, k, v, b, s, causal, 0.5)
        grad_out = torch.randn_like(out)
        args = (grad_out, q, k, v, out, lse, b, s, causal, 0.5, b is not None, True)
        torch.library.opcheck(ops.temporal_attention_bwd.default, args)
    torch.library.opcheck(ops.spatial_attention_fwd.default, (q.clone().requires_grad_(True), k, v, 0.5))
    out, lse = ops.spatial_attention_fwd(q, k, v, 0.5)
    torch.library.opcheck(ops.spatial_attention_bwd.default, (torch.randn_like(out), q, k, v, out, lse, 0.5))


@needs_cpp
def test_compiles_fullgraph_without_recompiles():
    qkv, (q, k, v) = fused_qkv((1, 4, 3, 2, 8), torch.float32)
    bias = torch.randn(2, 4, 4, requires_grad=True)

    def block(q, k, v, bias):  # the sliced and the packed forms of both ops in one graph
        x = torchnova.spatial_attention(q, k, v, backend="cpp")
        y = torchnova.temporal_attention(x, k, v, bias=bias, causal=True, backend="cpp")
        packed = torch.stack([y, k, v], dim=3)
        z = torchnova.spatial_attention_qkvpacked(packed, backend="cpp")
        return torchnova.temporal_attention_qkvpacked(torch.stack([z, k, v], dim=3), bias=bias, backend="cpp").sum()

    torch.compiler.reset()
    compiled = torch.compile(block, fullgraph=True)
    with torch._dynamo.config.patch(recompile_limit=1, error_on_recompile=True):
        loss = compiled(q, k, v, bias)
        loss.backward()
        loss_again = compiled(q, k, v, bias)
    torch.testing.assert_close(loss, block(q, k, v, bias))
    torch.testing.assert_close(loss_again, loss)
    assert bias.grad is not None and qkv.grad is not None


def test_triton_spatial_compiles_fullgraph_without_recompiles():
    qkv, (q, k, v) = spatial_triton_inputs((1, 2, 5, 2, 16), torch.float32)

    def layer(q, k, v):
        return torchnova.spatial_attention(q, k, v, backend="triton").square().sum()

    torch.compiler.reset()
    compiled = torch.compile(layer, fullgraph=True)
    with torch._dynamo.config.patch(recompile_limit=1, error_on_recompile=True):
        loss = compiled(q, k, v)
        (grad,) = torch.autograd.grad(loss, qkv)
        loss_again = compiled(q, k, v)
    expected = layer(q, k, v)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(loss_again, loss)
    torch.testing.assert_close(grad, torch.autograd.grad(expected, qkv)[0])


def test_relative_position_buckets_t5():
    buckets = torchnova.relative_position_buckets(17)
    # Keys before the query (n = i - j > 0): exact below 8, then log-spaced (PAPERS.md's LUT for |n| = 0..16).
    assert buckets[16].flip(0).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12]
    # Keys after the query use the upper half of the buckets: 16 + the same ladder (bucket 16 itself unused).
    assert buckets[0, 1:].tolist() == [17, 18, 19, 20, 21, 22, 23, 24, 24, 25, 25, 26, 26, 27, 27, 28]
    far = torchnova.relative_position_buckets(64)
    assert far[63, 0] == 15 and far[0, 63] == 31  # clipped at each half's last bucket
    assert torchnova.relative_position_buckets(1).tolist() == [[0]]
    with pytest.raises(ValueError, match="T must be an int >= 1"):
        torchnova.relative_position_buckets(0)


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda q: dict(q=q[0]), ValueError, r"q must have shape \(B, T, S, H, D\) \(5 dims\)"),
        (lambda q: dict(k=q[..., :4]), ValueError, "k must have q's shape"),
        (lambda q: dict(v=q.double()), TypeError, "v must have q's dtype"),
        (lambda q: dict(q=q.int(), k=q.int(), v=q.int()), TypeError, "q must be a floating-point tensor"),
        (lambda q: dict(bias=torch.randn(2, 4, 3)), ValueError, r"bias must have shape \(H, T, T\) = \(2, 4, 4\)"),
        (lambda q: dict(segment_ids=torch.zeros(2, 4)), TypeError, "segment_ids must be an integer tensor"),
        (lambda q: dict(segment_ids=torch.zeros(2, 3, dtype=torch.long)), ValueError, r"segment_ids must have shape"),
        (lambda q: dict(causal=1), TypeError, "causal must be a bool"),
        (lambda q: dict(scale=-1.0), ValueError, "scale must be a finite number > 0"),
        (lambda q: dict(backend="gpu"), ValueError, "backend must be one of"),
        (lambda q: dict(backend="cuda"), ValueError, r"`cuda` is not supported because:(.|\n)*device=cpu"),
    ],
)
def test_bad_input_names_the_argument(make, error, match):
    q = torch.randn(2, 4, 3, 2, 8)
    kwargs = dict(q=q, k=q.clone(), v=q.clone())
    kwargs.update(make(q))
    with pytest.raises(error, match=match):
        torchnova.temporal_attention(kwargs.pop("q"), kwargs.pop("k"), kwargs.pop("v"), **kwargs)


def test_forced_backend_that_cannot_run_lists_reasons():
    q = torch.empty(1, 2, 3, 1, 4, device="meta")
    with pytest.raises(ValueError, match=r"backend='cpp' cannot run these inputs(.|\n)*device=meta"):
        torchnova.spatial_attention(q, q, q, backend="cpp")
    with pytest.raises(ValueError, match="k must be on q's device"):
        torchnova.spatial_attention(torch.randn(1, 2, 3, 1, 4), q, q)
