"""Registration metrics, evaluated on the fixed image's original grid.

All functions take numpy arrays on one grid (``(I, J, K)``, nibabel voxel order) and are pure.
Label conventions (both Dice and Hausdorff):

* label ``0`` is background and never counted;
* Dice is averaged over the labels present in **either** map (a label missing from one map
  scores 0, a label missing from both is not counted — it is not a free Dice of 1);
* Hausdorff distances need a surface in both maps: labels missing from one map are reported as
  ``nan`` per label and left out of the mean.

Jacobian statistics are those of the physical-space map ``x_fixed (mm) -> x_moving (mm)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .errors import ConfigError, ShapeError
from .transforms import AffineTransform, DisplacementField

__all__ = [
    "METRICS",
    "MinMaxScaled",
    "parse_metrics",
    "before_metrics",
    "mse",
    "ncc",
    "dice_per_label",
    "mean_dice",
    "BRAIN_LABELS",
    "brain_structures",
    "brain_dice_per_label",
    "soft_dice_per_label",
    "LabelSurfaces",
    "hausdorff95_per_label",
    "jacobian_determinant",
    "jacobian_determinant_stats",
    "compute_metrics",
]

#: metric name -> what it needs (``image``: warped and fixed images; ``seg``: segmentations;
#: ``transform``: the dense transform).
METRICS: dict[str, str] = {
    "mse": "image",
    "ncc": "image",
    "harddice": "seg",
    "braindice": "seg",
    "softdice": "seg",
    "hausd": "seg",
    "jdstd": "transform",
    "jdlessthan0": "transform",
}


def parse_metrics(names: Sequence[str] | str) -> list[str]:
    """Validate metric names (order kept, duplicates dropped); unknown names raise :class:`ConfigError`."""
    if isinstance(names, str):
        names = names.replace(",", " ").split()
    out: list[str] = []
    for n in names:
        key = str(n).strip().lower()
        if key not in METRICS:
            raise ConfigError(f"unknown metric {n!r}; use one of: {', '.join(METRICS)}")
        if key not in out:
            out.append(key)
    if not out:
        raise ConfigError(f"no metric given; use one or more of: {', '.join(METRICS)}")
    return out


def before_metrics(names: Sequence[str]) -> list[str]:
    """Of ``names``, those that a registration's ``none`` row (the pair before registration) reports:
    overlap and intensity metrics.  Not ``hausd`` (far from alignment it costs several times a
    registered pair's: 3.9 s on a 1 mm head) nor the Jacobian statistics (the identity's are 0)."""
    return [n for n in names if METRICS[n] != "transform" and n != "hausd"]


def _same_shape(a: np.ndarray | MinMaxScaled, b: np.ndarray | MinMaxScaled, what: str) -> None:
    if a.shape != b.shape:
        raise ShapeError(f"{what}: shapes {a.shape} and {b.shape} differ (both must be on the fixed grid)")


#: elements per chunk of the image metrics (8 MiB of float64)
_CHUNK = 1 << 20


@dataclass(frozen=True)
class MinMaxScaled:
    """An image to be compared min-max normalised, ``(data - lo) / scale`` in float32, without a
    full-size normalised copy: the image metrics normalise it chunk by chunk (the same float32
    operations as a full copy, so the same values).

    Attributes:
        data: the image as stored (any real dtype), ``(I, J, K)``.
        lo, scale: float32 offset and range.
    """

    data: np.ndarray
    lo: np.float32
    scale: np.float32

    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape


def _flat_chunks(x: np.ndarray | MinMaxScaled):
    """Consecutive chunks of ``x``'s flat values (a :class:`MinMaxScaled` normalised per chunk)."""
    if isinstance(x, MinMaxScaled):
        flat = np.ravel(x.data)
        for s in range(0, flat.size, _CHUNK):
            yield (flat[s:s + _CHUNK].astype(np.float32) - x.lo) / x.scale
        return
    flat = np.ravel(x)
    for s in range(0, flat.size, _CHUNK):
        yield flat[s:s + _CHUNK]


