"""The C++ CPU kernels give bit-identical forward outputs and gradients with 1 and with 2 threads.

The docs promise reductions in a fixed order (dbias over the B·S problems, d alpha_logit over the tokens) and
no atomics; on CPU the only thing that can change the order is how at::parallel_for splits the work, which
follows the thread count. (The Triton determinism tests can only fail on a GPU: see utils.gpu_meaningful.)
Shapes are large enough that 2 threads split every parallel loop (temporal: B·S = 600 items and the dbias
chunks; mix: B·L = 64 rows, C = 200 > the 64-column grain).
"""

from __future__ import annotations

import pytest
import torch

import torchnova
from torchnova import _ext

pytestmark = pytest.mark.skipif(not _ext.HAS_CPP, reason=f"C++ extension not available: {_ext.CPP_IMPORT_ERROR}")


def _leaf(*shape, scale=1.0):
    return (torch.randn(*shape) * scale).requires_grad_(True)


def mesa_run():
    z, t = _leaf(64, 1003, scale=3.0), torch.randn(64, 1003) * 3
    return torchnova.mesa_kl(z, t, temperature=2.0, backend="cpp"), (z,)


def temporal_run():
    qkv = _leaf(2, 6, 300, 3, 2, 16)
    bias = _leaf(2, 6, 6)
    segments = torch.tensor([[0, 0, 0, 0, 1, 2], [0, 0, 1, 1, 1, 1]])
    out = torchnova.temporal_attention(*qkv.unbind(3), bias=bias, segment_ids=segments, causal=True, backend="cpp")
    return out, (qkv, bias)


def temporal_packed_run():
    qkv, bias = _leaf(2, 6, 300, 3, 2, 16), _leaf(2, 6, 6)
    return torchnova.temporal_attention_qkvpacked(qkv, bias=bias, backend="cpp"), (qkv, bias)


def spatial_run():
    qkv = _leaf(1, 4, 70, 3, 2, 24)
    return torchnova.spatial_attention_qkvpacked(qkv, backend="cpp"), (qkv,)


def cogvideo_run():
    q, k, v = (_leaf(2, 3 + 5 * 16, 2, 8) for _ in range(3))
    out = torchnova.cogvideo_attention(q, k, v, text_len=3, frames=5, grid=4, channel="plus", attention="window",
                                       window=2, shifted=True, backend="cpp")  # fmt: skip
    return out, (q, k, v)


def mix_run():
    base, plus, logit = _leaf(2, 32, 200), _leaf(2, 32, 200), _leaf(200)
    return torchnova.dual_channel_mix(base, plus, logit, text_len=3, backend="cpp"), (base, plus, logit)


RUNS = {"mesa_kl": mesa_run, "temporal": temporal_run, "temporal_qkvpacked": temporal_packed_run,
        "spatial_qkvpacked": spatial_run, "cogvideo": cogvideo_run, "mix": mix_run}  # fmt: skip


@pytest.mark.parametrize("op", RUNS)
def test_cpp_bit_identical_across_thread_counts(op):
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            torch.manual_seed(0)
            out, inputs = RUNS[op]()
            upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
            results.append((out.detach(), torch.autograd.grad(out, inputs, upstream)))
    finally:
        torch.set_num_threads(previous)
    (out1, grads1), (out2, grads2) = results
    assert torch.equal(out1, out2), f"{op}: forward differs between 1 and 2 threads"
    for i, (a, b) in enumerate(zip(grads1, grads2)):
        assert torch.equal(a, b), f"{op}: gradient {i} differs between 1 and 2 threads: max {(a - b).abs().max()}"
