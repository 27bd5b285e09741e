"""The CUDA kernels (csrc/cuda/*.cu) executed on the CPU through the emulation layer (csrc/emulation,
docs/cuda_emulation.md): forward and every gradient of every op vs the float64 reference, at small shapes with
the edge cases of the kernels (D in {1, 33, 255, 256}, T in {1, 97, 98, 128}, odd L and S, unaligned fp16 rows,
strided inputs), fp32 / fp16 / bf16, bit-identical reruns; and the layer's own checks (barrier deadlock, bad
shuffle masks, out-of-bounds and misaligned accesses are errors).

Needs the layer (TORCHNOVA_CUDA_EMULATION=1, which scripts/setup.sh and CI set); skipped, with that reason,
without it.
"""

from __future__ import annotations

import pytest
import torch

import torchnova
from torchnova import _backend, _ext, testing
from utils import assert_close

pytestmark = pytest.mark.skipif(
    not _ext.HAS_CUDA_EMULATION, reason=f"CUDA emulation layer not built: {_ext.CUDA_EMULATION_IMPORT_ERROR}"
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _emu():
    return _ext._C_cuda_emu


def _check(fn, inputs, dtype, what, tensor_kwargs=None, emulation=None, **kwargs):
    """fn(*inputs, **tensor_kwargs, backend="cuda") under emulation vs the same in float64 with backend="reference":
    the output and the gradient of every tensor that requires grad, for a random upstream gradient. The layer copies
    every tensor argument of the emulated ops into memory that ends at a guard page, so reads past an input's end
    fault. `emulation`: keyword arguments of cuda_emulation() (schedule, exact_ends)."""
    tensor_kwargs = tensor_kwargs or {}
    names = list(tensor_kwargs)
    tensors = list(inputs) + [tensor_kwargs[n] for n in names]
    upstream = None
    with testing.cuda_emulation(**(emulation or {})):
        out = fn(*tensors[: len(inputs)], backend="cuda", **dict(zip(names, tensors[len(inputs) :])), **kwargs)
        upstream = torch.randn(out.shape, dtype=torch.float64)
        out.backward(upstream.to(out.dtype))
    ref_tensors = [x.detach().double().requires_grad_(x.requires_grad) for x in tensors]
    ref_kwargs = dict(zip(names, ref_tensors[len(inputs):]))
    ref = fn(*ref_tensors[: len(inputs)], backend="reference", **ref_kwargs, **kwargs)
    ref.backward(upstream)
    assert_close(out, ref, dtype, "fwd", f"{what} output")
    labels = [f"input {i}" for i in range(len(inputs))] + names
    for label, x, r in zip(labels, tensors, ref_tensors):
        if x.requires_grad:
            assert x.grad is not None, f"{what}: {label} got no gradient"
            assert_close(x.grad, r.grad, dtype, "grad", f"{what} grad of {label}")


# ---------------------------------------------------------------------------------------------------------------
# The layer itself


def test_warp_collectives_match_their_definitions():
    for width in (32, 8):
        got = _emu()._test_warp_collectives(32, width)
        for t in range(32):
            seg = t - t % width
            assert got[t, 0] == (seg + 3 % width) * 10, (width, t)
            assert got[t, 1] == (t ^ 1) * 10
            assert got[t, 2] == (t - 2 if t - 2 >= seg else t) * 10
            assert got[t, 3] == (t + 2 if t + 2 < seg + width else t) * 10
            assert got[t, 4] == sum(1 << i for i in range(32) if i % 3 == 0)  # bit 31 clear: fits in int32
            assert got[t, 5] == 3


def test_barrier_some_thread_never_reaches_is_an_error_naming_kernel_and_thread():
    with pytest.raises(RuntimeError, match=r"barrier_deadlock_kernel.*thread \(5,0,0\).*exited without reaching it"):
        _emu()._test_barrier_deadlock(64, 5)


@pytest.mark.parametrize(
    "mode, message",
    [
        (0, r"mask 0xffffffff names lane 16, which does not exist"),
        (1, r"names lane 3, but thread \(3,0,0\) \(warp 0 lane 3\) has exited"),
        (2, r"mask 0xfffffffe does not include the calling lane 0"),
    ],
)
def test_bad_shuffle_mask_is_an_error(mode, message):
    with pytest.raises(RuntimeError, match=message):
        _emu()._test_bad_shuffle(mode)


def test_out_of_bounds_static_shared_index_is_an_error():
    assert _emu()._test_shared_out_of_bounds(0).tolist() == [float(i) for i in range(32)]
    with pytest.raises(RuntimeError, match=r"thread \(31,0,0\): index 32 out of bounds for type 'float \[32\]'"):
        _emu()._test_shared_out_of_bounds(1)


def test_misaligned_16_byte_load_is_an_error():
    assert _emu()._test_vector_load(4)[:2].tolist() == [4.0, 8.0]
    with pytest.raises(RuntimeError, match=r"misaligned .* of type 'const struct uint4', which needs 16-byte"):
        _emu()._test_vector_load(1)


def test_out_of_bounds_global_access_is_an_error():
    x = torch.arange(32.0)
    with testing.cuda_emulation():
        guarded = x.clone()  # allocated inside: ends at a guard page
        assert torch.equal(_emu()._test_shifted_copy(guarded, 0), x)
        with pytest.raises(RuntimeError, match=r"thread \(31,0,0\): invalid memory access at address"):
            _emu()._test_shifted_copy(guarded, 1)
        with pytest.raises(RuntimeError, match=r"thread \(28,0,0\): invalid memory access"):
            _emu()._test_shifted_copy(guarded, 4)
    assert torch.equal(_emu()._test_shifted_copy(x, 0), x)  # the layer still works after the faults


def test_exact_ends_catch_reads_within_the_alignment_slack():
    x = torch.arange(33.0)  # 132 bytes: the default guarded allocation leaves 12 bytes of slack before the page
    with testing.cuda_emulation():
        guarded = x.clone()
        # Thread 32 reads x[33], one float past the end but inside the slack: not caught by default.
        assert torch.equal(_emu()._test_shifted_copy(guarded, 1)[:32], x[1:])
    with testing.cuda_emulation(exact_ends=True):
        guarded = x.clone()
        assert guarded.data_ptr() % 16 == 12  # the end touches the page; the start is only 4-byte aligned
        with pytest.raises(RuntimeError, match=r"thread \(32,0,0\): invalid memory access"):
            _emu()._test_shifted_copy(guarded, 1)


def test_tensor_arguments_allocated_outside_the_context_are_copied_to_guarded_memory():
    # What the registration of every emulated op does with its tensor arguments (cuda_emulation.h, SuffixedImpl).
    x = torch.arange(32.0)  # the default allocator, outside cuda_emulation()
    copy = _emu().guarded_copy(x)
    assert torch.equal(copy, x) and copy.data_ptr() != x.data_ptr()
    with pytest.raises(RuntimeError, match=r"thread \(28,0,0\): invalid memory access"):
        _emu()._test_shifted_copy(copy, 4)
    strided = torch.randn(4, 6)[:, ::2]
    strided_copy = _emu().guarded_copy(strided)
    assert strided_copy.stride() == strided.stride() and torch.equal(strided_copy, strided)
    expanded = torch.randn(3, 1).expand(3, 5)  # overlapping elements: passed as they are
    assert _emu().guarded_copy(expanded).data_ptr() == expanded.data_ptr()


@pytest.mark.parametrize(
    "case", ["temporal", "spatial", "mesa", "mix", "cogvideo"]
)
def test_every_op_with_exact_ends(case):
    """The tensors end exactly at the guard page: reads 1..15 bytes past an input's end fault, and inputs whose size
    is not a multiple of 16 bytes start misaligned, so the kernels' alignment checks and unaligned paths run."""
    dtype = torch.float16
    exact = {"exact_ends": True}
    if case == "temporal":
        q, k, v = (torch.randn(2, 5, 3, 1, 33).to(dtype).requires_grad_() for _ in range(3))
        _check(torchnova.temporal_attention, [q, k, v], dtype, "temporal exact ends", emulation=exact, causal=True)
    elif case == "spatial":
        q, k, v = (torch.randn(1, 2, 13, 1, 33).to(dtype).requires_grad_() for _ in range(3))
        _check(torchnova.spatial_attention, [q, k, v], dtype, "spatial exact ends", emulation=exact)
    elif case == "mesa":
        z = torch.randn(3, 37).to(dtype).requires_grad_()
        _check(torchnova.mesa_kl, [z, torch.randn(3, 37).to(dtype)], dtype, "mesa exact ends", emulation=exact)
    elif case == "mix":
        base, plus = (torch.randn(2, 7, 9).to(dtype).requires_grad_() for _ in range(2))
        alpha = torch.randn(9).to(dtype).requires_grad_()
        _check(torchnova.dual_channel_mix, [base, plus, alpha], dtype, "mix exact ends", emulation=exact, text_len=3)
    else:
        text_len, frames, grid = 3, 2, (1, 3)
        q, k, v = (torch.randn(1, text_len + 6, 1, 33).to(dtype).requires_grad_() for _ in range(3))
        _check(torchnova.cogvideo_attention, [q, k, v], dtype, "cogvideo exact ends", emulation=exact,
               text_len=text_len, frames=frames, grid=grid, channel="plus", attention="window", window=1)  # fmt: skip


def test_dynamic_shared_memory_overflow_and_unwritten_reads():
    with pytest.raises(RuntimeError, match=r"dynamic shared memory written past its end \(128 bytes"):
        _emu()._test_dynamic_smem_overflow(32)
    assert torch.isnan(_emu()._test_dynamic_smem_unwritten()).all()


def test_launch_configuration_errors():
    with pytest.raises(RuntimeError, match="empty configuration"):
        _emu()._test_launch_config(0, 32, 0)
    with pytest.raises(RuntimeError, match="exceeds 1024 threads"):
        _emu()._test_launch_config(1, 1025, 0)
    with pytest.raises(RuntimeError, match=r"above the default 48 KiB, but cudaFuncSetAttribute"):
        _emu()._test_launch_config(1, 32, 60000)


def test_context_gates_the_cuda_backend():
    x = torch.randn(3, 5)
    with pytest.raises(ValueError, match="device=cpu"):
        torchnova.mesa_kl(x, x, backend="cuda")
    with testing.cuda_emulation():
        assert _backend.select("mesa_kl", "auto", student_logits=x, teacher_logits=x) != "cuda"
        assert _backend.select("mesa_kl", "cuda", student_logits=x, teacher_logits=x) == "cuda"
        why = _backend.reasons("temporal_attention", "cuda", q=torch.empty(1, 2, 3, 1, 300))
        assert any("D=300" in w for w in why), why
    assert _backend.select("mesa_kl", "auto", student_logits=x, teacher_logits=x) != "cuda"


def test_without_the_layer_the_context_says_how_to_build_it(monkeypatch):
    monkeypatch.setattr(_ext, "HAS_CUDA_EMULATION", False)
    with pytest.raises(RuntimeError, match="TORCHNOVA_CUDA_EMULATION=1"):
        with testing.cuda_emulation():
            pass


# ---------------------------------------------------------------------------------------------------------------
# mesa_kl


@pytest.mark.parametrize("dtype", [torch.float64, *DTYPES])
@pytest.mark.parametrize("rows, cols", [(1, 1), (7, 33), (3, 256), (2, 3001)])
def test_mesa_kl(dtype, rows, cols):
    z = (3 * torch.randn(rows, cols)).to(dtype).requires_grad_()
    t = (3 * torch.randn(rows, cols)).to(dtype)
    _check(torchnova.mesa_kl, [z, t], dtype, f"mesa_kl {rows}x{cols}", temperature=2.0, reduction="none")


def test_mesa_kl_several_chunks():
    """Scalar path (strided columns) with C > 8 x 1024: two chunks per row, the second re-read by the gradient."""
    z = torch.randn(9001, 2).t().requires_grad_()
    t = torch.randn(9001, 2).t()
    _check(torchnova.mesa_kl, [z, t], torch.float32, "mesa_kl 2 chunks", temperature=3.0, reduction="none")


@pytest.mark.parametrize("dtype", DTYPES)
def test_mesa_kl_strided_and_unaligned(dtype):
    base = torch.randn(9, 70).to(dtype)
    z = base[1:, 3:67].detach().requires_grad_()  # rows start off 16-byte boundaries: the scalar path
    t = torch.randn(70, 8).to(dtype).t()[:, 3:67]  # column stride 8
    _check(torchnova.mesa_kl, [z, t], dtype, "mesa_kl strided", temperature=0.7, reduction="none")


def test_mesa_kl_masked_rows_give_zero_gradient():
    z = torch.randn(4, 40, requires_grad=True)
    t = torch.randn(4, 40)
    mask = torch.tensor([True, False, True, False])
    with testing.cuda_emulation():
        torchnova.mesa_kl(z, t, mask=mask, backend="cuda").backward()
    assert (z.grad[~mask] == 0).all() and (z.grad[mask] != 0).any()


# ---------------------------------------------------------------------------------------------------------------
# Space-time attention


TEMPORAL_CASES = [  # (B, T, S, H, D)
    (1, 1, 2, 1, 33),
    (1, 97, 1, 1, 1),
    (1, 98, 1, 1, 255),
    (1, 128, 1, 1, 256),
    (2, 5, 3, 2, 33),
    (1, 128, 3, 2, 64),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", TEMPORAL_CASES, ids=lambda s: "x".join(map(str, s)))
def test_temporal_attention(dtype, shape):
    B, T, S, H, D = shape
    q, k, v = (torch.randn(shape).to(dtype).requires_grad_() for _ in range(3))
    bias = torch.randn(H, T, T, requires_grad=True)
    segment_ids = torch.randint(0, 2, (B, T)).cumsum(1)
    _check(torchnova.temporal_attention, [q, k, v], dtype, f"temporal {shape}", {"bias": bias},
           segment_ids=segment_ids, causal=True)  # fmt: skip


@pytest.mark.parametrize("causal", [False, True])
def test_temporal_attention_options_and_strides(causal):
    B, T, S, H, D = 2, 9, 3, 2, 17
    qkv = torch.randn(B, T, S, 3, H, D + 3)[..., :D]  # strided q, k, v, D odd
    q, k, v = (qkv[:, :, :, i].detach().requires_grad_() for i in range(3))
    _check(torchnova.temporal_attention, [q, k, v], torch.float32, f"temporal causal={causal}", causal=causal)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 1), (1, 2, 7, 1, 255), (2, 1, 13, 2, 256), (1, 2, 33, 1, 33)],
                         ids=lambda s: "x".join(map(str, s)))  # fmt: skip
