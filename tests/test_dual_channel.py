"""CogVideo dual-channel attention: the visibility rule vs CogVideo's own construction, kernels vs the float64
reference in every mode, padding, bad input, gradcheck, opcheck, compile."""

from __future__ import annotations

import itertools

import pytest
import torch

from torchnova import _ext, cogvideo_attention, dual_channel_mix
from torchnova.dual_channel.masks import visibility
from torchnova.dual_channel.reference import cogvideo_attention_ref, dual_channel_mix_ref
from utils import assert_close

needs_cpp = pytest.mark.skipif(not _ext.HAS_CPP, reason="C++ extension not built")

MODES = [
    ("base", "full", False, "sequential"),
    ("base", "full", False, "interpolation"),
    ("plus", "full", False, "sequential"),
    ("plus", "full", False, "interpolation"),
] + [("plus", "window", shifted, stage) for shifted in (False, True) for stage in ("sequential", "interpolation")]
MODE_IDS = ["-".join(str(x) for x in mode) for mode in MODES]


# ---------------------------------------------------------------------------------------------------------
# Independent construction following CogVideo's code path (cogvideo_model.py, WindowAttentionMixin):
# roll the frame grid by (-shift, -shift), window_partition into sequences of frames*window*window tokens in
# (frame, wy, wx) order, tril / causal_mask_interp in that order, Swin region mask, scatter back to (L, L).
# ---------------------------------------------------------------------------------------------------------


def cogvideo_path_mask(text_len, frames, gh, gw, channel, attention, window, shifted, stage):
    n = gh * gw
    length = text_len + frames * n
    mask = torch.zeros(length, length, dtype=torch.bool)
    mask[:, :text_len] = True
    if channel == "base":
        mask[text_len:, text_len:] = False
        for f in range(frames):
            lo = text_len + f * n
            full_frame = stage == "interpolation" and f % 2 == 0
            local = torch.ones(n, n).bool() if full_frame else torch.ones(n, n).tril().bool()
            mask[lo : lo + n, lo : lo + n] = local
        return mask
    mask[:text_len] = False  # plus channel text rows see nothing
    if attention == "full":
        window, shift = max(gh, gw), 0
        wh, ww = gh, gw
    else:
        shift = window // 2 if shifted else 0
        wh = ww = window
    token = torch.arange(frames * n).reshape(frames, gh, gw) + text_len
    token = torch.roll(token, shifts=(-shift, -shift), dims=(1, 2))
    region = torch.zeros(gh, gw, dtype=torch.long)
    if shift:
        count = 0
        for hs in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
            for ws in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
                region[hs, ws] = count
                count += 1
    for wy in range(gh // wh):
        for wx in range(gw // ww):
            ids = token[:, wy * wh : (wy + 1) * wh, wx * ww : (wx + 1) * ww].reshape(-1)
            reg = region[wy * wh : (wy + 1) * wh, wx * ww : (wx + 1) * ww].reshape(1, -1).expand(frames, -1).reshape(-1)
            size = ids.numel()
            if stage == "sequential":
                seq_mask = torch.ones(size, size).tril().bool()
            else:
                seq_mask = _interp_mask(frames, wh * ww)
            seq_mask = seq_mask & (reg[:, None] == reg[None, :])
            mask[ids[:, None], ids[None, :]] = seq_mask
    return mask


def _interp_mask(frames, n):
    frame = torch.arange(frames * n) // n
    fi, fj = frame[:, None], frame[None, :]
    tril = torch.ones(frames * n, frames * n).tril().bool()
    key_cols = fj % 2 == 0
    odd_rows = fi % 2 == 1
    return key_cols | (odd_rows & (fj % 2 == 1) & ((fj < fi) | ((fj == fi) & tril)))


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("layout", [(3, 5, 8, 8, 4), (1, 5, 4, 6, 2), (2, 5, 6, 4, 2)], ids=str)
def test_masks_match_cogvideo_path(mode, layout):
    channel, attention, shifted, stage = mode
    text_len, frames, gh, gw, window = layout
    rule = visibility(text_len, frames, gh, gw, channel, attention, window, shifted, stage)
    path = cogvideo_path_mask(text_len, frames, gh, gw, channel, attention, window, shifted, stage)
    assert torch.equal(rule, path)


def test_masks_real_cogvideo_layout():
    for shifted in (False, True):
        rule = visibility(64, 5, 20, 20, "plus", "window", 10, shifted, "interpolation")
        path = cogvideo_path_mask(64, 5, 20, 20, "plus", "window", 10, shifted, "interpolation")
        assert torch.equal(rule, path)


def test_shifted_groups_picture():
    # 1 text token, 1 frame of 4x4, window 2, shifted: groups {0}, {1, 2}, {3} per axis (masks.py picture)
    rule = visibility(0, 1, 4, 4, "plus", "window", 2, True, "interpolation")
    groups = {tuple(row.nonzero().flatten().tolist()) for row in rule}
    assert groups == {(0,), (1, 2), (3,), (4, 8), (5, 6, 9, 10), (7, 11), (12,), (13, 14), (15,)}


# ---------------------------------------------------------------------------------------------------------
# kernels vs the float64 reference
# ---------------------------------------------------------------------------------------------------------


def _inputs(batch, length, heads, dim, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, length, heads, dim, generator=g, dtype=torch.float64).to(dtype) for _ in range(3)]


def _check_against_reference(backend, mode, dtype, text_len=3, frames=5, grid=(8, 8), window=4, heads=2, dim=5,
                             pad=None, strided=False):
    channel, attention, shifted, stage = mode
    length = text_len + frames * grid[0] * grid[1]
    q, k, v = _inputs(2, length, heads, dim, dtype)
    if strided:  # non-contiguous (B, L, H, D) views with stride(-1) == 1
        q, k, v = (torch.cat([x, x], dim=2)[:, :, ::2] for x in (q, k, v))
    kw = dict(text_len=text_len, frames=frames, grid=grid, channel=channel, attention=attention, window=window,
              shifted=shifted, stage=stage, text_pad_mask=pad)
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    out = cogvideo_attention(*leaves, backend=backend, **kw)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad(out, leaves, grad_out.to(dtype))
    ref_leaves = [x.detach().double().requires_grad_(True) for x in (q, k, v)]
    ref = cogvideo_attention_ref(*ref_leaves, pad, text_len, frames, grid[0], grid[1], channel, attention, window,
                                 shifted, stage)[0]
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad_out)
    assert_close(out, ref, dtype, "fwd", f"{backend} out")
    for name, got, want in zip("qkv", grads, ref_grads):
        assert_close(got, want, dtype, "grad", f"{backend} d{name}")


