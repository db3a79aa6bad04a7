"""The registration pipeline: one :class:`Registrar` that every workflow goes through.

A registrar holds the model, the device and the options (:class:`RegistrationOptions`).  Its stages
are explicit methods, run in this order:

====================  =====================================================  ============================
stage                 what                                                   module doing the work
====================  =====================================================  ============================
``keypoints``         one detection per image, cached per image key          :mod:`keyreg.keypoints`
``fit``               every requested transform from the two keypoint sets   :mod:`keyreg.transforms`
``refine``            (optional) dense refinement of every align: ``<align>+<stage>`` :mod:`keyreg.refine`
``dense``             a TPS sampled as a displacement field on the fixed grid :mod:`keyreg.transforms.field`
``warp``              moving image / segmentation onto the fixed grid        :mod:`keyreg.warp`
``measure``           metrics on the fixed grid                              :mod:`keyreg.measure`
``save``              files per pair and align                               :mod:`keyreg.export`
====================  =====================================================  ============================

:meth:`Registrar.register` runs load -> keypoints -> fit -> refine -> dense -> warp; ``measure`` and ``save``
are called on its :class:`~keyreg.results.Registration`.  :meth:`Registrar.stream` runs dense -> warp ->
measure -> (the caller's) save one align at a time and drops each align's full-grid arrays before the
next (what ``keyreg register`` and ``keyreg evaluate`` do: one align's arrays in memory, not all).  ``keyreg register`` (through
:mod:`keyreg.batch`), ``keyreg evaluate``, ``keyreg groupwise`` and :func:`keyreg.register` all use it.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import ConfigError, DegenerateFitError
from .io import Volume, check_same_grid, load_volume, load_volumes
from .keypoints import (ImageKeypoints, check_enough, check_search_mode, detect_keypoints, select_keypoints,
                        tps_frame, validate_patterns)
from .refine import STAGES, DeformableConfig, RefineOptions, check_fixed_mask, refined_name
from .results import AlignmentResult, Registration, label_interp, pad_value_for, warp_volumes
from .transforms import (DEFAULT_FIELD_STRIDE, AffineTransform, AlignSpec, ThinPlateSpline, check_field_stride,
                         fit_transform, keep_identity_if_aligned, parse_aligns)

__all__ = ["RegistrationOptions", "Registrar", "resolve_device", "resolve_model", "Timer", "fit_alignments",
           "min_keypoints", "release_arrays"]


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None`` / ``"auto"``: CUDA when available, else CPU; otherwise ``cpu``, ``cuda`` or ``cuda:N``.

    Raises:
        ConfigError: an unknown device name, a device type keyreg does not run on, or CUDA that is
            not available (or has no such index).
    """
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"unknown device {str(device)!r}: use cpu, cuda, cuda:N or auto") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {str(device)!r} is not supported: use cpu, cuda, cuda:N or auto")
    if dev.type == "cpu" and dev.index not in (None, 0):
        raise ConfigError(f"unknown device {str(device)!r}: use cpu, cuda, cuda:N or auto")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {str(device)!r} was requested but no CUDA device is available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device {str(device)!r}: there are only {torch.cuda.device_count()} CUDA device(s)")
    return dev


def resolve_model(model: Any, device: torch.device, *, half_resolution: bool = False,
                  backbone: str | None = None, num_keypoints: int | None = None):
    """A ready model on ``device``: a loaded detector, a path, a bundled name, or ``None`` (the default).

    A detector passed in is never changed: when it is not already in eval mode on ``device``, a copy
    is used; ``half_resolution`` gives a shallow copy (shared weights) with its own configuration, so
    calling this twice halves the grid once, not twice.
    """
    from .models import KeypointDetector, load_model
    from .preprocess import PreprocessConfig

    if not isinstance(model, KeypointDetector):
        net = load_model(model, backbone=backbone, num_keypoints=num_keypoints, device=device)
    else:
        net = model
        if net.training or net.device != device:
            net = copy.deepcopy(net).to(device).eval()
        a = net.config.architecture
        if backbone is not None and backbone != a.backbone:
            from .errors import CheckpointError
            raise CheckpointError(f"model is a {a.backbone} backbone, not the requested {backbone}")
        if num_keypoints is not None and num_keypoints != a.num_keypoints:
            from .errors import CheckpointError
            raise CheckpointError(f"model has {a.num_keypoints} keypoints, not the requested {num_keypoints}")
    if half_resolution:
        if getattr(net.config, "regions", None) is not None:
            raise ConfigError(f"--half_resolution is not available for the anatomical model {net.config.name!r}: "
                              "its region keypoints are read on the grid it was trained on")
        pre = net.config.preprocessing
        net = copy.copy(net)  # shares the weights; the configuration below is the copy's own
        net.config = dataclasses.replace(net.config,
                                         preprocessing=PreprocessConfig(pre.grid.half_resolution(), pre.intensity))
    return net


