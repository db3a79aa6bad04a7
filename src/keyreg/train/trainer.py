"""The training loop behind ``keyreg train`` and ``keyreg pretrain``.

* ``pretrain``: keypoints regressed onto reference points that move with the image (self-supervised
  initialisation, as in KeyMorph).
* ``train``: keypoints of a pair -> closed-form transform (rigid / affine / TPS with a sampled
  lambda) -> differentiable warp of the moving labels (soft Dice) or image (MSE).

Seeded and resumable: a checkpoint (a directory of safetensors + JSON, never a pickle) holds the
model config and weights, optimizer state, step and every rank's RNG state; it is written to a
temporary directory and renamed; the newest ``keep_checkpoints`` are kept. One run at a time per ``save_dir``
(a lock), and a fresh run never writes into a directory that holds a run's checkpoints. Multi-GPU /
multi-node through ``torchrun`` (DDP; gloo on CPU).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from itertools import product
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..atomic import atomic_write_text
from ..distributed import distributed_env
from ..errors import CheckpointError, ConfigError, ImageIOError, OutputError, first_line
from ..geometry import apply_affine, fov_center, fov_half_extent, normalized_to_voxel
from ..models import KeypointDetector, ModelConfig
from ..models.checkpoint import load_model, save_model
from ..models.detector import ArchitectureConfig
from ..preprocess import GridSpec, IntensitySpec, PreprocessConfig
from ..transforms import AlignSpec, fit_transform
from .data import (ImagePairs, LabelMapBank, PairBatch, SyntheticPairs, brain_label_table, list_label_maps,
                   read_image_table)
from .losses import keypoint_consistency_loss, mse_loss, one_hot, soft_dice_loss, warp_on_grid
from .synth import IntensityAugment, SpatialAugment

__all__ = ["TrainConfig", "Trainer", "sample_lambda", "train"]


@dataclass
class TrainConfig:
    """Every option of a run (saved in each checkpoint; ``--resume`` refuses other values, except those
    in :data:`RESUMABLE_CHANGES`)."""

    mode: str = "train"                      # train | pretrain
    label_maps: list[str] = field(default_factory=list)
    val_label_maps: list[str] = field(default_factory=list)
    data_dir: str | None = None              # real images (directory layout or CSV) instead of label maps
    save_dir: str = "runs/keyreg"
    # model
    name: str = "keyreg-model"
    backbone: str = "truncatedunet"
    num_keypoints: int = 64
    num_levels: int = 4
    num_truncated: int = 2
    f_maps: int = 16
    grid_shape: int = 64
    voxel_size: float = 3.5
    load_path: str | None = None
    # objective
    kp_align_method: str = "tps"             # rigid | affine | tps | mixed
    tps_lmbda: str = "loguniform"            # a number | uniform | lognormal | loguniform
    loss_fn: str = "dice"                    # dice | mse
    kpconsistency_coeff: float = 0.0
    mix_modalities: bool = True
    max_train_keypoints: int | None = None
    weighted_kp_align: bool = False
    max_rotation: float = 180.0
    max_translation: float = 10.0
    full_sphere_prob: float = 0.0            # share of images rotated over the whole sphere
    max_displacement: float = 3.0
    control_spacing: float = 32.0            # mm between the control points of that deformation
    mirror_maps: bool = False                # also train on the left-right mirror image of every label map
    brain_motion: float = 0.0                # share of images whose brain is moved within the head
    fov_cut: float = 0.0                     # share of images whose field of view ends within the head
    regions: str | None = None               # anatomical keypoints: a regions JSON (default: built from the maps)
    dense_coeff: float = 1.0                 # weight of the heatmap-vs-region-mask term (pretrain)
    # optimisation
    steps: int = 1000
    stop_at: int | None = None               # stop after this step (the LR schedule still spans ``steps``)
    max_minutes: float | None = None         # stop after the first step that ends past this wall time (resumable)
    batch_size: int = 2
    lr: float = 3e-4
    lr_schedule: str = "constant"            # constant | cosine (to 5% of lr at the last step)
    seed: int = 0
    use_amp: bool = False
    device: str | None = None
    # bookkeeping
    checkpoint_every: int = 100
    keep_checkpoints: int = 5                # newest step_* checkpoints kept (0: all)
    val_every: int = 100
    num_val_pairs: int = 8
    use_wandb: bool = False

    def validate(self) -> None:
        if self.mode not in ("train", "pretrain"):
            raise ConfigError(f"mode must be train or pretrain, got {self.mode!r}")
        if self.kp_align_method not in ("rigid", "affine", "tps", "mixed"):
            raise ConfigError(f"--kp_align_method must be rigid, affine, tps or mixed, got {self.kp_align_method!r}")
        if self.loss_fn not in ("dice", "mse"):
            raise ConfigError(f"--loss_fn must be dice or mse, got {self.loss_fn!r}")
        sample_lambda(self.tps_lmbda, torch.Generator().manual_seed(0))
        if not self.label_maps and not self.data_dir:
            raise ConfigError("no training data: give --label_maps (files or directories) or --data_dir")
        if self.label_maps and self.data_dir:
            raise ConfigError("give either --label_maps or --data_dir, not both")
        if self.mirror_maps and not self.label_maps:
            raise ConfigError("--mirror_maps mirrors label maps: give --label_maps")
        if self.brain_motion and not self.label_maps:
            raise ConfigError("--brain_motion moves the brain of label maps: give --label_maps")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ConfigError(f"--lr_schedule must be constant or cosine, got {self.lr_schedule!r}")
        if self.steps < 1 or self.batch_size < 1:
            raise ConfigError("--steps and --batch_size must be >= 1")
        if self.stop_at is not None and not 1 <= self.stop_at <= self.steps:
            raise ConfigError(f"--stop_at must be in [1, --steps={self.steps}], got {self.stop_at}")
        if self.max_minutes is not None and not (isinstance(self.max_minutes, (int, float))
                                                 and math.isfinite(self.max_minutes) and self.max_minutes >= 0):
            raise ConfigError(f"--max_minutes must be a finite number >= 0, got {self.max_minutes!r}")
        positive = ("lr", "voxel_size", "control_spacing")  # 0 excluded too
        for name, lo, hi in (("lr", 0.0, None), ("max_rotation", 0.0, 180.0), ("max_displacement", 0.0, None),
                             ("max_translation", 0.0, 500.0), ("full_sphere_prob", 0.0, 1.0),
                             ("voxel_size", 0.0, None), ("kpconsistency_coeff", 0.0, None), ("dense_coeff", 0.0, None),
                             ("brain_motion", 0.0, 1.0), ("fov_cut", 0.0, 1.0), ("control_spacing", 0.0, None)):
            v = getattr(self, name)
            ok = isinstance(v, (int, float)) and math.isfinite(v) and v >= lo and (hi is None or v <= hi)
            if not ok or (name in positive and v == 0):
                rng = f"in [{lo:g}, {hi:g}]" if hi is not None else ("> 0" if name in positive else ">= 0")
                raise ConfigError(f"--{name} must be a finite number {rng}, got {v!r}")
        if self.lr > 1:
            raise ConfigError(f"--lr must be <= 1 (Adam's steps would be as large as the weights), got {self.lr:g}")
        for name, least in (("num_val_pairs", 1), ("val_every", 0), ("checkpoint_every", 0), ("keep_checkpoints", 0)):
            if getattr(self, name) < least:
                raise ConfigError(f"--{name} must be >= {least}, got {getattr(self, name)}")
        if self.max_train_keypoints is not None and self.max_train_keypoints < 1:
            raise ConfigError(f"--max_train_keypoints must be >= 1, got {self.max_train_keypoints}")
        if not self.load_path:  # a loaded model brings its own architecture and grid
            self._check_architecture()
        if self.device:
            from ..pipeline import resolve_device

            resolve_device(self.device)

    def _check_architecture(self) -> None:
        """:class:`ConfigError` for a network that cannot be built or cannot read its grid: every max-pool
        must halve the grid exactly, leaving at least 2 voxels per axis at the deepest level."""
        from ..models.backbones import build_backbone

        if self.f_maps < 1:
            raise ConfigError(f"--f_maps must be >= 1, got {self.f_maps}")
        if self.grid_shape < 8:
            raise ConfigError(f"--grid_shape must be >= 8, got {self.grid_shape}")
        if self.mode == "train" and not (isinstance(self.num_keypoints, int) and self.num_keypoints >= 1):
            raise ConfigError(f"--num_keypoints must be >= 1, got {self.num_keypoints}")
        try:  # pretraining: the regions set the number of keypoints
            arch = ArchitectureConfig(self.backbone, self.num_keypoints if self.mode == "train" else 1,
                                      num_levels=self.num_levels, num_truncated=self.num_truncated, f_maps=self.f_maps)
            with torch.device("meta"):  # no memory, no weights initialised
                build_backbone(arch.backbone, 1, num_levels=arch.num_levels, num_truncated=arch.num_truncated,
                               f_maps=arch.f_maps)
        except ValueError as e:  # ConfigError too
            raise ConfigError(f"architecture --backbone {self.backbone} --num_levels {self.num_levels} "
                              f"--num_truncated {self.num_truncated} --f_maps {self.f_maps}: {e}") from None
        pools = 4 if self.backbone == "conv" else self.num_levels - 1
        if self.grid_shape % 2**pools or self.grid_shape < 2 ** (pools + 1):
            what = "the conv backbone" if self.backbone == "conv" else f"--num_levels {self.num_levels}"
            raise ConfigError(f"--grid_shape {self.grid_shape} does not fit {what}: it must be a multiple of "
                              f"{2**pools} and at least {2 ** (pools + 1)}")


def sample_lambda(spec: str | float, g: torch.Generator) -> float:
    """TPS lambda for one step: a fixed number, or drawn ``uniform`` in [0, 10], ``lognormal``
    (exp N(-1, 1.5), clipped to 10), or ``loguniform`` in [1e-3, 10] (with 20% exactly 0)."""
    try:
        value = float(spec)
    except (TypeError, ValueError):
        value = None
    if value is not None:
        if value < 0 or not math.isfinite(value):
            raise ConfigError(f"--tps_lmbda must be >= 0, got {spec}")
        return value
    u = float(torch.rand((), generator=g))
    if spec == "uniform":
        return 10.0 * u
    if spec == "lognormal":
        return min(10.0, math.exp(-1.0 + 1.5 * float(torch.randn((), generator=g))))
    if spec == "loguniform":
        return 0.0 if u < 0.2 else 10 ** (-3 + 4 * float(torch.rand((), generator=g)))
    raise ConfigError(f"--tps_lmbda must be a number, uniform, lognormal or loguniform, got {spec!r}")


def _distributed() -> tuple[int, int, int]:
    """``(rank, world, local_rank)`` (:func:`keyreg.distributed.distributed_env`), with the process
    group started when there is more than one process."""
    rank, world, local = distributed_env()
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    if dist.is_initialized():
        rank = dist.get_rank()
    return rank, world, local


class Trainer:
    """One training (or pretraining) run; see :func:`train`."""

    def __init__(self, cfg: TrainConfig) -> None:
        cfg.validate()
        self.cfg = cfg
        self.rank, self.world, local = _distributed()
        from ..pipeline import resolve_device

        self.device = resolve_device(cfg.device)  # ConfigError for an unknown or unavailable device
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", local)  # this process's GPU under torchrun
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.save_dir = Path(cfg.save_dir)
        torch.manual_seed(cfg.seed)
        self.gen = torch.Generator(self.device).manual_seed(cfg.seed * 1000 + self.rank)
        grid = GridSpec("ras", (cfg.grid_shape,) * 3, (cfg.voxel_size,) * 3)
        if cfg.mode == "pretrain" and cfg.data_dir:
            raise ConfigError("pretraining learns anatomical keypoints from label maps: give --label_maps")
        if not cfg.data_dir:
            self.bank = LabelMapBank(list_label_maps(cfg.label_maps), device=self.device, mirror=cfg.mirror_maps)
        self.model = self._build_model(grid)
        self.grid = self.model.config.preprocessing.grid
        spatial = SpatialAugment(max_rotation=cfg.max_rotation, full_sphere_prob=cfg.full_sphere_prob,
                                 max_displacement=cfg.max_displacement, control_spacing=cfg.control_spacing,
                                 max_translation=cfg.max_translation, brain_motion_prob=cfg.brain_motion)
        if cfg.data_dir:
            if cfg.kpconsistency_coeff > 0:
                raise ConfigError("--kpconsistency_coeff needs synthetic contrasts (--label_maps)")
            self.pairs = ImagePairs(read_image_table(cfg.data_dir), self.grid, spatial=spatial,
                                    mix_modalities=cfg.mix_modalities, device=self.device)
            self.bank = self.pairs  # maps (segmentations on the network grid), affines, ids
        else:
            if cfg.mode == "pretrain":
                self.bank.set_regions(self.model.config.regions)
            self.pairs = SyntheticPairs(self.bank, self.grid, spatial=spatial, mix_modalities=cfg.mix_modalities,
                                        consistency=cfg.kpconsistency_coeff > 0,
                                        intensity=IntensityAugment(fov_cut_prob=cfg.fov_cut))
        self.lut, self.classes = brain_label_table(self.bank.ids)
        self.lut = self.lut.to(self.device)
        self.model.to(memory_format=torch.channels_last_3d)
        self.net = self.model
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
        self.step = 0
        self.val_pairs: list[PairBatch] | None = None

    # -- model -----------------------------------------------------------------------------------
    def _build_model(self, grid: GridSpec) -> KeypointDetector:
        """The model to train: loaded (``load_path``) or new.  Pretraining makes an anatomical model:
        its keypoints are the regions (the model's own, ``--regions``, or built from the label maps),
        which also fix the number of keypoints."""
        cfg = self.cfg
        if cfg.load_path:
            model = load_model(cfg.load_path, device=self.device)
            if cfg.mode == "pretrain":
                atlas = model.config.regions or self._regions()
                if model.config.regions is None and len(atlas) != model.num_keypoints:
                    raise ConfigError(f"the regions define {len(atlas)} keypoints but the model has "
                                      f"{model.num_keypoints}")
                model.config.regions = model.config.regions or atlas
                model.config.orientation_search = model.config.orientation_search or "always"
                model.config.fit_exclude = model.config.fit_exclude or ANATOMICAL_FIT_EXCLUDE
            model.train()
            return model
        atlas = self._regions() if cfg.mode == "pretrain" else None
        k = len(atlas) if atlas is not None else cfg.num_keypoints
        arch = ArchitectureConfig(cfg.backbone, k, num_levels=cfg.num_levels,
                                  num_truncated=cfg.num_truncated, f_maps=cfg.f_maps)
        # anatomical models read turned grids that reach beyond the image: there they see its background
        intensity = IntensitySpec(outside="background" if atlas is not None else "zero")
        conf = ModelConfig(cfg.name, arch, PreprocessConfig(grid=grid, intensity=intensity),
                           weighting="power" if cfg.weighted_kp_align else None,
                           description=f"{arch.describe()}, {cfg.grid_shape}^3 at {cfg.voxel_size:g} mm"
                                       + (", anatomical keypoints" if atlas is not None else ""),
                           regions=atlas, orientation_search="always" if atlas is not None else False,
                           fit_exclude=ANATOMICAL_FIT_EXCLUDE if atlas is not None else (),
                           check_view_ensemble=atlas is not None)
        return KeypointDetector(conf).to(self.device)

    def _regions(self):
        """Regions for pretraining a model that has none yet: a ``--regions`` file, or built from the
        training label maps."""
        from ..models.regions import RegionAtlas

        if self.cfg.regions:
            try:
                data = json.loads(Path(self.cfg.regions).read_text())
                return RegionAtlas.from_dict(data.get("atlas", data))
            except (OSError, AttributeError, json.JSONDecodeError) as e:
                raise ConfigError(f"--regions {self.cfg.regions}: cannot read a regions file ({e})") from None
        return default_atlas(self.bank)[0]

    def keypoints(self, images: torch.Tensor, grid_affine: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, 1, *grid)`` -> world keypoints ``(B, K, 3)`` (mm) and heatmap mass ``(B, K)``."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16,
                            enabled=self.cfg.use_amp and self.device.type == "cuda"):
            pts, mass = self.net(images)
        vox = normalized_to_voxel(pts.float(), self.grid.shape)
        return apply_affine(grid_affine.to(self.device, torch.float32), vox), mass.float()

    # -- anatomical keypoints (pretraining) -----------------------------------------------------------
    def _anatomical_targets(self, regions: torch.Tensor, affine: torch.Tensor, heat_shape
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """From warped region maps ``(N, 1, *grid)``: centroids ``(N, K, 3)`` world mm, their voxel
        counts ``(N, K)``, and each region's mask pooled onto the heatmap grid ``(N, K, *heat)``
        (fraction of the heatmap voxel covered), normalised to sum 1."""
        n = regions.shape[0]
        k = self.model.num_keypoints
        grid = regions.shape[2:]
        dev = regions.device
        r = regions.reshape(n, -1).long()
        inside = r > 0
        axes = [torch.arange(m, device=dev, dtype=torch.float32) for m in grid]
        vox = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
        world = apply_affine(affine.to(dev, torch.float32), vox)  # (V, 3)
        idx = (r - 1).clamp_min(0) + k * torch.arange(n, device=dev)[:, None]
        w = inside.float()
        count = torch.zeros(n * k, device=dev).index_add_(0, idx.reshape(-1), w.reshape(-1))
        sums = torch.zeros(n * k, 3, device=dev).index_add_(0, idx.reshape(-1),
                                                             (w[..., None] * world[None]).reshape(-1, 3))
        cent = (sums / count.clamp_min(1)[:, None]).reshape(n, k, 3)
        # masks on the heatmap grid: each input voxel is splatted linearly onto the heatmap voxels around
        # its position in the corner-aligned frame that center_of_mass reads (heatmap voxel j of h <->
        # input voxel j (g - 1) / (h - 1)), so a mask's centre of mass is exactly the region's centroid
        corner = []
        for m, h in zip(grid, heat_shape):
            u = torch.arange(m, device=dev, dtype=torch.float32) * ((h - 1) / max(m - 1, 1))
            j0 = u.floor().clamp(0, max(h - 2, 0))
            t = u - j0
            corner.append(((j0.long(), 1 - t), ((j0 + 1).clamp(max=h - 1).long(), t)))
        nh = heat_shape[0] * heat_shape[1] * heat_shape[2]
        mask = torch.zeros(n * k * nh, device=dev)
        for (i0, wi), (j0_, wj), (k0, wk) in product(*corner):
            hidx = ((i0[:, None, None] * heat_shape[1] + j0_[None, :, None]) * heat_shape[2]
                    + k0[None, None, :]).reshape(-1)
            wt = (wi[:, None, None] * wj[None, :, None] * wk[None, None, :]).reshape(-1)
            mask.index_add_(0, (idx * nh + hidx[None]).reshape(-1), (w * wt[None]).reshape(-1))
        mask = mask.reshape(n, k, *heat_shape)
        mask = mask / mask.flatten(2).sum(-1).clamp_min(1e-6)[..., None, None, None]
        return cent, count.reshape(n, k), mask

    def _anatomical_loss(self, batch: PairBatch) -> tuple[torch.Tensor, dict[str, float]]:
        from ..models.keypoints import center_of_mass

        aff = batch.grid_affine
        imgs = torch.cat([batch.fixed, batch.moving])
        regions = torch.cat([batch.fixed_regions, batch.moving_regions])
        heat = self._heatmaps(imgs)
        target, count, mask = self._anatomical_targets(regions, aff, heat.shape[2:])
        pts, _ = center_of_mass(heat)
        kp = apply_affine(aff.to(self.device, torch.float32), normalized_to_voxel(pts, self.grid.shape))
        valid = (count >= 2).float()
        err = ((kp - target) ** 2).sum(-1)                                       # (N, K) mm^2
        reg = ((torch.sqrt(err + 1.0) - 1.0) * valid).sum() / valid.sum().clamp_min(1)  # ~ mm, robust
        p = F.relu(heat.float())
        p = p / p.flatten(2).sum(-1).clamp_min(1e-8)[..., None, None, None]
        dense = (((p - mask) ** 2).flatten(2).sum(-1) / (mask ** 2).flatten(2).sum(-1).clamp_min(1e-12))
        dense = (dense * valid).sum() / valid.sum().clamp_min(1)
        loss = reg / 10.0 + self.cfg.dense_coeff * dense
        med = err.sqrt()[valid > 0].median().item() if bool((valid > 0).any()) else float("nan")
        return loss, {"loss": loss.item(), "kp_err_mm": reg.item(), "median_mm": med, "dense": dense.item()}

    def _heatmaps(self, images: torch.Tensor) -> torch.Tensor:
        # channels-last 3-D: convolutions (and above all their backward pass) are ~3x faster on CPU
        return self.net(images.contiguous(memory_format=torch.channels_last_3d), return_heatmaps=True)

    # -- losses ----------------------------------------------------------------------------------------
    def _fit(self, spec: AlignSpec, kf: torch.Tensor, km: torch.Tensor, w: torch.Tensor | None, affine):
        center = torch.as_tensor(fov_center(affine.numpy(), self.grid.shape), device=self.device)
        scale = fov_half_extent(affine.numpy(), self.grid.shape)
        return fit_transform(spec, kf, km, w, center=center, scale=scale)

    def _spec_for_step(self) -> AlignSpec:
        method = self.cfg.kp_align_method
        if method == "mixed":
            method = ("rigid", "affine", "tps", "tps")[int(torch.randint(4, (), generator=self.gen,
                                                                         device=self.device))]
        lmbda = sample_lambda(self.cfg.tps_lmbda, self.gen) if method == "tps" else 0.0
        return AlignSpec(method, lmbda)

    def loss(self, batch: PairBatch) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.cfg
        aff = batch.grid_affine
        if cfg.mode == "pretrain":
            return self._anatomical_loss(batch)
        imgs = [batch.fixed, batch.moving] + ([batch.moving_alt] if batch.moving_alt is not None else [])
        kp, mass = self.keypoints(torch.cat(imgs), aff)
        b = batch.fixed.shape[0]
        kf, km = kp[:b], kp[b: 2 * b]
        w = None
        if self.model.config.weighting == "power":  # --weighted_kp_align, or a loaded model's own weighting
            from ..models import power_weights
            w = power_weights(mass[:b], mass[b: 2 * b])
        if cfg.max_train_keypoints and cfg.max_train_keypoints < kf.shape[1]:
            sel = torch.randperm(kf.shape[1], generator=self.gen, device=self.device)[: cfg.max_train_keypoints]
            kf, km = kf[:, sel], km[:, sel]
            w = None if w is None else w[:, sel] / w[:, sel].sum(1, keepdim=True)
        spec = self._spec_for_step()
        transform = self._fit(spec, kf, km, w, aff)
        affs = aff.to(self.device)[None].expand(b, 4, 4)
        if cfg.loss_fn == "dice":
            n_cls = len(self.classes) + 1
            mov = one_hot(self.lut[batch.moving_labels[:, 0]], n_cls)
            fix = one_hot(self.lut[batch.fixed_labels[:, 0]], n_cls)
            loss = soft_dice_loss(warp_on_grid(mov, affs, affs, transform), fix)
        else:
            loss = mse_loss(warp_on_grid(batch.moving, affs, affs, transform), batch.fixed)
        logs = {"loss": loss.item(), "align": spec.name}
        if batch.moving_alt is not None:
            cons = keypoint_consistency_loss(kp[2 * b:], kp[b: 2 * b])
            loss = loss + cfg.kpconsistency_coeff * cons / fov_half_extent(aff.numpy(), self.grid.shape) ** 2
            logs["kp_consistency_mm2"] = cons.item()
        return loss, logs

    # -- validation -------------------------------------------------------------------------------------
    def validate(self, aligns: tuple[str, ...] = ("rigid", "affine", "tps_0", "tps_10")) -> dict[str, float]:
        """Mean hard Dice (brain labels present in either map) on fixed held-out pairs, per align,
        plus ``none`` (before registration)."""
        from ..metrics import dice_per_label, mean_dice
        from ..transforms import parse_align

        if self.val_pairs is None:
            if self.cfg.data_dir:
                try:
                    rows = read_image_table(self.cfg.data_dir, train=False)
                except ImageIOError:  # a pair CSV without held-out pairs: validate on the training pairs
                    rows = read_image_table(self.cfg.data_dir)
                pairs = ImagePairs(rows, self.grid, spatial=self.pairs.spatial, train=False, device=self.device)
            else:
                paths = self.cfg.val_label_maps or self.cfg.label_maps
                bank = LabelMapBank(list_label_maps(paths), device=self.device)
                pairs = SyntheticPairs(bank, self.grid, spatial=self.pairs.spatial, mix_modalities=True,
                                       same_subject_prob=0.0)
            g = torch.Generator(self.device).manual_seed(12345)
            self.val_pairs = [pairs.sample(1, g) for _ in range(self.cfg.num_val_pairs)]
        self.model.eval()
        scores: dict[str, list[float]] = {a: [] for a in ("none", *aligns)}
        with torch.no_grad():
            for batch in self.val_pairs:
                kp, _ = self.keypoints(torch.cat([batch.fixed, batch.moving]), batch.grid_affine)
                fixed = batch.fixed_labels[0, 0].cpu().numpy()
                before = _brain_only(batch.moving_labels[0, 0].cpu().numpy())
                scores["none"].append(mean_dice(dice_per_label(before, _brain_only(fixed))))
                aff = batch.grid_affine.to(self.device)[None]
                for name in aligns:
                    tr = self._fit(parse_align(name), kp[:1].double(), kp[1:].double(), None, batch.grid_affine)
                    warped = warp_on_grid(batch.moving_labels.float(), aff, aff, tr, tps_stride=1, mode="nearest")
                    moved = _brain_only(warped[0, 0].round().long().cpu().numpy())
                    scores[name].append(mean_dice(dice_per_label(moved, _brain_only(fixed))))
        self.model.train()
        return {k: float(sum(v) / len(v)) for k, v in scores.items()}

    # -- checkpoints ------------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path | None:
        """``save_dir/checkpoints/step_<n>/`` (atomic rename) and ``latest`` pointing at it."""
        from safetensors.torch import save_file

        gens = [self.gen.get_state()]
        if self.world > 1:
            gens = [None] * self.world
            dist.all_gather_object(gens, self.gen.get_state())
        if self.rank != 0:
            return None
        root = self.save_dir / "checkpoints"
        final = root / f"step_{self.step:07d}"
        tmp = root / f".tmp_step_{self.step:07d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_model(self.model, tmp / "model")
        opt_tensors, opt_meta = _flatten_optimizer(self.opt.state_dict())
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        rng = {f"generator_rank{r}": s for r, s in enumerate(gens)}
        rng["torch_cpu"] = torch.get_rng_state()
        save_file(rng, str(tmp / "rng.safetensors"))
        (tmp / "state.json").write_text(json.dumps(
            {"step": self.step, "world_size": self.world, "train_config": asdict(self.cfg),
             "optimizer": opt_meta}, indent=1) + "\n")
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        (root / "latest.tmp").write_text(final.name + "\n")
        (root / "latest.tmp").replace(root / "latest")
        _prune_checkpoints(root, self.cfg.keep_checkpoints, final.name)
        return final

    def load_checkpoint(self, path: Path) -> None:
        """Restore weights, optimizer, step and this rank's RNG from a checkpoint directory."""
        from safetensors.torch import load_file

        path, state = check_resumable(path, self.cfg, self.world)
        loaded = load_model(path / "model.safetensors", device=self.device)
        try:
            self.model.load_state_dict(loaded.state_dict())
            self.opt.load_state_dict(_unflatten_optimizer(load_file(str(path / "optimizer.safetensors")),
                                                          state["optimizer"]))
            rng = load_file(str(path / "rng.safetensors"))
        except Exception as e:  # safetensors' errors, missing files, a model of another shape
            raise CheckpointError(f"{path}: cannot resume from this checkpoint ({first_line(e, 160)}); resume from "
                                  "an earlier one or start afresh") from None
        key = f"generator_rank{self.rank}"
        if key not in rng:
            raise CheckpointError(f"{path}: saved with {state.get('world_size')} processes; cannot resume rank "
                                  f"{self.rank} (use the same number of processes)")
        self.gen.set_state(rng[key])
        torch.set_rng_state(rng["torch_cpu"])
        self.step = int(state["step"])

    # -- loop ---------------------------------------------------------------------------------------------
    def _out_of_time(self, t0: float) -> bool:
        """Whether ``cfg.max_minutes`` of wall time have passed since ``t0``; under DDP rank 0's clock
        decides for every process (all stop at the same step)."""
        if self.cfg.max_minutes is None:
            return False
        late = time.perf_counter() - t0 > 60.0 * self.cfg.max_minutes
        if self.world > 1:  # one small broadcast per step, only under DDP (a single process never syncs here)
            flag = torch.tensor([float(late)], device=self.device)
            dist.broadcast(flag, src=0)
            late = bool(flag.item())
        return late

    def fit(self, *, progress: bool = True) -> dict[str, Any]:
        """Train until ``cfg.steps`` (or ``cfg.stop_at``, or the first step that ends after ``cfg.max_minutes``
        of wall time: a checkpoint and the model are saved there, and ``--resume`` continues the same
        schedule); returns the last logs and validation scores."""
        from tqdm import tqdm

        cfg = self.cfg
        log_path = self.save_dir / "log.csv"
        writer = _Logger(log_path, cfg, self.step) if self.rank == 0 else None
        bar = tqdm(total=cfg.stop_at or cfg.steps, initial=self.step, disable=not progress or self.rank != 0,
                   desc=cfg.mode, unit="step", dynamic_ncols=True)
        last: dict[str, Any] = {}
        t0, pairs_done = time.perf_counter(), 0
        end = cfg.steps if cfg.stop_at is None else cfg.stop_at
        while self.step < end:
            batch = self.pairs.sample(cfg.batch_size, self.gen)
            if cfg.lr_schedule == "cosine":
                for group in self.opt.param_groups:
                    group["lr"] = cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * self.step / cfg.steps)))
            loss, logs = self.loss(batch)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.step += 1
            pairs_done += cfg.batch_size * self.world
            logs["pairs_per_s"] = pairs_done / max(time.perf_counter() - t0, 1e-9)
            last = logs
            bar.update(1)
            bar.set_postfix(loss=f"{logs['loss']:.4f}", pairs_s=f"{logs['pairs_per_s']:.2f}")
            val = None
            if cfg.val_every and self.step % cfg.val_every == 0 and self.rank == 0 and cfg.mode == "train":
                val = self.validate()
                last["val"] = val
                bar.write(f"step {self.step}: validation Dice " +
                          ", ".join(f"{k} {v:.3f}" for k, v in val.items()))
            if writer:
                writer.write(self.step, logs, val)
            if self._out_of_time(t0):
                end = self.step
                bar.write(f"stopping at step {self.step}: --max_minutes {cfg.max_minutes:g} reached "
                          f"(--resume continues)")
            early = self.step == end < cfg.steps  # --max_minutes or --stop_at: resumable even without checkpoint_every
            if early or (cfg.checkpoint_every and (self.step % cfg.checkpoint_every == 0 or self.step == end)):
                self.save_checkpoint()
        bar.close()
        if self.rank == 0:
            save_model(self.model, self.save_dir / "model")
        if writer:
            writer.close()
        return last


