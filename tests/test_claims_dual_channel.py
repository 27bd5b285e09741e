"""Claims of the dual-channel docs that no other test checked (issue 18): the cuda backend of cogvideo_attention and
dual_channel_mix in pytest (every mode, fp32/fp16/bf16; only a script covered them), dual_channel_mix in bf16,
more than 65,535 (batch, head) problems on the GPU backends, the auto order and overrides, the reference against
SDPA, and the validation errors. GPU cases run on a GPU and are skipped here with the reason.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from torchnova import _backend, cogvideo_attention, dual_channel_mix
from torchnova.dual_channel.masks import key_mask, visibility
from torchnova.dual_channel.reference import cogvideo_attention_ref, dual_channel_mix_ref
from utils import assert_close, auto_cpu_backend, record_chosen_backends, skip_unless_runs

ON_GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (the cuda backend; CUDA emulation: later)")

MODES = [
    ("base", "full", False, "sequential"), ("base", "full", False, "interpolation"),
    ("plus", "full", False, "sequential"), ("plus", "full", False, "interpolation"),
] + [("plus", "window", shifted, stage) for shifted in (False, True) for stage in ("sequential", "interpolation")]
MODE_IDS = ["-".join(str(x) for x in mode) for mode in MODES]
PAD = torch.tensor([[True, False, True], [False, False, False]])  # batch 1: all text padded (empty base rows)


def check_attention(backend, device, dtype, mode, *, text_len=3, frames=5, grid=(4, 4), window=2, heads=2, dim=16,
                    batch=2, pad=PAD):  # fmt: skip
    channel, attention, shifted, stage = mode
    length = text_len + frames * grid[0] * grid[1]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, length, heads, dim, generator=g, dtype=torch.float64) for _ in range(3))
    leaves = [x.to(device, dtype).requires_grad_(True) for x in (q, k, v)]
    skip_unless_runs("cogvideo_attention", backend, x=leaves[0], head_dim=dim)
    kw = dict(text_len=text_len, frames=frames, grid=grid, channel=channel, attention=attention, window=window,
              shifted=shifted, stage=stage)  # fmt: skip
    out = cogvideo_attention(*leaves, text_pad_mask=None if pad is None else pad.to(device), backend=backend, **kw)
    upstream = torch.randn(out.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(out, leaves, upstream.to(device, dtype))
    ref_leaves = [x.detach().cpu().double().requires_grad_(True) for x in leaves]
    ref = cogvideo_attention_ref(*ref_leaves, pad, text_len, frames, grid[0], grid[1], channel, attention, window,
                                 shifted, stage)[0]  # fmt: skip
    want = torch.autograd.grad(ref, ref_leaves, upstream)
    assert out.dtype == dtype
    assert_close(out, ref, dtype, "fwd", f"{backend} out")
    for name, a, b in zip("qkv", got, want):
        assert_close(a, b, dtype, "grad", f"{backend} d{name}")


def check_mix(backend, device, dtype, shape=(3, 7, 21), text_len=2):
    g = torch.Generator().manual_seed(0)
    base, plus = (torch.randn(*shape, generator=g, dtype=torch.float64) for _ in range(2))
    logit = torch.randn(shape[-1], generator=g, dtype=torch.float64)
    leaves = [x.to(device, dtype).requires_grad_(True) for x in (base, plus, logit)]
    skip_unless_runs("dual_channel_mix", backend, x=leaves[0])
    y = dual_channel_mix(*leaves, text_len=text_len, backend=backend)
    upstream = torch.randn(y.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(y, leaves, upstream.to(device, dtype))
    ref_leaves = [x.detach().cpu().double().requires_grad_(True) for x in leaves]
    ref = dual_channel_mix_ref(*ref_leaves, text_len)
    want = torch.autograd.grad(ref, ref_leaves, upstream)
    assert y.dtype == dtype
    assert_close(y, ref, dtype, "fwd", "y")
    for name, a, b in zip(("d_base", "d_plus", "d_alpha_logit"), got, want):
        assert_close(a, b, dtype, "grad", name)


# ------------------------------------------------------------------------------------------------------------
# the cuda backend in pytest (a GPU runs these; scripts/gpu_check_dual_channel.py was the only cover)
# ------------------------------------------------------------------------------------------------------------


@needs_gpu
@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_cuda_cogvideo_attention_matches_reference(mode, dtype):
    check_attention("cuda", "cuda", dtype, mode)


@needs_gpu
@pytest.mark.parametrize("mode", [MODES[2], MODES[7]], ids=[MODE_IDS[2], MODE_IDS[7]])
def test_cuda_cogvideo_attention_odd_shapes(mode):
    # non-square grid, text_len 1, window 2, head dims 8 and 72 (not a power of two), one head
    for dim in (8, 72):
        check_attention("cuda", "cuda", torch.float32, mode, text_len=1, grid=(4, 6), heads=1, dim=dim, batch=1,
                        pad=None)  # fmt: skip


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_cuda_dual_channel_mix_matches_reference(dtype):
    check_mix("cuda", "cuda", dtype)
    check_mix("cuda", "cuda", dtype, shape=(2, 300, 130), text_len=64)  # several row and column blocks


@needs_gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_more_than_65535_batch_heads_on_gpu(backend):
    """B·H = 70,000 (batch, head) problems: the cuda backend must take them; triton says why it cannot."""
    mode = ("plus", "full", False, "sequential")
    if backend == "triton":
        q = torch.empty(1, 3, 70_000, 8, device="cuda")
        assert any("B*H = 70000 > 65535" in w for w in _backend.reasons("cogvideo_attention", "triton", x=q,
                                                                         head_dim=8))  # fmt: skip
        return
    check_attention("cuda", "cuda", torch.float32, mode, text_len=1, frames=2, grid=(1, 1), heads=70_000, dim=8,
                    batch=1, pad=None)  # fmt: skip


# ------------------------------------------------------------------------------------------------------------
# dual_channel_mix in bf16 (and fp16) on the backends that run here
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_mix_half_precision(backend, dtype):
    device = "cuda" if ON_GPU and backend == "triton" else "cpu"
    check_mix(backend, device, dtype)


@pytest.mark.parametrize("mode", [MODES[1], MODES[7]], ids=[MODE_IDS[1], MODE_IDS[7]])
def test_cpp_cogvideo_bf16_and_different_strides(mode):
    """bf16 on the C++ kernels, with q, k, v of three different stride sets (stride(-1) == 1)."""
    check_attention("cpp", "cpu", torch.bfloat16, mode, heads=1, dim=8)
    g = torch.Generator().manual_seed(0)
    length = 3 + 5 * 16
    q_base = torch.randn(2, length, 2, 8, generator=g).requires_grad_(True)
    k_base = torch.randn(2, length, 2, 12, generator=g).requires_grad_(True)
    v_base = torch.randn(2, 2, length, 8, generator=g).requires_grad_(True)
    views = lambda qb, kb, vb: (qb, kb[..., 2:10], vb.transpose(1, 2))  # noqa: E731  (three stride sets)
    q, k, v = views(q_base, k_base, v_base)
    assert len({q.stride(), k.stride(), v.stride()}) == 3 and all(x.stride(-1) == 1 for x in (q, k, v))
    skip_unless_runs("cogvideo_attention", "cpp", x=q, head_dim=8)
    kw = dict(text_len=3, frames=5, grid=4, channel=mode[0], attention=mode[1], window=2, shifted=mode[2],
              stage=mode[3], text_pad_mask=PAD)  # fmt: skip
    out = cogvideo_attention(q, k, v, backend="cpp", **kw)
    bases64 = [x.detach().double().requires_grad_(True) for x in (q_base, k_base, v_base)]
    ref = cogvideo_attention(*views(*bases64), backend="reference", **kw)
    assert_close(out, ref, torch.float32, "fwd", "strided out")
    upstream = torch.randn(out.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(out, (q_base, k_base, v_base), upstream.float())
    for name, a, b in zip("qkv", got, torch.autograd.grad(ref, bases64, upstream)):
        assert_close(a, b, torch.float32, "grad", f"strided d{name}")


# ------------------------------------------------------------------------------------------------------------
# auto order and overrides
# ------------------------------------------------------------------------------------------------------------


def test_auto_order_and_overrides(monkeypatch):
    for op in ("cogvideo_attention", "dual_channel_mix"):
        assert _backend.backends_for(op) == ["cuda", "cpp", "triton", "reference"]
    chosen = record_chosen_backends(monkeypatch)
    q = torch.randn(1, 2 + 5 * 4, 1, 4)
    kw = dict(text_len=2, frames=5, grid=2, channel="base")
    monkeypatch.delenv("TORCHNOVA_BACKEND", raising=False)
    cogvideo_attention(q, q, q, **kw)
    base = torch.randn(1, 5, 3)
    dual_channel_mix(base, base, torch.zeros(3), text_len=2)
    monkeypatch.setenv("TORCHNOVA_BACKEND", "reference")
    cogvideo_attention(q, q, q, **kw)
    dual_channel_mix(base, base, torch.zeros(3), text_len=2, backend=auto_cpu_backend())  # explicit beats env
    monkeypatch.setenv("TORCHNOVA_BACKEND", "cuda")
    with pytest.raises(ValueError, match="backend='cuda' cannot run"):
        cogvideo_attention(q, q, q, **kw)
    cpu = auto_cpu_backend()
    assert chosen == [("cogvideo_attention", cpu), ("dual_channel_mix", cpu), ("cogvideo_attention", "reference"),
                      ("dual_channel_mix", cpu)]  # fmt: skip


# ------------------------------------------------------------------------------------------------------------
# the reference against PyTorch SDPA with the equivalent boolean mask
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_reference_equals_sdpa_with_the_equivalent_mask(mode):
    channel, attention, shifted, stage = mode
    text_len, frames, gh, gw, window = 3, 5, 4, 4, 2
    length = text_len + frames * gh * gw
    q, k, v = (torch.randn(2, length, 2, 8, dtype=torch.float64) for _ in range(3))
    ref, _ = cogvideo_attention_ref(q, k, v, PAD, text_len, frames, gh, gw, channel, attention, window, shifted, stage)
    visible = visibility(text_len, frames, gh, gw, channel, attention, window, shifted, stage)[None]
    visible = visible & key_mask(PAD, 2, text_len, length)[:, None, :]  # (B, L, L)
    has_key = visible.any(-1)  # rows with no visible key: SDPA gives NaN, the reference 0 (its documented rule)
    to = lambda x: x.transpose(1, 2)  # noqa: E731  (B, H, L, D)
    sdpa = F.scaled_dot_product_attention(to(q), to(k), to(v), attn_mask=visible[:, None]).transpose(1, 2)
    assert has_key.any() and (~has_key).any()
    assert_close(ref[has_key], sdpa[has_key], torch.float64, "fwd", "reference vs SDPA")
    assert torch.equal(ref[~has_key], torch.zeros_like(ref[~has_key]))


def test_mix_reference_equals_its_formula_in_torch():
    base, plus = torch.randn(2, 6, 5, dtype=torch.float64), torch.randn(2, 6, 5, dtype=torch.float64)
    logit = torch.randn(5, dtype=torch.float64)
    alpha = torch.sigmoid(logit)
    expected = torch.cat([base[:, :2], torch.lerp(plus[:, 2:], base[:, 2:], alpha)], dim=1)
    assert_close(dual_channel_mix_ref(base, plus, logit, 2), expected, torch.float64, "fwd", "mix reference")


# ------------------------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(o_plus=torch.randn(2, 5, 4)), ValueError,
         r"o_plus must have o_base's shape \(2, 5, 3\), got \(2, 5, 4\)"),
        (dict(o_plus=torch.randn(2, 5, 3, dtype=torch.float64)), TypeError,
         r"o_plus must have o_base's dtype torch.float32, got torch.float64"),
        (dict(o_plus=torch.randn(2, 5, 3, device="meta")), ValueError, r"o_plus must be on o_base's device"),
        (dict(o_plus=[[0.0]]), TypeError, r"o_plus must be a torch.Tensor, got list"),
        (dict(alpha_logit=torch.zeros(3, dtype=torch.int64)), TypeError, r"alpha_logit must be floating point"),
        (dict(text_len=-1), ValueError, r"text_len must be an int in \[0, L=5\], got -1"),
        (dict(text_len=6), ValueError, r"text_len must be an int in \[0, L=5\], got 6"),
        (dict(text_len=True), ValueError, r"text_len must be an int in \[0, L=5\], got True"),
        (dict(text_len=2.0), ValueError, r"text_len must be an int in \[0, L=5\], got 2.0"),
        (dict(o_base=torch.randn(2, 5)), ValueError, r"o_base must be 3-D \(B, L, hidden\)"),
    ],
)
def test_mix_validation(change, error, match):
    args = dict(o_base=torch.randn(2, 5, 3), o_plus=torch.randn(2, 5, 3), alpha_logit=torch.zeros(3), text_len=2)
    args.update(change)
    text_len = args.pop("text_len")
    with pytest.raises(error, match=match):
        dual_channel_mix(args["o_base"], args["o_plus"], args["alpha_logit"], text_len=text_len, backend="reference")


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(shifted=1), TypeError, r"shifted must be a bool, got 1"),
        (dict(shifted="yes"), TypeError, r"shifted must be a bool, got 'yes'"),
        (dict(text_len=-1), ValueError, r"text_len must be >= 0, got -1"),
        (dict(text_len=2.0), TypeError, r"text_len must be an int, got 2.0"),
        (dict(frames=0), ValueError, r"frames must be >= 1, got 0"),
        (dict(text_pad_mask=torch.ones(1, 2, dtype=torch.bool, device="meta")), ValueError,
         r"text_pad_mask must be on q's device cpu, got meta"),
        (dict(grid=(4, 0)), ValueError, r"grid sides must be >= 1, got \(4, 0\)"),
        (dict(grid=True), TypeError, r"grid must be an int or an \(h, w\) pair, got True"),
    ],
)
def test_attention_validation(change, error, match):
    q = torch.randn(1, 2 + 5 * 16, 1, 4)
    kw = dict(text_len=2, frames=5, grid=4, channel="plus", attention="window", window=2, backend="reference")
    kw.update(change)
    with pytest.raises(error, match=match):
        cogvideo_attention(q, q, q, **kw)


def test_attention_rejects_a_non_contiguous_head_dim():
    q = torch.randn(1, 2 + 5 * 4, 4, 2).transpose(2, 3)  # (B, L, H=2, D=4), stride(-1) = 2
    with pytest.raises(ValueError, match=r"q needs stride\(-1\) == 1 \(contiguous head dim\)"):
        cogvideo_attention(q, q, q, text_len=2, frames=5, grid=2, channel="base", backend="reference")