def test_spatial_attention(dtype, shape):
    q, k, v = (torch.randn(shape).to(dtype).requires_grad_() for _ in range(3))
    _check(torchnova.spatial_attention, [q, k, v], dtype, f"spatial {shape}")


def test_spatial_attention_many_tokens():
    """S = 97: several query and key blocks with ragged tails."""
    q, k, v = (torch.randn(1, 1, 97, 1, 16).requires_grad_() for _ in range(3))
    _check(torchnova.spatial_attention, [q, k, v], torch.float32, "spatial S=97")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_qkvpacked(dtype):
    qkv = torch.randn(2, 5, 3, 3, 2, 33).to(dtype).requires_grad_()
    bias = torch.randn(2, 5, 5, requires_grad=True)
    _check(torchnova.temporal_attention_qkvpacked, [qkv], dtype, "temporal packed", {"bias": bias}, causal=True)
    qkv.grad = None
    _check(torchnova.spatial_attention_qkvpacked, [qkv], dtype, "spatial packed")


# ---------------------------------------------------------------------------------------------------------------
# CogVideo dual-channel attention and mix


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "channel, attention, shifted, D",
    [("base", "full", False, 33), ("plus", "full", False, 1), ("plus", "window", False, 255),
     ("plus", "window", True, 64)],
)  # fmt: skip
def test_cogvideo_attention(dtype, channel, attention, shifted, D):
    B, H, text_len, frames, grid = 2, 1, 5, 3, (2, 4)
    L = text_len + frames * grid[0] * grid[1]
    q, k, v = (torch.randn(B, L, H, D).to(dtype).requires_grad_() for _ in range(3))
    pad = torch.ones(B, text_len, dtype=torch.bool)
    pad[1, 3:] = False
    _check(torchnova.cogvideo_attention, [q, k, v], dtype, f"cogvideo {channel}/{attention}", text_len=text_len,
           frames=frames, grid=grid, channel=channel, attention=attention, window=2, shifted=shifted,
           text_pad_mask=pad)  # fmt: skip


