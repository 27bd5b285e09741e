"""Energy and CO2 of a piece of work, from the hardware's own energy counters.

Training's carbon footprint is energy × the carbon intensity of the grid that supplied it, and the intensity
varies by region and hour by more than 2×, so the figures are worth printing beside the times.

Counters (cumulative joules, read before and after the work):

* NVIDIA GPUs: NVML's total-energy counter of the device (``nvmlDeviceGetTotalEnergyConsumption``, Volta and
  newer; needs the optional ``nvidia-ml-py``). It covers the whole board, so other processes on the GPU and its
  idle power count too.
* CPUs: Linux RAPL, the package ("intel-rapl:N") zones under ``/sys/class/powercap`` (AMD Zen exposes them too).
  Since Linux 5.10 ``energy_uj`` is readable by root only; containers and VMs often have no powercap at all.
  Package energy includes every process and the idle power of the sockets.

Where no counter can be read, the energy is ``None`` and ``reason`` says why: never a made-up number.

CO2 = energy (kWh) × grid carbon intensity (gCO2/kWh). The intensity comes, in this order, from a number you give
(``--grid-intensity``), a cloud region (``--cloud gcp:europe-west1``) or a country (``--country FRA``, ISO 3166-1
alpha-3) looked up in the data that CodeCarbon ships (``pip install torchnova[carbon]``; read from the installed
package, never from the network), the ``TORCHNOVA_GRID_INTENSITY`` environment variable, or the fixed default of
475 gCO2/kWh: the world average of the IEA's Global Energy & CO2 Status Report 2019 (also CodeCarbon's own
fallback). A ``GridIntensity`` carries its figure with its name and source, so every printed figure says where it
came from; without CodeCarbon a country or cloud region falls back to the default and the source says so.

CodeCarbon's bundled data (3.3.2): ``data/private_infra/global_energy_mix.json``, the carbon intensity of each
country's electricity from Our World in Data (the latest year each country has, mostly 2022 or 2023; the year is
in the source string), and ``data/cloud/impact.csv``, Google Cloud's own per-region grid intensity (GCP regions
only: CodeCarbon ships none for AWS or Azure).

Against CodeCarbon's own ``OfflineEmissionsTracker`` reading the same RAPL counter (tests/test_carbon.py, fake
counter): the CPU energy agrees to 1e-6 (CodeCarbon converts µJ to kWh with the rounded factor 2.77778e-7). Its
total is larger by its RAM figure, a model (5 W per estimated DIMM × time) rather than a counter, which the
meter here does not add; and it skips its closing sample when the last one is under 50 ms old, so work shorter
than that reads 0 kWh there. On NVIDIA GPUs both read NVML's total-energy counter (not compared here: no GPU).

Where and when matter: the same energy costs ~24× more CO2 in India than in Norway (``region_prices``), and a
grid's intensity changes over the day. ``load_hourly_intensity`` reads a CSV of (hour, gCO2/kWh), e.g. an export
from your grid operator, and ``start_hour_range`` gives the cheapest and the most expensive hour to start a run of
a given length.

    >>> from torchnova.energy import EnergyMeter, grid_intensity
    >>> with EnergyMeter("cuda", grid_intensity=grid_intensity(country="FRA")) as meter:
    ...     train_one_epoch()
    >>> print(meter.summary())   # "412.3 J (40 W), 0.0064 gCO2 at 56 gCO2/kWh (France: CodeCarbon ...), 10.2 s"
"""

from __future__ import annotations

import csv
import datetime
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