@needs_cpp
@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_cpp_matches_reference(mode, dtype):
    pad = torch.tensor([[True, False, True], [True, True, True]])
    _check_against_reference("cpp", mode, dtype, pad=pad)


@needs_cpp
@pytest.mark.parametrize("mode", MODES[2:], ids=MODE_IDS[2:])
def test_cpp_odd_shapes_strided(mode):
    # non-square grid, text_len 1, window 2, head dim 3, one head, strided views
    _check_against_reference("cpp", mode, torch.float64, text_len=1, grid=(4, 6), window=2, heads=1, dim=3,
                             strided=True)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cpp_low_precision(dtype):
    _check_against_reference("cpp", ("plus", "window", True, "sequential"), dtype)


@needs_cpp
def test_cpp_real_cogvideo_layout():
    # text 64, 5 frames of 20x20, window 10, shifted, interpolation stage: forward and lse vs the reference
    q, k, v = _inputs(1, 64 + 5 * 400, 1, 8, torch.float64)
    pad = torch.arange(64)[None] >= 10  # left-padded text
    args = (pad, 64, 5, 20, 20, "plus", "window", 10, True, "interpolation")
    out, lse = torch.ops.torchnova.cogvideo_attention_fwd(q, k, v, *args)
    ref_out, ref_lse = cogvideo_attention_ref(q, k, v, *args)
    assert_close(out, ref_out, torch.float64, "fwd", "out")
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    finite = torch.isfinite(ref_lse)
    assert_close(lse[finite], ref_lse[finite], torch.float64, "fwd", "lse")


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=needs_cpp)])
@pytest.mark.parametrize("channel", ["base", "plus"])
def test_whole_padding_rows_no_nan(backend, channel):
    q, k, v = (x.requires_grad_(True) for x in _inputs(2, 3 + 5 * 4, 1, 4, torch.float32))
    pad = torch.tensor([[False, False, False], [True, False, False]])
    out = cogvideo_attention(q, k, v, text_len=3, frames=5, grid=2, channel=channel, text_pad_mask=pad,
                             backend=backend)
    out.sum().backward()
    assert torch.isfinite(out).all() and all(torch.isfinite(x.grad).all() for x in (q, k, v))
    assert (out[0, :3] == 0).all()  # batch 0 text rows: every text key padded (base) / plus text rows
    assert (k.grad[0, :3] == 0).all() and (v.grad[0, :3] == 0).all()  # padded keys get no gradient


