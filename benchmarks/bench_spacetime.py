"""Factorized space-time attention benchmarks: torchnova backends vs eager PyTorch and permute + SDPA + permute.

Inputs (B, T, S, H, D) as slices of one fused qkv tensor (B, T, S, 3, H, D), as a model produces them; the
``torchnova-<backend>-qkvpacked`` providers pass that tensor whole to ``*_attention_qkvpacked`` (one gradient for
it, where the slices make autograd stack three).
``temporal_attention`` runs with a learned (H, T, T) bias that gets a gradient (VDM's relative-position bias);
``spatial_attention`` has no mask.

Baselines: ``torch-eager`` (einsum/softmax written out, as video-diffusion-pytorch does); ``sdpa-<backend>``:
the layout permute to (B·S, H, T, D) (temporal) or (B·T, H, S, D) (spatial), ``scaled_dot_product_attention``
under ``sdpa_kernel(<backend>)`` with the bias as a float ``attn_mask``, and the permute back (the copies are
part of what a user pays); ``flex-attention``: the same layout through compiled FlexAttention with the bias as a
``score_mod`` (CUDA only); ``xformers`` (memory_efficient_attention, bias as a tensor) and ``flash-attn``
(flash_attn_func, spatial only: no additive bias) when installed. A backend that rejects the inputs (flash with
a bias; CUDA-only ones on CPU; more than 65,535 problems) is recorded as an error or skipped with its reason.

FLOPs (matmuls only, 2 per multiply-add): forward 4·P·L²·D with P problems of length L (temporal: P = B·S·H,
L = T; spatial: P = B·T·H, L = S); backward 2.5× forward (flash-attention's convention: 5 matmuls of that
size, the recomputed QKᵀ included); fwd+bwd 3.5× forward.
Bytes (temporal is memory-bound): forward reads q, k, v and writes out, 4·N·e (N = B·T·S·H·D elements of e
bytes); backward reads q, k, v, out, dout and writes dq, dk, dv, 8·N·e; fwd+bwd 12·N·e. The bias is negligible.

Run: ``python -m benchmarks --ops temporal_attention,spatial_attention``.
"""

from __future__ import annotations

import functools
import sys

import torch
import torch.nn.functional as F

from .harness import Case, Inputs, OpBenchmark, Provider

FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}
BYTE_PASSES = {"fwd": 4, "bwd": 8, "fwd_bwd": 12}
SDPA_BACKENDS = ("flash", "efficient", "cudnn", "math")


def make_inputs(shape: dict[str, int], dtype: torch.dtype, device: torch.device, with_bias: bool) -> Inputs:
    torch.manual_seed(0)
    B, T, S, H, D = (shape[key] for key in "BTSHD")
    qkv = torch.randn(B, T, S, 3, H, D, device=device, dtype=dtype, requires_grad=True)
    inputs = {"qkv": qkv}
    if with_bias:
        inputs["bias"] = torch.randn(H, T, T, device=device, dtype=torch.float32, requires_grad=True)
    return inputs


def _split(inputs: Inputs):
    return inputs["qkv"].unbind(dim=3)


def flops(kind: str, case: Case) -> float:
    B, T, S, H, D = (case.shape[key] for key in "BTSHD")
    problems, length = (B * S * H, T) if kind == "temporal" else (B * T * H, S)
    return FLOP_FACTOR[case.mode] * 4.0 * problems * length * length * D


def bytes_moved(case: Case) -> int:
    B, T, S, H, D = (case.shape[key] for key in "BTSHD")
    return BYTE_PASSES[case.mode] * B * T * S * H * D * case.dtype.itemsize


# ---------------------------------------------------------------------------------------------------------
# Baselines
# ---------------------------------------------------------------------------------------------------------


def eager_temporal(q, k, v, bias):
    """As video-diffusion-pytorch writes it: einsum over frames at each pixel, bias added, fp32 softmax."""
    scores = torch.einsum("btshd,bjshd->bshtj", q, k) * q.shape[-1] ** -0.5 + bias.unsqueeze(0).unsqueeze(0)
    probs = scores.float().softmax(dim=-1).to(q.dtype)
    return torch.einsum("bshtj,bjshd->btshd", probs, v)


def eager_spatial(q, k, v):
    scores = torch.einsum("btihd,btjhd->bthij", q, k) * q.shape[-1] ** -0.5
    return torch.einsum("bthij,btjhd->btihd", scores.float().softmax(dim=-1).to(q.dtype), v)


def to_problems(x, kind):
    """(B, T, S, H, D) -> the (batch, H, L, D) layout of SDPA / FlexAttention (a copy, as users pay it)."""
    B, T, S, H, D = x.shape
    if kind == "temporal":
        return x.permute(0, 2, 3, 1, 4).reshape(B * S, H, T, D)
    return x.permute(0, 1, 3, 2, 4).reshape(B * T, H, S, D)


