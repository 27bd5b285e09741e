"""One small launch of every torchnova CUDA kernel, for compute-sanitizer (memcheck, racecheck, synccheck).

    python scripts/gpu_sanitize_cases.py --list                 # the cases and the kernels each launches (no GPU)
    python scripts/gpu_sanitize_cases.py                        # run every case once (needs a GPU)
    python scripts/gpu_sanitize_cases.py --case temporal_bias   # one case
    python scripts/gpu_sanitize_cases.py --cpu-smoke            # the same calls on CPU (cpp backend), no GPU
    compute-sanitizer --tool racecheck --error-exitcode 1 python scripts/gpu_sanitize_cases.py

Each case calls the public op with backend="cuda" at a small, odd shape (tails in every tile, padding lanes) and
runs its backward, so every __global__ function in csrc/cuda/ is launched at least once (the table in CASES says
which). Under compute-sanitizer a launch is slow (racecheck: seconds), so the shapes are a handful of tiles. The
script checks only that results are finite; correctness against float64 is the test suite's job. Exit status: 0
when every case ran, 1 otherwise; with no GPU, --list works and running a case exits 2 with a message.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

torch = None  # imported in main(), after --list (which needs no torch)
DEVICE, BACKEND = "cuda", "cuda"  # --cpu-smoke: "cpu", "cpp" (checks the cases' calls without a GPU)

# Run from a checkout without installing: the package lives in pyext/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pyext"))


def _leaf(*shape, dtype="float16"):
    return torch.randn(*shape, device=DEVICE, dtype=torch.float32).to(getattr(torch, dtype)).requires_grad_(True)


def _backward(out, *leaves):
    grads = torch.autograd.grad(out.float().sum(), leaves)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)


def case_temporal_bias():
    import torchnova

    q, k, v = (_leaf(2, 13, 3, 2, 40) for _ in range(3))
    bias = torch.randn(2, 13, 13, device=DEVICE, requires_grad=True)
    segment_ids = torch.tensor([[0] * 6 + [1] * 7, [0] * 13], device=DEVICE)
    out = torchnova.temporal_attention(q, k, v, bias=bias, segment_ids=segment_ids, causal=True, backend=BACKEND)
    _backward(out, q, k, v, bias)


def case_temporal_qkvpacked():
    import torchnova

    qkv = _leaf(1, 7, 5, 3, 2, 33, dtype="bfloat16")
    _backward(torchnova.temporal_attention_qkvpacked(qkv, backend=BACKEND), qkv)


def _rotary_tables(T, rot_dim):
    angles = torch.randn(T, rot_dim, device=DEVICE)
    return angles.cos(), angles.sin()


def case_temporal_rotary_interleaved():
    import torchnova

    q, k, v = (_leaf(2, 13, 3, 2, 40) for _ in range(3))  # rot_dim 34: a rotated chunk with a ragged tail
    bias = torch.randn(2, 13, 13, device=DEVICE, requires_grad=True)
    segment_ids = torch.tensor([[0] * 6 + [1] * 7, [0] * 13], device=DEVICE)
    out = torchnova.temporal_attention(q, k, v, bias=bias, segment_ids=segment_ids, causal=True,
                                       rotary=_rotary_tables(13, 34), rotary_interleaved=True, backend=BACKEND)
    _backward(out, q, k, v, bias)


def case_temporal_rotary_half_qkvpacked():
    import torchnova

    qkv = _leaf(1, 7, 5, 3, 2, 37, dtype="bfloat16")  # half-split rot_dim 34: 17 pairs, two chunks, odd D
    out = torchnova.temporal_attention_qkvpacked(qkv, rotary=_rotary_tables(7, 34), rotary_interleaved=False,
                                                 backend=BACKEND)
    _backward(out, qkv)


@contextlib.contextmanager
def _attention_kernel(choice):
    """TORCHNOVA_CUDA_ATTENTION_KERNEL for the spatial / CogVideo CUDA kernels (read per call): fp16/bf16 with D <= 128
    run the tensor-core kernels by default; "simt" forces the SIMT ones, so both families are launched."""
    previous = os.environ.get("TORCHNOVA_CUDA_ATTENTION_KERNEL")
    os.environ["TORCHNOVA_CUDA_ATTENTION_KERNEL"] = choice
    try:
        yield
    finally:
        if previous is None:
            del os.environ["TORCHNOVA_CUDA_ATTENTION_KERNEL"]
        else:
            os.environ["TORCHNOVA_CUDA_ATTENTION_KERNEL"] = previous


def case_spatial():
    import torchnova

    q, k, v = (_leaf(1, 2, 45, 2, 40) for _ in range(3))
    with _attention_kernel("simt"):
        _backward(torchnova.spatial_attention(q, k, v, backend=BACKEND), q, k, v)


def case_spatial_tensor_core():
    import torchnova

    for D, dtype in ((40, "float16"), (100, "bfloat16")):  # padded widths 64 and 128 (backward: 64, 128)
        q, k, v = (_leaf(1, 2, 45, 2, D, dtype=dtype) for _ in range(3))
        with _attention_kernel("tensor_core"):
            _backward(torchnova.spatial_attention(q, k, v, backend=BACKEND), q, k, v)


def case_spatial_d256():
    import torchnova

    q, k, v = (_leaf(1, 1, 21, 1, 200, dtype="float32") for _ in range(3))
    _backward(torchnova.spatial_attention(q, k, v, backend=BACKEND), q, k, v)


def case_cogvideo_plus_window():
    import torchnova

    text_len, frames, grid = 3, 2, (4, 4)
    q, k, v = (_leaf(2, text_len + frames * 16, 2, 24) for _ in range(3))
    pad = torch.tensor([[False, False, True], [False, False, False]], device=DEVICE)
    for choice in ("simt", "tensor_core"):
        with _attention_kernel(choice):
            out = torchnova.cogvideo_attention(q, k, v, text_len=text_len, frames=frames, grid=grid, channel="plus",
                                               attention="window", window=2, shifted=True, text_pad_mask=pad,
                                               backend=BACKEND)
            _backward(out, q, k, v)


def case_cogvideo_base():
    import torchnova

    q, k, v = (_leaf(1, 2 + 3 * 9, 1, 72, dtype="bfloat16") for _ in range(3))
    with _attention_kernel("simt"):
        out = torchnova.cogvideo_attention(q, k, v, text_len=2, frames=3, grid=3, channel="base", backend=BACKEND)
        _backward(out, q, k, v)


def case_dual_channel_mix():
    import torchnova

    o_base, o_plus = _leaf(2, 11, 24), _leaf(2, 11, 24)
    alpha = _leaf(24)
    _backward(torchnova.dual_channel_mix(o_base, o_plus, alpha, text_len=3, backend=BACKEND), o_base, o_plus, alpha)


def case_mesa_kl_vectorized():
    import torchnova

    z, t = _leaf(5, 1000), torch.randn(5, 1000, device=DEVICE).half()
    _backward(torchnova.mesa_kl(z, t, temperature=2.0, backend=BACKEND), z)


def case_mesa_kl_strided_long_rows():
    import torchnova

    z = torch.randn(20001, 3, device=DEVICE).t()[:, 1:].requires_grad_(True)  # (3, 20000), column stride 3
    t = torch.randn(3, 20000, device=DEVICE)
    _backward(torchnova.mesa_kl(z, t, reduction="none", backend=BACKEND), z)


# name: (function, the kernels it launches)
CASES = {
    "temporal_bias": (case_temporal_bias, "temporal_fwd_kernel, temporal_bwd_kernel, temporal_dbias_reduce_kernel"),
    "temporal_qkvpacked": (case_temporal_qkvpacked, "temporal_fwd_kernel, temporal_bwd_kernel (bf16, packed)"),
    "temporal_rotary_interleaved": (
        case_temporal_rotary_interleaved,
        "temporal_fwd_kernel, temporal_bwd_kernel (rotary instances, interleaved), temporal_dbias_reduce_kernel",
    ),
    "temporal_rotary_half_qkvpacked": (
        case_temporal_rotary_half_qkvpacked,
        "temporal_fwd_kernel, temporal_bwd_kernel (rotary instances, half-split, bf16, packed)",
    ),
    "spatial": (case_spatial, "spatial_fwd_kernel, spatial_delta_kernel, spatial_dkdv_kernel, spatial_dq_kernel "
                "(SIMT forced)"),
    "spatial_tensor_core": (
        case_spatial_tensor_core,
        "attention_tc_fwd_kernel, spatial_delta_kernel, tc_bwd_dkdv_kernel, tc_bwd_dq_kernel (fp16 D 40, bf16 D 100)",
    ),
    "spatial_d256": (case_spatial_d256, "spatial_* kernels, head-dim bucket 256, fp32"),
    "cogvideo_plus_window": (
        case_cogvideo_plus_window,
        "cogvideo_attention_fwd_kernel, cogvideo_attention_delta_kernel, cogvideo_attention_bwd_dkdv_kernel, "
        "cogvideo_attention_bwd_dq_kernel (SIMT forced), then attention_tc_fwd_kernel, tc_bwd_dkdv_kernel, "
        "tc_bwd_dq_kernel (CogVideo policy)",
    ),
    "cogvideo_base": (case_cogvideo_base, "cogvideo_attention_* kernels, base channel, head-dim bucket 128, bf16 "
                                      "(SIMT forced)"),
    "dual_channel_mix": (
        case_dual_channel_mix,
        "dual_channel_mix_fwd_kernel, dual_channel_mix_bwd_kernel, dual_channel_mix_alpha_grad_kernel",
    ),
    "mesa_kl_vectorized": (case_mesa_kl_vectorized, "mesa_kl_fwd_kernel, mesa_kl_bwd_kernel (16-byte packets)"),
    "mesa_kl_strided_long_rows": (
        case_mesa_kl_strided_long_rows, "mesa_kl_fwd_kernel, mesa_kl_bwd_kernel (strided, several chunks per row)"
    ),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="print the cases and their kernels; needs no GPU")
    parser.add_argument("--case", action="append", choices=list(CASES), help="run only this case (repeatable)")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="run the cases on CPU tensors with the cpp backend (checks the calls; no GPU needed)")
    args = parser.parse_args(argv)
    names = args.case or list(CASES)
    if args.list:
        for name in names:
            print(f"{name}: {CASES[name][1]}")
        return 0
    global torch, DEVICE, BACKEND
    import torch
    if args.cpu_smoke:
        DEVICE, BACKEND = "cpu", "cpp"
    elif not torch.cuda.is_available():
        print("gpu_sanitize_cases: no CUDA GPU visible; nothing to launch (use --list to see the cases)")
        return 2
    torch.manual_seed(0)
    failed = []
    for name in names:
        try:
            CASES[name][0]()
            print(f"[ok] {name}", flush=True)
        except Exception as exc:  # noqa: BLE001 - report every case, then fail
            failed.append(name)
            print(f"[FAIL] {name}: {type(exc).__name__}: {exc}", flush=True)
    print(f"gpu_sanitize_cases: {len(names) - len(failed)}/{len(names)} cases ran" +
          (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
