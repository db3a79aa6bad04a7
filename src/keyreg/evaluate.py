"""Accuracy and robustness evaluation: many pairs, explicit seeded perturbations, every align.

The protocol (``keyreg evaluate``):

* **Images** come with a segmentation each, from a directory pair, a CSV, or label maps with
  synthetic contrasts (:func:`images_from_directories`, :func:`images_from_csv`,
  :func:`images_from_label_maps`).  Every image has a ``subject`` and a ``modality``.
* **Pairs** (:func:`make_pairs`) are of three kinds: ``same_subject_cross_modality``,
  ``cross_subject_same_modality`` and ``cross_subject_cross_modality``.  An image is never paired
  with itself (same entry or same file).
* **Perturbations** (:func:`draw_perturbation`): the moving image is rotated by each angle of
  ``rotations`` about ONE axis — a random unit axis drawn per (pair, angle) from the seed, or a
  given axis — through the centre of its field of view, then scaled isotropically by a random
  factor in ``[1 - scaling, 1 + scaling]`` about that centre and translated by a random vector
  uniform in ``[-translation, translation]^3`` mm.  A rotation of 180° is a half turn (never the
  identity) and 135° is not 45°.
* **How the perturbation is applied** (``mode``): ``"header"`` multiplies the moving image's
  world-from-voxel affine by the perturbation ``P`` (``A' = P A``): the voxels are untouched, so
  nothing is interpolated or cropped, and the segmentation, which shares the affine, moves with
  it exactly.  keyreg works in world space (a ``ras`` network grid resamples the image onto an
  axis-aligned grid), so for it this is the same as rotating the content.  ``"resample"`` resamples
  the image (trilinear) and its segmentation (nearest) on their own grid through ``P``
  (``I'(x) = I(P^-1 x)``, corners may leave the field of view); it is needed for models whose
  network grid follows the image's voxel axes (``fov`` grids: the official IXI models), which
  would not see a header rotation.  ``"auto"`` (default) picks ``resample`` for ``fov`` models and
  ``header`` otherwise.  (A ``ras`` network grid is centred on the image's field of view, so a
  translation moves the grid with the image: translations test the fits and resampling, not the
  network.)
* **Synthetic contrasts** (label-map inputs): each contrast name is one seeded draw of per-label
  mean intensities shared by every label map (``t1``/``t2``/``pd`` follow those MRI contrasts with
  the training generator ``keyreg.train.synth``; noise, blur, bias and gamma are drawn per image).
* **Keypoints** are detected once per image and perturbation (cached), **metrics** (default hard
  Dice: background excluded, labels present in either map, labels absent from both not counted)
  are computed on the fixed grid for every align, plus ``none`` = before registration (the moving
  segmentation resampled through the identity in world space).

Outputs (:func:`write_outputs`): ``evaluation.csv`` (one row per pair, perturbation, align and
metric), ``summary.md`` (mean ± std per pair kind × align × rotation) and ``dice_vs_rotation.png``.
"""

from __future__ import annotations

import csv
import io
import math
import re
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from .errors import ConfigError, ImageContentError, ImageIOError, KeyregError
from .geometry import fov_center, rotation_about
from .io import Volume, atomic_path, atomic_write_text, check_same_grid, load_volume, nifti_stem
from .pairing import list_nifti

__all__ = [
    "PAIR_KINDS",
    "EvalImage",
    "EvalPair",
    "Perturbation",
    "EvaluationResult",
    "images_from_directories",
    "images_from_csv",
    "images_from_label_maps",
    "make_pairs",
    "draw_perturbation",
    "perturb",
    "evaluate",
    "write_outputs",
    "format_evaluation_summary",
    "CSV_COLUMNS",
]

from .pairing import PAIR_KINDS  # noqa: E402
PerturbMode = Literal["auto", "header", "resample"]

#: Columns of ``evaluation.csv`` (long format: one value per row).
CSV_COLUMNS = ["pair", "kind", "moving", "fixed", "moving_modality", "fixed_modality", "rotation_deg",
               "axis_x", "axis_y", "axis_z", "translation_x", "translation_y", "translation_z", "scale",
               "align", "metric", "value"]