def from_problems(out, shape, kind):
    B, T, S, H, D = shape
    if kind == "temporal":
        return out.reshape(B, S, H, T, D).permute(0, 3, 1, 2, 4)
    return out.reshape(B, T, H, S, D).permute(0, 1, 3, 2, 4)


def sdpa_temporal(q, k, v, bias, backend):
    B, T, S, H, D = q.shape
    mask = bias.to(q.dtype).unsqueeze(0).expand(B * S, H, T, T)
    with torch.nn.attention.sdpa_kernel(_sdpa_backend(backend)):
        out = F.scaled_dot_product_attention(*(to_problems(x, "temporal") for x in (q, k, v)), attn_mask=mask)
    return from_problems(out, q.shape, "temporal")


def sdpa_spatial(q, k, v, backend):
    with torch.nn.attention.sdpa_kernel(_sdpa_backend(backend)):
        out = F.scaled_dot_product_attention(*(to_problems(x, "spatial") for x in (q, k, v)))
    return from_problems(out, q.shape, "spatial")


def _flex_provider(kind: str) -> Provider:
    """Compiled FlexAttention; the temporal bias as a score_mod (learned, so it gets its gradient)."""

    def make(inputs: Inputs):
        from torch.nn.attention.flex_attention import flex_attention

        torch.compiler.reset()  # a fresh compile per case, like a fixed-shape training loop
        compiled = torch.compile(flex_attention, dynamic=False)
        q, k, v = _split(inputs)
        score_mod = None
        if kind == "temporal":
            bias = inputs["bias"]

            def score_mod(score, b, h, i, j):
                return score + bias[h, i, j]

        def run():
            out = compiled(*(to_problems(x, kind) for x in (q, k, v)), score_mod=score_mod)
            return from_problems(out, q.shape, kind)

        return run

    def reasons(inputs: Inputs) -> list[str]:
        device = inputs["qkv"].device
        if device.type != "cuda":
            return [f"device={device.type} (FlexAttention is benchmarked on CUDA: its CPU path compiles per shape)"]
        try:
            import torch.nn.attention.flex_attention  # noqa: F401
        except ImportError as exc:
            return [f"FlexAttention is not importable ({exc})"]
        return []

    return Provider("flex-attention", True, make, reasons)


def _to_bmhk(x, kind):
    """(B, T, S, H, D) -> the (batch, L, H, D) layout of xformers / flash-attn (spatial: a view; temporal: a copy)."""
    B, T, S, H, D = x.shape
    if kind == "temporal":
        return x.permute(0, 2, 1, 3, 4).reshape(B * S, T, H, D)
    return x.reshape(B * T, S, H, D)


def _from_bmhk(out, shape, kind):
    B, T, S, H, D = shape
    if kind == "temporal":
        return out.reshape(B, S, T, H, D).permute(0, 2, 1, 3, 4)
    return out.reshape(B, T, S, H, D)


def _xformers_provider(kind: str) -> Provider:
    """xformers.ops.memory_efficient_attention on the (batch, L, H, D) layout; the temporal bias as a tensor bias."""

    def make(inputs: Inputs):
        import xformers.ops as xops

        q, k, v = _split(inputs)

        def run():
            bias = None
            if kind == "temporal":
                B, T, S, H, D = q.shape
                bias = inputs["bias"].to(q.dtype).unsqueeze(0).expand(B * S, H, T, T)
            out = xops.memory_efficient_attention(*(_to_bmhk(x, kind) for x in (q, k, v)), attn_bias=bias)
            return _from_bmhk(out, q.shape, kind)

        return run

    def reasons(inputs: Inputs) -> list[str]:
        try:
            import xformers.ops  # noqa: F401
        except Exception as exc:  # ImportError, or a build for another torch
            return [f"xformers is not importable ({type(exc).__name__}: {exc})"]
        if inputs["qkv"].device.type != "cuda":
            return ["xformers' memory-efficient attention is benchmarked on CUDA"]
        return []

    return Provider("xformers", True, make, reasons)


def _flash_attn_provider(kind: str) -> Provider:
    """flash-attn 2 ``flash_attn_func`` (fp16/bf16, no additive bias: spatial only)."""

    def make(inputs: Inputs):
        from flash_attn import flash_attn_func

        q, k, v = _split(inputs)
        return lambda: _from_bmhk(flash_attn_func(*(_to_bmhk(x, kind) for x in (q, k, v))), q.shape, kind)

    def reasons(inputs: Inputs) -> list[str]:
        if kind == "temporal":
            return ["flash-attn has no additive attention bias (the temporal case trains a relative-position bias)"]
        try:
            import flash_attn  # noqa: F401
        except Exception as exc:
            return [f"flash-attn is not importable ({type(exc).__name__}: {exc})"]
        qkv = inputs["qkv"]
        if qkv.device.type != "cuda" or qkv.dtype not in (torch.float16, torch.bfloat16):
            return [f"flash-attn needs CUDA fp16/bf16, got {qkv.device.type} {qkv.dtype}"]
        return []

    return Provider("flash-attn", True, make, reasons)