DEFAULT_GRID_INTENSITY = 475.0  # gCO2/kWh, IEA Global Energy & CO2 Status Report 2019, world average
DEFAULT_SOURCE = "fixed default, IEA Global Energy & CO2 Status Report 2019"
GRID_INTENSITY_ENV = "TORCHNOVA_GRID_INTENSITY"
POWERCAP = Path("/sys/class/powercap")
JOULES_PER_KWH = 3.6e6
CARBON_EXTRA = "pip install torchnova[carbon]"
# The contrasting regions of the carbon study's comparison (hydro, nuclear, the US Midwest, a coal-and-wind mix,
# coal-heavy), as CodeCarbon's data names them: countries by ISO 3166-1 alpha-3, cloud regions as provider:region.
COMPARISON_REGIONS = {
    "Norway": "NOR",
    "France": "FRA",
    "US central": "gcp:us-central1",  # Council Bluffs, Iowa: the central-US cloud region
    "Germany": "DEU",
    "India": "IND",
}


def resolve_grid_intensity(value: float | None = None) -> float:
    """gCO2/kWh: ``value``, else ``TORCHNOVA_GRID_INTENSITY``, else the documented default."""
    if value is None:
        value = float(os.environ.get(GRID_INTENSITY_ENV, DEFAULT_GRID_INTENSITY))
    if not value >= 0:
        raise ValueError(f"grid_intensity must be >= 0 gCO2/kWh, got {value}")
    return float(value)


def grams_co2(joules: float, intensity: float) -> float:
    return joules / JOULES_PER_KWH * intensity


# ---------------------------------------------------------------------------------------------------------
# Grid carbon intensity: a number, or CodeCarbon's bundled data by country or cloud region
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GridIntensity:
    """A grid's carbon intensity with what it is and where the figure comes from."""

    g_per_kwh: float
    name: str  # "France", "gcp:us-central1 (Council Bluffs, Iowa, USA)", "world average", "given"
    source: str  # "CodeCarbon 3.3.2 global_energy_mix.json, Our World in Data, 2023", "fixed default, IEA ..."

    def grams(self, joules: float) -> float:
        return grams_co2(joules, self.g_per_kwh)

    def __str__(self) -> str:
        return f"{self.g_per_kwh:.0f} gCO2/kWh, {self.name}: {self.source}"


DEFAULT_GRID = GridIntensity(DEFAULT_GRID_INTENSITY, "world average", DEFAULT_SOURCE)


class _CodeCarbonData:
    """CodeCarbon's bundled intensity data, read through its own API (DataSource, Emissions): package files only.

    ``Emissions`` is built without an Electricity Maps token, so it never calls that API; nothing here starts a
    tracker (which would probe the hardware and read its config files)."""

    def __init__(self):
        from importlib.metadata import version

        from codecarbon.core.emissions import Emissions
        from codecarbon.core.units import Energy
        from codecarbon.external.geography import CloudMetadata, GeoMetadata
        from codecarbon.input import DataSource

        self.version = version("codecarbon")
        self.data_source = DataSource()
        self.emissions = Emissions(self.data_source, electricitymaps_api_token=None)
        self._one_kwh = Energy(kWh=1.0)
        self._geo, self._cloud = GeoMetadata, CloudMetadata

    def country(self, iso3: str) -> GridIntensity:
        mix = self.data_source.get_global_energy_mix_data()
        if iso3 not in mix:  # CodeCarbon itself would silently price it at the world average
            raise ValueError(
                f"country: expected an ISO 3166-1 alpha-3 code in CodeCarbon {self.version}'s "
                f"global_energy_mix.json ({len(mix)} countries, e.g. FRA, NOR, USA, DEU, IND), got {iso3!r}"
            )
        entry = mix[iso3]
        kg = self.emissions.get_country_emissions(self._one_kwh, self._geo(iso3, country_name=entry["country_name"]))
        how = "Our World in Data" if entry.get("carbon_intensity") is not None else "computed from the energy mix"
        year = f", {entry['year']}" if entry.get("year") else ""
        return GridIntensity(
            1000.0 * kg, entry["country_name"], f"CodeCarbon {self.version} global_energy_mix.json, {how}{year}"
        )

    def cloud(self, provider: str, region: str) -> GridIntensity:
        table = self.data_source.get_cloud_emissions_data()
        match = table[(table["provider"] == provider) & (table["region"] == region)]
        if len(match) != 1:  # CodeCarbon would fall back to the world average with a log line
            providers = sorted(set(table["provider"]))
            known = sorted(table[table["provider"] == provider]["region"])
            listing = f"{provider} regions: {', '.join(known)}" if known else f"providers: {', '.join(providers)}"
            raise ValueError(
                f"cloud: expected provider:region from CodeCarbon {self.version}'s cloud/impact.csv ({listing}), "
                f"got '{provider}:{region}'"
            )
        row = match.iloc[0]
        kg = self.emissions.get_cloud_emissions(self._one_kwh, self._cloud(provider=provider, region=region))
        place = ", ".join(v for v in (row["city"], row["state"], row["country_name"]) if isinstance(v, str) and v)
        return GridIntensity(
            1000.0 * kg, f"{provider}:{region} ({place})",
            f"CodeCarbon {self.version} cloud/impact.csv, {row['providerName']}'s region data",
        )  # fmt: skip


