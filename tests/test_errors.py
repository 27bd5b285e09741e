"""Bad input raises ValueError/TypeError naming the argument, the expected and the actual value."""

from __future__ import annotations

import pytest
import torch

import torchnova
from utils import auto_cpu_backend, record_chosen_backends

Z = torch.randn(4, 10)
T = torch.randn(4, 10)


@pytest.mark.parametrize(
    "kwargs,error,pattern",
    [
        ({"student_logits": torch.tensor(1.0)}, ValueError, r"student_logits must have at least 1 dim.*0-d"),
        ({"teacher_logits": torch.tensor(1.0)}, ValueError, r"teacher_logits must have at least 1 dim"),
        ({"teacher_logits": torch.randn(4, 11)}, ValueError, r"teacher_logits must have the shape.*\(4, 10\).*\(4, 11\)"),
        ({"teacher_logits": torch.randn(2, 2, 10)}, ValueError, r"teacher_logits must have the shape"),
        ({"student_logits": torch.randint(0, 5, (4, 10))}, TypeError, r"student_logits must be a floating-point.*int64"),
        ({"teacher_logits": torch.randint(0, 5, (4, 10))}, TypeError, r"teacher_logits must be a floating-point"),
        ({"teacher_logits": T.double()}, TypeError, r"teacher_logits must have the dtype.*float32.*float64"),
        ({"teacher_logits": torch.empty(4, 10, device="meta")}, ValueError, r"teacher_logits must be on the device.*cpu.*meta"),
        ({"student_logits": torch.randn(4, 0), "teacher_logits": torch.randn(4, 0)}, ValueError, r"at least 1 class"),
        ({"student_logits": [[1.0]]}, TypeError, r"student_logits must be a torch.Tensor.*list"),
        ({"reduction": "avg"}, ValueError, r"reduction must be one of .*'avg'"),
        ({"temperature": 0.0}, ValueError, r"temperature must be a finite number > 0, got 0.0"),
        ({"temperature": -2}, ValueError, r"temperature must be a finite number > 0, got -2"),
        ({"temperature": float("nan")}, ValueError, r"temperature must be a finite number > 0"),
        ({"temperature": "5"}, TypeError, r"temperature must be a real number, got str"),
        ({"mask": torch.ones(4)}, TypeError, r"mask must be a bool tensor, got torch.float32"),
        ({"mask": torch.ones(5, dtype=torch.bool)}, ValueError, r"mask must have shape \(4,\).*got \(5,\)"),
        ({"mask": torch.ones(4, dtype=torch.bool, device="meta")}, ValueError, r"mask must be on the device"),
        ({"backend": "magic"}, ValueError, r"backend must be one of .*'magic'"),
    ],
)
def test_bad_input(kwargs, error, pattern):
    args = {"student_logits": Z, "teacher_logits": T, **kwargs}
    student, teacher = args.pop("student_logits"), args.pop("teacher_logits")
    with pytest.raises(error, match=pattern):
        torchnova.mesa_kl(student, teacher, **args)


def test_forced_backend_that_cannot_run_lists_inputs_and_reasons():
    with pytest.raises(ValueError) as info:
        torchnova.mesa_kl(Z, T, backend="cuda")
    message = str(info.value)
    assert "backend='cuda' cannot run" in message
    assert "student_logits=Tensor(shape=(4, 10), dtype=torch.float32, device=cpu" in message
    assert "device=cpu (supported: cuda)" in message


def test_environment_variable_forces_backend(monkeypatch):
    chosen = record_chosen_backends(monkeypatch)
    monkeypatch.setenv("TORCHNOVA_BACKEND", "cuda")
    with pytest.raises(ValueError, match="backend='cuda' cannot run"):
        torchnova.mesa_kl(Z, T)
    monkeypatch.setenv("TORCHNOVA_BACKEND", "reference")
    assert torch.allclose(torchnova.mesa_kl(Z, T), torchnova.mesa_kl(Z, T, backend="reference"))
    assert chosen == [("mesa_kl", "reference"), ("mesa_kl", "reference")]  # the variable, not auto's choice
    monkeypatch.delenv("TORCHNOVA_BACKEND")
    torchnova.mesa_kl(Z, T)
    assert chosen[-1] == ("mesa_kl", auto_cpu_backend())


def test_explicit_backend_beats_the_environment_variable(monkeypatch):
    chosen = record_chosen_backends(monkeypatch)
    monkeypatch.setenv("TORCHNOVA_BACKEND", "cuda")  # cannot run here: an override would raise
    torchnova.mesa_kl(Z, T, backend="reference")
    monkeypatch.setenv("TORCHNOVA_BACKEND", "reference")
    torchnova.mesa_kl(Z, T, backend=auto_cpu_backend())
    monkeypatch.setenv("TORCHNOVA_BACKEND", "auto")
    torchnova.mesa_kl(Z, T)
    assert chosen == [("mesa_kl", "reference"), ("mesa_kl", auto_cpu_backend()), ("mesa_kl", auto_cpu_backend())]


def test_auto_prefers_the_cpp_kernel_on_cpu():
    from torchnova import _backend, _ext

    chosen = _backend.select("mesa_kl", "auto", student_logits=Z, teacher_logits=T)
    assert chosen == auto_cpu_backend()
    if _ext.HAS_CPP:
        assert chosen == "cpp"


def test_cpp_op_checks_its_inputs():
    from torchnova import _ext

    if not _ext.HAS_CPP:
        pytest.skip(_ext.CPP_IMPORT_ERROR)
    with pytest.raises(RuntimeError, match="teacher must have the student's shape"):
        torch.ops.torchnova.mesa_kl_fwd(Z, torch.randn(4, 9), 1.0, False)
    with pytest.raises(RuntimeError, match="temperature must be > 0"):
        torch.ops.torchnova.mesa_kl_fwd(Z, T, 0.0, False)
    with pytest.raises(RuntimeError, match="lse must have shape"):
        torch.ops.torchnova.mesa_kl_bwd(torch.ones(4), Z, T, torch.zeros(4), 1.0)
