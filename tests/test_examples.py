"""The examples' --quick modes run end to end (small data, seconds) and report what they promise."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest

from utils import needs_cpp

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_train_mesa_quick(tmp_path, capsys):
    pytest.importorskip("sklearn", reason="the example trains on scikit-learn's digits (setup.sh installs it)")
    results = load_example("train_mesa").main(["--quick", "--out", str(tmp_path)])
    assert [r["method"] for r in results] == ["plain", "saf", "mesa"]
    for r in results:
        assert 0.5 < r["test_acc"] <= 1.0  # 10 classes: chance is 0.1; 4 epochs reach > 0.9 in practice
        assert r["sharp_adversarial"] > 0  # a one-step ascent along the gradient raises the loss
    assert results[0]["extra_mb"] == 0 and results[1]["extra_mb"] > 0 and results[2]["extra_mb"] > 0
    out = capsys.readouterr().out
    assert "test acc %" in out and "sharp. adversarial" in out
    assert "CO2 of one training" in out and "gCO2/kWh" in out and "\nyours (" in out  # the region table
    assert all(r["train_seconds"] > 0 for r in results)
    pytest.importorskip("matplotlib")
    assert (tmp_path / "train_mesa.png").stat().st_size > 0


@needs_cpp
def test_train_video_denoiser_quick_same_curve_on_every_backend(tmp_path, capsys):
    pytest.importorskip("sklearn", reason="the example moves scikit-learn's digits (setup.sh installs it)")
    example = load_example("train_video_denoiser")
    curves = {b: example.main(["--quick", "--backend", b, "--out", str(tmp_path)]) for b in ("cpp", "reference")}
    assert len(curves["cpp"]) == 6 and all(map(math.isfinite, curves["cpp"]))  # no NaN, no inf
    assert curves["cpp"][-1] < curves["cpp"][0]  # the loss falls
    # The same run on the C++ kernels and on the PyTorch reference: same loss curve up to float rounding (not the
    # kernel table: 6 epochs of fp32 training let ~1e-7 differences per step grow; 1e-3 relative bounds that).
    for got, want in zip(curves["cpp"], curves["reference"]):
        assert abs(got - want) <= 1e-3 * abs(want) + 1e-5
    assert "held-out clip" in capsys.readouterr().out
    pytest.importorskip("matplotlib")
    assert (tmp_path / "video_denoiser.png").stat().st_size > 0
