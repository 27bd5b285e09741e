"""CogVideo dual-channel attention benchmark: ``torchnova.cogvideo_attention`` backends vs dense masked SDPA
(math, efficient), FlexAttention with a block mask from the same rule (compiled) and NATTEN when installed.

Layout (B, L, H, D), L = text + frames * grid^2; the mask rule is torchnova/dual_channel/masks.py. FLOPs count
visible pairs only (what a sparse kernel must do): fwd 4 * visible_pairs * D per (batch, head) (QK^T and PV),
bwd 2.5x fwd, fwd_bwd 3.5x fwd. The `visible` column of the shape is the fraction of the L x L pairs visible.

Run: ``python -m benchmarks --ops dual_channel`` (or ``python -m benchmarks.bench_dual_channel``).
"""

from __future__ import annotations

import functools
import sys

import torch
import torch.nn.functional as F

from .harness import Case, Inputs, OpBenchmark, Provider

# mode name -> (channel, attention, shifted, stage)
ATTENTION_MODES = {
    "base-seq": ("base", "full", False, "sequential"),
    "base-interp": ("base", "full", False, "interpolation"),
    "plus-full-seq": ("plus", "full", False, "sequential"),
    "plus-window-seq": ("plus", "window", False, "sequential"),
    "plus-window-shifted-interp": ("plus", "window", True, "interpolation"),
}
FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}


def _layout_args(shape):
    channel, attention, shifted, stage = ATTENTION_MODES[shape["mode"]]
    return dict(text_len=shape["text"], frames=shape["frames"], grid=shape["grid"], channel=channel,
                attention=attention, window=shape["window"], shifted=shifted, stage=stage)


@functools.lru_cache(maxsize=16)
def _dense_mask(text, frames, grid, window, mode, device):
    from torchnova.dual_channel.masks import visibility

    channel, attention, shifted, stage = ATTENTION_MODES[mode]
    return visibility(text, frames, grid, grid, channel, attention, window, shifted, stage, device)


def _mask_for(shape, device):
    return _dense_mask(shape["text"], shape["frames"], shape["grid"], shape["window"], shape["mode"], str(device))


def make_inputs(shape: dict, dtype: torch.dtype, device: torch.device) -> Inputs:
    torch.manual_seed(0)
    length = shape["text"] + shape["frames"] * shape["grid"] ** 2
    size = (shape["batch"], length, shape["heads"], shape["dim"])
    q, k, v = (torch.randn(size, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    return {"q": q, "k": k, "v": v, "_shape": shape}  # the shape travels with the inputs to the providers


def visible_fraction(shape) -> float:
    mask = _mask_for(shape, "cpu")
    return mask.sum().item() / mask.numel()


def flops(case: Case) -> float:
    s = case.shape
    pairs = _mask_for(s, "cpu").sum().item()
    return FLOP_FACTOR[case.mode] * 4.0 * pairs * s["dim"] * s["batch"] * s["heads"]


def _bhld(x):
    return x.transpose(1, 2)


def _make_sdpa(sdpa_backend, inputs: Inputs):
    from torch.nn.attention import sdpa_kernel

    shape = inputs["_shape"]
    q, k, v = (_bhld(inputs[n]) for n in "qkv")
    mask = _mask_for(shape, q.device)

    def run():
        with sdpa_kernel(sdpa_backend):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    return run


def _make_flex(inputs: Inputs):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    shape = inputs["_shape"]
    q, k, v = (_bhld(inputs[n]) for n in "qkv")
    mask = _mask_for(shape, q.device)
    length = mask.shape[0]
    block_mask = create_block_mask(lambda b, h, qi, ki: mask[qi, ki], None, None, length, length, device=q.device)
    torch.compiler.reset()
    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda: compiled(q, k, v, block_mask=block_mask)


def _cuda_only(inputs: Inputs) -> list[str]:
    device = inputs["q"].device
    return [] if device.type == "cuda" else [f"device={device.type} (GPU baseline)"]


def _natten_provider() -> Provider:
    try:
        import natten  # noqa: F401
    except ImportError as exc:
        why = f"natten is not importable ({exc})"
    else:
        why = "natten has no text-prefix + causal 3D-window mode equal to CogVideo's rule"
    return Provider("natten", True, make=lambda inputs: None, reasons=lambda inputs: [why])


def _torchnova_providers() -> list[Provider]:
    try:
        import torchnova
        from torchnova import _backend

        backends = _backend.backends_for("cogvideo_attention")
    except Exception as exc:
        return [Provider("torchnova", False, lambda inputs: None,
                         lambda inputs: [f"torchnova.cogvideo_attention is not usable ({type(exc).__name__}: {exc})"])]

    def make(backend, inputs):
        shape = inputs["_shape"]
        return lambda: torchnova.cogvideo_attention(inputs["q"], inputs["k"], inputs["v"], backend=backend,
                                                    **_layout_args(shape))

    def reasons(backend, inputs):
        q = inputs["q"]
        return _backend.reasons("cogvideo_attention", backend, x=q, head_dim=q.shape[-1])

    return [Provider(f"torchnova-{b}", False, functools.partial(make, b), functools.partial(reasons, b))
            for b in backends]


def providers() -> list[Provider]:
    from torch.nn.attention import SDPBackend

    return [
        *_torchnova_providers(),
        Provider("sdpa-math-masked", True, functools.partial(_make_sdpa, SDPBackend.MATH)),
        Provider("sdpa-efficient-masked", True, functools.partial(_make_sdpa, SDPBackend.EFFICIENT_ATTENTION),
                 _cuda_only),
        Provider("flex-blockmask", True, _make_flex, _cuda_only),
        _natten_provider(),
    ]


def _shapes(batches, text, frames, grid, window, heads, dim):
    return [dict(batch=b, text=text, frames=frames, grid=grid, window=window, heads=heads, dim=dim, mode=m)
            for b in batches for m in ATTENTION_MODES]


def benchmark() -> OpBenchmark:
    return OpBenchmark(
        name="dual_channel",
        make_inputs=make_inputs,
        providers=providers(),
        # CogVideo: L = 64 + 5 * 20 * 20 = 2064, 48 heads x 64, window 10.
        shapes=_shapes((1, 2, 4), 64, 5, 20, 10, 48, 64),
        quick_shapes=_shapes((1,), 16, 5, 10, 5, 2, 32),
        cuda_dtypes=(torch.bfloat16,),
        flops=flops,
    )


if __name__ == "__main__":
    from .__main__ import main

    sys.exit(main(["--ops", "dual_channel", *sys.argv[1:]]))