# --------------------------------------------------------------------------------------------------
# inputs


@dataclass
class EvalImage:
    """One image of the evaluation set with its segmentation.

    Attributes:
        name: unique short name (used in pair names and the CSV).
        subject: images of one subject share it (same anatomy, possibly other modalities).
        modality: contrast name (``t1``, ``t2``, ...).
        image, seg: the image and its label map on the same grid.
        source: where it came from (file path, or ``label map + contrast``).
    """

    name: str
    subject: str
    modality: str
    image: Volume
    seg: Volume
    source: str = ""


def _load_pair(img_path: Path, seg_path: Path, name: str) -> tuple[Volume, Volume]:
    image = load_volume(img_path, kind="image", name=name)
    seg = load_volume(seg_path, kind="labels", name=str(seg_path))
    check_same_grid(seg, image, f"segmentation (of {img_path})")
    seg.name = f"{name}_seg"
    return image, seg


def images_from_directories(images: str | Path, segs: str | Path, *, modality: str = "image",
                            name_pattern: str | None = None) -> list[EvalImage]:
    """Images of a directory with their segmentations (same file names in ``segs``).

    Args:
        modality: modality of every image when ``name_pattern`` does not give one.
        name_pattern: a regular expression searched in each file name (without ``.nii[.gz]``)
            with named groups ``subject`` and/or ``modality`` (e.g.
            ``(?P<subject>IXI\\d+)-.*-(?P<modality>T1|T2|PD)``).  Without it, every file is its
            own subject.
    """
    images, segs = Path(images), Path(segs)
    for p, flag in ((images, "--images"), (segs, "--segs")):
        if not p.is_dir():
            raise ImageIOError(f"{p}: {flag} must be an existing directory")
    regex = _compile(name_pattern)
    out = []
    for path in list_nifti(images):
        seg_path = segs / path.name
        if not seg_path.exists():
            raise ImageIOError(f"{seg_path}: no segmentation for {path} (same file name expected in --segs)")
        name = nifti_stem(path)
        subject, mod = name, modality
        if regex is not None:
            m = regex.search(name)
            if m is None:
                raise ConfigError(f"--name_pattern {name_pattern!r} does not match the file name {path.name!r}")
            groups = m.groupdict()
            subject = groups.get("subject") or subject
            mod = groups.get("modality") or mod
        image, seg = _load_pair(path, seg_path, name)
        out.append(EvalImage(name, subject, mod, image, seg, str(path)))
    return out


def _compile(pattern: str | None) -> re.Pattern | None:
    if pattern is None:
        return None
    try:
        regex = re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"--name_pattern {pattern!r} is not a valid regular expression ({e})") from None
    if not {"subject", "modality"} & set(regex.groupindex):
        raise ConfigError(f"--name_pattern {pattern!r} needs a named group (?P<subject>...) or (?P<modality>...)")
    return regex