#: keypoints an anatomical model leaves out of fits by default: head-shape variability would pull brain alignment
ANATOMICAL_FIT_EXCLUDE = ("Extracerebral-*",)

#: large structures split into sub-regions by default (FreeSurfer ids -> number of parts)
DEFAULT_SPLITS: dict[tuple[int, ...], int] = {
    (3,): 20, (42,): 20, (2,): 10, (41,): 10, (8,): 4, (47,): 4, (24,): 10, (16,): 3, (4,): 3, (43,): 3,
    (507,): 24, (511,): 12, (515,): 12, (516,): 8, (509,): 4,
}


#: Options that may change when a run is resumed: stopping, devices, logging, and paths (the same
#: files may be named differently from another directory).  Every other option defines the run.
RESUMABLE_CHANGES = frozenset({"stop_at", "max_minutes", "device", "use_amp", "use_wandb", "checkpoint_every",
                               "keep_checkpoints", "val_every", "num_val_pairs", "save_dir", "label_maps", "val_label_maps",
                               "data_dir", "load_path", "regions"})


def _check_resumed_config(saved: Any, cfg: TrainConfig, path: Path) -> None:
    """:class:`CheckpointError` if the options of a resumed run differ from the checkpoint's (other
    than :data:`RESUMABLE_CHANGES`): the weights and optimizer state would silently override some and
    mix with others."""
    if not isinstance(saved, dict):
        return  # a checkpoint from before the config was recorded
    now = asdict(cfg)
    free = RESUMABLE_CHANGES | ({"steps"} if cfg.lr_schedule == "constant" else set())  # a constant rate may go on
    diff = [f"--{k} {now[k]!r} (the run: {saved[k]!r})" for k in sorted(now)
            if k in saved and k not in free and now[k] != saved[k]
            and not (isinstance(now[k], (list, tuple)) and list(now[k]) == list(saved[k] or []))]
    if diff:
        raise CheckpointError(f"{path}: --resume with options that differ from the checkpoint's run: "
                              f"{'; '.join(diff)}; resume with the run's options (only stopping, device, "
                              "logging and paths may change, and --steps with a constant learning rate)")


