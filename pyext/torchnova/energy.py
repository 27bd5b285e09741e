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

CO2 = energy (kWh) × grid intensity (gCO2/kWh). The default intensity, 475 gCO2/kWh, is the world-average
carbon intensity of electricity generation of the IEA's Global Energy & CO2 Status Report 2019 (also the
"world" default of several ML carbon trackers); pass your grid's figure (``grid_intensity=``, the
``TORCHNOVA_GRID_INTENSITY`` environment variable, or ``--grid-intensity`` of the benchmarks), e.g. from your
provider or electricityMaps.

    >>> from torchnova.energy import EnergyMeter
    >>> with EnergyMeter("cuda") as meter:
    ...     train_one_epoch()
    >>> print(meter.summary())          # "412.3 J, 0.054 gCO2 (475 gCO2/kWh), 10.2 s"  or  "energy n/a: ..."
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

DEFAULT_GRID_INTENSITY = 475.0  # gCO2/kWh, IEA Global Energy & CO2 Status Report 2019, world average
GRID_INTENSITY_ENV = "TORCHNOVA_GRID_INTENSITY"
POWERCAP = Path("/sys/class/powercap")
JOULES_PER_KWH = 3.6e6


def resolve_grid_intensity(value: float | None = None) -> float:
    """gCO2/kWh: ``value``, else ``TORCHNOVA_GRID_INTENSITY``, else the documented default."""
    if value is None:
        value = float(os.environ.get(GRID_INTENSITY_ENV, DEFAULT_GRID_INTENSITY))
    if not value >= 0:
        raise ValueError(f"grid_intensity must be >= 0 gCO2/kWh, got {value}")
    return float(value)


def grams_co2(joules: float, intensity: float) -> float:
    return joules / JOULES_PER_KWH * intensity


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

    def __init__(self, device: torch.device | str | None = None, *, grid_intensity: float | None = None):
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.grid_intensity = resolve_grid_intensity(grid_intensity)
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
            f"{self.grid_intensity:g} gCO2/kWh, {self.seconds:.1f} s"
        )
