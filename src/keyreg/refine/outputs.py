"""Refined alignments of a :class:`~keyreg.results.Registration` and their files.

:func:`refine_registration` refines keypoint alignments of a registration and returns one
:class:`RefinedAlignment` per start, named ``<align>+<stage>`` (e.g. ``affine+deformable``).  The
pipeline's ``refine`` stage (:meth:`keyreg.pipeline.Registrar.refine`) calls it and adds them to the
registration, whose ``warp``, ``measure`` and ``save`` stages then treat them like keypoint aligns.
:meth:`RefinedAlignment.save` writes, into ``<pair>/<align>+<stage>/``:

* ``warp.nii.gz``: the full displacement field ``T(p) - p`` on the fixed grid (ITK/ANTs, LPS), so
  ``keyreg apply x -t <pair>/<align>+<stage>``, ``antsApplyTransforms`` and SimpleITK read it;
* ``inverse_warp.nii.gz``: ``T^-1`` on the MOVING grid (``exp(-v)`` for the deformable part;
  ``keyreg invert`` on the directory uses it, ``keyreg apply -t .../inverse_warp.nii.gz`` pulls
  fixed-space images onto the moving grid);
* ``transform_matrix.txt`` / ``transform.tfm`` / ``transform_0GenericAffine.mat`` / ``transform.lta``:
  when the result is linear (affine refinement of a rigid or affine start, or a kept affine start);
* ``warped.nii.gz``, ``warped_seg.nii.gz``, ``keypoints_aligned.csv`` / ``.mrk.json`` (the moving
  keypoints through ``T^-1``), ``qc.png`` (``visualize``);
* ``refine.json``: the report (losses, Dice before/after, iterations, time, whether the safeguard
  kept the start), the Jacobian statistics of the full transform on the fixed grid, the metrics.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic import atomic_write_text
from ..errors import ConfigError, OutputError
from ..io import Volume, load_volume, save_volume
from ..metrics import jacobian_determinant
from ..transforms import AffineTransform, DisplacementField, map_to_fixed, sample_field
from .run import (
    STAGES,
    RefinedTransform,
    RefineOptions,
    RefineResult,
    check_fixed_mask,
    inverse_field,
    refine_transform,
    refined_name,
)

__all__ = ["RefinedAlignment", "refine_registration", "safeguard_note"]


@dataclass
class RefinedAlignment:
    """One refined alignment, shaped like :class:`~keyreg.results.AlignmentResult` for the pipeline's
    warp, measure and save stages.

    Attributes:
        name: ``<start>+<stage>``.
        start: the name of the keypoint alignment it started from.
        result: the :class:`RefineResult` (transform, whether the safeguard kept the start, report).
        fixed, moving: the two images (original grids).
        start_result: the keypoint :class:`~keyreg.results.AlignmentResult` (its keypoints go into
            ``keypoints_aligned`` and the QC figure), or ``None``.
        warped, warped_seg: the moving image / segmentation on the fixed grid (the warp stage).
        metrics: metric name -> value (the measure stage; plus :meth:`refine_metrics`).
    """

    name: str
    start: str
    result: RefineResult
    fixed: Volume
    moving: Volume
    start_result: Any = None
    warped: Volume | None = None
    warped_seg: Volume | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    _field: DisplacementField | None = field(default=None, repr=False)

    @property
    def transform(self) -> Any:
        """``moving_from_fixed``: a :class:`RefinedTransform`, or the start when the safeguard kept it."""
        return self.result.transform

    @property
    def kept_start(self) -> bool:
        return self.result.kept_start

    @property
    def matrix(self) -> np.ndarray | None:
        """``(4, 4)`` world RAS matrix fixed -> moving when the result is linear, else ``None``."""
        t = self.transform
        if isinstance(t, AffineTransform):
            return t.matrix[0].detach().cpu().double().numpy()
        if isinstance(t, RefinedTransform):
            return t.linear_matrix
        return None

    def dense_transform(self) -> AffineTransform | DisplacementField:
        """The transform on the fixed grid: a matrix when linear, else the full displacement field
        (every voxel; computed once, on the transform's device)."""
        m = self.matrix
        if m is not None:
            return AffineTransform(torch.from_numpy(m)[None])
        if self._field is None:
            t = self.transform
            dev = t.device if isinstance(t, RefinedTransform) else None
            if isinstance(t, DisplacementField) and t.shape == tuple(self.fixed.shape):
                self._field = t
            else:
                self._field = sample_field(t, self.fixed.shape, self.fixed.affine, stride=1, device=dev)
        return self._field

    def refine_metrics(self) -> dict[str, Any]:
        """Values the refinement adds to its metric row: ``refine_kept_start`` (1 when the safeguard
        kept the start, so its mean over pairs is the fraction kept), ``refine_seconds``, and
        ``refine_safeguard`` (text, only when there is something to say: why the start was kept, or a
        Dice drop the image measures did not catch; the console prints it)."""
        report = self.result.report
        out: dict[str, Any] = {"refine_kept_start": int(self.kept_start), "refine_seconds": float(report["seconds"])}
        note = safeguard_note(report)
        if note:
            out["refine_safeguard"] = note
        return out

    def inverse(self) -> DisplacementField:
        """``T^-1`` on the moving grid (:func:`~keyreg.refine.run.inverse_field`; a kept start is
        inverted like a refinement with no correction)."""
        t = self.transform
        if not isinstance(t, RefinedTransform):
            t = RefinedTransform(t, np.eye(4))
        return inverse_field(t.to("cpu"), self.moving)

    def save(self, directory: str | Path, *, write_images: bool = True, visualize: bool = False) -> dict[str, Path]:
        """Write the files listed in the module docstring into ``directory``; returns name -> path."""
        from ..export import save_keypoints, save_linear
        from ..formats import write_displacement_field

        d = Path(directory)
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"{d}: cannot create output directory ({e.strerror or e})") from None
        out: dict[str, Path] = {}
        dense = self.dense_transform()
        m = self.matrix
        if m is not None:
            out.update(save_linear(d, m, self.fixed, self.moving))
        full = sample_field(dense, self.fixed.shape, self.fixed.affine, stride=1) \
            if isinstance(dense, AffineTransform) else dense
        out["warp"] = Path(write_displacement_field(
            d / "warp.nii.gz", full.displacement[0].permute(1, 2, 3, 0).cpu().numpy(), self.fixed.affine,
            header=self.fixed.header))
        inv = self.inverse()
        out["inverse_warp"] = Path(write_displacement_field(
            d / "inverse_warp.nii.gz", inv.displacement[0].permute(1, 2, 3, 0).numpy(), self.moving.affine,
            header=self.moving.header))
        if write_images and self.warped is not None:
            out["warped"] = save_volume(self.warped.data, self.fixed, d / "warped.nii.gz")
        if write_images and self.warped_seg is not None:
            out["warped_seg"] = save_volume(self.warped_seg.data, self.fixed, d / "warped_seg.nii.gz")
        aligned = None
        sr = self.start_result
        if sr is not None:
            pts = torch.as_tensor(np.asarray(sr.moving_keypoints), dtype=torch.float64)[None]
            aligned = map_to_fixed(dense.to("cpu"), pts)[0][0].numpy()
            out.update(save_keypoints(d, "keypoints_aligned", aligned, sr.weights, sr.keypoint_names))
        if visualize and self.warped is not None:
            from ..viz import save_qc_figure

            out["qc"] = Path(save_qc_figure(
                d / "qc.png", self.fixed, self.moving, self.warped,
                fixed_keypoints=None if sr is None else sr.fixed_keypoints,
                moving_keypoints=None if sr is None else sr.moving_keypoints, aligned_keypoints=aligned,
                title=f"{self.moving.name} -> {self.fixed.name}  [{self.name}]"))
        doc = {"name": self.name, "start": self.start, "kept_start": self.kept_start,
               "jacobian": _jacobian_stats(dense), "metrics": _plain(self.metrics), "report": self.result.report}
        out["report"] = atomic_write_text(d / "refine.json", json.dumps(doc, indent=1, default=float) + "\n")
        return out