def release_arrays(res: Any) -> None:
    """Drop an alignment result's full-grid arrays (warped image and segmentation, cached dense
    field); they are recomputed on demand (:meth:`Registrar.warp`, ``dense_transform``)."""
    res.warped = None
    res.warped_seg = None
    release = getattr(res, "release_dense", None)
    if release is not None:
        release()


class Timer:
    """Accumulates wall time per named stage (``with timer("warp"): ...``)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.synchronize()
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start

    def add(self, other: dict[str, float], skip: Sequence[str] = ()) -> None:
        for k, v in other.items():
            if k not in skip:
                self.seconds[k] = self.seconds.get(k, 0.0) + v


def min_keypoints(spec: AlignSpec) -> int:
    """Fewest keypoints that determine a transform of this type (3 non-collinear for rigid, 4
    non-coplanar for affine and TPS)."""
    return 3 if spec.kind == "rigid" else 4


@dataclass(frozen=True)
class RegistrationOptions:
    """Everything besides the model and the device that decides a registration's result.

    Attributes:
        aligns: transform types: ``rigid``, ``affine``, ``tps_<lambda>``.
        weighted: ``power`` keypoint weights in the fits (``None``: the model's setting).
        label_interp: ``nearest`` or ``labelwise`` for segmentations.
        field_stride: sub-grid stride of the dense TPS field (1 = exact at every voxel).
        half_resolution: run the network at half the model's resolution.
        use_amp: bf16 autocast for the network on GPU.
        pad_value: image intensity outside the moving image (``None``: 0, or the image's minimum
            when it is negative, e.g. CT air).
        exclude_keypoints: fnmatch patterns of keypoint names dropped from both sets before every
            fit (unnamed models: ``K-1 .. K-N``); ``None``: the model's default (``fit_exclude`` in its
            config; the anatomical default model leaves out ``Extracerebral-*``), ``()``: none.
        identity_check: keep the identity for a pair whose keypoints already agree up to their noise
            (:func:`keyreg.transforms.keep_identity_if_aligned`); ``None``: on for anatomical models.
        robust: leave out keypoints that the others do not predict (:func:`keyreg.transforms.robust_fit`),
            per align; without outliers the fit is the ordinary one.
        refine: dense refinement stages (``affine``, ``deformable``; :mod:`keyreg.refine`) applied to
            every align, each giving one more alignment ``<align>+<stage>``; ``()``: none.
        refine_similarity: ``mind`` (MIND-SSC, multi-modal) or ``lncc`` (same contrast).
        refine_iterations: deformable Adam iterations per level, coarse to fine (its length is the
            number of levels).
        refine_reg_weight: weight of the velocity's diffusion energy.
        refine_seconds: wall-clock budget of each refinement (one align, one stage); ``None``: none.
        orientation_search: an anatomical model's test-time orientation search: ``always``, ``auto``
            (the image as it is first, the search only when that reading fails its checks) or ``off``;
            ``None``: the model's setting (:mod:`keyreg.models.inference`).
    """

    aligns: tuple[str, ...] = ("affine", "tps_0")
    weighted: bool | None = None
    label_interp: str = "nearest"
    field_stride: int = DEFAULT_FIELD_STRIDE
    half_resolution: bool = False
    use_amp: bool = False
    pad_value: float | None = None
    exclude_keypoints: tuple[str, ...] | None = None
    identity_check: bool | None = None
    robust: bool = False
    refine: tuple[str, ...] = ()
    refine_similarity: str = "mind"
    refine_iterations: tuple[int, ...] = DeformableConfig.iterations
    refine_reg_weight: float = DeformableConfig.reg_weight
    refine_seconds: float | None = None
    orientation_search: str | None = None

    def __post_init__(self) -> None:
        check_search_mode(self.orientation_search)
        if isinstance(self.aligns, str):
            object.__setattr__(self, "aligns", (self.aligns,))
        object.__setattr__(self, "aligns", tuple(s.name for s in parse_aligns(list(self.aligns))))
        label_interp(self.label_interp)
        object.__setattr__(self, "field_stride", check_field_stride(self.field_stride))
        if self.pad_value is not None:
            v = float(self.pad_value)
            if not math.isfinite(v):
                raise ConfigError(f"the pad value must be a finite number, got {self.pad_value!r}")
        if isinstance(self.exclude_keypoints, str):
            object.__setattr__(self, "exclude_keypoints", (self.exclude_keypoints,))
        if self.exclude_keypoints is not None:
            object.__setattr__(self, "exclude_keypoints", validate_patterns(self.exclude_keypoints))
        if isinstance(self.refine, str):
            object.__setattr__(self, "refine", (self.refine,))
        for stage in self.refine:
            if stage not in STAGES:
                raise ConfigError(f"unknown refinement {stage!r}: use {' or '.join(STAGES)}")
        object.__setattr__(self, "refine", tuple(dict.fromkeys(self.refine)))
        raw = self.refine_iterations
        raw = (raw,) if isinstance(raw, (int, float, str)) else raw
        try:
            its = tuple(int(i) for i in raw)
            if any(isinstance(i, bool) or float(i) != j for i, j in zip(raw, its)):
                raise ValueError
            weight = float(self.refine_reg_weight)
            seconds = None if self.refine_seconds is None else float(self.refine_seconds)
        except (TypeError, ValueError):
            raise ConfigError(f"refinement iterations must be whole numbers and its regularisation weight and "
                              f"seconds numbers, got {self.refine_iterations!r}, {self.refine_reg_weight!r}, "
                              f"{self.refine_seconds!r}") from None
        object.__setattr__(self, "refine_iterations", its)
        object.__setattr__(self, "refine_reg_weight", weight)
        object.__setattr__(self, "refine_seconds", seconds)
        self.refine_options().check()

    def check_mask_use(self) -> None:
        """A fixed mask is used by the refinement only: :class:`ConfigError` without one."""
        if not self.refine:
            raise ConfigError("a fixed mask limits the dense refinement's similarity: it needs a refinement "
                              "stage (refine affine or deformable)")

    def refine_options(self, progress: bool = False) -> RefineOptions:
        """The :class:`~keyreg.refine.RefineOptions` of the ``refine_*`` fields."""
        return RefineOptions(similarity=self.refine_similarity, iterations=self.refine_iterations,
                             reg_weight=self.refine_reg_weight, seconds=self.refine_seconds, progress=progress)

    @property
    def result_names(self) -> list[str]:
        """Every alignment a registration gives: the aligns, then each align's refinements in stage order."""
        return [*self.aligns, *(refined_name(a, s) for a in self.aligns for s in self.refine)]

    @property
    def specs(self) -> list[AlignSpec]:
        return parse_aligns(list(self.aligns))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"aligns": list(self.aligns), "refine": list(self.refine),
                                           "refine_iterations": list(self.refine_iterations),
                                           "exclude_keypoints": (None if self.exclude_keypoints is None
                                                                 else list(self.exclude_keypoints))}


