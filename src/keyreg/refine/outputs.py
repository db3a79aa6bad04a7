"""Refine the alignments of a :class:`~keyreg.results.Registration` and write them like keyreg's aligns.

``refine_registration(reg, "deformable")`` refines every keypoint alignment of ``reg`` (or the ones
named) and returns one :class:`RefinedAlignment` per start, named ``<align>+<stage>`` (e.g.
``affine+deformable``).  :meth:`RefinedAlignment.save` writes, into ``<pair>/<align>+<stage>/``:

* ``warp.nii.gz``: the full displacement field ``T(p) - p`` on the fixed grid (ITK/ANTs, LPS), so
  ``keyreg apply x -t <pair>/<align>+<stage>``, ``antsApplyTransforms`` and SimpleITK read it;
* ``inverse_warp.nii.gz``: ``T^-1`` on the MOVING grid (``exp(-v)`` for the deformable part);
* ``transform_matrix.txt`` / ``transform.tfm``: when the result is linear (affine refinement of an
  affine start);
* ``warped.nii.gz``, ``warped_seg.nii.gz``; ``refine.json``: the report (losses, Dice before/after,
  iterations, time, whether the safeguard kept the start) and the Jacobian statistics.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, OutputError
from ..io import Volume, atomic_write_text, save_volume
from ..metrics import jacobian_determinant
from ..transforms import AffineTransform, DisplacementField, sample_field
from ..warp import warp_image, warp_labels
from .run import STAGES, RefinedTransform, RefineOptions, RefineResult, inverse_field, refine_transform

__all__ = ["RefinedAlignment", "refine_registration"]


@dataclass
class RefinedAlignment:
    """One refined alignment: ``name`` ``<start>+<stage>``, the :class:`RefineResult`, the images and
    the warped moving image / segmentation on the fixed grid, and ``metrics`` (Jacobian statistics
    of the full transform on the fixed grid, the refinement's report values)."""

    name: str
    start: str
    result: RefineResult
    fixed: Volume
    moving: Volume
    warped: Volume | None = None
    warped_seg: Volume | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    _field: DisplacementField | None = field(default=None, repr=False)

    @property
    def transform(self) -> Any:
        return self.result.transform

    def dense_transform(self) -> AffineTransform | DisplacementField:
        """The transform on the fixed grid: a matrix when linear, else the full displacement field."""
        t = self.transform
        if isinstance(t, AffineTransform):
            return t
        if isinstance(t, RefinedTransform) and t.linear_matrix is not None:
            return AffineTransform(torch.from_numpy(t.linear_matrix)[None])
        if self._field is None:
            self._field = sample_field(t, self.fixed.shape, self.fixed.affine, stride=1)
        return self._field

    def save(self, directory: str | Path, *, write_images: bool = True) -> dict[str, Path]:
        """Write the files listed in the module docstring into ``directory``; returns name -> path."""
        from ..formats import write_displacement_field, write_itk_affine, write_matrix_txt

        d = Path(directory)
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"{d}: cannot create output directory ({e.strerror or e})") from None
        out: dict[str, Path] = {}
        dense = self.dense_transform()
        if isinstance(dense, AffineTransform):
            m = dense.matrix[0].double().numpy()
            out["matrix"] = Path(write_matrix_txt(d / "transform_matrix.txt", m))
            out["itk"] = Path(write_itk_affine(d / "transform.tfm", m))
            full = sample_field(dense, self.fixed.shape, self.fixed.affine, stride=1)
        else:
            full = dense
        out["warp"] = Path(write_displacement_field(d / "warp.nii.gz", full.displacement[0].permute(1, 2, 3, 0).numpy(),
                                                    self.fixed.affine, header=self.fixed.header))
        t = self.transform
        if isinstance(t, RefinedTransform):
            inv = inverse_field(t, self.moving)
            out["inverse_warp"] = Path(write_displacement_field(
                d / "inverse_warp.nii.gz", inv.displacement[0].permute(1, 2, 3, 0).numpy(), self.moving.affine,
                header=self.moving.header))
        if write_images and self.warped is not None:
            out["warped"] = save_volume(self.warped.data, self.fixed, d / "warped.nii.gz")
        if write_images and self.warped_seg is not None:
            out["warped_seg"] = save_volume(self.warped_seg.data, self.fixed, d / "warped_seg.nii.gz")
        doc = {"name": self.name, "start": self.start, "metrics": self.metrics, "report": self.result.report}
        out["report"] = atomic_write_text(d / "refine.json", json.dumps(doc, indent=1, default=float) + "\n")
        return out


