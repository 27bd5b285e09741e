"""The tensor-core (mma.sync m16n8k16, and m16n8k8 TF32 for float32) CUDA attention kernels
(csrc/cuda/attention_tc_fwd.cu, flash_tc.cuh), executed on the CPU through the CUDA emulation layer
(docs/cuda_emulation.md), against the float64 reference: out and lse of the forward, float16 and bfloat16 (and
float32 through TF32 when torch allows it), head dims through both padded widths (D = 1, 33, 64, 128), ragged
sequence tails (S = 1, 17, 97, 130), strided and unaligned inputs (the cp.async and the plain-load tile paths), odd
batch / heads, every CogVideo visibility option (text padding, window, shifted, channels, interpolation) including
rows that see no key; determinism, agreement with the SIMT kernel, and the kernel choice
(TORCHNOVA_CUDA_ATTENTION_KERNEL, checked with the emulation module's launch counter).

Needs the layer (TORCHNOVA_CUDA_EMULATION=1); skipped, with that reason, without it. Shapes are small: every thread
of an emulated block is a fiber and every mma / ldmatrix a warp rendezvous.
"""

from __future__ import annotations

import math

import pytest
import torch

import torchnova
from torchnova import _ext, testing
from torchnova.dual_channel.reference import cogvideo_attention_ref
from utils import assert_close

pytestmark = pytest.mark.skipif(
    not _ext.HAS_CUDA_EMULATION, reason=f"CUDA emulation layer not built: {_ext.CUDA_EMULATION_IMPORT_ERROR}"
)

TC_DTYPES = [torch.float16, torch.bfloat16]
KERNEL_ENV = "TORCHNOVA_CUDA_ATTENTION_KERNEL"


@pytest.fixture
def allow_tf32():
    """Sets torch.backends.cuda.matmul.allow_tf32 for one test (restored afterwards)."""
    previous = torch.backends.cuda.matmul.allow_tf32

    def set_allow_tf32(value: bool) -> None:
        torch.backends.cuda.matmul.allow_tf32 = value

    yield set_allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = previous


def _launches() -> int:
    return _ext._C_cuda_emu.tensor_core_forward_launches()


def _spatial_fwd(q, k, v, scale=None, **emulation):
    """(out, lse) of the emulated CUDA spatial forward op (whichever kernel the environment picks)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    with testing.cuda_emulation(**emulation):
        return torch.ops.torchnova.spatial_attention_fwd_cuda_emu(q, k, v, scale)


def _spatial_ref(q, k, v, scale=None):
    """float64 (out, lse) of spatial attention: q, k, v (B, T, S, H, D) -> (B, T, S, H, D), (B, T, S, H)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q64, k64, v64 = (x.double().permute(0, 1, 3, 2, 4) for x in (q, k, v))  # (B, T, H, S, D)
    scores = q64 @ k64.transpose(-1, -2) * scale
    out = torch.softmax(scores, -1) @ v64
    return out.permute(0, 1, 3, 2, 4), torch.logsumexp(scores, -1).permute(0, 1, 3, 2)


def _check_spatial(q, k, v, dtype, what, **emulation):
    before = _launches()
    out, lse = _spatial_fwd(q, k, v, **emulation)
    assert _launches() == before + 1, f"{what}: the tensor-core kernel did not run"
    ref_out, ref_lse = _spatial_ref(q, k, v)
    assert out.is_contiguous() and out.dtype == dtype and lse.dtype == torch.float32
    assert_close(out, ref_out, dtype, "fwd", f"{what} out")
    # lse is accumulated in fp32 from 16-bit inputs: held to the float32 table on the rounded inputs.
    assert_close(lse, ref_lse, torch.float32, "fwd", f"{what} lse")


# ---------------------------------------------------------------------------------------------------------------
# Forward


@pytest.mark.parametrize("dtype", TC_DTYPES)
@pytest.mark.parametrize("S, D", [(1, 1), (17, 33), (97, 64), (130, 128), (130, 33), (17, 128)])
def test_spatial_forward_matches_reference(dtype, S, D):
    q, k, v = (torch.randn(1, 1, S, 1, D).to(dtype) for _ in range(3))
    _check_spatial(q, k, v, dtype, f"spatial S={S} D={D}")


def test_spatial_forward_odd_batch_frames_heads():
    q, k, v = (torch.randn(3, 2, 19, 3, 24).to(torch.bfloat16) for _ in range(3))
    _check_spatial(q, k, v, torch.bfloat16, "spatial (3, 2, 19, 3, 24)")


