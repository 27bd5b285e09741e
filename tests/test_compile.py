"""torch.compile(fullgraph=True) through torchnova ops: no graph break, no recompile, same numbers as eager."""

from __future__ import annotations

import pytest
import torch

import torchnova
from utils import assert_close, skip_unless_runs


def _recompile_limit_one():
    # A recompile would otherwise fall back to eager silently; make it an error so the test can fail.
    return torch._dynamo.config.patch(recompile_limit=1, error_on_recompile=True)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_mesa_kl_compiles_fullgraph(backend):
    student = torch.randn(6, 40)
    teacher = torch.randn(6, 40)
    skip_unless_runs("mesa_kl", backend, student_logits=student, teacher_logits=teacher)
    mask = torch.tensor([True, True, False, True, True, True])

    def loss_fn(z, t):
        return torchnova.mesa_kl(z, t, temperature=3.0, mask=mask, backend=backend) * 0.5

    torch._dynamo.reset()
    with _recompile_limit_one():
        compiled = torch.compile(loss_fn, fullgraph=True)
        for step in range(2):  # a second call with new values must reuse the graph
            z = (student + step).requires_grad_(True)
            loss = compiled(z, teacher)
            loss.backward()
            z_eager = (student + step).requires_grad_(True)
            expected = loss_fn(z_eager, teacher)
            expected.backward()
            assert_close(loss, expected.double(), torch.float32, "fwd", "compiled loss")
            assert_close(z.grad, z_eager.grad.double(), torch.float32, "grad", "compiled grad")
