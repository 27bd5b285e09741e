"""torchnova.integrations.diffusers against diffusers' own forward (the reference is diffusers' AttnProcessor2_0).

Tiny random configurations built here, no downloads. Every case runs the same module twice from one state:
unpatched (diffusers' SDPA processor) and patched (torchnova), and compares the output and the gradient of
every parameter (and of the input): float64 tight, float32 within tests/utils.py's table. The float32 check
compares the patched float32 run with an unpatched float64 run of the same weights, and allows it no more than
the table's error nor twice the unpatched float32 run's own error (the suite's 2x rule).
"""

from __future__ import annotations

import copy
import subprocess
import sys
import warnings

import pytest
import torch

from utils import TOLERANCES, assert_close

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (pip install torchnova[integrations])")

from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0  # noqa: E402
from diffusers.models.transformers.transformer_2d import Transformer2DModel  # noqa: E402
from diffusers.models.transformers.transformer_temporal import TransformerTemporalModel  # noqa: E402
from diffusers.models.unets.unet_3d_condition import UNet3DConditionModel  # noqa: E402
from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D, UNetMotionModel  # noqa: E402

import torchnova.integrations.diffusers as tn_diffusers  # noqa: E402
from torchnova import _backend  # noqa: E402

CPU_BACKENDS = ["cpp", "triton", "reference"]


def _available(op: str, backend: str, dtype: torch.dtype) -> list[str]:
    x = torch.zeros(1, 2, 2, 1, 4, dtype=dtype)
    return _backend.reasons(op, backend, q=x, k=x, v=x)


# ---------------------------------------------------------------------------------------------------------
# Comparison helpers
# ---------------------------------------------------------------------------------------------------------


def _run(module, inputs: dict, grad_inputs: tuple[str, ...], weight: torch.Tensor, call):
    """Output, and the gradients of sum(output * weight) w.r.t. every parameter and the named inputs."""
    module.zero_grad(set_to_none=True)
    inputs = {name: (x.detach().clone().requires_grad_(name in grad_inputs) if torch.is_tensor(x) else x)
              for name, x in inputs.items()}  # fmt: skip
    out = call(module, inputs)
    (out * weight.to(out.dtype)).sum().backward()
    grads = {f"param {name}": p.grad for name, p in module.named_parameters() if p.requires_grad}
    grads.update({f"input {name}": inputs[name].grad for name in grad_inputs})
    return out.detach(), grads


def _cast(inputs: dict, dtype) -> dict:
    return {k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in inputs.items()}


def check_patched_matches(build, inputs: dict, call, dtype, *, grad_inputs=("hidden_states",), patch_kwargs=None,
                          expect_patched=None):  # fmt: skip
    """Patched vs unpatched diffusers module: output and every gradient (see the module docstring)."""
    torch.manual_seed(0)
    base = build().eval()
    inputs64 = _cast(inputs, torch.float64)
    ref = copy.deepcopy(base).double()
    weight = torch.randn_like(inputs64[grad_inputs[0]])  # every module here returns its input's shape
    out64, grads64 = _run(ref, inputs64, grad_inputs, weight, call)

    model = copy.deepcopy(base).to(dtype)
    n = tn_diffusers.patch(model, **(patch_kwargs or {}))
    assert n > 0, "nothing was patched"
    if expect_patched is not None:
        assert n == expect_patched, f"patched {n} attention modules, expected {expect_patched}"
    out, grads = _run(model, _cast(inputs, dtype), grad_inputs, weight, call)
    assert grads.keys() == grads64.keys()
    if dtype == torch.float64:
        assert_close(out, out64, dtype, "fwd", "output")
        for name in grads64:
            assert grads[name] is not None, f"{name}: no gradient when patched"
            assert_close(grads[name], grads64[name], dtype, "grad", name, terms=_vanishing_terms(name, grads64))
        return n
    # float32: the table's bound, or within 2x the unpatched float32 run's own error where the model's depth
    # makes that larger (never looser than 2x what diffusers itself gets in float32).
    unpatched = copy.deepcopy(base).to(dtype)
    out_u, grads_u = _run(unpatched, _cast(inputs, dtype), grad_inputs, weight, call)
    _close_or_within_2x(out, out_u, out64, dtype, "fwd", "output")
    for name in grads64:
        assert grads[name] is not None, f"{name}: no gradient when patched"
        _close_or_within_2x(grads[name], grads_u[name], grads64[name], dtype, "grad", name,
                            terms=_vanishing_terms(name, grads64))
    return n


