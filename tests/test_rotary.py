"""Rotary position embedding in the temporal ops (``rotary=(cos, sin)``, ``rotary_interleaved``): every backend
against the float64 reference (forward, dq/dk/dv or dqkv, dbias) over both pair layouts, partial rot_dim, odd T
and D, strided and packed inputs, bias/segments/causal; the CUDA kernels (run on the CPU by the emulation layer)
at their edge cases (T 1/17/97, rotated chunks with ragged tails, fp16/bf16 odd D) and bit-identical reruns; the
reference against rotary-embedding-torch's own rotation; gradcheck (cpp, float64); opcheck of the four rotary
ops; the backend reasons and bad input."""

import inspect
import itertools
import math

import pytest
import torch

import torchnova
from torchnova import _backend, _ext, testing
from torchnova.spacetime import triton_kernels
from torchnova.spacetime.reference import apply_rotary_ref, temporal_attention_ref
from utils import assert_close, backend_device_params, segments_for, skip_unless_runs, upstream

OPTIONS = list(itertools.product([False, True], [False, True], [False, True]))  # (bias, segments, causal)
# (B, T, S, H, D, rot_dim): full rotation, partial, odd T and D, a single frame, rot_dim 2
SHAPES = [(2, 7, 3, 2, 40, 32), (1, 5, 4, 3, 13, 8), (1, 1, 2, 1, 6, 6), (2, 16, 2, 2, 33, 2)]


def tables(T, rot_dim, dtype=torch.float64, device="cpu", random=False):
    """(cos, sin) (T, rot_dim): rotary-embedding-torch's angles, or arbitrary values (the op must be exact for any
    table, including pairs whose two entries differ)."""
    if random:
        return tuple(torch.randn(T, rot_dim, dtype=dtype, device=device) for _ in range(2))
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim))
    angles = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq[None, :]
    angles = angles.repeat_interleave(2, -1)
    return angles.cos().to(dtype).to(device), angles.sin().to(dtype).to(device)


def test_reference_rotation_matches_rotary_embedding_torch():
    """The reference's interleaved rotation is rotary-embedding-torch's (when installed), the half-split one
    HF's rotate_half formula; both are exact rotations (norm-preserving pairs)."""
    x = torch.randn(2, 6, 3, 2, 12, dtype=torch.float64)
    cos, sin = tables(6, 8)
    try:
        from rotary_embedding_torch import RotaryEmbedding
    except ImportError:
        RotaryEmbedding = None
    if RotaryEmbedding is not None:
        rot = RotaryEmbedding(8).double()
        theirs = rot.rotate_queries_or_keys(x.permute(0, 2, 3, 1, 4))  # (..., T, D)
        freqs = rot(rot.get_seq_pos(6, dtype=torch.float64), seq_len=6)  # their angles (inv_freq made in fp32)
        assert_close(freqs.cos(), cos, torch.float32, "fwd", "tables")
        ours = apply_rotary_ref(x, freqs.cos(), freqs.sin(), True)
        assert_close(ours, theirs.permute(0, 3, 1, 2, 4), torch.float64, "fwd", "vs rotary-embedding-torch")
    half = torch.cat([cos[:, 0::2], cos[:, 0::2]], -1), torch.cat([sin[:, 0::2], sin[:, 0::2]], -1)
    x1, x2 = x[..., :4], x[..., 4:8]
    c, s = half[0][None, :, None, None, :4], half[1][None, :, None, None, :4]
    expected = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s, x[..., 8:]], -1)
    assert_close(apply_rotary_ref(x, *half, False), expected, torch.float64, "fwd", "half-split")
    for interleaved, tab in ((True, (cos, sin)), (False, half)):
        y = apply_rotary_ref(x, *tab, interleaved)
        assert_close(y.norm(dim=-1), x.norm(dim=-1), torch.float64, "fwd", "norm")


