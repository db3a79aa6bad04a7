"""Anatomical keypoints: each keypoint is the centroid of a named region of a FreeSurfer label map.

A region is either a whole structure (``Left-Hippocampus``) or a sub-region of a large structure
(``Left-Cerebral-Cortex/anterior-superior``).  Sub-regions are defined in a *reference frame*: every
label map is brought into it by the affine that maps its structure centroids (the *anchors*) onto the
reference's, and a voxel of a split structure belongs to the sub-region whose centre (in that frame)
is nearest.  The definition is a few kilobytes of JSON and travels in the model config, so the same
regions, and hence exact training targets, follow from any label map.

Frames: label maps are ``(I, J, K)`` integer arrays with a world-from-voxel affine (RAS mm); centroids
are world RAS mm of that map; ``centers`` and ``template`` are in the reference frame (mm).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ConfigError

__all__ = ["Region", "RegionAtlas", "FREESURFER_NAMES", "structure_name"]

#: FreeSurfer lookup-table names of the ids the label maps use (others: ``Label-<id>``).
FREESURFER_NAMES: dict[int, str] = {
    2: "Left-Cerebral-White-Matter", 3: "Left-Cerebral-Cortex", 4: "Left-Lateral-Ventricle",
    5: "Left-Inf-Lat-Vent", 7: "Left-Cerebellum-White-Matter", 8: "Left-Cerebellum-Cortex",
    10: "Left-Thalamus", 11: "Left-Caudate", 12: "Left-Putamen", 13: "Left-Pallidum", 14: "3rd-Ventricle",
    15: "4th-Ventricle", 16: "Brain-Stem", 17: "Left-Hippocampus", 18: "Left-Amygdala", 24: "CSF",
    25: "Left-Lesion", 26: "Left-Accumbens-area", 28: "Left-VentralDC", 30: "Left-vessel",
    31: "Left-choroid-plexus", 41: "Right-Cerebral-White-Matter", 42: "Right-Cerebral-Cortex",
    43: "Right-Lateral-Ventricle", 44: "Right-Inf-Lat-Vent", 46: "Right-Cerebellum-White-Matter",
    47: "Right-Cerebellum-Cortex", 49: "Right-Thalamus", 50: "Right-Caudate", 51: "Right-Putamen",
    52: "Right-Pallidum", 53: "Right-Hippocampus", 54: "Right-Amygdala", 57: "Right-Lesion",
    58: "Right-Accumbens-area", 60: "Right-VentralDC", 62: "Right-vessel", 63: "Right-choroid-plexus",
    72: "5th-Ventricle", 85: "Optic-Chiasm",
}


def structure_name(labels: Sequence[int]) -> str:
    """Name of a structure made of FreeSurfer ``labels``."""
    parts = [FREESURFER_NAMES.get(int(i), f"Extracerebral-{i}" if int(i) >= 500 else f"Label-{i}") for i in labels]
    return "+".join(parts)


@dataclass(frozen=True)
class Region:
    """One keypoint's region.

    Attributes:
        name: unique name (``Left-Putamen``, ``Left-Cerebral-Cortex/anterior-superior``).
        labels: FreeSurfer ids of the parent structure.
        center: for a sub-region, its centre in the reference frame (mm); ``None`` for a whole structure.
    """

    name: str
    labels: tuple[int, ...]
    center: tuple[float, float, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "labels": list(self.labels)}
        if self.center is not None:
            d["center"] = [round(float(c), 3) for c in self.center]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Region":
        try:
            labels = tuple(int(i) for i in d["labels"])
            center = d.get("center")
            if center is not None:
                center = tuple(float(c) for c in center)
                if len(center) != 3 or not np.all(np.isfinite(center)):
                    raise ValueError("center must be 3 finite numbers")
            return cls(str(d["name"]), labels, center)  # type: ignore[arg-type]
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"invalid region in model config: {e}") from None


def _centroids_of(labels: np.ndarray, affine: np.ndarray, ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """World centroids ``(n, 3)`` of each id and its voxel count ``(n,)`` (NaN where absent)."""
    flat = labels.reshape(-1)
    table = np.full(int(max(int(flat.max()), max(ids))) + 1, -1, dtype=np.int64)
    for n, i in enumerate(ids):
        table[int(i)] = n
    member = table[flat]
    keep = member >= 0
    idx = np.nonzero(keep)[0]
    which = member[keep]
    count = np.bincount(which, minlength=len(ids)).astype(np.float64)
    coords = np.stack(np.unravel_index(idx, labels.shape), 1).astype(np.float64)
    sums = np.stack([np.bincount(which, weights=coords[:, a], minlength=len(ids)) for a in range(3)], 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        vox = sums / count[:, None]
    world = vox @ affine[:3, :3].T + affine[:3, 3]
    world[count == 0] = np.nan
    return world, count


def _fit_affine_np(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares 4x4 affine with ``dst ~ A src`` (rows are points)."""
    h = np.concatenate([src, np.ones((len(src), 1))], 1)
    sol, *_ = np.linalg.lstsq(h, dst, rcond=None)
    out = np.eye(4)
    out[:3, :] = sol.T
    return out


