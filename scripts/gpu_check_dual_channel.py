"""First-GPU-run check of the CUDA (or Triton) dual-channel kernels against a float64 PyTorch computation.

    PYTHONPATH=pyext python scripts/gpu_check_dual_channel.py [--quick] [--backend cuda|triton]

Compares torch.ops.torchnova.cogvideo_attention_{fwd,bwd} (out, lse, dq, dk, dv) and dual_channel_mix_{fwd,bwd} (y,
d_base, d_plus, d_alpha_logit) — with --backend triton the ``*_triton`` ops of the same contract — on CUDA with
float64 math on the same (rounded) inputs, over every (channel, attention, shifted, stage) mode, on a small layout
(text 3, frames 5, grid 8x8, window 4) and on the released one (text 64, 5 x 20 x 20, window 10), in float32 /
float16 / bfloat16, with strided q / k / v, a head dim that is not a multiple of 16 on the small layout, and
left-padded text. Also checks that the backward is bitwise deterministic, that rows with no visible key give out =
0, lse = +inf and zero gradients, and that bad arguments raise. The dense mask is built here the way CogVideo's code
builds it (window partition of the rolled grid, region mask, tril or interpolation mask per window sequence),
independently of the kernels' index rule. Tolerances: tests/utils.py TOLERANCES (the suite's one table). Prints max
errors; exits 1 on any mismatch, and 0 with a "no GPU" message when CUDA is not available.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import math
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SMALL = dict(text_len=3, frames=5, grid_h=8, grid_w=8, window=4)
RELEASED = dict(text_len=64, frames=5, grid_h=20, grid_w=20, window=10)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def load_tolerances() -> dict:
    spec = importlib.util.spec_from_file_location("torchnova_test_utils", os.path.join(ROOT, "tests", "utils.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TOLERANCES


def modes():
    """Every valid (channel, attention, shifted, stage) combination."""
    stages = ("sequential", "interpolation")
    for channel, attention, stage in itertools.product(("base", "plus"), ("full", "window"), stages):
        for shifted in (False, True) if attention == "window" else (False,):
            yield channel, attention, shifted, stage


def cogvideo_style_mask(text_len, frames, grid_h, grid_w, channel, attention, window, shifted, stage):
    """Dense (L, L) bool visibility built the way CogVideo's code does (window partition of the rolled grid, region
    mask, tril / interpolation mask inside each window sequence): an independent cross-check of the kernels' rule."""
    tokens = grid_h * grid_w
    seq_len = text_len + frames * tokens
    mask = torch.zeros(seq_len, seq_len, dtype=torch.bool)
    frame_ids = torch.arange(frames * tokens).view(frames, grid_h, grid_w)
    if channel == "base":
        mask[:, :text_len] = True
        for f in range(frames):
            full_frame = stage == "interpolation" and f % 2 == 0
            local = torch.ones(tokens, tokens, dtype=torch.bool)
            start = text_len + f * tokens
            mask[start : start + tokens, start : start + tokens] = local if full_frame else local.tril()
        return mask
    mask[text_len:, :text_len] = True
    if attention == "full":
        sequences = [(frame_ids.flatten(), torch.zeros(frames * tokens, dtype=torch.long))]
        per_frame = tokens
    else:
        shift = window // 2 if shifted else 0
        ids = frame_ids.roll((-shift, -shift), dims=(1, 2)) if shift else frame_ids
        region = torch.zeros(grid_h, grid_w, dtype=torch.long)
        if shift:  # CogVideo's region slices on the rolled grid: [0:-shift], [-shift:] per axis
            for i, rows in enumerate((slice(0, -shift), slice(-shift, None))):
                for j, cols in enumerate((slice(0, -shift), slice(-shift, None))):
                    region[rows, cols] = 2 * i + j
        sequences = []
        for wy in range(grid_h // window):
            for wx in range(grid_w // window):
                rows, cols = slice(wy * window, (wy + 1) * window), slice(wx * window, (wx + 1) * window)
                sequences.append((ids[:, rows, cols].flatten(), region[rows, cols].expand(frames, -1, -1).flatten()))
        per_frame = window * window
    for ids_seq, region_seq in sequences:
        n = ids_seq.numel()
        frame_of = torch.arange(n) // per_frame
        if stage == "sequential":
            allowed = torch.ones(n, n, dtype=torch.bool).tril()
        else:
            fi, fj = frame_of[:, None], frame_of[None, :]
            causal = torch.ones(n, n, dtype=torch.bool).tril()
            allowed = torch.where(fi % 2 == 0, fj % 2 == 0, (fj % 2 == 0) | (fj < fi) | ((fj == fi) & causal))
        allowed &= region_seq[:, None] == region_seq[None, :]
        rows = (text_len + ids_seq)[:, None].expand(n, n)
        cols = (text_len + ids_seq)[None, :].expand(n, n)
        mask[rows[allowed], cols[allowed]] = True
    return mask


def strided_qkv(batch, seq_len, heads, head_dim, dtype, device, generator, row_pad):
    """q, k, v (B, L, H, D) views with stride(-1) == 1 but non-contiguous B / L / H strides; row_pad = 8 keeps
    every stride a multiple of 16 bytes for 16-bit D % 8 == 0 (the vector-load path), 3 forces scalar loads."""
    out = []
    for _ in range(3):
        storage = torch.randn(batch, heads, seq_len, head_dim + row_pad, generator=generator, dtype=torch.float64)
        out.append(storage.to(device=device, dtype=dtype).permute(0, 2, 1, 3)[..., :head_dim])
    return out


def reference_attention(q, k, v, grad_out, visible):
    """float64 out, lse, dq, dk, dv; visible (B, L, L) bool. Empty rows: out 0, lse +inf, zero gradients."""
    q64, k64, v64 = (x.detach().double().requires_grad_(True) for x in (q, k, v))
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.einsum("blhd,bmhd->bhlm", q64, k64) * scale
    mask = visible[:, None]  # (B, 1, L, L)
    has_key = mask.any(-1, keepdim=True)
    # -1e30 underflows to exactly 0 after the max shift in float64 for rows with a visible key; rows without one
    # are zeroed by has_key (their softmax would be uniform), so no -inf - -inf ever appears.
    probs = torch.softmax(scores.masked_fill(~mask, -1e30), dim=-1) * has_key
    out = torch.einsum("bhlm,bmhd->blhd", probs, v64)
    lse = torch.logsumexp(scores.masked_fill(~mask, -1e30), dim=-1)
    lse = torch.where(has_key[..., 0], lse, torch.full_like(lse, math.inf)).permute(0, 2, 1)  # (B, L, H)
    dq, dk, dv = torch.autograd.grad(out, (q64, k64, v64), grad_out.double())
    return out.detach(), lse.detach(), dq, dk, dv


class Checker:
    def __init__(self, tolerances):
        self.tolerances = tolerances
        self.failures = []

    def compare(self, name, actual, expected, dtype, kind):
        atol, rtol = self.tolerances[kind][dtype]
        actual64, expected64 = actual.detach().double().cpu(), expected.detach().double().cpu()
        finite = torch.isfinite(expected64)
        ok = bool((torch.isfinite(actual64) == finite).all()) and bool((actual64[~finite] == expected64[~finite]).all())
        a, e = actual64[finite], expected64[finite]
        scale = max(1.0, e.abs().max().item()) if e.numel() else 1.0
        diff = (a - e).abs()
        max_diff = diff.max().item() if diff.numel() else 0.0
        ok = ok and bool((diff <= atol * scale + rtol * e.abs()).all())
        print(f"    {name:<14} max|diff| {max_diff:.3e} (scale {scale:.3g})  {'ok' if ok else 'MISMATCH'}")
        if not ok:
            self.failures.append(name)

    def require(self, name, condition):
        print(f"    {name:<40} {'ok' if condition else 'FAILED'}")
        if not condition:
            self.failures.append(name)


OP_SUFFIX = ""  # "_triton" with --backend triton


def op(name):
    return getattr(torch.ops.torchnova, name + OP_SUFFIX)


def check_attention(checker, dense_mask, layout, dtype, head_dim, batch, heads, generator, row_pad=3):
    seq_len = layout["text_len"] + layout["frames"] * layout["grid_h"] * layout["grid_w"]
    text_pad = torch.ones(batch, layout["text_len"], dtype=torch.bool, device="cuda")
    if batch > 1 and layout["text_len"] > 1:
        text_pad[1, : layout["text_len"] - 1] = False  # left padding, as CogVideo: one real text token left
    for channel, attention, shifted, stage in modes():
        for with_pad in (False, True):
            print(f"  {dtype} D={head_dim} L={seq_len} {channel}/{attention}/shifted={shifted}/{stage}/pad={with_pad}")
            q, k, v = strided_qkv(batch, seq_len, heads, head_dim, dtype, "cuda", generator, row_pad)
            grad_out = torch.randn(batch, seq_len, heads, head_dim, generator=generator, dtype=torch.float64)
            grad_out = grad_out.to(device="cuda", dtype=dtype)
            pad = text_pad if with_pad else None
            args = (layout["text_len"], layout["frames"], layout["grid_h"], layout["grid_w"], channel, attention,
                    layout["window"], shifted, stage)
            out, lse = op("cogvideo_attention_fwd")(q, k, v, pad, *args)
            dq, dk, dv = op("cogvideo_attention_bwd")(grad_out, q, k, v, out, lse, pad, *args)
            visible = dense_mask(layout, channel, attention, shifted, stage).to("cuda")
            visible = visible[None].expand(batch, seq_len, seq_len).clone()
            if pad is not None:
                visible[:, :, : layout["text_len"]] &= pad[:, None, :]
            ref = reference_attention(q, k, v, grad_out, visible)
            for name, actual, expected, kind in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, dq, dk, dv), ref,
                                                     ("fwd", "fwd", "grad", "grad", "grad")):
                checker.compare(name, actual, expected, dtype, kind)
            again = op("cogvideo_attention_bwd")(grad_out, q, k, v, out, lse, pad, *args)
            deterministic = all(torch.equal(x, y) for x, y in zip(again, (dq, dk, dv)))
            checker.require("backward bitwise deterministic", deterministic)
            empty = ~visible.any(-1)  # (B, L)
            if empty.any():
                zero_out, inf_lse = bool((out[empty] == 0).all()), bool((lse[empty] == math.inf).all())
                zero_dq = bool((dq[empty] == 0).all())
                checker.require("empty rows: out 0, lse +inf, dq 0", zero_out and inf_lse and zero_dq)


