"""Fixes from the line-by-line review of the CUDA code (issue 14 §1), one test (group) each.

* The cuda backends decide runnability from the device's shared_memory_per_block_optin against the bytes the
  launchers request (forward, and backward when autograd may call it), not from a list of compute capabilities.
  Simulated here on CPU by patching _backend.device_smem_optin / device_capability: sm_120 and sm_86 have
  101376 bytes per block, sm_80 166912, sm_90 232448.
* mesa_kl's cuda backend needs sm_80+ like the other ops.
* The CUDA kernels are opted into their dynamic shared memory once per (device, kernel), so host threads launching
  different shapes concurrently do not race (GPU test).
* cogvideo_attention(channel="base", attention="window") takes a window that does not divide the grid, on every
  backend (the window only shapes the plus channel).
* mesa_kl's backward forms exp((z/tau - max) - log-sum), never exp(z/tau - lse) with an lse rounded to the ulp of a
  logit of 1e4 (relative gradient error |lse| * 6e-8 in float32), on every backend with a backward op.

Tests that need a CUDA kernel take (backend, device) parameters and skip with the backend's reasons where it
cannot run, so they run on a GPU (and under the CUDA emulation layer once it is added to these parameters).
"""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch

import torchnova
from torchnova import _backend, _ext
from torchnova.dual_channel.reference import cogvideo_attention_ref
from torchnova.mesa.reference import mesa_kl_rows_ref
from utils import assert_close, devices, skip_unless_runs

needs_cpp = pytest.mark.skipif(not _ext.HAS_CPP, reason=f"C++ extension not built: {_ext.CPP_IMPORT_ERROR}")

# name: (compute capability, sharedMemPerBlockOptin in bytes), from the CUDA programming guide's table.
GPUS = {
    "sm_120": ((12, 0), 101376),  # RTX 50xx
    "sm_89": ((8, 9), 101376),  # RTX 40xx, L4, L40
    "sm_86": ((8, 6), 101376),  # RTX 30xx, A10, A40
    "sm_80": ((8, 0), 166912),  # A100
    "sm_90": ((9, 0), 232448),  # H100, H200
}


@pytest.fixture
def simulated_gpu(monkeypatch):
    """Returns set_gpu(name): CUDA-side reasons then see that GPU and a CUDA build of the extension."""

    def set_gpu(name):
        capability, smem = GPUS[name] if isinstance(name, str) else name
        monkeypatch.setattr(_ext, "HAS_CUDA_KERNELS", True)
        monkeypatch.setitem(_ext.BUILD_INFO, "cuda_archs", f"sm{capability[0]}{capability[1]}")  # built for it
        monkeypatch.setattr(_backend, "device_capability", lambda device: capability)
        monkeypatch.setattr(_backend, "device_smem_optin", lambda device: smem)

    return set_gpu


def cuda_like(shape, dtype=torch.float16, requires_grad=False):
    """Metadata of a CUDA tensor (all the reasons read), without a GPU."""
    return SimpleNamespace(shape=tuple(shape), dtype=dtype, device=torch.device("cuda", 0), requires_grad=requires_grad,
                           dim=lambda: len(shape))


# ---------------------------------------------------------------------------------------------------------
# Shared-memory plan exported by the extension, and the reasons built on it
# ---------------------------------------------------------------------------------------------------------


@needs_cpp
def test_shared_memory_plan_matches_the_launch_arithmetic():
    plan = _ext._C.cuda_shared_memory_bytes
    for T in (1, 2, 33, 64, 97, 98, 128):
        ld = T | 1
        assert plan("temporal_fwd", T, 64) == 4 * (T * ld + 2 * T * 33)
        assert plan("temporal_bwd", T, 64) == 4 * (2 * T * ld + 2 * T * 33)
    assert plan("temporal_bwd", 97, 1) == 100880 <= 101376 < plan("temporal_bwd", 98, 1) == 103488
    assert plan("temporal_fwd", 128, 1) == 99840  # the forward fits 99 KB at every T
    for D, dkdv_rows, dq_rows in ((1, 2 * 32, 2 * 32), (64, 2 * 32, 2 * 32), (65, 2 * 32, 2 * 32),
                                  (128, 2 * 32, 2 * 32), (129, 2 * 16, 2 * 16), (256, 2 * 16, 2 * 16)):
        assert plan("spatial_fwd", 1, D) == 4 * 96 * (D | 1)
        assert plan("spatial_dkdv", 1, D) == 4 * (dkdv_rows + 64) * (D | 1)
        assert plan("spatial_dq", 1, D) == 4 * (dq_rows + 64) * (D | 1)
    for D, bucket in ((5, 64), (64, 64), (100, 128), (256, 256)):
        block = 4096 // bucket
        tile, score = block * (bucket + 1), block * (block + 1)
        assert plan("cogvideo_fwd", 1, D) == 4 * (3 * tile + score)
        assert plan("cogvideo_bwd", 1, D) == 4 * (4 * tile + score + 2 * block)
    assert plan("temporal_fwd", 129, 64) == -1 and plan("spatial_fwd", 1, 257) == -1 and plan("nope", 1, 1) == -1