@pytest.mark.parametrize(
    "D, width, path",
    [(64, 64, "cp.async, strides multiple of 8"), (36, 48, "cp.async with a partial last chunk"),
     (33, 33, "plain loads, rows not 16-byte aligned")],
)  # fmt: skip
def test_spatial_forward_strided_inputs(D, width, path):
    """q, k, v as views into one packed (B, T, S, 3, H, width) tensor: non-contiguous, head dim sliced."""
    packed = torch.randn(2, 1, 21, 3, 3, width).to(torch.float16)
    q, k, v = (packed[:, :, :, i, :, :D] for i in range(3))
    assert not q.is_contiguous()
    _check_spatial(q, k, v, torch.float16, f"spatial strided ({path})")


def test_spatial_forward_exact_ends():
    """Tensors ending exactly at the guard page: a read one element past any row tail faults (and the data start
    is no longer 16-byte aligned, so the plain-load path runs with D = 64)."""
    q, k, v = (torch.randn(1, 1, 67, 1, 64).to(torch.float16) for _ in range(3))
    _check_spatial(q, k, v, torch.float16, "spatial exact ends", exact_ends=True)


def test_spatial_forward_large_scores_no_overflow():
    """Scores far beyond exp's range: the online softmax must stay finite."""
    q, k, v = (torch.randn(1, 1, 70, 1, 16) for _ in range(3))
    q = (q * 40).to(torch.float16)
    _check_spatial(q, k.to(torch.float16), v.to(torch.float16), torch.float16, "spatial large scores")


COGVIDEO_CASES = [
    ("base", "full", False, "sequential"),
    ("plus", "full", False, "sequential"),
    ("plus", "window", False, "sequential"),
    ("plus", "window", True, "sequential"),
    ("plus", "full", False, "interpolation"),
    ("base", "full", False, "interpolation"),
]


def _cogvideo(q, k, v, pad, text_len, frames, grid, channel, attention, shifted, stage, window=2, **emulation):
    with testing.cuda_emulation(**emulation):
        return torch.ops.torchnova.cogvideo_attention_fwd_cuda_emu(
            q, k, v, pad, text_len, frames, grid[0], grid[1], channel, attention, window, shifted, stage
        )


@pytest.mark.parametrize("dtype", TC_DTYPES)
@pytest.mark.parametrize("D", [33, 64])
@pytest.mark.parametrize("channel, attention, shifted, stage", COGVIDEO_CASES)
def test_cogvideo_forward_matches_reference(dtype, D, channel, attention, shifted, stage):
    # L = 5 + 3 * 4 * 6 = 77: two query blocks and two key tiles of 64, so tiles are skipped and kept.
    B, H, text_len, frames, grid = 2, 3, 5, 3, (4, 6)
    L = text_len + frames * grid[0] * grid[1]
    q, k, v = (torch.randn(B, L, H, D).to(dtype) for _ in range(3))
    pad = torch.ones(B, text_len, dtype=torch.bool)
    pad[1, 2:] = False  # batch 1: three padded text keys
    before = _launches()
    out, lse = _cogvideo(q, k, v, pad, text_len, frames, grid, channel, attention, shifted, stage)
    assert _launches() == before + 1
    ref_out, ref_lse = cogvideo_attention_ref(q.double(), k.double(), v.double(), pad, text_len, frames, grid[0],
                                              grid[1], channel, attention, 2, shifted, stage)  # fmt: skip
    what = f"cogvideo {channel}/{attention}/shifted={shifted}/{stage} D={D}"
    assert_close(out, ref_out, dtype, "fwd", f"{what} out")
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse) & (lse > 0), empty), f"{what}: rows with no visible key must have lse +inf"
    assert_close(lse[~empty], ref_lse[~empty], torch.float32, "fwd", f"{what} lse")
    if channel == "plus":  # text queries see nothing in the plus channel
        assert empty[:, :text_len].all() and (out[:, :text_len] == 0).all()


def test_cogvideo_forward_all_text_padded_no_nan():
    """Base channel, every text key padded: text queries see no key at all (out 0, lse +inf, no NaN)."""
    B, H, D, text_len, frames, grid = 1, 1, 16, 4, 2, (2, 2)
    L = text_len + frames * 4
    q, k, v = (torch.randn(B, L, H, D).to(torch.float16) for _ in range(3))
    pad = torch.zeros(B, text_len, dtype=torch.bool)
    out, lse = _cogvideo(q, k, v, pad, text_len, frames, grid, "base", "full", False, "sequential")
    assert not torch.isnan(out).any() and (out[:, :text_len] == 0).all()
    assert torch.isinf(lse[:, :text_len]).all() and torch.isfinite(lse[:, text_len:]).all()
    ref_out, _ = cogvideo_attention_ref(q.double(), k.double(), v.double(), pad, text_len, frames, 2, 2, "base",
                                        "full", 2, False, "sequential")  # fmt: skip
    assert_close(out, ref_out, torch.float16, "fwd", "cogvideo all text padded")


