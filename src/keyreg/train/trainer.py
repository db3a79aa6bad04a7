"""The training loop behind ``keyreg train`` and ``keyreg pretrain``.

* ``pretrain``: keypoints regressed onto reference points that move with the image (self-supervised
  initialisation, as in KeyMorph).
* ``train``: keypoints of a pair -> closed-form transform (rigid / affine / TPS with a sampled
  lambda) -> differentiable warp of the moving labels (soft Dice) or image (MSE).

Seeded and resumable: a checkpoint (a directory of safetensors + JSON, never a pickle) holds the
model config and weights, optimizer state, step and every rank's RNG state; it is written to a
temporary directory and renamed. Multi-GPU / multi-node through ``torchrun`` (DDP; gloo on CPU).
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..errors import CheckpointError, ConfigError, DegenerateFitError, ImageIOError
from ..geometry import apply_affine, fov_center, fov_half_extent, normalized_to_voxel
from ..models import KeypointDetector, ModelConfig
from ..models.checkpoint import load_model, save_model
from ..models.detector import ArchitectureConfig
from ..preprocess import GridSpec, PreprocessConfig
from ..transforms import AlignSpec, fit_affine, fit_transform
from .data import (ImagePairs, LabelMapBank, PairBatch, SyntheticPairs, brain_label_table, list_label_maps,
                   read_image_table)
from .losses import one_hot, soft_dice_loss, warp_on_grid
from .synth import SpatialAugment

__all__ = ["TrainConfig", "Trainer", "sample_lambda", "train"]


@dataclass
class TrainConfig:
    """Every option of a run (saved in each checkpoint; ``--resume`` reuses it)."""

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
    max_displacement: float = 3.0
    # optimisation
    steps: int = 1000
    batch_size: int = 2
    lr: float = 3e-4
    seed: int = 0
    use_amp: bool = False
    device: str | None = None
    # bookkeeping
    checkpoint_every: int = 100
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
        if self.steps < 1 or self.batch_size < 1:
            raise ConfigError("--steps and --batch_size must be >= 1")
        for name, lo, hi in (("lr", 0.0, None), ("max_rotation", 0.0, 180.0), ("max_displacement", 0.0, None),
                             ("voxel_size", 0.0, None), ("kpconsistency_coeff", 0.0, None)):
            v = getattr(self, name)
            ok = isinstance(v, (int, float)) and math.isfinite(v) and v >= lo and (hi is None or v <= hi)
            if not ok or (name in ("lr", "voxel_size") and v == 0):
                rng = f"in [{lo:g}, {hi:g}]" if hi is not None else ("> 0" if name in ("lr", "voxel_size") else ">= 0")
                raise ConfigError(f"--{name} must be a finite number {rng}, got {v!r}")


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


def _distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    rank = dist.get_rank() if dist.is_initialized() else 0
    return rank, world


class Trainer:
    """One training (or pretraining) run; see :func:`train`."""

    def __init__(self, cfg: TrainConfig) -> None:
        cfg.validate()
        self.cfg = cfg
        self.rank, self.world = _distributed()
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if cfg.device:
            self.device = torch.device(cfg.device)
        elif torch.cuda.is_available():
            self.device = torch.device("cuda", local)
        else:
            self.device = torch.device("cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.save_dir = Path(cfg.save_dir)
        torch.manual_seed(cfg.seed)
        self.gen = torch.Generator(self.device).manual_seed(cfg.seed * 1000 + self.rank)
        grid = GridSpec("ras", (cfg.grid_shape,) * 3, (cfg.voxel_size,) * 3)
        self.model = self._build_model(grid)
        self.grid = self.model.config.preprocessing.grid
        spatial = SpatialAugment(max_rotation=cfg.max_rotation,
                                 max_displacement=0.0 if cfg.mode == "pretrain" else cfg.max_displacement)
        if cfg.data_dir:
            if cfg.kpconsistency_coeff > 0:
                raise ConfigError("--kpconsistency_coeff needs synthetic contrasts (--label_maps)")
            self.pairs = ImagePairs(read_image_table(cfg.data_dir), self.grid, spatial=spatial,
                                    mix_modalities=cfg.mix_modalities, device=self.device)
            self.bank = self.pairs  # maps (segmentations on the network grid), affines, ids
        else:
            self.bank = LabelMapBank(list_label_maps(cfg.label_maps), device=self.device)
            self.pairs = SyntheticPairs(self.bank, self.grid, spatial=spatial, mix_modalities=cfg.mix_modalities,
                                        consistency=cfg.kpconsistency_coeff > 0)
        self.lut, self.classes = brain_label_table(self.bank.ids)
        self.lut = self.lut.to(self.device)
        self.net = self.model
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
        self.step = 0
        self.val_pairs: list[PairBatch] | None = None
        if cfg.mode == "pretrain":
            self._init_reference_points()

    # -- model -----------------------------------------------------------------------------------
    def _build_model(self, grid: GridSpec) -> KeypointDetector:
        cfg = self.cfg
        if cfg.load_path:
            model = load_model(cfg.load_path, device=self.device)
            model.train()
            return model
        arch = ArchitectureConfig(cfg.backbone, cfg.num_keypoints, num_levels=cfg.num_levels,
                                  num_truncated=cfg.num_truncated, f_maps=cfg.f_maps)
        conf = ModelConfig(cfg.name, arch, PreprocessConfig(grid=grid),
                           weighting="power" if cfg.weighted_kp_align else None,
                           description=f"{arch.describe()}, {cfg.grid_shape}^3 at {cfg.voxel_size:g} mm")
        return KeypointDetector(conf).to(self.device)

    def keypoints(self, images: torch.Tensor, grid_affine: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, 1, *grid)`` -> world keypoints ``(B, K, 3)`` (mm) and heatmap mass ``(B, K)``."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16,
                            enabled=self.cfg.use_amp and self.device.type == "cuda"):
            pts, mass = self.net(images)
        vox = normalized_to_voxel(pts.float(), self.grid.shape)
        return apply_affine(grid_affine.to(self.device, torch.float32), vox), mass.float()

    # -- pretraining targets -------------------------------------------------------------------------
    def _init_reference_points(self) -> None:
        """Reference points inside the brain of map 0 and, per map, the label-centroid affine that
        carries them into that map (so targets correspond across subjects)."""
        ref = self.bank.maps[0]
        brain = torch.nonzero((ref > 0) & (ref < 500)).double()
        g = torch.Generator(self.device).manual_seed(self.cfg.seed)
        pick = torch.randperm(brain.shape[0], generator=g, device=self.device)[: self.model.num_keypoints]
        ref_aff = self.bank.affines[0].to(self.device)
        self.ref_points = apply_affine(ref_aff, brain[pick])  # (K, 3) world of map 0
        self.map_from_ref = [self._centroid_affine(0, k) for k in range(len(self.bank))]

    def _centroids(self, k: int, ids: list[int]) -> torch.Tensor:
        lab = self.bank.maps[k]
        aff = self.bank.affines[k].to(self.device)
        out = []
        for i in ids:
            out.append(torch.nonzero(lab == i).double().mean(0))
        return apply_affine(aff, torch.stack(out))

    def _centroid_affine(self, ref: int, k: int) -> torch.Tensor:
        if k == ref:
            return torch.eye(4, dtype=torch.float64, device=self.device)
        common = [i for i in self.classes
                  if bool((self.bank.maps[ref] == i).any()) and bool((self.bank.maps[k] == i).any())]
        a, b = self._centroids(ref, common), self._centroids(k, common)
        try:
            return fit_affine(a[None], b[None])[0]
        except DegenerateFitError:  # too few labels in general position: align the centroids only
            out = torch.eye(4, dtype=torch.float64, device=self.device)
            out[:3, 3] = (b - a).mean(0)
            return out

    def _pretrain_targets(self, index: list[int], mats: torch.Tensor) -> torch.Tensor:
        """World positions (network grid) of the reference points in each augmented image."""
        out = []
        for b, k in enumerate(index):
            q = apply_affine(self.map_from_ref[k], self.ref_points)          # map k's world
            out.append(apply_affine(torch.linalg.inv(mats[b]), q))           # image world
        return torch.stack(out).float()

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
            imgs = torch.cat([batch.fixed, batch.moving])
            kp, _ = self.keypoints(imgs, aff)
            target = torch.cat([self._pretrain_targets(batch.fixed_index, batch.fixed_transform),
                                self._pretrain_targets(batch.moving_index, batch.moving_transform)])
            scale = fov_half_extent(aff.numpy(), self.grid.shape)
            loss = F.mse_loss(kp / scale, target / scale)
            return loss, {"loss": loss.item(), "rmse_mm": ((kp - target) ** 2).sum(-1).mean().sqrt().item()}
        imgs = [batch.fixed, batch.moving] + ([batch.moving_alt] if batch.moving_alt is not None else [])
        kp, mass = self.keypoints(torch.cat(imgs), aff)
        b = batch.fixed.shape[0]
        kf, km = kp[:b], kp[b: 2 * b]
        w = None
        if cfg.weighted_kp_align:
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
            loss = F.mse_loss(warp_on_grid(batch.moving, affs, affs, transform), batch.fixed)
        logs = {"loss": loss.item(), "align": spec.name}
        if batch.moving_alt is not None:
            cons = ((kp[2 * b:] - kp[b: 2 * b]) ** 2).sum(-1).mean()
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
        return final

    def load_checkpoint(self, path: Path) -> None:
        """Restore weights, optimizer, step and this rank's RNG from a checkpoint directory."""
        from safetensors.torch import load_file

        if path.is_dir() and (path / "latest").exists():
            path = path / (path / "latest").read_text().strip()
        if not (path / "state.json").exists():
            raise CheckpointError(f"{path}: not a keyreg training checkpoint (no state.json)")
        try:
            state = json.loads((path / "state.json").read_text())
            if not isinstance(state, dict) or not isinstance(state.get("step"), int):
                raise ValueError("no integer step")
        except (OSError, UnicodeError, ValueError) as e:
            raise CheckpointError(f"{path / 'state.json'}: corrupt training state ({str(e).splitlines()[0][:120]}); "
                                  f"resume from an earlier checkpoint or start afresh") from None
        loaded = load_model(path / "model.safetensors", device=self.device)
        self.model.load_state_dict(loaded.state_dict())
        self.opt.load_state_dict(_unflatten_optimizer(load_file(str(path / "optimizer.safetensors")),
                                                      state["optimizer"]))
        rng = load_file(str(path / "rng.safetensors"))
        key = f"generator_rank{self.rank}"
        if key not in rng:
            raise CheckpointError(f"{path}: saved with {state['world_size']} processes; cannot resume rank "
                                  f"{self.rank} (use the same number of processes)")
        self.gen.set_state(rng[key])
        torch.set_rng_state(rng["torch_cpu"])
        self.step = int(state["step"])

    # -- loop ---------------------------------------------------------------------------------------------
    def fit(self, *, progress: bool = True) -> dict[str, Any]:
        """Train until ``cfg.steps``; returns the last logs and validation scores."""
        from tqdm import tqdm

        cfg = self.cfg
        log_path = self.save_dir / "log.csv"
        writer = _Logger(log_path, cfg) if self.rank == 0 else None
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not progress or self.rank != 0,
                   desc=cfg.mode, unit="step", dynamic_ncols=True)
        last: dict[str, Any] = {}
        t0, pairs_done = time.perf_counter(), 0
        while self.step < cfg.steps:
            batch = self.pairs.sample(cfg.batch_size, self.gen)
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
            if cfg.checkpoint_every and (self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps):
                self.save_checkpoint()
        bar.close()
        if self.rank == 0:
            save_model(self.model, self.save_dir / "model")
        if writer:
            writer.close()
        return last


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


class _Logger:
    """CSV log (always), and Weights & Biases when asked and installed."""

    def __init__(self, path: Path, cfg: TrainConfig) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists()
        self.fh = open(path, "a", newline="")
        self.csv = csv.writer(self.fh)
        if new:
            self.csv.writerow(["step", "loss", "align", "pairs_per_s", "extra"])
        self.wandb = None
        if cfg.use_wandb:
            try:
                import wandb
            except ImportError as e:
                raise ConfigError("--use_wandb needs the wandb package: pip install 'keyreg[wandb]'") from e
            self.wandb = wandb.init(project="keyreg", config=asdict(cfg))

    def write(self, step: int, logs: dict[str, Any], val: dict[str, float] | None) -> None:
        extra = {k: v for k, v in logs.items() if k not in ("loss", "align", "pairs_per_s")}
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
    trainer = Trainer(cfg)
    if resume:
        trainer.load_checkpoint(Path(cfg.save_dir) / "checkpoints")
    try:
        return trainer.fit(progress=progress)
    finally:
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
