"""torchnova.energy: counters, the meter, CO2 arithmetic; "n/a" with a reason where no counter exists."""

import pytest
import torch

from torchnova import energy


def _fake_powercap(root, zones):
    """zones: {name: (energy_uj, max_energy_range_uj)} as Linux lays them out under /sys/class/powercap."""
    for name, (value, max_range) in zones.items():
        (root / name).mkdir()
        (root / name / "energy_uj").write_text(f"{value}\n")
        (root / name / "max_energy_range_uj").write_text(f"{max_range}\n")


def test_rapl_sums_package_zones_skips_subzones_and_unwraps(tmp_path):
    _fake_powercap(tmp_path, {"intel-rapl:0": (900, 999), "intel-rapl:1": (10, 10**9), "intel-rapl:0:0": (5, 99)})
    counter = energy.RaplCounter(tmp_path)
    assert counter.read() == 0.0
    (tmp_path / "intel-rapl:0" / "energy_uj").write_text("100\n")  # wrapped: 900 -> 999 -> 0 -> 100 = 200 uJ
    (tmp_path / "intel-rapl:1" / "energy_uj").write_text("3000010\n")  # +3 J
    (tmp_path / "intel-rapl:0:0" / "energy_uj").write_text("7000000\n")  # a sub-zone: already in its package
    assert counter.read() == pytest.approx(3.0002)


def test_no_counter_reports_na_with_reason(monkeypatch, tmp_path):
    monkeypatch.setattr(energy, "POWERCAP", tmp_path / "missing")
    counter, why = energy.energy_counter("cpu")
    assert counter is None and "does not exist" in why
    with energy.EnergyMeter("cpu") as meter:
        sum(range(1000))
    assert meter.joules is None and meter.grams_co2 is None and meter.watts is None
    assert meter.seconds >= 0 and meter.summary().startswith("energy n/a (no RAPL")


def test_unreadable_rapl_says_root_only(monkeypatch, tmp_path):
    _fake_powercap(tmp_path, {"intel-rapl:0": (1, 99)})
    monkeypatch.setattr(energy, "POWERCAP", tmp_path)

    class RootOnlyRapl(energy.RaplCounter):  # what a non-root user meets since Linux 5.10 (the tests run as root)
        def __init__(self):
            raise PermissionError(13, "Permission denied", str(tmp_path / "intel-rapl:0" / "energy_uj"))

    monkeypatch.setattr(energy, "RaplCounter", RootOnlyRapl)
    counter, why = energy.energy_counter("cpu")
    assert counter is None and "root only" in why and "energy_uj" in why


def test_meter_reports_joules_and_co2(monkeypatch, tmp_path):
    _fake_powercap(tmp_path, {"intel-rapl:0": (0, 10**12)})
    monkeypatch.setattr(energy, "POWERCAP", tmp_path)
    with energy.EnergyMeter("cpu", grid_intensity=400.0) as meter:
        (tmp_path / "intel-rapl:0" / "energy_uj").write_text(str(36 * 10**6))  # 36 J
    assert meter.joules == pytest.approx(36.0)
    assert meter.grams_co2 == pytest.approx(36.0 / 3.6e6 * 400.0)  # 0.004 g
    assert "36.0 J" in meter.summary() and "400 gCO2/kWh" in meter.summary()


def test_grid_intensity_default_env_and_validation(monkeypatch):
    monkeypatch.delenv(energy.GRID_INTENSITY_ENV, raising=False)
    assert energy.resolve_grid_intensity() == energy.DEFAULT_GRID_INTENSITY == 475.0
    monkeypatch.setenv(energy.GRID_INTENSITY_ENV, "56")
    assert energy.resolve_grid_intensity() == 56.0
    assert energy.resolve_grid_intensity(10.0) == 10.0
    with pytest.raises(ValueError, match="grid_intensity must be >= 0"):
        energy.resolve_grid_intensity(-1.0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU answer")
def test_cuda_without_nvml_is_na(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_pynvml(name, *args, **kwargs):
        if name == "pynvml":
            raise ImportError("No module named 'pynvml'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pynvml)
    counter, why = energy.energy_counter(torch.device("cuda", 0))
    assert counter is None and "nvidia-ml-py" in why