def fit_alignments(
    fixed_kp: ImageKeypoints,
    moving_kp: ImageKeypoints,
    aligns: Sequence[AlignSpec],
    weights: torch.Tensor | None = None,
    *,
    robust: bool = False,
    fit_weights: dict[str, torch.Tensor] | None = None,
) -> dict[str, AffineTransform | ThinPlateSpline]:
    """Fit every requested transform (``moving_from_fixed``) from one pair of keypoint sets.

    TPS coordinates are normalised by the fixed network grid's field of view
    (:func:`keyreg.keypoints.tps_frame`), which keeps lambda's official meaning.  With ``robust``,
    :func:`keyreg.transforms.robust_fit` leaves out disagreeing keypoints; the weights each fit used
    (0 for a keypoint left out) are stored in ``fit_weights`` when a dict is given.
    """
    from .transforms import robust_fit

    pf, pm = fixed_kp.points.unsqueeze(0), moving_kp.points.unsqueeze(0)
    w = None if weights is None else weights.unsqueeze(0)
    c, scale = tps_frame(fixed_kp.world_from_net, fixed_kp.grid_shape)
    center = torch.as_tensor(c, device=pf.device)
    if not robust:
        return {spec.name: fit_transform(spec, pf, pm, w, center=center, scale=scale) for spec in aligns}
    out = {}
    for spec in aligns:
        rf = robust_fit(spec, pf, pm, w, center=center, scale=scale)
        out[spec.name] = rf.transform
        if fit_weights is not None:
            fit_weights[spec.name] = rf.weights[0]
    return out


