"""``backend="auto"`` on a GPU: the roofline model's order, the tune cache, ``python -m benchmarks --tune``.

No GPU is needed: ``_backend.gpu_order`` takes the GPU's name, and the inputs are meta tensors (shapes only, so the
papers' shapes cost no memory). The tune run uses CPU backends and a fake timer.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from torchnova import _backend, _roofline, _tuning

H100 = "NVIDIA H100 80GB HBM3"
GPUS = ["NVIDIA A100-SXM4-80GB", H100, "NVIDIA H200", "NVIDIA GeForce RTX 4090", "NVIDIA GeForce RTX 5090"]


def video(B, T, S, H, D, dtype=torch.bfloat16):
    x = torch.empty(B, T, S, H, D, dtype=dtype, device="meta")
    return {"q": x, "k": x, "v": x}


def cogvideo(attention="window", channel="plus", dtype=torch.bfloat16):
    x = torch.empty(1, 2064, 48, 64, dtype=dtype, device="meta")
    return dict(x=x, head_dim=64, text_len=64, frames=5, grid=(20, 20), channel=channel, attention=attention,
                window=10)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(_tuning.CACHE_ENV, str(tmp_path / "tune.json"))
    _tuning.reload()
    yield
    _tuning.reload()


def order(op, gpu=H100, dtype=torch.bfloat16, **inputs):
    names, source = _backend.gpu_order(op, gpu, dtype, **inputs)
    return [n for n in names if n in ("cuda", "triton")], source


@pytest.mark.parametrize("gpu", GPUS)
def test_compute_bound_attention_goes_to_tensor_cores_first(gpu):
    # spatial S 4096 D 64 and CogVideo's window attention sit far above every card's ridge point, and both backends
    # run bf16 with D <= 128 on tensor cores: equal predicted times on the mma.sync cards (the registration order,
    # cuda first, stands); on Hopper Triton's dots compile to wgmma and the CUDA kernels' mma.sync reaches about
    # two thirds of that peak, so Triton goes first.
    expected = ["triton", "cuda"] if _roofline.peaks_for(gpu).wgmma else ["cuda", "triton"]
    assert order("spatial_attention", gpu, **video(2, 16, 4096, 8, 64))[0] == expected
    assert order("cogvideo_attention", gpu, **cogvideo())[0] == expected
    assert order("cogvideo_attention", gpu, **cogvideo("full"))[0] == expected


@pytest.mark.parametrize("gpu", GPUS)
def test_head_dims_over_128_have_no_cuda_tensor_core_kernel(gpu):
    # D = 256 runs on the SIMT CUDA kernels: the tensor-core Triton kernels go first on every card.
    assert order("spatial_attention", gpu, **video(2, 16, 4096, 8, 256))[0] == ["triton", "cuda"]


@pytest.mark.parametrize("gpu", GPUS)
def test_memory_bound_ops_keep_the_streaming_order(gpu):
    # the KL (~1.5 FLOP/B) is under every ridge point, SIMT included: equal predicted times (bandwidth-bound on
    # both backends), so the registration order (cuda first) stands.
    logits = torch.empty(8192, 32000, dtype=torch.bfloat16, device="meta")
    names, source = order("mesa_kl", gpu, student_logits=logits, teacher_logits=logits)
    assert names == ["cuda", "triton"] and source.startswith("roofline model")


@pytest.mark.parametrize("gpu", GPUS)
def test_temporal_t16_sits_at_the_simt_ridge(gpu):
    # temporal at T 16, D 64 bf16: ~9.3 FLOP/B, right at the SIMT kernels' effective ridge (fp32 peak * 0.40 /
    # (bandwidth * 0.80)): 4.8 FLOP/B on an A100 (low fp32 peak) and 7.0 on an H200 (high bandwidth), where the SIMT
    # kernel is predicted compute-bound and the tensor-core one goes first; 10-41 FLOP/B on H100 and the GeForce
    # cards, where both are bandwidth-bound and the order stays. Borderline by design: --tune settles it.
    work = _roofline.workload("temporal_attention", **video(2, 16, 4096, 8, 64))
    peaks = _roofline.peaks_for(gpu)
    simt_ridge = peaks.fp32_simt * _roofline.COMPUTE_FRACTION["simt"] / (peaks.bandwidth * 0.80)
    expected = ["triton", "cuda"] if _roofline.intensity(work) > simt_ridge else ["cuda", "triton"]
    assert expected == (["triton", "cuda"] if ("A100" in gpu or "H200" in gpu) else ["cuda", "triton"])
    assert order("temporal_attention", gpu, **video(2, 16, 4096, 8, 64))[0] == expected


def test_fp32_has_no_tensor_core_kernel_so_the_order_stays():
    # Both backends run fp32 dots as FMA (Triton with input_precision="ieee"): nothing to gain from reordering.
    assert order("spatial_attention", H100, torch.float32, **video(2, 16, 4096, 8, 64, torch.float32))[0] == [
        "cuda", "triton"]


def test_temporal_crosses_the_simt_ridge_on_h100_at_long_clips():
    # T = 64: ~37 FLOP/B, above the H100's SIMT ridge (67 TFLOP/s / 3.35 TB/s = 20 FLOP/B) but under the 4090's
    # (82 FLOP/B): the model sends bf16 to the tensor cores on the H100 only.
    work = _roofline.workload("temporal_attention", **video(2, 64, 4096, 8, 64))
    assert _roofline.ridge_point(_roofline.peaks_for(H100), "simt") < _roofline.intensity(work)
    assert order("temporal_attention", H100, **video(2, 64, 4096, 8, 64))[0] == ["triton", "cuda"]
    assert order("temporal_attention", "NVIDIA GeForce RTX 4090", **video(2, 64, 4096, 8, 64))[0] == ["cuda", "triton"]


def test_predicted_time_is_the_roofline_bound():
    work = _roofline.workload("spatial_attention", **video(2, 16, 4096, 8, 64))
    peaks = _roofline.peaks_for(H100)
    assert work.flops == pytest.approx(4.5 * 4 * (2 * 16 * 8) * 4096 * 4096 * 64)  # fwd 2 + bwd 7 GEMMs
    tensor = _roofline.predicted_seconds(work, "triton", torch.bfloat16, peaks)
    assert tensor == pytest.approx(work.flops / (989.4e12 * _roofline.COMPUTE_FRACTION["tensor"]))
    mma_sync = _roofline.predicted_seconds(work, "cuda", torch.bfloat16, peaks)
    assert mma_sync / tensor == pytest.approx(0.45 / _roofline.COMPUTE_FRACTION["mma_sync_on_hopper"])
    wide = _roofline.workload("spatial_attention", **video(2, 16, 4096, 8, 256))  # D > 128: the SIMT kernels
    simt = _roofline.predicted_seconds(wide, "cuda", torch.bfloat16, peaks)
    assert simt / _roofline.predicted_seconds(wide, "triton", torch.bfloat16, peaks) == pytest.approx(
        989.4 * 0.45 / (66.9 * 0.40))


def test_unknown_gpu_uses_the_fallback_peaks():
    _, source = order("spatial_attention", "Some Future GPU", **video(1, 1, 4096, 1, 64))
    assert source == f"roofline model ({_roofline.FALLBACK_PEAKS.name} peaks)"


def test_buckets():
    assert _roofline.workload("temporal_attention", **video(1, 13, 7, 2, 40)).bucket == "T16-D64"
    assert _roofline.workload("spatial_attention", **video(1, 2, 4096, 2, 64)).bucket == "S4096-D64"
    assert _roofline.workload("cogvideo_attention", **cogvideo()).bucket == "plus-window-D64"


def test_cpu_inputs_keep_the_registration_order():
    x = torch.empty(1, 2, 3, 1, 8)
    names, source = _backend.auto_order("temporal_attention", q=x, k=x, v=x)
    assert names == _backend.backends_for("temporal_attention") and source == "registration order"


def _write_cache(entries):
    _tuning.cache_path().write_text(json.dumps({"format": 1, "entries": entries}))
    _tuning.reload()


def test_measured_order_wins_over_the_model():
    key = _tuning.entry_key(H100, "spatial_attention", torch.bfloat16, "S4096-D64")
    _write_cache({key: {"order": ["cuda", "triton"], "ms": {"cuda": 1.0, "triton": 2.0}}})
    names, source = order("spatial_attention", H100, **video(2, 16, 4096, 8, 64))
    assert names == ["cuda", "triton"] and source.startswith("measured")  # the model says triton first on an H100
    # the same bucket on another GPU (a stale entry for this card) is ignored: the model decides there
    names, source = order("spatial_attention", "NVIDIA H200", **video(2, 16, 4096, 8, 64))
    assert names == ["triton", "cuda"] and source.startswith("roofline model")
    # another bucket on the tuned GPU: the model
    assert order("spatial_attention", H100, **video(2, 16, 256, 8, 128))[1].startswith("roofline model")


@pytest.mark.parametrize("content", ["{not json", json.dumps({"format": 99, "entries": {}}),
                                     json.dumps({"format": 1, "entries": {"k": {"order": "cuda"}}})])
def test_corrupt_cache_is_ignored_with_a_warning(content):
    _tuning.cache_path().write_text(content)
    _tuning.reload()
    with pytest.warns(RuntimeWarning, match="ignoring the tune cache"):
        names, source = order("spatial_attention", H100, **video(2, 16, 4096, 8, 64))
    assert names == ["triton", "cuda"] and source.startswith("roofline model")
    assert "IGNORED" in _tuning.status()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: the file is not re-read on every call
        order("spatial_attention", H100, **video(2, 16, 4096, 8, 64))


def test_tune_writes_the_measured_order(monkeypatch):
    from benchmarks import tune

    monkeypatch.setitem(tune.TUNE_GRID, "mesa_kl", [dict(rows=3, C=5)])
    fake_ms = {"cpp": 3.0, "reference": 1.0}  # the slower-in-reality reference "wins" on the fake clock
    calls = []

    def fake_timer(fn, device):
        fn()  # the real fwd+bwd runs once: a backend that breaks is caught here
        calls.append(len(calls))
        return fake_ms["cpp" if len(calls) == 1 else "reference"]

    path = tune.tune(torch.device("cpu"), ["mesa_kl"], [torch.float32], gpu_name="Fake GPU", timer=fake_timer,
                     backends=("cpp", "reference"), log=lambda _: None)
    assert path == _tuning.cache_path() and len(calls) == 2
    data = json.loads(path.read_text())
    key = _tuning.entry_key("Fake GPU", "mesa_kl", torch.float32, "C8")
    assert data["entries"][key]["order"] == ["reference", "cpp"]
    assert _tuning.cached_order("Fake GPU", "mesa_kl", "float32", "C8") == ("reference", "cpp")
    # a second run merges: other entries stay
    monkeypatch.setitem(tune.TUNE_GRID, "mesa_kl", [dict(rows=3, C=100)])
    calls.clear()
    tune.tune(torch.device("cpu"), ["mesa_kl"], [torch.float32], gpu_name="Fake GPU", timer=fake_timer,
              backends=("cpp", "reference"), log=lambda _: None)
    assert len(json.loads(path.read_text())["entries"]) == 2


def test_tune_refuses_cpu():
    from benchmarks.__main__ import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--tune", "--device", "cpu"])


def test_info_shows_the_order_and_its_source():
    from torchnova.info import report

    text = report()
    assert "auto tries cpp" in text and "(registration order)" in text
    assert "auto on a GPU: no tune cache at" in text