def _temporal_reasons(T, requires_grad, D=64):
    q = cuda_like((2, T, 3, 2, D), requires_grad=requires_grad)
    return _backend.reasons("temporal_attention", "cuda", q=q, k=q, v=q, bias=None, segment_ids=None)


@needs_cpp
@pytest.mark.parametrize("gpu", list(GPUS))
def test_temporal_cuda_runs_where_forward_and_backward_fit(gpu, simulated_gpu):
    simulated_gpu(gpu)
    limit = GPUS[gpu][1]
    for T in [1, 2, 64, *range(90, 129)]:
        fwd_fits = _ext._C.cuda_shared_memory_bytes("temporal_fwd", T, 64) <= limit
        bwd_fits = _ext._C.cuda_shared_memory_bytes("temporal_bwd", T, 64) <= limit
        assert (not _temporal_reasons(T, requires_grad=False)) == fwd_fits, (gpu, T)
        train = _temporal_reasons(T, requires_grad=True)
        assert (not train) == (fwd_fits and bwd_fits), (gpu, T, train)
        if not bwd_fits:
            assert any("temporal backward" in w and f"allows {limit}" in w for w in train), train
    assert any("T=129 frames > 128" in w for w in _temporal_reasons(129, requires_grad=False))


@needs_cpp
@pytest.mark.parametrize("gpu", ["sm_120", "sm_86"])
def test_temporal_small_smem_gpus_train_up_to_97_frames(gpu, simulated_gpu):
    """The review's case: on 99 KB cards the forward fits T = 98..128 and the backward does not."""
    simulated_gpu(gpu)
    assert not _temporal_reasons(97, requires_grad=True)
    for T in (98, 110, 128):
        assert not _temporal_reasons(T, requires_grad=False)  # inference keeps the cuda kernel
        assert _temporal_reasons(T, requires_grad=True)
        with torch.no_grad():  # no graph is recorded, so no backward can follow
            assert not _temporal_reasons(T, requires_grad=True)
    # "auto" then skips cuda (triton's temporal kernels stop at T = 64), instead of failing in backward.
    q = cuda_like((1, 100, 1, 1, 64), requires_grad=True)
    assert _backend.select("temporal_attention", "auto", q=q, k=q, v=q, bias=None, segment_ids=None) != "cuda"


@needs_cpp
@pytest.mark.parametrize("gpu", ["sm_80", "sm_90"])
def test_temporal_large_smem_gpus_train_every_supported_t(gpu, simulated_gpu):
    simulated_gpu(gpu)
    for T in (1, 97, 98, 127, 128):
        assert not _temporal_reasons(T, requires_grad=True), (gpu, T)


@needs_cpp
@pytest.mark.parametrize("gpu", list(GPUS))
def test_temporal_rotary_needs_no_more_shared_memory(gpu, simulated_gpu, monkeypatch):
    """Rotary q, k are rotated in registers as their tiles load: the cuda verdict is the plain one at every T; an
    extension built without the rotary CUDA kernels says so."""
    from torchnova.spacetime import ops

    simulated_gpu(gpu)
    monkeypatch.setattr(ops, "HAS_CUDA_ROTARY", True)
    for T in [1, 64, 97, 98, 128]:
        cos = torch.ones(T, 32)
        for requires_grad in (False, True):
            q = cuda_like((2, T, 3, 2, 64), requires_grad=requires_grad)
            rotary = _backend.reasons("temporal_attention", "cuda", q=q, k=q, v=q, rotary_cos=cos, rotary_sin=cos)
            assert rotary == _temporal_reasons(T, requires_grad), (gpu, T, rotary)
    monkeypatch.setattr(ops, "HAS_CUDA_ROTARY", False)
    q = cuda_like((2, 8, 3, 2, 64))
    why = _backend.reasons("temporal_attention", "cuda", q=q, k=q, v=q, rotary_cos=torch.ones(8, 32),
                           rotary_sin=torch.ones(8, 32))  # fmt: skip
    assert any("built without the rotary ops" in w for w in why), why