def _sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend

    return {
        "flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH,
    }[name]  # fmt: skip


def _sdpa_reasons(backend: str, inputs: Inputs) -> list[str]:
    device = inputs["qkv"].device
    if backend in ("efficient", "cudnn") and device.type != "cuda":
        return [f"device={device.type} (SDPA's {backend} backend is CUDA only)"]
    return []


# ---------------------------------------------------------------------------------------------------------
# Providers
# ---------------------------------------------------------------------------------------------------------


def _torchnova_providers(kind: str) -> list[Provider]:
    import torchnova
    from torchnova import _backend

    op = f"{kind}_attention"

    def make(backend: str, inputs: Inputs):
        q, k, v = _split(inputs)
        if kind == "temporal":
            return lambda: torchnova.temporal_attention(q, k, v, bias=inputs["bias"], backend=backend)
        return lambda: torchnova.spatial_attention(q, k, v, backend=backend)

    def make_packed(backend: str, inputs: Inputs):
        qkv = inputs["qkv"]
        if kind == "temporal":
            return lambda: torchnova.temporal_attention_qkvpacked(qkv, bias=inputs["bias"], backend=backend)
        return lambda: torchnova.spatial_attention_qkvpacked(qkv, backend=backend)

    def reasons(backend: str, inputs: Inputs) -> list[str]:
        q, k, v = _split(inputs)
        return _backend.reasons(op, backend, q=q, k=k, v=v)

    sliced = [
        Provider(f"torchnova-{name}", False, functools.partial(make, name), functools.partial(reasons, name))
        for name in _backend.backends_for(op)
    ]
    # The packed form on the same fused tensor: one (B, T, S, 3, H, D) gradient, no stack of three in autograd.
    packed = [
        Provider(f"torchnova-{name}-qkvpacked", False, functools.partial(make_packed, name),
                 functools.partial(reasons, name))
        for name in _backend.backends_for(op) if name != "reference"
    ]  # fmt: skip
    return sliced + packed


def _baselines(kind: str) -> list[Provider]:
    def make_eager(inputs: Inputs):
        q, k, v = _split(inputs)
        if kind == "temporal":
            return lambda: eager_temporal(q, k, v, inputs["bias"])
        return lambda: eager_spatial(q, k, v)

    def make_sdpa(backend: str, inputs: Inputs):
        q, k, v = _split(inputs)
        if kind == "temporal":
            return lambda: sdpa_temporal(q, k, v, inputs["bias"], backend)
        return lambda: sdpa_spatial(q, k, v, backend)

    sdpa = [
        Provider(f"sdpa-{b}", True, functools.partial(make_sdpa, b), functools.partial(_sdpa_reasons, b))
        for b in SDPA_BACKENDS
    ]
    return [
        Provider("torch-eager", True, make_eager), *sdpa, _flex_provider(kind), _xformers_provider(kind),
        _flash_attn_provider(kind),
    ]  # fmt: skip


def _shape(B, T, S, H, D):
    return {"B": B, "T": T, "S": S, "H": H, "D": D}


def temporal_benchmark() -> OpBenchmark:
    shapes = [
        _shape(2, 16, 4096, 8, 64),  # VDM: 16 frames of 64×64
        *(_shape(2, 16, 1024, 8, d) for d in (40, 80, 160)),  # AnimateDiff-like, 32² latents
        *(_shape(2, t, 1024, 8, 64) for t in (8, 24, 32, 40)),  # T sweep (16 above)
    ]
    return OpBenchmark(
        name="temporal_attention",
        make_inputs=functools.partial(make_inputs, with_bias=True),
        providers=[*_torchnova_providers("temporal"), *_baselines("temporal")],
        shapes=shapes,
        quick_shapes=[_shape(1, 16, 256, 8, 64)],
        bytes_moved=bytes_moved,
        flops=functools.partial(flops, "temporal"),
    )


def spatial_benchmark() -> OpBenchmark:
    return OpBenchmark(
        name="spatial_attention",
        make_inputs=functools.partial(make_inputs, with_bias=False),
        providers=[*_torchnova_providers("spatial"), *_baselines("spatial")],
        shapes=[_shape(2, 16, s, 8, 64) for s in (256, 1024, 4096)],
        quick_shapes=[_shape(1, 2, 256, 8, 64)],
        flops=functools.partial(flops, "spatial"),
    )


if __name__ == "__main__":
    from .__main__ import main

    sys.exit(main(["--ops", "temporal_attention,spatial_attention", *sys.argv[1:]]))
