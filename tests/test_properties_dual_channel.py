"""Property-based tests of CogVideo dual-channel attention and the alpha mix on every backend vs the float64
reference: forward and every gradient.

cogvideo_attention, drawn: every channel x attention x shifted x stage, any frame count (interpolation
included: key frames are the even indices), odd and non-square grids with any window dividing both sides,
text_len 0.., text_pad_mask (whole rows padded too), B = 0, H and D odd/prime, strided and transposed q, k, v.
dual_channel_mix, drawn: B = 0, L = 0, text_len 0..L, odd hidden sizes, strided/transposed inputs,
alpha_logit of fp32 or the inputs' dtype. Profiles: tests/hypothesis_profiles.py.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import strategies as st

from properties import (
    check_property, compare, device_of, fuzz_backends, grad_like, laid_out, op_backend, randn, running_on, seeds,
    supported_dtypes,
)  # fmt: skip
from torchnova import cogvideo_attention, dual_channel_mix
from torchnova.dual_channel.reference import cogvideo_attention_ref, dual_channel_mix_ref

OP, MIX_OP = "cogvideo_attention", "dual_channel_mix"
DTYPES = (torch.float32, torch.float64, torch.float16)


def _divisors(n):
    return [w for w in range(1, n + 1) if n % w == 0]


@st.composite
def attention_cases(draw, dtypes, small: bool):
    grid_h = draw(st.integers(1, 3 if small else 5))
    grid_w = draw(st.integers(1, 4 if small else 6))
    text_len = draw(st.integers(0, 3 if small else 5))
    batch = draw(st.sampled_from((0, 1, 2)))
    channel = draw(st.sampled_from(("base", "plus")))
    attention = draw(st.sampled_from(("full", "window")))
    common = [w for w in _divisors(grid_h) if grid_w % w == 0]
    return dict(
        B=batch,
        text_len=text_len,
        frames=draw(st.integers(1, 4 if small else 7)),
        grid=(grid_h, grid_w),
        H=draw(st.sampled_from((1, 2, 3))),
        D=draw(st.sampled_from((1, 3, 4, 5, 8, 16) if small else (1, 3, 4, 5, 8, 16, 17, 40))),
        dtype=draw(st.sampled_from(dtypes)),
        channel=channel,
        attention=attention,
        # base ignores the window: any window (also one that divides nothing) must be accepted there
        window=draw(st.sampled_from(common) if channel == "plus" and attention == "window" else st.integers(1, 4)),
        shifted=draw(st.booleans()),
        stage=draw(st.sampled_from(("sequential", "interpolation"))),
        pad=draw(st.one_of(st.none(), st.lists(st.booleans(), min_size=batch * text_len, max_size=batch * text_len))),
        layout=draw(st.sampled_from(("contiguous", "strided", "transposed"))),
        grad=draw(st.sampled_from(("random", "ones"))),
        seed=draw(seeds),
    )


def _check_attention(backend, case):
    device = device_of(backend)
    dtype, (gh, gw) = case["dtype"], case["grid"]
    length = case["text_len"] + case["frames"] * gh * gw
    shape = (case["B"], length, case["H"], case["D"])
    leaves = [laid_out(randn(shape, dtype, case["seed"] + i, device), case["layout"], swap=(1, 2))
              .detach().requires_grad_(True) for i in range(3)]  # fmt: skip
    pad = None
    if case["pad"] is not None:
        pad = torch.tensor(case["pad"], dtype=torch.bool).reshape(case["B"], case["text_len"]).to(device)
    layout = (case["text_len"], case["frames"], gh, gw, case["channel"], case["attention"], case["window"],
              case["shifted"], case["stage"])  # fmt: skip
    kw = dict(text_len=case["text_len"], frames=case["frames"], grid=case["grid"], channel=case["channel"],
              attention=case["attention"], window=case["window"], shifted=case["shifted"], stage=case["stage"],
              text_pad_mask=pad)  # fmt: skip
    with running_on(OP, backend, x=leaves[0], head_dim=case["D"]):
        out = cogvideo_attention(*leaves, backend=op_backend(backend), **kw)
        grad = grad_like(out, case["grad"], case["seed"] + 3)
        grads = torch.autograd.grad(out, leaves, grad)
    ref_leaves = [x.detach().cpu().double().requires_grad_(True) for x in leaves]
    ref = cogvideo_attention_ref(*ref_leaves, pad.cpu() if pad is not None else None, *layout)[0]
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad.cpu().double())
    assert out.dtype == dtype and out.shape == shape
    compare(out, ref, dtype, "fwd", f"{backend} out {case}")
    for name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads):
        compare(got, want, dtype, "grad", f"{backend} {name} {case}")


@pytest.mark.parametrize("backend", fuzz_backends(OP))
def test_cogvideo_attention_matches_float64(backend):
    device = device_of(backend)
    small = backend in ("triton", "cuda-emulated")
    probe = lambda d: dict(x=torch.empty(1, 1, 1, 8, dtype=d, device=device), head_dim=8)  # noqa: E731
    dtypes = supported_dtypes(OP, backend, probe, DTYPES)
    check_property(backend, attention_cases(dtypes, small), lambda case: _check_attention(backend, case), weight=3)


@st.composite
def mix_cases(draw, dtypes):
    length = draw(st.integers(0, 9))
    return dict(
        B=draw(st.sampled_from((0, 1, 2, 3))),
        L=length,
        hidden=draw(st.sampled_from((1, 2, 3, 5, 8, 17, 64, 67))),
        text_len=draw(st.integers(0, length)),
        dtype=draw(st.sampled_from(dtypes)),
        alpha_fp32=draw(st.booleans()),
        layout=draw(st.sampled_from(("contiguous", "strided", "transposed", "head_dim_strided"))),
        grad=draw(st.sampled_from(("random", "ones"))),
        seed=draw(seeds),
    )


def _check_mix(backend, case):
    device = device_of(backend)
    dtype = case["dtype"]
    shape = (case["B"], case["L"], case["hidden"])
    base, plus = (laid_out(randn(shape, dtype, case["seed"] + i, device), case["layout"], swap=(0, 1))
                  .detach().requires_grad_(True) for i in range(2))  # fmt: skip
    alpha_dtype = torch.float32 if case["alpha_fp32"] and dtype != torch.float64 else dtype
    alpha = randn((case["hidden"],), alpha_dtype, case["seed"] + 2, device, scale=2.0).requires_grad_(True)
    with running_on(MIX_OP, backend, x=base):
        y = dual_channel_mix(base, plus, alpha, text_len=case["text_len"], backend=op_backend(backend))
        grad = grad_like(y, case["grad"], case["seed"] + 3)
        grads = torch.autograd.grad(y, (base, plus, alpha), grad)
    ref_leaves = [x.detach().cpu().double().requires_grad_(True) for x in (base, plus, alpha)]
    ref = dual_channel_mix_ref(*ref_leaves, case["text_len"])
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad.cpu().double())
    assert y.dtype == dtype and y.shape == shape
    compare(y, ref, dtype, "fwd", f"{backend} y {case}")
    for name, got, want in zip(("d_base", "d_plus", "d_alpha_logit"), grads, ref_grads):
        assert got.dtype == (alpha_dtype if name == "d_alpha_logit" else dtype), name
        compare(got, want, dtype, "grad", f"{backend} {name} {case}")


@pytest.mark.parametrize("backend", fuzz_backends(MIX_OP))
def test_dual_channel_mix_matches_float64(backend):
    device = device_of(backend)
    probe = lambda d: dict(x=torch.empty(1, 1, 8, dtype=d, device=device))  # noqa: E731
    dtypes = supported_dtypes(MIX_OP, backend, probe, DTYPES)
    check_property(backend, mix_cases(dtypes), lambda case: _check_mix(backend, case))