@needs_cpp
def test_bias_requiring_grad_counts_as_backward(simulated_gpu):
    simulated_gpu("sm_120")
    q = cuda_like((1, 110, 1, 1, 32))
    bias = cuda_like((1, 110, 110), dtype=torch.float32, requires_grad=True)
    assert _backend.reasons("temporal_attention", "cuda", q=q, k=q, v=q, bias=bias, segment_ids=None)


@needs_cpp
def test_spatial_and_cogvideo_reasons_follow_the_device_limit(simulated_gpu):
    # Every supported head dim fits the 99 KB cards (the largest launch is 98688 bytes, spatial D = 256) ...
    simulated_gpu("sm_120")
    for D in (1, 64, 65, 128, 129, 200, 256):
        q = cuda_like((1, 2, 9, 2, D), requires_grad=True)
        assert not _backend.reasons("spatial_attention", "cuda", q=q, k=q, v=q), D
        x = cuda_like((1, 9, 2, D), requires_grad=True)
        assert not _backend.reasons("cogvideo_attention", "cuda", x=x, head_dim=D), D
    # ... and a hypothetical sm_80+ part with 64 KiB per block would get reasons, not a failed launch.
    simulated_gpu(((8, 0), 65536))
    q = cuda_like((1, 2, 9, 2, 256))
    why = _backend.reasons("spatial_attention", "cuda", q=q, k=q, v=q)
    assert len(why) == 1 and "spatial forward" in why[0] and "allows 65536" in why[0]
    q = cuda_like((1, 2, 9, 2, 256), requires_grad=True)
    assert len(_backend.reasons("spatial_attention", "cuda", q=q, k=q, v=q)) == 3
    x = cuda_like((1, 9, 2, 64))
    why = _backend.reasons("cogvideo_attention", "cuda", x=x, head_dim=64)
    assert len(why) == 2 and "cogvideo forward" in why[0] and "cogvideo backward" in why[1], why
    why = _backend.reasons("cogvideo_attention", "cuda", x=x, head_dim=256)  # forward 50432 bytes, backward 67008
    assert len(why) == 1 and "cogvideo backward" in why[0], why


# ---------------------------------------------------------------------------------------------------------
# mesa_kl cuda: compute capability
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gpu,runs", [(((7, 0), 98304), False), (((7, 5), 65536), False), ("sm_80", True),
                                      ("sm_86", True), ("sm_120", True)])
def test_mesa_kl_cuda_needs_sm80(gpu, runs, simulated_gpu):
    simulated_gpu(gpu)
    z = cuda_like((4, 10), dtype=torch.float32)
    why = _backend.reasons("mesa_kl", "cuda", student_logits=z, teacher_logits=z)
    assert (not why) == runs, why
    if not runs:
        assert any("compute capability" in w and "< required 8.0" in w for w in why), why
        assert _backend.select("mesa_kl", "auto", student_logits=z, teacher_logits=z) != "cuda"


# ---------------------------------------------------------------------------------------------------------
# cogvideo base channel with a window that does not divide the grid
# ---------------------------------------------------------------------------------------------------------


def _backend_device_params(op, backends):
    return [pytest.param(b, d, id=f"{b}-{d}") for d in devices() for b in backends]


@pytest.mark.parametrize("backend,device", _backend_device_params("cogvideo_attention", ("cpp", "triton", "cuda")))
def test_cogvideo_base_channel_takes_any_window(backend, device):
    text_len, frames, grid_h, grid_w, window = 2, 2, 3, 5, 2  # 2 divides neither 3 nor 5
    length = text_len + frames * grid_h * grid_w
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, length, 2, 8, generator=g, dtype=torch.float64).to(device, torch.float32)
               for _ in range(3))
    skip_unless_runs("cogvideo_attention", backend, x=q, head_dim=8)
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    kw = dict(text_len=text_len, frames=frames, grid=(grid_h, grid_w), channel="base", attention="window",
              window=window, shifted=True)
    out = torchnova.cogvideo_attention(*leaves, backend=backend, **kw)
    grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
    ref_leaves = [x.detach().cpu().double().requires_grad_(True) for x in (q, k, v)]
    ref = cogvideo_attention_ref(*ref_leaves, None, text_len, frames, grid_h, grid_w, "base", "full", window, False,
                                 "sequential")[0]
    ref_grads = torch.autograd.grad(ref, ref_leaves, torch.ones_like(ref))
    assert_close(out, ref, torch.float32, "fwd", f"{backend} out")
    for name, got, want in zip("qkv", grads, ref_grads):
        assert_close(got, want, torch.float32, "grad", f"{backend} d{name}")
    with pytest.raises((ValueError, RuntimeError), match="window"):  # the plus channel still needs a divisor
        torchnova.cogvideo_attention(q, k, v, backend=backend, **{**kw, "channel": "plus"})