def check_mix(checker, dtype, generator):
    batch, seq_len, hidden, text_len = 3, 37, 24, 5
    base, plus, grad_y = (
        torch.randn(batch, seq_len, hidden, generator=generator, dtype=torch.float64) for _ in range(3)
    )
    logit = torch.randn(hidden, generator=generator, dtype=torch.float64)
    base, plus, grad_y = (x.to(device="cuda", dtype=dtype) for x in (base, plus, grad_y))
    logit_cuda = logit.to(device="cuda", dtype=torch.float32)
    print(f"  mix {dtype} B={batch} L={seq_len} hidden={hidden} text_len={text_len}")
    y = op("dual_channel_mix_fwd")(base, plus, logit_cuda, text_len)
    d_base, d_plus, d_logit = op("dual_channel_mix_bwd")(grad_y, base, plus, logit_cuda, text_len)
    b64, p64 = base.double().requires_grad_(True), plus.double().requires_grad_(True)
    l64 = logit_cuda.double().requires_grad_(True)
    alpha = torch.sigmoid(l64)
    y64 = torch.cat([b64[:, :text_len], alpha * b64[:, text_len:] + (1 - alpha) * p64[:, text_len:]], dim=1)
    grads = torch.autograd.grad(y64, (b64, p64, l64), grad_y.double())
    checker.compare("y", y, y64, dtype, "fwd")
    for name, actual, expected in zip(("d_base", "d_plus", "d_alpha_logit"), (d_base, d_plus, d_logit), grads):
        checker.compare(name, actual, expected, dtype, "grad")
    again = op("dual_channel_mix_bwd")(grad_y, base, plus, logit_cuda, text_len)
    checker.require("mix backward bitwise deterministic", torch.equal(again[2], d_logit))


