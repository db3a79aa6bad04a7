"""Groupwise registration: every image to the mean of all images' keypoints (a template space).

Algorithm (BrainMorph's groupwise mode, in world RAS mm):

1. detect keypoints once per image (images are loaded one at a time); leave out the keypoints the
   model (or ``exclude_keypoints``) leaves out of fits;
2. start from the plain mean ``M0`` of the keypoint sets;
3. iterate: fit each image's transform ``T_i`` (``moving_from_fixed``: template point -> image
   point) from the current mean ``M`` to the image's ORIGINAL keypoints ``P_i``; map the keypoints
   into the template space, ``A_i = T_i^-1(P_i)``; the new mean is ``mean_i A_i``, brought back to
   the pose of ``M0`` by a rigid (for ``rigid``) or affine (otherwise) fit.  That last step fixes
   the gauge: any transform of a template is an equally good template, and without it an affine
   group could drift in scale.  Stop once no mean keypoint moves more than ``tolerance`` mm, or
   after ``max_iterations``;
4. the final transforms are fitted from the converged mean to each image's original keypoints.

Outputs (:func:`groupwise` with ``save_dir``): ``template.nii.gz`` (mean of the min-max normalised
warped images), ``template_keypoints.csv/.mrk.json``, ``metrics.csv/.json`` (per image: keypoint
fit residual, Jacobian statistics, mean Dice to the others; pairwise Dice matrix) and, per image,
``images/<name>/`` with what ``keyreg register`` writes per align (warped image and labels on the
template grid, transform files, aligned keypoints) plus ``keypoints.csv/.mrk.json`` (its own
keypoints).  Only one image (and two label maps, for Dice) is in memory at a time.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .atomic import atomic_dir
from .errors import ConfigError, ImageContentError
from .geometry import apply_affine, fov_center
from .io import Volume, check_same_grid, grid_volume, load_volume, nifti_stem, read_grid, save_volume
from .measure import normalize_like
from .pairing import unique_names
from .transforms import (
    DEFAULT_FIELD_STRIDE,
    AffineTransform,
    AlignSpec,
    ThinPlateSpline,
    fit_transform,
    map_to_fixed,
    parse_align,
)

__all__ = ["GroupwiseFit", "GroupwiseResult", "groupwise_keypoints", "groupwise", "pairwise_dice"]


@dataclass
class GroupwiseFit:
    """The keypoint part of a groupwise registration.

    Attributes:
        template_keypoints: ``(K, 3)`` world RAS mm, the converged mean.
        transforms: one batch-1 ``moving_from_fixed`` per image: template point -> image point.
        aligned_keypoints: ``(K, 3)`` per image, ``T_i^-1(P_i)`` in the template space.
        residuals: ``(N,)`` mean ``|T_i(template) - P_i|`` (mm): how well each fit explains the image.
        shifts: largest move of a mean keypoint at each iteration (mm).
        converged: the last shift is below the tolerance.
    """

    template_keypoints: np.ndarray
    transforms: list[AffineTransform | ThinPlateSpline]
    aligned_keypoints: list[np.ndarray]
    residuals: np.ndarray
    shifts: list[float]
    converged: bool

    @property
    def iterations(self) -> int:
        return len(self.shifts)


def _map_inverse(t: AffineTransform | ThinPlateSpline, points: torch.Tensor) -> torch.Tensor:
    """``T^-1(points)`` for ``(B, K, 3)`` points (exact for affine, Newton for TPS)."""
    return map_to_fixed(t, points, iterations=50, tolerance=1e-6)[0]


def groupwise_keypoints(
    keypoints: Sequence[Any],
    align: str | AlignSpec = "affine",
    *,
    tolerance: float = 0.01,
    max_iterations: int = 100,
    center: Any = None,
    scale: float | None = None,
) -> GroupwiseFit:
    """The iteration of the module docstring on keypoints alone (no images).

    Args:
        keypoints: ``N >= 2`` arrays ``(K, 3)`` world RAS mm, corresponding across images.
        align: ``rigid``, ``affine`` or ``tps_<lambda>``.
        tolerance: stop when no mean keypoint moves more than this (mm).
        max_iterations: at most this many updates of the mean.
        center, scale: TPS normalisation (world mm); default: the keypoints' bounding box.

    Raises:
        ConfigError: bad options or fewer than two sets.  ShapeError / DegenerateFitError: sets
            of different sizes, or keypoints that do not determine the transform.
    """
    spec = align if isinstance(align, AlignSpec) else parse_align(align)
    if len(keypoints) < 2:
        raise ConfigError(f"groupwise registration needs at least 2 images, got {len(keypoints)}")
    if not tolerance > 0 or max_iterations < 1:
        raise ConfigError("tolerance must be > 0 and max_iterations >= 1")
    sizes = {np.shape(k) for k in keypoints}
    if len(sizes) != 1 or len(next(iter(sizes))) != 2 or next(iter(sizes))[1] != 3:
        raise ImageContentError(f"every image needs the same number of (K, 3) keypoints, got shapes {sorted(sizes)}")
    pts = torch.stack([torch.as_tensor(np.asarray(k), dtype=torch.float64) for k in keypoints])  # (N, K, 3)
    n = pts.shape[0]
    gauge = parse_align("rigid" if spec.kind == "rigid" else "affine")
    m0 = pts.mean(0, keepdim=True)
    if center is not None:
        center = torch.as_tensor(np.asarray(center), dtype=torch.float64)

    def fit(mean: torch.Tensor) -> AffineTransform | ThinPlateSpline:
        return fit_transform(spec, mean.expand(n, -1, -1), pts, center=center, scale=scale)

    mean, shifts, converged = m0, [], False
    for _ in range(max_iterations):
        new = _map_inverse(fit(mean), pts).mean(0, keepdim=True)
        new = fit_transform(gauge, new, m0).map_points(new)  # back to the pose of the plain mean
        shifts.append(float((new - mean).norm(dim=-1).max()))
        mean = new
        if shifts[-1] < tolerance:
            converged = True
            break
    final = fit(mean)
    aligned = _map_inverse(final, pts)
    residuals = (final.map_points(mean.expand(n, -1, -1)) - pts).norm(dim=-1).mean(1)
    transforms = [final[i] for i in range(n)]
    return GroupwiseFit(mean[0].numpy(), transforms, [a.numpy() for a in aligned], residuals.numpy(),
                        shifts, converged)


def pairwise_dice(label_files: Sequence[Path], label_ids: Sequence[int]) -> np.ndarray:
    """``(N, N)`` mean hard Dice between label maps saved as ``.npy`` on one grid (diagonal 1).

    Same definition as :func:`keyreg.metrics.dice_per_label` / ``mean_dice``: labels present in
    either map, background 0 excluded.  Two maps are in memory at a time (memory-mapped reads);
    each pair costs one pass over the voxels (``bincount`` of the agreeing voxels).
    """
    ids = np.asarray(sorted(set(int(i) for i in label_ids) | {0}), dtype=np.int64)
    n = len(label_files)
    counts = []
    for f in label_files:
        counts.append(np.bincount(np.searchsorted(ids, np.load(f, mmap_mode="r")).ravel(), minlength=len(ids)))
    out = np.eye(n)
    for i in range(n):
        a = np.searchsorted(ids, np.load(label_files[i], mmap_mode="r")).ravel()
        for j in range(i + 1, n):
            b = np.searchsorted(ids, np.load(label_files[j], mmap_mode="r")).ravel()
            inter = np.bincount(a[a == b], minlength=len(ids))
            total = counts[i] + counts[j]
            keep = (total > 0) & (ids != 0)
            out[i, j] = out[j, i] = float(np.mean(2.0 * inter[keep] / total[keep])) if keep.any() else float("nan")
    return out


@dataclass
class GroupwiseResult:
    """Result of :func:`groupwise`.

    Attributes:
        names: one output name per image.
        fit: the keypoint part (:class:`GroupwiseFit`).
        template_grid: the common output grid (geometry-only volume).
        template: mean of the min-max normalised warped images on that grid.
        metrics: per-image rows and summary values (as written to ``metrics.json``).
        pairwise_dice: ``(N, N)`` mean Dice of the warped label maps (``None`` without labels).
        save_dir: where outputs were written (``None`` if not saved).
    """

    names: list[str]
    fit: GroupwiseFit
    template_grid: Volume
    template: Volume
    metrics: dict[str, Any] = field(default_factory=dict)
    pairwise_dice: np.ndarray | None = None
    save_dir: Path | None = None


def _name(source: Any, i: int) -> str:
    if isinstance(source, Volume):
        return source.name
    if isinstance(source, (str, os.PathLike)):
        return nifti_stem(source)
    return f"image{i}"


def _overlaps(grid: Volume, transform: AffineTransform | ThinPlateSpline, vol: Volume, n: int = 9) -> bool:
    """Whether some of an ``n^3`` lattice of ``grid`` (the template) lands inside ``vol`` through
    ``transform`` (template point -> image point)."""
    axes = [torch.linspace(0, s - 1, n, dtype=torch.float64) for s in grid.shape]
    idx = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(1, -1, 3)
    world = apply_affine(torch.as_tensor(grid.affine, dtype=torch.float64), idx)
    img = transform.to("cpu").map_points(world).double()
    vox = apply_affine(torch.linalg.inv(torch.as_tensor(vol.affine, dtype=torch.float64)), img)[0]
    hi = torch.tensor(vol.shape, dtype=torch.float64) - 1
    return bool(((vox >= 0) & (vox <= hi)).all(-1).any())


def _template_grid(first: Volume, t0: AffineTransform | ThinPlateSpline) -> Volume:
    """The first image's grid, moved so that its centre is where its own centre lands in the template."""
    c0 = torch.as_tensor(fov_center(first.affine, first.shape), dtype=torch.float64).reshape(1, 1, 3)
    c = _map_inverse(t0, c0)[0, 0].numpy()
    aff = first.affine.copy()
    aff[:3, 3] += c - c0[0, 0].numpy()
    return grid_volume(first.shape, aff, "template")