def safeguard_note(report: dict[str, Any]) -> str:
    """One line on what the safeguard did, from a refinement report (``""``: nothing to say)."""
    if report.get("kept_start"):
        return f"start kept: {report.get('reason', '')}"
    if report.get("dice_drop_missed"):
        return (f"Dice fell {report['dice_start']:.4f} -> {report['dice_end']:.4f} although the image "
                f"measures improved (not caught)")
    return ""


def _plain(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool)) or v is None}


def _jacobian_stats(dense) -> dict[str, float]:
    """``jdstd``, ``jdlessthan0`` (fraction of fixed voxels with det <= 0) and ``jdmin`` of the full transform."""
    if isinstance(dense, AffineTransform):
        det = float(np.linalg.det(dense.matrix[0, :3, :3].double().cpu().numpy()))
        return {"jdstd": 0.0, "jdlessthan0": float(det <= 0), "jdmin": det}
    det = jacobian_determinant(dense)
    return {"jdstd": float(det.std()), "jdlessthan0": float(np.mean(det <= 0)), "jdmin": float(det.min())}


def refine_registration(reg: Any, stage: str = "deformable", *, aligns: list[str] | None = None,
                        options: RefineOptions | None = None, fixed_mask: Any = None,
                        device: torch.device | str | None = None) -> dict[str, RefinedAlignment]:
    """Refine keypoint alignments of a registration (``Registrar.register`` / :func:`keyreg.register`).

    The pipeline's ``refine`` stage (``RegistrationOptions(refine=...)``) calls this and adds the
    results to the registration; called directly, the results are returned only (warp them with
    ``Registrar.warp`` after adding them to ``reg.results``, or use :meth:`RefinedAlignment.dense_transform`).

    Args:
        reg: a :class:`~keyreg.results.Registration`.
        stage: ``"affine"`` or ``"deformable"``.
        aligns: names of the keypoint alignments to start from (default: all of them).
        options: :class:`RefineOptions` (similarity, iterations, regularisation, time budget, progress).
        fixed_mask: fixed-grid mask (path, Volume, ...) limiting the similarity (default: ``reg.fixed_mask``).
        device: where to optimise (default CPU).

    Returns:
        ``{"<align>+<stage>": RefinedAlignment}``.  The safeguard decides from the images; the
        segmentations of ``reg``, when present, add the Dice before and after to the report.
    """
    if stage not in STAGES:
        raise ConfigError(f"unknown refinement {stage!r}: use {' or '.join(STAGES)}")
    names = [n for n in reg.results if "+" not in n] if aligns is None else [reg[a].name for a in aligns]
    mask = getattr(reg, "fixed_mask", None) if fixed_mask is None else load_volume(fixed_mask, kind="labels")
    if mask is not None:
        check_fixed_mask(mask, reg.fixed)
    out: dict[str, RefinedAlignment] = {}
    for name in names:
        res = reg.results[name]
        rr = refine_transform(reg.fixed, reg.moving, res.transform, stage=stage, options=options,  # type: ignore[arg-type]
                              fixed_mask=mask, fixed_seg=reg.fixed_seg, moving_seg=reg.moving_seg, device=device)
        ra = RefinedAlignment(refined_name(name, stage), name, rr, reg.fixed, reg.moving, start_result=res)
        out[ra.name] = ra
    return out