def _jacobian_stats(dense) -> dict[str, float]:
    if isinstance(dense, AffineTransform):
        det = float(np.linalg.det(dense.matrix[0, :3, :3].double().numpy()))
        return {"jdstd": 0.0, "jdlessthan0": float(det <= 0), "jdmin": det}
    det = jacobian_determinant(dense)
    return {"jdstd": float(det.std()), "jdlessthan0": float(np.mean(det <= 0)), "jdmin": float(det.min())}


def refine_registration(reg: Any, stage: str = "deformable", *, aligns: list[str] | None = None,
                        options: RefineOptions | None = None, fixed_mask: Any = None,
                        device: torch.device | str | None = None, warp: bool = True) -> dict[str, RefinedAlignment]:
    """Refine alignments of a registration (:func:`keyreg.register` / ``Registrar.register``).

    Args:
        reg: a :class:`~keyreg.results.Registration`.
        stage: ``"affine"`` or ``"deformable"``.
        aligns: names of the keypoint alignments to start from (default: all of them).
        options: :class:`RefineOptions` (similarity, iterations, regularisation, time budget, progress).
        fixed_mask: optional fixed-grid mask (path, Volume, ...) limiting the similarity.
        device: where to optimise (default CPU).
        warp: resample the moving image and segmentation through the refined transforms.

    Returns:
        ``{"<align>+<stage>": RefinedAlignment}``.  The segmentations of ``reg``, when present, drive
        the safeguard (Dice may not drop by more than ``options.dice_tolerance``).
    """
    from ..io import load_volume

    if stage not in STAGES:
        raise ConfigError(f"unknown refinement {stage!r}: use {' or '.join(STAGES)}")
    names = list(reg.results) if aligns is None else [reg[a].name for a in aligns]
    mask = None if fixed_mask is None else load_volume(fixed_mask, kind="labels")
    out: dict[str, RefinedAlignment] = {}
    for name in names:
        res = reg.results[name]
        rr = refine_transform(reg.fixed, reg.moving, res.transform, stage=stage, options=options,  # type: ignore[arg-type]
                              fixed_mask=mask, fixed_seg=reg.fixed_seg, moving_seg=reg.moving_seg, device=device)
        ra = RefinedAlignment(f"{name}+{stage}", name, rr, reg.fixed, reg.moving)
        dense = ra.dense_transform()
        if warp:
            src = reg.moving.tensor().float()
            ra.warped = reg.fixed.with_data(
                warp_image(src, reg.moving.affine, reg.fixed.shape, reg.fixed.affine, dense)[0, 0].numpy(),
                name=f"{reg.moving.name}_{ra.name}")
            if reg.moving_seg is not None:
                seg = warp_labels(reg.moving_seg.tensor()[:, 0], reg.moving.affine, reg.fixed.shape,
                                  reg.fixed.affine, dense)[0].numpy()
                ra.warped_seg = reg.fixed.with_data(seg, kind="labels", name=f"{reg.moving.name}_{ra.name}_seg")
        ra.metrics.update(_jacobian_stats(dense))
        ra.metrics["kept_start"] = rr.kept_start
        for k in ("dice_start", "dice_end", "similarity_start", "similarity_end", "seconds"):
            if k in rr.report:
                ra.metrics[f"refine_{k}"] = rr.report[k]
        out[ra.name] = ra
    return out