def test_cogvideo_attention_interpolation():
    B, H, D, text_len, frames, grid = 1, 2, 16, 3, 5, (2, 2)
    L = text_len + frames * 4
    q, k, v = (torch.randn(B, L, H, D).requires_grad_() for _ in range(3))
    _check(torchnova.cogvideo_attention, [q, k, v], torch.float32, "cogvideo interpolation", text_len=text_len,
           frames=frames, grid=grid, channel="plus", stage="interpolation")  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, text_len", [((1, 1, 1), 0), ((2, 7, 9), 3), ((2, 5, 64), 5), ((1, 33, 250), 4)])
def test_dual_channel_mix(dtype, shape, text_len):
    base, plus = (torch.randn(shape).to(dtype).requires_grad_() for _ in range(2))
    alpha = torch.randn(shape[2]).to(dtype).requires_grad_()
    _check(torchnova.dual_channel_mix, [base, plus, alpha], dtype, f"mix {shape}", text_len=text_len)


# ---------------------------------------------------------------------------------------------------------------
# Determinism: bit-identical reruns


def _run_twice(fn):
    results = []
    for _ in range(2):
        torch.manual_seed(1)
        with testing.cuda_emulation():
            results.append(fn())
    for a, b in zip(*results):
        assert torch.equal(a, b)


