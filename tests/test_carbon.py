"""torchnova.energy's grid intensity: CodeCarbon's bundled data by country and cloud region (offline), the fixed
fallback without CodeCarbon, one energy priced in several regions, the hour-of-day CSV, CodeCarbon's own
OfflineEmissionsTracker against our counter (fake RAPL), and the benchmarks' per-op line."""

import csv
import json
import subprocess
import sys
import textwrap
import time
from importlib import resources
from pathlib import Path

import pytest
import torch

from torchnova import energy

HOURLY_CSV = Path(__file__).parent / "data" / "hourly_intensity.csv"
HOURLY_VALUES = [300, 290, 280, 280, 290, 310, 340, 360, 330, 280, 230, 190,
                 170, 160, 170, 200, 260, 340, 400, 420, 410, 380, 350, 320]  # fmt: skip


@pytest.fixture
def no_codecarbon(monkeypatch):
    """torchnova.energy as a user without CodeCarbon sees it."""
    monkeypatch.setattr(energy, "_CODECARBON", ["CodeCarbon is not installed (pip install torchnova[carbon]): test"])


@pytest.fixture
def fake_powercap(tmp_path):
    """A package zone laid out as Linux does (/sys/class/powercap/intel-rapl/intel-rapl:0); (root, zone)."""
    zone = tmp_path / "intel-rapl" / "intel-rapl:0"
    zone.mkdir(parents=True)
    (zone / "name").write_text("package-0\n")
    (zone / "energy_uj").write_text("1000000\n")
    (zone / "max_energy_range_uj").write_text(f"{2**40}\n")
    return tmp_path / "intel-rapl", zone


def _codecarbon_file(path):
    return resources.files("codecarbon").joinpath(path)


# --- the user's grid --------------------------------------------------------------------------------------


def test_default_given_and_env_sources(monkeypatch):
    monkeypatch.delenv(energy.GRID_INTENSITY_ENV, raising=False)
    default = energy.grid_intensity()
    assert default.g_per_kwh == 475.0 and "IEA" in default.source and default.name == "world average"
    assert energy.grid_intensity(56).g_per_kwh == 56.0 and energy.grid_intensity(56).name == "given"
    monkeypatch.setenv(energy.GRID_INTENSITY_ENV, "120")
    from_env = energy.grid_intensity()
    assert from_env.g_per_kwh == 120.0 and energy.GRID_INTENSITY_ENV in from_env.source
    with pytest.raises(ValueError, match="give one of grid_intensity, country, cloud"):
        energy.grid_intensity(56, country="FRA")
    with pytest.raises(ValueError, match="grid_intensity must be >= 0"):
        energy.grid_intensity(-1)
    with pytest.raises(ValueError, match="cloud: expected provider:region"):
        energy.grid_intensity(cloud="europe-west1")
    with pytest.raises(ValueError, match="country: expected an ISO 3166-1 alpha-3"):
        energy.grid_intensity(country="gcp:europe-west1")


def test_without_codecarbon_falls_back_to_the_fixed_figure_and_says_so(no_codecarbon):
    grid = energy.grid_intensity(country="FRA")
    assert grid.g_per_kwh == energy.DEFAULT_GRID_INTENSITY
    assert grid.name == "world average, not FRA" and "not installed" in grid.source and "IEA" in grid.source
    assert energy.grid_intensity(cloud="gcp:europe-west1").g_per_kwh == energy.DEFAULT_GRID_INTENSITY
    regions, note = energy.comparison_regions(grid)
    assert regions == [("yours", grid)] and "torchnova[carbon]" in note
    with pytest.raises(ImportError, match="not installed"):
        energy.lookup_region("FRA")


def test_country_intensity_is_codecarbons_bundled_figure():
    pytest.importorskip("codecarbon")
    # Read the shipped file directly: the lookup through CodeCarbon's API must give the same numbers.
    mix = json.loads(_codecarbon_file("data/private_infra/global_energy_mix.json").read_text())
    for code in ("NOR", "FRA", "DEU", "IND", "USA"):
        grid = energy.grid_intensity(country=code.lower())
        assert grid.g_per_kwh == pytest.approx(mix[code]["carbon_intensity"], rel=1e-12)
        assert grid.name == mix[code]["country_name"]
        assert "global_energy_mix.json" in grid.source and str(mix[code]["year"]) in grid.source
    assert mix["NOR"]["carbon_intensity"] * 10 < mix["IND"]["carbon_intensity"]  # the point of the comparison


