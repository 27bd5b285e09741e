"""Self-check of the space-time attention CUDA kernels against a float64 PyTorch computation written here.

    python scripts/gpu_check_spacetime.py            # full check (a few seconds on a GPU)
    python scripts/gpu_check_spacetime.py --quick    # fewer shapes, for compute-sanitizer:
    compute-sanitizer --tool memcheck python scripts/gpu_check_spacetime.py --quick
    compute-sanitizer --tool racecheck python scripts/gpu_check_spacetime.py --quick
    compute-sanitizer --tool synccheck python scripts/gpu_check_spacetime.py --quick

Calls torch.ops.torchnova.{temporal,spatial}_attention_{fwd,bwd} directly on CUDA tensors (no dependency on the
Python ops) over odd shapes (T = 1, 7, 40, 128; S = 1, 5, 300; D = 40 .. 256), float32/float16/bfloat16, bias /
segment_ids / causal on and off, strided q, k, v (slices of one fused qkv tensor, frame/token transposes), and
a 70,000-problem launch of each; checks dbias is bit-identical across runs and that bad inputs raise. A kernel
passes when its max error against float64 is within atol + rtol * max|ref| or within 2x (+ atol) of the error
of the same math run in the input dtype. Prints one line per check, exits 1 on any mismatch and 0 with a
"no GPU" message where CUDA is not available.
"""

from __future__ import annotations

import argparse
import itertools
import sys

import torch

TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 5e-3), torch.bfloat16: (1.5e-2, 2e-2)}  # (atol, rtol)

failures: list[str] = []


def report(name: str, got: torch.Tensor, ref: torch.Tensor, lowp: torch.Tensor | None, dtype) -> None:
    got64, ref64 = got.double(), ref.double()
    err = (got64 - ref64).abs().max().item() if ref.numel() else 0.0
    scale = ref64.abs().max().item() if ref.numel() else 0.0
    atol, rtol = TOL[dtype]
    # float32 has no "same-dtype math" baseline (the kernels are float32 throughout): only the absolute bound.
    lowp_err = (lowp.double() - ref64).abs().max().item() if (lowp is not None and ref.numel()) else None
    finite = bool(torch.isfinite(got64).all()) if got.numel() else True
    within = err <= atol + rtol * scale or (lowp_err is not None and err <= 2 * lowp_err + atol)
    ok = finite and within
    lowp_text = "n/a" if lowp_err is None else f"{lowp_err:.2e}"
    line = f"{'ok  ' if ok else 'FAIL'} {name}: max err {err:.3e} (|ref| {scale:.2e}, same-dtype math {lowp_text})"
    print(line)
    if not ok:
        failures.append(line)


def rand(shape, dtype, device, gen):
    return torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype)


def make_qkv(B, T, S, H, D, dtype, layout, gen):
    """q, k, v of shape (B, T, S, H, D) with unit head-dim stride and the given memory layout."""
    dev = "cuda"
    if layout == "contiguous":
        return [rand((B, T, S, H, D), dtype, dev, gen) for _ in range(3)]
    if layout == "fused_qkv_heads":  # (B, T, S, H, 3, D): q = qkv[..., 0, :], head stride 3 * D
        qkv = rand((B, T, S, H, 3, D), dtype, dev, gen)
        return [qkv[..., i, :] for i in range(3)]
    if layout == "fused_qkv_tokens":  # (B, T, S, 3, H, D) sliced, then frames and tokens swapped in memory
        qkv = rand((B, S, T, 3, H, D), dtype, dev, gen).transpose(1, 2)
        return [qkv[:, :, :, i] for i in range(3)]
    raise ValueError(layout)


