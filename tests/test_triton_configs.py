"""Triton launch configurations picked by the device's shared memory per block (issue 14 section 2).

The launchers read ``_backend.shared_memory_per_block(device)`` (the CUDA opt-in limit, a fixed 99 KB under the
interpreter) and pick, per kernel, dtype and head-dim / T bucket, the first configuration that fits; where none
fits, the op's reasons exclude the triton backend so that ``auto`` moves on. These tests patch that one function
to play the cards users have (99 KB RTX, 163 KB A100, 227 KB H100, a 64 KB T4) and check the selection, the
reasons, and that the kernels stay correct with the configurations of another card. That the configurations
compile within each target's limit is checked by scripts/compile_check_triton.py (a CI step).
"""

import pytest
import torch

import torchnova
from torchnova import _backend
from torchnova._library import LaunchConfig, pick_config
from torchnova.dual_channel import triton_kernels as dtk
from torchnova.spacetime import triton_kernels as stk
from torchnova.spacetime.reference import spatial_attention_ref, temporal_attention_ref
from utils import assert_close, skip_unless_runs

SM80, SM86, SM90 = _backend.SHARED_MEMORY_SM80, _backend.SHARED_MEMORY_SM86, _backend.SHARED_MEMORY_SM90
T4 = 65_536  # sm_75: 64 KB per block
LIMITS = [T4, SM86, SM80, SM90]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def check_fp32_against_reference(out, qkv, reference, **options):
    """``out`` of fp32 q, k, v and its gradients vs ``reference`` run in float64 (one random upstream gradient)."""
    ref_inputs = [x.detach().double().requires_grad_(True) for x in qkv]
    ref = reference(*ref_inputs, **options)
    assert_close(out, ref, torch.float32, "fwd", "out")
    grad_out = torch.randn(out.shape, dtype=torch.float64)
    grads = torch.autograd.grad(out, qkv, grad_out.float())
    ref_grads = torch.autograd.grad(ref, ref_inputs, grad_out)
    for name, g, r in zip("qkv", grads, ref_grads):
        assert_close(g, r, torch.float32, "grad", f"d{name}")


def set_limit(monkeypatch, limit: int) -> None:
    monkeypatch.setattr(_backend, "shared_memory_per_block", lambda device: limit)


def test_default_limit_off_gpu():
    assert _backend.shared_memory_per_block(torch.device("cpu")) == _backend.DEFAULT_SHARED_MEMORY == SM86


def test_pick_config_takes_the_first_that_fits():
    big, small = LaunchConfig(64, 64, 8, 3, 150_000), LaunchConfig(64, 32, 4, 2, 60_000)
    assert pick_config((big, small), SM90) is big
    assert pick_config((big, small), SM86) is small
    assert pick_config((big, small), 50_000) is None