def test_cloud_intensity_is_codecarbons_bundled_figure():
    pytest.importorskip("codecarbon")
    with _codecarbon_file("data/cloud/impact.csv").open(encoding="utf-8-sig") as handle:
        rows = {(r["provider"], r["region"]): r for r in csv.DictReader(handle)}
    for provider, region in (("gcp", "us-central1"), ("gcp", "europe-west1"), ("gcp", "europe-north1")):
        grid = energy.grid_intensity(cloud=f"{provider}:{region}")
        assert grid.g_per_kwh == pytest.approx(float(rows[provider, region]["impact"]))
        assert grid.name.startswith(f"{provider}:{region} (") and "impact.csv" in grid.source


def test_unknown_codes_raise_naming_the_argument():
    pytest.importorskip("codecarbon")
    with pytest.raises(ValueError, match=r"country: expected an ISO 3166-1 alpha-3 code .* got 'XX'"):
        energy.grid_intensity(country="XX")
    with pytest.raises(ValueError, match=r"cloud: .*gcp regions: .*europe-west1.* got 'gcp:mars-1'"):
        energy.grid_intensity(cloud="gcp:mars-1")
    with pytest.raises(ValueError, match=r"cloud: .*providers: gcp.* got 'aws:us-east-1'"):  # no AWS data shipped
        energy.grid_intensity(cloud="aws:us-east-1")
    with pytest.raises(TypeError, match="region: expected a country code"):
        energy.lookup_region(3)


