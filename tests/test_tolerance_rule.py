"""The comparison itself (tests/utils.py assert_close): wrong answers must fail, however small their values.

The rule used to scale atol by max(1, |ref|.max()), so for gradients far below 1 (mesa_kl with reduction="mean"
is 1e-6..1e-8 per element) the bound was an absolute 1e-5 and a zero, negated, doubled or teacher-ignoring
gradient passed; in bf16, a gradient 10 % too small passed. Each case below fails now, and the right answer
(the float64 reference rounded to the kernel's dtype, the best any kernel can return) still passes.
"""

from __future__ import annotations

import pytest
import torch

from torchnova.mesa.reference import mesa_kl_rows_ref
from utils import TOLERANCES, assert_close, magnitude_scale

TAU = 5.0


def mesa_mean_gradient(rows=8, classes=1000):
    """d mesa_kl(reduction="mean") / d student in float64, and the pieces of its formula tau (q - p) / (rows C)."""
    student = torch.randn(rows, classes, dtype=torch.float64) * 3
    teacher = torch.randn(rows, classes, dtype=torch.float64) * 3
    z = student.clone().requires_grad_(True)
    loss = mesa_kl_rows_ref(z, teacher, TAU).sum() / (rows * classes)
    (grad,) = torch.autograd.grad(loss, z)
    q, p = torch.softmax(student / TAU, -1), torch.softmax(teacher / TAU, -1)
    return grad, q, p, TAU / (rows * classes)


def test_mesa_mean_gradient_is_tiny_and_the_formula_is_right():
    grad, q, p, factor = mesa_mean_gradient()
    assert 1e-10 < grad.abs().max() < 1e-5  # the regime where an absolute atol of 1e-5 accepted anything
    assert_close(factor * (q - p), grad, torch.float64, "grad", "tau (q - p) / (rows C)")


@pytest.mark.parametrize("wrong", ["zero", "negated", "doubled", "teacher_ignored", "one_row_off"])
def test_wrong_small_mesa_gradients_fail(wrong):
    grad, q, p, factor = mesa_mean_gradient()
    right = grad.float()
    assert_close(right, grad, torch.float32, "grad", "the right gradient")
    bad = {
        "zero": torch.zeros_like(right),
        "negated": -right,
        "doubled": 2 * right,
        "teacher_ignored": (factor * q).float(),  # tau q / (rows C): the p term dropped
        "one_row_off": torch.cat([right[:1] * 1.01, right[1:]]),  # 1 % in one row only
    }[wrong]
    with pytest.raises(AssertionError, match="mismatches"):
        assert_close(bad, grad, torch.float32, "grad", wrong)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_gradient_scaled_by_0_9_fails(dtype):
    grad = torch.randn(6, 33, dtype=torch.float64)
    assert_close(grad.to(dtype), grad, dtype, "grad", "rounded")
    with pytest.raises(AssertionError, match="mismatches"):
        assert_close((grad * 0.9).to(dtype), grad, dtype, "grad", "scaled by 0.9")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_small_values_keep_their_digits(dtype):
    """A 1e-6-sized gradient in fp16 (below fp16's normal range) rounds to subnormals: the dtype's smallest
    normal floors the scale, so rounding passes and a 2x error still fails."""
    grad = torch.randn(50, dtype=torch.float64) * 1e-6
    assert_close(grad.to(dtype), grad, dtype, "grad", "rounded")
    if dtype != torch.float16:  # fp16 keeps 1e-6 only as a subnormal: 2x of it is within the floor
        with pytest.raises(AssertionError):
            assert_close((grad * 2).to(dtype), grad, dtype, "grad", "doubled")
    assert magnitude_scale(torch.zeros(3, dtype=torch.float64), dtype) == torch.finfo(dtype).tiny


def test_all_zero_reference_needs_zero():
    zero = torch.zeros(4, dtype=torch.float64)
    assert_close(torch.zeros(4), zero, torch.float32, "grad", "zeros")
    with pytest.raises(AssertionError):
        assert_close(torch.full((4,), 1e-30), zero, torch.float32, "grad", "not zero")


def test_non_finite_actual_fails_and_infinite_reference_entries_do_not_set_the_scale():
    ref = torch.tensor([1.0, float("inf"), 2.0], dtype=torch.float64)
    assert magnitude_scale(ref, torch.float32) == 2.0
    with pytest.raises(AssertionError, match="non-finite"):
        assert_close(torch.tensor([1.0, float("nan"), 2.0]), torch.ones(3, dtype=torch.float64), torch.float32,
                     "fwd", "nan")  # fmt: skip


def test_table_bounds_a_10_percent_error_in_every_dtype():
    """atol + rtol < 0.1: a 10 % error at the largest element exceeds the bound (both scale with it)."""
    for kind in TOLERANCES:
        for dtype, (atol, rtol) in TOLERANCES[kind].items():
            assert atol + rtol < 0.1, (kind, dtype)
