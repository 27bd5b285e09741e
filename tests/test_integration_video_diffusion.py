"""torchnova.integrations.video_diffusion_pytorch against the library's own forward (the reference here): tiny
random Unet3D models built in the test (no downloads), patched vs unpatched output and every parameter gradient
(fp64 tight, fp32 within the tolerance table), odd frame counts and grids, focus_present_mask off / on / mixed,
with and without conditioning; patch counts, patch twice, unpatch, state_dict, the ImportError, and that
``import torchnova`` imports none of it."""

import copy
import subprocess
import sys

import pytest
import torch

from utils import assert_close

vdp = pytest.importorskip(
    "video_diffusion_pytorch.video_diffusion_pytorch", reason="pip install video-diffusion-pytorch==0.7.0"
)
import torchnova.integrations.video_diffusion_pytorch as tn_vdp  # noqa: E402

# (dim_mults, attn_dim_head, frames, (h, w)): one level on an odd grid (no down/upsampling), two levels on a
# grid that becomes odd after the downsample; dim_head 40 rotates its first 32 dims only (partial rotary)
CONFIGS = [((1,), 8, 5, (5, 3)), ((1, 2), 40, 7, (6, 2)), ((1,), 12, 1, (3, 3))]


def make_model(dim_mults, dim_head, cond_dim=None, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    model = vdp.Unet3D(dim=8, dim_mults=dim_mults, channels=3, attn_heads=2, attn_dim_head=dim_head, cond_dim=cond_dim)
    with torch.no_grad():  # the out projections start at random values already; make the bias table non-zero too
        model.time_rel_pos_bias.relative_attention_bias.weight.normal_()
    return model.to(dtype)


def run(model, x, time, cond, focus):
    model.zero_grad(set_to_none=True)
    out = model(x, time, cond=cond, focus_present_mask=focus)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(out.dtype)
    out.backward(grad)
    return out.detach(), {name: p.grad for name, p in model.named_parameters()}


def inputs(B, frames, grid, dtype, cond_dim, focus_kind):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(B, 3, frames, *grid, generator=generator, dtype=torch.float64).to(dtype)
    time = torch.tensor([3.0, 7.0][:B], dtype=dtype)
    cond = torch.randn(B, cond_dim, generator=generator, dtype=torch.float64).to(dtype) if cond_dim else None
    focus = {"none": None, "off": torch.tensor([False, False]), "on": torch.tensor([True, True]),
             "mixed": torch.tensor([True, False])}[focus_kind]  # fmt: skip
    return x, time, cond, focus


def compare(got, want, dtype):
    out, grads = got
    out_ref, grads_ref = want
    check = assert_close
    check(out, out_ref, dtype, "fwd", "output")
    assert grads.keys() == grads_ref.keys()
    compared = 0
    for name in grads:
        g, w = grads[name], grads_ref[name]
        assert (g is None) == (w is None), f"{name}: gradient presence differs"
        if g is not None:
            check(g, w, dtype, "grad", name)
            compared += 1
    return compared


@pytest.mark.parametrize("config", CONFIGS, ids=["1level-5x3-T5", "2levels-6x2-T7-partial-rotary", "T1-3x3"])
@pytest.mark.parametrize("focus_kind", ["none", "off", "on", "mixed"])
@pytest.mark.parametrize("cond_dim", [None, 6], ids=["uncond", "cond"])
def test_patched_matches_library_float64(config, focus_kind, cond_dim):
    dim_mults, dim_head, frames, grid = config
    if cond_dim and focus_kind in ("off", "on"):
        pytest.skip("conditioning is covered with focus none and mixed")
    model = make_model(dim_mults, dim_head, cond_dim)
    patched = copy.deepcopy(model)
    assert tn_vdp.patch(patched) == (5 if len(dim_mults) == 1 else 7)
    x, time, cond, focus = inputs(2, frames, grid, torch.float64, cond_dim, focus_kind)
    want = run(model, x, time, cond, focus)
    got = run(patched, x, time, cond, focus)
    compared = compare(got, want, torch.float64)
    assert compared >= 20
    # the relative position bias and every attention projection got a (non-zero) gradient
    grads = got[1]
    if frames > 1 and focus_kind != "on":  # one frame: softmax over one key, the bias has no gradient
        assert grads["time_rel_pos_bias.relative_attention_bias.weight"].abs().max() > 0
    if focus_kind != "on":
        assert grads["mid_temporal_attn.fn.fn.fn.to_qkv.weight"].abs().max() > 0


@pytest.mark.parametrize("config", CONFIGS[:2], ids=["1level-5x3-T5", "2levels-6x2-T7-partial-rotary"])
@pytest.mark.parametrize("focus_kind", ["none", "mixed"])
def test_patched_matches_library_float32(config, focus_kind):
    """fp32, patched vs the library in float64 (ground truth), held to the tolerance table (as is the library's
    own fp32 run)."""
    dim_mults, dim_head, frames, grid = config
    model64 = make_model(dim_mults, dim_head)
    model32 = copy.deepcopy(model64).float()
    patched32 = copy.deepcopy(model32)
    tn_vdp.patch(patched32)
    x, time, cond, focus = inputs(2, frames, grid, torch.float64, None, focus_kind)
    want = run(model64, x, time, cond, focus)
    x32 = x.float()
    library32 = run(model32, x32, time.float(), cond, focus)
    got32 = run(patched32, x32, time.float(), cond, focus)
    # The table's fp32 bound (atol relative to the largest magnitude) holds for the whole network here; the
    # library's own fp32 run is checked against the same bound, so the bound is a fair one.
    compare(library32, want, torch.float32)
    compare(got32, want, torch.float32)


def test_patched_matches_library_triton_backend(monkeypatch):
    """The Triton kernels (interpreter on CPU) inside the model: one small fp32 case."""
    from torchnova import _backend

    x, time, cond, focus = inputs(2, 5, (3, 3), torch.float32, None, "mixed")
    if _backend.reasons("temporal_attention", "triton", q=torch.empty(2, 5, 9, 2, 16)):
        pytest.skip("triton cannot run here")
    patched = make_model((1,), 16, dtype=torch.float32)
    tn_vdp.patch(patched, backend="triton")
    want = run(make_model((1,), 16, dtype=torch.float64), x.double(), time.double(), cond, focus)
    compare(run(patched, x, time, cond, focus), want, torch.float32)


def test_patch_twice_unpatch_and_state_dict():
    model = make_model((1, 2), 8)
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    assert tn_vdp.patch(model) == 7
    assert tn_vdp.patch(model) == 0
    assert model.state_dict().keys() == keys.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in keys.items())
    x, time, _, _ = inputs(1, 3, (4, 4), torch.float64, None, "none")
    patched_out = model(x, time)
    assert tn_vdp.unpatch(model) == 7
    assert tn_vdp.unpatch(model) == 0
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert_close(model(x, time), patched_out, torch.float64, "fwd", "unpatched output")
    # a model patched, deep-copied (GaussianDiffusion's EMA does this) stays patched and independent
    tn_vdp.patch(model)
    clone = copy.deepcopy(model)
    assert tn_vdp.patch(clone) == 0 and tn_vdp.unpatch(clone) == 7 and tn_vdp.patch(model) == 0


