"""The emulation layer's twins of the tensor-core instructions (csrc/cuda/tensor_core.cuh: mma.sync m16n8k16
fp16/bf16 and m16n8k8 tf32, ldmatrix, cp.async), run by small kernels of csrc/emulation/test_kernels.cpp.

The fragment layouts are checked the way the attention kernels use them: a warp stages tiles in shared memory with
cp.async, loads A with ldmatrix.x4 and the B operand from K rows (ldmatrix without .trans, for Q K^T) and from V rows
(ldmatrix .trans, for P V), with the addressing FlashAttention-style kernels use on real GPUs, and the mma result
must equal the matrix product. A layout error anywhere in the chain (a swapped half, a transposed fragment, a wrong
matrix order) gives a wrong product.
"""

from __future__ import annotations

import pytest
import torch

from torchnova import _ext, testing

pytestmark = pytest.mark.skipif(
    not _ext.HAS_CUDA_EMULATION, reason=f"CUDA emulation layer not built: {_ext.CUDA_EMULATION_IMPORT_ERROR}"
)


def _emu():
    return _ext._C_cuda_emu


def _tf32(x: torch.Tensor) -> torch.Tensor:
    """cvt.rna.tf32.f32: round to nearest (ties away from zero) at 10 mantissa bits."""
    bits = x.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ldmatrix_fed_mma_is_the_matrix_product(dtype):
    torch.manual_seed(0)
    a = torch.randn(16, 16).to(dtype)
    k = torch.randn(8, 16).to(dtype)
    v = torch.randn(16, 8).to(dtype)
    c = torch.randn(16, 8)
    with testing.cuda_emulation():
        scores, mixed = _emu()._test_ldmatrix_mma(a, k, v, c, 0)
    # The products of 16-bit inputs are exact in fp32; only the fp32 accumulation of 16 terms rounds.
    torch.testing.assert_close(scores.double(), a.double() @ k.double().T + c.double(), rtol=0, atol=2e-5)
    torch.testing.assert_close(mixed.double(), a.double() @ v.double() + c.double(), rtol=0, atol=2e-5)


def test_mma_tf32_rounds_inputs_to_tf32_and_accumulates_in_fp32():
    torch.manual_seed(1)
    a, b, c = torch.randn(16, 8), torch.randn(8, 8), torch.randn(16, 8)
    out = _emu()._test_mma_tf32(a, b, c)
    expected = _tf32(a).double() @ _tf32(b).double() + c.double()
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-5)
    # ...which differs from the fp32 product by tf32's rounding (10 mantissa bits), not by a layout error.
    assert (out.double() - (a.double() @ b.double() + c.double())).abs().max() < 2e-2


def test_float_to_tf32_rounds_ties_away_from_zero():
    # 1 + 2^-11 is half-way between two tf32 values (1 and 1 + 2^-10): rna rounds it up, away from zero.
    x = torch.tensor([1 + 2.0**-11, -(1 + 2.0**-11), 1 + 2.0**-12, float("inf")])
    assert torch.equal(_tf32(x), torch.tensor([1 + 2.0**-10, -(1 + 2.0**-10), 1.0, float("inf")]))
    a = torch.zeros(16, 8)
    a[:, 0] = x.repeat(4)
    b = torch.zeros(8, 8)
    b[0, 0] = 1.0
    out = _emu()._test_mma_tf32(a, b, torch.zeros(16, 8))  # column 0 of the product = the tf32 of a[:, 0]
    assert torch.equal(out[:, 0], _tf32(a[:, 0]))


@pytest.mark.parametrize("src_bytes", [16, 8, 0])
def test_cp_async_lands_at_the_wait_and_zero_fills(src_bytes):
    x = torch.arange(4 * 32, dtype=torch.float32) + 1
    out = _emu()._test_cp_async(x, src_bytes, 0)
    expected = x.view(32, 4).roll(-1, 0).clone()  # each thread reads its neighbour's copy after wait + barrier
    expected[:, src_bytes // 4 :] = 0
    assert torch.equal(out.view(32, 4), expected)


def test_cp_async_read_before_the_wait_sees_the_old_shared_memory():
    out = _emu()._test_cp_async(torch.ones(4 * 32), 16, 1)
    assert torch.isnan(out).all()  # the copies had not landed: the 0xFF fill of shared memory


def test_cp_async_checks_alignment_and_shared_bounds():
    with pytest.raises(RuntimeError, match="cp.async of 16 bytes needs 16-byte aligned addresses"):
        _emu()._test_cp_async(torch.ones(4 * 32 + 4), 16, 2)
    with pytest.raises(RuntimeError, match=r"cp.async destination reaches byte \d+ of dynamic shared memory"):
        _emu()._test_cp_async(torch.ones(4 * 32), 16, 3)


def test_misaligned_ldmatrix_row_is_an_error():
    a, k, v = torch.zeros(16, 16, dtype=torch.half), torch.zeros(8, 16, dtype=torch.half), torch.zeros(16, 8).half()
    with pytest.raises(RuntimeError, match=r"ldmatrix: lane 0 gives row address .* not 16-byte aligned"):
        _emu()._test_ldmatrix_mma(a, k, v, torch.zeros(16, 8), 1)


def test_mma_by_part_of_the_warp_is_an_error():
    a, k, v = torch.zeros(16, 16, dtype=torch.half), torch.zeros(8, 16, dtype=torch.half), torch.zeros(16, 8).half()
    with pytest.raises(RuntimeError, match=r"mma.sync with mask 0xffffffff waits for lane 16, but thread \(16,0,0\).*has exited"):
        _emu()._test_ldmatrix_mma(a, k, v, torch.zeros(16, 8), 2)


def test_race_check_sees_a_missing_barrier():
    threads = 64
    fine = torch.arange(1, threads + 1, dtype=torch.int32).roll(-1)
    results = {}
    for schedule in testing.SCHEDULES:
        with testing.cuda_emulation(schedule=schedule):
            assert torch.equal(_emu()._test_shared_race(threads, 0), fine)
            results[schedule] = _emu()._test_shared_race(threads, 1)
    # Without the barrier the reader sees its neighbour's word only when the writer happened to run first.
    assert not torch.equal(results["forward"], results["reverse"])
    assert not torch.equal(results["forward"], fine) and not torch.equal(results["reverse"], fine)


def test_schedule_is_validated_and_restored():
    with pytest.raises(ValueError, match="schedule must be one of"):
        with testing.cuda_emulation(schedule="random"):
            pass
    with testing.cuda_emulation(schedule="reverse"):
        assert _emu().reverse_schedule()
    assert not _emu().reverse_schedule()