class Registrar:
    """The registration pipeline for one model, device and set of options.

    Example:
        >>> reg = Registrar("keyreg-anatomy", device="cpu", aligns=["affine"])  # doctest: +SKIP
        >>> r = reg.register("moving.nii.gz", "fixed.nii.gz")                  # doctest: +SKIP
        >>> reg.measure(r, ["mse"]); reg.save(r, "out/")                        # doctest: +SKIP

    Args:
        model: bundled model name, model file, a loaded :class:`~keyreg.models.KeypointDetector`
            (never modified) or ``None`` (the default bundled model).
        device: ``cpu``, ``cuda``, ``cuda:N``, ``auto``/``None``.
        options: a :class:`RegistrationOptions`, or its fields as keywords.
        backbone, num_keypoints: if given, the model must have them.
        progress: progress bars of the refinement stage on stderr.
    """

    def __init__(self, model: Any = None, *, device: str | torch.device | None = None,
                 options: RegistrationOptions | None = None, backbone: str | None = None,
                 num_keypoints: int | None = None, progress: bool = False, **option_fields: Any) -> None:
        if options is None:
            options = RegistrationOptions(**option_fields)
        elif option_fields:
            options = dataclasses.replace(options, **option_fields)
        self.options = options
        self.device = resolve_device(device)
        self.progress = progress
        self.timer = Timer()
        self._model_arg, self._model_checks = model, {"backbone": backbone, "num_keypoints": num_keypoints}
        self._net: Any = None
        self._cache: dict[Any, ImageKeypoints] = {}
        self.network_passes = 0

    @property
    def model(self):
        """The keypoint model, loaded on first use (a registration from given keypoints needs none)."""
        if self._net is None:
            with self.timer("model"):
                self._net = resolve_model(self._model_arg, self.device, half_resolution=self.options.half_resolution,
                                          **self._model_checks)
        return self._net

    # ------------------------------------------------------------------------------------ stages
    def keypoints(self, volume: Volume, key: Any = None) -> ImageKeypoints:
        """Stage 1: keypoints of one image (world RAS mm); cached under ``key`` when given."""
        return self.keypoints_of([volume], [key])[0]

    def keypoints_of(self, volumes: Sequence[Volume], keys: Sequence[Any]) -> list[ImageKeypoints]:
        """Stage 1 for several images: those not cached under their key are detected together (their
        network passes batched; the result of each is what it would be alone)."""
        # a key names one image: its grid is part of the cache key, so another image under the same
        # key (a caller's slip) is detected anew instead of silently given the first one's keypoints
        keys = [None if k is None else (k, v.shape, np.asarray(v.affine, np.float64).round(6).tobytes())
                for k, v in zip(keys, volumes)]
        out: list[ImageKeypoints | None] = [self._cache.get(k) if k is not None else None for k in keys]
        todo = [i for i, kp in enumerate(out) if kp is None]
        if todo:
            with self.timer("keypoints"):
                found = detect_keypoints(self.model, [volumes[i] for i in todo], device=self.device,
                                         use_amp=self.options.use_amp, search=self.options.orientation_search)
            for i, kp in zip(todo, found):
                self.network_passes += kp.passes
                if keys[i] is not None:
                    self._cache[keys[i]] = kp
                out[i] = kp
        return out  # type: ignore[return-value]

    @property
    def weighted(self) -> bool:
        """Power-weighted fits: the option, else the model's setting (no model given: unweighted)."""
        w = self.options.weighted
        if w is not None:
            return bool(w)
        if self._net is None and self._model_arg is None:
            return False
        return self.model.config.weighting == "power"

    def fit_keep(self, names: Sequence[str]) -> tuple[list[int], list[str]]:
        """Which of the keypoints ``names`` enter fits: ``(kept indices, dropped names)`` under
        ``exclude_keypoints`` (``None``: the model's default ``fit_exclude``).

        Raises:
            ConfigError: a pattern that matches none of ``names`` (a typo would silently fit every point).
            DegenerateFitError: too few keypoints left for the widest align.
        """
        pats = self.options.exclude_keypoints
        default = pats is None
        if default:  # the model's default exclusion (no model given: none)
            model = self._net if self._net is not None or self._model_arg is None else self.model
            pats = tuple(getattr(getattr(model, "config", None), "fit_exclude", ()) or ())
        if not pats:
            return list(range(len(names))), []
        for p in () if default else pats:
            if len(select_keypoints(names, [p])) == len(names):
                raise ConfigError(f"--exclude_keypoints {p!r} matches no keypoint name (names are case-sensitive, "
                                  f"e.g. {names[0]!r}; `keyreg models NAME --keypoints` lists them)")
        keep = select_keypoints(names, pats)
        need = max(min_keypoints(s) for s in self.options.specs)
        worst = max(self.options.specs, key=min_keypoints)
        check_enough(len(keep), len(names), need, f"{'an' if worst.name[0] in 'aeiou' else 'a'} {worst.name} fit", pats)
        kept = set(keep)
        return keep, [n for i, n in enumerate(names) if i not in kept]

    def select(self, fixed_kp: ImageKeypoints, moving_kp: ImageKeypoints) -> tuple[ImageKeypoints, ImageKeypoints, list[str]]:
        """Drop the keypoints named by ``exclude_keypoints`` from both sets (:meth:`fit_keep`); returns
        the kept sets and the names dropped."""
        keep, dropped = self.fit_keep(fixed_kp.names)
        if not dropped:
            return fixed_kp, moving_kp, []
        return fixed_kp.subset(keep), moving_kp.subset(keep), dropped

    def fit(self, fixed_kp: ImageKeypoints, moving_kp: ImageKeypoints,
            fit_weights: dict[str, torch.Tensor] | None = None,
            check: dict[str, Any] | None = None) -> tuple[dict[str, Any], torch.Tensor | None]:
        """Stage 2: every requested transform (``moving_from_fixed``) and the fit weights (with
        ``robust``, each align's own weights go to ``fit_weights``; with the already-aligned check,
        its outcome goes to ``check``: ``already_aligned``, ``affine_motion_mm``)."""
        from .models import power_weights

        if fixed_kp.points.shape != moving_kp.points.shape:
            raise DegenerateFitError(f"the two keypoint sets differ in size: {tuple(fixed_kp.points.shape)} "
                                     f"and {tuple(moving_kp.points.shape)}")
        w = power_weights(fixed_kp.mass.unsqueeze(0), moving_kp.mass.unsqueeze(0))[0] if self.weighted else None
        with self.timer("fit"):
            fits = fit_alignments(fixed_kp, moving_kp, self.options.specs, w, robust=self.options.robust,
                                  fit_weights=fit_weights)
            if self.identity_check:
                pf, pm = fixed_kp.points.unsqueeze(0), moving_kp.points.unsqueeze(0)
                fits = keep_identity_if_aligned(fits, pf, pm, None if w is None else w.unsqueeze(0),
                                                tolerance_mm=self.aligned_tolerance_mm, info=check)
            return fits, w

    @property
    def identity_check(self) -> bool:
        """The already-aligned check: the option, else on for anatomical models."""
        if self.options.identity_check is not None:
            return bool(self.options.identity_check)
        if self._net is None and self._model_arg is None:
            return False
        return getattr(self.model.config, "regions", None) is not None

    def refine(self, reg: Registration) -> dict[str, Any]:
        """Stage 2b: dense refinement (``options.refine``) of every keypoint align; the refined
        alignments ``<align>+<stage>`` (:class:`keyreg.refine.RefinedAlignment`) are added to ``reg``
        after the keypoint aligns (align by align, stages in order) and returned."""
        if not self.options.refine:
            return {}
        from .refine import refine_registration

        starts = [name for name in reg.results if "+" not in name]
        found: dict[str, Any] = {}
        with self.timer("refine"):
            for stage in self.options.refine:
                found.update(refine_registration(reg, stage, aligns=starts,
                                                 options=self.options.refine_options(self.progress),
                                                 device=self.device))
        added = {n: found[n] for n in (refined_name(a, s) for a in starts for s in self.options.refine)}
        reg.results.update(added)
        return added

    @property
    def aligned_tolerance_mm(self) -> float:
        """The model's resolution for the already-aligned check (no model given: 0, the noise test alone)."""
        if self._net is None and self._model_arg is None:
            return 0.0
        return float(self.model.config.aligned_tolerance_mm)

    def dense(self, res: AlignmentResult):
        """Stage 3: the transform as used for warping on the fixed grid (cached on the result)."""
        with self.timer("dense_field"):
            return res.dense_transform()

    def warp(self, reg: Registration, *, image: bool = True, seg: bool = True,
             aligns: Sequence[str] | None = None) -> None:
        """Stage 4: resample the moving image (``image``) and segmentation (``seg``, when given) onto
        the fixed grid, for every alignment (or those named in ``aligns``)."""
        pad = pad_value_for(reg.moving, self.options.pad_value) if image else 0.0
        for res in reg:
            if aligns is not None and res.name not in aligns:
                continue
            dense = self.dense(res)
            with self.timer("warp"):  # image and segmentation in one pass over the fixed grid
                seg_in = reg.moving_seg if seg else None
                if image or seg_in is not None:
                    warped, warped_seg = warp_volumes(reg.moving if image else None, seg_in, reg.fixed, dense,
                                                      seg_interp=self.options.label_interp, pad_value=pad,
                                                      device=self.device)
                if image:
                    res.warped = warped
                    res.warped.name = f"{reg.moving.name}_{res.name}"
                if seg_in is not None:
                    res.warped_seg = warped_seg
                    res.warped_seg.name = f"{reg.moving.name}_{res.name}_seg"

    def measure(self, reg: Registration, metrics: Sequence[str],
                aligns: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
        """Stage 5: metrics for every alignment (or those named in ``aligns``; also stored in each
        result's ``metrics``)."""
        with self.timer("metrics"):
            return reg.evaluate(metrics, aligns=aligns)

    def measure_before(self, reg: Registration, metrics: Sequence[str]) -> dict[str, Any]:
        """Stage 5 for the pair as it was: the metrics before registration (the ``none`` row)."""
        with self.timer("metrics"):
            return reg.evaluate_before(metrics, label_interp=self.options.label_interp,
                                       pad_value=self.options.pad_value, device=self.device)

    def stream(self, reg: Registration, metrics: Sequence[str] = (), *, image: bool = True, seg: bool = True,
               each: Callable[[Any], None] | None = None, before: Sequence[str] = ()) -> dict[str, dict[str, Any]]:
        """Stages 3-5 (and the caller's 6) align by align: the dense field, the warp, the metrics,
        then ``each(result)`` (e.g. write its files), then the result's warped volumes and dense field
        are dropped before the next align.  Peak memory holds one align's full-grid arrays instead
        of every align's; the values are those of :meth:`warp` + :meth:`measure` over all aligns
        (each align's computation does not depend on the others).

        Returns:
            align -> metrics (empty dicts without ``metrics``); with ``before`` (metric names) first
            ``"none"``: those metrics before registration (:meth:`measure_before`).
        """
        out: dict[str, dict[str, Any]] = {}
        if before:
            out["none"] = self.measure_before(reg, before)
        for res in reg:
            self.warp(reg, image=image, seg=seg, aligns=[res.name])
            out[res.name] = self.measure(reg, metrics, aligns=[res.name])[res.name] if metrics else {}
            if each is not None:
                each(res)
            release_arrays(res)
        reg.release_measure_cache()
        return out

    def save(self, reg: Registration, directory: str | Path, *, write_images: bool = True,
             visualize: bool = False) -> dict[str, Path]:
        """Stage 6: keypoints and every alignment's files under ``directory``."""
        with self.timer("write"):
            return reg.save(directory, write_images=write_images, visualize=visualize)

    # ------------------------------------------------------------------------------------ runs
    def load(self, moving: Any, fixed: Any, moving_seg: Any = None,
             fixed_seg: Any = None) -> tuple[Volume, Volume, Volume | None, Volume | None]:
        """Read and check the inputs: images, and segmentations on their images' grids."""
        for name, x in (("moving", moving), ("fixed", fixed)):
            if x is None:
                raise ConfigError(f"the {name} image is missing (None)")
        with self.timer("load"):
            # read on threads (parallel gzip decompression); a bad input's error in this order
            given = [(fixed, "image"), (moving, "image"), (fixed_seg, "labels"), (moving_seg, "labels")]
            # segmentations in their smallest integer type (uint8 for most atlases: 1/8 of int64)
            vols = iter(load_volumes([(src, kind) for src, kind in given if src is not None], compact_labels=True))
            fixed_v, moving_v, fixed_s, moving_s = (None if src is None else next(vols) for src, _ in given)
        if fixed_s is not None:
            check_same_grid(fixed_s, fixed_v, "fixed segmentation")
        if moving_s is not None:
            check_same_grid(moving_s, moving_v, "moving segmentation")
        return moving_v, fixed_v, moving_s, fixed_s

    def load_mask(self, fixed_mask: Any, fixed: Volume) -> Volume | None:
        """Read the fixed mask (non-zero = used by the refinement's similarity) and check it lies on
        the fixed image's grid; it needs a refinement stage."""
        if fixed_mask is None:
            return None
        self.options.check_mask_use()
        with self.timer("load"):
            mask = load_volume(fixed_mask, kind="labels")
        check_fixed_mask(mask, fixed)
        return mask

    def register(self, moving: Any, fixed: Any, *, moving_seg: Any = None, fixed_seg: Any = None,
                 fixed_mask: Any = None, moving_key: Any = None, fixed_key: Any = None,
                 warp: bool = True) -> Registration:
        """Load, detect keypoints (cached under ``*_key``), fit every align, refine them
        (``options.refine``; ``fixed_mask`` limits the similarity) and (``warp``) resample the moving
        image and segmentation onto the fixed grid.

        Returns:
            A :class:`~keyreg.results.Registration`; measure and save it with :meth:`measure`,
            :meth:`save`.
        """
        start = dict(self.timer.seconds)
        moving_v, fixed_v, moving_s, fixed_s = self.load(moving, fixed, moving_seg, fixed_seg)
        mask = self.load_mask(fixed_mask, fixed_v)
        kf, km = self.keypoints_of([fixed_v, moving_v], [fixed_key, moving_key])
        reg = self._assemble(moving_v, fixed_v, moving_s, fixed_s, kf, km, mask)
        if warp:
            self.warp(reg)
        reg.timings = {k: v - start.get(k, 0.0) for k, v in self.timer.seconds.items() if v != start.get(k, 0.0)}
        return reg

    def register_keypoints(self, moving: Any, fixed: Any, fixed_kp: ImageKeypoints, moving_kp: ImageKeypoints, *,
                           moving_seg: Any = None, fixed_seg: Any = None, fixed_mask: Any = None,
                           warp: bool = True) -> Registration:
        """:meth:`register` from keypoints found elsewhere (landmarks, another model): the pipeline from
        the fit stage on; the network is not run."""
        start = dict(self.timer.seconds)
        moving_v, fixed_v, moving_s, fixed_s = self.load(moving, fixed, moving_seg, fixed_seg)
        mask = self.load_mask(fixed_mask, fixed_v)
        reg = self._assemble(moving_v, fixed_v, moving_s, fixed_s, fixed_kp, moving_kp, mask)
        if warp:
            self.warp(reg)
        reg.timings = {k: v - start.get(k, 0.0) for k, v in self.timer.seconds.items() if v != start.get(k, 0.0)}
        return reg

    def _assemble(self, moving_v: Volume, fixed_v: Volume, moving_s: Volume | None, fixed_s: Volume | None,
                  kf: ImageKeypoints, km: ImageKeypoints, fixed_mask: Volume | None = None) -> Registration:
        kf_fit, km_fit, dropped = self.select(kf, km)
        per_align: dict[str, torch.Tensor] = {}
        check: dict[str, Any] = {}
        transforms, w = self.fit(kf_fit, km_fit, per_align, check)
        w_np = None if w is None else w.detach().cpu().numpy()
        results = {
            spec.name: AlignmentResult(spec, transforms[spec.name], fixed_v, moving_v, kf_fit.numpy(), km_fit.numpy(),
                                       per_align[spec.name].detach().cpu().numpy() if spec.name in per_align else w_np,
                                       self.options.field_stride, keypoint_names=list(kf_fit.names),
                                       pad_value=self.options.pad_value)
            for spec in self.options.specs}
        reg = Registration(fixed_v, moving_v, kf, km, results, fixed_s, moving_s, w_np, excluded_keypoints=dropped,
                           fit_keypoints=(kf_fit.numpy(), km_fit.numpy()), alignment_check=check, fixed_mask=fixed_mask)
        self.refine(reg)
        return reg

    def describe(self) -> str:
        c = self.model.config
        refine = f", refine {' '.join(self.options.refine)}" if self.options.refine else ""
        return (f"model {c.name} ({c.architecture.describe()}), aligns {' '.join(self.options.aligns)}{refine}, "
                f"device {self.device}")