def mse(warped: np.ndarray | MinMaxScaled, fixed: np.ndarray | MinMaxScaled) -> float:
    """Mean squared intensity difference (images expected min-max normalised to [0, 1])."""
    _same_shape(warped, fixed, "mse")
    total = 0.0
    for a, b in zip(_flat_chunks(warped), _flat_chunks(fixed)):  # float64 in chunks, no full-size temporaries
        d = a.astype(np.float64) - b
        total += float(np.dot(d, d))
    return total / max(int(np.prod(warped.shape)), 1)


def ncc(warped: np.ndarray | MinMaxScaled, fixed: np.ndarray | MinMaxScaled) -> float:
    """Global normalised cross-correlation (Pearson's r) over the whole grid, in [-1, 1].

    A constant image has no defined correlation: returns ``nan``.
    """
    _same_shape(warped, fixed, "ncc")
    n = max(int(np.prod(warped.shape)), 1)
    ma = sum(float(c.sum(dtype=np.float64)) for c in _flat_chunks(warped)) / n
    mb = sum(float(c.sum(dtype=np.float64)) for c in _flat_chunks(fixed)) / n
    saa = sbb = sab = 0.0
    for a, b in zip(_flat_chunks(warped), _flat_chunks(fixed)):  # float64 in chunks
        x = a.astype(np.float64) - ma
        y = b.astype(np.float64) - mb
        saa, sbb, sab = saa + float(np.dot(x, x)), sbb + float(np.dot(y, y)), sab + float(np.dot(x, y))
    denom = np.sqrt(saa * sbb)
    return float(sab / denom) if denom > 0 else float("nan")


def _labels_in_either(a: np.ndarray, b: np.ndarray) -> list[int]:
    ids = np.union1d(np.unique(a), np.unique(b))
    return [int(i) for i in ids if i != 0]


#: label ids below this are counted by one joint histogram (:func:`dice_per_label`; at most 2^24 bins)
JOINT_DICE_IDS = 4096


def dice_per_label(warped_seg: np.ndarray, fixed_seg: np.ndarray) -> dict[int, float]:
    """Hard Dice ``2|A∩B| / (|A|+|B|)`` per label present in either map (background excluded).

    Exact integer counts.  Ids in ``[0, 4096)`` (FreeSurfer's): one joint histogram of the label
    pairs ``(a, b)``, whose row and column sums are ``|A|`` and ``|B|`` and whose diagonal is
    ``|A∩B|`` (one pass; 4x faster than three histograms at 256^3); other non-negative ids below
    2^24: the three histograms; any ids: ranks among the ids present.
    """
    _same_shape(warped_seg, fixed_seg, "harddice")
    a = np.asarray(warped_seg).ravel()
    b = np.asarray(fixed_seg).ravel()
    if a.size == 0:
        return {}
    lo = min(int(a.min()), int(b.min()))
    hi = max(int(a.max()), int(b.max()))
    if lo >= 0 and hi < JOINT_DICE_IDS:
        n = hi + 1
        code = torch.from_numpy(a.astype(np.int64)).mul_(n).add_(torch.from_numpy(b.astype(np.int64, copy=False)))
        joint = torch.bincount(code, minlength=n * n).reshape(n, n).numpy()
        count_a, count_b, inter = joint.sum(1), joint.sum(0), np.diagonal(joint)
        return {int(lab): float(2.0 * int(inter[lab]) / (int(count_a[lab]) + int(count_b[lab])))
                for lab in np.flatnonzero(count_a + count_b).tolist() if lab != 0}
    same = a[a == b]
    if lo >= 0 and hi < (1 << 24):  # small non-negative ids: direct histograms
        n = hi + 1
        count_a = np.bincount(a, minlength=n) if a.dtype.kind in "iub" else np.bincount(a.astype(np.int64), minlength=n)
        count_b = np.bincount(b, minlength=n) if b.dtype.kind in "iub" else np.bincount(b.astype(np.int64), minlength=n)
        inter = np.bincount(same, minlength=n)
        ids = np.flatnonzero(count_a + count_b)
    else:  # any ids: ranks among the ids present
        ids, inv = np.unique(np.concatenate([a, b]), return_inverse=True)
        count_a = np.bincount(inv[: a.size], minlength=len(ids))
        count_b = np.bincount(inv[a.size:], minlength=len(ids))
        inter = np.bincount(np.searchsorted(ids, same), minlength=len(ids))
        out = {}
        for r, lab in enumerate(ids.tolist()):
            if lab != 0:
                out[int(lab)] = float(2.0 * int(inter[r]) / (int(count_a[r]) + int(count_b[r])))
        return out
    return {int(lab): float(2.0 * int(inter[lab]) / (int(count_a[lab]) + int(count_b[lab])))
            for lab in ids.tolist() if lab != 0}