# ---------------------------------------------------------------- float64 math (written here, not imported)
def temporal_math(q, k, v, bias, seg, causal, scale):
    """q, k, v (B, T, S, H, D) in any float dtype -> out (B, T, S, H, D), lse (B, T, S, H), computed in q's dtype
    except the softmax (float32 for 16-bit inputs, as the kernels do, float64 for float64)."""
    B, T, S, H, D = q.shape
    qp, kp, vp = (x.permute(0, 2, 3, 1, 4) for x in (q, k, v))  # (B, S, H, T, D)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = (torch.matmul(qp, kp.transpose(-1, -2)) * scale).to(acc)  # (B, S, H, T, T)
    if bias is not None:
        scores = scores + bias.to(acc)[None, None]
    visible = torch.ones(T, T, dtype=torch.bool, device=q.device).expand(B, T, T)
    if seg is not None:
        visible = visible & (seg[:, :, None] == seg[:, None, :])
    if causal:
        visible = visible & torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    visible = visible | torch.eye(T, dtype=torch.bool, device=q.device)
    scores = scores.masked_fill(~visible[:, None, None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (B, S, H, T)
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    out = torch.matmul(probs, vp)  # (B, S, H, T, D)
    return out.permute(0, 3, 1, 2, 4), lse.permute(0, 3, 1, 2)


def spatial_math(q, k, v, scale):
    qp, kp, vp = (x.permute(0, 1, 3, 2, 4) for x in (q, k, v))  # (B, T, H, S, D)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = (torch.matmul(qp, kp.transpose(-1, -2)) * scale).to(acc)
    lse = torch.logsumexp(scores, dim=-1)  # (B, T, H, S)
    out = torch.matmul(torch.softmax(scores, dim=-1).to(q.dtype), vp)
    return out.permute(0, 1, 3, 2, 4), lse.permute(0, 1, 3, 2)


def grads(math, q, k, v, bias, grad_out, **kw):
    """(out, lse, dq, dk, dv, dbias) of `math` in q's dtype through autograd."""
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    bias_leaf = bias.detach().clone().requires_grad_(True) if bias is not None else None
    if math is temporal_math:
        out, lse = math(*leaves, bias_leaf, kw["seg"], kw["causal"], kw["scale"])
    else:
        out, lse = math(*leaves, kw["scale"])
    out.backward(grad_out.to(out.dtype))
    return out.detach(), lse.detach(), *(x.grad for x in leaves), (bias_leaf.grad if bias_leaf is not None else None)


# ---------------------------------------------------------------- checks
def check_temporal(B, T, S, H, D, dtype, layout, with_bias, with_seg, causal, gen, tag=""):
    ops = torch.ops.torchnova
    q, k, v = make_qkv(B, T, S, H, D, dtype, layout, gen)
    bias = rand((H, T, T), torch.float32, "cuda", gen) if with_bias else None
    seg = torch.randint(0, 3, (B, T), generator=gen, device="cuda") if with_seg else None
    scale = D**-0.5
    grad_out = rand((B, T, S, H, D), dtype, "cuda", gen)
    name = (f"temporal {tag}B{B} T{T} S{S} H{H} D{D} {str(dtype)[6:]} {layout} "
            f"bias={int(with_bias)} seg={int(with_seg)} causal={int(causal)}")

    out, lse = ops.temporal_attention_fwd(q, k, v, bias, seg, causal, scale)
    needs_bias_grad = with_bias
    dq, dk, dv, dbias = ops.temporal_attention_bwd(grad_out, q, k, v, out, lse, bias, seg, causal, scale,
                                                   needs_bias_grad, True)
    ref = grads(temporal_math, q.double(), k.double(), v.double(), bias.double() if with_bias else None,
                grad_out.double(), seg=seg, causal=causal, scale=scale)
    low = [None] * 6
    if dtype != torch.float32:
        low = grads(temporal_math, q, k, v, bias, grad_out, seg=seg, causal=causal, scale=scale)
    for label, got, r, lo in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, dq, dk, dv), ref, low):
        report(f"{name} {label}", got, r, lo, dtype)
    if with_bias:
        report(f"{name} dbias", dbias, ref[5], low[5], dtype)
        again = ops.temporal_attention_bwd(grad_out, q, k, v, out, lse, bias, seg, causal, scale, True, True)[3]
        same = torch.equal(again, dbias)
        print(f"{'ok  ' if same else 'FAIL'} {name} dbias bit-identical across runs")
        if not same:
            failures.append(f"{name} dbias not deterministic")
    elif dbias.shape != (0,):
        failures.append(f"{name}: dbias shape {tuple(dbias.shape)} != (0,) with needs_bias_grad=False")


def check_spatial(B, T, S, H, D, dtype, layout, gen, tag=""):
    ops = torch.ops.torchnova
    q, k, v = make_qkv(B, T, S, H, D, dtype, layout, gen)
    scale = D**-0.5
    grad_out = rand((B, T, S, H, D), dtype, "cuda", gen)
    name = f"spatial {tag}B{B} T{T} S{S} H{H} D{D} {str(dtype)[6:]} {layout}"
    out, lse = ops.spatial_attention_fwd(q, k, v, scale)
    dq, dk, dv = ops.spatial_attention_bwd(grad_out, q, k, v, out, lse, scale)
    ref = grads(spatial_math, q.double(), k.double(), v.double(), None, grad_out.double(), scale=scale)
    low = grads(spatial_math, q, k, v, None, grad_out, scale=scale) if dtype != torch.float32 else [None] * 6
    for label, got, r, lo in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, dq, dk, dv), ref, low):
        report(f"{name} {label}", got, r, lo, dtype)


