"""torchnova.nn space-time modules: same numbers on every backend, identity at init, image/video isolation."""

import pytest
import torch

import torchnova
from utils import assert_close, needs_cpp

DIM, HEADS, DIM_HEAD = 12, 3, 8


def video(B=2, T=5, h=3, w=2):
    return torch.randn(B, DIM, T, h, w)


def test_block_is_identity_with_zero_init_output():
    block = torchnova.nn.FactorizedSpaceTimeAttention(DIM, HEADS, DIM_HEAD, zero_init_output=True)
    x = video()
    assert torch.equal(block(x), x)


@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=needs_cpp), "reference"])
def test_temporal_module_matches_its_math(backend):
    torch.manual_seed(0)
    bias_module = torchnova.nn.RelativePositionBias(HEADS)
    layer = torchnova.nn.TemporalAttention(DIM, HEADS, DIM_HEAD, rel_pos_bias=bias_module, backend=backend)
    x = video()
    segments = torch.tensor([[0, 0, 0, 1, 2], [0, 0, 0, 0, 0]])
    got = layer(x, segment_ids=segments)

    # Written from the parameters with functional ops, the way VDM's Unet3D does it (to_qkv(x).chunk(3, dim=-1),
    # '(h d)' heads, einsum attention per pixel over frames): not through the module's own projections or views.
    B, C, T, h, w = x.shape
    x64 = x.double()
    params = {name: p.detach().double() for name, p in layer.named_parameters()}
    tokens = x64.permute(0, 3, 4, 2, 1)  # (B, h, w, T, C): a pixel's frames
    normed = torch.nn.functional.layer_norm(tokens, (C,), params["norm.weight"], params["norm.bias"], layer.norm.eps)
    q, k, v = torch.nn.functional.linear(normed, params["to_qkv.weight"]).chunk(3, dim=-1)
    q, k, v = (t.reshape(B, h, w, T, HEADS, DIM_HEAD) for t in (q, k, v))
    scores = torch.einsum("bxyihd,bxyjhd->bxyhij", q, k) * DIM_HEAD**-0.5
    scores = scores + params["rel_pos_bias.embedding.weight"][torchnova.relative_position_buckets(T)].permute(2, 0, 1)
    same_segment = segments[:, :, None] == segments[:, None, :]  # (B, T, T)
    scores = scores.masked_fill(~same_segment[:, None, None, None], float("-inf"))
    attended = torch.einsum("bxyhij,bxyjhd->bxyihd", scores.softmax(-1), v).reshape(B, h, w, T, HEADS * DIM_HEAD)
    projected = torch.nn.functional.linear(attended, params["to_out.weight"], params["to_out.bias"])
    expected = x64 + projected.permute(0, 4, 3, 1, 2)
    assert_close(got, expected, torch.float32, "fwd", "module output")

    got.square().sum().backward()
    assert bias_module.embedding.weight.grad is not None and bias_module.embedding.weight.grad.abs().sum() > 0


def test_appended_images_see_only_themselves():
    """Joint training: an image appended after the video gives the same output as that image alone."""
    torch.manual_seed(0)
    layer = torchnova.nn.TemporalAttention(DIM, HEADS, DIM_HEAD, rel_pos_bias=torchnova.nn.RelativePositionBias(HEADS))
    x = video(B=1, T=6)
    segments = torch.tensor([[0, 0, 0, 0, 1, 2]])  # 4 video frames, 2 images
    joint = layer(x, segment_ids=segments)
    for t in (4, 5):
        alone = layer(x[:, :, t : t + 1])
        # Not the kernel table: two fp32 runs of one kernel; masked keys add exact zeros, but the row's
        # reductions are blocked differently for T = 6 and T = 1, so they may differ by fp32 rounding.
        torch.testing.assert_close(joint[:, :, t : t + 1], alone, rtol=1e-5, atol=1e-6)


def test_one_bias_shared_by_every_temporal_layer():
    shared = torchnova.nn.RelativePositionBias(HEADS)
    blocks = torch.nn.ModuleList(
        torchnova.nn.FactorizedSpaceTimeAttention(DIM, HEADS, DIM_HEAD, rel_pos_bias=shared) for _ in range(2)
    )
    assert blocks[0].temporal.rel_pos_bias is blocks[1].temporal.rel_pos_bias
    assert sum(p.numel() for p in blocks.parameters()) == sum(
        p.numel() for b in blocks for n, p in b.named_parameters() if "rel_pos_bias" not in n
    ) + shared.embedding.weight.numel()


def test_module_bad_input():
    layer = torchnova.nn.SpatialAttention(DIM, HEADS, DIM_HEAD)
    with pytest.raises(ValueError, match=r"x must have shape \(B, C=12, T, h, w\), got \(2, 5, 3, 2\)"):
        layer(torch.randn(2, 5, 3, 2))
    with pytest.raises(ValueError, match="rel_pos_bias must have heads=3 columns, got 4"):
        torchnova.nn.TemporalAttention(DIM, HEADS, DIM_HEAD, rel_pos_bias=torchnova.nn.RelativePositionBias(4))