@dataclass(frozen=True)
class RegionAtlas:
    """The keypoint definitions of a model.

    Attributes:
        regions: one per keypoint, in output-channel order.
        anchor_labels: ids whose centroids define the reference frame of a label map.
        anchor_centroids: ``(len(anchor_labels), 3)`` their centroids in the reference frame (mm).
        template: ``(K, 3)`` mean keypoint positions in the reference frame (mm), for canonicalisation.
    """

    regions: tuple[Region, ...]
    anchor_labels: tuple[int, ...]
    anchor_centroids: np.ndarray
    template: np.ndarray

    def __post_init__(self) -> None:
        names = [r.name for r in self.regions]
        if len(set(names)) != len(names):
            raise ConfigError("region names must be unique")
        if self.anchor_centroids.shape != (len(self.anchor_labels), 3):
            raise ConfigError("anchor_centroids must be (len(anchor_labels), 3)")
        if self.template.shape != (len(self.regions), 3) or not np.all(np.isfinite(self.template)):
            raise ConfigError("template must be (K, 3) finite numbers")

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.regions]

    def __len__(self) -> int:
        return len(self.regions)

    # -- (de)serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"regions": [r.to_dict() for r in self.regions], "anchor_labels": list(self.anchor_labels),
                "anchor_centroids": np.round(self.anchor_centroids, 3).tolist(),
                "template": np.round(self.template, 3).tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RegionAtlas":
        if not isinstance(d, dict):
            raise ConfigError("regions in model config must be an object")
        try:
            regions = tuple(Region.from_dict(r) for r in d["regions"])
            anchors = tuple(int(i) for i in d["anchor_labels"])
            cents = np.asarray(d["anchor_centroids"], dtype=np.float64).reshape(-1, 3)
            template = np.asarray(d["template"], dtype=np.float64).reshape(-1, 3)
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"invalid regions in model config: {e}") from None
        return cls(regions, anchors, cents, template)

    # -- label map -> regions ------------------------------------------------------------------------
    def reference_from_world(self, labels: np.ndarray, affine: np.ndarray) -> np.ndarray:
        """``(4, 4)`` affine from this label map's world (mm) to the reference frame, fitted to the
        anchors present in the map."""
        world, count = _centroids_of(labels, affine, self.anchor_labels)
        ok = count > 0
        if ok.sum() < 4:
            raise ConfigError("label map has fewer than 4 of the anchor structures; cannot place its regions")
        return _fit_affine_np(world[ok], self.anchor_centroids[ok])

    def region_map(self, labels: np.ndarray, affine: np.ndarray) -> np.ndarray:
        """``(I, J, K)`` int16: region index + 1 of every voxel (0: in no region)."""
        labels = np.asarray(labels)
        out = np.zeros(labels.shape, dtype=np.int16)
        ref = None
        by_parent: dict[tuple[int, ...], list[int]] = {}
        for k, r in enumerate(self.regions):
            by_parent.setdefault(r.labels, []).append(k)
        for parent, ks in by_parent.items():
            mask = np.isin(labels, parent)
            if not mask.any():
                continue
            if len(ks) == 1 and self.regions[ks[0]].center is None:
                out[mask] = ks[0] + 1
                continue
            if ref is None:
                ref = self.reference_from_world(labels, affine) @ affine
            idx = np.nonzero(mask.reshape(-1))[0]
            vox = np.stack(np.unravel_index(idx, labels.shape), 1).astype(np.float64)
            pts = vox @ ref[:3, :3].T + ref[:3, 3]
            centers = np.asarray([self.regions[k].center for k in ks], dtype=np.float64)
            from scipy.spatial import cKDTree

            nearest = cKDTree(centers).query(pts)[1]  # memory O(voxels), not voxels x centres
            out.reshape(-1)[idx] = np.asarray(ks, dtype=np.int16)[nearest] + 1
        return out

    def centroids(self, labels: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """True keypoints of a label map: ``(K, 3)`` world RAS mm (NaN where a region is absent) and
        ``(K,)`` voxel counts."""
        rmap = self.region_map(labels, affine)
        return _centroids_of(rmap, affine, list(range(1, len(self.regions) + 1)))


# --------------------------------------------------------------------------------------------------
# building an atlas from training label maps


def _direction_name(offset: np.ndarray, extent: np.ndarray, hemisphere: str | None) -> str:
    """``anterior-superior-lateral`` style words for an offset from a structure's centre (RAS mm);
    ``hemisphere`` (``"Left"``/``"Right"``) turns left/right into medial/lateral."""
    words = ["", "", ""]
    for axis, (neg, pos) in enumerate((("left", "right"), ("posterior", "anterior"), ("inferior", "superior"))):
        if axis == 0 and hemisphere == "Left":
            neg, pos = "lateral", "medial"
        elif axis == 0 and hemisphere == "Right":
            neg, pos = "medial", "lateral"
        rel = offset[axis] / max(extent[axis], 1e-6)
        if rel > 0.25:
            words[axis] = pos
        elif rel < -0.25:
            words[axis] = neg
    return "-".join(w for w in (words[1], words[2], words[0]) if w) or "central"


def build_atlas(
    maps: Sequence[tuple[np.ndarray, np.ndarray]],
    splits: dict[tuple[int, ...], int],
    *,
    min_voxels_mm3: float = 150.0,
    seed: int = 0,
) -> tuple[RegionAtlas, dict[str, Any]]:
    """Define regions from training label maps.

    Args:
        maps: ``(labels, affine)`` pairs; the first is the reference.
        splits: parent structure (ids) -> number of sub-regions; other structures are kept whole.
        min_voxels_mm3: smallest mean volume (mm^3) of a structure kept as a keypoint; a structure must
            be present in every map.
        seed: k-means seed.

    Returns:
        the atlas, and consistency statistics: for whole structures and for sub-regions, the median
        over regions of the RMS distance (mm, reference frame) between each map's region centroid and
        the template.
    """
    from scipy.cluster.vq import kmeans2

    vol = [abs(np.linalg.det(a[:3, :3])) for _, a in maps]
    present: set[int] | None = None
    sizes: dict[int, list[float]] = {}
    for (lab, _), v in zip(maps, vol):
        ids, cnt = np.unique(lab, return_counts=True)
        ids_set = {int(i) for i in ids if i > 0}
        present = ids_set if present is None else present & ids_set
        for i, c in zip(ids, cnt):
            sizes.setdefault(int(i), []).append(float(c) * v)
    assert present is not None
    split_ids = {i for p in splits for i in p}
    whole = sorted(i for i in present if i not in split_ids and np.mean(sizes[i]) >= min_voxels_mm3)
    anchors = tuple(i for i in whole if i < 500) + tuple(sorted(split_ids & present))
    ref_lab, ref_aff = maps[0]
    ref_c, _ = _centroids_of(ref_lab, ref_aff, anchors)
    to_ref = []
    for lab, aff in maps:
        c, _ = _centroids_of(lab, aff, anchors)
        ok = np.isfinite(c).all(1)
        to_ref.append(_fit_affine_np(c[ok], ref_c[ok]))
    # refine the reference centroids to the mean over maps (a less subject-specific frame)
    mean_c = np.nanmean(np.stack([(_centroids_of(lab, aff, anchors)[0]) @ t[:3, :3].T + t[:3, 3]
                                  for (lab, aff), t in zip(maps, to_ref)]), 0)
    to_ref = []
    for lab, aff in maps:
        c, _ = _centroids_of(lab, aff, anchors)
        ok = np.isfinite(c).all(1)
        to_ref.append(_fit_affine_np(c[ok], mean_c[ok]))
    rng = np.random.default_rng(seed)
    regions: list[Region] = [Region(structure_name((i,)), (i,)) for i in whole]
    for parent, n in splits.items():
        if not set(parent) <= present:
            continue
        pts = []
        for (lab, aff), t in zip(maps, to_ref):
            idx = np.nonzero(np.isin(lab, parent).reshape(-1))[0]
            idx = rng.choice(idx, size=min(len(idx), 4000), replace=False)
            vox = np.stack(np.unravel_index(idx, lab.shape), 1).astype(np.float64)
            pts.append(vox @ (t @ aff)[:3, :3].T + (t @ aff)[:3, 3])
        allp = np.concatenate(pts)
        centers, _ = kmeans2(allp, n, minit="++", seed=seed, iter=30)
        mid, ext = allp.mean(0), allp.std(0) * 1.5
        hemi = structure_name(parent).split("-")[0] if structure_name(parent).split("-")[0] in ("Left", "Right") else None
        names = [f"{structure_name(parent)}/{_direction_name(c - mid, ext, hemi)}" for c in centers]
        ordered = sorted(zip(centers.tolist(), names), key=lambda t: t[1])
        for k, (c, nm) in enumerate(ordered):
            dup = sum(1 for _, m in ordered[:k] if m == nm)
            regions.append(Region(nm if dup == 0 else f"{nm}-{dup + 1}", parent, tuple(c)))
    provisional = RegionAtlas(tuple(regions), anchors, mean_c, np.zeros((len(regions), 3)))
    cents = []
    for (lab, aff), t in zip(maps, to_ref):
        c, _ = provisional.centroids(lab, aff)
        cents.append(c @ t[:3, :3].T + t[:3, 3])
    cents = np.stack(cents)  # (maps, K, 3) reference frame
    template = np.nanmean(cents, 0)
    atlas = RegionAtlas(tuple(regions), anchors, mean_c, template)
    rms = np.sqrt(np.nanmean(((cents - template) ** 2).sum(-1), 0))
    is_sub = np.array([r.center is not None for r in regions])
    stats = {"num_regions": len(regions), "num_whole": int((~is_sub).sum()), "num_sub": int(is_sub.sum()),
             "rms_whole_mm_median": float(np.median(rms[~is_sub])),
             "rms_sub_mm_median": float(np.median(rms[is_sub])) if is_sub.any() else None,
             "rms_sub_mm_p90": float(np.percentile(rms[is_sub], 90)) if is_sub.any() else None}
    return atlas, stats