_CODECARBON: list = []  # one loaded instance (the tables are read once), or the ImportError text


def codecarbon_data() -> _CodeCarbonData | None:
    """CodeCarbon's data, loaded once; None when CodeCarbon is not installed (``codecarbon_missing()`` says why)."""
    if not _CODECARBON:
        try:
            _CODECARBON.append(_CodeCarbonData())
        except ImportError as exc:
            _CODECARBON.append(f"CodeCarbon is not installed ({CARBON_EXTRA}): {exc}")
    return _CODECARBON[0] if isinstance(_CODECARBON[0], _CodeCarbonData) else None


def codecarbon_missing() -> str:
    """Why CodeCarbon's data cannot be used, or "" when it can."""
    return "" if codecarbon_data() is not None else _CODECARBON[0]


def lookup_region(spec: str) -> GridIntensity:
    """A country ("FRA", ISO 3166-1 alpha-3) or a cloud region ("gcp:europe-west1") in CodeCarbon's data.

    Raises ImportError without CodeCarbon and ValueError (naming the argument and listing what exists) for a
    code or region that its data does not have."""
    if not isinstance(spec, str) or not spec.strip():
        raise TypeError(f"region: expected a country code such as 'FRA' or a cloud region such as "
                        f"'gcp:europe-west1', got {spec!r}")  # fmt: skip
    data = codecarbon_data()
    if data is None:
        raise ImportError(codecarbon_missing())
    spec = spec.strip()
    if ":" in spec:
        provider, _, region = spec.partition(":")
        return data.cloud(provider.strip().lower(), region.strip().lower())
    return data.country(spec.upper())


def grid_intensity(
    value: float | None = None, *, country: str | None = None, cloud: str | None = None
) -> GridIntensity:
    """The user's grid: ``value`` gCO2/kWh, or ``cloud`` ("gcp:europe-west1") or ``country`` ("FRA") from
    CodeCarbon's bundled data, else ``TORCHNOVA_GRID_INTENSITY``, else the fixed default.

    Without CodeCarbon, ``country`` and ``cloud`` fall back to the fixed default and the source says so; a
    code that CodeCarbon's data lacks raises ValueError. At most one of the three may be given."""
    given = [name for name, v in (("grid_intensity", value), ("country", country), ("cloud", cloud)) if v is not None]
    if len(given) > 1:
        raise ValueError(f"give one of grid_intensity, country, cloud; got {' and '.join(given)}")
    if value is not None:
        return GridIntensity(resolve_grid_intensity(value), "given", "--grid-intensity / grid_intensity=")
    if country is not None or cloud is not None:
        spec = cloud if cloud is not None else country
        if cloud is not None and ":" not in str(cloud):
            raise ValueError(f"cloud: expected provider:region such as 'gcp:europe-west1', got {cloud!r}")
        if country is not None and ":" in str(country):
            raise ValueError(f"country: expected an ISO 3166-1 alpha-3 code such as 'FRA', got {country!r}")
        try:
            return lookup_region(spec)
        except ImportError as exc:
            return GridIntensity(DEFAULT_GRID_INTENSITY, f"world average, not {spec}", f"{DEFAULT_SOURCE}; {exc}")
    if os.environ.get(GRID_INTENSITY_ENV):
        return GridIntensity(resolve_grid_intensity(), "given", f"{GRID_INTENSITY_ENV} environment variable")
    return DEFAULT_GRID


