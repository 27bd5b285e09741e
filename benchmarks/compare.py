"""Compare a benchmark run with a saved one: the time ratio per row, and a regression gate.

Rows are matched on (op, provider, mode, dtype, shape); only rows measured ("ok") in both runs are compared.
``ratio`` = new p50 / old p50, so > 1 is slower now. The gate (``--fail-if-regression PCT``) looks at
torchnova's rows only: baselines are there to tell a slower machine from a slower kernel, and are printed.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

KEY = ("op", "provider", "mode", "dtype", "shape")


def _normalized(row: dict) -> dict:
    """CSV rows are strings: give p50 and is_baseline their types, as in the JSON files."""
    row = dict(row)
    row["p50_ms"] = float(row["p50_ms"]) if row.get("p50_ms") not in (None, "") else None
    if isinstance(row.get("is_baseline"), str):
        row["is_baseline"] = row["is_baseline"] == "True"
    return row


def load_rows(path: Path) -> list[dict]:
    """Rows of a results file (``<op>.json`` or ``<op>.csv``) or of every ``*.json`` in a results folder."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.json"))
        if not files:
            raise ValueError(f"compare: no *.json results in {path}")
        return [row for f in files for row in load_rows(f)]
    if path.suffix == ".json":
        return [_normalized(r) for r in json.loads(path.read_text())["rows"]]
    if path.suffix == ".csv":
        with open(path, newline="") as f:
            return [_normalized(r) for r in csv.DictReader(f)]
    raise ValueError(f"compare: expected a .json or .csv results file or a results folder, got {path}")


def compare(old_rows: list[dict], new_rows: list[dict]) -> list[dict]:
    """One entry per row measured in both runs, in the new run's order."""
    old = {tuple(r[k] for k in KEY): r for r in old_rows if r["status"] == "ok"}
    out = []
    for row in new_rows:
        before = old.get(tuple(row[k] for k in KEY))
        if row["status"] != "ok" or before is None:
            continue
        ratio = row["p50_ms"] / before["p50_ms"]
        out.append({**{k: row[k] for k in KEY}, "is_baseline": row["is_baseline"],
                    "old_ms": before["p50_ms"], "new_ms": row["p50_ms"], "ratio": ratio})  # fmt: skip
    return out


def regressions(comparison: list[dict], pct: float) -> list[dict]:
    """torchnova rows that got slower by more than ``pct`` percent."""
    return [c for c in comparison if not c["is_baseline"] and c["ratio"] > 1 + pct / 100]


def format_comparison(comparison: list[dict], pct: float | None = None) -> str:
    if not comparison:
        return "compare: no row was measured in both runs"
    flagged = {id(c) for c in regressions(comparison, pct)} if pct is not None else set()
    names = ("op", "shape", "dtype", "mode", "provider", "old ms", "new ms", "new/old")
    cells = [
        (c["op"], c["shape"], c["dtype"], c["mode"], c["provider"], f"{c['old_ms']:.4g}", f"{c['new_ms']:.4g}",
         f"{c['ratio']:.3f}" + ("  REGRESSION" if id(c) in flagged else ""))
        for c in comparison
    ]  # fmt: skip
    widths = [max(len(n), *(len(c[i]) for c in cells)) for i, n in enumerate(names)]
    lines = ["  ".join(n.ljust(w) for n, w in zip(names, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(c, widths)) for c in cells]
    return "\n".join(lines)
