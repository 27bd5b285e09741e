"""Claims of the mesa_kl docs that no other test checked (issue 18): the reference against ``F.kl_div``, the
student and the teacher being one tensor, and the GPU kernels' memory (no (rows, C) fp32 temporaries: measured
with the CUDA allocator's peak on a GPU, skipped here)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import torchnova
from torchnova.mesa.reference import mesa_kl_rows_ref
from utils import assert_close, backend_device_params, skip_unless_runs

ON_GPU = torch.cuda.is_available()


@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides")
@pytest.mark.parametrize("temperature", [1.0, 5.0])
def test_reference_equals_kl_div(temperature):
    """tau^2 KL(p || q) per row = F.kl_div(log q, log p, log_target=True, reduction="none").sum(-1) * tau^2, and
    reduction="mean" is F.kl_div's "mean" (over elements) and "batchmean" its "batchmean"."""
    z, t = torch.randn(6, 11, dtype=torch.float64) * 3, torch.randn(6, 11, dtype=torch.float64) * 3
    log_q, log_p = F.log_softmax(z / temperature, -1), F.log_softmax(t / temperature, -1)
    tau2 = temperature**2
    rows = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1) * tau2
    assert_close(mesa_kl_rows_ref(z, t, temperature), rows, torch.float64, "fwd", "rows")
    for reduction in ("mean", "batchmean", "sum"):
        expected = F.kl_div(log_q, log_p, log_target=True, reduction=reduction) * tau2
        got = torchnova.mesa_kl(z, t, temperature=temperature, reduction=reduction, backend="reference")
        assert_close(got, expected, torch.float64, "fwd", reduction)


@pytest.mark.parametrize("backend,device", backend_device_params("mesa_kl"))
def test_student_and_teacher_the_same_tensor(backend, device):
    """mesa_kl(z, z): loss 0 and gradient 0, with the one tensor requiring grad (the teacher side is detached)."""
    z = (torch.randn(5, 37, dtype=torch.float64) * 3).to(device, torch.float32).requires_grad_(True)
    skip_unless_runs("mesa_kl", backend, student_logits=z, teacher_logits=z)
    loss = torchnova.mesa_kl(z, z, reduction="sum", backend=backend)
    (grad,) = torch.autograd.grad(loss, z)
    # The loss is a cancellation of terms of size tau^2·sum|p log p| per row: judged at the table's fp32 forward
    # atol relative to that size (the reference itself is 0 exactly).
    p = torch.softmax(z.detach().double().cpu() / 5.0, -1)
    size = (25.0 * (p * p.log()).abs().sum(-1)).sum()
    assert abs(loss.item()) <= 2e-6 * size.item()
    assert grad.abs().max().item() <= 1e-5 * 5.0 * p.max().item()  # tau (q - p), q = p up to rounding


@pytest.mark.parametrize("backend,device", backend_device_params("mesa_kl"))
def test_student_and_teacher_with_different_strides(backend, device):
    """Other tests give both the same strides; here the student is contiguous and the teacher a transposed view,
    then the student a column slice (non-contiguous last dim) and the teacher contiguous."""
    teacher_t = (torch.randn(300, 8, dtype=torch.float64) * 3).float().to(device)
    cases = [
        ((torch.randn(8, 300, dtype=torch.float64) * 3).float().to(device), lambda leaf: leaf, teacher_t.t()),
        ((torch.randn(8, 600, dtype=torch.float64) * 3).float().to(device), lambda leaf: leaf[:, ::2],
         teacher_t.t().contiguous()),
    ]  # fmt: skip
    for student_leaf, view, teacher in cases:
        leaf = student_leaf.requires_grad_(True)
        z = view(leaf)
        skip_unless_runs("mesa_kl", backend, student_logits=z, teacher_logits=teacher)
        assert z.stride() != teacher.stride()
        loss = torchnova.mesa_kl(z, teacher, temperature=2.0, reduction="sum", backend=backend)
        leaf64 = leaf.detach().double().requires_grad_(True)
        expected = mesa_kl_rows_ref(view(leaf64), teacher.double(), 2.0).sum()
        assert_close(loss, expected, torch.float32, "fwd", "loss")
        assert_close(torch.autograd.grad(loss, leaf)[0], torch.autograd.grad(expected, leaf64)[0], torch.float32,
                     "grad", "grad")  # fmt: skip


@pytest.mark.skipif(not ON_GPU, reason="GPU: peak memory of the CUDA allocator")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_kernels_keep_no_rows_by_classes_temporaries(backend, dtype):
    """Forward + backward of (256, 32000) logits: the peak above the inputs is the gradient itself (one (rows, C)
    tensor in the logits' dtype) plus O(rows) statistics; an fp32 (rows, C) temporary would add 32 MB."""
    rows, classes = 256, 32_000
    z = torch.randn(rows, classes, device="cuda", dtype=dtype, requires_grad=True)
    t = torch.randn(rows, classes, device="cuda", dtype=dtype)
    skip_unless_runs("mesa_kl", backend, student_logits=z, teacher_logits=t)
    torchnova.mesa_kl(z, t, backend=backend).backward()  # warm-up: compilation, autotuning
    z.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loss = torchnova.mesa_kl(z, t, backend=backend)
    forward_peak = torch.cuda.max_memory_allocated() - before
    loss.backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    grad_bytes = rows * classes * z.element_size()
    small = 1 << 20  # statistics, loss, allocator rounding
    assert forward_peak <= small, f"forward allocated {forward_peak} bytes: a (rows, C) temporary?"
    assert peak <= grad_bytes + small, f"peak {peak} bytes > the gradient's {grad_bytes} + 1 MiB"
