"""CogVideo dual-channel attention: the visibility rule vs CogVideo's own construction, kernels vs the float64
reference in every mode, padding, bad input, gradcheck, opcheck, compile. The Triton kernels run on CPU under
TRITON_INTERPRET=1 (conftest.py) with 16-token tiles, on tiny grids: the interpreter is slow."""

from __future__ import annotations

import itertools

import pytest
import torch

from torchnova import _ext, cogvideo_attention, dual_channel_mix
from torchnova.dual_channel import triton_kernels
from torchnova.dual_channel.masks import visibility
from torchnova.dual_channel.reference import cogvideo_attention_ref, dual_channel_mix_ref
from utils import assert_close, assert_within_low_precision_error, gpu_meaningful, skip_unless_runs

needs_cpp = pytest.mark.skipif(not _ext.HAS_CPP, reason="C++ extension not built")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # where the Triton tests run (CPU: the interpreter)

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
@pytest.mark.parametrize(
    "layout", [(3, 5, 8, 8, 4), (1, 5, 4, 6, 2), (2, 5, 6, 4, 2), (0, 1, 2, 2, 1), (1, 2, 2, 4, 2), (2, 4, 4, 4, 2),
               (1, 6, 2, 2, 1), (1, 7, 4, 2, 2)], ids=str)  # fmt: skip
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


def _inputs(batch, length, heads, dim, dtype, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, length, heads, dim, generator=g, dtype=torch.float64).to(device, dtype)
            for _ in range(3)]  # fmt: skip


def _check_against_reference(backend, mode, dtype, text_len=3, frames=5, grid=(8, 8), window=4, heads=2, dim=5,
                             pad=None, strided=False, device="cpu"):
    channel, attention, shifted, stage = mode
    length = text_len + frames * grid[0] * grid[1]
    q, k, v = _inputs(2, length, heads, dim, dtype, device=device)
    skip_unless_runs("cogvideo_attention", backend, x=q, head_dim=dim)
    if strided:  # non-contiguous (B, L, H, D) views with stride(-1) == 1
        q, k, v = (torch.cat([x, x], dim=2)[:, :, ::2] for x in (q, k, v))
    pad = pad.to(device) if pad is not None else None
    kw = dict(text_len=text_len, frames=frames, grid=grid, channel=channel, attention=attention, window=window,
              shifted=shifted, stage=stage, text_pad_mask=pad)
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    out = cogvideo_attention(*leaves, backend=backend, **kw)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(device)
    grads = torch.autograd.grad(out, leaves, grad_out.to(dtype))
    ref_leaves = [x.detach().cpu().double().requires_grad_(True) for x in (q, k, v)]
    pad = pad.cpu() if pad is not None else None
    ref = cogvideo_attention_ref(*ref_leaves, pad, text_len, frames, grid[0], grid[1], channel, attention, window,
                                 shifted, stage)[0]
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad_out.cpu())
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


@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=needs_cpp), "triton"])
@pytest.mark.parametrize("frames", [1, 2, 4, 6])
@pytest.mark.parametrize("channel", ["base", "plus"])
def test_interpolation_any_frame_count(backend, frames, channel):
    # CogVideo's rule for any count: key frames are the even indices (it released 5 frames; 0, 2, 4 given)
    device = DEVICE if backend == "triton" else "cpu"
    mode = (channel, "window", True, "interpolation")
    _check_against_reference(backend, mode, torch.float32, text_len=2, frames=frames, grid=(2, 4), window=2,
                             heads=1, dim=4, device=device)  # fmt: skip


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


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=needs_cpp), "triton"])
@pytest.mark.parametrize("channel", ["base", "plus"])
def test_whole_padding_rows_no_nan(backend, channel):
    device = DEVICE if backend == "triton" else "cpu"
    q, k, v = (x.requires_grad_(True) for x in _inputs(2, 3 + 5 * 4, 1, 4, torch.float32, device=device))
    skip_unless_runs("cogvideo_attention", backend, x=q, head_dim=4)
    pad = torch.tensor([[False, False, False], [True, False, False]], device=device)
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


