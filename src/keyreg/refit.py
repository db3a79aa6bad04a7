"""Refit transforms from keypoint files (possibly edited by hand in 3D Slicer), without the network.

Keypoint files: keyreg CSVs (``label,x_ras,y_ras,z_ras[,weight][,selected]``), Slicer ``.mrk.json`` (LPS or
RAS, as declared) or legacy ``.fcsv``.

Matching rule (:func:`match_keypoints`):

* points are matched **by label**.  keyreg writes the model's keypoint names as labels, and
  ``K-1 .. K-N`` (the keypoint's index) for unnamed models, so matching by label is matching by
  index for those; a CSV without a label column gets ``K-1 .. K-N`` by row;
* a label present in only one file (a point deleted in the other) is left out;
* a point that is **unselected** is left out: in Slicer ``"selected": false`` (the check box of
  the point list unticked), in a CSV a ``selected`` column of 0.  ``keyreg register`` writes the
  points it left out of its fits (the model's default exclusion or ``--exclude_keypoints``) that way,
  so an unedited refit leaves them out too; **locked** points are used like any other (locking only
  protects a point from being moved); points whose ``positionStatus`` is ``undefined`` or
  ``missing`` have no position and are left out;
* a label that occurs twice in one file is an error;
* weights: the ``weight`` column of the fixed CSV (else the moving CSV) when present, so that a
  refit of unedited ``keyreg register`` keypoints reproduces the weighted fit; Slicer files carry
  no weights (uniform).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ConfigError, ImageIOError

__all__ = ["KeypointFile", "MatchedKeypoints", "match_keypoints", "read_keypoint_file", "refit"]


@dataclass
class KeypointFile:
    """Points of one keypoint file.

    Attributes:
        points: ``(N, 3)`` world RAS mm.
        labels: ``N`` names.
        selected: ``(N,)`` bool (Slicer's "selected"; a CSV's ``selected`` column, else ``True``).
        locked: ``(N,)`` bool (Slicer's "locked"; ``False`` for CSVs).
        weights: ``(N,)`` or ``None``.
        path: where it was read from.
    """

    points: np.ndarray
    labels: list[str]
    selected: np.ndarray
    locked: np.ndarray
    weights: np.ndarray | None = None
    path: str = ""


@dataclass
class MatchedKeypoints:
    """Corresponding keypoints of a fixed and a moving file.

    Attributes:
        fixed, moving: ``(M, 3)`` world RAS mm, row ``m`` of both is keypoint ``labels[m]``.
        labels: ``M`` names, in the fixed file's order.
        weights: ``(M,)`` or ``None``.
        left_out: ``{label: reason}`` for every point of either file that is not used.
    """

    fixed: np.ndarray
    moving: np.ndarray
    labels: list[str]
    weights: np.ndarray | None
    left_out: dict[str, str]


def read_keypoint_file(path: str | Path) -> KeypointFile:
    """Read a keyreg CSV, Slicer ``.mrk.json`` / ``.json`` or ``.fcsv`` keypoint file (RAS mm in memory)."""
    from .formats import read_markups
    from .formats.points import read_point_set

    p = Path(path)
    name = p.name.lower()
    if name.endswith(".csv"):
        ps = read_point_set(p)
        pts, labels, w = ps.points, ps.labels, ps.weights
        n = len(pts)
        sel = np.ones(n, bool) if ps.selected is None else ps.selected
        kf = KeypointFile(pts, list(labels), sel, np.zeros(n, bool), w, str(p))
    elif name.endswith((".json", ".fcsv")):
        pts, labels, states = read_markups(p, with_states=True)
        kf = KeypointFile(pts, list(labels), np.array([s["selected"] for s in states], dtype=bool).reshape(-1),
                          np.array([s["locked"] for s in states], dtype=bool).reshape(-1), None, str(p))
    else:
        raise ImageIOError(f"{p}: unknown keypoint file type (expected .csv, .mrk.json or .fcsv)")
    seen: set[str] = set()
    for lab in kf.labels:
        if lab in seen:
            raise ImageIOError(f"{p}: keypoint label {lab!r} occurs twice (labels match the two files' points)")
        seen.add(lab)
    return kf


def match_keypoints(fixed: KeypointFile, moving: KeypointFile) -> MatchedKeypoints:
    """Pair the points of two keypoint files by label (rules in the module docstring).

    Raises:
        ConfigError: no label in common.
    """
    left_out: dict[str, str] = {}
    mov_index = {lab: i for i, lab in enumerate(moving.labels)}
    fix_labels = set(fixed.labels)
    rows_f, rows_m, labels = [], [], []
    for i, lab in enumerate(fixed.labels):
        j = mov_index.get(lab)
        if j is None:
            left_out[lab] = "not in the moving file"
        elif not fixed.selected[i]:
            left_out[lab] = "unselected in the fixed file"
        elif not moving.selected[j]:
            left_out[lab] = "unselected in the moving file"
        else:
            rows_f.append(i)
            rows_m.append(j)
            labels.append(lab)
    for lab in moving.labels:
        if lab not in fix_labels:
            left_out[lab] = "not in the fixed file"
    if not labels:
        raise ConfigError(f"no keypoint label is in both {fixed.path or 'fixed'} and {moving.path or 'moving'} "
                          "(points are matched by label)")
    weights = None
    if fixed.weights is not None:
        weights = np.asarray(fixed.weights, dtype=np.float64)[rows_f]
    elif moving.weights is not None:
        weights = np.asarray(moving.weights, dtype=np.float64)[rows_m]
    return MatchedKeypoints(np.asarray(fixed.points, dtype=np.float64)[rows_f],
                            np.asarray(moving.points, dtype=np.float64)[rows_m], labels, weights, left_out)


def refit(
    moving,
    fixed,
    fixed_keypoints,
    moving_keypoints,
    *,
    aligns=("affine", "tps_0"),
    moving_seg=None,
    fixed_seg=None,
    robust: bool = False,
    use_weights: bool = True,
    device=None,
    label_interp: str = "nearest",
    field_stride: int | None = None,
    pad_value: float | None = None,
    warp: bool = True,
):
    """Fit ``aligns`` from two keypoint files (or :class:`KeypointFile` objects) and warp, like
    :meth:`keyreg.pipeline.Registrar.register` but without the network.

    TPS coordinates are normalised by the fixed image's field of view (centre, half its longest
    side), so ``lambda`` keeps its meaning; ``keyreg register`` used the network grid's field of
    view, which is close but not identical (a refit TPS with lambda > 0 can differ slightly).

    Returns:
        ``(registration, matched)``: a :class:`keyreg.results.Registration` (measure and save it as
        ``keyreg register``'s) and the :class:`MatchedKeypoints` (``left_out`` lists what was dropped).
    """
    import torch

    from .keypoints import ImageKeypoints
    from .pipeline import Registrar, fit_alignments
    from .results import AlignmentResult, Registration
    from .transforms import DEFAULT_FIELD_STRIDE

    kf_file = fixed_keypoints if isinstance(fixed_keypoints, KeypointFile) else read_keypoint_file(fixed_keypoints)
    km_file = moving_keypoints if isinstance(moving_keypoints, KeypointFile) else read_keypoint_file(moving_keypoints)
    matched = match_keypoints(kf_file, km_file)
    registrar = Registrar(None, device=device, aligns=tuple(aligns), weighted=False, label_interp=label_interp,
                          field_stride=DEFAULT_FIELD_STRIDE if field_stride is None else field_stride,
                          pad_value=pad_value, robust=robust)
    moving_v, fixed_v, moving_s, fixed_s = registrar.load(moving, fixed, moving_seg, fixed_seg)
    n = len(matched.labels)
    ones = torch.ones(n, dtype=torch.float32)
    kf = ImageKeypoints(torch.from_numpy(matched.fixed), ones, np.asarray(fixed_v.affine, dtype=np.float64),
                        tuple(fixed_v.shape[:3]), names=list(matched.labels))
    km = ImageKeypoints(torch.from_numpy(matched.moving), ones, np.asarray(moving_v.affine, dtype=np.float64),
                        tuple(moving_v.shape[:3]), names=list(matched.labels))
    w = None
    if use_weights and matched.weights is not None:
        w = torch.from_numpy(matched.weights)
    per_align: dict = {}
    with registrar.timer("fit"):
        transforms = fit_alignments(kf, km, registrar.options.specs, w, robust=robust, fit_weights=per_align)
    w_np = None if w is None else w.numpy()
    results = {
        spec.name: AlignmentResult(spec, transforms[spec.name], fixed_v, moving_v, matched.fixed, matched.moving,
                                   per_align[spec.name].cpu().numpy() if spec.name in per_align else w_np,
                                   registrar.options.field_stride, keypoint_names=list(matched.labels),
                                   pad_value=pad_value)
        for spec in registrar.options.specs}
    reg = Registration(fixed_v, moving_v, kf, km, results, fixed_s, moving_s, w_np,
                       excluded_keypoints=sorted(matched.left_out), fit_keypoints=(matched.fixed, matched.moving))
    if warp:
        registrar.warp(reg)
    return reg, matched