#: FreeSurfer label ids of the brain structures, 2 (Left-Cerebral-White-Matter) to 60 (Right-VentralDC):
#: what a "brain Dice" averages over (the ``braindice`` metric, ``keyreg evaluate --metrics braindice``,
#: the benchmarks).  Background 0, unknown ids above 60 and the extra-cerebral ids (>= 500) are left out.
BRAIN_LABELS = range(2, 61)


def brain_structures(seg: np.ndarray) -> np.ndarray:
    """``seg`` with every id outside :data:`BRAIN_LABELS` set to 0 (background)."""
    seg = np.asarray(seg)
    return np.where((seg >= BRAIN_LABELS.start) & (seg < BRAIN_LABELS.stop), seg, 0)


def brain_dice_per_label(warped_seg: np.ndarray, fixed_seg: np.ndarray) -> dict[int, float]:
    """:func:`dice_per_label` over the brain structures (:data:`BRAIN_LABELS`) present in either map."""
    return dice_per_label(brain_structures(warped_seg), brain_structures(fixed_seg))


def mean_dice(per_label: dict[int, float]) -> float:
    """Mean of the finite per-label values (``nan`` when there is none)."""
    vals = [v for v in per_label.values() if np.isfinite(v)]
    return float(np.mean(vals)) if vals else float("nan")


def soft_dice_per_label(
    moving_seg: np.ndarray,
    moving_affine: np.ndarray,
    fixed_seg: np.ndarray,
    fixed_affine: np.ndarray,
    transform: Any,
) -> dict[int, float]:
    """Soft Dice: each moving label's indicator is warped with trilinear interpolation (values in
    [0, 1], as in training) and compared with the fixed label's indicator.

    Args:
        moving_seg: ``(I', J', K')`` moving label map on its own grid.
        moving_affine, fixed_affine: world-from-voxel ``(4, 4)``.
        fixed_seg: ``(I, J, K)`` fixed label map.
        transform: ``moving_from_fixed`` (world mm): affine or displacement field, batch 1.
    """
    from .warp import warp_image

    out = {}
    fixed_flat = fixed_seg.ravel()
    for lab in _labels_in_either(moving_seg, fixed_seg):
        ind = torch.from_numpy((moving_seg == lab).astype(np.float32))[None, None]
        w = warp_image(ind, moving_affine, fixed_seg.shape, fixed_affine, transform)[0, 0].numpy().ravel()
        f = fixed_flat == lab
        denom = float(w.sum(dtype=np.float64)) + float(np.count_nonzero(f))
        out[lab] = float(2.0 * w[f].sum(dtype=np.float64) / denom) if denom > 0 else float("nan")
    return out


def _label_edges(seg: np.ndarray) -> np.ndarray:
    """Voxels with a 6-neighbour of another label or outside the grid: the surface voxels of every
    label at once (per label, the same set as ``mask & ~binary_erosion(mask, border_value=0)``)."""
    edge = np.zeros(seg.shape, dtype=bool)
    for axis in range(seg.ndim):
        lo = [slice(None)] * seg.ndim
        hi = [slice(None)] * seg.ndim
        lo[axis], hi[axis] = slice(None, -1), slice(1, None)
        diff = seg[tuple(lo)] != seg[tuple(hi)]
        edge[tuple(lo)] |= diff
        edge[tuple(hi)] |= diff
        faces = [slice(None)] * seg.ndim
        faces[axis] = [0, seg.shape[axis] - 1]
        edge[tuple(faces)] = True
    return edge