def check_resumable(path: Path, cfg: TrainConfig, world: int) -> tuple[Path, dict[str, Any]]:
    """The checkpoint directory ``path`` (or the one ``path/latest`` names) and its state, after checking that
    ``cfg`` and ``world`` processes may resume it (:class:`CheckpointError` otherwise); reads only JSON."""
    if path.is_dir() and (path / "latest").is_file():
        path = path / (path / "latest").read_text().strip()
    if not (path / "state.json").is_file():
        raise CheckpointError(f"{path}: not a keyreg training checkpoint (no state.json)")
    try:
        state = json.loads((path / "state.json").read_text())
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            raise ValueError("no integer step")
    except (OSError, UnicodeError, ValueError) as e:
        raise CheckpointError(f"{path / 'state.json'}: corrupt training state ({str(e).splitlines()[0][:120]}); "
                              f"resume from an earlier checkpoint or start afresh") from None
    saved_world = state.get("world_size", world)
    if saved_world != world:
        raise CheckpointError(f"{path}: saved with {saved_world} processes; resume with the same number "
                              f"(this run has {world})")
    _check_resumed_config(state.get("train_config"), cfg, path)
    return path, state


def _prune_checkpoints(root: Path, keep: int, latest: str) -> None:
    """Remove all but the ``keep`` newest ``step_*`` checkpoints in ``root`` (``keep`` 0: none removed), never
    ``latest``."""
    if keep < 1:
        return
    steps = sorted((int(p.name[5:]), p) for p in root.glob("step_*") if p.name[5:].isdigit() and p.is_dir())
    for _, old in steps[:-keep]:
        if old.name != latest:
            shutil.rmtree(old, ignore_errors=True)