def test_patched_model_really_runs_torchnova(monkeypatch):
    """A test that cannot fail is a defect: the patched forward goes through the ops (counted), the unpatched
    one does not."""
    import torchnova.integrations.video_diffusion_pytorch as module

    calls = []
    real_t, real_s = module.temporal_attention_qkvpacked, module.spatial_attention_qkvpacked
    monkeypatch.setattr(module, "temporal_attention_qkvpacked", lambda *a, **k: calls.append("t") or real_t(*a, **k))
    monkeypatch.setattr(module, "spatial_attention_qkvpacked", lambda *a, **k: calls.append("s") or real_s(*a, **k))
    model = make_model((1,), 8)
    x, time, _, _ = inputs(1, 3, (3, 3), torch.float64, None, "none")
    model(x, time)
    assert calls == []
    tn_vdp.patch(model)
    model(x, time)
    assert calls.count("t") == 4 and calls.count("s") == 1


def test_gaussian_diffusion_trains_patched():
    model = make_model((1,), 8, dtype=torch.float32)
    diffusion = vdp.GaussianDiffusion(model, image_size=4, num_frames=3, channels=3, timesteps=10)
    assert tn_vdp.patch(diffusion) == 5
    loss = diffusion(torch.rand(2, 3, 3, 4, 4))
    loss.backward()
    assert torch.isfinite(loss) and model.time_rel_pos_bias.relative_attention_bias.weight.grad is not None