def check_errors() -> None:
    ops = torch.ops.torchnova
    q = torch.randn(1, 4, 3, 2, 8, device="cuda")
    cases = {
        "float64 q": lambda: ops.temporal_attention_fwd(q.double(), q.double(), q.double(), None, None, False, 1.0),
        "T = 129": lambda: ops.temporal_attention_fwd(*(torch.randn(1, 129, 1, 1, 8, device="cuda"),) * 3, None,
                                                      None, False, 1.0),
        "D = 257": lambda: ops.spatial_attention_fwd(*(torch.randn(1, 1, 2, 1, 257, device="cuda"),) * 3, 1.0),
        "stride(-1) != 1": lambda: ops.spatial_attention_fwd(q[..., ::2], q[..., ::2], q[..., ::2], 1.0),
        "k on CPU": lambda: ops.spatial_attention_fwd(q, q.cpu(), q, 1.0),
        "mixed dtypes": lambda: ops.spatial_attention_fwd(q, q.half(), q, 1.0),
        "bias non-contiguous": lambda: ops.temporal_attention_fwd(
            q, q, q, torch.randn(2, 4, 4, device="cuda").transpose(1, 2), None, False, 1.0),
        "bias float16": lambda: ops.temporal_attention_fwd(q, q, q, torch.randn(2, 4, 4, device="cuda").half(), None,
                                                           False, 1.0),
        "segment_ids int32": lambda: ops.temporal_attention_fwd(
            q, q, q, None, torch.zeros(1, 4, dtype=torch.int32, device="cuda"), False, 1.0),
        "segment_ids wrong shape": lambda: ops.temporal_attention_fwd(
            q, q, q, None, torch.zeros(1, 5, dtype=torch.long, device="cuda"), False, 1.0),
        "lse wrong dtype": lambda: ops.spatial_attention_bwd(q, q, q, q, q, torch.zeros(1, 4, 3, 2, device="cuda",
                                                                                         dtype=torch.float64), 1.0),
    }
    for label, fn in cases.items():
        try:
            fn()
            torch.cuda.synchronize()
        except RuntimeError as exc:
            print(f"ok   error for {label}: {str(exc).splitlines()[0][:150]}")
        else:
            print(f"FAIL no error for {label}")
            failures.append(f"no error for {label}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes (for compute-sanitizer)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no GPU: torch.cuda.is_available() is False; nothing to check (exit 0)")
        return 0
    import torchnova  # noqa: F401  (loads torchnova._C, which registers the CUDA kernels)

    if not torchnova._ext.HAS_CUDA_KERNELS:
        print(f"FAIL torchnova._C has no CUDA kernels (build info {torchnova._ext.BUILD_INFO}, "
              f"import error {torchnova._ext.CPP_IMPORT_ERROR!r})")
        return 1
    print(f"device: {torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))}), "
          f"torch {torch.__version__}")
    gen = torch.Generator(device="cuda").manual_seed(0)
    dtypes = [torch.float32, torch.float16, torch.bfloat16]
    layouts = ["contiguous", "fused_qkv_heads", "fused_qkv_tokens"]

    temporal_shapes = [(2, 1, 3, 2, 40), (2, 7, 5, 3, 64), (1, 40, 3, 2, 72), (2, 16, 3, 2, 88), (1, 9, 2, 1, 160)]
    if not args.quick:
        temporal_shapes += [(1, 33, 2, 2, 256), (1, 128, 1, 2, 16), (3, 5, 4, 1, 1)]
    for shape, dtype in itertools.product(temporal_shapes, dtypes):
        for layout_index, (with_bias, with_seg, causal) in enumerate(itertools.product((False, True), repeat=3)):
            if args.quick and layout_index not in (0, 7):
                continue
            check_temporal(*shape, dtype, layouts[layout_index % 3], with_bias, with_seg, causal, gen)

    spatial_shapes = [(1, 2, 1, 2, 40), (2, 1, 5, 3, 64), (1, 2, 300, 2, 72), (1, 1, 67, 2, 88), (1, 2, 45, 1, 160)]
    if not args.quick:
        spatial_shapes += [(1, 1, 300, 1, 256), (1, 1, 129, 2, 128), (2, 1, 33, 1, 1), (1, 1, 1000, 1, 64)]
    for (shape, dtype), layout in zip(itertools.product(spatial_shapes, dtypes), itertools.cycle(layouts)):
        check_spatial(*shape, dtype, layout, gen)

    # > 65,535 problems in one launch: must not hit a grid.y/z limit.
    check_temporal(1, 8, 35000, 2, 40, torch.float16, "fused_qkv_heads", True, True, True, gen, tag="70k-problems ")
    check_spatial(1, 35000, 5, 2, 40, torch.bfloat16, "fused_qkv_tokens", gen, tag="70k-problems ")

    check_errors()
    torch.cuda.synchronize()
    if failures:
        print(f"\n{len(failures)} check(s) FAILED:")
        for line in failures:
            print("  " + line)
        return 1
    print("\nall checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