@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=needs_cpp), "triton"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=str)
def test_mix_matches_reference(backend, dtype, monkeypatch):
    monkeypatch.setattr(triton_kernels, "MIX_BLOCK_R", 4)  # several row chunks: partial sums of d alpha_logit
    monkeypatch.setattr(triton_kernels, "MIX_BLOCK_C", 16)
    device = DEVICE if backend == "triton" else "cpu"
    g = torch.Generator().manual_seed(0)
    base, plus = (torch.randn(3, 7, 21, generator=g, dtype=torch.float64) for _ in range(2))
    logit = torch.randn(21, generator=g, dtype=torch.float64)
    leaves = [x.to(device, dtype).requires_grad_(True) for x in (base, plus, logit)]
    skip_unless_runs("dual_channel_mix", backend, x=leaves[0])
    y = dual_channel_mix(*leaves, text_len=2, backend=backend)
    grad_y = torch.randn(y.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad(y, leaves, grad_y.to(device, dtype))
    ref_leaves = [x.to(dtype).double().requires_grad_(True) for x in (base, plus, logit)]
    ref = dual_channel_mix_ref(*ref_leaves, 2)
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad_y)
    assert_close(y, ref, dtype, "fwd", "y")
    for name, got, want in zip(("d_base", "d_plus", "d_alpha_logit"), grads, ref_grads):
        assert_close(got, want, dtype, "grad", name)
    assert (grads[1][:, :2] == 0).all()  # text rows take o_base only
    if backend == "triton" and not _ext.TRITON_INTERPRET:  # d alpha_logit: per-program partial sums in a fixed
        # order (GPU-meaningful: the interpreter runs programs one after another, so this cannot fail there)
        again = torch.autograd.grad(dual_channel_mix(*leaves, text_len=2, backend=backend), leaves,
                                    grad_y.to(device, dtype))  # fmt: skip
        assert all(torch.equal(a, b) for a, b in zip(grads, again))


@needs_cpp
def test_mix_gradcheck_cpp():
    leaves = [torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in ((2, 4, 3), (2, 4, 3), (3,))]
    assert torch.autograd.gradcheck(lambda a, b, c: dual_channel_mix(a, b, c, text_len=1, backend="cpp"), leaves)


# ---------------------------------------------------------------------------------------------------------
# Triton kernels (CPU: the interpreter; tiny grids, 16-token tiles so that several tiles and skipping happen)
# ---------------------------------------------------------------------------------------------------------

PAD = torch.tensor([[True, False, True], [False, False, False]])  # batch 1: all text padded (empty base rows)
# (mode, head dim, heads, strided): D 16, one non-power-of-two D (24), D 8; two heads on strided views
TRITON_CASES = [
    (MODES[0], 16, 1, False), (MODES[1], 24, 1, False), (MODES[2], 8, 2, True), (MODES[3], 16, 1, False),
    (MODES[4], 24, 1, True), (MODES[5], 16, 1, False), (MODES[6], 16, 1, False), (MODES[7], 8, 1, True),
]  # fmt: skip


@pytest.fixture
def small_tiles(monkeypatch):
    monkeypatch.setattr(triton_kernels, "BLOCK_M", 16)
    monkeypatch.setattr(triton_kernels, "BLOCK_N", 16)


@pytest.mark.parametrize("mode, dim, heads, strided", TRITON_CASES, ids=MODE_IDS)
def test_triton_matches_reference(mode, dim, heads, strided, small_tiles):
    # text 3, 5 frames of 4x4 (L = 83: 6 query x 6 key tiles), window 2; padding with a whole-padding batch row
    _check_against_reference("triton", mode, torch.float32, grid=(4, 4), window=2, heads=heads, dim=dim, pad=PAD,
                             strided=strided, device=DEVICE)  # fmt: skip


@pytest.mark.parametrize("mode", [MODES[1], MODES[6]], ids=[MODE_IDS[1], MODE_IDS[6]])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_triton_low_precision(mode, dtype, small_tiles):
    if DEVICE == "cpu" and dtype == torch.bfloat16:
        pytest.skip("bf16 tl.dot is wrong in the Triton interpreter: bf16 runs on a GPU only")
    _check_against_reference("triton", mode, dtype, grid=(4, 4), window=2, heads=1, dim=16, pad=PAD, device=DEVICE)
    # and within 2x the error of the reference computed from the same low-precision inputs (DESIGN.md)
    q, k, v = _inputs(2, 3 + 5 * 16, 1, 16, dtype, device=DEVICE)
    args = (PAD, 3, 5, 4, 4, mode[0], mode[1], 2, mode[2], mode[3])
    out = cogvideo_attention(q, k, v, text_len=3, frames=5, grid=4, channel=mode[0], attention=mode[1], window=2,
                             shifted=mode[2], stage=mode[3], text_pad_mask=PAD.to(DEVICE), backend="triton")
    low = cogvideo_attention_ref(q.cpu(), k.cpu(), v.cpu(), *args)[0]
    exact = cogvideo_attention_ref(q.cpu().double(), k.cpu().double(), v.cpu().double(), *args)[0]
    assert out.dtype == dtype
    assert_within_low_precision_error(out, low, exact, dtype, "triton out")