def _group_by_label(seg: np.ndarray, flat: np.ndarray) -> dict[int, np.ndarray]:
    """Flat voxel indices ``flat`` grouped by their label in ``seg``."""
    labels = seg.ravel()[flat]
    order = np.argsort(labels, kind="stable")
    flat, labels = flat[order], labels[order]
    ids, starts = np.unique(labels, return_index=True)
    bounds = [*starts[1:].tolist(), len(flat)]
    return {int(lab): flat[s0:s1] for lab, s0, s1 in zip(ids.tolist(), starts.tolist(), bounds)}


class _SurfaceLookup:
    """The surface voxels of a label map as a padded label image, for neighbour look-ups.

    ``labels`` holds a voxel's label where the voxel is on its label's surface and 0 elsewhere, padded
    by one voxel of 0 on every side, so the 26 neighbours of any voxel are valid flat indices.
    """

    def __init__(self, seg: np.ndarray, edge: np.ndarray) -> None:
        self.labels = np.pad(np.where(edge, seg, np.zeros((), seg.dtype)), 1).ravel()
        self.padded_shape = tuple(n + 2 for n in seg.shape)


def _stencil_offsets(spacing: np.ndarray, strides: Sequence[int]) -> list[tuple[int, float]]:
    """The 26 neighbour offsets (as padded flat-index steps) no longer than twice the smallest spacing,
    with their lengths (mm), shortest first.  Any voxel outside the 3 x 3 x 3 cube is at least that far,
    so the first of these offsets that reaches a target voxel gives the exact nearest distance."""
    limit = 2.0 * float(spacing.min())
    out = []
    for o in np.ndindex(3, 3, 3):
        step = np.asarray(o) - 1
        if not step.any():
            continue
        length = float(np.linalg.norm(step * spacing))
        if length <= limit:
            out.append((int(np.dot(step, strides)), length))
    return sorted(out, key=lambda t: t[1])


def _nearest_nearby(flat: np.ndarray, label: int, shape: Sequence[int], target: _SurfaceLookup,
                    offsets: list[tuple[int, float]]) -> np.ndarray:
    """Distance (mm) from each voxel ``flat`` (flat indices of the unpadded grid) to the nearest voxel
    of ``label``'s surface in ``target``, where one is among its neighbours (:func:`_stencil_offsets`);
    NaN where none is."""
    idx = np.unravel_index(flat, tuple(shape))
    padded = np.ravel_multi_index(tuple(i + 1 for i in idx), target.padded_shape)
    dist = np.full(len(flat), np.nan)
    todo = np.arange(len(flat))
    for step, length in offsets:
        hit = target.labels[padded[todo] + step] == label
        dist[todo[hit]] = length
        todo = todo[~hit]
        if not todo.size:
            break
    return dist


class LabelSurfaces:
    """The label surfaces of one map, for Hausdorff distances to several others (a registration's
    fixed map, measured against each align's warped map): its surface voxels (per label), the
    neighbour look-up, and each label's KD-tree of surface points (built on first use, kept).

    Attributes:
        seg: the ``(I, J, K)`` label map.
        edge: its surface voxels of every label (:func:`_label_edges`).
        surfaces: label -> flat indices of its surface voxels.
    """

    def __init__(self, seg: np.ndarray, spacing: Sequence[float]) -> None:
        import threading

        self.seg = np.asarray(seg)
        self.spacing = np.asarray([float(v) for v in spacing], dtype=np.float64)
        self.edge = _label_edges(self.seg)
        self.surfaces = _group_by_label(self.seg, np.flatnonzero(self.edge))
        self.lookup = _SurfaceLookup(self.seg, self.edge)
        self._trees: dict[int, Any] = {}
        self._lock = threading.Lock()

    def points(self, flat: np.ndarray) -> np.ndarray:
        """World-axis-aligned positions (mm, voxel index x spacing) of flat voxel indices."""
        return np.stack(np.unravel_index(flat, self.seg.shape), axis=1) * self.spacing

    def tree(self, label: int):
        """The KD-tree (``scipy.spatial.cKDTree``) of ``label``'s surface points."""
        from scipy.spatial import cKDTree

        with self._lock:
            t = self._trees.get(label)
        if t is None:
            t = cKDTree(self.points(self.surfaces[label]))
            with self._lock:
                self._trees[label] = t
        return t