def default_atlas(bank: LabelMapBank, seed: int = 0):
    """Regions built from the label maps read by ``bank`` (not their mirror images; the first map is
    the reference); returns ``(atlas, consistency statistics)``."""
    from ..models.regions import build_atlas

    maps = [(m.cpu().numpy().astype("int32"), a.numpy())
            for m, a in zip(bank.maps[:bank.num_sources], bank.affines[:bank.num_sources])]
    return build_atlas(maps, DEFAULT_SPLITS, seed=seed)


def _brain_only(labels):
    out = labels.copy()
    out[(out >= 500)] = 0
    return out


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, meta = {}, {"param_groups": state["param_groups"], "scalars": {}}
    for idx, per in state["state"].items():
        for name, value in per.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                meta["scalars"][f"{idx}.{name}"] = value
    return tensors, meta


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _cut_log(path: Path, header: list[str], step: int) -> None:
    """Rewrite the CSV log ``path`` (atomically) with its header and the rows of steps <= ``step`` only."""
    rows = [header]
    if path.is_file():
        with open(path, newline="") as fh:
            rows += [r for r in list(csv.reader(fh))[1:] if r and r[0].isdigit() and int(r[0]) <= step]
    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    atomic_write_text(path, buf.getvalue())


class _Logger:
    """CSV log (always), and Weights & Biases when asked and installed."""

    def __init__(self, path: Path, cfg: TrainConfig, step: int = 0) -> None:
        """Append to ``path``, first cut back to the rows of steps <= ``step`` (those a resumed run keeps;
        a killed run may have logged steps past its last checkpoint)."""
        header = ["step", "loss", "align", "pairs_per_s", "extra"]
        try:
            _cut_log(path, header, step)
            self.fh = open(path, "a", newline="")
        except OutputError:
            raise
        except OSError as e:
            raise OutputError(f"{path}: cannot write the training log ({first_line(e)})") from None
        self.csv = csv.writer(self.fh)
        self.wandb = None
        if cfg.use_wandb:
            try:
                import wandb
            except ImportError as e:
                raise ConfigError("--use_wandb needs the wandb package: pip install 'keyreg[wandb]'") from e
            self.wandb = wandb.init(project="keyreg", config=asdict(cfg))

    def write(self, step: int, logs: dict[str, Any], val: dict[str, float] | None) -> None:
        extra = {k: v for k, v in logs.items() if k not in ("loss", "align", "pairs_per_s", "val")}
        if val:
            extra.update({f"val_dice_{k}": round(v, 4) for k, v in val.items()})
        self.csv.writerow([step, f"{logs['loss']:.6f}", logs.get("align", ""), f"{logs['pairs_per_s']:.3f}",
                           json.dumps(extra) if extra else ""])
        self.fh.flush()
        if self.wandb:
            self.wandb.log({"loss": logs["loss"], **extra}, step=step)

    def close(self) -> None:
        self.fh.close()
        if self.wandb:
            self.wandb.finish()