def as_grid_intensity(grid: GridIntensity | float | None) -> GridIntensity:
    """``grid`` as it is, or a number (None: the environment variable or the default) as a GridIntensity."""
    return grid if isinstance(grid, GridIntensity) else grid_intensity(grid)


def comparison_regions(own: GridIntensity | float | None = None) -> tuple[list[tuple[str, GridIntensity]], str]:
    """([(label, intensity)], note): the ``COMPARISON_REGIONS`` from CodeCarbon's data, then ``own`` as "yours"
    (the default grid when None). Without CodeCarbon only "yours", and the note says why."""
    own = as_grid_intensity(own)
    data = codecarbon_data()
    regions = [] if data is None else [(label, lookup_region(spec)) for label, spec in COMPARISON_REGIONS.items()]
    return regions + [("yours", own)], codecarbon_missing()


def region_prices(
    joules: float | None, regions: list[tuple[str, GridIntensity]], *, what: str, note: str = "", why_na: str = ""
) -> str:
    """One line: the CO2 of ``joules`` (the energy of ``what``) priced in every region, or, when the energy is
    None, the regions' intensities and the reason (``why_na``) it could not be priced: never a made-up figure."""
    if not regions:
        return f"CO2 of {what}: no regions"
    spread = ""
    lo_name, lo = min(regions, key=lambda r: r[1].g_per_kwh)
    hi_name, hi = max(regions, key=lambda r: r[1].g_per_kwh)
    if len(regions) > 2 and lo.g_per_kwh > 0:  # the dirtiest against the cleanest: the point of the line
        ratio = hi.g_per_kwh / lo.g_per_kwh
        spread = f"; {hi_name} {ratio:.1f}x {lo_name}" if ratio < 10 else f"; {hi_name} {ratio:.0f}x {lo_name}"
    extra = f" ({note})" if note else ""
    if joules is None:
        cells = " | ".join(f"{label} {grid.g_per_kwh:.0f}" for label, grid in regions)
        return f"CO2 of {what}: energy n/a ({why_na}), not priced; gCO2/kWh: {cells}{spread}{extra}"
    cells = " | ".join(f"{label} {_grams_text(grid.grams(joules))}" for label, grid in regions)
    return f"CO2 of {what} ({joules:.4g} J): {cells}{spread}{extra}"


def _grams_text(grams: float) -> str:
    return f"{grams:.3g} g" if grams >= 1e-3 or grams == 0 else f"{grams * 1e3:.3g} mg"


def describe_regions(regions: list[tuple[str, GridIntensity]]) -> str:
    """One line per region: label, intensity, name and source (the data's vintage)."""
    return "\n".join(f"  {label:<11} {grid}" for label, grid in regions)


# ---------------------------------------------------------------------------------------------------------
# Hour of day: the cheapest and the most expensive hour to start a run
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HourlyIntensity:
    """A grid's intensity by hour of day, 0-23 (the file's clock), averaged over every row of that hour."""

    g_per_kwh: tuple[float, ...]  # 24 values
    source: str

    def window_mean(self, start_hour: int, seconds: float) -> float:
        """Mean intensity over [start_hour, start_hour + seconds), wrapping around midnight; a run shorter than an
        hour is priced at its start hour (the hour's figure is an average over the hour)."""
        hours = max(seconds, 0.0) / 3600.0
        if hours <= 1.0:
            return self.g_per_kwh[start_hour % 24]
        days, rest = divmod(hours, 24.0)
        total = days * sum(self.g_per_kwh)
        whole, frac = int(rest), rest - int(rest)
        total += sum(self.g_per_kwh[(start_hour + i) % 24] for i in range(whole))
        total += frac * self.g_per_kwh[(start_hour + whole) % 24]
        return total / hours


