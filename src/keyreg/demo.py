"""``keyreg demo``: a real registration with no user data.

The fixed image is the MNI152 (2009a, symmetric) T1 template that ``nilearn`` ships inside its
package, with tissue labels (CSF 24, cortex/GM 3, WM 2 — FreeSurfer ids) from its tissue
probability maps. The moving image is built from it with a *known* transform and a contrast change:

* a T2-like contrast (CSF bright, WM dark) from the tissue probabilities, a smooth bias field and noise;
* a 130° rotation about an oblique axis (the default model's orientation search finds any
  orientation; see docs/models.md), a translation and a smooth nonlinear deformation;
* resampled once onto an oblique, anisotropic, non-cubic LPS grid (1.3 x 1.2 x 1.8 mm).

The bundled model then registers moving -> fixed and the tissue Dice is reported before
registration and after each transform type.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from .errors import ConfigError
from .geometry import fov_center, rotation_about
from .io import Volume, load_volume, save_volume
from .transforms import DisplacementField
from .warp import warp_image, warp_labels

__all__ = ["DemoResult", "demo_data", "make_moving", "run_demo", "rotation_angle", "rotation_error"]

TISSUES = {24: "CSF", 3: "grey matter", 2: "white matter"}
TRUE_ROTATION_DEG = 130.0
TRUE_AXIS = (1.0, 0.5, -0.3)
TRUE_TRANSLATION_MM = (12.0, -9.0, 7.0)


def _nilearn_data() -> Path:
    try:
        import nilearn
    except ImportError as e:
        raise ConfigError("keyreg demo needs the nilearn package (it holds the MNI152 template): "
                          "pip install 'keyreg[demo]'") from e
    return Path(nilearn.__file__).parent / "datasets" / "data"


def demo_data(step: int = 1) -> tuple[Volume, Volume, dict[str, np.ndarray]]:
    """The MNI152 T1 template, its tissue label map, and the tissue probabilities (on its grid).

    ``step > 1`` keeps every ``step``-th voxel (a coarser grid, for tests)."""
    d = _nilearn_data()
    stem = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
    t1 = load_volume(d / stem.format("t1"), kind="image")
    if step > 1:
        scale = np.diag([step, step, step, 1.0])
        t1 = Volume(np.ascontiguousarray(t1.data[::step, ::step, ::step]), t1.affine @ scale, None, t1.name)
    prob = {k: np.asarray(nib.load(d / stem.format(k)).dataobj, dtype=np.float32)[::step, ::step, ::step] / 255.0
            for k in ("gm", "wm")}
    brain = t1.data > 0
    prob["csf"] = np.clip(brain.astype(np.float32) - prob["gm"] - prob["wm"], 0, 1)
    stack = np.stack([prob["csf"], prob["gm"], prob["wm"]])
    labels = np.array([24, 3, 2])[stack.argmax(0)]
    labels[~brain] = 0
    t1 = Volume(t1.data, t1.affine, t1.header, "mni152_t1", "image")
    seg = Volume(labels.astype(np.int64), t1.affine, t1.header, "mni152_tissues", "labels")
    return t1, seg, prob


def rotation_angle(matrix: np.ndarray) -> float:
    """Rotation angle (degrees) of the closest rotation to a 3x3 (or 4x4) linear part (polar decomposition)."""
    u, _, vt = np.linalg.svd(np.asarray(matrix)[:3, :3])
    r = u @ vt
    return math.degrees(math.acos(np.clip((np.trace(r) - 1) / 2, -1, 1)))


def rotation_error(matrix: np.ndarray) -> float:
    """Angle (degrees) between the rotation of a fitted ``moving_from_fixed`` matrix and the demo's true
    rotation (``moving_from_fixed`` is ``R`` about the centre, plus translation and deformation)."""
    u, _, vt = np.linalg.svd(np.asarray(matrix)[:3, :3])
    return rotation_angle((u @ vt) @ rotation_about(TRUE_AXIS, TRUE_ROTATION_DEG).T)


def make_moving(fixed: Volume, seg: Volume, prob: dict[str, np.ndarray], *, seed: int = 0, step: int = 1
                ) -> tuple[Volume, Volume, DisplacementField]:
    """The moving T2-like image and its labels: fixed anatomy pulled through the known map
    ``psi(y) = R^T (y - c - t) + c + u(y)`` (moving world -> fixed world), resampled once.

    Returns:
        ``(moving, moving_labels, psi)``; ``psi`` is a displacement field on the moving grid
        (``psi.map_points(y)`` gives the fixed-world point shown at moving-world ``y``).
    ``step > 1`` makes the moving grid ``step`` times coarser (for tests)."""
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    # T2-like contrast with partial voluming, bias field and noise, on the fixed grid
    t2 = 0.92 * prob["csf"] + 0.55 * prob["gm"] + 0.28 * prob["wm"]
    coarse = torch.randn((1, 1, 4, 4, 4), generator=g) * 0.15
    bias = torch.nn.functional.interpolate(coarse, size=fixed.shape, mode="trilinear", align_corners=True)
    t2 = t2 * np.exp(bias[0, 0].numpy()) + rng.normal(0, 0.02, t2.shape).astype(np.float32) * (t2 > 0)
    t2 = np.clip(t2, 0, None).astype(np.float32)
    # moving grid: oblique, anisotropic, non-cubic, LPS voxel axes, centred on the moved brain
    c = fov_center(fixed.affine, fixed.shape)
    rot = rotation_about(TRUE_AXIS, TRUE_ROTATION_DEG)
    shape = tuple(int(math.ceil(n / step)) for n in (150, 170, 110))
    spacing = np.array([1.3, 1.2, 1.8]) * step
    lin = rotation_about((0.2, 1.0, 0.4), 12.0) @ np.diag([-1.0, -1.0, 1.0]) @ np.diag(spacing)
    m_aff = np.eye(4)
    m_aff[:3, :3] = lin
    m_aff[:3, 3] = c + np.asarray(TRUE_TRANSLATION_MM) - lin @ ((np.asarray(shape) - 1) / 2)
    # psi on the moving grid as a displacement field (world mm)
    idx = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), -1)
    y = idx @ lin.T + m_aff[:3, 3]
    x = (y - c - np.asarray(TRUE_TRANSLATION_MM)) @ rot + c
    smooth = torch.randn((1, 3, 6, 6, 5), generator=g, dtype=torch.float64) * 2.0
    u = torch.nn.functional.interpolate(smooth, size=shape, mode="trilinear", align_corners=True)[0]
    disp = torch.from_numpy(np.moveaxis(x - y, -1, 0)) + u
    psi = DisplacementField(disp[None], m_aff)
    img = warp_image(torch.from_numpy(t2)[None, None], fixed.affine, shape, m_aff, psi)[0, 0].numpy()
    lab = warp_labels(torch.from_numpy(seg.data)[None], fixed.affine, shape, m_aff, psi)[0].numpy()
    header = nib.Nifti1Header()
    header.set_xyzt_units("mm")
    moving = Volume(img.astype(np.float32), m_aff, header, "demo_t2_moved", "image")
    return moving, Volume(lab.astype(np.int64), m_aff, header, "demo_t2_moved_tissues", "labels"), psi


@dataclass
class DemoResult:
    """Dice per tissue (label id -> value) before registration and per align, and where outputs are."""

    before: dict[int, float]
    after: dict[str, dict[int, float]]
    rotation_error: dict[str, float]
    seconds: dict[str, float]
    output_dir: Path
    files: dict[str, Path]


def run_demo(output_dir: str | Path = "keyreg_demo_output", *, model=None, device=None,
             aligns: tuple[str, ...] = ("affine", "tps_1"), seed: int = 0) -> DemoResult:
    """Build the demo pair, register it with ``model`` (default: the bundled default), write
    everything under ``output_dir`` and return the Dice table."""
    from .api import register
    from .metrics import dice_per_label

    out = Path(output_dir)
    t0 = time.perf_counter()
    fixed, fixed_seg, prob = demo_data()
    moving, moving_seg, _ = make_moving(fixed, fixed_seg, prob, seed=seed)
    t_data = time.perf_counter() - t0
    files = {}
    for vol, name in ((fixed, "fixed_t1"), (fixed_seg, "fixed_tissues"), (moving, "moving_t2"),
                      (moving_seg, "moving_tissues")):
        files[name] = Path(save_volume(vol.data, vol, out / f"{name}.nii.gz"))
    before_seg = warp_labels(torch.from_numpy(moving_seg.data)[None], moving.affine, fixed.shape,
                             fixed.affine, None)[0].numpy()
    before = dice_per_label(before_seg, fixed_seg.data)
    t1 = time.perf_counter()
    reg = register(moving, fixed, model=model, aligns=aligns, moving_seg=moving_seg, fixed_seg=fixed_seg,
                   device=device)
    t_reg = time.perf_counter() - t1
    reg.evaluate(["harddice"])
    after = {res.name: res.metrics["harddice_per_label"] for res in reg}
    angles = {res.name: rotation_error(res.matrix) for res in reg if res.matrix is not None}
    t2 = time.perf_counter()
    files.update(reg.save(out / "registration", visualize=True))
    seconds = {"build_pair": t_data, "register": t_reg, "write": time.perf_counter() - t2, **reg.timings}
    return DemoResult(before, after, angles, seconds, out, files)