@pytest.mark.parametrize("backend, device", backend_device_params("temporal_attention"))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "half"])
@pytest.mark.parametrize("use_bias, use_segments, causal", OPTIONS)
@pytest.mark.parametrize("packed", [False, True], ids=["sliced", "packed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rotary_matches_reference(backend, device, shape, interleaved, use_bias, use_segments, causal, packed,
                                  dtype, monkeypatch):  # fmt: skip
    if backend == "triton" and device == "cpu" and (
        shape != SHAPES[1]
        or dtype != torch.float32
        or not ((packed and interleaved) or use_bias == use_segments == causal)
    ):
        pytest.skip("the Triton interpreter is slow: one odd shape in fp32, every option on one layout")
    if backend == "cuda" and device == "cpu" and (
        shape not in (SHAPES[0], SHAPES[1]) or not ((packed == interleaved) or use_bias == use_segments == causal)
    ):
        pytest.skip("the CUDA emulation is slow: two odd shapes, every option on the packed/interleaved pairs "
                    "(test_rotary_cuda_kernels covers the kernels' edge cases)")
    if backend == "reference" and (use_bias or use_segments or causal or packed):
        pytest.skip("the reference against itself: one option set is enough")
    monkeypatch.setattr(triton_kernels, "BLOCK_P", 4)
    B, T, S, H, D, rot_dim = shape
    # qkv as slices of one fused projection (strided views) in both forms; the sliced form reads them as
    # three strided tensors, the packed one as the (B, T, S, 3, H, D) tensor
    qkv = torch.randn(B, T, S, 3, H, D, dtype=dtype, device=device, requires_grad=True)
    cos, sin = tables(T, rot_dim, dtype, device, random=use_bias)  # random tables on half the cases
    skip_unless_runs("temporal_attention", backend, q=qkv[:, :, :, 0], rotary_cos=cos, rotary_sin=sin)
    bias = torch.randn(H, T, T, dtype=dtype, device=device, requires_grad=True) if use_bias else None
    segments = segments_for(B, T).to(device) if use_segments else None
    kwargs = dict(bias=bias, segment_ids=segments, causal=causal, rotary=(cos, sin), rotary_interleaved=interleaved)
    if packed:
        out = torchnova.temporal_attention_qkvpacked(qkv, **kwargs, backend=backend)
    else:
        out = torchnova.temporal_attention(*qkv.unbind(3), **kwargs, backend=backend)

    qkv64 = qkv.detach().double().requires_grad_(True)
    bias64 = bias.detach().double().requires_grad_(True) if use_bias else None
    expected = temporal_attention_ref(
        *qkv64.unbind(3), bias=bias64, segment_ids=segments, causal=causal, rotary=(cos.double(), sin.double()),
        rotary_interleaved=interleaved,
    )  # fmt: skip
    assert_close(out, expected, dtype, "fwd", "out")
    inputs, inputs64 = ([qkv, bias], [qkv64, bias64]) if use_bias else ([qkv], [qkv64])
    got = torch.autograd.grad(out, inputs, upstream(out))
    want = torch.autograd.grad(expected, inputs64, upstream(expected))
    for name, g, w in zip(["dqkv", "dbias"], got, want):
        assert_close(g, w, dtype, "grad", name)


def test_rotary_changes_the_result_and_rot_dim_matters():
    """A test that cannot fail is a defect: the rotation is really applied, on the first rot_dim dims only."""
    qkv = torch.randn(1, 6, 2, 3, 1, 8)
    plain = torchnova.temporal_attention_qkvpacked(qkv, backend="cpp")
    rotated = torchnova.temporal_attention_qkvpacked(qkv, rotary=tables(6, 8, torch.float32), backend="cpp")
    partial = torchnova.temporal_attention_qkvpacked(qkv, rotary=tables(6, 4, torch.float32), backend="cpp")
    assert (plain - rotated).abs().max() > 1e-3 and (rotated - partial).abs().max() > 1e-3
    # identity tables (cos 1, sin 0) change nothing
    same = torchnova.temporal_attention_qkvpacked(qkv, rotary=(torch.ones(6, 8), torch.zeros(6, 8)), backend="cpp")
    assert torch.allclose(same, plain, atol=1e-6)


def test_interleaved_and_half_split_differ():
    qkv = torch.randn(1, 6, 2, 3, 1, 8, dtype=torch.float64)
    cos, sin = tables(6, 8)
    a = torchnova.temporal_attention_qkvpacked(qkv, rotary=(cos, sin), rotary_interleaved=True, backend="cpp")
    b = torchnova.temporal_attention_qkvpacked(qkv, rotary=(cos, sin), rotary_interleaved=False, backend="cpp")
    assert (a - b).abs().max() > 1e-3


def test_rotary_scores_depend_on_relative_position_only():
    """RoPE's defining property, through the kernels: shifting every frame's q and k by the same offset (the tables
    rolled by one frame, same content) leaves the scores, hence out, unchanged when q, k, v are constant over time."""
    B, T, S, H, D = 1, 6, 1, 1, 8
    q, k, v = (torch.randn(1, 1, 1, 1, D, dtype=torch.float64).expand(B, T, S, H, D).contiguous() for _ in range(3))
    v = torch.randn(B, T, S, H, D, dtype=torch.float64)
    cos, sin = tables(T + 1, D)
    a = torchnova.temporal_attention(q, k, v, rotary=(cos[:T], sin[:T]), rotary_interleaved=True, backend="cpp")
    b = torchnova.temporal_attention(q, k, v, rotary=(cos[1:], sin[1:]), rotary_interleaved=True, backend="cpp")
    assert_close(a, b, torch.float64, "fwd", "shifted positions")


def test_gradcheck_cpp_rotary_float64():
    qkv = torch.randn(2, 4, 3, 3, 2, 5, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(2, 4, 4, dtype=torch.float64, requires_grad=True)
    segments = torch.tensor([[0, 0, 1, 2], [0, 1, 1, 1]])
    cos, sin = tables(4, 4, random=True)
    for interleaved in (True, False):

        def packed(qkv, bias):
            return torchnova.temporal_attention_qkvpacked(
                qkv, bias=bias, segment_ids=segments, causal=True, rotary=(cos, sin), rotary_interleaved=interleaved,
                backend="cpp",
            )  # fmt: skip

        def sliced(q, k, v):
            rotary = dict(rotary=(cos, sin), rotary_interleaved=interleaved)
            return torchnova.temporal_attention(q, k, v, **rotary, backend="cpp")

        assert torch.autograd.gradcheck(packed, (qkv, bias))
        assert torch.autograd.gradcheck(sliced, tuple(x.detach().clone().requires_grad_(True) for x in qkv.unbind(3)))


def _opcheck_rotary(suffix, qkv, bias, segments, cos, sin):
    ops = torch.ops.torchnova
    q, k, v = qkv.unbind(3)
    fwd = getattr(ops, f"temporal_attention_rotary_fwd{suffix}")
    bwd = getattr(ops, f"temporal_attention_rotary_bwd{suffix}")
    b_grad = bias.clone().requires_grad_(True)
    qkv_grad = (x.clone().requires_grad_(True) for x in (q, k, v))
    torch.library.opcheck(fwd.default, (*qkv_grad, b_grad, segments, True, 0.5, cos, sin, True))
    out, lse = fwd(q, k, v, bias, segments, True, 0.5, cos, sin, True)
    args = (torch.randn_like(out), q, k, v, out, lse, bias, segments, True, 0.5, cos, sin, True, True, True)
    torch.library.opcheck(bwd.default, args)
    fwd = getattr(ops, f"temporal_attention_rotary_qkvpacked_fwd{suffix}")
    bwd = getattr(ops, f"temporal_attention_rotary_qkvpacked_bwd{suffix}")
    torch.library.opcheck(fwd.default, (qkv.clone().requires_grad_(True), None, None, False, 0.5, cos, sin, False))
    out, lse = fwd(qkv, bias, None, False, 0.5, cos, sin, False)
    args = (torch.randn_like(out), qkv, out, lse, bias, None, False, 0.5, cos, sin, False, True, True)
    torch.library.opcheck(bwd.default, args)


def test_opcheck_rotary_ops():
    qkv = torch.randn(2, 4, 3, 3, 2, 8)
    cos, sin = tables(4, 6, torch.float32)
    _opcheck_rotary("", qkv, torch.randn(2, 4, 4), torch.tensor([[0, 0, 1, 2], [0, 1, 1, 1]]), cos, sin)


def test_opcheck_rotary_triton_ops():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    qkv = torch.randn(1, 4, 2, 3, 2, 16, device=device)
    skip_unless_runs("temporal_attention", "triton", q=qkv[:, :, :, 0])
    cos, sin = tables(4, 8, torch.float32, device)
    segments = torch.tensor([[0, 0, 1, 2]], device=device)
    _opcheck_rotary("_triton", qkv, torch.randn(2, 4, 4, device=device), segments, cos, sin)


def test_opcheck_rotary_cuda_ops():
    """The CUDA kernels' rotary ops: on a GPU the real ones, here the emulated ones (same schemas) on CPU tensors."""
    if torch.cuda.is_available():
        device, suffix, context = "cuda", "", torch.enable_grad()
        if not _ext.HAS_CUDA_KERNELS:
            pytest.skip("built without CUDA kernels")
    elif _ext.HAS_CUDA_EMULATION:
        device, suffix, context = "cpu", "_cuda_emu", testing.cuda_emulation()
    else:
        pytest.skip(f"no GPU and the CUDA emulation layer is not built: {_ext.CUDA_EMULATION_IMPORT_ERROR}")
    with context:
        qkv = torch.randn(2, 4, 3, 3, 2, 8, device=device)
        segments = torch.tensor([[0, 0, 1, 2], [0, 1, 1, 1]], device=device)
        cos, sin = tables(4, 6, torch.float32, device)
        _opcheck_rotary(suffix, qkv, torch.randn(2, 4, 4, device=device), segments, cos, sin)


def test_tables_that_require_grad_go_to_the_reference():
    """The kernels give the tables no gradient: a learned table (requires_grad) is a reason for every kernel
    backend, so auto picks the reference, which differentiates it; a forced kernel backend raises."""
    qkv = torch.randn(1, 5, 2, 3, 2, 8, dtype=torch.float64, requires_grad=True)
    angles = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    rotary = cos, sin = (angles.cos(), angles.sin())
    for backend in ("cpp", "triton", "cuda"):
        why = _backend.reasons("temporal_attention", backend, q=qkv[:, :, :, 0], rotary_cos=cos, rotary_sin=sin)
        assert any("require grad" in w for w in why) or backend != "cpp", why
    with pytest.raises(ValueError, match="rotary tables require grad"):
        torchnova.temporal_attention_qkvpacked(qkv, rotary=rotary, backend="cpp")
    out = torchnova.temporal_attention_qkvpacked(qkv, rotary=rotary)
    (grad,) = torch.autograd.grad(out.sum(), angles)
    assert grad.abs().max() > 0
    with torch.no_grad():  # no gradient wanted: the kernels run
        assert not _backend.reasons("temporal_attention", "cpp", q=qkv[:, :, :, 0], rotary_cos=cos, rotary_sin=sin)
        torchnova.temporal_attention_qkvpacked(qkv, rotary=rotary, backend="cpp")


def test_cuda_backend_accepts_rotary():
    """The cuda reasons accept rotary inputs (where the kernels run: under the emulation layer here); "auto"
    order is unchanged."""
    q = torch.randn(1, 4, 2, 1, 8)
    cos, sin = tables(4, 8, torch.float32)
    why = _backend.reasons("temporal_attention", "cuda", q=q, rotary_cos=cos, rotary_sin=sin)
    assert not any("rotary" in w for w in why), why
    if not _ext.HAS_CUDA_EMULATION:
        pytest.skip(f"CUDA emulation layer not built: {_ext.CUDA_EMULATION_IMPORT_ERROR}")
    with testing.cuda_emulation():
        assert _backend.reasons("temporal_attention", "cuda", q=q, rotary_cos=cos, rotary_sin=sin) == []
        with torch.enable_grad():
            learned = cos.clone().requires_grad_(True)
            why = _backend.reasons("temporal_attention", "cuda", q=q, rotary_cos=learned, rotary_sin=sin)
            assert any("require grad" in w for w in why), why


# ---------------------------------------------------------------------------------------------------------------
# The CUDA kernels (csrc/cuda/spacetime_temporal.cu), run on the CPU through the emulation layer

needs_emulation = pytest.mark.skipif(
    not _ext.HAS_CUDA_EMULATION, reason=f"CUDA emulation layer not built: {_ext.CUDA_EMULATION_IMPORT_ERROR}"
)

# (B, T, S, H, D, rot_dim, dtype, strided): interleaved chunks of 32 with a rotated tail (40/32, 70/68), half-split
# chunks of 16 pairs with a ragged last one (half 17, 34) and the unrotated dims after them, rot_dim 2 and D,
# T = 1, 17 and 97 frames, unaligned fp16 / bf16 rows (odd D), strided views of one projection.
CUDA_CASES = [
    (1, 1, 3, 1, 6, 6, torch.float32, False),
    (2, 17, 2, 2, 40, 32, torch.float32, True),
    (1, 97, 1, 1, 8, 8, torch.float32, False),
    (1, 9, 2, 1, 70, 68, torch.float32, True),
    (2, 7, 2, 2, 37, 34, torch.float16, True),
    (1, 6, 3, 1, 33, 2, torch.bfloat16, False),
]


@needs_emulation
@pytest.mark.parametrize("case", CUDA_CASES, ids=lambda c: "x".join(map(str, c[:6])) + f"-{str(c[6])[6:]}"
                         + ("-strided" if c[7] else ""))  # fmt: skip
@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "half"])
def test_rotary_cuda_kernels(case, interleaved):
    """backend="cuda" under emulation vs float64: out, dq, dk, dv and dbias, with bias, segments and causal, random
    tables (the two entries of a pair differ: a swapped sin_a / sin_b fails)."""
    B, T, S, H, D, rot_dim, dtype, strided = case
    width = D + 3 if strided else D
    with testing.cuda_emulation():  # allocated inside: reads past the end of any input fault
        qkv = torch.randn(B, T, S, 3, H, width).to(dtype)[..., :D]
        q, k, v = (qkv[:, :, :, i] if strided else qkv[:, :, :, i].clone() for i in range(3))
        q, k, v = (x.detach().requires_grad_(True) for x in (q, k, v))
        cos, sin = tables(T, rot_dim, torch.float32, random=True)
        bias = torch.randn(H, T, T, requires_grad=True)
        segments = segments_for(B, T)
        kwargs = dict(bias=bias, segment_ids=segments, causal=True, rotary=(cos, sin), rotary_interleaved=interleaved)
        out = torchnova.temporal_attention(q, k, v, **kwargs, backend="cuda")
        got = torch.autograd.grad(out, (q, k, v, bias), upstream(out))
    inputs64 = [x.detach().double().requires_grad_(True) for x in (q, k, v, bias)]
    kwargs.update(bias=inputs64[3], rotary=(cos.double(), sin.double()))
    expected = temporal_attention_ref(*inputs64[:3], **kwargs)
    want = torch.autograd.grad(expected, inputs64, upstream(expected))
    assert_close(out, expected, dtype, "fwd", "out")
    for name, g, w in zip(["dq", "dk", "dv", "dbias"], got, want):
        assert_close(g, w, dtype, "grad", name)