def groupwise(
    images: Sequence[Any],
    *,
    model: Any = None,
    align: str = "affine",
    segs: Sequence[Any] | None = None,
    keypoints: Sequence[Any] | None = None,
    save_dir: str | os.PathLike | None = None,
    tolerance: float = 0.01,
    max_iterations: int = 100,
    template_grid: Any = None,
    label_interp: str = "nearest",
    field_stride: int = DEFAULT_FIELD_STRIDE,
    device: str | torch.device | None = None,
    use_amp: bool = False,
    orientation_search: str | None = None,
    exclude_keypoints: Sequence[str] | None = None,
    progress: bool = True,
) -> GroupwiseResult:
    """Register a group of images to the mean of their keypoints (see the module docstring).

    Args:
        images: ``N >= 2`` images (paths, :class:`Volume`, ``(array, affine)``); loaded one at a time.
        model: keypoint model (bundled name, file or loaded detector); unused with ``keypoints``.
        align: ``rigid``, ``affine`` or ``tps_<lambda>``.
        segs: optional label maps, one per image, each on its image's grid.
        keypoints: precomputed ``(K, 3)`` world keypoints per image (skips the network).
        save_dir: write the outputs there (staged in a temporary directory first, so an error
            leaves no partial results).
        tolerance, max_iterations: convergence of the mean (mm) and its iteration limit.
        template_grid: output grid (path or Volume); default: the first image's grid, moved to the
            template position of its centre.
        label_interp: ``nearest`` or ``labelwise``.
        field_stride: sub-grid stride of the dense TPS field.
        orientation_search: ``always``, ``auto`` or ``off`` for an anatomical model (``None``: the model's).
        exclude_keypoints: fnmatch patterns of keypoint names left out of the fits, as in pairwise
            registration (``None``: the model's default, ``fit_exclude``; ``()``: none).
        progress: tqdm progress bars on stderr.

    Returns:
        A :class:`GroupwiseResult`.
    """
    from tqdm import tqdm

    from .export import save_keypoints
    from .keypoints import default_keypoint_names, tps_frame
    from .metrics import jacobian_determinant_stats
    from .pipeline import Registrar
    from .results import AlignmentResult, warp_volume

    spec = parse_align(align)
    registrar = Registrar(model, device=device, aligns=(spec.name,), label_interp=label_interp,
                          field_stride=field_stride, use_amp=use_amp, orientation_search=orientation_search,
                          exclude_keypoints=None if exclude_keypoints is None else tuple(exclude_keypoints))
    if len(images) < 2:
        raise ConfigError(f"groupwise registration needs at least 2 images, got {len(images)}")
    if segs is not None and len(segs) != len(images):
        raise ConfigError(f"got {len(segs)} label maps for {len(images)} images")
    if keypoints is not None and len(keypoints) != len(images):
        raise ConfigError(f"got {len(keypoints)} keypoint sets for {len(images)} images")
    dev = registrar.device
    names = unique_names([_name(x, i) for i, x in enumerate(images)])
    grids = [read_grid(x) if isinstance(x, (str, os.PathLike, Volume)) else None for x in images]
    if segs is not None:
        for name, g, s in zip(names, grids, segs):
            sg = read_grid(s) if isinstance(s, (str, os.PathLike, Volume)) else None
            if g is not None and sg is not None:
                check_same_grid(grid_volume(sg.shape, sg.affine, name), g, "label map")
    # bars are removed when done or on an error, so a failure leaves only its one-line message
    bar = dict(file=sys.stderr, disable=not progress, dynamic_ncols=True, leave=False)
    center, scale = None, None
    names_kp = None
    if keypoints is None:
        registrar.model  # noqa: B018 - load (and check) the model before the first image
        kps = []
        with tqdm(images, desc="keypoints", unit="image", **bar) as images_bar:
            for x in images_bar:
                kp = registrar.keypoints(load_volume(x, kind="image"))
                kps.append(kp.numpy())
                if center is None:  # TPS frame: the first image's network grid, as in pairwise registration
                    center, scale = tps_frame(kp.world_from_net, kp.grid_shape)
                    names_kp = list(kp.names)
        keypoints = kps
    names_kp = names_kp or default_keypoint_names(len(keypoints[0]))
    keep, left_out = registrar.fit_keep(names_kp)
    # the same exclusion as a pairwise fit: the template is built from the kept keypoints
    if left_out and len({np.shape(k) for k in keypoints}) == 1:
        keypoints = [np.asarray(k)[keep] for k in keypoints]
        names_kp = [names_kp[i] for i in keep]
    first = grids[0] if grids[0] is not None else load_volume(images[0])
    if center is None:
        center, scale = tps_frame(first.affine, first.shape)
    fit = groupwise_keypoints(keypoints, spec, tolerance=tolerance, max_iterations=max_iterations,
                              center=center, scale=scale)
    grid = read_grid(template_grid) if template_grid is not None else _template_grid(first, fit.transforms[0])
    grid = grid_volume(grid.shape, grid.affine, "template", grid.header)

    out_dir = None if save_dir is None else Path(save_dir)
    # outputs are staged and moved into save_dir only when everything is written; without a
    # save_dir the staging area is a scratch directory for the warped label maps
    stage = (atomic_dir(out_dir, merge=True) if out_dir is not None
             else tempfile.TemporaryDirectory(prefix="keyreg-groupwise-"))
    warp_bar = tqdm(total=len(images), desc="warping", unit="image", **bar)
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(warp_bar.close)
        work = Path(cleanup.enter_context(stage))
        rows, seg_files, before_files, label_ids = [], [], [], set()
        total = np.zeros(grid.shape, dtype=np.float64)
        for i in range(len(images)):
            vol = load_volume(images[i], kind="image")
            t = fit.transforms[i].to(dev)
            if not _overlaps(grid, fit.transforms[i], vol):
                raise ImageContentError(f"{names[i]}: the template grid does not overlap this image "
                                        "(check --template_grid)")
            res = AlignmentResult(spec, t, grid, vol, fit.template_keypoints, np.asarray(keypoints[i], np.float64),
                                  None, registrar.options.field_stride, keypoint_names=names_kp)
            dense = registrar.dense(res)
            res.warped = warp_volume(vol, grid, dense, device=dev)
            res.warped.name = f"{names[i]}_warped"
            warped = res.warped.data
            total += normalize_like(warped, vol)
            seg = None
            if segs is not None:
                seg = load_volume(segs[i], kind="labels", name=names[i])
                check_same_grid(seg, vol, "label map")
                lab_np = warp_volume(seg, grid, dense, kind="labels", interp=registrar.options.label_interp,
                                     device=dev).data
                res.warped_seg = grid.with_data(lab_np, kind="labels", name=f"{names[i]}_warped_seg")
                seg_files.append(work / f".seg{i}.npy")
                np.save(seg_files[-1], lab_np)
                label_ids.update(int(v) for v in np.unique(lab_np))
                # before: the label map as it is (world space, no transform) on the first image's grid
                before_np = warp_volume(seg, first, None, kind="labels", interp=registrar.options.label_interp,
                                        device=dev).data
                before_files.append(work / f".before{i}.npy")
                np.save(before_files[-1], before_np)
                label_ids.update(int(v) for v in np.unique(before_np))
            row = {"image": names[i], "keypoint_residual_mm": float(fit.residuals[i]),
                   **jacobian_determinant_stats(dense)}
            rows.append(row)
            if out_dir is not None:
                d = work / "images" / names[i]
                res.save(d)
                save_keypoints(d, "keypoints", np.asarray(keypoints[i], np.float64), names=names_kp)
            del vol, res, dense, warped, seg
            warp_bar.update()
        warp_bar.close()
        template = grid.with_data((total / len(images)).astype(np.float32), name="template")
        dice = None
        summary: dict[str, Any] = {"align": spec.name, "images": len(images), "iterations": fit.iterations,
                                   "converged": fit.converged, "shifts_mm": fit.shifts,
                                   "keypoints_left_out": left_out}
        if seg_files:
            dice = pairwise_dice(seg_files, sorted(label_ids))
            for key, matrix in (("pairwise_dice", dice), ("pairwise_dice_before", pairwise_dice(before_files,
                                                                                            sorted(label_ids)))):
                off = matrix[~np.eye(len(matrix), dtype=bool)]
                summary[f"{key}_mean"], summary[f"{key}_std"] = float(np.nanmean(off)), float(np.nanstd(off))
            for i, row in enumerate(rows):
                row["mean_dice_to_others"] = float(np.nanmean(np.delete(dice[i], i)))
        metrics = {"summary": summary, "images": rows,
                   "pairwise_dice": None if dice is None else {"names": names, "matrix": dice.tolist()}}
        for f in seg_files + before_files:
            f.unlink()
        if out_dir is not None:
            save_volume(template.data, grid, work / "template.nii.gz")
            save_keypoints(work, "template_keypoints", fit.template_keypoints, names=names_kp)
            _write_metrics(work, metrics)
    return GroupwiseResult(names, fit, grid, template, metrics, dice, out_dir)


def _write_metrics(directory: Path, metrics: dict[str, Any]) -> None:
    import csv
    import io

    from .atomic import atomic_write_text

    rows = metrics["images"]
    keys = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in r.items()})
    atomic_write_text(directory / "metrics.csv", buf.getvalue())

    from .batch import json_clean

    atomic_write_text(directory / "metrics.json", json.dumps(json_clean(metrics), indent=1) + "\n")