def load_hourly_intensity(path: str | os.PathLike) -> HourlyIntensity:
    """A CSV of (hour, gCO2/kWh): an optional header row, then one row per hour or many (several days of an
    export): rows of the same hour are averaged. The hour is an integer 0-23, "HH:MM", or an ISO 8601 date-time
    (its hour is used). Every hour 0-23 must be present. Raises ValueError naming the file, row and problem."""
    path = Path(path)
    sums, counts = [0.0] * 24, [0] * 24
    first_row = True
    with path.open(newline="") as handle:
        for line_no, row in enumerate(csv.reader(handle), start=1):
            cells = [c.strip() for c in row]
            if not cells or not any(cells) or cells[0].startswith("#"):
                continue  # blank lines and comments
            if len(cells) < 2:
                raise ValueError(f"{path}:{line_no}: expected two columns (hour, gCO2/kWh), got {row!r}")
            header, first_row = first_row, False
            try:
                value = float(cells[1])
            except ValueError:
                if header:
                    continue
                raise ValueError(f"{path}:{line_no}: gCO2/kWh must be a number, got {cells[1]!r}") from None
            hour = _parse_hour(cells[0], f"{path}:{line_no}")
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{path}:{line_no}: gCO2/kWh must be finite and >= 0, got {value}")
            sums[hour] += value
            counts[hour] += 1
    missing = [h for h in range(24) if counts[h] == 0]
    if missing:
        raise ValueError(f"{path}: every hour 0-23 needs a row; missing hour(s) {', '.join(map(str, missing))}")
    return HourlyIntensity(tuple(s / n for s, n in zip(sums, counts)), str(path))


def _parse_hour(text: str, where: str) -> int:
    try:
        if text.lstrip("-").isdigit():
            hour = int(text)
        elif len(text) <= 5 and ":" in text:
            hour = int(text.split(":")[0])
        else:
            hour = datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).hour
    except ValueError:
        raise ValueError(f"{where}: hour must be 0-23, HH:MM or an ISO 8601 date-time, got {text!r}") from None
    if not 0 <= hour <= 23:
        raise ValueError(f"{where}: hour must be 0-23, got {hour}")
    return hour


def start_hour_range(hourly: HourlyIntensity, seconds: float) -> tuple[tuple[int, float], tuple[int, float]]:
    """((cheapest start hour, its mean gCO2/kWh), (most expensive start hour, its mean)) for a run of ``seconds``;
    ties go to the earliest hour."""
    means = [hourly.window_mean(h, seconds) for h in range(24)]
    best = min(range(24), key=lambda h: (means[h], h))
    worst = max(range(24), key=lambda h: (means[h], -h))
    return (best, means[best]), (worst, means[worst])


def start_hours_line(hourly: HourlyIntensity, seconds: float, joules: float | None = None, *, what: str) -> str:
    """The cheapest and the most expensive start hour for ``what`` (``seconds`` long; ``joules`` if measured)."""
    (best, lo), (worst, hi) = start_hour_range(hourly, seconds)
    length = f"{seconds / 3600:.2f} h" if seconds >= 360 else f"{seconds:.3g} s"

    def cell(hour: int, mean: float) -> str:
        grams = f", {_grams_text(grams_co2(joules, mean))}" if joules is not None else ""
        return f"{hour:02d}:00 ({mean:.0f} gCO2/kWh{grams})"

    ratio = f"; {hi / lo:.2f}x" if lo > 0 else ""
    energy = "" if joules is not None else "; energy n/a, intensities only"
    return (
        f"start hour for {what} ({length}, {Path(hourly.source).name}): cheapest {cell(best, lo)}, "
        f"most expensive {cell(worst, hi)}{ratio}{energy}"
    )


class NvmlCounter:
    """Total energy of one NVIDIA GPU since the driver loaded, in joules (NVML reports millijoules)."""

    name = "nvml"

    def __init__(self, device_index: int):
        import pynvml  # nvidia-ml-py

        pynvml.nvmlInit()
        self._nvml = pynvml
        self._handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
        self.read()  # raises NVMLError_NotSupported on GPUs without the counter

    def read(self) -> float:
        return self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle) / 1e3


