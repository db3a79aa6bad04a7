"""The save stage: a registration's outputs on disk (layout in the README, "Output layout").

Per pair directory::

    keypoints_fixed.csv / .mrk.json      fixed keypoints, world (CSV: RAS, Slicer: LPS)
    keypoints_moving.csv / .mrk.json     moving keypoints
    <align>/warped.nii.gz                moving image on the fixed grid (fixed header)
    <align>/warped_seg.nii.gz            moving segmentation on the fixed grid (if given)
    <align>/keypoints_aligned.csv/.mrk.json   moving keypoints mapped into the fixed space
    <align>/transform_matrix.txt         rigid/affine: 4x4 RAS, fixed -> moving
    <align>/transform.tfm                rigid/affine: ITK (LPS), fixed -> moving
    <align>/transform_0GenericAffine.mat rigid/affine: ANTs
    <align>/transform.lta                rigid/affine: FreeSurfer (moving -> fixed RAS)
    <align>/warp.nii.gz                  TPS: ITK/ANTs displacement field on the fixed grid
    <align>/tps.json                     TPS: keypoint pairs, lambda, weights, normalisation
    <align>/keypoint_residuals.csv       per keypoint: residual and leave-one-out error (mm), weight, used
    <align>/qc.png                       with visualize=True
    residuals.png                        with visualize=True: residuals of every align (for report.html)
    <align>+<stage>/                     a refined align (keyreg.refine.outputs): warp.nii.gz,
                                         inverse_warp.nii.gz, refine.json, warped images, QC

Every file is written atomically (temporary name, then rename).  Keypoint files are labelled with the
model's keypoint names (``K-1 .. K-N`` for unnamed models).  This module depends on the result types
only through their attributes (no import of :mod:`keyreg.results` at run time).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import OutputError
from .io import save_volume

if TYPE_CHECKING:
    from .io import Volume
    from .results import AlignmentResult, Registration

__all__ = ["save_alignment", "save_linear", "save_registration", "save_keypoints", "tps_to_dict", "save_pair_keypoints",
           "save_pair_alignment", "save_pair_residual_plot"]


def save_keypoints(directory: Path, stem: str, points: np.ndarray,
                   weights: np.ndarray | None = None, names: list[str] | None = None,
                   excluded: list[str] | None = None) -> dict[str, Path]:
    """``stem.csv`` (RAS) and ``stem.mrk.json`` (Slicer, LPS) for ``(K, 3)`` world points, labelled
    with ``names`` (default ``K-1 .. K-N``); the names in ``excluded`` (left out of the fits) are
    written unselected (CSV ``selected`` 0, Slicer's check box unticked), so that a refit from the
    files leaves them out too."""
    from .formats import write_markups_json, write_points_csv

    labels = [f"K-{i + 1}" for i in range(len(points))] if names is None else list(names)
    if weights is not None and len(weights) != len(points):
        weights = None
    left_out = set(excluded or ())
    selected = [lab not in left_out for lab in labels] if left_out else None
    csv = write_points_csv(directory / f"{stem}.csv", points, labels=labels, weights=weights, selected=selected)
    mrk = write_markups_json(directory / f"{stem}.mrk.json", points, labels=labels, selected=selected)
    return {f"{stem}_csv": Path(csv), f"{stem}_mrk": Path(mrk)}


def tps_to_dict(res: "AlignmentResult") -> dict:
    """Everything needed to rebuild a TPS exactly: keypoint pairs (world RAS), lambda, weights and
    the normalisation (centre, scale); plus the grids of both images (``shape``, RAS ``affine``), so
    that ``keyreg apply`` / ``keyreg invert`` know the default output grid
    (:func:`keyreg.formats.tps.tps_document`)."""
    from .formats.tps import grid_document, tps_document

    tps = res.transform
    return tps_document(
        lmbda=res.spec.lmbda, center=tps.center[0].detach().cpu().numpy(), scale=float(tps.scale[0]),
        fixed_keypoints=res.fixed_keypoints, moving_keypoints=res.moving_keypoints, weights=res.weights,
        keypoint_names=res.keypoint_names,
        fixed_grid=grid_document(res.fixed.name, res.fixed.shape, res.fixed.affine),
        moving_grid=grid_document(res.moving.name, res.moving.shape, res.moving.affine))


def save_linear(directory: Path, matrix: np.ndarray, fixed: "Volume", moving: "Volume") -> dict[str, Path]:
    """A ``(4, 4)`` RAS matrix (fixed -> moving) in every linear format: ``transform_matrix.txt``,
    ``transform.tfm`` (ITK), ``transform_0GenericAffine.mat`` (ANTs), ``transform.lta`` (FreeSurfer)."""
    from .formats import write_ants_mat, write_itk_affine, write_lta, write_matrix_txt

    return {"matrix": Path(write_matrix_txt(directory / "transform_matrix.txt", matrix)),
            "itk": Path(write_itk_affine(directory / "transform.tfm", matrix)),
            "ants": Path(write_ants_mat(directory / "transform_0GenericAffine.mat", matrix)),
            "lta": Path(write_lta(directory / "transform.lta", matrix, moving.shape, moving.affine, fixed.shape,
                                  fixed.affine, moving_name=moving.name, fixed_name=fixed.name))}


def save_alignment(res: "AlignmentResult", directory: Path, *, write_images: bool = True,
                   visualize: bool = False) -> dict[str, Path]:
    """Write one alignment's files into ``directory`` (created if needed)."""
    from .formats import write_displacement_field

    out: dict[str, Path] = {}
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{directory}: cannot create output directory ({e.strerror or e})") from None
    if write_images and res.warped is not None:
        out["warped"] = save_volume(res.warped.data, res.fixed, directory / "warped.nii.gz")
    if write_images and res.warped_seg is not None:
        out["warped_seg"] = save_volume(res.warped_seg.data, res.fixed, directory / "warped_seg.nii.gz")
    aligned = res.aligned_keypoints
    out.update(save_keypoints(directory, "keypoints_aligned", aligned, res.weights, res.keypoint_names))
    matrix = res.matrix
    if matrix is not None:
        out.update(save_linear(directory, matrix, res.fixed, res.moving))
    else:
        out["warp"] = Path(write_displacement_field(directory / "warp.nii.gz", res.displacement(),
                                                    res.fixed.affine, header=res.fixed.header))
        from .formats.tps import write_tps_json

        out["tps"] = Path(write_tps_json(directory / "tps.json", tps_to_dict(res)))
    from .qc import write_residuals_csv

    resid = res.keypoint_residuals()
    names = res.keypoint_names or [f"K-{i + 1}" for i in range(len(res.fixed_keypoints))]
    out["residuals"] = write_residuals_csv(directory / "keypoint_residuals.csv", names, resid["residual"],
                                           resid["loo"], res.weights,
                                           None if res.weights is None else np.asarray(res.weights) > 0)
    if visualize and res.warped is not None:
        from .viz import save_qc_figure

        out["qc"] = Path(save_qc_figure(
            directory / "qc.png", res.fixed, res.moving, res.warped,
            fixed_keypoints=res.fixed_keypoints, moving_keypoints=res.moving_keypoints,
            aligned_keypoints=aligned, title=f"{res.moving.name} -> {res.fixed.name}  [{res.name}]"))
    return out


def save_registration(reg: "Registration", directory: Path, *, write_images: bool = True,
                      visualize: bool = False) -> dict[str, Path]:
    """Write the keypoints of both images and every alignment (one sub-directory per align).

    The same files as :func:`save_pair_keypoints`, then :func:`save_pair_alignment` for every
    align, then (``visualize``) :func:`save_pair_residual_plot`: a pipeline that streams align by
    align (:meth:`keyreg.pipeline.Registrar.stream`) calls those three itself."""
    out = save_pair_keypoints(reg, directory)
    for res in reg:
        out.update(save_pair_alignment(res, directory, write_images=write_images, visualize=visualize))
    if visualize:
        out.update(save_pair_residual_plot(reg, directory))
    return out


def save_pair_keypoints(reg: "Registration", directory: Path) -> dict[str, Path]:
    """The keypoints of both images (``keypoints_fixed`` / ``keypoints_moving``, CSV and Slicer)."""
    out: dict[str, Path] = {}
    weights = reg.weights
    names = list(reg.fixed_keypoints.names)
    if weights is not None and reg.excluded_keypoints and len(weights) != len(names):
        # the fit weights cover the keypoints the fits used; those left out get 0 (and are unselected)
        left_out = set(reg.excluded_keypoints)
        kept = [n not in left_out for n in names]
        full = np.zeros(len(names))
        full[np.flatnonzero(kept)] = weights
        weights = full
    for stem, kp in (("keypoints_fixed", reg.fixed_keypoints), ("keypoints_moving", reg.moving_keypoints)):
        out.update(save_keypoints(directory, stem, kp.numpy(), weights, kp.names, reg.excluded_keypoints))
    return out


def save_pair_alignment(res, directory: Path, *, write_images: bool = True,
                        visualize: bool = False) -> dict[str, Path]:
    """One align's sub-directory of a pair directory; keys prefixed ``<align>/``.  A keypoint align
    (:func:`save_alignment`) or a refined one (``keyreg.refine.RefinedAlignment.save``)."""
    files = res.save(directory / res.name, write_images=write_images, visualize=visualize)
    return {f"{res.name}/{k}": v for k, v in files.items()}


def save_pair_residual_plot(reg: "Registration", directory: Path) -> dict[str, Path]:
    """``residuals.png``: the keypoint residuals of every align (written with ``visualize``, after the
    aligns' residual files)."""
    from .qc import save_pair_residual_plot as plot_residuals

    plot = plot_residuals(directory, [res.name for res in reg],
                          title=f"{reg.moving.name} -> {reg.fixed.name}: keypoint residuals and "
                                "leave-one-out errors (mm)")
    return {} if plot is None else {"residual_plot": plot}
