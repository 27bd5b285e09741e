"""The measured backend order that ``backend="auto"`` follows on a GPU once ``python -m benchmarks --tune`` ran.

The cache is one JSON file (``$TORCHNOVA_TUNE_CACHE``, else ``$XDG_CACHE_HOME/torchnova/tune.json``, else
``~/.cache/torchnova/tune.json``)::

    {"format": 1,
     "entries": {"NVIDIA H100 80GB HBM3|spatial_attention|bfloat16|S4096-D64":
                    {"order": ["triton", "cuda"], "ms": {"triton": 1.2, "cuda": 5.1}, "measured": "2026-12-05T..."}}}

Keys are (GPU name, op, dtype, shape bucket) (buckets: ``torchnova._roofline``), so an entry measured on another
GPU is never used: on a new card ``auto`` falls back to the roofline model until that card is tuned. A file that
cannot be read or parsed is ignored with one warning. The file is read once per process (``reload()`` re-reads
it); under ``torch.compile`` the lookup runs at trace time and its result is a constant.
"""

from __future__ import annotations

import datetime
import json
import os
import tempfile
import warnings
from pathlib import Path

import torch

from ._roofline import _assume_constant

CACHE_ENV = "TORCHNOVA_TUNE_CACHE"
FORMAT = 1

_state: dict = {}


def cache_path() -> Path:
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "torchnova" / "tune.json"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def entry_key(gpu: str, op: str, dtype: torch.dtype | str, bucket: str) -> str:
    return f"{gpu}|{op}|{dtype if isinstance(dtype, str) else dtype_name(dtype)}|{bucket}"


def _read(path: Path) -> tuple[dict, str]:
    """(entries, status) where status says what was found, for ``torchnova.info``."""
    if not path.exists():
        return {}, f"no tune cache at {path}"
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("entries"), dict):
            raise ValueError(f"expected {{'format': {FORMAT}, 'entries': {{...}}}}")
        entries = {}
        for key, entry in data["entries"].items():
            order = entry.get("order") if isinstance(entry, dict) else None
            if not isinstance(order, list) or not all(isinstance(b, str) for b in order):
                raise ValueError(f"entry {key!r} has no list of backend names under 'order'")
            entries[key] = entry
        return entries, f"tune cache {path} ({len(entries)} entries)"
    except (OSError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
        warnings.warn(f"torchnova: ignoring the tune cache {path}: {exc}. Re-run `python -m benchmarks --tune` "
                      "or delete the file.", RuntimeWarning, stacklevel=3)
        return {}, f"tune cache {path} IGNORED (unreadable: {exc})"


def entries() -> dict:
    if "entries" not in _state:
        path = cache_path()
        _state["entries"], _state["status"] = _read(path)
        _state["path"] = path
    return _state["entries"]


def status() -> str:
    entries()
    return _state["status"]


def reload() -> None:
    """Forget what was read (after ``--tune`` wrote the file, or in tests)."""
    _state.clear()
    _memo.clear()


def _cached_order_impl(gpu: str, op: str, dtype: str, bucket: str) -> tuple[str, ...] | None:
    entry = entries().get(entry_key(gpu, op, dtype, bucket))
    return tuple(entry["order"]) if entry else None


_memo: dict = {}


@_assume_constant
def cached_order(gpu: str, op: str, dtype: str, bucket: str) -> tuple[str, ...] | None:
    """The measured order for this key, or None (memoised; ``reload()`` forgets)."""
    key = (gpu, op, dtype, bucket)
    if key not in _memo:
        _memo[key] = _cached_order_impl(*key)
    return _memo[key]


def record(results: dict[str, dict[str, float]], path: Path | None = None) -> Path:
    """Merge measured times {entry_key: {backend: ms}} into the cache file (atomically) and reload it."""
    path = Path(path) if path is not None else cache_path()
    current: dict = {}
    if path.exists():
        try:
            data = json.loads(path.read_text())
            if isinstance(data, dict) and data.get("format") == FORMAT and isinstance(data.get("entries"), dict):
                current = data["entries"]
        except (OSError, ValueError):
            current = {}  # a corrupt file is replaced by the new measurements
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    for key, times in results.items():
        order = sorted(times, key=lambda b: times[b])
        current[key] = {"order": order, "ms": {b: round(float(t), 6) for b, t in times.items()}, "measured": now}
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as tmp:
        json.dump({"format": FORMAT, "entries": current}, tmp, indent=1, sort_keys=True)
    os.replace(tmp.name, path)
    reload()
    return path