def hausdorff95_per_label(warped_seg: np.ndarray, fixed_seg: np.ndarray, spacing: Sequence[float], *,
                          fixed_surfaces: LabelSurfaces | None = None) -> dict[int, float]:
    """95th-percentile symmetric Hausdorff distance (mm) between label surfaces.

    For each label, the distances from every surface voxel of one map to the nearest surface voxel
    of the other, in both directions, are pooled and their 95th percentile returned. Distances use
    the voxel ``spacing`` (mm).

    The surfaces of all labels are found in one pass per map.  A voxel on the label's surface in both
    maps is at distance 0 both ways; one with such a voxel among its close neighbours takes the
    distance of the nearest of them (:func:`_stencil_offsets`: exact); the others find their nearest
    surface voxel with a KD-tree (``scipy.spatial.cKDTree``).  The same Euclidean distances as
    distance transforms of the surfaces, without a pass over the grid per label.  Labels run on
    threads (numpy and the KD-tree release the GIL), the largest surfaces first.

    ``fixed_surfaces``: the fixed map's :class:`LabelSurfaces` (same map, same spacing), reused across
    calls (a registration's aligns share the fixed map).
    """
    _same_shape(warped_seg, fixed_seg, "hausd")
    a, b = np.asarray(warped_seg), np.asarray(fixed_seg)
    surf_b = fixed_surfaces if fixed_surfaces is not None else LabelSurfaces(b, spacing)
    if surf_b.seg.shape != b.shape or not np.array_equal(surf_b.spacing, [float(v) for v in spacing]):
        raise ConfigError("hausd: fixed_surfaces were computed for another grid")
    surf_a = LabelSurfaces(a, spacing)
    shared_flat = (surf_a.edge & surf_b.edge & (a == b)).ravel()  # on the same label's surface in both maps
    _, p1, p2 = surf_a.lookup.padded_shape
    offsets = _stencil_offsets(surf_a.spacing, (p1 * p2, p2, 1))  # C-order strides of the padded grid

    def distances(query: np.ndarray, lab: int, target: LabelSurfaces) -> np.ndarray:
        d = _nearest_nearby(query, lab, a.shape, target.lookup, offsets)
        far = np.isnan(d)
        if far.any():
            d[far] = target.tree(lab).query(target.points(query[far]), k=1)[0]
        return d

    labels = sorted(lab for lab in set(surf_a.surfaces) | set(surf_b.surfaces) if lab != 0)
    out = dict.fromkeys(labels, float("nan"))

    def one_label(lab: int) -> None:
        if lab not in surf_a.surfaces or lab not in surf_b.surfaces:
            return
        fa, fb = surf_a.surfaces[lab], surf_b.surfaces[lab]
        sa, sb = shared_flat[fa], shared_flat[fb]
        d_ab = distances(fa[~sa], lab, surf_b)
        d_ba = distances(fb[~sb], lab, surf_a)
        zeros = np.zeros(int(sa.sum()) + int(sb.sum()))
        out[lab] = float(np.percentile(np.concatenate([zeros, d_ab, d_ba]), 95))

    # largest surfaces first, so that the threads finish together
    size = {lab: len(surf_a.surfaces.get(lab, ())) + len(surf_b.surfaces.get(lab, ())) for lab in labels}
    _on_threads(one_label, sorted(labels, key=lambda lab: -size[lab]))
    return out