@pytest.mark.parametrize("limit", LIMITS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_spatial_configs_fit_the_limit(limit, dtype):
    for kernel in ("fwd", "dq", "dkdv"):
        for D in (8, 40, 64, 72, 128, 160, 256):
            candidates = stk._SPATIAL_CANDIDATES[(kernel, dtype == torch.float32)][max(64, stk.next_pow2(D))]
            cfg = stk.spatial_config(kernel, 4096, D, dtype, limit)
            fitting = [c for c in candidates if c.shared <= limit]
            assert (cfg is None) == (not fitting)
            if cfg is not None:  # the first candidate that fits, and not one the table marks too large
                assert (cfg.block_m, cfg.block_n, cfg.num_stages) == fitting[0][:2] + (fitting[0].num_stages,)


@pytest.mark.parametrize("limit", [SM86, SM80, SM90])
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_attention_config_exists_on_the_checked_targets(limit, dtype):
    """Spatial and dual-channel have a configuration for every head dim on every checked target."""
    for D in (16, 64, 100, 128, 256):
        for kernel in ("fwd", "dq", "dkdv"):
            assert stk.spatial_config(kernel, 1000, D, dtype, limit) is not None
        for kernel in (dtk._FWD, dtk._DKDV, dtk._DQ):
            assert dtk._config(kernel, D, dtype, limit) is not None


def test_larger_cards_keep_the_larger_configurations():
    """The 99 KB cards get smaller configurations only where the H100 ones do not fit (issue 14's examples)."""
    h100 = stk.spatial_config("fwd", 4096, 256, torch.float32, SM90)
    rtx = stk.spatial_config("fwd", 4096, 256, torch.float32, SM86)
    assert (h100.block_m, h100.block_n) == (32, 32)  # 100.1 KB: over the 99 KB of the RTX cards
    assert (rtx.block_m, rtx.block_n) == (32, 16)
    # spatial fwd fp32, D = 128: 64 x 32, 2 stages on every card (64 x 64 x 3 stages needs 176 KB and spills)
    for limit in (SM86, SM80, SM90):
        cfg = stk.spatial_config("fwd", 4096, 128, torch.float32, limit)
        assert (cfg.block_m, cfg.block_n, cfg.num_stages) == (64, 32, 2)
    assert stk.spatial_config("fwd", 4096, 64, torch.float16, SM86) == stk.spatial_config(
        "fwd", 4096, 64, torch.float16, SM90
    )  # fmt: skip
    # dual-channel dK/dV at fp32, D = 64 walks 32 queries (64 spills 13-16 KB per thread in the plus modes)
    assert dtk._config(dtk._DKDV, 64, torch.float32, SM90)["BLOCK_M"] == 32


@pytest.mark.parametrize("dtype", DTYPES)
def test_temporal_config_and_exclusions(dtype):
    ieee = dtype == torch.float32
    for limit in LIMITS:
        for T in (1, 7, 16, 33, 64):
            for D in (8, 40, 64, 100, 128, 256):
                for kernel in ("fwd", "bwd"):
                    cfg = stk.temporal_config(kernel, T, D, dtype, limit)
                    t_pad, d_pad = stk._pads(T, D)
                    need = stk.temporal_shared_bytes(kernel, ieee, t_pad, d_pad)
                    assert (cfg is None) == (need > limit)
                    if cfg is not None:
                        assert (cfg.t_pad, cfg.d_pad, cfg.num_stages) == (t_pad, d_pad, 1)
    # issue 14's table: fp32 backward at T_PAD 64, D 256 needs 272 KB, over every GPU's limit
    assert stk.temporal_config("bwd", 64, 256, torch.float32, SM90) is None
    assert stk.temporal_config("bwd", 64, 128, torch.float32, SM86) is None  # 144 KB
    assert stk.temporal_config("bwd", 64, 128, torch.float32, SM80) is not None
    assert stk.temporal_config("fwd", 64, 256, torch.float32, SM80) is None  # 192 KB
    assert stk.temporal_config("bwd", 64, 256, torch.float16, SM86) is None  # 104 KB
    assert stk.temporal_config("bwd", 32, 128, dtype, SM86) is not None  # everything at T <= 32, D <= 128 fits


def _temporal_inputs(T, D, dtype=torch.float32):
    return [torch.randn(1, T, 2, 1, D, dtype=dtype) for _ in range(3)]


def test_temporal_reasons_exclude_what_does_not_fit(monkeypatch):
    skip_unless_runs("temporal_attention", "triton", q=torch.empty(1, 1, 1, 1, 16))
    q, k, v = _temporal_inputs(64, 256)
    why = _backend.reasons("temporal_attention", "triton", q=q, k=k, v=v)
    assert any("shared memory" in w and "forward" in w for w in why), why
    with pytest.raises(ValueError, match="shared memory"):
        torchnova.temporal_attention(q, k, v, backend="triton")
    assert _backend.select("temporal_attention", "auto", q=q, k=k, v=v) != "triton"
    # on an A100 the fp32 T = 64, D = 128 tiles fit (144 KB backward), on the 99 KB cards they do not
    q, k, v = _temporal_inputs(64, 128)  # the forward fits (96 KB), the backward does not (144 KB)
    why = _backend.reasons("temporal_attention", "triton", q=q, k=k, v=v)
    assert any("shared memory" in w and "backward" in w for w in why), why
    set_limit(monkeypatch, SM80)
    assert _backend.reasons("temporal_attention", "triton", q=q, k=k, v=v) == []
    # fp16 fits the 99 KB cards at that shape
    set_limit(monkeypatch, SM86)
    q16 = q.half()
    assert not any("shared memory" in w for w in _backend.reasons("temporal_attention", "triton", q=q16, k=q16, v=q16))


def test_spatial_and_dual_channel_reasons_on_a_small_card(monkeypatch):
    skip_unless_runs("spatial_attention", "triton", q=torch.empty(1, 1, 1, 1, 16))
    set_limit(monkeypatch, 16_384)  # smaller than any configuration of a D = 256 tile
    q = torch.randn(1, 1, 16, 1, 256)
    why = _backend.reasons("spatial_attention", "triton", q=q, k=q, v=q)
    assert any("shared memory" in w for w in why), why
    assert dtk.shared_memory_reason(256, torch.float32, q.device) is not None
    set_limit(monkeypatch, SM86)
    assert _backend.reasons("spatial_attention", "triton", q=q, k=q, v=q) == []
    assert dtk.shared_memory_reason(256, torch.float32, q.device) is None


@pytest.mark.parametrize("limit", [SM90, SM80])
def test_spatial_with_a_larger_cards_configuration(limit, monkeypatch):
    skip_unless_runs("spatial_attention", "triton", q=torch.empty(1, 1, 1, 1, 16))
    """The interpreter runs the 99 KB configurations by default; here the A100 / H100 ones, vs float64."""
    set_limit(monkeypatch, limit)
    monkeypatch.setattr(stk, "SPATIAL_MAX_BLOCK", 32)  # keep the interpreter fast: still several key blocks
    shape = (1, 1, 37, 1, 72)
    q, k, v = (torch.randn(shape, dtype=torch.float32, requires_grad=True) for _ in range(3))
    out = torchnova.spatial_attention(q, k, v, backend="triton")
    check_fp32_against_reference(out, (q, k, v), spatial_attention_ref)


def test_temporal_at_the_largest_tiles_that_fit(monkeypatch):
    """fp32, T = 33 (T_PAD 64), D = 72 (D_PAD 128): fits an A100 (backward 144 KB), runs in the interpreter."""
    skip_unless_runs("temporal_attention", "triton", q=torch.empty(1, 1, 1, 1, 16))
    set_limit(monkeypatch, SM80)
    monkeypatch.setattr(stk, "BLOCK_P", 2)
    shape = (1, 33, 2, 1, 72)
    q, k, v = (torch.randn(shape, dtype=torch.float32, requires_grad=True) for _ in range(3))
    out = torchnova.temporal_attention(q, k, v, causal=True, backend="triton")
    check_fp32_against_reference(out, (q, k, v), temporal_attention_ref, causal=True)


def test_rotary_backward_needs_more_shared_memory_and_the_reasons_say_so(monkeypatch):
    """The rotary backward's extra dots (permuted operands) need 8·T_PAD·D_PAD more bytes in fp32: fp32 T 64, D 64
    fits a 99 KB card without rotary (81920 bytes measured on sm_86) and not with it (114688), so the triton
    backend is excluded for rotary inputs there, with the reason, and kept on an A100 (163 KB)."""
    set_limit(monkeypatch, SM86)
    q = torch.empty(1, 64, 2, 1, 64)
    cos = torch.ones(64, 32)
    assert stk.temporal_config("bwd", 64, 64, torch.float32, SM86) is not None
    assert stk.temporal_config("bwd", 64, 64, torch.float32, SM86, rotary=True) is None
    plain = _backend.reasons("temporal_attention", "triton", q=q, k=q, v=q)
    rotary = _backend.reasons("temporal_attention", "triton", q=q, k=q, v=q, rotary_cos=cos, rotary_sin=cos)
    assert not any("shared memory" in w for w in plain)
    assert any("rotary) need" in w and "shared memory" in w for w in rotary), rotary
    set_limit(monkeypatch, SM80)
    assert not any("shared memory" in w for w in _backend.reasons(
        "temporal_attention", "triton", q=q, k=q, v=q, rotary_cos=cos, rotary_sin=cos))
