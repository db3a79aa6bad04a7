"""Training data: banks of label maps (synthetic contrasts) or real images, and the pairs drawn from them.

Every pair lives on the model's network grid (RAS, ``GridSpec`` of the model config) centred on
each source's field of view, so keypoints in world mm of that grid are what the fits see at test
time. Spatial augmentation is applied to the label map (or image) with a single resampling.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, ImageIOError
from ..geometry import apply_affine, fov_center
from ..io import is_nifti_path, load_volume
from ..preprocess import GridSpec, PreprocessConfig, network_grid_affine, to_network_input
from ..transforms import AffineTransform
from .losses import warp_on_grid
from .synth import (IntensityAugment, SpatialAugment, brain_weight, mixed_means, random_affine, random_brain_motion,
                    random_means, random_smooth_field, synthesize_image, warp_labels_on_grid)

__all__ = ["LabelMapBank", "PairBatch", "SyntheticPairs", "ImagePairs", "list_label_maps", "brain_label_table",
           "read_image_table"]

#: size of the id lookup tables (FreeSurfer ids used by the maps are < 1024)
ID_TABLE = 1024

#: FreeSurfer ids of the left-hemisphere structures and their right-hemisphere twins (the rest are
#: midline or extra-cerebral and keep their id in a mirror image)
LEFT_RIGHT_IDS: tuple[tuple[int, int], ...] = (
    (2, 41), (3, 42), (4, 43), (5, 44), (7, 46), (8, 47), (10, 49), (11, 50), (12, 51), (13, 52), (17, 53),
    (18, 54), (19, 55), (20, 56), (25, 57), (26, 58), (27, 59), (28, 60), (30, 62), (31, 63),
    (136, 163), (137, 164))  # the last two: lateral pairs of SynthSeg's training maps (../shared README)


def mirror_label_map(labels: torch.Tensor) -> torch.Tensor:
    """The left-right mirror image of a label map on a RAS grid: voxel axis 0 (x) reversed and every
    left structure's id swapped with its right twin's (:data:`LEFT_RIGHT_IDS`), so the result is the
    label map of a plausible brain whose asymmetries are reversed.

    Args:
        labels: ``(I, J, K)`` integer ids on a grid whose first voxel axis is world x (RAS).
    """
    lut = torch.arange(ID_TABLE, dtype=torch.long, device=labels.device)
    for left, right in LEFT_RIGHT_IDS:
        lut[left], lut[right] = right, left
    return lut[labels.flip(0).long()].to(labels.dtype)


def list_label_maps(sources: Sequence[str | Path]) -> list[Path]:
    """Files given directly, or the NIfTI files of given directories (sorted)."""
    out: list[Path] = []
    for s in sources:
        p = Path(s)
        if p.is_dir():
            out += sorted(q for q in p.iterdir() if is_nifti_path(q))
        elif p.is_file():
            out.append(p)
        else:
            raise ImageIOError(f"{p}: no such file or directory")
    if not out:
        raise ImageIOError(f"no label maps found in {', '.join(map(str, sources))}")
    return out


def brain_label_table(ids: Sequence[int]) -> tuple[torch.Tensor, list[int]]:
    """Lookup ``(ID_TABLE,)`` raw id -> class index for the Dice loss, and the class ids.

    Classes are the brain structures (0 < id < 500); background and extra-cerebral tissue map to 0.
    """
    brain = sorted(int(i) for i in set(ids) if 0 < int(i) < 500)
    lut = torch.zeros(ID_TABLE, dtype=torch.long)
    for c, i in enumerate(brain, start=1):
        lut[i] = c
    return lut, brain


class LabelMapBank:
    """Label maps held in memory on a storage grid (RAS, ``storage_voxel`` mm, centred on each map's
    field of view), as int16 on ``device``.

    With ``mirror``, the left-right mirror image of every map (:func:`mirror_label_map`) follows the
    maps read from ``paths``: twice the subjects to train on.  ``num_sources`` counts the maps read.
    """

    def __init__(self, paths: Sequence[Path], *, storage_voxel: float = 2.0, storage_shape: int = 128,
                 device: torch.device | str = "cpu", mirror: bool = False) -> None:
        self.paths = list(paths)
        self.device = torch.device(device)
        self.maps: list[torch.Tensor] = []
        self.affines: list[torch.Tensor] = []
        ids: set[int] = set()
        grid = GridSpec("ras", (storage_shape,) * 3, (storage_voxel,) * 3)
        for p in self.paths:
            vol = load_volume(p, kind="labels")
            if int(vol.data.max()) >= ID_TABLE or int(vol.data.min()) < 0:
                raise ConfigError(f"{p}: label ids must be in [0, {ID_TABLE})")
            if not vol.data.any():
                raise ConfigError(f"{p}: label map is empty (all background), nothing to learn from")
            out_aff = network_grid_affine(vol.affine, vol.shape, grid)
            src = torch.from_numpy(vol.data.astype(np.int16)).to(self.device)[None, None]
            lab = warp_labels_on_grid(src, torch.from_numpy(vol.affine), grid.shape, torch.from_numpy(out_aff),
                                      torch.eye(4, dtype=torch.float64)[None])
            self.maps.append(lab[0, 0].to(torch.int16))
            self.affines.append(torch.from_numpy(out_aff))
            ids.update(torch.unique(lab).tolist())
        self.num_sources = len(self.maps)
        if mirror:
            self.maps += [mirror_label_map(m) for m in self.maps]
            self.affines += self.affines
            ids.update(torch.unique(torch.stack(self.maps[self.num_sources:])).tolist())
        self.ids = sorted(ids)

    def __len__(self) -> int:
        return len(self.maps)

    def set_regions(self, atlas) -> None:
        """Compute each map's region map (``RegionAtlas.region_map``: region index + 1, 0 none) on the
        storage grid; warped with the labels, it gives exact keypoint targets."""
        self.atlas = atlas
        self.region_maps = [torch.from_numpy(atlas.region_map(m.cpu().numpy(), a.numpy())).to(self.device)
                            for m, a in zip(self.maps, self.affines)]


@dataclass
class PairBatch:
    """A batch of training pairs on the network grid.

    Attributes:
        fixed, moving: ``(B, 1, *grid)`` images in [0, 1].
        fixed_labels, moving_labels: ``(B, 1, *grid)`` raw label ids.
        grid_affine: ``(4, 4)`` world-from-voxel of the network grid (shared by the batch).
        moving_alt: ``(B, 1, *grid)`` the moving anatomy in a second contrast (same spatial transform),
            for the keypoint-consistency loss, or ``None``.
        fixed_transform, moving_transform: ``(B, 4, 4)`` the affine part of each image's augmentation
            (network world -> storage world).
    """

    fixed: torch.Tensor
    moving: torch.Tensor
    fixed_labels: torch.Tensor
    moving_labels: torch.Tensor
    grid_affine: torch.Tensor
    moving_alt: torch.Tensor | None = None
    fixed_transform: torch.Tensor | None = None
    moving_transform: torch.Tensor | None = None
    fixed_index: list[int] | None = None
    moving_index: list[int] | None = None
    fixed_regions: torch.Tensor | None = None
    moving_regions: torch.Tensor | None = None


class SyntheticPairs:
    """Random pairs of synthetic images from a :class:`LabelMapBank`.

    Args:
        bank: the label maps.
        grid: the network input grid (``mode="ras"``).
        spatial: augmentation ranges (the rotation range covers the sphere by default).
        intensity: intensity model ranges.
        same_subject_prob: probability that fixed and moving come from the same map.
        mix_modalities: fixed and moving get independent contrasts (otherwise one shared contrast).
        consistency: also return the moving anatomy in a second contrast.
    """

    def __init__(self, bank: LabelMapBank, grid: GridSpec, *, spatial: SpatialAugment | None = None,
                 intensity: IntensityAugment | None = None, same_subject_prob: float = 0.2,
                 mix_modalities: bool = True, consistency: bool = False) -> None:
        if grid.mode != "ras":
            raise ConfigError("synthetic training needs a 'ras' network grid")
        self.bank, self.grid = bank, grid
        self.spatial = spatial or SpatialAugment()
        self.intensity = intensity or IntensityAugment()
        self.same_subject_prob = same_subject_prob
        self.mix_modalities = mix_modalities
        self.consistency = consistency
        self.brains: list[tuple[torch.Tensor, torch.Tensor]] = []  # per map: brain weight, brain centre (mm)
        if self.spatial.brain_motion_prob > 0:
            for m, a in zip(bank.maps, bank.affines):
                w = brain_weight(m, float(a[:3, :3].norm(dim=0).min()))
                inside = torch.nonzero(w >= 1).double()
                vox = inside.mean(0) if len(inside) else (torch.tensor(w.shape, dtype=torch.float64) - 1) / 2
                self.brains.append((w, apply_affine(a.double(), vox[None])[0]))

    def grid_affine(self, index: int) -> torch.Tensor:
        """Network-grid affine of map ``index`` (its storage grid's centre, network voxel size)."""
        store = self.bank.affines[index].numpy()
        n = self.bank.maps[index].shape
        return torch.from_numpy(network_grid_affine(store, n, self.grid))

    def _warped_labels(self, index: int, g: torch.Generator, net_affine: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        dev = self.bank.device
        shape = self.grid.shape
        center = torch.from_numpy(fov_center(net_affine.numpy(), shape))
        mat = random_affine(1, g, center, self.spatial, device=dev)
        disp = None
        if self.spatial.max_displacement > 0:
            disp = random_smooth_field(1, shape, float(self.grid.voxel_size[0]), g, self.spatial, device=dev)
        src = self.bank.maps[index][None, None]
        if getattr(self.bank, "region_maps", None) is not None:  # labels and regions in one resampling
            src = torch.cat([src, self.bank.region_maps[index][None, None]], 1)
        inner = None
        if self.brains:  # the brain moved within the head
            weight, centre = self.brains[index]
            inner = (weight, random_brain_motion(1, g, centre, self.spatial, device=dev))
        lab = warp_labels_on_grid(src, self.bank.affines[index], shape, net_affine, mat, disp, inner)
        return lab, mat

    def sample(self, batch: int, generator: torch.Generator) -> PairBatch:
        """Draw ``batch`` pairs (all randomness from ``generator``)."""
        g, n = generator, len(self.bank)
        dev = self.bank.device
        f_lab, m_lab, f_mat, m_mat, f_idx, m_idx = [], [], [], [], [], []
        # all maps share one network grid geometry relative to their storage grid; use map 0's
        net_affine = self.grid_affine(0)
        # which maps: drawn for the whole batch at once (one device -> host transfer)
        for u_i, u_same, u_j in torch.rand((batch, 3), generator=g, device=dev).tolist():
            i = min(int(u_i * n), n - 1)
            same = n == 1 or u_same < self.same_subject_prob
            j = i if same else (i + 1 + min(int(u_j * (n - 1)), n - 2)) % n
            lf, mf = self._warped_labels(i, g, net_affine)
            lm, mm = self._warped_labels(j, g, net_affine)
            f_lab.append(lf), m_lab.append(lm), f_mat.append(mf), m_mat.append(mm)
            f_idx.append(i), m_idx.append(j)
        fixed_labels, moving_labels = torch.cat(f_lab), torch.cat(m_lab)
        f_reg = m_reg = None
        if fixed_labels.shape[1] == 2:
            f_reg, m_reg = fixed_labels[:, 1:], moving_labels[:, 1:]
            fixed_labels, moving_labels = fixed_labels[:, :1], moving_labels[:, :1]
        means_f = mixed_means(batch, ID_TABLE, g, device=dev)
        means_m = mixed_means(batch, ID_TABLE, g, device=dev) if self.mix_modalities else means_f
        fixed = synthesize_image(fixed_labels, g, augment=self.intensity, means=means_f)
        moving = synthesize_image(moving_labels, g, augment=self.intensity, means=means_m)
        alt = None
        if self.consistency:
            alt = synthesize_image(moving_labels, g, augment=self.intensity,
                                   means=random_means(batch, ID_TABLE, g, device=dev))
        return PairBatch(fixed, moving, fixed_labels, moving_labels, net_affine, alt,
                         torch.cat(f_mat), torch.cat(m_mat), f_idx, m_idx, f_reg, m_reg)


def read_image_table(path: str | Path, *, train: bool = True) -> list[dict]:
    """Images to train on.

    * a CSV with ``img_path, seg_path, mask_path, modality, train`` columns (paths relative to the
      CSV's folder): every row is an image, pairs are drawn at random;
    * a CSV with explicit pairs, ``fixed_img_path, moving_img_path`` (+ optional ``fixed_seg_path,
      moving_seg_path, fixed_modality, moving_modality, train``): only those pairs are used, and
      ``train`` selects pairs (``train=True``) or held-out pairs (``train=False``); each returned
      image row lists its ``moving_partners`` (indices into the returned list);
    * a directory ``ROOT/<modality>/<name>.nii.gz`` with optional ``ROOT/<modality>_seg/<name>.nii.gz``.
    """
    root = Path(path)
    rows: list[dict] = []
    if root.is_file():
        with open(root, newline="") as fh:
            reader = csv.DictReader(fh)
            fields = set(reader.fieldnames or [])

            def resolve(value: str | None) -> str:
                return str((root.parent / value).resolve()) if value else ""

            if {"fixed_img_path", "moving_img_path"} <= fields:
                index: dict[tuple[str, str], int] = {}
                for r in reader:
                    if _truthy(r.get("train")) != train:
                        continue
                    ids = []
                    for side in ("fixed", "moving"):
                        key = (resolve(r[f"{side}_img_path"]), resolve(r.get(f"{side}_seg_path")))
                        if key not in index:
                            index[key] = len(rows)
                            rows.append({"img_path": key[0], "seg_path": key[1], "train": "1" if train else "0",
                                         "modality": r.get(f"{side}_modality") or "image", "moving_partners": []})
                        ids.append(index[key])
                    rows[ids[0]]["moving_partners"].append(ids[1])
            elif "img_path" in fields:
                for r in reader:
                    for k in ("img_path", "seg_path", "mask_path"):
                        r[k] = resolve(r.get(k))
                    rows.append(r)
            else:
                raise ConfigError(f"{root}: CSV needs an img_path column, or fixed_img_path and moving_img_path")
    elif root.is_dir():
        for mod_dir in sorted(d for d in root.iterdir() if d.is_dir() and not d.name.endswith("_seg")):
            seg_dir = root / f"{mod_dir.name}_seg"
            for img in sorted(q for q in mod_dir.iterdir() if is_nifti_path(q)):
                seg = seg_dir / img.name
                rows.append({"img_path": str(img), "seg_path": str(seg) if seg.exists() else "",
                             "modality": mod_dir.name, "train": "1"})
    else:
        raise ImageIOError(f"{root}: no such file or directory")
    if not rows:
        raise ImageIOError(f"{root}: no images found")
    return rows


def _truthy(value: str | None) -> bool:
    return str(value if value is not None else "1").strip().lower() in ("1", "true", "yes", "train")


class ImagePairs:
    """Random pairs of real images (with optional segmentations) on the network grid.

    Each image is preprocessed once (canonical RAS grid, min-max, zeros beyond its field of view) and its
    segmentation resampled (nearest) onto the same grid. All images then share one network frame
    centred at the origin; each draw applies a random affine (one resampling).

    Args:
        rows: from :func:`read_image_table`.
        grid: the network input grid.
        train: use rows whose ``train`` column is true (``False``: the others, for validation).
        mix_modalities: allow pairs of different modalities (otherwise same modality only).
    """

    def __init__(self, rows: Sequence[dict[str, str]], grid: GridSpec, *, spatial: SpatialAugment | None = None,
                 mix_modalities: bool = True, train: bool = True, device: torch.device | str = "cpu") -> None:
        self.grid = grid
        self.spatial = spatial or SpatialAugment()
        self.mix_modalities = mix_modalities
        self.device = torch.device(device)
        explicit = any("moving_partners" in r for r in rows)
        if not explicit:
            rows = [r for r in rows if _truthy(r.get("train")) == train] or list(rows)
        #: explicit (fixed, moving) index pairs from a pair CSV, else None (random pairs)
        self.pairs = [(i, j) for i, r in enumerate(rows) for j in r.get("moving_partners", [])] if explicit else None
        n = np.asarray(grid.shape, dtype=np.float64)
        vs = np.asarray(grid.voxel_size, dtype=np.float64) if grid.mode == "ras" else np.ones(3)
        self.frame = np.eye(4)
        self.frame[:3, :3] = np.diag(vs)
        self.frame[:3, 3] = -vs * (n - 1) / 2
        self.images: list[torch.Tensor] = []
        self.maps: list[torch.Tensor] = []
        self.modalities: list[str] = []
        ids: set[int] = set()
        for r in rows:
            vol = load_volume(r["img_path"], kind="image")
            x, world_from_net = to_network_input(vol, PreprocessConfig(grid=grid), self.device)
            if r.get("seg_path"):
                seg = load_volume(r["seg_path"], kind="labels")
                src = torch.from_numpy(seg.data).to(self.device)[None, None]
                lab = warp_labels_on_grid(src, torch.from_numpy(seg.affine), grid.shape,
                                          torch.from_numpy(world_from_net), torch.eye(4, dtype=torch.float64)[None])
            else:  # no segmentation: the head/brain mask stands in (label 1)
                lab = (x > 0.05).long()
            self.images.append(x)
            self.maps.append(lab[0, 0])
            self.modalities.append(r.get("modality") or "image")
            ids.update(torch.unique(lab).tolist())
        self.ids = sorted(ids)
        self.affines = [torch.from_numpy(self.frame)] * len(self.images)
        if len(self.images) < 2:
            raise ConfigError("training on real images needs at least 2 images")

    def __len__(self) -> int:
        return len(self.images)

    def _draw(self, index: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        frame = torch.from_numpy(self.frame)
        mat = random_affine(1, g, torch.zeros(3), self.spatial, device=self.device)
        aff = frame.to(self.device)[None]
        img = warp_on_grid(self.images[index], aff, aff, AffineTransform(mat))
        lab = warp_labels_on_grid(self.maps[index][None, None], frame, self.grid.shape, frame, mat)
        return img, lab, mat

    def sample(self, batch: int, generator: torch.Generator) -> PairBatch:
        g, n = generator, len(self.images)
        out: dict[str, list] = {k: [] for k in ("fi", "mi", "fl", "ml", "fm", "mm", "fx", "mx")}
        for _ in range(batch):
            if self.pairs:
                i, j = self.pairs[int(torch.randint(len(self.pairs), (), generator=g))]
            else:
                i = int(torch.randint(n, (), generator=g))
                choices = [j for j in range(n) if j != i and (self.mix_modalities or
                                                             self.modalities[j] == self.modalities[i])] or [i]
                j = choices[int(torch.randint(len(choices), (), generator=g))]
            for key, idx in (("f", i), ("m", j)):
                img, lab, mat = self._draw(idx, g)
                out[f"{key}i"].append(img), out[f"{key}l"].append(lab), out[f"{key}m"].append(mat)
                out[f"{key}x"].append(idx)
        return PairBatch(torch.cat(out["fi"]), torch.cat(out["mi"]), torch.cat(out["fl"]), torch.cat(out["ml"]),
                         torch.from_numpy(self.frame), None, torch.cat(out["fm"]), torch.cat(out["mm"]),
                         out["fx"], out["mx"])