def test_missing_library_raises_import_error_naming_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "video_diffusion_pytorch", None)  # makes `import video_diffusion_pytorch` fail
    with pytest.raises(ImportError, match=r"pip install video-diffusion-pytorch==0\.7\.0"):
        tn_vdp.patch(torch.nn.Linear(2, 2))


def test_bad_arguments():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got str"):
        tn_vdp.patch("model")
    with pytest.raises(TypeError, match="backend must be a str, got int"):
        tn_vdp.patch(torch.nn.Linear(2, 2), backend=3)


def test_import_torchnova_does_not_import_the_library():
    code = (
        "import sys, torchnova; "
        "bad = [m for m in ('video_diffusion_pytorch', 'rotary_embedding_torch', 'einops_exts', "
        "'torchnova.integrations.video_diffusion_pytorch') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_example_runs_and_both_loss_curves_agree(tmp_path, capsys):
    """examples/accelerate_video_diffusion.py with --steps 2 on a tiny model: same seed, same losses, a picture."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "accelerate_video_diffusion.py"
    spec = importlib.util.spec_from_file_location("accelerate_video_diffusion", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    args = ["--steps", "2", "--batch", "1", "--frames", "3", "--size", "8", "--dim", "8", "--heads", "2",
            "--dim-head", "8", "--timesteps", "10", "--out", str(tmp_path)]  # fmt: skip
    result = example.main(args)
    library, patched = result["library"]["losses"], result["torchnova"]["losses"]
    assert len(library) == len(patched) == 2 and result["torchnova"]["replaced"] == 7
    for a, b in zip(library, patched):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(a)), (library, patched)
    out = capsys.readouterr().out
    assert "library loss" in out and "torchnova loss" in out and "median step" in out
    if result["picture"] is not None:
        assert result["picture"].stat().st_size > 0


@pytest.mark.parametrize("kind", [0, 1], ids=["temporal", "spatial"])
def test_benchmark_providers_compute_the_same_module(kind):
    """benchmarks/bench_integrations.py times the same module (same weights) patched and unpatched."""
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks import bench_integrations

    bench = bench_integrations.attention_benchmark()
    shape = {"batch": 1, "frames": 5, "channels": 8, "heads": 2, "dim_head": 8, "kind": kind, "size": 3}
    inputs = bench.make_inputs(shape, torch.float64, torch.device("cpu"))
    library, patched = (provider.make(inputs)() for provider in bench.providers)
    assert_close(patched, library, torch.float64, "fwd", "module output")
    model = bench_integrations.model_benchmark()
    shape = {"batch": 1, "frames": 3, "size": 4, "dim": 8, "levels": 1, "heads": 2, "dim_head": 8}
    inputs = model.make_inputs(shape, torch.float64, torch.device("cpu"))
    library, patched = (provider.make(inputs)() for provider in model.providers)
    assert_close(patched, library, torch.float64, "fwd", "model output")