@pytest.mark.parametrize("mode", [MODES[0], MODES[7]], ids=[MODE_IDS[0], MODE_IDS[7]])
def test_triton_lse_matches_reference(mode, small_tiles):
    """The saved lse equals the reference's, +inf exactly on the rows with no visible key."""
    q, k, v = _inputs(2, 3 + 5 * 16, 1, 8, torch.float32, device=DEVICE)
    skip_unless_runs("cogvideo_attention", "triton", x=q, head_dim=8)
    args = (3, 5, 4, 4, mode[0], mode[1], 2, mode[2], mode[3])
    out, lse = torch.ops.torchnova.cogvideo_attention_fwd_triton(q, k, v, PAD.to(DEVICE), *args)
    ref_out, ref_lse = cogvideo_attention_ref(q.cpu().double(), k.cpu().double(), v.cpu().double(), PAD, *args)
    assert lse.dtype == torch.float32 and lse.shape == (2, 83, 1)
    assert torch.equal(torch.isinf(lse.cpu()), torch.isinf(ref_lse)) and torch.isinf(ref_lse).any()
    finite = torch.isfinite(ref_lse)
    assert_close(lse.cpu()[finite], ref_lse[finite], torch.float32, "fwd", "lse")
    assert_close(out, ref_out, torch.float32, "fwd", "out")


