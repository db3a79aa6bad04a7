"""The outputs of an evaluation: ``evaluation.csv`` (long format), ``summary.md`` (mean ± std per
pair kind × align × rotation) and ``dice_vs_rotation.png``."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_path, atomic_write_text
from .protocol import EvaluationResult

__all__ = ["CSV_COLUMNS", "format_evaluation_summary", "write_outputs"]

#: Columns of ``evaluation.csv`` (long format: one value per row).
CSV_COLUMNS = ["pair", "kind", "moving", "fixed", "moving_modality", "fixed_modality", "rotation_deg",
               "axis_x", "axis_y", "axis_z", "translation_x", "translation_y", "translation_z", "scale",
               "align", "metric", "value"]


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def _stats(values: Sequence[float]) -> tuple[float, float, int]:
    vals = [v for v in values if math.isfinite(v)]
    if not vals:
        return float("nan"), float("nan"), 0
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals))
    return mean, std, len(vals)


def _grouped(rows: Sequence[dict[str, Any]], metric: str) -> dict[tuple[str, str, float], list[float]]:
    out: dict[tuple[str, str, float], list[float]] = {}
    for r in rows:
        if r["metric"] == metric:
            out.setdefault((r["kind"], r["align"], float(r["rotation_deg"])), []).append(float(r["value"]))
    return out


def format_evaluation_summary(result: EvaluationResult) -> str:
    """Markdown tables: per metric, one row per (pair kind, align), one column per rotation angle
    (``mean ± std``, over pairs), plus the spread of the means over the angles."""
    s = result.settings
    rows = result.rows
    rotations = s["rotations"]
    aligns = ["none", *s["aligns"]]
    lines = ["# keyreg evaluate", ""]
    axis = "random unit axis per (pair, angle)" if s["axis"] is None else f"axis {s['axis']}"
    lines += [f"- model: {s['model']}; device {s['device']}",
              f"- images: {s['images']}; pairs: {s['pairs']} ({', '.join(s['kinds'])})",
              f"- perturbation ({s['mode']} mode): rotation {', '.join(f'{r:g}' for r in rotations)} degrees "
              f"about a {axis}, translation ±{s['translation_mm']:g} mm, scaling ±{s['scaling']:g}; seed {s['seed']}",
              f"- network passes: {result.network_passes}; failed tasks: {len(result.failures)}"]
    if s.get("synthesizer"):
        lines.append(f"- synthetic contrasts: {s['synthesizer']}")
    if result.timings:
        lines.append("- time per stage: " + ", ".join(f"{k} {v:.2f} s" for k, v in result.timings.items()))
    lines.append("- `none` = before registration; values are mean ± std over pairs (n = pairs)")
    for metric in s["metrics"]:
        groups = _grouped(rows, metric)
        lines += ["", f"## {metric}", "",
                  "| pair kind | align | " + " | ".join(f"{r:g}°" for r in rotations) + " | max − min of means |",
                  "|---|---|" + "---|" * len(rotations) + "---|"]
        for kind in s["kinds"]:
            for align in aligns:
                cells, means = [], []
                for rot in rotations:
                    mean, std, n = _stats(groups.get((kind, align, rot), []))
                    if n == 0:
                        cells.append("n/a")
                        continue
                    means.append(mean)
                    cells.append(f"{mean:.4f} ± {std:.4f} (n={n})")
                spread = f"{max(means) - min(means):.4f}" if len(means) > 1 else "n/a"
                lines.append(f"| {kind} | {align} | " + " | ".join(cells) + f" | {spread} |")
    if result.failures:
        lines += ["", "## failures", ""] + [f"- {t}: {m}" for t, m in result.failures]
    return "\n".join(lines) + "\n"


def _plot(result: EvaluationResult, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    s = result.settings
    metric = next((m for m in ("harddice", "softdice") if m in s["metrics"]), s["metrics"][0])
    groups = _grouped(result.rows, metric)
    kinds = s["kinds"] or ["(none)"]
    fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 4), squeeze=False, sharey=True)
    rot = np.asarray(s["rotations"], dtype=float)
    for ax, kind in zip(axes[0], kinds):
        for align in ["none", *s["aligns"]]:
            stats = [_stats(groups.get((kind, align, r), [])) for r in rot]
            mean = np.array([m for m, _, _ in stats])
            std = np.array([d for _, d, _ in stats])
            ax.errorbar(rot, mean, yerr=std, marker="o", capsize=3, label=align,
                        linestyle="--" if align == "none" else "-")
        ax.set_title(kind.replace("_", " "))
        ax.set_xlabel("rotation (degrees)")
        ax.set_xticks(rot)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"{metric} (mean ± std over pairs)")
    axes[0][-1].legend(loc="best", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path


def write_outputs(result: EvaluationResult, save_dir: str | Path) -> dict[str, Path]:
    """Write ``evaluation.csv``, ``summary.md`` and ``dice_vs_rotation.png`` (atomically)."""
    save_dir = Path(save_dir)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for r in result.rows:
        writer.writerow([_fmt(r[c]) for c in CSV_COLUMNS])
    paths = {"csv": atomic_write_text(save_dir / "evaluation.csv", buf.getvalue()),
             "summary": atomic_write_text(save_dir / "summary.md", format_evaluation_summary(result))}
    paths["plot"] = _plot(result, save_dir / "dice_vs_rotation.png")
    return paths