# ---------------------------------------------------------------------------------------------------------
# mesa_kl backward precision at |z / tau| ~ 1e4
# ---------------------------------------------------------------------------------------------------------

# Backends with a mesa_kl backward op (reference is plain autograd). Add the emulated cuda backend here.
MESA_BACKWARD_PARAMS = _backend_device_params("mesa_kl", ("cpp", "triton", "cuda"))


def _large_logits(rows, classes, device, offset=1e4):
    """float32 logits ~ offset + N(0, 3^2): the softmax is spread over many classes, lse ~ offset."""
    g = torch.Generator().manual_seed(0)
    z = (offset + 3 * torch.randn(rows, classes, generator=g, dtype=torch.float64)).float()
    t = (offset + 3 * torch.randn(rows, classes, generator=g, dtype=torch.float64)).float()
    z[1] -= 2 * offset  # a row around -1e4 too
    t[1] -= 2 * offset
    return z.to(device), t.to(device)


def _fwd_bwd_ops(backend):
    ops = torch.ops.torchnova
    if backend == "triton":
        return ops.mesa_kl_fwd_triton.default, ops.mesa_kl_bwd_triton.default
    return ops.mesa_kl_fwd.default, ops.mesa_kl_bwd.default


def _reference_grad(z, t, temperature, upstream):
    z64 = z.detach().cpu().double().requires_grad_(True)
    rows = mesa_kl_rows_ref(z64, t.detach().cpu().double(), temperature)
    (grad,) = torch.autograd.grad(rows, z64, upstream.cpu().double())
    return grad


@pytest.mark.parametrize("backend,device", MESA_BACKWARD_PARAMS)
@pytest.mark.parametrize("classes", [37, 9000])  # one chunk / several chunks of the Triton kernels
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_mesa_kl_backward_precision_at_large_logits(backend, device, classes, temperature):
    """Relative gradient error stays at float32 rounding, not |lse| * 6e-8 (6e-4 here), on the backward op."""
    z, t = _large_logits(4, classes, device, offset=1e4 * temperature)
    skip_unless_runs("mesa_kl", backend, student_logits=z, teacher_logits=t)
    _check_backward_precision(*_fwd_bwd_ops(backend), z, t, temperature, backend)


@pytest.mark.skipif(not _ext.HAS_CUDA_EMULATION, reason="the CUDA emulation layer is not built")
@pytest.mark.parametrize("classes", [37, 9000])
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_mesa_kl_cuda_backward_precision_emulated(classes, temperature):
    """The same on the CUDA kernels, run on the CPU through torchnova.testing.cuda_emulation()."""
    from torchnova.testing import cuda_emulation

    with cuda_emulation():
        z, t = _large_logits(4, classes, "cpu", offset=1e4 * temperature)
        ops = torch.ops.torchnova
        _check_backward_precision(ops.mesa_kl_fwd_cuda_emu.default, ops.mesa_kl_bwd_cuda_emu.default, z, t,
                                  temperature, "cuda (emulated)")


def _check_backward_precision(fwd, bwd, z, t, temperature, label):
    upstream = torch.rand(4, dtype=torch.float32, device=z.device) + 0.5
    _, lse, _ = fwd(z, t, temperature, False)
    grad = bwd(upstream, z, t, lse, temperature)
    expected = _reference_grad(z, t, temperature, upstream)
    assert_close(grad, expected, torch.float32, "grad", f"{label} mesa_kl_bwd")
    # The same through autograd (the op's registered backward) and, for the forward-with-gradient path, the stash.
    z_leaf = z.clone().requires_grad_(True)
    loss_rows, _, _ = fwd(z_leaf, t, temperature, False)
    (grad_autograd,) = torch.autograd.grad(loss_rows, z_leaf, upstream)
    assert_close(grad_autograd, expected, torch.float32, "grad", f"{label} autograd")
    _, _, stash = fwd(z, t, temperature, True)
    assert_close(stash * upstream[:, None], expected, torch.float32, "grad", f"{label} forward gradient")