class RaplCounter:
    """Sum of the CPU package zones of Linux RAPL, in joules, unwrapping each zone's counter overflow."""

    name = "rapl"

    def __init__(self, root: Path | None = None):
        root = POWERCAP if root is None else root
        # Package zones are "intel-rapl:N"; "intel-rapl:N:M" are sub-zones (core, dram) already inside them.
        self._zones = sorted(p for p in root.glob("intel-rapl:*") if p.name.count(":") == 1)
        if not self._zones:
            raise OSError(f"no RAPL package zones under {root}")
        self._ranges = [int((z / "max_energy_range_uj").read_text()) for z in self._zones]
        self._last = [int((z / "energy_uj").read_text()) for z in self._zones]  # PermissionError if not root
        self._total_uj = 0

    def read(self) -> float:
        for i, zone in enumerate(self._zones):
            now = int((zone / "energy_uj").read_text())
            self._total_uj += (now - self._last[i]) % (self._ranges[i] + 1)  # one wrap at most between reads
            self._last[i] = now
        return self._total_uj / 1e6


def energy_counter(device: torch.device | str | None = None) -> tuple[NvmlCounter | RaplCounter | None, str]:
    """(counter, "") for ``device`` (CUDA: NVML; CPU: RAPL), or (None, why there is none)."""
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        try:
            return NvmlCounter(index), ""
        except ImportError:
            return None, "nvidia-ml-py is not installed (pip install nvidia-ml-py)"
        except Exception as exc:  # NVMLError subclasses: no driver, counter not supported on this GPU
            return None, f"NVML energy counter unavailable: {type(exc).__name__}: {exc}"
    if device.type == "cpu":
        if not POWERCAP.is_dir():
            return None, f"no RAPL: {POWERCAP} does not exist (VM or container without powercap)"
        try:
            return RaplCounter(), ""
        except PermissionError as exc:
            return None, f"RAPL not readable ({exc.filename}: root only since Linux 5.10)"
        except (OSError, ValueError) as exc:
            return None, f"RAPL unavailable: {exc}"
    return None, f"no energy counter for device type {device.type!r}"


class EnergyMeter:
    """Context manager measuring the joules, seconds and gCO2 of the work inside it on one device.

    ``joules`` and ``grams_co2`` are None (and ``reason`` says why) where the device has no readable counter.
    CUDA work is synchronized at entry and exit so the counter window covers the queued kernels. Reusable: each
    ``with`` block starts a new measurement.
    """

    def __init__(
        self, device: torch.device | str | None = None, *, grid_intensity: GridIntensity | float | None = None
    ):
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.grid = as_grid_intensity(grid_intensity)
        self.grid_intensity = self.grid.g_per_kwh
        self.counter, self.reason = energy_counter(self.device)
        self.joules: float | None = None
        self.seconds: float | None = None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __enter__(self) -> EnergyMeter:
        self._sync()
        self._start_j = self.counter.read() if self.counter is not None else None
        self._start_s = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self._sync()
        self.seconds = time.perf_counter() - self._start_s
        self.joules = self.counter.read() - self._start_j if self.counter is not None else None

    @property
    def grams_co2(self) -> float | None:
        return None if self.joules is None else grams_co2(self.joules, self.grid_intensity)

    @property
    def watts(self) -> float | None:
        return None if self.joules is None or not self.seconds else self.joules / self.seconds

    def summary(self) -> str:
        if self.joules is None:
            return f"energy n/a ({self.reason}), {self.seconds:.1f} s"
        return (
            f"{self.joules:.1f} J ({self.watts:.0f} W), {self.grams_co2:.3g} gCO2 at "
            f"{self.grid_intensity:g} gCO2/kWh ({self.grid.name}: {self.grid.source}), {self.seconds:.1f} s"
        )
