"""Property-based tests of mesa_kl on every backend vs the float64 reference: loss (every reduction, row mask)
and the student gradient, and KL >= 0 on every row.

Drawn: 0, 1 or 2 leading dims including size 0 (no rows) and 1; C = 1 (KL exactly 0), small primes, powers of
two and their neighbours; contiguous, row-strided, transposed (class-major storage) and class-strided logits;
temperature; teacher independent of, equal to, a per-row shift of (KL exactly 0), or a small perturbation of
the student; teacher columns at -inf (p = 0); logits scaled up to 1e3 (extreme softmax).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import strategies as st

from properties import (
    check_property, compare, device_of, fuzz_backends, laid_out, op_backend, randn, running_on, seeds,
    supported_dtypes,
)  # fmt: skip
from torchnova import mesa_kl
from torchnova.mesa.ops import _reduce
from torchnova.mesa.reference import mesa_kl_rows_ref
from utils import TOLERANCES

OP = "mesa_kl"
REDUCTIONS = ("batchmean", "sum", "mean", "none")
CLASSES = (1, 2, 3, 7, 8, 10, 31, 64, 100, 257)


@st.composite
def mesa_cases(draw, dtypes):
    lead = tuple(draw(st.lists(st.sampled_from((0, 1, 2, 3, 5)), max_size=2)))
    rows = math.prod(lead)
    return dict(
        lead=lead,
        C=draw(st.sampled_from(CLASSES)),
        dtype=draw(st.sampled_from(dtypes)),
        layout=draw(st.sampled_from(("contiguous", "strided", "transposed", "head_dim_strided"))),
        temperature=draw(st.sampled_from((1.0, 5.0)) | st.floats(0.25, 20.0)),
        reduction=draw(st.sampled_from(REDUCTIONS)),
        mask=draw(st.one_of(st.none(), st.lists(st.booleans(), min_size=rows, max_size=rows))),
        teacher=draw(st.sampled_from(("independent", "independent", "equal", "shifted", "perturbed"))),
        teacher_neg_inf=draw(st.booleans()),
        magnitude=draw(st.sampled_from((1.0, 1.0, 10.0, 1000.0))),
        grad=draw(st.sampled_from(("random", "one"))),
        seed=draw(seeds),
    )


def _logits(case, device):
    lead, C, dtype = case["lead"], case["C"], case["dtype"]
    z = randn((*lead, C), torch.float64, case["seed"], scale=case["magnitude"])
    kind = case["teacher"]
    if kind == "independent":
        t = randn((*lead, C), torch.float64, case["seed"] + 1, scale=case["magnitude"])
    elif kind == "equal":
        t = z.clone()
    elif kind == "shifted":  # softmax is shift-invariant: KL exactly 0
        t = z + randn((*lead, 1), torch.float64, case["seed"] + 1).round()  # integer shift: exact in fp16 too
    else:
        t = z + 1e-3 * randn((*lead, C), torch.float64, case["seed"] + 1)
    if case["teacher_neg_inf"] and C > 1:
        t[..., 0] = float("-inf")  # p = 0 in that class: contributes exactly 0
    layout = case["layout"]
    if len(lead) == 0 and layout in ("strided", "transposed"):
        layout = "contiguous"
    to = lambda x: laid_out(x.to(device=device, dtype=dtype), layout, swap=(-1, -2))  # noqa: E731
    return to(z), to(t)


def _absmax(x: torch.Tensor) -> float:
    return x.detach().abs().max().item() if x.numel() else 0.0


def _degenerate(case) -> bool:
    """KL is (about) 0, so q - p is rounding: its gradient is compared with an absolute bound."""
    return case["teacher"] in ("equal", "shifted", "perturbed") or case["C"] == 1


def _check(backend, case):
    device = device_of(backend)
    dtype = case["dtype"]
    z, t = _logits(case, device)
    mask = None
    if case["mask"] is not None:
        mask = torch.tensor(case["mask"], dtype=torch.bool, device=device).reshape(case["lead"])
    student = z.detach().requires_grad_(True)
    tau = case["temperature"]
    kw = dict(temperature=tau, reduction=case["reduction"], mask=mask)
    with running_on(OP, backend, student_logits=student, teacher_logits=t):
        loss = mesa_kl(student, t, backend=op_backend(backend), **kw)
        rows = mesa_kl(z.detach(), t, backend=op_backend(backend), temperature=case["temperature"],
                       reduction="none")  # fmt: skip
        g = torch.ones_like(loss)
        if case["grad"] == "random":
            g = randn(loss.shape, loss.dtype, case["seed"] + 2, device)
        (grad,) = torch.autograd.grad(loss, student, g)
    # KL >= 0 on every row (and so every reduction), whatever the rounding
    assert not (rows < 0).any(), f"{backend}: negative KL rows {rows[rows < 0].tolist()} {case}"
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all(), f"{backend}: non-finite {case}"

    ref_student = z.detach().cpu().double().requires_grad_(True)
    t64 = t.detach().cpu().double()
    ref_rows = mesa_kl_rows_ref(ref_student.detach().reshape(-1, case["C"]), t64.reshape(-1, case["C"]), tau)
    ref = mesa_kl(ref_student, t64, backend="reference", **kw)
    (ref_grad,) = torch.autograd.grad(ref, ref_student, g.cpu().double())
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert loss.shape == ref.shape and ref_rows.numel() == rows.numel()

    # KL = sum_c p_c (t'_c - z'_c) - lse(t') + lse(z') cancels terms of size |t'|, |z'|, log C (t' = t / tau): in
    # the accumulation dtype its rounding error is a few ulps of those, tau^2 * (max|t'| + max|z'| + log C + 1)
    # per row, however small KL itself is (teacher == student, large tau). That conditioning is added to the
    # table's tolerance; a wrong formula is off by far more.
    eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    finite_max = lambda x: torch.where(x.isfinite(), x.abs(), 0).reshape(-1, case["C"]).amax(-1)  # noqa: E731
    magnitude = finite_max(t64 / tau) + finite_max(z.detach().cpu().double() / tau)  # (rows,)
    cond_rows = tau * tau * (magnitude + math.log(case["C"]) + 1)
    cond = _reduce(cond_rows, mask.cpu() if mask is not None else None, case["reduction"], case["lead"], case["C"])
    atol, rtol = TOLERANCES["fwd"][dtype]
    want = ref.detach()
    bound = atol * max(1.0, _absmax(want)) + rtol * want.abs() + 32 * eps * cond
    assert ((loss.detach().double().cpu() - want).abs() <= bound).all(), (
        f"{backend} loss {loss.tolist()} vs float64 {want.tolist()} (bound {bound.tolist()}) {case}")
    row_bound = 32 * eps * cond_rows.reshape(rows.shape) + rtol * ref_rows.reshape(rows.shape).abs()
    assert ((rows.double().cpu() - ref_rows.reshape(rows.shape)).abs() <= row_bound).all(), case
    if _degenerate(case):
        # q - p is rounding of ~0: bound its absolute error by a few ulps of the exponents, as for the loss
        grad_bound = 64 * eps * tau * (_absmax(magnitude) + 1) * _absmax(g)
        if dtype in (torch.float16, torch.bfloat16):  # the gradient is stored in the logits' dtype
            grad_bound += 2 * torch.finfo(dtype).eps * _absmax(ref_grad)
        assert _absmax(grad.double().cpu() - ref_grad) <= grad_bound, case
    else:
        compare(grad, ref_grad, dtype, "grad", f"{backend} grad {case}")


@pytest.mark.parametrize("backend", fuzz_backends(OP))
def test_mesa_kl_matches_float64(backend):
    device = device_of(backend)
    probe = lambda d: dict(student_logits=torch.empty(1, 2, dtype=d, device=device))  # noqa: E731
    dtypes = supported_dtypes(OP, backend, probe, (torch.float32, torch.float64, torch.float16, torch.bfloat16))
    check_property(backend, mesa_cases(dtypes), lambda case: _check(backend, case), weight=3)


@pytest.mark.parametrize("backend", fuzz_backends(OP))
@pytest.mark.parametrize("classes, teacher", [(1, "identical"), (2, "identical"), (1000, "identical"),
                                              (1, "independent")])  # fmt: skip
def test_mesa_kl_zero_kl_not_negative(backend, classes, teacher):
    # KL = 0 exactly for identical logits, and for one class whatever the logits (p = q = 1); rounding of
    # sum p (t' - z') - lse(t') + lse(z') must not make it negative (it was about -4e-7 for one class).
    device = device_of(backend)
    supported_dtypes(OP, backend, lambda d: dict(student_logits=torch.empty(1, 2, dtype=d, device=device)),
                     (torch.float32,))  # skips (with the reasons) where the backend cannot run here
    z = randn((64, classes), torch.float32, classes, device, scale=30.0)
    t = z.clone() if teacher == "identical" else randn((64, classes), torch.float32, classes + 1, device, scale=30.0)
    with running_on(OP, backend, student_logits=z, teacher_logits=t):
        rows = mesa_kl(z, t, temperature=1.0, reduction="none", backend=op_backend(backend))
    assert (rows >= 0).all(), rows[rows < 0]
    assert rows.abs().max() < 1e-4
