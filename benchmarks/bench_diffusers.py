"""diffusers' video models with and without ``torchnova.integrations.diffusers.patch``: same weights, same inputs.

Three benchmarks, each with the providers ``diffusers-sdpa`` (the baseline: the module as diffusers builds it,
``AttnProcessor2_0`` = ``F.scaled_dot_product_attention``) and ``torchnova-patched`` (a deep copy, patched):

``diffusers_temporal_attn``: one temporal self-attention module alone (``attn1`` of an AnimateDiff motion block:
    to_q/k/v, attention over the frames, to_out) on its input (batch·h·w, frames, C).
``diffusers_motion_module``: a whole AnimateDiff motion module (``AnimateDiffTransformer3D``: GroupNorm,
    proj_in, one block of sinusoidal position embedding + two temporal self-attentions + GEGLU feed-forward,
    proj_out, residual) on (batch·frames, C, h, w).
``diffusers_spatial_attn``: one spatial self-attention module alone (``attn1`` of a ``Transformer2DModel``'s block)
    on its input (batch·frames, h·w, C), with a third provider ``torchnova-cpp`` on CPU: the patch with
    ``backend="cpp"``, i.e. torchnova's spatial kernel even where ``auto`` keeps diffusers' SDPA (on CPU above
    ``CPU_SPATIAL_MAX_TOKENS`` tokens per frame: the measured speed rule of docs/diffusers.md).
``diffusers_unet3d``: a small ``UNet3DConditionModel`` (2 levels, 64/128 channels, cross-attention to 8 text
    tokens), all its temporal and spatial self-attentions patched, on (batch, 4, frames, h, w).

Shapes: the AnimateDiff one of issue 13 on GPUs (16 frames, 320 channels = 8 heads x 40, 64x64 latent positions,
batch 2: 65,536 attention problems of 16 frames); a small quick shape on CPU. Modes fwd and fwd_bwd (every
parameter's gradient is computed; grads are dropped before each call). The ``speedup`` column of a
``torchnova-patched`` row is diffusers' time / torchnova's in the same run.

Run: ``python -m benchmarks --ops diffusers_temporal_attn,diffusers_spatial_attn,diffusers_motion_module,diffusers_unet3d``
(needs ``pip install torchnova[integrations]``).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .harness import Inputs, OpBenchmark, Provider


def _diffusers():
    try:
        import diffusers  # noqa: F401
    except ImportError as error:
        raise ImportError("the diffusers benchmarks need diffusers: pip install diffusers==0.42.1") from error
    import torchnova.integrations.diffusers as tn_diffusers

    return tn_diffusers


def motion_module(channels: int, heads: int) -> nn.Module:
    """An AnimateDiff motion module as ``MotionAdapter`` builds them (one transformer layer, 32 positions)."""
    from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D

    return AnimateDiffTransformer3D(
        num_attention_heads=heads, attention_head_dim=channels // heads, in_channels=channels, norm_num_groups=32,
        num_layers=1, positional_embeddings="sinusoidal", num_positional_embeddings=32,
    )  # fmt: skip


def unet3d() -> nn.Module:
    from diffusers.models.unets.unet_3d_condition import UNet3DConditionModel

    return UNet3DConditionModel(
        in_channels=4, out_channels=4, block_out_channels=(64, 128),
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"), up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        layers_per_block=1, norm_num_groups=32, cross_attention_dim=64, attention_head_dim=8,
    )  # fmt: skip


def _module_inputs(build, make_tensors):
    def make_inputs(shape: dict[str, int], dtype: torch.dtype, device: torch.device) -> Inputs:
        _diffusers()
        torch.manual_seed(0)
        inputs = {"module": build(shape).to(device, dtype)}
        inputs.update(make_tensors(shape, dtype, device))
        return inputs

    return make_inputs


def _provider(name: str, patched: bool, call, backend: str = "auto") -> Provider:
    def make(inputs: Inputs):
        module = copy.deepcopy(inputs["module"]).train()
        if patched:
            count = _diffusers().patch(module, backend=backend)
            if count == 0:
                raise RuntimeError("patch() changed no attention module")

        def forward() -> torch.Tensor:
            module.zero_grad(set_to_none=True)  # every call computes each parameter's gradient afresh
            return call(module, inputs)

        return forward

    return Provider(name, not patched, make)


def _providers(call) -> list[Provider]:
    return [_provider("diffusers-sdpa", False, call), _provider("torchnova-patched", True, call)]


def _video_tokens(shape, dtype, device):
    rows = shape["batch"] * shape["height"] * shape["width"]
    return {"hidden_states": torch.randn(rows, shape["frames"], shape["channels"], device=device, dtype=dtype)}


def _video_frames(shape, dtype, device):
    n = shape["batch"] * shape["frames"]
    x = torch.randn(n, shape["channels"], shape["height"], shape["width"], device=device, dtype=dtype)
    return {"hidden_states": x}


def _unet_inputs(shape, dtype, device):
    b, f, h, w = shape["batch"], shape["frames"], shape["height"], shape["width"]
    return {
        "sample": torch.randn(b, 4, f, h, w, device=device, dtype=dtype),
        "timestep": torch.randint(0, 1000, (b,), device=device),
        "encoder_hidden_states": torch.randn(b, 8, 64, device=device, dtype=dtype),
    }


# AnimateDiff at 512x512 (64x64 latents), SD 1.5's first level: 320 channels = 8 heads x 40, 16 frames, batch 2
ANIMATEDIFF = {"batch": 2, "frames": 16, "height": 64, "width": 64, "channels": 320, "heads": 8}
ANIMATEDIFF_QUICK = {"batch": 1, "frames": 16, "height": 16, "width": 16, "channels": 320, "heads": 8}


def temporal_attn_benchmark() -> OpBenchmark:
    def build(shape):  # patch() finds attention modules inside their transformer: patch the motion module
        return motion_module(shape["channels"], shape["heads"])

    def call(module, inputs):  # ... and time its first attention alone
        return module.transformer_blocks[0].attn1(inputs["hidden_states"])

    return OpBenchmark(
        name="diffusers_temporal_attn",
        make_inputs=_module_inputs(build, _video_tokens),
        providers=_providers(call),
        shapes=[ANIMATEDIFF],
        quick_shapes=[ANIMATEDIFF_QUICK],
        cuda_dtypes=(torch.float32, torch.bfloat16),
        modes=("fwd", "fwd_bwd"),
    )


def motion_module_benchmark() -> OpBenchmark:
    def call(module, inputs):
        return module(inputs["hidden_states"], num_frames=inputs["num_frames"])

    def tensors(shape, dtype, device):
        return {**_video_frames(shape, dtype, device), "num_frames": shape["frames"]}

    return OpBenchmark(
        name="diffusers_motion_module",
        make_inputs=_module_inputs(lambda shape: motion_module(shape["channels"], shape["heads"]), tensors),
        providers=_providers(call),
        shapes=[ANIMATEDIFF],
        quick_shapes=[ANIMATEDIFF_QUICK],
        cuda_dtypes=(torch.float32, torch.bfloat16),
        modes=("fwd", "fwd_bwd"),
    )


def spatial_attn_benchmark() -> OpBenchmark:
    def build(shape):  # patch() finds attention modules inside their transformer: patch the 2-D transformer
        from diffusers.models.transformers.transformer_2d import Transformer2DModel

        heads = shape["heads"]
        return Transformer2DModel(num_attention_heads=heads, attention_head_dim=shape["channels"] // heads,
                                  in_channels=shape["channels"], norm_num_groups=32)  # fmt: skip

    def call(module, inputs):  # ... and time its first block's self-attention alone
        return module.transformer_blocks[0].attn1(inputs["hidden_states"])

    def tokens(shape, dtype, device):
        rows = shape["batch"] * shape["frames"]
        x = torch.randn(rows, shape["height"] * shape["width"], shape["channels"], device=device, dtype=dtype)
        return {"hidden_states": x}

    forced = _provider("torchnova-cpp", True, call, backend="cpp")
    cpp = Provider(forced.name, False, forced.make,
                   lambda inputs: [] if inputs["hidden_states"].device.type == "cpu" else ["cpp: CPU tensors only"])
    return OpBenchmark(
        name="diffusers_spatial_attn",
        make_inputs=_module_inputs(build, tokens),
        providers=[*_providers(call), cpp],
        shapes=[ANIMATEDIFF],
        quick_shapes=[{**ANIMATEDIFF_QUICK, "frames": 8}],
        cuda_dtypes=(torch.float32, torch.bfloat16),
        modes=("fwd", "fwd_bwd"),
    )


def unet3d_benchmark() -> OpBenchmark:
    def call(module, inputs):
        return module(inputs["sample"], inputs["timestep"], encoder_hidden_states=inputs["encoder_hidden_states"],
                      return_dict=False)[0]  # fmt: skip

    return OpBenchmark(
        name="diffusers_unet3d",
        make_inputs=_module_inputs(lambda shape: unet3d(), _unet_inputs),
        providers=_providers(call),
        shapes=[{"batch": 2, "frames": 16, "height": 32, "width": 32}],
        quick_shapes=[{"batch": 1, "frames": 8, "height": 8, "width": 8}],
        cuda_dtypes=(torch.float32, torch.bfloat16),
        modes=("fwd", "fwd_bwd"),
    )