def check_errors(checker):
    ops = torch.ops.torchnova
    q = torch.randn(1, 3 + 5 * 16, 2, 8, device="cuda")
    bad_calls = {
        "L mismatch": lambda: ops.cogvideo_attention_fwd(q, q, q, None, 4, 5, 4, 4, "base", "full", 2, False,
                                                        "sequential"),
        "window not dividing grid": lambda: ops.cogvideo_attention_fwd(q, q, q, None, 3, 5, 4, 4, "plus", "window", 3,
                                                                      False, "sequential"),
        "unknown channel": lambda: ops.cogvideo_attention_fwd(q, q, q, None, 3, 5, 4, 4, "both", "full", 2, False,
                                                             "sequential"),
        "head dim > 256": lambda: ops.cogvideo_attention_fwd(*(torch.randn(1, 83, 1, 257, device="cuda"),) * 3, None,
                                                            3, 5, 4, 4, "base", "full", 2, False, "sequential"),
        "stride(-1) != 1": lambda: ops.cogvideo_attention_fwd(q.transpose(2, 3), q.transpose(2, 3), q.transpose(2, 3),
                                                             None, 3, 5, 4, 4, "base", "full", 2, False, "sequential"),
        "pad mask dtype": lambda: ops.cogvideo_attention_fwd(q, q, q, torch.ones(1, 3, device="cuda"), 3, 5, 4, 4,
                                                            "base", "full", 2, False, "sequential"),
    }
    for name, call in bad_calls.items():
        try:
            call()
        except RuntimeError as exc:  # TORCH_CHECK
            checker.require(f"raises: {name}", "cogvideo_attention_fwd" in str(exc))
        else:
            checker.require(f"raises: {name}", False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small layout only")
    parser.add_argument("--backend", choices=("cuda", "triton"), default="cuda", help="which kernels (default cuda)")
    options = parser.parse_args()
    if not torch.cuda.is_available():
        print("no GPU: torch.cuda.is_available() is False, nothing to check (exit 0)")
        return 0
    sys.path.insert(0, os.path.join(ROOT, "pyext"))
    import torchnova  # noqa: F401  (registers the ops)
    from torchnova import _ext

    global OP_SUFFIX
    OP_SUFFIX = "_triton" if options.backend == "triton" else ""
    if options.backend == "triton" and not _ext.HAS_TRITON:
        print(f"triton is not importable ({_ext.TRITON_IMPORT_ERROR})")
        return 1
    if options.backend == "cuda" and not _ext.HAS_CUDA_KERNELS:
        print(f"torchnova was built without CUDA kernels ({_ext.BUILD_INFO or _ext.CPP_IMPORT_ERROR}): rebuild with "
              "FORCE_CUDA=1")
        return 1
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, kernels: {options.backend}")

    def dense_mask(layout, channel, attention, shifted, stage):
        return cogvideo_style_mask(layout["text_len"], layout["frames"], layout["grid_h"], layout["grid_w"], channel,
                                   attention, layout["window"], shifted, stage)

    checker = Checker(load_tolerances())
    from torchnova.dual_channel import masks

    for layout in (SMALL, RELEASED):  # the package's rule (masks.py) against the CogVideo-style construction
        for channel, attention, shifted, stage in modes():
            expected = dense_mask(layout, channel, attention, shifted, stage)
            rule = masks.visibility(layout["text_len"], layout["frames"], layout["grid_h"], layout["grid_w"], channel,
                                    attention, layout["window"], shifted, stage)
            checker.require(f"masks.visibility {channel}/{attention}/{shifted}/{stage}", torch.equal(rule, expected))
    generator = torch.Generator().manual_seed(0)
    if options.backend == "cuda":  # the Triton ops leave argument checks to torchnova.cogvideo_attention
        check_errors(checker)
    for dtype in DTYPES:
        check_mix(checker, dtype, generator)
    for dtype in DTYPES:
        check_attention(checker, dense_mask, SMALL, dtype, head_dim=40, batch=2, heads=3, generator=generator)
        check_attention(checker, dense_mask, SMALL, dtype, head_dim=7, batch=1, heads=1, generator=generator)
        check_attention(checker, dense_mask, SMALL, dtype, head_dim=96, batch=1, heads=2, generator=generator,
                        row_pad=8)
    if not options.quick:
        for dtype in DTYPES:
            check_attention(checker, dense_mask, RELEASED, dtype, head_dim=64, batch=2, heads=2, generator=generator,
                            row_pad=8)
        check_attention(checker, dense_mask, SMALL, torch.float16, head_dim=200, batch=1, heads=2, generator=generator)
    if checker.failures:
        print(f"FAILED: {len(checker.failures)} checks: {sorted(set(checker.failures))}")
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