@needs_emulation
@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "half"])
def test_rotary_cuda_kernels_packed_and_deterministic(interleaved):
    """The packed rotary op (the unpacked CUDA kernels on views of qkv) vs float64, and two runs bit-identical
    (out, dqkv, dbias)."""
    B, T, S, H, D, rot_dim = 2, 5, 3, 2, 20, 12
    qkv0 = torch.randn(B, T, S, 3, H, D, dtype=torch.float16)
    bias0 = torch.randn(H, T, T)
    cos, sin = tables(T, rot_dim, torch.float32)
    runs = []
    for _ in range(2):
        with testing.cuda_emulation():
            qkv, bias = qkv0.clone().requires_grad_(True), bias0.clone().requires_grad_(True)
            out = torchnova.temporal_attention_qkvpacked(
                qkv, bias=bias, rotary=(cos, sin), rotary_interleaved=interleaved, backend="cuda"
            )  # fmt: skip
            runs.append([out, *torch.autograd.grad(out, (qkv, bias), upstream(out))])
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    qkv64, bias64 = qkv0.double().requires_grad_(True), bias0.double().requires_grad_(True)
    rotary = (cos.double(), sin.double())
    expected = temporal_attention_ref(*qkv64.unbind(3), bias=bias64, rotary=rotary, rotary_interleaved=interleaved)
    want = torch.autograd.grad(expected, (qkv64, bias64), upstream(expected))
    assert_close(runs[0][0], expected, torch.float16, "fwd", "out")
    assert_close(runs[0][1], want[0], torch.float16, "grad", "dqkv")
    assert_close(runs[0][2], want[1], torch.float16, "grad", "dbias")