def train(cfg: TrainConfig, *, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) a training; returns the final logs. The model is written to
    ``save_dir/model.safetensors`` + ``.json``."""
    cfg.validate()
    save_dir = Path(cfg.save_dir)
    rank, world, _ = distributed_env()
    check_save_dir(save_dir, resume)
    if resume:  # the options and process count, before the data are read
        check_resumable(save_dir / "checkpoints", cfg, world)
    from ..batch import output_lock

    try:
        with output_lock(save_dir) if rank == 0 else contextlib.nullcontext():  # one run per save_dir
            trainer = Trainer(cfg)
            if resume:
                trainer.load_checkpoint(save_dir / "checkpoints")
            return trainer.fit(progress=progress)
    finally:
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def check_save_dir(save_dir: Path, resume: bool) -> None:
    """:class:`OutputError` for a ``--save_dir`` that is (or lies below) a file, or that holds a run's
    checkpoints when not resuming (a fresh run would mix with them); :class:`CheckpointError` for
    ``--resume`` without a checkpoint."""
    for p in (save_dir, *save_dir.parents):
        if p.exists() and not p.is_dir():
            raise OutputError(f"--save_dir {save_dir}: {p} is a file, not a directory")
    latest = save_dir / "checkpoints" / "latest"
    if resume and not latest.is_file():
        raise CheckpointError(f"--resume: {save_dir} holds no checkpoint (no checkpoints/latest); start without "
                              "--resume")
    if not resume and latest.exists():
        raise OutputError(f"{save_dir} holds a run (checkpoints/latest); use --resume to continue it, or another "
                          "--save_dir")