def test_forward_reruns_are_bit_identical():
    q, k, v = (torch.randn(1, 1, 97, 2, 40).to(torch.bfloat16) for _ in range(3))
    first, second = _spatial_fwd(q, k, v), _spatial_fwd(q, k, v)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_no_shared_memory_race_reverse_schedule_is_bit_identical():
    """The emulation layer's race check: a shared-memory race would make the result depend on the thread order."""
    q, k, v = (torch.randn(1, 1, 70, 2, 64).to(torch.float16) for _ in range(3))
    forward, reverse = _spatial_fwd(q, k, v), _spatial_fwd(q, k, v, schedule="reverse")
    assert torch.equal(forward[0], reverse[0]) and torch.equal(forward[1], reverse[1])
    B, H, D, text_len, frames, grid = 1, 1, 33, 5, 3, (4, 6)
    q, k, v = (torch.randn(B, text_len + frames * 24, H, D).to(torch.bfloat16) for _ in range(3))
    pad = torch.tensor([[True, True, False, True, False]])
    args = (q, k, v, pad, text_len, frames, grid, "plus", "window", True, "sequential")
    forward, reverse = _cogvideo(*args), _cogvideo(*args, schedule="reverse")
    assert torch.equal(forward[0], reverse[0]) and torch.equal(forward[1], reverse[1])


@pytest.mark.parametrize("dtype", TC_DTYPES)
def test_tensor_core_and_simt_forward_agree(dtype, monkeypatch):
    q, k, v = (torch.randn(1, 2, 45, 1, 33).to(dtype) for _ in range(3))
    monkeypatch.setenv(KERNEL_ENV, "simt")
    before = _launches()
    simt_out, simt_lse = _spatial_fwd(q, k, v)
    assert _launches() == before, "simt must not launch the tensor-core kernel"
    monkeypatch.setenv(KERNEL_ENV, "tensor_core")
    tc_out, tc_lse = _spatial_fwd(q, k, v)
    assert _launches() == before + 1
    assert_close(tc_out, simt_out.double(), dtype, "fwd", "tensor core vs SIMT out")
    assert_close(tc_lse, simt_lse.double(), torch.float32, "fwd", "tensor core vs SIMT lse")


def test_auto_picks_tensor_cores_for_16_bit_and_simt_for_float32(monkeypatch, allow_tf32):
    monkeypatch.delenv(KERNEL_ENV, raising=False)
    allow_tf32(False)
    q = torch.randn(1, 1, 5, 1, 8)
    before = _launches()
    _spatial_fwd(q, q, q)
    assert _launches() == before, "float32 without TF32 allowed: the SIMT kernel"
    h = q.to(torch.float16)
    _spatial_fwd(h, h, h)
    assert _launches() == before + 1
    big = torch.randn(1, 1, 3, 1, 129).to(torch.float16)  # D > 128 stays on SIMT
    _spatial_fwd(big, big, big)
    assert _launches() == before + 1


@pytest.mark.parametrize(
    "dtype, D, reason",
    [(torch.float32, 8, "dtype is Float and TF32 matmuls are off"),
     (torch.float16, 200, "head dim D = 200 exceeds 128")],
)  # fmt: skip
def test_forcing_tensor_cores_on_ineligible_input_raises(dtype, D, reason, monkeypatch, allow_tf32):
    monkeypatch.setenv(KERNEL_ENV, "tensor_core")
    allow_tf32(False)
    q = torch.randn(1, 1, 3, 1, D).to(dtype)
    with pytest.raises(ValueError, match=rf"TORCHNOVA_CUDA_ATTENTION_KERNEL=tensor_core.*{reason}"):
        _spatial_fwd(q, q, q)


def test_unknown_kernel_choice_raises(monkeypatch):
    monkeypatch.setenv(KERNEL_ENV, "fastest")
    q = torch.randn(1, 1, 3, 1, 8).to(torch.float16)
    with pytest.raises(ValueError, match=r"TORCHNOVA_CUDA_ATTENTION_KERNEL must be auto, tensor_core or simt.*fastest"):
        _spatial_fwd(q, q, q)