def _emulation_options(*names):
    """Skip unless testing.cuda_emulation() takes these keyword arguments (the race check and exact ends came with
    a later emulation layer than some builds have)."""
    missing = [n for n in names if n not in inspect.signature(testing.cuda_emulation).parameters]
    if missing:
        pytest.skip(f"this emulation layer has no cuda_emulation({', '.join(missing)}=...)")


def _rotary_fwd_bwd(interleaved, dtype=torch.float32, D=37, rot_dim=34):
    """One rotary temporal fwd+bwd on the cuda backend (inside cuda_emulation): out, dq, dk, dv, dbias."""
    B, T, S, H = 2, 9, 3, 2
    q, k, v = (torch.randn(B, T, S, H, D).to(dtype).requires_grad_(True) for _ in range(3))
    bias = torch.randn(H, T, T, requires_grad=True)
    cos, sin = tables(T, rot_dim, torch.float32, random=True)
    out = torchnova.temporal_attention(q, k, v, bias=bias, segment_ids=segments_for(B, T), causal=True,
                                       rotary=(cos, sin), rotary_interleaved=interleaved, backend="cuda")  # fmt: skip
    return [out, *torch.autograd.grad(out, (q, k, v, bias), upstream(out))], (q, k, v, bias, cos, sin)


@needs_emulation
@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "half"])
def test_rotary_cuda_race_check_schedules_agree(interleaved):
    """The emulation's race check: the threads of each block in thread order, then in reverse, between
    synchronisation points; a shared-memory race would make the bits differ."""
    _emulation_options("schedule")
    results = []
    for schedule in testing.SCHEDULES:
        torch.manual_seed(3)
        with testing.cuda_emulation(schedule=schedule):
            results.append(_rotary_fwd_bwd(interleaved)[0])
    for forward, reverse in zip(*results):
        assert torch.equal(forward, reverse), "rotary temporal kernels: results differ between schedules (a race)"


