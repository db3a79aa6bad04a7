"""Keypoints of one image at any orientation: test-time orientation search for anatomical models.

An anatomical model (``ModelConfig.regions``) knows where its keypoints lie in a reference frame
(``RegionAtlas.template``).  Detection runs in two steps, all in world mm:

1. **first looks** (the search): the network sees the image on grids turned by the 24 rotations of
   the cube group (one batch); a trimmed similarity fit of the template onto each look's keypoints
   gives a pose.  Up to three *hypotheses* are kept: the best-fitting look and distinct poses whose
   looks fit almost as well.
2. **canonical pass**: the image is resampled onto a grid that follows a hypothesis's pose (the
   template's orientation, centred on the head), where the network was trained to be accurate; its
   keypoints, mapped back through the grid's affine, are the result (the pass is repeated once when
   it moves the pose by more than ``REFINE_DEGREES``).  With several hypotheses, each also gets a
   *check pass* on its grid turned by 40°, and the one whose keypoints drift least is kept: a network
   that reads a wrongly turned head as upright draws its keypoint layout in the grid's frame, so its
   keypoints turn with the grid (the demo's MNI T1: 2.6 mm drift for the right pose, 7.9 mm for a
   half-turned one).
3. **ensembles**: with ``ModelConfig.check_view_ensemble``, the chosen canonical reading is averaged
   with the reading of its check pass (the grid turned by 40°) when the two agree (drift <=
   ``ACCEPT_DRIFT_MM``); that check pass is always read (its drift is reported), so this costs no pass.  With
   ``ModelConfig.shift_ensemble_voxels`` the chosen canonical grid is also read moved by a fraction
   of a heatmap cell in four directions (:func:`shifted_grids`), and all readings are averaged.

``search="always"`` always runs both steps on all 24 looks (25-33 passes).  ``"auto"`` (the default
of the bundled model) first reads the image as it is (the canonical pass from the RAS grid's
reading): when those keypoints fit the template (median residual <= ``SEARCH_RESIDUAL_MM``) and drift
by at most ``ACCEPT_DRIFT_MM`` under the check pass, they are the result (3-4 passes).  Otherwise the
search runs in stages (:func:`search_stages`): the 9 half turns first, since a failed upright reading
says the head is turned far; the best pose of a stage that passes the same checks ends the search
(about 15 passes); the last stage compares every hypothesis as ``"always"`` does.  The shift ensemble
adds 4 passes to each mode.  The chosen reading's check pass is always read (one pass more only
where the search had not read it: a single hypothesis of the last stage or of ``"always"``); its drift is reported
(``DetectedKeypoints.drift_mm``): above ``ACCEPT_DRIFT_MM``, no reading passed the checks, and the
pipeline flags the pair (:mod:`keyreg.qc`).

Unnamed models (official checkpoints, K-keypoint models) are run as before: one pass.

Frames: ``world_from_net`` maps network voxel indices ``(i, j, k)`` to world RAS mm of the image.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from itertools import permutations, product
from typing import Any, NamedTuple

import numpy as np
import torch

from ..geometry import apply_affine, normalized_to_voxel, rotation_about
from ..io import Volume
from ..preprocess import network_grid_affine, network_source, outside_level, sample_network_input
from .detector import KeypointDetector

__all__ = ["DetectedKeypoints", "detect_image_keypoints", "detect_images_keypoints", "fit_similarity", "template_residuals",
           "cube_rotations", "half_turns", "search_stages", "shifted_grids", "SEARCH_RESIDUAL_MM"]

#: median template residual (mm) above which the canonical pass is not trusted and the search runs
SEARCH_RESIDUAL_MM = 7.0
#: a canonical pass that moves the pose estimate by more than this is repeated once from the new pose
REFINE_DEGREES = 10.0
#: first looks that fit the template within this margin (mm) of the best one are pose hypotheses too
HYPOTHESIS_MARGIN_MM = 3.0
#: first looks whose poses differ by less than this (degrees) are one hypothesis
DISTINCT_DEGREES = 30.0
#: turn of the grid (degrees) that tells hypotheses apart (:func:`_drift`)
CHECK_TILT_DEGREES = 40.0
#: ``auto``: the upright reading is kept when its keypoints drift by at most this (mm) under that turn
ACCEPT_DRIFT_MM = 5.0


@dataclass
class DetectedKeypoints:
    """Keypoints of one image.

    Attributes:
        points: ``(K, 3)`` float64 world RAS mm.
        mass: ``(K,)`` total heatmap activation.
        world_from_net: ``(4, 4)`` affine of the network grid the points were read on.
        template_residual_mm: ``(K,)`` distance of each keypoint to the fitted template (anatomical
            models), or ``None``.
        passes: network passes used.
        searched: whether the orientation search ran.
        drift_mm: median distance (mm) the chosen reading's keypoints moved under its check pass (the
            grid turned by ``CHECK_TILT_DEGREES``), or ``None`` (one pass, no search): above
            ``ACCEPT_DRIFT_MM``, no reading passed the search's checks.
    """

    points: torch.Tensor
    mass: torch.Tensor
    world_from_net: np.ndarray
    template_residual_mm: np.ndarray | None = None
    passes: int = 1
    searched: bool = False
    info: dict = field(default_factory=dict)
    drift_mm: float | None = None


def cube_rotations() -> np.ndarray:
    """The 24 proper rotations of the cube, ``(24, 3, 3)`` (signed permutation matrices, det +1)."""
    out = []
    for perm in permutations(range(3)):
        for signs in product((1, -1), repeat=3):
            m = np.zeros((3, 3))
            for r, (c, s) in enumerate(zip(perm, signs)):
                m[r, c] = s
            if np.linalg.det(m) > 0:
                out.append(m)
    return np.stack(out)


#: sign patterns of a regular tetrahedron's corners: the diagonals of :func:`half_turns`, the
#: directions of :func:`shifted_grids`
_TETRAHEDRON_SIGNS = np.array([(1, 1, 1), (1, -1, -1), (-1, 1, -1), (-1, -1, 1)], dtype=np.float64)


def half_turns() -> np.ndarray:
    """The identity and the half turns about the three axes, ``(4, 3, 3)`` (the Klein four-group)."""
    return np.stack([np.diag(d) for d in _TETRAHEDRON_SIGNS])


def shifted_grids(grid: np.ndarray, voxels: float) -> list[np.ndarray]:
    """``grid`` (``world_from_net``, ``(4, 4)``) moved by ``voxels`` network voxels along each axis, with
    the signs of a regular tetrahedron's corners, ``(+,+,+), (+,-,-), (-,+,-), (-,-,+)``; none when
    ``voxels`` is 0.  The shift ensemble reads the image on these grids too and averages the
    keypoints: the network's readings vary with where the head falls within a heatmap cell (16 mm
    for the bundled model, whose shift is a quarter of a cell), and the average is more accurate
    than one reading (``docs/models.md``)."""
    if not voxels:
        return []
    out = []
    for signs in _TETRAHEDRON_SIGNS:
        g = grid.copy()
        g[:3, 3] += grid[:3, :3] @ (voxels * signs)
        out.append(g)
    return out


def fit_similarity(src: np.ndarray, dst: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Weighted least-squares similarity ``dst ~ s R src + t`` (Umeyama), ``(4, 4)``."""
    w = np.ones(len(src)) if weights is None else np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    cs, cd = w @ src, w @ dst
    x, y = src - cs, dst - cd
    cov = (y * w[:, None]).T @ x
    u, sv, vt = np.linalg.svd(cov)
    d = np.sign(np.linalg.det(u @ vt)) or 1.0
    fix = np.diag([1.0, 1.0, d])
    rot = u @ fix @ vt
    var = (w * (x ** 2).sum(1)).sum()
    scale = float((sv * np.diag(fix)).sum() / max(var, 1e-12))
    out = np.eye(4)
    out[:3, :3] = scale * rot
    out[:3, 3] = cd - scale * rot @ cs
    return out


