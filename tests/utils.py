"""Shared test helpers: THE tolerance table of the suite, backend/device parameters, verbose comparisons."""

from __future__ import annotations

import pytest
import torch

from torchnova import _backend

# One tolerance table for the whole suite: (atol, rtol) per dtype, forward and gradients, for kernel outputs
# compared with the float64 reference. atol is relative to the reference's largest magnitude, floored at the
# dtype's smallest normal number (below it the dtype has no relative precision left), so a loss of 1e3 and a
# gradient of 1e-8 are held to the same number of correct digits: a gradient that is zero, negated, doubled,
# 10 % off or wrong in any element by more than atol of the largest fails however small the values are.
TOLERANCES = {
    "fwd": {
        torch.float64: (1e-10, 1e-9),
        torch.float32: (2e-6, 1e-5),
        torch.float16: (2e-3, 2e-3),
        torch.bfloat16: (2e-2, 2e-2),
    },
    "grad": {
        torch.float64: (1e-10, 1e-9),
        torch.float32: (1e-5, 5e-5),
        torch.float16: (1e-2, 1e-2),
        torch.bfloat16: (3e-2, 3e-2),
    },
}


def magnitude_scale(expected: torch.Tensor, dtype: torch.dtype) -> float:
    """What atol is relative to: the reference's largest magnitude, at least the dtype's smallest normal number."""
    floor = torch.finfo(dtype).tiny
    finite = expected[torch.isfinite(expected)]
    return max(floor, finite.abs().max().item()) if finite.numel() else floor


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, kind: str, what: str = "",
                 terms: float | None = None):
    """Compare with the float64 reference at the tolerance of (kind, dtype); NaNs anywhere fail.

    ``terms``: for a value that is a cancellation of larger terms (a KL of near-identical distributions: 0 from
    log-sum-exps of size tau·|logits|), the size of those terms; atol is then relative to the larger of it and
    the reference's magnitude, since no kernel in ``dtype`` can resolve the difference below that."""
    atol, rtol = TOLERANCES[kind][dtype]
    actual64, expected64 = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert actual64.shape == expected64.shape, f"{what}: shape {tuple(actual64.shape)} != {tuple(expected64.shape)}"
    assert torch.isfinite(actual64).all(), f"{what}: non-finite values in {actual64}"
    scale = max(magnitude_scale(expected64, dtype), terms or 0.0)
    diff = (actual64 - expected64).abs()
    bound = atol * scale + rtol * expected64.abs()
    if not (diff <= bound).all():
        worst = (diff - bound).argmax()
        raise AssertionError(
            f"{what} ({kind}, {dtype}): {int((diff > bound).sum())}/{diff.numel()} mismatches; max abs diff "
            f"{diff.max().item():.3e}; worst at flat index {int(worst)}: got {actual64.flatten()[worst].item():.8e}, "
            f"expected {expected64.flatten()[worst].item():.8e} (atol {atol}·{scale:.3g}, rtol {rtol})"
        )


def assert_within_low_precision_error(actual, low, exact, dtype: torch.dtype, what: str = ""):
    """DESIGN.md: fp16/bf16 attention within 2x the error of the reference run on the same low-precision inputs
    (``low``; ``exact`` is the float64 reference). Plus one unit of the dtype's rounding at the largest magnitude
    (eps · scale): both outputs are rounded to ``dtype`` at the end, and on a few elements the same-dtype
    reference can round exactly by chance (its error 0) where a kernel rounds one ulp the other way."""
    actual64, low64, exact64 = (x.detach().double().cpu() for x in (actual, low, exact))
    err, ref_err = (actual64 - exact64).abs().max().item(), (low64 - exact64).abs().max().item()
    ulp = torch.finfo(dtype).eps * magnitude_scale(exact64, dtype)
    assert err <= 2 * ref_err + ulp, f"{what} ({dtype}): error {err:.3e} > 2 x reference's {ref_err:.3e} + {ulp:.3e}"


def skip_in_triton_interpreter_reason() -> str:
    return "GPU-meaningful: the Triton interpreter runs programs one after another, so this cannot fail here"


def gpu_meaningful(test):
    """Mark a Triton test that can only fail on a GPU (run-to-run bit-identity, races) and skip it in the
    interpreter, where it would pass whatever the kernel does."""
    from torchnova import _ext

    test = pytest.mark.gpu_meaningful(test)
    return pytest.mark.skipif(_ext.TRITON_INTERPRET, reason=skip_in_triton_interpreter_reason())(test)


def devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def backend_device_params(op: str) -> list:
    """(backend, device) pairs; the ones that cannot run here are kept and skipped with their reasons."""
    return [pytest.param(b, d, id=f"{b}-{d}") for d in devices() for b in _backend.backends_for(op)]


def skip_unless_runs(op: str, backend: str, **inputs) -> None:
    why = _backend.reasons(op, backend, **inputs)
    if why:
        pytest.skip(f"{backend} cannot run: " + "; ".join(why))


def cpu_isas() -> list[str]:
    """The compiled copies of the CPU kernels this CPU can run (csrc/cpu/cpu_dispatch.h), e.g. baseline, avx2."""
    from torchnova import _ext

    return list(_ext._C.cpu_isas()) if _ext.HAS_CPP else []


def record_chosen_backends(monkeypatch) -> list[tuple[str, str]]:
    """Record (op, backend) of every backend selection from now on (the ops call _backend.select each time)."""
    chosen: list[tuple[str, str]] = []
    select = _backend.select

    def recording_select(op, requested, **inputs):
        name = select(op, requested, **inputs)
        chosen.append((op, name))
        return name

    monkeypatch.setattr(_backend, "select", recording_select)
    return chosen


def auto_cpu_backend() -> str:
    """What "auto" picks for CPU tensors: the C++ kernels, else the Triton interpreter when it is on (a
    TORCHNOVA_SKIP_CPP_BUILD=1 install under TRITON_INTERPRET=1), else the reference."""
    from torchnova import _ext

    if _ext.HAS_CPP:
        return "cpp"
    return "triton" if _ext.HAS_TRITON and _ext.TRITON_INTERPRET else "reference"


def _needs_cpp():
    from torchnova import _ext

    return pytest.mark.skipif(not _ext.HAS_CPP, reason=f"C++ extension not available: {_ext.CPP_IMPORT_ERROR}")


# For tests that call backend="cpp" or the C++ ops directly (a TORCHNOVA_SKIP_CPP_BUILD=1 install skips them;
# tests/test_build.py fails instead when setup.sh built the extension and it does not import).
needs_cpp = _needs_cpp()


def segments_for(B, T):
    """(B, T) segment ids of VDM joint training: the video frames share id 0, each appended image has its own."""
    ids = [0] * max(1, T - 2) + list(range(1, T - max(1, T - 2) + 1))
    return torch.tensor([ids] * B, dtype=torch.int64)


def upstream(out, seed=1):
    """A seeded random upstream gradient for ``out`` (drawn in float64, so every dtype gets the same values)."""
    generator = torch.Generator(device=out.device).manual_seed(seed)
    return torch.randn(out.shape, generator=generator, dtype=torch.float64, device=out.device).to(out.dtype)