def test_lookup_opens_no_socket():
    """Import CodeCarbon and look up every comparison region in a fresh interpreter that records and refuses any
    name lookup, connection or datagram (urllib3, imported by CodeCarbon, binds a socket to ::1 at import to
    probe IPv6: loopback, allowed)."""
    pytest.importorskip("codecarbon")
    script = textwrap.dedent(
        """
        import sys
        events = []
        def guard(event, args):
            loopback = event == "socket.bind" and str(args[1][0]) in ("::1", "127.0.0.1", "localhost")
            if event.startswith(("socket.connect", "socket.getaddrinfo", "socket.gethostby", "socket.send",
                                 "socket.bind")) and not loopback:
                events.append(event)
                raise OSError(f"network use during the lookup: {event} {args}")
        sys.addaudithook(guard)
        from torchnova import energy
        regions, note = energy.comparison_regions(energy.grid_intensity(cloud="gcp:europe-west1"))
        assert not note and len(regions) == 6, (regions, note)
        print("events", events)
        """
    )
    env = {"PYTHONPATH": str(Path(energy.__file__).parents[1]), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "events []" in done.stdout


# --- one energy, several regions --------------------------------------------------------------------------


def test_region_prices_from_a_fake_counter(monkeypatch, fake_powercap):
    root, zone = fake_powercap
    monkeypatch.setattr(energy, "POWERCAP", root)
    regions = [("Clean", energy.GridIntensity(30.0, "c", "test")), ("Dirty", energy.GridIntensity(720.0, "d", "test"))]
    regions.append(("yours", energy.GridIntensity(475.0, "w", "test")))
    with energy.EnergyMeter("cpu", grid_intensity=regions[1][1]) as meter:
        (zone / "energy_uj").write_text(str(1000000 + 36 * 10**6))  # 36 J = 1e-5 kWh
    assert meter.joules == pytest.approx(36.0) and meter.grams_co2 == pytest.approx(720e-5)
    assert "d: test" in meter.summary()
    line = energy.region_prices(1000 * meter.joules, regions, what="1,000 iterations")
    # 36 kJ = 0.01 kWh: 0.3 g, 7.2 g, 4.75 g; the dirtiest costs 24x the cleanest.
    assert line == "CO2 of 1,000 iterations (3.6e+04 J): Clean 0.3 g | Dirty 7.2 g | yours 4.75 g; Dirty 24x Clean"
    assert energy.region_prices(36.0, regions[:1], what="x") == "CO2 of x (36 J): Clean 0.3 mg"


def test_region_line_without_energy_is_honest():
    regions = [("Clean", energy.GridIntensity(30.0, "c", "t")), ("Dirty", energy.GridIntensity(720.0, "d", "t"))]
    regions.append(("yours", energy.GridIntensity(475.0, "w", "t")))
    line = energy.region_prices(None, regions, what="1,000 iterations", why_na="no RAPL: test")
    assert line.startswith("CO2 of 1,000 iterations: energy n/a (no RAPL: test), not priced; gCO2/kWh: Clean 30 |")
    assert " g " not in line and "mg" not in line  # no made-up grams


def test_comparison_regions_are_the_studys_contrast():
    pytest.importorskip("codecarbon")
    regions, note = energy.comparison_regions(56.0)
    assert note == "" and [label for label, _ in regions] == [*energy.COMPARISON_REGIONS, "yours"]
    by_label = {label: grid.g_per_kwh for label, grid in regions}
    assert by_label["yours"] == 56.0
    # Hydro and nuclear against the US Midwest: more than 2x, as the study found (here ~14x and ~8x).
    assert by_label["US central"] > 2 * by_label["France"] > 2 * by_label["Norway"]
    assert "Our World in Data" in energy.describe_regions(regions)


# --- hour of day ------------------------------------------------------------------------------------------


def test_hourly_csv_loads_and_finds_the_cheapest_and_dearest_start():
    hourly = energy.load_hourly_intensity(HOURLY_CSV)
    assert list(hourly.g_per_kwh) == HOURLY_VALUES
    assert energy.start_hour_range(hourly, 600) == ((13, 160.0), (19, 420.0))  # 10 min: the hour's own figure
    # 3 h: mean of the three hours covered; 12-15 h is the solar dip, 18-21 h the evening peak.
    (best, lo), (worst, hi) = energy.start_hour_range(hourly, 3 * 3600)
    assert (best, worst) == (12, 18) and lo == pytest.approx(500 / 3) and hi == pytest.approx(410)
    # 1.5 h starting at 13:00: all of 13 h (160) and half of 14 h (170), time-weighted.
    assert hourly.window_mean(13, 1.5 * 3600) == pytest.approx((160 + 0.5 * 170) / 1.5)
    # Longer than a day: every start hour covers every hour once, plus the rest.
    assert hourly.window_mean(5, 24 * 3600) == pytest.approx(sum(HOURLY_VALUES) / 24)
    line = energy.start_hours_line(hourly, 3 * 3600, 3.6e6, what="the run")
    assert line == (
        "start hour for the run (3.00 h, hourly_intensity.csv): cheapest 12:00 (167 gCO2/kWh, 167 g), "
        "most expensive 18:00 (410 gCO2/kWh, 410 g); 2.46x"
    )
    assert energy.start_hours_line(hourly, 60, None, what="x").endswith("energy n/a, intensities only")


def test_start_window_wraps_around_midnight(tmp_path):
    path = tmp_path / "night.csv"
    path.write_text("".join(f"{h},{100 if h in (22, 23, 0, 1) else 500}\n" for h in range(24)))
    hourly = energy.load_hourly_intensity(path)
    (best, lo), (worst, hi) = energy.start_hour_range(hourly, 4 * 3600)
    assert (best, lo) == (22, 100.0) and hi == 500.0 and worst == 2  # ties: the earliest hour
    assert hourly.window_mean(23, 3 * 3600) == pytest.approx((100 + 100 + 100) / 3)  # 23, 0, 1
    assert hourly.window_mean(0, 3 * 3600) == pytest.approx((100 + 100 + 500) / 3)  # 0, 1, 2


def test_hourly_csv_averages_repeated_hours_and_reads_timestamps(tmp_path):
    path = tmp_path / "export.csv"
    rows = ["datetime,carbon_intensity"]  # two days of an operator's export, ISO date-times
    rows += [f"2026-06-01T{h:02d}:00:00Z,{100 + h}" for h in range(24)]
    rows += [f"2026-06-02T{h:02d}:00:00Z,{300 + h}" for h in range(24)]
    path.write_text("\n".join(rows) + "\n")
    assert list(energy.load_hourly_intensity(path).g_per_kwh) == [200.0 + h for h in range(24)]
    hhmm = tmp_path / "hhmm.csv"
    hhmm.write_text("".join(f"{h:02d}:00,{h}\n" for h in range(24)))
    assert energy.load_hourly_intensity(hhmm).g_per_kwh[23] == 23.0


@pytest.mark.parametrize(
    "body, match",
    [
        ("".join(f"{h},1\n" for h in range(23)), "missing hour\\(s\\) 23"),
        ("hour,g\n0,abc\n", ":2: gCO2/kWh must be a number, got 'abc'"),
        ("0,1\n24,1\n", ":2: hour must be 0-23, got 24"),
        ("0,-5\n", ":1: gCO2/kWh must be finite and >= 0"),
        ("noon,5\n", "hour must be 0-23, HH:MM or an ISO 8601 date-time, got 'noon'"),
        ("0\n", "expected two columns"),
    ],
)
def test_bad_hourly_csv_raises_naming_file_and_row(tmp_path, body, match):
    path = tmp_path / "bad.csv"
    path.write_text(body)
    with pytest.raises(ValueError, match=match):
        energy.load_hourly_intensity(path)


# --- CodeCarbon's own tracker against our counter ---------------------------------------------------------


def test_codecarbon_tracker_energy_agrees_with_ours(monkeypatch, fake_powercap):
    """Both read the same fake RAPL package counter around the same work.

    CPU energy agrees to 1e-6: CodeCarbon converts uJ to kWh with the rounded factor 2.77778e-7 (8e-7 above
    1/3.6e9). Its total adds RAM energy that it does not measure: a power model (5 W per estimated DIMM) × time;
    our meter counts the RAPL package only. Its CO2 is its total × the same intensity that we look up. And it
    skips its closing measurement when its last sample is under 50 ms old, so work shorter than that reads 0 kWh
    there; ours reads the counter at both ends whatever the length (the work below lasts 0.1 s)."""
    pytest.importorskip("codecarbon")
    import codecarbon.core.hardware_cache as hardware_cache
    import codecarbon.core.resource_tracker as resource_tracker
    import codecarbon.external.hardware as hardware
    from codecarbon import OfflineEmissionsTracker

    root, zone = fake_powercap
    real_rapl = hardware.IntelRAPL
    monkeypatch.setattr(resource_tracker.cpu, "is_rapl_available", lambda *args, **kwargs: True)
    monkeypatch.setattr(hardware, "IntelRAPL", lambda *a, rapl_dir=None, **k: real_rapl(*a, rapl_dir=str(root), **k))
    hardware_cache.clear_cache()  # CodeCarbon caches the hardware it found per process: not ours to keep
    try:
        tracker = OfflineEmissionsTracker(
            country_iso_code="FRA", measure_power_secs=3600, output_methods=[], log_level="error",
            tracking_mode="machine", allow_multiple_runs=True,
        )  # fmt: skip
        counter = energy.RaplCounter(root)
        tracker.start()
        start = counter.read()
        (zone / "energy_uj").write_text(str(1000000 + 36 * 10**6))  # the work: 36 J in 0.1 s
        time.sleep(0.1)
        ours = counter.read() - start
        tracker.stop()
        data = tracker.final_emissions_data
    finally:
        hardware_cache.clear_cache()
    assert ours == pytest.approx(36.0)
    assert data.cpu_energy * energy.JOULES_PER_KWH == pytest.approx(ours, rel=1e-6)
    assert data.gpu_energy == 0
    assert data.energy_consumed == pytest.approx(data.cpu_energy + data.ram_energy + data.gpu_energy)
    assert data.ram_energy > 0 and data.ram_power > 0  # modelled, not measured
    france = energy.grid_intensity(country="FRA")
    assert data.emissions * 1000 == pytest.approx(france.grams(data.energy_consumed * energy.JOULES_PER_KWH))


# --- the benchmarks' per-op line --------------------------------------------------------------------------


def _summary_rows(j_per_iter):
    def row(shape, mode, provider, baseline, p50):
        return {"op": "fake", "shape": shape, "dtype": "float32", "mode": mode, "provider": provider,
                "is_baseline": baseline, "status": "ok", "p50_ms": p50, "speedup": None, "pct_bw": None,
                "pct_tflops": None, "j_per_iter": None if baseline else j_per_iter}  # fmt: skip

    return [
        row("n=1", "fwd_bwd", "torchnova-cpp", False, 1.0), row("n=9", "fwd", "torchnova-cpp", False, 2.0),
        row("n=9", "fwd_bwd", "torchnova-cpp", False, 3.0), row("n=9", "fwd_bwd", "torch-eager", True, 4.0),
    ]  # fmt: skip


def test_benchmark_carbon_line_picks_the_largest_training_step():
    from benchmarks import harness

    regions = [("A", energy.GridIntensity(100.0, "a", "t")), ("B", energy.GridIntensity(400.0, "b", "t"))]
    hourly = energy.load_hourly_intensity(HOURLY_CSV)
    text = harness.carbon_line(_summary_rows(3.6), regions, why_na="unused", hourly=hourly)
    first, second = text.splitlines()
    # 1,000 × 3.6 J = 3.6 kJ = 1e-3 kWh: 0.1 g at 100 gCO2/kWh, 0.4 g at 400; 1,000 × 3 ms = 3 s.
    assert first == (
        "CO2 of 1,000 iterations of fake fwd_bwd n=9 float32 (torchnova-cpp, 3 s) (3600 J): A 0.1 g | B 0.4 g"
    )
    assert second.startswith("start hour for 1,000 iterations (3 s, hourly_intensity.csv): cheapest 13:00")
    na = harness.carbon_line(_summary_rows(None), regions, why_na="no RAPL: test")
    assert "energy n/a (no RAPL: test), not priced; gCO2/kWh: A 100 | B 400" in na


def test_benchmark_cli_grid_options(capsys):
    from benchmarks.__main__ import parse_args

    args = parse_args(["--grid-intensity", "56", "--hourly-csv", str(HOURLY_CSV)])
    assert args.grid.g_per_kwh == 56.0 and args.hourly.g_per_kwh[13] == 160.0
    with pytest.raises(SystemExit):
        parse_args(["--grid-intensity", "56", "--country", "FRA"])  # one source of the user's grid
    with pytest.raises(SystemExit):
        parse_args(["--hourly-csv", str(HOURLY_CSV.parent / "missing.csv")])
    assert "missing.csv" in capsys.readouterr().err
    if energy.codecarbon_data() is not None:
        assert parse_args(["--cloud", "gcp:us-central1"]).grid.g_per_kwh > 0
        with pytest.raises(SystemExit):
            parse_args(["--country", "XX"])
        assert "country: expected an ISO 3166-1 alpha-3 code" in capsys.readouterr().err


def test_benchmark_header_records_the_grid_source():
    from benchmarks import harness

    grid = energy.GridIntensity(56.0, "France", "CodeCarbon test")
    spec = harness.DeviceSpec("CPU fake", 10.0, 0.5, "float32", "measured")
    header = harness.machine_header(torch.device("cpu"), spec, grid)
    assert header["grid_intensity_gco2_per_kwh"] == 56.0
    assert header["grid_intensity_source"] == "France: CodeCarbon test"


def test_train_mesa_region_table_prices_one_training_per_method():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "examples" / "train_mesa.py"
    spec = importlib.util.spec_from_file_location("train_mesa_for_carbon", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    results = [{"method": "plain", "train_joules": 3.6e6}, {"method": "plain", "train_joules": 7.2e6},  # 1.5 kWh
               {"method": "mesa", "train_joules": None}]  # fmt: skip
    regions = [("Norway", energy.GridIntensity(30.0, "Norway", "t")), ("yours", energy.GridIntensity(60.0, "X", "t"))]
    table = example.region_table(results, ["plain", "mesa"], regions).splitlines()
    assert table[0].split(" | ") == ["region   ", "gCO2/kWh", "x cleanest", "plain gCO2", "mesa gCO2"]
    assert [c.strip() for c in table[1].split(" | ")] == ["Norway", "30", "1.0", "45", "n/a"]
    assert [c.strip() for c in table[2].split(" | ")] == ["yours (X)", "60", "2.0", "90", "n/a"]