@gpu_meaningful
def test_triton_backward_deterministic(small_tiles):
    q, k, v = (x.requires_grad_(True) for x in _inputs(1, 3 + 5 * 16, 1, 16, torch.float32, device=DEVICE))
    skip_unless_runs("cogvideo_attention", "triton", x=q, head_dim=16)
    kw = dict(text_len=3, frames=5, grid=4, channel="plus", attention="window", window=2, shifted=True,
              stage="sequential", backend="triton")  # fmt: skip
    grad_out = torch.randn(q.shape, device=DEVICE)
    first = torch.autograd.grad(cogvideo_attention(q, k, v, **kw), (q, k, v), grad_out)
    second = torch.autograd.grad(cogvideo_attention(q, k, v, **kw), (q, k, v), grad_out)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def _tile_any(dense, block_m, block_n):
    """(L, L) bool -> (cdiv(L, block_m), cdiv(L, block_n)): whether each tile holds a visible pair."""
    length = dense.shape[0]
    rows, cols = -(-length // block_m), -(-length // block_n)
    padded = torch.zeros(rows * block_m, cols * block_n, dtype=torch.bool)
    padded[:length, :length] = dense
    return padded.view(rows, block_m, cols, block_n).any(3).any(1)


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_triton_tile_test_never_skips_a_visible_pair(mode):
    """The kernels' tile lists (jit block_may_see) vs the dense mask: a skipped tile has no visible pair, and
    the window rule skips tiles that the causal rule alone would keep. 16 x 8 tiles on a 4 x 8 grid: a query
    tile is two rows of a frame, a key tile one row."""
    if not triton_kernels.HAS_TRITON:
        pytest.skip("triton is not importable")
    channel, attention, shifted, stage = mode
    layout = (3, 5, 4, 8, channel, attention, 2, shifted, stage)
    table = triton_kernels.tile_table(*layout, block_m=16, block_n=8, device=DEVICE).cpu()
    visible = _tile_any(visibility(*layout), 16, 8)
    assert not (visible & ~table).any(), "a tile with visible pairs would be skipped"
    assert table.sum() < table.numel()
    if attention == "window" and stage == "sequential" and not shifted:  # fewer tiles than the causal rule alone
        causal = triton_kernels.tile_table(3, 5, 4, 8, "plus", "full", stage=stage, block_m=16, block_n=8,
                                           device=DEVICE).cpu()  # fmt: skip
        assert table.sum() < causal.sum() and not (table & ~causal).any()


def test_triton_tile_lists_skip_outside_windows():
    """The tile lists the kernels loop over (text 3, 2 frames of 8x8, window 4, 16-token tiles: a query tile is
    two rows, one row of windows): the window rule lists fewer key tiles per query tile than the causal rule,
    and each list is exactly the tiles with a visible pair here."""
    if not triton_kernels.HAS_TRITON:
        pytest.skip("triton is not importable")
    tables = {}
    for attention in ("full", "window"):
        layout = (3, 2, 8, 8, "plus", attention, 4, False, "sequential")
        tables[attention] = triton_kernels.tile_table(*layout, block_m=16, block_n=16, device=DEVICE).cpu()
        assert torch.equal(tables[attention], _tile_any(visibility(*layout), 16, 16))
    assert tables["window"].sum() < tables["full"].sum() < 9 * 9
    assert (tables["window"].sum(1) <= tables["full"].sum(1)).all()


def test_triton_forced_unsupported_raises():
    q = torch.randn(1, 2 + 5 * 4, 1, 4, dtype=torch.float64)
    kw = dict(text_len=2, frames=5, grid=2, channel="base", backend="triton")
    with pytest.raises(ValueError, match=r"`triton` is not supported because:(.|\n)*dtype=float64"):
        cogvideo_attention(q, q, q, **kw)
    wide = torch.randn(1, 2 + 5 * 4, 1, 264)
    with pytest.raises(ValueError, match=r"head dim D=264 > 256"):
        cogvideo_attention(wide, wide, wide, **kw)
    many = torch.randn(1, 2 + 5 * 4, 65536, 1)
    with pytest.raises(ValueError, match=r"B\*H = 65536 > 65535"):
        cogvideo_attention(many, many, many, **kw)
    with pytest.raises(ValueError, match=r"`triton` is not supported because:(.|\n)*dtype=float64"):
        dual_channel_mix(q[:, :, 0], q[:, :, 0], torch.zeros(4, dtype=torch.float64), text_len=2, backend="triton")


def test_opcheck_triton_ops(small_tiles):
    q, k, v = _inputs(1, 2 + 5 * 4, 2, 16, torch.float32, device=DEVICE)
    skip_unless_runs("cogvideo_attention", "triton", x=q, head_dim=16)
    ops = torch.ops.torchnova
    args = (torch.tensor([[True, False]], device=DEVICE), 2, 5, 2, 2, "base", "full", 1, False, "interpolation")
    torch.library.opcheck(ops.cogvideo_attention_fwd_triton.default, (q.clone().requires_grad_(True), k, v, *args))
    out, lse = ops.cogvideo_attention_fwd_triton(q, k, v, *args)
    torch.library.opcheck(ops.cogvideo_attention_bwd_triton.default, (torch.randn_like(out), q, k, v, out, lse, *args))
    base, plus = (torch.randn(2, 5, 3, device=DEVICE, requires_grad=True) for _ in range(2))
    logit = torch.randn(3, device=DEVICE, requires_grad=True)
    torch.library.opcheck(ops.dual_channel_mix_fwd_triton.default, (base, plus, logit, 2))
    torch.library.opcheck(ops.dual_channel_mix_bwd_triton.default,
                          (torch.randn(2, 5, 3, device=DEVICE), base.detach(), plus.detach(), logit.detach(), 2))


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
        (dict(frames=0), ValueError, "frames"),
        (dict(text_len=3), ValueError, r"L = q.shape\[1\] must equal text_len \+ frames \* grid_h \* grid_w = 3 \+ 5"),
        (dict(grid=(4, 6)), ValueError, r"L = q.shape\[1\] must equal .* = 2 \+ 5 \* 4 \* 6 = 122, got 82"),
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


@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=needs_cpp), "triton"])
def test_compile_fullgraph(backend):
    torch._dynamo.reset()
    device = DEVICE if backend == "triton" else "cpu"
    q, k, v = _inputs(1, 2 + 5 * 4, 1, 4, torch.float32, device=device)
    skip_unless_runs("cogvideo_attention", backend, x=q, head_dim=4)
    logit = torch.zeros(4, device=device)

    def layer(q, k, v):
        kw = dict(text_len=2, frames=5, grid=2, backend=backend)
        base = cogvideo_attention(q, k, v, channel="base", **kw)
        plus = cogvideo_attention(q, k, v, channel="plus", attention="window", window=1, **kw)
        return dual_channel_mix(base.flatten(2), plus.flatten(2), logit, text_len=2, backend=backend)

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
