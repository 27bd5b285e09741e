"""Plain-PyTorch reference of the MESA / SAF KL regularizer: the ground truth for tests.

    loss_rows[r] = tau^2 * KL(p_r || q_r) = tau^2 * sum_c p_rc (log p_rc - log q_rc)
    p = softmax(teacher / tau)  (no gradient),   q = softmax(student / tau)

student, teacher: (..., C); rows = every leading index. Runs in float64 for float64 inputs and in float32 for
everything else (fp16/bf16 upcast), with log-softmax forms and xlogy semantics (p = 0 contributes 0), the way
the official SAF/MESA code computes `kl_div(log_softmax(z/tau), softmax(t/tau)) * tau^2` but without its
`softmax().log()` underflow.
"""

from __future__ import annotations

import torch


def mesa_kl_rows_ref(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-row tau^2 * KL(softmax(t/tau) || softmax(z/tau)), shape = leading dims; differentiable in student."""
    acc = torch.float64 if student.dtype == torch.float64 else torch.float32
    log_q = torch.log_softmax(student.to(acc) / temperature, dim=-1)
    log_p = torch.log_softmax(teacher.detach().to(acc) / temperature, dim=-1)
    p = log_p.exp()
    # xlogy convention: where p == 0 the term is 0 even if log q = -inf.
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros((), dtype=acc, device=p.device))
    rows = terms.sum(-1) * (temperature * temperature)
    # KL >= 0, but the sum rounds to a tiny negative number where p == q: clamp the value at 0 (NaN stays NaN),
    # keeping the gradient tau (q - p) of the unclamped expression (it is ~0 there anyway).
    # (rows - rows.detach() is exactly 0 with gradient 1; inf rows are left alone.)
    return torch.where(rows < 0, rows - rows.detach(), rows)