def _vanishing_terms(name, grads64):
    """The size of the terms a gradient that is 0 in exact arithmetic cancels, else None.

    The key projection's bias gets no gradient (softmax is invariant to adding one constant to a row of scores),
    and a module whose attention output is discarded can pass exact zeros too: float64 then returns ~1e-16 and a
    kernel another rounding of 0. Such a gradient is judged against the module's largest gradient (the terms that
    cancel), every other one against its own magnitude."""
    largest = max(g.abs().max().item() for g in grads64.values())
    return largest if grads64[name].abs().max().item() <= 1e-9 * largest else None


def _close_or_within_2x(actual, unpatched, expected64, dtype, kind, what, terms=None):
    try:
        assert_close(actual, expected64, dtype, kind, what, terms=terms)
    except AssertionError:
        err = (actual.double() - expected64).abs().max().item()
        err_unpatched = (unpatched.double() - expected64).abs().max().item()
        atol, _ = TOLERANCES[kind][dtype]
        scale = max(1.0, expected64.abs().max().item())
        assert err <= 2 * err_unpatched + atol * scale, (
            f"{what} ({kind}, {dtype}): patched error {err:.3e} > 2x the unpatched float32 error {err_unpatched:.3e}"
        )


# ---------------------------------------------------------------------------------------------------------
# Tiny models
# ---------------------------------------------------------------------------------------------------------


def _video(batch, channels, frames, height, width):
    """diffusers' (batch*frames, C, h, w) layout of a video batch."""
    return torch.randn(batch * frames, channels, height, width)


def _call_block(module, inputs):
    return module(inputs["hidden_states"], num_frames=inputs["num_frames"])


def _call_temporal_model(module, inputs):
    return module(inputs["hidden_states"], num_frames=inputs["num_frames"], return_dict=False)[0]


def _call_2d(module, inputs):
    return module(inputs["hidden_states"], encoder_hidden_states=inputs.get("encoder_hidden_states"),
                  return_dict=False)[0]  # fmt: skip


def _call_unet(module, inputs):
    return module(inputs["sample"], inputs["timestep"], encoder_hidden_states=inputs["encoder_hidden_states"],
                  return_dict=False)[0]  # fmt: skip


def tiny_unet3d():
    # attention_head_dim is the head count in UNet3DConditionModel's blocks; 20 channels / 4 heads = head dim 5;
    # transformer_in always has 8 heads of attention_head_dim (4) channels.
    return UNet3DConditionModel(
        sample_size=6, in_channels=3, out_channels=3, block_out_channels=(20, 24),
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"), up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        layers_per_block=1, norm_num_groups=4, cross_attention_dim=12, attention_head_dim=4,
    )  # fmt: skip