def _temporal():
    q, k, v = (torch.randn(2, 9, 3, 2, 33, dtype=torch.float16).requires_grad_() for _ in range(3))
    bias = torch.randn(2, 9, 9, requires_grad=True)
    out = torchnova.temporal_attention(q, k, v, bias=bias, causal=True, backend="cuda")
    out.backward(torch.randn_like(out))
    return [out, q.grad, k.grad, v.grad, bias.grad]


def _spatial(dtype=torch.float32):
    q, k, v = (torch.randn(1, 2, 21, 1, 40).to(dtype).requires_grad_() for _ in range(3))
    out = torchnova.spatial_attention(q, k, v, backend="cuda")
    out.backward(torch.randn_like(out))
    return [out, q.grad, k.grad, v.grad]


def _spatial_half():
    return _spatial(torch.float16)


def _mesa():
    z = torch.randn(5, 300, dtype=torch.bfloat16, requires_grad=True)
    loss = torchnova.mesa_kl(z, torch.randn(5, 300, dtype=torch.bfloat16), backend="cuda")
    loss.backward()
    return [loss, z.grad]


def _mix():
    base, plus = (torch.randn(2, 9, 40).requires_grad_() for _ in range(2))
    alpha = torch.randn(40, requires_grad=True)
    y = torchnova.dual_channel_mix(base, plus, alpha, text_len=2, backend="cuda")
    y.backward(torch.randn_like(y))
    return [y, base.grad, plus.grad, alpha.grad]


