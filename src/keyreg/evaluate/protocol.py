"""The evaluation loop: every pair under every perturbation, every align, through one
:class:`keyreg.pipeline.Registrar` (keypoints cached per image and perturbation)."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, failure_message
from ..pairing import PAIR_KINDS
from .datasets import EvalImage
from .pairs import EvalPair
from .perturbations import PerturbMode, draw_perturbation, perturb

__all__ = ["EvaluationResult", "evaluate"]


@dataclass
class EvaluationResult:
    """Everything :func:`evaluate` measured.

    Attributes:
        rows: one dict per (pair, perturbation, align, metric) with the keys of :data:`keyreg.evaluate.report.CSV_COLUMNS`.
        failures: ``(task, message)`` for tasks that raised (any exception: :func:`keyreg.errors.failure_message`).
        timings: seconds per stage, summed over tasks.
        network_passes: images run through the network (one per image and perturbation).
        settings: what was evaluated (for the summary).
    """

    rows: list[dict[str, Any]]
    failures: list[tuple[str, str]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    network_passes: int = 0
    settings: dict[str, Any] = field(default_factory=dict)


def evaluate(
    images: Sequence[EvalImage],
    pairs: Sequence[EvalPair],
    *,
    model: Any,
    aligns: Sequence[str] = ("rigid", "affine", "tps_0"),
    metrics: Sequence[str] = ("harddice",),
    rotations: Sequence[float] = (0, 45, 90, 135, 180),
    axis: Sequence[float] | None = None,
    translation: float = 0.0,
    scaling: float = 0.0,
    seed: int = 0,
    mode: PerturbMode = "auto",
    device: str | torch.device | None = None,
    use_amp: bool = False,
    weighted: bool | None = None,
    label_interp: str = "nearest",
    field_stride: int | None = None,
    orientation_search: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> EvaluationResult:
    """Register every pair under every perturbation with every align and measure ``metrics``.

    Args:
        images, pairs: from the ``images_from_*`` loaders and :func:`make_pairs`.
        model: a :class:`~keyreg.models.KeypointDetector`, a model file or bundled name
            (``None`` = the bundled default).
        rotations: angles in degrees; each (pair, angle) gets its own perturbation
            (:func:`draw_perturbation`).
        mode: ``"header"``, ``"resample"`` or ``"auto"`` (see the module docstring).
        orientation_search: ``always``, ``auto`` or ``off`` for an anatomical model (``None``: the model's).
        progress: show a progress bar (tqdm, on stderr).
        log: called with one line per finished task (default: nothing).

    Returns:
        An :class:`EvaluationResult`.
    """
    from tqdm import tqdm

    from ..metrics import METRICS, parse_metrics
    from ..pipeline import Registrar, RegistrationOptions
    from ..transforms import DEFAULT_FIELD_STRIDE

    options = RegistrationOptions(aligns=tuple(aligns), weighted=weighted, label_interp=label_interp,
                                  field_stride=DEFAULT_FIELD_STRIDE if field_stride is None else field_stride,
                                  use_amp=use_amp, orientation_search=orientation_search)
    align_names = list(options.aligns)
    metric_names = parse_metrics(list(metrics))
    if not rotations:
        raise ConfigError("at least one rotation angle is needed")
    rotations = [float(r) for r in dict.fromkeys(float(r) for r in rotations)]
    if not all(math.isfinite(r) for r in rotations):
        raise ConfigError(f"rotation angles must be finite, got {rotations}")
    if not pairs:
        raise ConfigError("no pairs to evaluate")
    # validate perturbation options before any work
    draw_perturbation(seed, "check", 0.0, axis=axis, translation=translation, scaling=scaling)
    registrar = Registrar(model, device=device, options=options)
    dev = registrar.device
    net = registrar.model
    grid_mode = net.config.preprocessing.grid.mode
    if mode == "auto":
        mode = "resample" if grid_mode == "fov" else "header"
    if mode not in ("header", "resample"):
        raise ConfigError(f"unknown perturbation mode {mode!r}: use auto, header or resample")

    need_image = any(METRICS[m] == "image" for m in metric_names)
    timer = registrar.timer
    rows: list[dict[str, Any]] = []
    failures: list[tuple[str, str]] = []
    tasks = [(pair, angle) for pair in pairs for angle in rotations]
    bar = tqdm(tasks, desc="evaluate", unit="task", file=sys.stderr, dynamic_ncols=True, disable=not progress)
    for pair, angle in bar:
        mov, fix = images[pair.moving], images[pair.fixed]
        pair_name = f"{mov.name}_to_{fix.name}"
        task = f"{pair_name} rot{angle:g}"
        start = time.perf_counter()
        try:
            pert = draw_perturbation(seed, pair_name, angle, axis=axis, translation=translation, scaling=scaling)
            with timer("perturb"):
                moving, moving_seg, p = perturb(mov.image, mov.seg, pert, mode, dev)
            # keypoints are cached per image and perturbation; the image is resampled only for image metrics
            reg = registrar.register(moving, fix.image, moving_seg=moving_seg, fixed_seg=fix.seg,
                                     fixed_key=(pair.fixed, np.eye(4).tobytes()),
                                     moving_key=(pair.moving, np.round(p, 9).tobytes()), warp=False)
            # align by align: warp, measure, drop (one align's full-grid arrays at a time)
            # first "none": the same metrics before registration
            results = registrar.stream(reg, metric_names, image=need_image, seg=True, before=metric_names)
        except Exception as e:  # noqa: BLE001 - one bad task is recorded; the evaluation goes on
            failures.append((task, failure_message(e)))
            bar.write(f"FAILED {task}: {failure_message(e)}", file=sys.stderr)
            continue
        base = {"pair": pair_name, "kind": pair.kind, "moving": mov.name, "fixed": fix.name,
                "moving_modality": mov.modality, "fixed_modality": fix.modality, "rotation_deg": angle,
                "axis_x": pert.axis[0], "axis_y": pert.axis[1], "axis_z": pert.axis[2],
                "translation_x": pert.translation[0], "translation_y": pert.translation[1],
                "translation_z": pert.translation[2], "scale": pert.scale}
        for align in ["none", *align_names]:
            for m in metric_names:
                rows.append({**base, "align": align, "metric": m, "value": float(results[align][m])})
        if log is not None:
            first = metric_names[0]
            log(f"{task} ({time.perf_counter() - start:.1f} s)  " +
                " ".join(f"{a}={results[a][first]:.4f}" for a in ["none", *align_names]))
    bar.close()
    passes = registrar.network_passes
    settings = {"images": len(images), "pairs": len(pairs), "rotations": rotations, "aligns": align_names,
                "metrics": metric_names, "axis": None if axis is None else [float(a) for a in axis],
                "translation_mm": translation, "scaling": scaling, "seed": seed, "mode": mode,
                "model": f"{net.config.name} ({net.config.architecture.describe()}, {grid_mode} grid)",
                "device": str(dev), "kinds": sorted({p.kind for p in pairs}, key=PAIR_KINDS.index)}
    return EvaluationResult(rows, failures, dict(timer.seconds), passes, settings)
