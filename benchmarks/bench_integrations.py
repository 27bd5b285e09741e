"""Integrations: a third-party model patched by ``torchnova.integrations`` vs the same model unpatched.

``vdp_model`` (video-diffusion-pytorch 0.7.0 ``Unet3D``, mode fwd_bwd: forward + backward of the whole model):
provider ``vdp-library`` (the baseline: the library's own attention) and ``torchnova-patched``
(``torchnova.integrations.video_diffusion_pytorch.patch(model)``), same weights and inputs. The full grid is
the issue's shape (dim 64, dim_mults (1, 2, 4, 8), 16 frames at 64×64, batch 2); the quick one is a CPU-sized
model (dim 32, dim_mults (1, 2), 8 frames at 32×32, batch 1).

``vdp_attention`` (fwd, bwd, fwd_bwd): one attention module alone, ``EinopsToAndFrom(Attention)`` on a
(B, C, T, h, w) video with the model's relative position bias and shared rotary embedding: ``kind=0`` the
temporal attention, ``kind=1`` the full spatial one. Quick shape: the issue's profile (16 frames, 32×32,
C = 32, 4 heads × 32, batch 1; temporal only for the spatial kind's 1024-token frames would dominate the CPU
run, so the spatial quick shape is 16×16).

``speedup`` = library p50 / patched p50 (> 1: the patch is faster). Needs ``pip install
video-diffusion-pytorch==0.7.0`` (else the benchmark's providers report it as their reason).
Run: ``python -m benchmarks --ops vdp_model,vdp_attention``.
"""

from __future__ import annotations


import torch

from .harness import Case, Inputs, OpBenchmark, Provider


def _library():
    try:
        from video_diffusion_pytorch import video_diffusion_pytorch as vdp
    except ImportError:
        return None
    return vdp


def _missing(inputs: Inputs) -> list[str]:
    if _library() is not None:
        return []
    return ["video-diffusion-pytorch is not installed (pip install video-diffusion-pytorch==0.7.0)"]


# ---------------------------------------------------------------------------------------------------------
# vdp_model: the whole Unet3D
# ---------------------------------------------------------------------------------------------------------


def model_inputs(shape: dict[str, int], dtype: torch.dtype, device: torch.device) -> Inputs:
    torch.manual_seed(0)
    B, T, size = shape["batch"], shape["frames"], shape["size"]
    return {
        "x": torch.randn(B, 3, T, size, size, device=device, dtype=dtype),
        "time": torch.randint(0, 1000, (B,), device=device).to(dtype),
    }


def _unet(shape: dict[str, int], device, dtype):
    vdp = _library()
    torch.manual_seed(0)
    mults = (1, 2, 4, 8)[: shape["levels"]]
    model = vdp.Unet3D(dim=shape["dim"], dim_mults=mults, attn_heads=shape["heads"], attn_dim_head=shape["dim_head"])
    return model.to(device, dtype)


def _make_model(patched: bool):
    def make(inputs: Inputs):
        from torchnova.integrations import video_diffusion_pytorch as tn_vdp

        x, time = inputs["x"], inputs["time"]
        model = _unet(inputs["shape"], x.device, x.dtype)
        if patched:
            tn_vdp.patch(model)

        def forward() -> torch.Tensor:
            model.zero_grad(set_to_none=True)
            return model(x, time)

        return forward

    return make


def _with_shape(make_inputs):
    def wrapped(shape, dtype, device):
        inputs = make_inputs(shape, dtype, device)
        inputs["shape"] = shape
        return inputs

    return wrapped


def model_benchmark() -> OpBenchmark:
    full = {"batch": 2, "frames": 16, "size": 64, "dim": 64, "levels": 4, "heads": 8, "dim_head": 32}
    quick = {"batch": 1, "frames": 8, "size": 32, "dim": 32, "levels": 2, "heads": 4, "dim_head": 32}
    return OpBenchmark(
        name="vdp_model",
        make_inputs=_with_shape(model_inputs),
        providers=[
            Provider("vdp-library", True, _make_model(False), _missing),
            Provider("torchnova-patched", False, _make_model(True), _missing),
        ],
        shapes=[full],
        quick_shapes=[quick],
        cuda_dtypes=(torch.float32,),
        modes=("fwd_bwd",),
    )


# ---------------------------------------------------------------------------------------------------------
# vdp_attention: one attention module
# ---------------------------------------------------------------------------------------------------------


def attention_inputs(shape: dict[str, int], dtype: torch.dtype, device: torch.device) -> Inputs:
    torch.manual_seed(0)
    B, T, size, C = shape["batch"], shape["frames"], shape["size"], shape["channels"]
    x = torch.randn(B, C, T, size, size, device=device, dtype=dtype, requires_grad=True)
    return {"x": x, "shape": shape}


def _make_attention(patched: bool):
    def make(inputs: Inputs):
        from torchnova.integrations import video_diffusion_pytorch as tn_vdp

        vdp = _library()
        from rotary_embedding_torch import RotaryEmbedding

        x, shape = inputs["x"], inputs["shape"]
        heads, dim_head, C, T = shape["heads"], shape["dim_head"], shape["channels"], shape["frames"]
        torch.manual_seed(0)
        temporal = shape["kind"] == 0
        rotary = RotaryEmbedding(min(32, dim_head)) if temporal else None
        layout = "b (h w) f c" if temporal else "b f (h w) c"
        attention = vdp.Attention(C, heads=heads, dim_head=dim_head, rotary_emb=rotary)
        module = vdp.EinopsToAndFrom("b c f h w", layout, attention)
        rel_pos_bias = vdp.RelativePositionBias(heads=heads, max_distance=32)
        module, rel_pos_bias = module.to(x.device, x.dtype), rel_pos_bias.to(x.device, x.dtype)
        if patched:
            tn_vdp.patch(module)

        def forward() -> torch.Tensor:
            module.zero_grad(set_to_none=True)
            if temporal:
                return module(x, pos_bias=rel_pos_bias(T, device=x.device))
            return module(x)

        return forward

    return make


def _attention_flops(case: Case) -> float:
    s = case.shape
    B, T, C, H, Dh = s["batch"], s["frames"], s["channels"], s["heads"], s["dim_head"]
    S = s["size"] ** 2
    L = T if s["kind"] == 0 else S
    problems = B * H * (S if s["kind"] == 0 else T)
    attention = 4 * problems * L * L * Dh  # QK^T and PV
    projections = 2 * B * T * S * C * 4 * H * Dh  # to_qkv (3 H Dh) and to_out (H Dh)
    forward = attention + projections
    return {"fwd": forward, "bwd": 2.5 * forward, "fwd_bwd": 3.5 * forward}[case.mode]


def attention_benchmark() -> OpBenchmark:
    base = {"batch": 1, "frames": 16, "channels": 32, "heads": 4, "dim_head": 32}
    quick = [dict(base, kind=0, size=32), dict(base, kind=1, size=16)]
    full = [
        {"batch": 2, "frames": 16, "channels": 64, "heads": 8, "dim_head": 32, "kind": 0, "size": 64},
        {"batch": 2, "frames": 16, "channels": 512, "heads": 8, "dim_head": 32, "kind": 1, "size": 8},
    ]
    return OpBenchmark(
        name="vdp_attention",
        make_inputs=attention_inputs,
        providers=[
            Provider("vdp-library", True, _make_attention(False), _missing),
            Provider("torchnova-patched", False, _make_attention(True), _missing),
        ],
        shapes=full,
        quick_shapes=quick,
        cuda_dtypes=(torch.float32,),
        flops=_attention_flops,
    )