def _cogvideo(dtype=torch.float32):
    text_len, frames, grid = 3, 2, (2, 4)
    L = text_len + frames * 8
    q, k, v = (torch.randn(2, L, 2, 24).to(dtype).requires_grad_() for _ in range(3))
    pad = torch.ones(2, text_len, dtype=torch.bool)
    pad[1, 2:] = False
    out = torchnova.cogvideo_attention(q, k, v, text_len=text_len, frames=frames, grid=grid, channel="plus",
                                       attention="window", window=2, text_pad_mask=pad, backend="cuda")
    out.backward(torch.randn_like(out))
    return [out, q.grad, k.grad, v.grad]


def _cogvideo_half():
    return _cogvideo(torch.float16)


EVERY_KERNEL = [_temporal, _spatial, _spatial_half, _mesa, _mix, _cogvideo, _cogvideo_half]


def test_reruns_are_bit_identical():
    for fn in EVERY_KERNEL:
        _run_twice(fn)


@pytest.mark.parametrize("fn", EVERY_KERNEL, ids=lambda fn: fn.__name__.strip("_"))
def test_race_check_schedules_agree(fn):
    """The race check: the threads of each block run in thread order, then in reverse order, between
    synchronisation points. A shared-memory word one thread writes and another reads with no barrier between gives
    results that depend on the order; the forward and backward kernels of every op must give identical bits."""
    results = []
    for schedule in testing.SCHEDULES:
        torch.manual_seed(3)
        with testing.cuda_emulation(schedule=schedule):
            results.append(fn())
    for forward, reverse in zip(*results):
        assert torch.equal(forward, reverse), f"{fn.__name__}: results differ between schedules (a race)"


def test_temporal_bias_gradient_deterministic_mode():
    q, k, v = (torch.randn(1, 7, 3, 2, 8).requires_grad_() for _ in range(3))
    bias = torch.randn(2, 7, 7, requires_grad=True)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        _check(torchnova.temporal_attention, [q, k, v], torch.float32, "temporal deterministic", {"bias": bias})
    finally:
        torch.use_deterministic_algorithms(previous)
