"""torch.library.opcheck on every registered torchnova op (schema, fake, autograd registration)."""

from __future__ import annotations

import pytest
import torch

from torchnova import _ext
from torchnova.mesa import triton_kernels
from utils import devices


def mesa_kl_samples(device):
    for shape, dtype in (((3, 7), torch.float32), ((5, 33), torch.float64), ((1, 1), torch.float32)):
        z = torch.randn(shape, dtype=dtype, device=device)
        t = torch.randn(shape, dtype=dtype, device=device)
        yield z, t


def op_params():
    params = []
    for device in devices():
        native_ok = _ext.HAS_CPP and (device == "cpu" or _ext.HAS_CUDA_KERNELS)
        params.append(pytest.param("mesa_kl_fwd", "mesa_kl_bwd", device, id=f"native-{device}",
                                   marks=pytest.mark.skipif(not native_ok, reason="extension kernels not built")))
        triton_ok = triton_kernels.HAS_TRITON and (device == "cuda" or _ext.TRITON_INTERPRET)
        params.append(pytest.param("mesa_kl_fwd_triton", "mesa_kl_bwd_triton", device, id=f"triton-{device}",
                                   marks=pytest.mark.skipif(not triton_ok, reason="triton cannot run here")))
    return params


@pytest.mark.parametrize(
    "fwd_name,bwd_name,device", op_params())
def test_opcheck_mesa_kl(fwd_name, bwd_name, device):
    fwd = getattr(torch.ops.torchnova, fwd_name).default
    bwd = getattr(torch.ops.torchnova, bwd_name).default
    for z, t in mesa_kl_samples(device):
        if fwd_name.endswith("triton") and z.dtype == torch.float64:
            continue
        for with_grad in (False, True):
            torch.library.opcheck(fwd, (z.clone().requires_grad_(True), t, 2.0, with_grad))
        _, lse, _ = fwd(z, t, 2.0, False)
        grad_rows = torch.rand(z.shape[0], dtype=lse.dtype, device=device)
        torch.library.opcheck(bwd, (grad_rows, z, t, lse, 2.0))