@pytest.mark.parametrize("dtype", TC_DTYPES)
def test_public_op_forward_and_backward_through_tensor_core_lse(dtype):
    """torchnova.spatial_attention(backend="cuda"): the SIMT backward consumes the tensor-core forward's out / lse."""
    q, k, v = (torch.randn(1, 1, 23, 2, 16).to(dtype).requires_grad_() for _ in range(3))
    before = _launches()
    with testing.cuda_emulation():
        out = torchnova.spatial_attention(q, k, v, backend="cuda")
    assert _launches() == before + 1
    upstream = torch.randn(out.shape, dtype=torch.float64)
    out.backward(upstream.to(dtype))
    refs = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref = torchnova.spatial_attention(*refs, backend="reference")
    ref.backward(upstream)
    assert_close(out, ref, dtype, "fwd", "spatial out")
    for name, x, r in zip("qkv", (q, k, v), refs):
        assert_close(x.grad, r.grad, dtype, "grad", f"spatial grad of {name}")


# TF32: float32 inputs on the tensor cores when torch allows TF32 matmuls. TF32 keeps 10 mantissa bits, like
# float16, so results are held to the float16 rows of the tolerance table (the float32 rows apply to the SIMT
# kernel, which runs whenever TF32 is off: the default).


@pytest.mark.parametrize("S, D", [(17, 33), (97, 64), (70, 48), (1, 1)])
def test_tf32_spatial_forward_matches_reference(S, D, allow_tf32):
    allow_tf32(True)
    q, k, v = (torch.randn(2, 1, S, 3, D) for _ in range(3))
    before = _launches()
    out, lse = _spatial_fwd(q, k, v)
    assert _launches() == before + 1, "float32 with TF32 allowed must run the tensor-core kernel"
    ref_out, ref_lse = _spatial_ref(q, k, v)
    assert out.dtype == torch.float32
    assert_close(out, ref_out, torch.float16, "fwd", f"tf32 spatial S={S} D={D} out")
    assert_close(lse, ref_lse, torch.float16, "fwd", f"tf32 spatial S={S} D={D} lse")


def test_tf32_larger_head_dims_stay_on_simt(monkeypatch, allow_tf32):
    allow_tf32(True)
    q = torch.randn(1, 1, 9, 1, 65)
    before = _launches()
    out, _ = _spatial_fwd(q, q, q)
    assert _launches() == before
    assert_close(out, _spatial_ref(q, q, q)[0], torch.float32, "fwd", "float32 D=65 on SIMT")
    monkeypatch.setenv(KERNEL_ENV, "tensor_core")
    with pytest.raises(ValueError, match="head dim D = 65 exceeds 64 for float32"):
        _spatial_fwd(q, q, q)


def test_tf32_strided_and_cogvideo_forward(allow_tf32):
    allow_tf32(True)
    packed = torch.randn(1, 1, 40, 3, 2, 24)
    q, k, v = (packed[:, :, :, i, :, :20] for i in range(3))  # strides multiple of 4 floats: cp.async path
    out, lse = _spatial_fwd(q, k, v)
    ref_out, ref_lse = _spatial_ref(q, k, v)
    assert_close(out, ref_out, torch.float16, "fwd", "tf32 strided out")
    B, H, D, text_len, frames, grid = 2, 1, 33, 5, 3, (4, 6)
    q, k, v = (torch.randn(B, text_len + frames * 24, H, D) for _ in range(3))
    pad = torch.ones(B, text_len, dtype=torch.bool)
    pad[1, 2:] = False
    before = _launches()
    out, lse = _cogvideo(q, k, v, pad, text_len, frames, grid, "plus", "window", True, "sequential")
    assert _launches() == before + 1
    ref_out, ref_lse = cogvideo_attention_ref(q.double(), k.double(), v.double(), pad, text_len, frames, grid[0],
                                              grid[1], "plus", "window", 2, True, "sequential")  # fmt: skip
    assert_close(out, ref_out, torch.float16, "fwd", "tf32 cogvideo out")
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse), empty)
    assert_close(lse[~empty], ref_lse[~empty], torch.float16, "fwd", "tf32 cogvideo lse")


def test_shared_memory_plan_reports_the_tensor_core_forward():
    assert _ext._C.cuda_shared_memory_bytes("attention_tc_fwd", 1, 64) == 2 * 5 * 64 * 64
    assert _ext._C.cuda_shared_memory_bytes("attention_tc_fwd", 1, 65) == 2 * 5 * 64 * 128
    assert _ext._C.cuda_shared_memory_bytes("attention_tc_fwd", 1, 129) == -1
    assert math.isclose(_ext._C.cuda_shared_memory_bytes("attention_tc_fwd", 1, 128) / 1024, 80.0)
    assert _ext._C.cuda_shared_memory_bytes("attention_tc_fwd_tf32", 1, 64) == 4 * 5 * 64 * 64
    assert _ext._C.cuda_shared_memory_bytes("attention_tc_fwd_tf32", 1, 65) == -1