def _gradient(block: np.ndarray, axis: int) -> np.ndarray:
    """``np.gradient`` along ``axis`` (central differences, one-sided first-order at the edges)."""
    n = block.shape[axis]
    out = np.zeros_like(block)
    if n < 2:
        return out

    def sl(lo: int, hi: int | None) -> tuple:
        idx = [slice(None)] * block.ndim
        idx[axis] = slice(lo, hi)
        return tuple(idx)

    if n > 2:
        np.subtract(block[sl(2, None)], block[sl(0, -2)], out=out[sl(1, -1)])
        out[sl(1, -1)] *= 0.5
    np.subtract(block[sl(1, 2)], block[sl(0, 1)], out=out[sl(0, 1)])
    np.subtract(block[sl(n - 1, n)], block[sl(n - 2, n - 1)], out=out[sl(n - 1, n)])
    return out


def _combine(terms: list[tuple[np.ndarray, float]], constant: float) -> np.ndarray | float:
    """``sum(t * c) + constant`` over the terms with ``c != 0`` (a float when there is none)."""
    out = None
    for t, c in terms:
        if c == 0:
            continue
        if out is None:
            out = t * c
        else:
            out += t * c if c != 1 else t
    if out is None:
        return constant
    if constant:
        out += constant
    return out


def jacobian_determinant(field: DisplacementField, *, slab: int = 4) -> np.ndarray:
    """Determinant of the Jacobian of ``x -> x + u(x)`` in world mm, per voxel of the field's grid.

    Derivatives are central differences (one-sided at the edges, as ``np.gradient``) along voxel
    axes, converted to world derivatives with the grid's inverse affine; the 3 x 3 determinant is
    written out (cofactor expansion).  Computed in float64 in slabs of ``slab`` planes along the first
    axis, on threads (memory: a few copies of one slab per thread; at 256^3, slabs of 4 planes took
    1.3 s and slabs of 16 1.8-2.9 s: small temporaries are reused, large ones page-fault afresh).

    Returns:
        ``(I, J, K)`` float64.
    """
    if field.batch_size != 1:
        raise ShapeError("jacobian_determinant expects a batch-1 displacement field")
    disp = field.displacement[0].detach().cpu().numpy()  # (3, I, J, K)
    affine = field.grid_affine.detach().cpu().double().numpy().reshape(-1, 4, 4)[0]
    v = np.linalg.inv(affine[:3, :3]).tolist()  # d(voxel)/d(world)
    n = disp.shape[1]
    det = np.empty(disp.shape[1:], dtype=np.float64)

    def one_slab(start: int) -> None:
        stop = min(start + slab, n)
        lo, hi = max(start - 1, 0), min(stop + 1, n)
        block = disp[:, lo:hi].astype(np.float64)
        inner = slice(start - lo, start - lo + stop - start)
        # g[a][c] = d u_c / d voxel_a on the slab; axes of length 1 have no derivative
        g = [_gradient(block, 1 + a)[:, inner] for a in range(3)]
        # jac[c][w] = delta_cw + sum_a g[a][c] * v[a][w]  (zero terms of v skipped: axis-aligned grids)
        j = [[_combine([(g[a][c], v[a][w]) for a in range(3)], 1.0 if c == w else 0.0)
              for w in range(3)] for c in range(3)]
        det[start:stop] = (j[0][0] * (j[1][1] * j[2][2] - j[1][2] * j[2][1])
                           - j[0][1] * (j[1][0] * j[2][2] - j[1][2] * j[2][0])
                           + j[0][2] * (j[1][0] * j[2][1] - j[1][1] * j[2][0]))

    _on_threads(one_slab, range(0, n, slab))
    return det


def _on_threads(work: Any, items: Sequence[Any]) -> None:
    """``work(item)`` for every item, on as many threads as torch may use (numpy's array operations
    release the GIL, so independent slabs run in parallel; each writes its own part of the result)."""
    threads = min(torch.get_num_threads(), len(items))
    if threads < 2:
        for item in items:
            work(item)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads, thread_name_prefix="keyreg-metric") as pool:
        list(pool.map(work, items))