@needs_emulation
@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "half"])
def test_rotary_cuda_exact_ends_fp16(interleaved):
    """Tensors that end exactly at the guard page: a read of a rotated partner past a row's end faults, and the
    odd-D fp16 rows start misaligned."""
    _emulation_options("exact_ends")
    with testing.cuda_emulation(exact_ends=True):
        got, (q, k, v, bias, cos, sin) = _rotary_fwd_bwd(interleaved, torch.float16)
    inputs64 = [x.detach().double().requires_grad_(True) for x in (q, k, v, bias)]
    expected = temporal_attention_ref(*inputs64[:3], bias=inputs64[3], segment_ids=segments_for(2, 9), causal=True,
                                      rotary=(cos.double(), sin.double()), rotary_interleaved=interleaved)  # fmt: skip
    want = [expected, *torch.autograd.grad(expected, inputs64, upstream(expected))]
    for name, g, w in zip(["out", "dq", "dk", "dv", "dbias"], got, want):
        assert_close(g, w, torch.float16, "fwd" if name == "out" else "grad", name)


@needs_emulation
def test_video_diffusion_unet_on_the_cuda_kernels():
    """video-diffusion-pytorch's Unet3D patched with backend="cuda" (its rotary temporal attention, partial rotation
    of 32 of 40 dims, interleaved, plus its spatial attention, on the emulated CUDA kernels) vs the library's own
    forward in float64: output and every parameter gradient, fp32 tolerance."""
    vdp = pytest.importorskip("video_diffusion_pytorch.video_diffusion_pytorch",
                              reason="pip install video-diffusion-pytorch==0.7.0")  # fmt: skip
    import torchnova.integrations.video_diffusion_pytorch as tn_vdp

    def make(dtype):
        torch.manual_seed(0)
        model = vdp.Unet3D(dim=8, dim_mults=(1,), channels=3, attn_heads=2, attn_dim_head=40)
        with torch.no_grad():
            model.time_rel_pos_bias.relative_attention_bias.weight.normal_()
        return model.to(dtype)

    def run(model, x, time, focus):
        out = model(x, time, focus_present_mask=focus)
        params = [p for p in model.parameters() if p.requires_grad]
        return out, torch.autograd.grad(out, params, upstream(out), allow_unused=True)

    x = torch.randn(2, 3, 5, 3, 3, dtype=torch.float64)
    time, focus = torch.tensor([3.0, 7.0], dtype=torch.float64), torch.tensor([True, False])
    patched = make(torch.float32)
    assert tn_vdp.patch(patched, backend="cuda") == 5
    with testing.cuda_emulation():
        # The model's conv3d (oneDNN) rejects guard-page allocations; the kernels' bounds are checked above.
        _ext._C_cuda_emu.set_guarded_allocation(False)
        got = run(patched, x.float(), time.float(), focus)
    want = run(make(torch.float64), x, time, focus)
    assert_close(got[0], want[0], torch.float32, "fwd", "output")
    names = [name for name, p in patched.named_parameters() if p.requires_grad]
    assert len(names) >= 20
    for name, g, w in zip(names, got[1], want[1]):
        assert (g is None) == (w is None), name
        if g is not None:
            assert_close(g, w, torch.float32, "grad", name)


