"""MESA KL benchmark: ``torchnova.mesa_kl`` backends vs eager PyTorch, ``torch.compile`` and Liger-Kernel.

Loss = τ²·KL(softmax(t/τ) ‖ softmax(z/τ)), batchmean, τ = 5; student logits z get the gradient, the teacher
logits t are constant. Inputs are (rows R, classes C) in the benchmark dtype.

Bytes for GB/s (the least any implementation moves, e = bytes per element):
  fwd      reads z and t once                    2·R·C·e
  bwd      reads z and t, writes dz              3·R·C·e
  fwd_bwd  the two above as separate passes      5·R·C·e
A backend whose forward already computes dz moves more than 2·R·C·e in fwd and less than 3·R·C·e in bwd (its
bwd %BW can exceed 100%); compare such backends on fwd_bwd.

Run: ``python -m benchmarks --ops mesa_kl`` (or ``python -m benchmarks.bench_mesa_kl`` with the same flags).
"""

from __future__ import annotations

import functools
import sys

import torch
import torch.nn.functional as F

from .harness import Case, Inputs, OpBenchmark, Provider

TEMPERATURE = 5.0
BYTES_PER_ELEMENT_PASSES = {"fwd": 2, "bwd": 3, "fwd_bwd": 5}


def make_inputs(shape: dict[str, int], dtype: torch.dtype, device: torch.device) -> Inputs:
    torch.manual_seed(0)
    size = (shape["rows"], shape["classes"])
    student = torch.randn(size, device=device, dtype=dtype, requires_grad=True)
    teacher = torch.randn(size, device=device, dtype=dtype)
    return {"student_logits": student, "teacher_logits": teacher}


def bytes_moved(case: Case) -> int:
    return BYTES_PER_ELEMENT_PASSES[case.mode] * case.shape["rows"] * case.shape["classes"] * case.dtype.itemsize


def eager_mesa_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """What users write today: two log_softmax + kl_div with log-space target."""
    tau = TEMPERATURE
    log_q = F.log_softmax(student_logits / tau, dim=-1)
    log_p = F.log_softmax(teacher_logits.detach() / tau, dim=-1)
    return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True) * (tau * tau)


def _make_eager(inputs: Inputs):
    return functools.partial(eager_mesa_kl, inputs["student_logits"], inputs["teacher_logits"])


def _make_compiled(inputs: Inputs):
    # A fresh compile per case: dynamic=False specialises on the shape like a fixed-shape training loop, and
    # the reset keeps the recompile limit from silently falling back to eager after a few shapes. The compile
    # time shows up in first_call_ms, not in the timings.
    torch.compiler.reset()
    compiled = torch.compile(eager_mesa_kl, dynamic=False)
    return functools.partial(compiled, inputs["student_logits"], inputs["teacher_logits"])


def _unavailable(name: str, is_baseline: bool, why: str) -> Provider:
    return Provider(name, is_baseline, make=lambda inputs: None, reasons=lambda inputs: [why])


def _liger_provider() -> Provider:
    try:
        from liger_kernel.transformers import LigerKLDIVLoss
    except ImportError as exc:
        return _unavailable("liger", True, f"liger-kernel is not importable ({exc})")

    def make(inputs: Inputs):
        # Liger's kl_div takes log-probabilities, so the two temperature log_softmax stay in PyTorch.
        loss = LigerKLDIVLoss(reduction="batchmean", log_target=True)
        z, t, tau = inputs["student_logits"], inputs["teacher_logits"], TEMPERATURE
        return lambda: loss(F.log_softmax(z / tau, dim=-1), F.log_softmax(t.detach() / tau, dim=-1)) * (tau * tau)

    def reasons(inputs: Inputs) -> list[str]:
        device = inputs["student_logits"].device
        return [] if device.type == "cuda" else [f"device={device.type} (Liger's Triton kernels need CUDA)"]

    return Provider("liger", True, make, reasons)


def _torchnova_providers() -> list[Provider]:
    try:
        import torchnova
        from torchnova import _backend

        backends = _backend.backends_for("mesa_kl")
    except Exception as exc:  # not built or installed yet: say so instead of failing the whole benchmark
        return [_unavailable("torchnova", False, f"torchnova.mesa_kl is not usable ({type(exc).__name__}: {exc})")]

    def make(backend: str, inputs: Inputs):
        z, t = inputs["student_logits"], inputs["teacher_logits"]
        return lambda: torchnova.mesa_kl(z, t, temperature=TEMPERATURE, backend=backend)

    def reasons(backend: str, inputs: Inputs) -> list[str]:
        return _backend.reasons("mesa_kl", backend, **inputs)

    return [
        Provider(f"torchnova-{name}", False, functools.partial(make, name), functools.partial(reasons, name))
        for name in backends
    ]


def providers() -> list[Provider]:
    return [
        *_torchnova_providers(),
        Provider("torch-eager", True, _make_eager),
        Provider("torch-compile", True, _make_compiled),
        _liger_provider(),
    ]


def benchmark() -> OpBenchmark:
    return OpBenchmark(
        name="mesa_kl",
        make_inputs=make_inputs,
        providers=providers(),
        # ImageNet-1k classification and LLM vocabularies (32k, Llama-3's 128256).
        shapes=[
            {"rows": 256, "classes": 1000},
            {"rows": 4096, "classes": 1000},
            {"rows": 8192, "classes": 32000},
            {"rows": 4096, "classes": 128256},
        ],
        quick_shapes=[{"rows": 256, "classes": 1000}, {"rows": 4096, "classes": 1000}],
        bytes_moved=bytes_moved,
    )


if __name__ == "__main__":
    from .__main__ import main

    sys.exit(main(["--ops", "mesa_kl", *sys.argv[1:]]))