@needs_cpp
@pytest.mark.parametrize("mode", [MODES[1], MODES[6]], ids=[MODE_IDS[1], MODE_IDS[6]])
def test_gradcheck_cpp(mode):
    channel, attention, shifted, stage = mode
    q, k, v = (x.requires_grad_(True) for x in _inputs(1, 2 + 5 * 4, 1, 3, torch.float64))
    pad = torch.tensor([[True, False]])
    fn = lambda q, k, v: cogvideo_attention(  # noqa: E731
        q, k, v, text_len=2, frames=5, grid=2, channel=channel, attention=attention, window=1 if attention ==
        "window" else 10, shifted=shifted, stage=stage, text_pad_mask=pad, backend="cpp")
    assert torch.autograd.gradcheck(fn, (q, k, v))


# ---------------------------------------------------------------------------------------------------------
# mix
# ---------------------------------------------------------------------------------------------------------


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=str)
def test_mix_cpp_matches_reference(dtype):
    g = torch.Generator().manual_seed(0)
    base, plus = (torch.randn(3, 7, 5, generator=g, dtype=torch.float64) for _ in range(2))
    logit = torch.randn(5, generator=g, dtype=torch.float64)
    leaves = [x.to(dtype).requires_grad_(True) for x in (base, plus, logit)]
    y = dual_channel_mix(*leaves, text_len=2, backend="cpp")
    grad_y = torch.randn(y.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad(y, leaves, grad_y.to(dtype))
    ref_leaves = [x.to(dtype).double().requires_grad_(True) for x in (base, plus, logit)]
    ref = dual_channel_mix_ref(*ref_leaves, 2)
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad_y)
    assert_close(y, ref, dtype, "fwd", "y")
    for name, got, want in zip(("d_base", "d_plus", "d_alpha_logit"), grads, ref_grads):
        assert_close(got, want, dtype, "grad", name)
    assert (grads[1][:, :2] == 0).all()  # text rows take o_base only


@needs_cpp
def test_mix_gradcheck_cpp():
    leaves = [torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in ((2, 4, 3), (2, 4, 3), (3,))]
    assert torch.autograd.gradcheck(lambda a, b, c: dual_channel_mix(a, b, c, text_len=1, backend="cpp"), leaves)


# ---------------------------------------------------------------------------------------------------------
# bad input, opcheck, compile
# ---------------------------------------------------------------------------------------------------------


def _good():
    q = torch.randn(1, 2 + 5 * 16, 1, 4)
    return q, dict(text_len=2, frames=5, grid=4, channel="plus", attention="window", window=2, backend="reference")


@pytest.mark.parametrize(
    "change, error, words",
    [
        (dict(window=3), ValueError, "window"),
        (dict(stage="interpolation", frames=4), ValueError, "frames"),
        (dict(text_len=3), ValueError, "L"),
        (dict(grid=(4, 6)), ValueError, "L"),
        (dict(channel="both"), ValueError, "channel"),
        (dict(attention="local"), ValueError, "attention"),
        (dict(stage="parallel"), ValueError, "stage"),
        (dict(grid=4.0), TypeError, "grid"),
        (dict(text_pad_mask=torch.ones(1, 2)), TypeError, "text_pad_mask"),
        (dict(text_pad_mask=torch.ones(1, 3, dtype=torch.bool)), ValueError, "text_pad_mask"),
    ],
)
def test_bad_arguments(change, error, words):
    q, kw = _good()
    kw.update(change)
    with pytest.raises(error, match=words):
        cogvideo_attention(q, q, q, **kw)