@needs_emulation
def test_rotary_cuda_kernels_check_the_tables():
    """The CUDA ops check the tables as the other backends do (shape, rot_dim, dtype float32, contiguity)."""
    q = torch.randn(1, 4, 2, 1, 8)
    ops = torch.ops.torchnova
    cos, sin = tables(4, 6, torch.float32)
    with testing.cuda_emulation():
        for bad_cos, bad_sin, match in (
            (cos[:, :5], sin[:, :5], r"rot_dim even"),
            (cos, sin[:3], r"rotary_sin must have rotary_cos's shape"),
            (cos.double(), sin, r"rotary_cos must be float32"),
            (torch.cat([cos, cos], 1)[:, ::2], sin, r"rotary_cos must be contiguous"),
        ):
            with pytest.raises(RuntimeError, match=match):
                ops.temporal_attention_rotary_fwd_cuda_emu(q, q, q, None, None, False, 0.5, bad_cos, bad_sin, True)


@pytest.mark.parametrize(
    "rotary, interleaved, error, match",
    [
        ((torch.ones(5, 8), torch.zeros(5, 8)), "yes", TypeError, "rotary_interleaved must be a bool"),
        (torch.ones(5, 8), False, TypeError, r"rotary must be a \(cos, sin\) pair"),
        ((torch.ones(5, 8), None), False, TypeError, "rotary sin must be a floating-point tensor"),
        ((torch.ones(4, 8), torch.zeros(4, 8)), False, ValueError, r"cos must have shape \(T, rot_dim\) with T=5"),
        ((torch.ones(5, 8), torch.zeros(5, 6)), False, ValueError, r"sin must have cos's shape \(5, 8\), got \(5, 6\)"),
        ((torch.ones(5, 7), torch.zeros(5, 7)), False, ValueError, r"rot_dim .* must be even and in \[2, D=8\], got 7"),
        ((torch.ones(5, 10), torch.zeros(5, 10)), False, ValueError, r"rot_dim .* even and in \[2, D=8\], got 10"),
        ((torch.ones(5, 8, dtype=torch.int64), torch.zeros(5, 8)), False, TypeError, "cos must be a floating-point"),
    ],
)
def test_bad_rotary_names_the_argument(rotary, interleaved, error, match):
    with pytest.raises(error, match=match):
        qkv = torch.randn(1, 5, 2, 3, 1, 8)
        torchnova.temporal_attention_qkvpacked(qkv, rotary=rotary, rotary_interleaved=interleaved)