def _trimmed_similarity(template: np.ndarray, points: np.ndarray, keep: float = 0.6, iterations: int = 4
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Similarity ``world_from_template`` fitted to the best ``keep`` share of the points, and the
    residual of every point (mm)."""
    ok = np.isfinite(points).all(1)
    sel = ok.copy()
    mat = fit_similarity(template[sel], points[sel])
    for _ in range(iterations):
        res = np.linalg.norm(template @ mat[:3, :3].T + mat[:3, 3] - points, axis=1)
        res[~ok] = np.inf
        cut = np.quantile(res[ok], keep)
        sel = ok & (res <= cut)
        mat = fit_similarity(template[sel], points[sel])
    res = np.linalg.norm(template @ mat[:3, :3].T + mat[:3, 3] - points, axis=1)
    return mat, res


def template_residuals(template: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Distance (mm) of each keypoint ``(K, 3)`` to the region template ``(K, 3)`` after the trimmed
    similarity fit of the search: ``(K,)``; a layout read from a whole head fits within a few mm."""
    return _trimmed_similarity(np.asarray(template, dtype=np.float64), np.asarray(points, dtype=np.float64))[1]


def _angle(a: np.ndarray, b: np.ndarray) -> float:
    """Angle (degrees) of the rotation taking ``a`` to ``b``."""
    return float(np.degrees(np.arccos(np.clip((np.trace(a.T @ b) - 1) / 2, -1, 1))))


def _rotation_part(mat: np.ndarray) -> np.ndarray:
    u, _, vt = np.linalg.svd(mat[:3, :3])
    r = u @ vt
    if np.linalg.det(r) < 0:
        u[:, -1] *= -1
        r = u @ vt
    return r


def _hypotheses(looks: list[np.ndarray], template: np.ndarray, max_count: int = 3, indices: bool = False
                ) -> list[Any]:
    """First looks that start a canonical pass: the best-fitting look (trimmed template residual),
    and up to ``max_count - 1`` others within ``HYPOTHESIS_MARGIN_MM`` of it whose poses differ by more
    than ``DISTINCT_DEGREES`` from every one already kept (best first); their indices in ``looks``
    with ``indices=True``."""
    fits = [_trimmed_similarity(template, p) for p in looks]
    scores = np.array([np.median(res) for _, res in fits])
    kept: list[int] = []
    for i in np.argsort(scores):
        if scores[i] > scores.min() + HYPOTHESIS_MARGIN_MM or len(kept) == max_count:
            break
        rot = _rotation_part(fits[i][0])
        if all(_angle(rot, _rotation_part(fits[j][0])) > DISTINCT_DEGREES for j in kept):
            kept.append(int(i))
    return kept if indices else [looks[i] for i in kept]


def search_stages() -> list[list[int]]:
    """Indices of :func:`cube_rotations` in the order ``auto`` looks at them once the image as it is
    failed its checks: the 9 half turns, then the 8 turns by 120°, then the 6 quarter turns and the
    identity.  A failed upright reading says the head is turned far (a network reads heads turned by
    up to about 90° well), so the half turns come first; each stage ends the search when its best
    pose passes the checks of the upright reading."""
    angles = np.array([_angle(np.eye(3), r) for r in cube_rotations()])
    return [[int(i) for i in np.flatnonzero(np.isclose(angles, a))] for a in (180.0, 120.0)] + \
        [[int(i) for i in np.flatnonzero(angles < 100.0)]]


class _Check(NamedTuple):
    """The check pass of a canonical pass (:func:`_drift_steps`): the median distance (mm) its
    keypoints moved, and its reading (world keypoints ``(K, 3)``, masses ``(K,)``)."""

    drift_mm: float
    points: np.ndarray
    mass: np.ndarray

    @property
    def agrees(self) -> bool:
        """The keypoints stayed put (drift <= ``ACCEPT_DRIFT_MM``): the canonical reading follows the anatomy."""
        return self.drift_mm <= ACCEPT_DRIFT_MM


def _accepted(cand: tuple, check: _Check) -> bool:
    """``auto``'s checks of a canonical pass: its keypoints fit the template (median residual <=
    ``SEARCH_RESIDUAL_MM``) and its check pass agrees (:attr:`_Check.agrees`)."""
    return check.agrees and float(np.median(cand[3])) <= SEARCH_RESIDUAL_MM


#: a detection step: yields the grids it needs the network's reading of, receives their
#: ``(points, mass)`` and finally returns its result (:func:`_drive` runs one, :func:`detect_images_keypoints`
#: runs several in lockstep, their requests batched)
Steps = Generator[list[np.ndarray], list[tuple[np.ndarray, np.ndarray]], Any]


def _drive(steps: Steps, run: Callable[[list[np.ndarray]], list[tuple[np.ndarray, np.ndarray]]]) -> Any:
    """Run ``steps`` to its end, answering each request with ``run(grids)``; its return value."""
    try:
        grids = next(steps)
        while True:
            grids = steps.send(run(grids))
    except StopIteration as stop:
        return stop.value


def _drift_steps(runner: "_Runner", grid: np.ndarray, points: np.ndarray) -> Steps:
    """Median distance (mm) the keypoints move when the grid of a canonical pass is turned by
    ``CHECK_TILT_DEGREES`` about a fixed oblique axis through its centre.  Keypoints that follow the
    anatomy stay put; a network that reads a wrongly turned head as upright draws its layout in the
    grid's frame, and the keypoints turn with the grid."""
    vs = np.asarray(runner.model.config.preprocessing.grid.voxel_size, dtype=np.float64)
    rot = grid[:3, :3] / vs
    center = grid[:3, :3] @ ((np.asarray(runner.shape) - 1) / 2) + grid[:3, 3]
    axis = np.array([1.0, 1.0, 0.3]) / np.linalg.norm([1.0, 1.0, 0.3])
    tilted = runner.grid(rot @ rotation_about(axis, CHECK_TILT_DEGREES)[:3, :3], center)
    moved, mass = (yield [tilted])[0]
    return _Check(float(np.median(np.linalg.norm(moved - points, axis=1))), moved, mass)


def _drift(runner: "_Runner", grid: np.ndarray, points: np.ndarray) -> float:
    """The drift (mm) of :func:`_drift_steps`, run on its own."""
    return _drive(_drift_steps(runner, grid, points), runner.run).drift_mm


class _Runner:
    """Reads one image on network grids (its normalised, anti-aliased copy is made once)."""

    def __init__(self, model: KeypointDetector, volume: Volume, device: torch.device, use_amp: bool) -> None:
        self.model, self.volume, self.device, self.use_amp = model, volume, device, use_amp
        pre = model.config.preprocessing
        self.shape = pre.grid.shape
        self.base = network_grid_affine(volume.affine, volume.shape, pre.grid)
        self.source, self.source_affine = network_source(volume, pre, self.base, device)
        self.outside = outside_level(volume, pre)
        self.passes = 0

    def grid(self, rotation: np.ndarray, center: np.ndarray) -> np.ndarray:
        """``world_from_net`` of a grid with the model's voxel size whose axes are ``rotation``'s
        columns, centred on ``center`` (world mm)."""
        vs = np.asarray(self.model.config.preprocessing.grid.voxel_size, dtype=np.float64)
        n = np.asarray(self.shape, dtype=np.float64)
        out = np.eye(4)
        out[:3, :3] = rotation @ np.diag(vs)
        out[:3, 3] = center - out[:3, :3] @ ((n - 1) / 2)
        return out

    def input(self, grid: np.ndarray) -> torch.Tensor:
        """The network input on ``grid``, ``(1, 1, *shape)``."""
        return sample_network_input(self.source, self.source_affine, grid, self.shape, self.outside)

    def world(self, u: torch.Tensor, mass: torch.Tensor, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """World keypoints ``(K, 3)`` and masses ``(K,)`` of one reading ``u`` (normalised, ``(K, 3)``) on ``grid``."""
        self.passes += 1
        idx = normalized_to_voxel(u.double(), self.shape)
        world = apply_affine(torch.as_tensor(grid, device=idx.device), idx)
        return world.cpu().numpy(), mass.float().cpu().numpy()

    def run(self, grids: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """World keypoints ``(K, 3)`` and masses ``(K,)`` on each grid."""
        return _read([(self, g) for g in grids])


def _read(jobs: list[tuple[_Runner, np.ndarray]], batch: int = 8) -> list[tuple[np.ndarray, np.ndarray]]:
    """The network's readings of ``(runner, grid)`` jobs (of one or several images), ``batch`` at a time."""
    out = []
    for start in range(0, len(jobs), batch):
        chunk = jobs[start:start + batch]
        model, use_amp = chunk[0][0].model, chunk[0][0].use_amp
        u, mass = model.infer(torch.cat([r.input(g) for r, g in chunk]), use_amp=use_amp)
        out += [r.world(u[b], mass[b], g) for b, (r, g) in enumerate(chunk)]
    return out


def detect_image_keypoints(
    model: KeypointDetector,
    volume: Volume,
    *,
    device: torch.device | str | None = None,
    use_amp: bool = False,
    search: bool | str | None = None,
) -> DetectedKeypoints:
    """Keypoints of one image in world mm (see the module docstring and :func:`detect_images_keypoints`)."""
    return detect_images_keypoints(model, [volume], device=device, use_amp=use_amp, search=search)[0]


def detect_images_keypoints(
    model: KeypointDetector,
    volumes: Sequence[Volume],
    *,
    device: torch.device | str | None = None,
    use_amp: bool = False,
    search: bool | str | None = None,
) -> list[DetectedKeypoints]:
    """Keypoints of several images in world mm (see the module docstring), detected in lockstep:
    each round, every image's next network readings go through the network in one batch (a batch of
    two costs what one image costs on a 2-core CPU).  An image's result does not depend on the
    others (:meth:`KeypointDetector.infer`).

    Args:
        model: the detector (evaluation mode).
        volumes: the images.
        device: where the network runs (default: the model's device).
        use_amp: bf16 autocast on CUDA.
        search: ``"always"`` (the 24 cube rotations are looked at first), ``True``/``"auto"`` (the
            image as it is first: kept when its canonical keypoints fit the template and pass the
            drift check, else the search of ``"always"``), ``False`` (one pass, no canonicalisation);
            ``None`` follows the model config.
    """
    device = torch.device(device) if device is not None else model.device
    use_search = model.config.orientation_search if search is None else search
    runners = [_Runner(model, v, device, use_amp) for v in volumes]
    steps = {i: _detection_steps(r, use_search) for i, r in enumerate(runners)}
    results: list[Any] = [None] * len(runners)
    requests: dict[int, list[np.ndarray]] = {}
    for i, st in list(steps.items()):
        try:
            requests[i] = next(st)
        except StopIteration as stop:
            results[i] = stop.value
    while requests:
        jobs = [(i, g) for i, grids in requests.items() for g in grids]
        readings = _read([(runners[i], g) for i, g in jobs])
        answers: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
        for (i, _), reading in zip(jobs, readings):
            answers.setdefault(i, []).append(reading)
        for i in list(requests):
            try:
                requests[i] = steps[i].send(answers[i])
            except StopIteration as stop:
                results[i] = stop.value
                del requests[i]
    return results


def _detection_steps(runner: _Runner, use_search: bool | str | None) -> Steps:
    """The detection of one image as :data:`Steps` (the module docstring's procedure)."""
    atlas = runner.model.config.regions
    if use_search is True:
        use_search = "auto"
    if atlas is None or not use_search:
        pts, mass = (yield [runner.base])[0]
        res = None if atlas is None else template_residuals(atlas.template, pts)
        return DetectedKeypoints(torch.from_numpy(pts), torch.from_numpy(mass), runner.base, res)
    template = atlas.template
    center_t = template.mean(0)

    def canonical(first_points: np.ndarray) -> Steps:
        """Canonical pass from a pose estimate; repeated once when it moved the pose by > 10 degrees."""
        pose, _ = _trimmed_similarity(template, first_points)
        for attempt in range(2):
            grid = runner.grid(_rotation_part(pose), pose[:3, :3] @ center_t + pose[:3, 3])
            pts, mass = (yield [grid])[0]
            new_pose, res = _trimmed_similarity(template, pts)
            if attempt or _angle(_rotation_part(pose), _rotation_part(new_pose)) <= REFINE_DEGREES:
                break
            pose = new_pose
        return pts, mass, grid, res

    def result(cand, searched: bool, info: dict, check: _Check | None = None) -> Steps:
        """The detection from the chosen canonical pass, averaged with the readings of the model's
        ensembles: its check pass's when it agrees, its shifted grids'."""
        pts, mass, grid, res = cand
        config = runner.model.config
        readings = [(pts, mass)]
        if check is None:  # one pass more, where no check pass was read (a single hypothesis of "always")
            check = yield from _drift_steps(runner, grid, pts)
        if config.check_view_ensemble and check.agrees:
            readings.append((check.points, check.mass))
        shifted = shifted_grids(grid, config.shift_ensemble_voxels)
        if shifted:
            readings += yield shifted
        if len(readings) > 1:
            pts, mass = np.mean([p for p, _ in readings], 0), np.mean([m for _, m in readings], 0)
            res = _trimmed_similarity(template, pts)[1]
        info["readings"] = len(readings)
        info["median_template_residual_mm"] = float(np.median(res))
        return DetectedKeypoints(torch.from_numpy(pts), torch.from_numpy(mass), grid, res, runner.passes, searched,
                                 info, check.drift_mm)

    if use_search == "auto":  # upright first, kept when its keypoints fit the template and do not drift
        cand = yield from canonical((yield [runner.base])[0][0])
        check = yield from _drift_steps(runner, cand[2], cand[0])
        if _accepted(cand, check):
            return (yield from result(cand, False, {"hypotheses": 1, "hypothesis_drift_mm": [round(check.drift_mm, 2)]},
                                      check))
        stages = search_stages()
    else:
        stages = [list(range(len(cube_rotations())))]
    # the search: first looks on the cube rotations, stage by stage; distinct good poses are hypotheses
    center = runner.base[:3, :3] @ ((np.asarray(runner.shape) - 1) / 2) + runner.base[:3, 3]
    rotations = cube_rotations()
    looks: dict[int, np.ndarray] = {}
    tried: dict[int, tuple] = {}  # look index -> (canonical candidate, its _Check or None)
    for n, stage in enumerate(stages):
        readings = yield [runner.grid(rotations[i], center) for i in stage]
        looks.update((i, pts) for i, (pts, _) in zip(stage, readings))
        order = list(looks)
        kept = _hypotheses([looks[i] for i in order], template, indices=True)
        if n < len(stages) - 1:  # an early stage ends the search when its best pose passes auto's checks
            best = order[kept[0]]
            if best not in tried:
                cand = yield from canonical(looks[best])
                tried[best] = (cand, (yield from _drift_steps(runner, cand[2], cand[0])))
            if _accepted(*tried[best]):
                cand, check = tried[best]
                return (yield from result(cand, True, {"hypotheses": 1, "looks": len(looks),
                                                       "hypothesis_drift_mm": [round(check.drift_mm, 2)]}, check))
            continue
        for k in kept:
            if order[k] not in tried:
                tried[order[k]] = ((yield from canonical(looks[order[k]])), None)
        cands = [tried[order[k]][0] for k in kept]
        info: dict = {"hypotheses": len(cands), "looks": len(looks)}
        checks = [tried[order[k]][1] for k in kept]
        best = 0
        if len(cands) > 1:  # the pose whose keypoints stay put when the grid turns is the anatomy's
            for n, (pts, _, grid, _) in enumerate(cands):
                if checks[n] is None:
                    checks[n] = yield from _drift_steps(runner, grid, pts)
            best = int(np.argmin([c.drift_mm for c in checks]))
            info["hypothesis_drift_mm"] = [round(c.drift_mm, 2) for c in checks]
        return (yield from result(cands[best], True, info, checks[best]))