def test_bad_tensors():
    q, kw = _good()
    with pytest.raises(TypeError, match="q must be floating"):
        cogvideo_attention(q.long(), q, q, **kw)
    with pytest.raises(ValueError, match="k must have q's shape"):
        cogvideo_attention(q, q[:, :-1], q, **kw)
    with pytest.raises(TypeError, match="v must have q's dtype"):
        cogvideo_attention(q, q, q.double(), **kw)
    with pytest.raises(ValueError, match="4-D"):
        cogvideo_attention(q[0], q[0], q[0], **kw)
    with pytest.raises(ValueError, match="alpha_logit"):
        dual_channel_mix(q[:, :, 0], q[:, :, 0], torch.zeros(2), text_len=2)
    with pytest.raises(ValueError, match="backend"):
        cogvideo_attention(q, q, q, **{**kw, "backend": "cuda"})


@needs_cpp
def test_opcheck():
    q, k, v = (x.requires_grad_(True) for x in _inputs(1, 2 + 5 * 4, 2, 3, torch.float32))
    pad = torch.tensor([[True, False]])
    args = (pad, 2, 5, 2, 2, "plus", "window", 1, True, "interpolation")
    torch.library.opcheck(torch.ops.torchnova.cogvideo_attention_fwd.default, (q, k, v, *args))
    out, lse = torch.ops.torchnova.cogvideo_attention_fwd(q.detach(), k.detach(), v.detach(), *args)
    torch.library.opcheck(torch.ops.torchnova.cogvideo_attention_bwd.default,
                          (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, *args))
    base, plus = (torch.randn(2, 5, 3, requires_grad=True) for _ in range(2))
    logit = torch.randn(3, requires_grad=True)
    torch.library.opcheck(torch.ops.torchnova.dual_channel_mix_fwd.default, (base, plus, logit, 2))
    torch.library.opcheck(torch.ops.torchnova.dual_channel_mix_bwd.default,
                          (torch.randn(2, 5, 3), base.detach(), plus.detach(), logit.detach(), 2))


@needs_cpp
def test_compile_fullgraph():
    torch._dynamo.reset()
    q, k, v = _inputs(1, 2 + 5 * 4, 1, 4, torch.float32)
    logit = torch.zeros(4)

    def layer(q, k, v):
        kw = dict(text_len=2, frames=5, grid=2, backend="cpp")
        base = cogvideo_attention(q, k, v, channel="base", **kw)
        plus = cogvideo_attention(q, k, v, channel="plus", attention="window", window=1, **kw)
        return dual_channel_mix(base.flatten(2), plus.flatten(2), logit, text_len=2, backend="cpp")

    with torch._dynamo.config.patch(recompile_limit=1, error_on_recompile=True):
        compiled = torch.compile(layer, fullgraph=True, backend="eager")
        torch.testing.assert_close(compiled(q, k, v), layer(q, k, v))
        compiled(q + 1, k, v)


# ---------------------------------------------------------------------------------------------------------
# module
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=needs_cpp)])
def test_module_training_step_changes_only_plus(backend):
    from torchnova.nn import DualChannelAttention

    torch.manual_seed(0)
    layer = DualChannelAttention(8, 2, text_len=2, frames=5, grid=(2, 4), attention="window", window=2,
                                 shifted=True, stage="interpolation", backend=backend)
    assert torch.equal(layer.plus_qkv.weight, layer.qkv.weight) and (layer.plus_dense.bias == 0).all()
    assert (torch.sigmoid(layer.alpha_logit) == 0.5).all()
    wrapped = DualChannelAttention.from_base(layer, attention="full", stage="sequential")
    assert torch.equal(wrapped.qkv.weight, layer.qkv.weight) and not wrapped.qkv.weight.requires_grad
    before = {name: p.detach().clone() for name, p in layer.named_parameters()}
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    u = torch.randn(2, 2 + 5 * 8, 8)
    layer(u, text_pad_mask=torch.tensor([[True, False], [True, True]])).square().mean().backward()
    opt.step()
    trained = {"plus_qkv.weight", "plus_qkv.bias", "plus_dense.weight", "plus_dense.bias", "alpha_logit"}
    for name, p in layer.named_parameters():
        assert torch.equal(p, before[name]) != (name in trained), name


@needs_cpp
def test_example_quick():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "train_dual_channel.py"
    spec = importlib.util.spec_from_file_location("train_dual_channel", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    first, last, unchanged = example.main(["--quick"])
    assert last < first and unchanged
