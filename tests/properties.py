"""Shared pieces of the property-based tests (tests/test_properties_*.py): which backends to fuzz, how to run an
op on one of them, how to draw strided / transposed / packed layouts, and the float64 comparison.

Backends come from ``_backend.backends_for(op)``, so a backend registered later is fuzzed without editing the
tests. Those that cannot run here are kept and skipped with their reasons. ``cuda`` on a machine without a GPU
becomes ``cuda-emulated``: the same CUDA kernels run on CPU tensors inside ``torchnova.testing.cuda_emulation()``
(DESIGN.md; the CUDA emulation layer). Until that exists, or when it is not built, the case is skipped saying so.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from hypothesis import given, reject, settings
from hypothesis import strategies as st

from hypothesis_profiles import examples_for
from torchnova import _backend
from utils import assert_close

EMULATED = "cuda-emulated"


def fuzz_backends(op: str) -> list:
    """pytest params, one per backend of ``op`` in its registry order; ``cuda`` is fuzzed on CPU tensors through
    the CUDA emulation layer when there is no GPU."""
    params = []
    for name in _backend.backends_for(op):
        if name == "cuda" and not torch.cuda.is_available():
            name = EMULATED
        params.append(pytest.param(name, id=name))
    return params


def _cuda_emulation():
    """(context manager factory, None) or (None, why it is not available)."""
    try:
        from torchnova import testing
    except ImportError as error:
        return None, f"torchnova.testing does not exist yet ({error})"
    factory = getattr(testing, "cuda_emulation", None)
    if factory is None:
        return None, "torchnova.testing has no cuda_emulation() yet"
    return factory, None


def device_of(backend: str) -> str:
    return "cuda" if backend in ("cuda", "triton") and torch.cuda.is_available() else "cpu"


def op_backend(backend: str) -> str:
    """The name passed to the op's ``backend=`` argument."""
    return "cuda" if backend == EMULATED else backend


@contextlib.contextmanager
def running_on(op: str, backend: str, **inputs):
    """Context in which ``op(..., backend=op_backend(backend))`` runs these inputs; skips (with the registry's
    reasons) when it cannot."""
    if backend == EMULATED:
        factory, why = _cuda_emulation()
        if factory is None:
            pytest.skip(f"cuda-emulated: {why}")
        try:
            context = factory()
            context.__enter__()
        except Exception as error:  # not built, or unsupported here: say why
            pytest.skip(f"cuda-emulated: torchnova.testing.cuda_emulation() is not usable here ({error})")
        try:
            why = _backend.reasons(op, "cuda", **inputs)
            if why:
                pytest.skip("cuda-emulated cannot run: " + "; ".join(why))
            yield
        finally:
            context.__exit__(None, None, None)
        return
    why = _backend.reasons(op, backend, **inputs)
    if why:  # this example only (the backend runs others: supported_dtypes): draw another one
        reject()
    yield


def supported_dtypes(op: str, backend: str, probe, candidates) -> list[torch.dtype]:
    """The candidate dtypes this backend runs on the device of ``probe(dtype) -> inputs`` (registry reasons);
    skips the test, with the reasons, when it runs none of them here (not built, no device, ...)."""
    if backend == EMULATED:
        return [d for d in candidates if d != torch.float64]  # the CUDA kernels: fp32/fp16/bf16
    dtypes = [d for d in candidates if not _backend.reasons(op, backend, **probe(d))]
    if not dtypes:
        pytest.skip(f"{backend} cannot run: " + "; ".join(_backend.reasons(op, backend, **probe(candidates[0]))))
    return dtypes


def check_property(backend: str, strategy, check, weight: float = 1.0) -> None:
    """Run ``check(case)`` on ``examples_for(backend, weight)`` examples drawn from ``strategy`` (the active
    hypothesis profile's other settings apply)."""

    @settings(max_examples=examples_for(backend, weight))
    @given(strategy)
    def prop(case):
        check(case)

    prop()


# ---------------------------------------------------------------------------------------------------------
# Layouts: the same values in differently strided memory
# ---------------------------------------------------------------------------------------------------------

LAYOUTS = ("contiguous", "strided", "transposed", "head_dim_strided")


def laid_out(x: torch.Tensor, layout: str, swap: tuple[int, int] = (1, 2)) -> torch.Tensor:
    """``x`` (values unchanged) in a memory layout: ``strided`` = every other element of a 2x larger buffer along
    dim -2 (a slice of a fused projection); ``transposed`` = stored with dims ``swap`` exchanged; ``head_dim_
    strided`` = stride(-1) != 1 (the ops copy it)."""
    if layout == "contiguous":
        return x.contiguous()
    if layout == "strided":
        big = torch.zeros((*x.shape[:-2], 2 * x.shape[-2], x.shape[-1]), dtype=x.dtype, device=x.device)
        big[..., ::2, :] = x
        return big[..., ::2, :]
    if layout == "transposed":
        a, b = swap
        return x.transpose(a, b).contiguous().transpose(a, b)
    if layout == "head_dim_strided":
        big = torch.zeros((*x.shape[:-1], 2 * x.shape[-1]), dtype=x.dtype, device=x.device)
        big[..., ::2] = x
        return big[..., ::2]
    raise ValueError(layout)


def randn(shape, dtype, seed: int, device="cpu", scale: float = 1.0) -> torch.Tensor:
    """Standard normal values drawn in float64 from ``seed`` (the same values for every dtype), then cast."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


seeds = st.integers(0, 2**31 - 1)


def grad_like(out: torch.Tensor, kind: str, seed: int) -> torch.Tensor:
    """The upstream gradient: ``random`` values, or ``ones`` expanded from a scalar (what ``out.sum().backward()``
    hands the op: stride 0 everywhere)."""
    if kind == "ones":
        return torch.ones((), dtype=out.dtype, device=out.device).expand(out.shape)
    return randn(out.shape, out.dtype, seed, out.device)


def compare(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, kind: str, what: str,
            same_dtype_reference: torch.Tensor | None = None) -> None:
    """``got`` vs the float64 ``want`` at the tolerance table's bound. For attention, DESIGN.md's second rule
    is also accepted: an error at most 2x that of the reference run in the same dtype
    (``same_dtype_reference``). Large scores (|s| ~ 30-100 with fp32 inputs) are ill-conditioned: there the
    float32 reference itself misses the table (e.g. 6e-5 at scores ~37 where the table allows 2e-5)."""
    try:
        assert_close(got, want, dtype, kind, what)
    except AssertionError:
        if same_dtype_reference is None or got.numel() == 0:
            raise
        error = (got.detach().double().cpu() - want.detach().double().cpu()).abs().max().item()
        ref_error = (same_dtype_reference.detach().double().cpu() - want.detach().double().cpu()).abs().max().item()
        if not error <= 2 * ref_error:
            raise AssertionError(f"{what}: error {error:.3e} is over the table and over 2x the same-dtype "
                                 f"reference's error {ref_error:.3e}") from None