def images_from_csv(path: str | Path) -> list[EvalImage]:
    """Images listed in a CSV with columns ``img_path,seg_path,modality`` (optionally ``subject``).

    The header row is optional when there are exactly those three columns in that order.  Relative
    paths are relative to the CSV's directory.  Without a ``subject`` column, images that share
    a segmentation file are one subject (the same anatomy in several modalities); otherwise each
    segmentation file is its own subject.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageIOError(f"{path}: CSV file does not exist")
    try:
        rows = [r for r in csv.reader(io.StringIO(path.read_text())) if r and any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ImageIOError(f"{path}: cannot read as CSV ({e})") from None
    if not rows:
        raise ConfigError(f"{path}: the CSV is empty")
    first = [c.strip().lower() for c in rows[0]]
    has_header = "img_path" in first
    if has_header:
        header, rows = first, rows[1:]
    else:
        header = ["img_path", "seg_path", "modality"]
    for col in ("img_path", "seg_path", "modality"):
        if col not in header:
            raise ConfigError(f"{path}: the CSV needs the columns img_path,seg_path,modality (missing {col})")
    col = {c: header.index(c) for c in header}
    base = path.parent
    entries = []
    for lineno, r in enumerate(rows, start=2 if has_header else 1):
        if len(r) < len(header):
            raise ConfigError(f"{path}:{lineno}: expected {len(header)} columns, got {len(r)}")
        img = Path(r[col["img_path"]].strip())
        seg = Path(r[col["seg_path"]].strip())
        img, seg = (p if p.is_absolute() else base / p for p in (img, seg))
        subject = r[col["subject"]].strip() if "subject" in col else str(seg.resolve())
        entries.append((img, seg, r[col["modality"]].strip() or "image", subject))
    if not entries:
        raise ConfigError(f"{path}: the CSV lists no image")
    names = _unique_names([nifti_stem(e[0]) for e in entries])
    out = []
    for (img, seg, mod, subject), name in zip(entries, names):
        image, segv = _load_pair(img, seg, name)
        out.append(EvalImage(name, subject, mod, image, segv, str(img)))
    return out


def _unique_names(names: Sequence[str]) -> list[str]:
    counts: dict[str, int] = {}
    for n in names:
        counts[n] = counts.get(n, 0) + 1
    seen: dict[str, int] = {}
    out = []
    for n in names:
        if counts[n] > 1:
            seen[n] = seen.get(n, 0) + 1
            out.append(f"{n}#{seen[n]}")
        else:
            out.append(n)
    return out


def _fallback_means(table_size: int, generator: torch.Generator) -> torch.Tensor:
    """``(1, table_size)``: one random intensity per label id, uniform in [0.1, 1]; background (id 0)
    in [0, 0.1]."""
    means = 0.1 + 0.9 * torch.rand((1, table_size), generator=generator, dtype=torch.float64)
    means[0, 0] = 0.1 * float(torch.rand((), generator=generator, dtype=torch.float64))
    return means.float()


def _fallback_synthesize(labels: torch.Tensor, generator: torch.Generator, means: torch.Tensor, *,
                         noise_std: float = 0.04) -> torch.Tensor:
    """The per-label intensities ``means`` plus Gaussian noise, clipped to [0, 1]."""
    img = means[0][labels.clamp_min(0)]
    img = img + noise_std * torch.randn(img.shape, generator=generator)
    return img.clamp_(0, 1)


def _synthesizer() -> tuple[Callable[[int, str, torch.Generator], torch.Tensor],
                            Callable[[torch.Tensor, torch.Generator, torch.Tensor], torch.Tensor], str]:
    """``(draw_means, synthesize, name)``: the training generator ``keyreg.train.synth`` when it is
    installed (named contrasts ``t1``/``t2``/``pd`` use its tissue-class means; other names are
    random draws; skull stripping off, so image and segmentation cover the same head), else a
    simple fallback (a random intensity per label id and Gaussian noise)."""
    try:
        from .train import synth  # type: ignore[attr-defined]
        draw, make = synth.random_means, synth.synthesize_image
    except (ImportError, AttributeError):
        return (lambda size, name, g: _fallback_means(size, g),
                lambda labels, g, means: _fallback_synthesize(labels, g, means),
                "keyreg.evaluate fallback (random intensity per label id + Gaussian noise)")
    named = {k.lower() for k in getattr(synth, "NAMED_CONTRASTS", {})}

    def draw_means(size: int, name: str, g: torch.Generator) -> torch.Tensor:
        return draw(1, size, g, contrast=name.lower() if name.lower() in named else None)

    def synthesize(labels: torch.Tensor, g: torch.Generator, means: torch.Tensor) -> torch.Tensor:
        return make(labels, g, means=means, skull_strip=False).float()

    return draw_means, synthesize, "keyreg.train.synth.synthesize_image (one means table per contrast name)"


def _seed_of(*parts: Any) -> int:
    return zlib.crc32("|".join(str(p) for p in parts).encode())


def images_from_label_maps(paths: Sequence[str | Path], contrasts: Sequence[str], *, seed: int = 0,
                           stride: int = 1) -> tuple[list[EvalImage], str]:
    """One synthetic image per label map and contrast; the label map is its segmentation.

    Args:
        paths: label map files, or directories of them.
        contrasts: contrast names.  Each name is ONE seeded random draw of the per-label mean
            intensities, shared by all label maps (so ``cross_subject_same_modality`` pairs have the
            same contrast); noise and other per-image effects are drawn per image.  With the
            training generator, ``t1``, ``t2`` and ``pd`` follow those MRI contrasts' tissue means.
        seed: the evaluation seed.
        stride: keep every ``stride``-th voxel of each label map (exact for labels; the affine is
            scaled accordingly), to evaluate quickly at a lower resolution.

    Returns:
        ``(images, synthesizer_name)``.
    """
    if stride < 1:
        raise ConfigError(f"--label_stride must be >= 1, got {stride}")
    if not contrasts:
        raise ConfigError("--contrasts needs at least one contrast name")
    if len(set(contrasts)) != len(contrasts):
        raise ConfigError(f"--contrasts names must be distinct, got {list(contrasts)}")
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += list_nifti(p)
        elif p.exists():
            files.append(p)
        else:
            raise ImageIOError(f"{p}: label map does not exist")
    subjects = _unique_names([nifti_stem(f) for f in files])
    segs = []
    for f, subject in zip(files, subjects):
        seg = load_volume(f, kind="labels", name=subject)
        if stride > 1:
            aff = seg.affine.copy()
            aff[:3, :3] = aff[:3, :3] * stride
            seg = Volume(np.ascontiguousarray(seg.data[::stride, ::stride, ::stride]), aff, None, subject, "labels")
        if not (seg.data != 0).any():
            raise ImageContentError(f"{f}: label map is empty (all background)")
        if int(seg.data.min()) < 0:
            raise ImageContentError(f"{f}: label map has negative ids")
        segs.append(seg)
    draw_means, synthesize, synth_name = _synthesizer()
    table = max(int(s.data.max()) for s in segs) + 1
    means = {c: draw_means(table, c, torch.Generator().manual_seed(_seed_of(seed, "contrast", c)))
             for c in contrasts}
    out: list[EvalImage] = []
    for f, subject, seg in zip(files, subjects, segs):
        labels_t = torch.from_numpy(seg.data)[None, None]
        for c in contrasts:
            gen = torch.Generator().manual_seed(_seed_of(seed, "image", subject, c))
            img = synthesize(labels_t, gen, means[c])
            image = load_volume((img[0, 0].numpy(), seg.affine), kind="image", name=f"{subject}_{c}")
            out.append(EvalImage(f"{subject}_{c}", subject, c, image, seg, f"{f} ({c})"))
    return out, synth_name


# --------------------------------------------------------------------------------------------------
# pairs


@dataclass(frozen=True)
class EvalPair:
    """Indices of the moving and fixed images in the image list, and the pair kind."""

    moving: int
    fixed: int
    kind: str


def make_pairs(images: Sequence[EvalImage], kinds: Sequence[str] = PAIR_KINDS, *,
               max_pairs_per_kind: int | None = None, seed: int = 0) -> list[EvalPair]:
    """All ordered pairs (moving, fixed) of the requested kinds; never an image with itself.

    ``same_subject_cross_modality``: one subject, two modalities; ``cross_subject_same_modality``:
    two subjects, one modality; ``cross_subject_cross_modality``: two subjects, two modalities.
    Entries pointing at the same file are never paired either.  With ``max_pairs_per_kind``, a
    seeded random subset of each kind is kept (in the original order).
    """
    bad = [k for k in kinds if k not in PAIR_KINDS]
    if bad:
        raise ConfigError(f"unknown pair kind {bad[0]!r}; use: {', '.join(PAIR_KINDS)}")
    if max_pairs_per_kind is not None and max_pairs_per_kind < 1:
        raise ConfigError(f"--max_pairs must be >= 1, got {max_pairs_per_kind}")
    out: list[EvalPair] = []
    for kind in dict.fromkeys(kinds):
        sel = []
        for m, mov in enumerate(images):
            for f, fix in enumerate(images):
                if m == f or (mov.image.path is not None and mov.image.path == fix.image.path):
                    continue
                same_subject = mov.subject == fix.subject
                same_modality = mov.modality == fix.modality
                ok = {"same_subject_cross_modality": same_subject and not same_modality,
                      "cross_subject_same_modality": not same_subject and same_modality,
                      "cross_subject_cross_modality": not same_subject and not same_modality}[kind]
                if ok:
                    sel.append(EvalPair(m, f, kind))
        if max_pairs_per_kind is not None and len(sel) > max_pairs_per_kind:
            rng = np.random.default_rng(_seed_of(seed, "pairs", kind))
            keep = sorted(rng.choice(len(sel), max_pairs_per_kind, replace=False).tolist())
            sel = [sel[i] for i in keep]
        out += sel
    return out


# --------------------------------------------------------------------------------------------------
# perturbations


@dataclass(frozen=True)
class Perturbation:
    """A world-space similarity applied to the moving image.

    ``P(x) = c + t + s R (x - c)``: rotation ``R`` by ``rotation_deg`` about the unit ``axis``
    through the centre ``c`` of the image's field of view, isotropic scale ``s`` about ``c``,
    translation ``t`` (mm, RAS).
    """

    rotation_deg: float
    axis: tuple[float, float, float]
    translation: tuple[float, float, float] = (0.0, 0.0, 0.0)
    scale: float = 1.0

    def matrix(self, center: np.ndarray) -> np.ndarray:
        """``(4, 4)`` world RAS matrix of ``P`` for the rotation centre ``center`` (mm)."""
        c = np.asarray(center, dtype=np.float64)
        lin = self.scale * rotation_about(self.axis, self.rotation_deg)
        out = np.eye(4)
        out[:3, :3] = lin
        out[:3, 3] = c + np.asarray(self.translation, dtype=np.float64) - lin @ c
        return out

    @property
    def is_identity(self) -> bool:
        return (math.isclose(math.remainder(self.rotation_deg, 360.0), 0.0, abs_tol=1e-12)
                and self.scale == 1.0 and not any(self.translation))


def draw_perturbation(seed: int, pair_key: str, rotation_deg: float, *,
                      axis: Sequence[float] | None = None, translation: float = 0.0,
                      scaling: float = 0.0) -> Perturbation:
    """The perturbation of one (pair, angle), reproducible from ``(seed, pair_key, angle)`` alone.

    Args:
        axis: a fixed rotation axis (normalised); ``None`` = a random unit axis (isotropic).
        translation: each component uniform in ``[-translation, translation]`` mm.
        scaling: isotropic scale uniform in ``[1 - scaling, 1 + scaling]``.
    """
    if translation < 0:
        raise ConfigError(f"--translation must be >= 0 mm, got {translation}")
    if not 0 <= scaling < 1:
        raise ConfigError(f"--scaling must be in [0, 1), got {scaling}")
    if not math.isfinite(rotation_deg):
        raise ConfigError(f"rotation angles must be finite, got {rotation_deg}")
    rng = np.random.default_rng(_seed_of(seed, pair_key, f"{float(rotation_deg):.6g}"))
    random_axis = rng.normal(size=3)
    t = rng.uniform(-1.0, 1.0, size=3) * translation
    s = 1.0 + rng.uniform(-1.0, 1.0) * scaling
    if axis is None:
        ax = random_axis
    else:
        ax = np.asarray(axis, dtype=np.float64)
        if ax.shape != (3,) or not np.all(np.isfinite(ax)) or np.linalg.norm(ax) == 0:
            raise ConfigError(f"--axis must be 3 numbers, not all zero, got {list(axis)}")
    ax = ax / np.linalg.norm(ax)
    return Perturbation(float(rotation_deg), tuple(float(v) for v in ax),  # type: ignore[arg-type]
                        tuple(float(v) for v in t), float(s))  # type: ignore[arg-type]


def perturb(image: Volume, seg: Volume, pert: Perturbation, mode: Literal["header", "resample"],
            device: torch.device | str = "cpu") -> tuple[Volume, Volume, np.ndarray]:
    """Apply ``pert`` to an image and its segmentation (see the module docstring for ``mode``).

    Returns:
        ``(image', seg', P)`` with ``P`` the ``(4, 4)`` world matrix applied to the content.
    """
    from .transforms import AffineTransform
    from .warp import warp_image, warp_labels

    p = pert.matrix(fov_center(image.affine, image.shape))
    if mode == "header":
        aff = p @ image.affine
        return (Volume(image.data, aff, None, image.name, "image"),
                Volume(seg.data, aff, None, seg.name, "labels"), p)
    if mode != "resample":
        raise ConfigError(f"unknown perturbation mode {mode!r}: use header or resample")
    inv = AffineTransform(torch.as_tensor(np.linalg.inv(p), device=device))  # new(x) = old(P^-1 x)
    img = warp_image(image.tensor(device).float(), image.affine, image.shape, image.affine, inv)[0, 0]
    lab = warp_labels(seg.tensor(device)[:, 0], seg.affine, seg.shape, seg.affine, inv)[0]
    return (Volume(img.cpu().numpy(), image.affine, image.header, image.name, "image"),
            Volume(lab.cpu().numpy(), seg.affine, seg.header, seg.name, "labels"), p)


# --------------------------------------------------------------------------------------------------
# the evaluation loop


@dataclass
class EvaluationResult:
    """Everything :func:`evaluate` measured.

    Attributes:
        rows: one dict per (pair, perturbation, align, metric) with the keys of :data:`CSV_COLUMNS`.
        failures: ``(task, message)`` for tasks that raised a :class:`KeyregError`.
        timings: seconds per stage, summed over tasks.
        network_passes: images run through the network (one per image and perturbation).
        settings: what was evaluated (for the summary).
    """

    rows: list[dict[str, Any]]
    failures: list[tuple[str, str]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    network_passes: int = 0
    settings: dict[str, Any] = field(default_factory=dict)


def evaluate(
    images: Sequence[EvalImage],
    pairs: Sequence[EvalPair],
    *,
    model: Any,
    aligns: Sequence[str] = ("rigid", "affine", "tps_0"),
    metrics: Sequence[str] = ("harddice",),
    rotations: Sequence[float] = (0, 45, 90, 135, 180),
    axis: Sequence[float] | None = None,
    translation: float = 0.0,
    scaling: float = 0.0,
    seed: int = 0,
    mode: PerturbMode = "auto",
    device: str | torch.device | None = None,
    use_amp: bool = False,
    weighted: bool | None = None,
    label_interp: str = "nearest",
    field_stride: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> EvaluationResult:
    """Register every pair under every perturbation with every align and measure ``metrics``.

    Args:
        images, pairs: from the ``images_from_*`` loaders and :func:`make_pairs`.
        model: a :class:`~keyreg.models.KeypointDetector`, a model file or bundled name
            (``None`` = the bundled default).
        rotations: angles in degrees; each (pair, angle) gets its own perturbation
            (:func:`draw_perturbation`).
        mode: ``"header"``, ``"resample"`` or ``"auto"`` (see the module docstring).
        progress: show a progress bar (tqdm, on stderr).
        log: called with one line per finished task (default: nothing).

    Returns:
        An :class:`EvaluationResult`.
    """
    from tqdm import tqdm

    from .measure import measure_before
    from .metrics import METRICS, parse_metrics
    from .pipeline import Registrar, RegistrationOptions
    from .transforms import DEFAULT_FIELD_STRIDE

    options = RegistrationOptions(aligns=tuple(aligns), weighted=weighted, label_interp=label_interp,
                                  field_stride=DEFAULT_FIELD_STRIDE if field_stride is None else field_stride,
                                  use_amp=use_amp)
    align_names = list(options.aligns)
    metric_names = parse_metrics(list(metrics))
    if not rotations:
        raise ConfigError("at least one rotation angle is needed")
    rotations = [float(r) for r in dict.fromkeys(float(r) for r in rotations)]
    if not all(math.isfinite(r) for r in rotations):
        raise ConfigError(f"rotation angles must be finite, got {rotations}")
    if not pairs:
        raise ConfigError("no pairs to evaluate")
    # validate perturbation options before any work
    draw_perturbation(seed, "check", 0.0, axis=axis, translation=translation, scaling=scaling)
    registrar = Registrar(model, device=device, options=options)
    dev = registrar.device
    net = registrar.model
    grid_mode = net.config.preprocessing.grid.mode
    if mode == "auto":
        mode = "resample" if grid_mode == "fov" else "header"
    if mode not in ("header", "resample"):
        raise ConfigError(f"unknown perturbation mode {mode!r}: use auto, header or resample")

    need_image = any(METRICS[m] == "image" for m in metric_names)
    timer = registrar.timer
    rows: list[dict[str, Any]] = []
    failures: list[tuple[str, str]] = []
    tasks = [(pair, angle) for pair in pairs for angle in rotations]
    bar = tqdm(tasks, desc="evaluate", unit="task", file=sys.stderr, dynamic_ncols=True, disable=not progress)
    for pair, angle in bar:
        mov, fix = images[pair.moving], images[pair.fixed]
        pair_name = f"{mov.name}_to_{fix.name}"
        task = f"{pair_name} rot{angle:g}"
        start = time.perf_counter()
        try:
            pert = draw_perturbation(seed, pair_name, angle, axis=axis, translation=translation, scaling=scaling)
            with timer("perturb"):
                moving, moving_seg, p = perturb(mov.image, mov.seg, pert, mode, dev)
            with timer("metrics"):
                results = {"none": measure_before(metric_names, fixed=fix.image, moving=moving, fixed_seg=fix.seg,
                                                  moving_seg=moving_seg, label_interp=options.label_interp,
                                                  device=dev)}
            # keypoints are cached per image and perturbation; the image is resampled only for image metrics
            reg = registrar.register(moving, fix.image, moving_seg=moving_seg, fixed_seg=fix.seg,
                                     fixed_key=(pair.fixed, np.eye(4).tobytes()),
                                     moving_key=(pair.moving, np.round(p, 9).tobytes()), warp=False)
            registrar.warp(reg, image=need_image, seg=True)
            results.update(registrar.measure(reg, metric_names))
        except KeyregError as e:
            failures.append((task, str(e)))
            bar.write(f"FAILED {task}: {e}", file=sys.stderr)
            continue
        base = {"pair": pair_name, "kind": pair.kind, "moving": mov.name, "fixed": fix.name,
                "moving_modality": mov.modality, "fixed_modality": fix.modality, "rotation_deg": angle,
                "axis_x": pert.axis[0], "axis_y": pert.axis[1], "axis_z": pert.axis[2],
                "translation_x": pert.translation[0], "translation_y": pert.translation[1],
                "translation_z": pert.translation[2], "scale": pert.scale}
        for align in ["none", *align_names]:
            for m in metric_names:
                rows.append({**base, "align": align, "metric": m, "value": float(results[align][m])})
        if log is not None:
            first = metric_names[0]
            log(f"{task} ({time.perf_counter() - start:.1f} s)  " +
                " ".join(f"{a}={results[a][first]:.4f}" for a in ["none", *align_names]))
    bar.close()
    passes = registrar.network_passes
    settings = {"images": len(images), "pairs": len(pairs), "rotations": rotations, "aligns": align_names,
                "metrics": metric_names, "axis": None if axis is None else [float(a) for a in axis],
                "translation_mm": translation, "scaling": scaling, "seed": seed, "mode": mode,
                "model": f"{net.config.name} ({net.config.architecture.describe()}, {grid_mode} grid)",
                "device": str(dev), "kinds": sorted({p.kind for p in pairs}, key=PAIR_KINDS.index)}
    return EvaluationResult(rows, failures, dict(timer.seconds), passes, settings)


# --------------------------------------------------------------------------------------------------
# outputs


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def _stats(values: Sequence[float]) -> tuple[float, float, int]:
    vals = [v for v in values if math.isfinite(v)]
    if not vals:
        return float("nan"), float("nan"), 0
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals))
    return mean, std, len(vals)


def _grouped(rows: Sequence[dict[str, Any]], metric: str) -> dict[tuple[str, str, float], list[float]]:
    out: dict[tuple[str, str, float], list[float]] = {}
    for r in rows:
        if r["metric"] == metric:
            out.setdefault((r["kind"], r["align"], float(r["rotation_deg"])), []).append(float(r["value"]))
    return out


def format_evaluation_summary(result: EvaluationResult) -> str:
    """Markdown tables: per metric, one row per (pair kind, align), one column per rotation angle
    (``mean ± std``, over pairs), plus the spread of the means over the angles."""
    s = result.settings
    rows = result.rows
    rotations = s["rotations"]
    aligns = ["none", *s["aligns"]]
    lines = ["# keyreg evaluate", ""]
    axis = "random unit axis per (pair, angle)" if s["axis"] is None else f"axis {s['axis']}"
    lines += [f"- model: {s['model']}; device {s['device']}",
              f"- images: {s['images']}; pairs: {s['pairs']} ({', '.join(s['kinds'])})",
              f"- perturbation ({s['mode']} mode): rotation {', '.join(f'{r:g}' for r in rotations)} degrees "
              f"about a {axis}, translation ±{s['translation_mm']:g} mm, scaling ±{s['scaling']:g}; seed {s['seed']}",
              f"- network passes: {result.network_passes}; failed tasks: {len(result.failures)}"]
    if s.get("synthesizer"):
        lines.append(f"- synthetic contrasts: {s['synthesizer']}")
    if result.timings:
        lines.append("- time per stage: " + ", ".join(f"{k} {v:.2f} s" for k, v in result.timings.items()))
    lines.append("- `none` = before registration; values are mean ± std over pairs (n = pairs)")
    for metric in s["metrics"]:
        groups = _grouped(rows, metric)
        lines += ["", f"## {metric}", "",
                  "| pair kind | align | " + " | ".join(f"{r:g}°" for r in rotations) + " | max − min of means |",
                  "|---|---|" + "---|" * len(rotations) + "---|"]
        for kind in s["kinds"]:
            for align in aligns:
                cells, means = [], []
                for rot in rotations:
                    mean, std, n = _stats(groups.get((kind, align, rot), []))
                    if n == 0:
                        cells.append("n/a")
                        continue
                    means.append(mean)
                    cells.append(f"{mean:.4f} ± {std:.4f} (n={n})")
                spread = f"{max(means) - min(means):.4f}" if len(means) > 1 else "n/a"
                lines.append(f"| {kind} | {align} | " + " | ".join(cells) + f" | {spread} |")
    if result.failures:
        lines += ["", "## failures", ""] + [f"- {t}: {m}" for t, m in result.failures]
    return "\n".join(lines) + "\n"


def _plot(result: EvaluationResult, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    s = result.settings
    metric = next((m for m in ("harddice", "softdice") if m in s["metrics"]), s["metrics"][0])
    groups = _grouped(result.rows, metric)
    kinds = s["kinds"] or ["(none)"]
    fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 4), squeeze=False, sharey=True)
    rot = np.asarray(s["rotations"], dtype=float)
    for ax, kind in zip(axes[0], kinds):
        for align in ["none", *s["aligns"]]:
            stats = [_stats(groups.get((kind, align, r), [])) for r in rot]
            mean = np.array([m for m, _, _ in stats])
            std = np.array([d for _, d, _ in stats])
            ax.errorbar(rot, mean, yerr=std, marker="o", capsize=3, label=align,
                        linestyle="--" if align == "none" else "-")
        ax.set_title(kind.replace("_", " "))
        ax.set_xlabel("rotation (degrees)")
        ax.set_xticks(rot)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"{metric} (mean ± std over pairs)")
    axes[0][-1].legend(loc="best", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path


def write_outputs(result: EvaluationResult, save_dir: str | Path) -> dict[str, Path]:
    """Write ``evaluation.csv``, ``summary.md`` and ``dice_vs_rotation.png`` (atomically)."""
    save_dir = Path(save_dir)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for r in result.rows:
        writer.writerow([_fmt(r[c]) for c in CSV_COLUMNS])
    paths = {"csv": atomic_write_text(save_dir / "evaluation.csv", buf.getvalue()),
             "summary": atomic_write_text(save_dir / "summary.md", format_evaluation_summary(result))}
    paths["plot"] = _plot(result, save_dir / "dice_vs_rotation.png")
    return paths