def test_rotary_fp16_and_bf16_cpp():
    """Half-precision inputs are rotated in fp32 while staged (as the reference does in the accumulation dtype)."""
    for dtype in (torch.float16, torch.bfloat16):
        qkv = torch.randn(1, 6, 3, 3, 2, 16).to(dtype).requires_grad_(True)
        cos, sin = tables(6, 12, torch.float32)
        out = torchnova.temporal_attention_qkvpacked(qkv, rotary=(cos, sin), rotary_interleaved=True, backend="cpp")
        qkv64 = qkv.detach().double().requires_grad_(True)
        tables64 = (cos.double(), sin.double())
        expected = temporal_attention_ref(*qkv64.unbind(3), rotary=tables64, rotary_interleaved=True)
        assert_close(out, expected, dtype, "fwd", "out")
        g = upstream(out)
        (got,), (want,) = torch.autograd.grad(out, qkv, g), torch.autograd.grad(expected, qkv64, g.double())
        assert_close(got, want, dtype, "grad", "dqkv")
        assert math.isfinite(out.float().sum().item())


def test_rotary_compiles_fullgraph():
    """torch.compile(fullgraph=True) through the rotary op (cpp): no graph break, eager's numbers."""
    cos, sin = tables(5, 6, torch.float32)

    def fn(qkv, bias):
        out = torchnova.temporal_attention_qkvpacked(
            qkv, bias=bias, rotary=(cos, sin), rotary_interleaved=True, backend="cpp"
        )  # fmt: skip
        return (out * out).sum()

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    qkv = torch.randn(2, 5, 3, 3, 2, 8, requires_grad=True)
    bias = torch.randn(2, 5, 5, requires_grad=True)
    loss = compiled(qkv, bias)
    grads = torch.autograd.grad(loss, (qkv, bias))
    expected = fn(qkv, bias)
    for got, want in zip(grads, torch.autograd.grad(expected, (qkv, bias))):
        assert_close(got, want.double(), torch.float32, "grad", "compiled grad")
    assert_close(loss, expected.double(), torch.float32, "fwd", "compiled loss")