def jacobian_determinant_stats(transform: Any) -> dict[str, float]:
    """``jdstd`` (standard deviation of the Jacobian determinant) and ``jdlessthan0`` (fraction of
    voxels with determinant <= 0) of a ``moving_from_fixed`` transform in world mm.

    An affine transform has a constant determinant: ``jdstd`` is 0 and ``jdlessthan0`` is 0 or 1.
    """
    if isinstance(transform, AffineTransform):
        d = float(np.linalg.det(transform.matrix[0, :3, :3].detach().cpu().double().numpy()))
        return {"jdstd": 0.0, "jdlessthan0": float(d <= 0)}
    if isinstance(transform, DisplacementField):
        det = jacobian_determinant(transform)
        return {"jdstd": float(det.std()), "jdlessthan0": float(np.mean(det <= 0))}
    raise ConfigError(f"Jacobian statistics need an affine or a displacement field, got {type(transform).__name__}")


def compute_metrics(
    names: Sequence[str],
    *,
    warped_image: np.ndarray | None = None,
    fixed_image: np.ndarray | None = None,
    warped_seg: np.ndarray | None = None,
    fixed_seg: np.ndarray | None = None,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    transform: Any = None,
    fixed_shape: Sequence[int] | None = None,
    fixed_affine: np.ndarray | None = None,
    moving_seg: np.ndarray | None = None,
    moving_affine: np.ndarray | None = None,
    fixed_surfaces: LabelSurfaces | None = None,
) -> dict[str, Any]:
    """Evaluate ``names`` (see :data:`METRICS`); metrics whose inputs are missing raise.
    ``fixed_surfaces``: the fixed segmentation's :class:`LabelSurfaces`, when kept across aligns.

    Returns:
        Scalars under each metric name; Dice and Hausdorff also give ``<name>_per_label``
        (label id -> value).
    """
    out: dict[str, Any] = {}
    names = parse_metrics(list(names))
    for name in names:
        need = METRICS[name]
        if need == "image" and (warped_image is None or fixed_image is None):
            raise ConfigError(f"metric {name!r} needs the warped and the fixed image")
        if need == "seg" and (warped_seg is None or fixed_seg is None):
            raise ConfigError(f"metric {name!r} needs --moving_seg and --fixed_seg")
        if need == "transform" and transform is None:
            raise ConfigError(f"metric {name!r} needs the transform")
        if name == "mse":
            out["mse"] = mse(warped_image, fixed_image)
        elif name == "ncc":
            out["ncc"] = ncc(warped_image, fixed_image)
        elif name == "harddice":
            per = dice_per_label(warped_seg, fixed_seg)
            out["harddice"], out["harddice_per_label"] = mean_dice(per), per
        elif name == "braindice":
            per = brain_dice_per_label(warped_seg, fixed_seg)
            out["braindice"], out["braindice_per_label"] = mean_dice(per), per
        elif name == "softdice":
            if moving_seg is None or moving_affine is None or fixed_affine is None:
                raise ConfigError("metric 'softdice' needs the moving segmentation and both affines")
            per = soft_dice_per_label(moving_seg, moving_affine, fixed_seg, fixed_affine, transform)
            out["softdice"], out["softdice_per_label"] = mean_dice(per), per
        elif name == "hausd":
            per = hausdorff95_per_label(warped_seg, fixed_seg, spacing, fixed_surfaces=fixed_surfaces)
            out["hausd"], out["hausd_per_label"] = mean_dice(per), per
        elif name in ("jdstd", "jdlessthan0"):
            if "jdstd" not in out:
                out.update(jacobian_determinant_stats(transform))
    # keep only what was asked for among the Jacobian pair
    for k in ("jdstd", "jdlessthan0"):
        if k in out and k not in names:
            del out[k]
    return out