def tiny_unet_motion():
    return UNetMotionModel(
        sample_size=6, in_channels=3, out_channels=3, block_out_channels=(12, 24),
        down_block_types=("CrossAttnDownBlockMotion", "DownBlockMotion"),
        up_block_types=("UpBlockMotion", "CrossAttnUpBlockMotion"),
        layers_per_block=1, norm_num_groups=4, cross_attention_dim=10, num_attention_heads=2,
        motion_num_attention_heads=2, motion_max_seq_length=16,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Blocks on their own
# ---------------------------------------------------------------------------------------------------------

DTYPES = [torch.float64, torch.float32]
IDS = ["fp64", "fp32"]


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("frames,height,width", [(7, 3, 5), (1, 2, 2), (16, 1, 3)])
def test_animatediff_motion_module(dtype, frames, height, width):
    inputs = {"hidden_states": _video(2, 12, frames, height, width), "num_frames": frames}

    def build():  # AnimateDiff's motion module: sinusoidal position embedding, two self-attentions per block
        return AnimateDiffTransformer3D(
            num_attention_heads=3, attention_head_dim=4, in_channels=12, norm_num_groups=4, num_layers=2,
            positional_embeddings="sinusoidal", num_positional_embeddings=32,
        )  # fmt: skip

    n = check_patched_matches(build, inputs, _call_block, dtype)
    assert n == 4  # 2 layers x (attn1, attn2)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_transformer_temporal_model(dtype):
    frames = 5
    inputs = {"hidden_states": _video(3, 8, frames, 3, 3), "num_frames": frames}

    def build():  # as in UNet3DConditionModel's blocks, with a cross_attention_dim that double self-attention ignores
        return TransformerTemporalModel(num_attention_heads=2, attention_head_dim=7, in_channels=8, norm_num_groups=4,
                                        cross_attention_dim=6)  # fmt: skip

    assert check_patched_matches(build, inputs, _call_temporal_model, dtype) == 2


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("conditioned", [False, True], ids=["self-only", "cross-attn"])
def test_transformer_2d_spatial(dtype, conditioned):
    inputs = {"hidden_states": torch.randn(6, 10, 3, 7)}
    if conditioned:
        inputs["encoder_hidden_states"] = torch.randn(6, 5, 9)
    grad_inputs = ("hidden_states", "encoder_hidden_states") if conditioned else ("hidden_states",)

    def build():
        return Transformer2DModel(num_attention_heads=2, attention_head_dim=5, in_channels=10, norm_num_groups=2,
                                  cross_attention_dim=9 if conditioned else None, num_layers=2)  # fmt: skip

    n = check_patched_matches(build, inputs, _call_2d, dtype, grad_inputs=grad_inputs)
    assert n == 2  # attn1 of each block; the cross-attention attn2 keeps diffusers' processor
    model = build()
    tn_diffusers.patch(model)
    for block in model.transformer_blocks:
        assert isinstance(block.attn1.processor, tn_diffusers.TorchnovaSpatialAttnProcessor)
        if conditioned:
            assert type(block.attn2.processor) is AttnProcessor2_0


# ---------------------------------------------------------------------------------------------------------
# Whole UNets
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_unet3d_condition_model(dtype, temporal=True, spatial=True):  # the flags' counts: test_unet3d_counts_...
    frames = 5
    inputs = {
        "sample": torch.randn(2, 3, frames, 6, 6), "timestep": torch.tensor([3, 700]),
        "encoder_hidden_states": torch.randn(2, 4, 12),
    }  # fmt: skip
    # transformer_in + a TransformerTemporalModel next to each Transformer2DModel (1 down, 1 mid, 2 up) with attn1
    # and attn2 each: 10 temporal; attn1 of the 4 Transformer2DModels: 4 spatial
    expected = (10 if temporal else 0) + (4 if spatial else 0)
    check_patched_matches(tiny_unet3d, inputs, _call_unet, dtype, grad_inputs=("sample", "encoder_hidden_states"),
                          patch_kwargs={"temporal": temporal, "spatial": spatial}, expect_patched=expected)  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_unet_motion_model(dtype):
    frames = 7
    inputs = {
        "sample": torch.randn(1, 3, frames, 6, 6), "timestep": torch.tensor([10]),
        # UNetMotionModel takes the text embedding per frame (AnimateDiffPipeline repeats it frames times)
        "encoder_hidden_states": torch.randn(frames, 3, 10),
    }  # fmt: skip
    check_patched_matches(tiny_unet_motion, inputs, _call_unet, dtype, grad_inputs=("sample", "encoder_hidden_states"))


def test_unet3d_counts_patch_twice_unpatch_state_dict():
    model = tiny_unet3d()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    processors = {name: type(p) for name, p in model.attn_processors.items()}
    assert tn_diffusers.patch(model, temporal=False) == 4  # attn1 of the 4 Transformer2DModels
    assert tn_diffusers.patch(model, spatial=False) == 10  # the 5 temporal transformers' attn1 and attn2
    assert tn_diffusers.patch(model) == 0  # already patched
    assert model.state_dict().keys() == before.keys()
    kinds = {name: type(p).__name__ for name, p in model.attn_processors.items()}
    assert kinds["transformer_in.transformer_blocks.0.attn1.processor"] == "TorchnovaTemporalAttnProcessor"
    assert kinds["transformer_in.transformer_blocks.0.attn2.processor"] == "TorchnovaTemporalAttnProcessor"
    assert kinds["down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor"] == "TorchnovaSpatialAttnProcessor"
    assert kinds["down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor"] == "AttnProcessor2_0"
    assert tn_diffusers.unpatch(model) == 14
    assert tn_diffusers.unpatch(model) == 0
    assert {name: type(p) for name, p in model.attn_processors.items()} == processors
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_patch_one_block_of_a_unet():
    model = tiny_unet_motion()
    n_motion = tn_diffusers.patch(model.down_blocks[0].motion_modules[0], spatial=False)
    assert n_motion == 2
    # the rest: motion modules 1 down + 1 down + 2 up + 2 up + 1 mid = 7, with attn1 and attn2 each, minus the 2
    # already patched; attn1 of the 4 Transformer2DModels (1 down, 2 up, 1 mid)
    assert tn_diffusers.patch(model) == 7 * 2 - 2 + 4
    assert tn_diffusers.patch(model) == 0
    assert tn_diffusers.unpatch(model.down_blocks[0]) == 2 + 1  # its motion module and its spatial attn1
    assert tn_diffusers.patch(model.down_blocks[0]) == 3
    assert tn_diffusers.unpatch(model) == 18


def test_other_processors_are_kept_with_a_warning():
    model = Transformer2DModel(num_attention_heads=2, attention_head_dim=4, in_channels=8, norm_num_groups=2)
    model.transformer_blocks[0].attn1.set_processor(AttnProcessor())
    with pytest.warns(RuntimeWarning, match="AttnProcessor"):
        assert tn_diffusers.patch(model) == 0
    assert type(model.transformer_blocks[0].attn1.processor) is AttnProcessor


# ---------------------------------------------------------------------------------------------------------
# The processor alone, on every option of diffusers' Attention it reproduces
# ---------------------------------------------------------------------------------------------------------

ATTENTION_OPTIONS = {
    "plain": {},
    "bias": {"bias": True},
    "qk_layer_norm": {"qk_norm": "layer_norm"},
    "qk_rms_norm": {"qk_norm": "rms_norm"},
    "qk_l2": {"qk_norm": "l2"},
    "group_norm_residual_rescale": {"norm_num_groups": 3, "residual_connection": True, "rescale_output_factor": 1.7},
    "out_dim": {"out_dim": 15, "dim_head": 5},  # heads = out_dim // dim_head
}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("kind", ["temporal", "spatial"])
@pytest.mark.parametrize("option", list(ATTENTION_OPTIONS))
def test_processor_matches_attn_processor_2_0(option, kind, dtype, backend):
    op = f"{kind}_attention"
    why = _available(op, backend, dtype)
    if why:
        pytest.skip("; ".join(why))
    if backend == "triton" and (dtype == torch.float64 or option not in ("plain", "qk_rms_norm")):
        pytest.skip("Triton interpreter: float32 only, two options (slow)")
    kwargs = {"heads": 3, "dim_head": 6, **ATTENTION_OPTIONS[option]}
    torch.manual_seed(1)
    attn = Attention(query_dim=9, **kwargs)
    with torch.no_grad():  # non-trivial affine norms
        for p in attn.parameters():
            p.add_(0.1 * torch.randn_like(p))
    processor = (tn_diffusers.TorchnovaTemporalAttnProcessor if kind == "temporal"
                 else tn_diffusers.TorchnovaSpatialAttnProcessor)  # fmt: skip
    inputs = {"hidden_states": torch.randn(4, 7 if kind == "temporal" else 11, 9)}

    def build():
        return copy.deepcopy(attn)

    def call(module, inputs):
        return module(inputs["hidden_states"])

    _check_processor(build, processor, backend, inputs, call, dtype)


def _check_processor(build, processor, backend, inputs, call, dtype, grad_inputs=("hidden_states",)):
    base = build()
    ref = copy.deepcopy(base).double()
    inputs64 = _cast(inputs, torch.float64)
    with torch.no_grad():
        weight = torch.randn_like(call(ref, inputs64))
    out64, grads64 = _run(ref, inputs64, grad_inputs, weight, call)
    model = copy.deepcopy(base).to(dtype)
    model.set_processor(processor(model.processor, backend))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback to diffusers' processor would warn: this must be torchnova's path
        out, grads = _run(model, _cast(inputs, dtype), grad_inputs, weight, call)
    assert_close(out, out64, dtype, "fwd", "output")
    for name in grads64:
        assert_close(grads[name], grads64[name], dtype, "grad", name, terms=_vanishing_terms(name, grads64))


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_processor_4d_input_and_dropout(dtype):
    """(B, C, h, w) input (VAE-style attention) and to_out dropout in training mode (same RNG stream)."""
    attn = Attention(query_dim=8, heads=2, dim_head=4, norm_num_groups=2, residual_connection=True, dropout=0.3)
    x = torch.randn(2, 8, 3, 5)
    for processor in (tn_diffusers.TorchnovaSpatialAttnProcessor, tn_diffusers.TorchnovaTemporalAttnProcessor):
        ref = copy.deepcopy(attn).train().to(dtype)
        model = copy.deepcopy(attn).train().to(dtype)
        model.set_processor(processor(model.processor))
        torch.manual_seed(5)
        expected = ref(x.to(dtype))
        torch.manual_seed(5)
        actual = model(x.to(dtype))
        assert actual.shape == x.shape
        assert_close(actual, expected, dtype, "fwd", f"{processor.kind} 4-D with dropout")


def test_cpu_spatial_speed_rule(monkeypatch):
    """backend="auto" on CPU: more than CPU_SPATIAL_MAX_TOKENS tokens per frame keep diffusers' SDPA (exactly its
    result, no warning); up to it, or with backend="cpp" / TORCHNOVA_BACKEND=cpp, torchnova's kernel runs."""
    calls = []
    packed = tn_diffusers.spatial_attention_qkvpacked
    monkeypatch.setattr(tn_diffusers, "spatial_attention_qkvpacked",
                        lambda *a, **k: calls.append(1) or packed(*a, **k))  # fmt: skip
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    attn = Attention(query_dim=8, heads=2, dim_head=4)
    limit = tn_diffusers.CPU_SPATIAL_MAX_TOKENS

    def run(tokens, backend, four_d=False):
        model = copy.deepcopy(attn)
        model.set_processor(tn_diffusers.TorchnovaSpatialAttnProcessor(model.processor, backend))
        x = torch.randn(2, 8, 1, tokens) if four_d else torch.randn(2, tokens, 8)
        calls.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = model(x)
        return len(calls), out, copy.deepcopy(attn)(x)

    for four_d in (False, True):
        used, out, expected = run(limit + 1, "auto", four_d)
        assert used == 0 and torch.equal(out, expected)
        used, out, expected = run(limit, "auto", four_d)
        assert used == 1
        assert_close(out, expected, torch.float32, "fwd", "at the limit")
    assert run(limit + 1, "cpp")[0] == 1
    monkeypatch.setenv(_backend.ENV_VAR, "cpp")
    assert run(limit + 1, "auto")[0] == 1


# ---------------------------------------------------------------------------------------------------------
# Fallbacks, errors, imports
# ---------------------------------------------------------------------------------------------------------


def test_attention_mask_falls_back_with_one_warning():
    block = AnimateDiffTransformer3D(num_attention_heads=2, attention_head_dim=4, in_channels=8, norm_num_groups=4)
    attn = block.transformer_blocks[0].attn1
    reference = copy.deepcopy(attn)
    assert tn_diffusers.patch(block) == 2
    x = torch.randn(6, 5, 8)
    mask = torch.zeros(6, 1, 5)
    mask[:, :, 3:] = -10000.0  # the (batch, 1, key) additive mask diffusers' processors take
    with pytest.warns(RuntimeWarning, match="attention_mask") as record:
        first = attn(x, attention_mask=mask)
        second = attn(x, attention_mask=mask)
        block.transformer_blocks[0].attn2(x, attention_mask=mask)  # same patch() call: still one warning
    assert sum("attention_mask" in str(w.message) for w in record) == 1
    expected = reference(x, attention_mask=mask)
    assert torch.equal(first, expected) and torch.equal(second, expected)
    unmasked = attn(x)
    assert not torch.allclose(unmasked, expected)  # the mask mattered, so the fallback was needed
    assert_close(unmasked, reference(x), torch.float32, "fwd", "unmasked")


def test_cross_attention_input_to_self_attention_falls_back():
    block = TransformerTemporalModel(num_attention_heads=2, attention_head_dim=4, in_channels=8, norm_num_groups=4)
    reference = copy.deepcopy(block)
    tn_diffusers.patch(block)
    x, context = torch.randn(2 * 3, 8, 2, 2), torch.randn(2 * 2 * 2, 4, 8)  # attn2 then cross-attends
    with pytest.warns(RuntimeWarning, match="encoder_hidden_states"):
        out = block(x, encoder_hidden_states=context, num_frames=3, return_dict=False)[0]
    expected = reference(x, encoder_hidden_states=context, num_frames=3, return_dict=False)[0]
    assert_close(out, expected, torch.float32, "fwd", "attn1 by torchnova, attn2 by diffusers")


def test_no_warning_on_supported_calls():
    block = AnimateDiffTransformer3D(num_attention_heads=2, attention_head_dim=4, in_channels=8, norm_num_groups=4)
    tn_diffusers.patch(block)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        block(torch.randn(2 * 3, 8, 2, 2), num_frames=3)


def test_bad_arguments():
    block = AnimateDiffTransformer3D(num_attention_heads=2, attention_head_dim=4, in_channels=8, norm_num_groups=4)
    with pytest.raises(TypeError, match="module must be a torch.nn.Module"):
        tn_diffusers.patch("unet")
    with pytest.raises(ValueError, match="backend must be"):
        tn_diffusers.patch(block, backend="flash")
    with pytest.raises(TypeError, match="temporal must be a bool"):
        tn_diffusers.patch(block, temporal=1)
    assert tn_diffusers.patch(block, temporal=False) == 0  # a motion module has no spatial attention
    with pytest.raises(TypeError, match="module must be a torch.nn.Module"):
        tn_diffusers.unpatch(None)


def test_import_error_names_the_pip_package(monkeypatch):
    for name in list(sys.modules):
        if name == "diffusers" or name.startswith("diffusers."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers -> ImportError
    with pytest.raises(ImportError, match=r"pip install diffusers==\d"):
        tn_diffusers.patch(torch.nn.Linear(2, 2))


def test_import_torchnova_does_not_import_the_libraries():
    code = (
        "import sys, torchnova, torchnova.integrations, torchnova.integrations.diffusers; "
        "bad = [m for m in ('diffusers', 'timm', 'video_diffusion_pytorch') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
