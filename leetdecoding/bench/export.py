"""Benchmark results as files: a CSV and a JSON of this run, and rows appended to a history CSV."""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable
from pathlib import Path

from .sweep import Result

RESULT_COLUMNS = [
    "mode", "method", "n", "batch", "heads", "dk", "dv", "dtype", "device", "status", "reason", "auto",
    "median_ms", "min_ms", "max_ms", "iqr_ms", "repeats", "noisy", "rounds", "calls_per_sample",
    "gflops", "mm_fraction", "tokens_per_s", "peak_mib", "error",
]
HISTORY_COLUMNS = ["date", "leetdecoding", "torch", "python", "device_name", "torch_threads", *RESULT_COLUMNS]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def result_row(r: Result, mm_gflops: float | None = None) -> dict:
    """One flat row: times in ms (per call: a forward, a forward + backward, one decode step), memory in MiB,
    throughput also as a fraction of the torch.mm throughput; `noisy` as a bool (JSON) or True/False (CSV)."""
    fraction = r.gflops / mm_gflops if r.gflops is not None and mm_gflops else None
    return {
        "mode": r.mode, "method": r.method, "n": r.n, "batch": r.batch, "heads": r.heads, "dk": r.dk, "dv": r.dv,
        "dtype": r.dtype, "device": r.device, "status": r.status, "reason": r.reason, "auto": r.auto,
        "median_ms": _ms(r.median_s), "min_ms": _ms(r.min_s), "max_ms": _ms(r.max_s), "iqr_ms": _ms(r.iqr_s),
        "repeats": r.repeats, "noisy": r.noisy, "rounds": r.rounds, "calls_per_sample": r.calls_per_sample,
        "gflops": r.gflops, "mm_fraction": fraction, "tokens_per_s": r.tokens_per_s,
        "peak_mib": None if r.peak_bytes is None else r.peak_bytes / 2**20, "error": r.error,
    }


def _csv_value(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _write_rows(f, columns: list[str], rows: Iterable[dict], header: bool) -> None:
    writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
    if header:
        writer.writeheader()
    for row in rows:
        writer.writerow({c: _csv_value(row.get(c)) for c in columns})


def write_csv(path: str | os.PathLike, rows: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        _write_rows(f, RESULT_COLUMNS, rows, header=True)
    return path


def _finite(value):
    """Strict JSON has no inf or NaN: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def write_json(path: str | os.PathLike, rows: list[dict], machine: dict, config: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = _finite({"machine": machine, "config": config, "results": rows})
    path.write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")
    return path


def append_history(path: str | os.PathLike, rows: list[dict], context: dict) -> Path:
    """Append the rows, each with the run's context (date, versions, device name), writing a header if new.
    A history written with other columns (an older version) is rewritten once with today's, its rows kept."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            old = list(reader) if reader.fieldnames != HISTORY_COLUMNS else None
        if old is not None:
            with path.open("w", newline="") as f:
                _write_rows(f, HISTORY_COLUMNS, old, header=True)
    with path.open("a", newline="") as f:
        _write_rows(f, HISTORY_COLUMNS, ({**context, **row} for row in rows), header=new)
    return path
