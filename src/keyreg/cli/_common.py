"""Pieces shared by sub-commands: device flags, metric tables."""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path

from ..io import atomic_write_text

__all__ = ["add_device_arguments", "format_summary", "write_metric_tables", "scalar_metrics"]


def add_device_arguments(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: GPU when available)")
    p.add_argument("--use_amp", action="store_true", help="bf16 autocast for the network on GPU")


def scalar_metrics(row: dict) -> dict[str, float]:
    return {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def format_summary(rows: Sequence[dict], aligns: Sequence[str]) -> str:
    """A markdown table: one row per align, ``mean ± std`` (over pairs) per scalar metric."""
    names: list[str] = []
    for r in rows:
        for k in scalar_metrics(r):
            if k not in names:
                names.append(k)
    lines = ["| align | pairs | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for align in aligns:
        sel = [r for r in rows if r["align"] == align]
        if not sel:
            continue
        cells = []
        for n in names:
            vals = [float(r[n]) for r in sel if n in r and not math.isnan(float(r[n]))]
            if not vals:
                cells.append("n/a")
                continue
            mean = sum(vals) / len(vals)
            std = math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals))
            cells.append(f"{mean:.4f} ± {std:.4f}" if len(vals) > 1 else f"{mean:.4f}")
        lines.append(f"| {align} | {len(sel)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_metric_tables(save_dir: Path, rows: Sequence[dict],
                        failures: Sequence[tuple[str, str]] = ()) -> tuple[Path, Path]:
    """``metrics.csv`` (one row per pair and align, scalar metrics) and ``metrics.json`` (everything,
    per-label values and failures included), both written atomically."""
    keys = ["pair", "moving", "fixed", "align"]
    for r in rows:
        for k in scalar_metrics(r):
            if k not in keys:
                keys.append(k)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (f"{r[k]:.6g}" if isinstance(r.get(k), float) else r.get(k, "")) for k in keys})
    csv_path = atomic_write_text(save_dir / "metrics.csv", buf.getvalue())

    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        return v

    doc = {"results": [clean(dict(r)) for r in rows],
           "failures": [{"pair": n, "error": e} for n, e in failures]}
    json_path = atomic_write_text(save_dir / "metrics.json", json.dumps(doc, indent=1) + "\n")
    return csv_path, json_path