@pytest.mark.parametrize("backend,device", MESA_BACKWARD_PARAMS)
def test_mesa_kl_saved_statistics_are_max_and_log_sum(backend, device):
    """lse (4, R) = [max z', log-sum z', max t', log-sum t'] (csrc/torchnova.cpp), each the documented value."""
    z, t = _large_logits(3, 50, device)
    skip_unless_runs("mesa_kl", backend, student_logits=z, teacher_logits=t)
    fwd, _ = _fwd_bwd_ops(backend)
    _, lse, _ = fwd(z, t, 2.0, False)
    assert lse.shape == (4, 3) and lse.dtype == torch.float32
    for k, x in enumerate((z, t)):
        scaled = x.cpu().double() * 0.5
        m = scaled.max(dim=1).values
        assert_close(lse[2 * k], m, torch.float32, "fwd", "row max")
        assert_close(lse[2 * k + 1], torch.log(torch.exp(scaled - m[:, None]).sum(dim=1)), torch.float32, "fwd",
                     "row log-sum")


# ---------------------------------------------------------------------------------------------------------
# Dynamic shared memory set once per (device, kernel): concurrent launches of different shapes (GPU only)
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_concurrent_launches_of_different_shapes():
    """Two host threads launch the temporal and spatial kernels with small and large shared memory at once."""
    q_small = torch.randn(2, 16, 4, 2, 32, device="cuda", requires_grad=True)
    q_large = torch.randn(2, 97, 4, 2, 32, device="cuda", requires_grad=True)
    q_spatial = [torch.randn(1, 2, 40, 2, D, device="cuda", requires_grad=True) for D in (32, 200)]
    skip_unless_runs("temporal_attention", "cuda", q=q_large, k=q_large, v=q_large, bias=None, segment_ids=None)
    errors = []

    def worker(temporal_q, spatial_q):
        try:
            for _ in range(30):
                out = torchnova.temporal_attention(temporal_q, temporal_q, temporal_q, backend="cuda")
                out = out.sum() + torchnova.spatial_attention(spatial_q, spatial_q, spatial_q, backend="cuda").sum()
                out.backward()
            torch.cuda.synchronize()
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(q_small, q_spatial[0])),
               threading.Thread(target=worker, args=(q_large, q_spatial[1]))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors


@needs_cpp
def test_shared_memory_lookups_trace_without_graph_breaks(simulated_gpu):
    """Backend selection runs inside torch.compile(fullgraph=True): the plan lookup is a constant there."""
    simulated_gpu("sm_120")

    def scaled(x):
        need = _backend.cuda_shared_memory_bytes("temporal_bwd", frames=x.shape[1])
        too_big = _backend.shared_memory_reasons(torch.device("cuda"), {"the temporal backward": need})
        return x * need + len(too_big)

    x = torch.ones(1, 98)
    torch._dynamo.reset()
    assert torch.compile(scaled, fullgraph=True)(x)[0, 0].item() == 103488 + 1


def test_a_gpu_the_build_has_no_code_for_is_refused_with_a_reason():
    # CI's build (TORCH_CUDA_ARCH_LIST="8.0;9.0") runs on sm_80/86/89 (the sm_80 cubin) and sm_90, not on an RTX 50xx.
    ci_build = "sm80_90"
    for capability in [(8, 0), (8, 6), (8, 9), (9, 0)]:
        assert _backend.built_arch_reasons(capability, ci_build) == []
    (why,) = _backend.built_arch_reasons((12, 0), ci_build)
    assert "no code for this GPU (sm_120; built for sm_80, sm_90)" in why and "scripts/setup.sh" in why
    assert _backend.built_arch_reasons((7, 5), ci_build) != []
    # setup.py's default list ends in +PTX: the driver JIT-compiles the compute_90 PTX on newer GPUs.
    assert _backend.built_arch_reasons((12, 0), "sm80_86_89_90_PTX") == []
    assert _backend.built_arch_reasons((8, 6), "sm90_PTX") != []  # PTX of a newer arch cannot run on sm_86
    assert _backend.built_arch_reasons((12, 0), "none") == []  # no tag (a CPU build): other reasons decide


def test_the_cuda_reasons_check_the_built_archs(simulated_gpu, monkeypatch):
    simulated_gpu("sm_120")
    monkeypatch.setitem(_ext.BUILD_INFO, "cuda_archs", "sm80_90")
    why = _backend.cuda_device_reasons(torch.device("cuda", 0))
    assert any("no code for this GPU" in w for w in why), why
