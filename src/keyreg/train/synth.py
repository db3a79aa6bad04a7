"""Synthetic training images from label maps (SynthSeg / SynthMorph style), in torch.

Everything runs on the label maps' device (the GPU when present) and is driven by an explicit
``torch.Generator``, so a seed reproduces a batch exactly.

Pipeline for one image::

    label map --(random affine + smooth deformation, one nearest-neighbour resampling)--> warped labels
              --(random intensity per label, noise, blur, bias field, gamma, resolution loss)--> image

Frames: label maps and outputs are ``(B, 1, I, J, K)`` tensors on grids given by world-from-voxel
affines (RAS mm). Spatial transforms are ``moving_from_fixed`` maps (output-grid world -> source
world), the library's convention.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..geometry import apply_affine, rotation_matrix

__all__ = [
    "TISSUE_CLASSES",
    "IntensityAugment",
    "SpatialAugment",
    "random_rotation",
    "random_affine",
    "random_smooth_field",
    "warp_labels_on_grid",
    "random_means",
    "mixed_means",
    "synthesize_image",
    "extracerebral_mask",
    "cut_field_of_view",
]

#: FreeSurfer ids of coarse tissue classes, used for the named ``t1`` / ``t2`` contrasts.
TISSUE_CLASSES: dict[str, tuple[int, ...]] = {
    "wm": (2, 41, 7, 46, 16, 28, 60, 85, 251, 252, 253, 254, 255),
    "gm": (3, 42, 8, 47, 10, 49, 11, 50, 12, 51, 13, 52, 17, 53, 18, 54, 26, 58, 62, 30),
    "csf": (4, 43, 5, 44, 14, 15, 24, 72, 31, 63),
}
#: mean intensity of each tissue class in the named contrasts (others: random).
NAMED_CONTRASTS: dict[str, dict[str, float]] = {
    "t1": {"wm": 0.80, "gm": 0.50, "csf": 0.12},
    "t2": {"wm": 0.30, "gm": 0.50, "csf": 0.92},
    "pd": {"wm": 0.55, "gm": 0.68, "csf": 0.80},
    "flair": {"wm": 0.50, "gm": 0.68, "csf": 0.05},
}
#: how often each contrast is drawn by :func:`mixed_means` (the rest: random intensity per label)
CONTRAST_MIX: dict[str, float] = {"t1": 0.125, "t2": 0.125, "pd": 0.125, "flair": 0.125}


def _uniform(shape, lo: float, hi: float, g: torch.Generator, device) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(shape, generator=g, device=device)


def extracerebral_mask(labels: torch.Tensor) -> torch.Tensor:
    """Voxels outside the brain: FreeSurfer extra-cerebral ids (>= 500) and the unknown 0."""
    return (labels >= 500) | (labels == 0)


@dataclass
class IntensityAugment:
    """Ranges of the random intensity model (all drawn per image).

    Attributes:
        std_range: per-label standard deviation of intensities.
        noise_std: maximum standard deviation of global Gaussian noise.
        blur_sigma: maximum Gaussian blur (voxels).
        bias_std: log-amplitude of the smooth multiplicative bias field (0 disables).
        gamma_std: standard deviation of log(gamma).
        resolution_prob: probability of simulating thick slices along a random axis.
        skull_strip_prob: probability of zeroing extra-cerebral labels (skull-stripped look).
        fov_cut_prob: probability that the field of view ends within the head
            (:func:`cut_field_of_view`; 0 disables and draws nothing, so seeds reproduce as before).
    """

    std_range: tuple[float, float] = (0.0, 0.06)
    noise_std: float = 0.03
    blur_sigma: float = 1.0
    bias_std: float = 0.3
    gamma_std: float = 0.25
    resolution_prob: float = 0.25
    skull_strip_prob: float = 0.5
    fov_cut_prob: float = 0.0


def random_means(batch: int, table_size: int, generator: torch.Generator, *, contrast: str | None = None,
                 device=None) -> torch.Tensor:
    """``(B, table_size)`` mean intensity per label id (index = id): random in [0, 1], or a named
    MRI contrast (tissue-class means, jittered; other ids random; background 0).

    Draw once and pass to :func:`synthesize_image` to give several label maps the same contrast.
    """
    means = torch.rand((batch, table_size), generator=generator, device=device)
    if contrast in NAMED_CONTRASTS:
        ids = torch.arange(table_size, device=device)
        for cls, value in NAMED_CONTRASTS[contrast].items():
            member = torch.isin(ids, torch.tensor(TISSUE_CLASSES[cls], device=device))
            jitter = 0.05 * torch.randn((batch, table_size), generator=generator, device=device)
            means = torch.where(member, value + jitter, means)
        means[:, 0] = 0
    elif contrast is not None and contrast != "random":
        raise ValueError(f"unknown contrast {contrast!r}: use random or one of {', '.join(NAMED_CONTRASTS)}")
    return means.clamp(0, 1)


def mixed_means(batch: int, table_size: int, generator: torch.Generator, *, device=None) -> torch.Tensor:
    """Like :func:`random_means`, with each image's contrast drawn from :data:`CONTRAST_MIX`
    (T1-, T2-, PD-, FLAIR-like) or, otherwise, random per label."""
    u = torch.rand((batch,), generator=generator, device=device).tolist()
    rows = []
    for b, ub in enumerate(u):
        contrast, acc = "random", 0.0
        for name, p in CONTRAST_MIX.items():
            acc += p
            if ub < acc:
                contrast = name
                break
        rows.append(random_means(1, table_size, generator, contrast=contrast, device=device))
    return torch.cat(rows)


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(1, 1, I, J, K)`` with ``sigma`` voxels on every axis."""
    if sigma < 0.3:
        return x
    radius = max(1, int(math.ceil(2.5 * sigma)))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = k.numel()
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
        x = F.conv3d(F.pad(x, pad, mode="replicate"), k.reshape(shape))
    return x


def synthesize_image(
    labels: torch.Tensor,
    generator: torch.Generator,
    *,
    contrast: str | None = None,
    augment: IntensityAugment | None = None,
    skull_strip: bool | None = None,
    means: torch.Tensor | None = None,
) -> torch.Tensor:
    """A random-contrast image from each label map of a batch.

    Args:
        labels: ``(B, 1, I, J, K)`` integer label ids (any ids).
        generator: source of randomness (on the labels' device).
        contrast: ``None``/``"random"`` (a random intensity per label), or ``t1``, ``t2``, ``pd``
            (tissue-class means of that MRI contrast, jittered; other labels random).
        augment: ranges of the random intensity model.
        skull_strip: zero extra-cerebral labels; ``None`` draws it with ``augment.skull_strip_prob``.
        means: ``(B, T)`` mean intensity per label id (``T > labels.max()``) from
            :func:`random_means`, to share one contrast between images; overrides ``contrast``.

    Returns:
        ``(B, 1, I, J, K)`` float32 in [0, 1].
    """
    aug = augment or IntensityAugment()
    dev = labels.device
    lab_all = labels.long()
    top = int(lab_all.max())
    if means is None:
        means = random_means(labels.shape[0], top + 1, generator, contrast=contrast, device=dev)
    if means.shape[1] <= top:
        raise ValueError(f"means table has {means.shape[1]} entries but labels go up to {top}")
    # every per-image scalar drawn at once: one device -> host transfer per batch
    draws = torch.cat([torch.rand((labels.shape[0], 6), generator=generator, device=dev),
                       torch.randn((labels.shape[0], 1), generator=generator, device=dev)], 1).tolist()
    out = []
    for b, (u_strip, u_res, u_axis, u_factor, u_blur, u_noise, n_gamma) in enumerate(draws):
        mu = means[b].to(dev)
        sd = _uniform(mu.shape, *aug.std_range, generator, dev)
        lab = lab_all[b : b + 1]  # (1, 1, I, J, K) ids index the tables directly
        img = mu[lab] + sd[lab] * torch.randn(lab.shape, generator=generator, device=dev)
        if u_strip < aug.skull_strip_prob if skull_strip is None else skull_strip:
            img = torch.where(extracerebral_mask(labels[b : b + 1]), torch.zeros_like(img), img)
        if u_res < aug.resolution_prob:
            axis = min(int(3 * u_axis), 2)
            factor = 2.0 + 2.0 * u_factor
            size = list(img.shape[2:])
            low = size.copy()
            low[axis] = max(2, int(round(size[axis] / factor)))
            img = F.interpolate(F.interpolate(img, size=low, mode="trilinear", align_corners=True),
                                size=size, mode="trilinear", align_corners=True)
        img = _gaussian_blur(img, aug.blur_sigma * u_blur)
        if aug.bias_std > 0:
            coarse = aug.bias_std * torch.randn((1, 1, 4, 4, 4), generator=generator, device=dev)
            img = img * torch.exp(F.interpolate(coarse, size=img.shape[2:], mode="trilinear", align_corners=True))
        img = img + aug.noise_std * u_noise * torch.randn(img.shape, generator=generator, device=dev)
        img = img.clamp_min(0)
        lo, hi = img.amin(), img.amax()
        img = (img - lo) / (hi - lo).clamp_min(1e-6)
        img = img.pow(math.exp(aug.gamma_std * n_gamma))
        if aug.fov_cut_prob > 0:
            img = cut_field_of_view(img, lab > 0, generator, aug.fov_cut_prob)
        out.append(img)
    return torch.cat(out).float()


def cut_field_of_view(image: torch.Tensor, head: torch.Tensor, generator: torch.Generator, prob: float
                      ) -> torch.Tensor:
    """With probability ``prob``, the image as a scan whose field of view ends within the head: 0
    (what a network grid reads outside an image) beyond one plane, or outside a slab between two.

    The planes' normal is a grid axis tilted by up to 39 degrees (scanners cut along the image axes,
    and the head lies roughly along the grid's axes); one plane removes 5-45 % of the head's extent
    along it from one side (70 %), a slab keeps 40-80 % of it (30 %).

    Args:
        image: ``(1, 1, I, J, K)`` image (isotropic grid).
        head: ``(1, 1, I, J, K)`` bools, the head (labels > 0).
        generator: source of randomness (always draws the same count of numbers).
        prob: probability of a cut.
    """
    dev = image.device
    u = torch.rand(8, generator=generator, device=dev).tolist()
    if u[0] >= prob or not bool(head.any()):
        return image
    axis = torch.zeros(3, dtype=torch.float64)
    axis[min(int(3 * u[1]), 2)] = 1.0 if u[2] < 0.5 else -1.0
    tilt = torch.tensor([u[3] - 0.5, u[4] - 0.5, u[5] - 0.5], dtype=torch.float64)
    normal = axis + 1.15 * tilt * (1 - axis.abs())  # off the axis by atan(0.575 sqrt 2) = 39 degrees at most
    normal = (normal / normal.norm()).to(device=dev, dtype=torch.float32)
    idx = [torch.arange(n, device=dev, dtype=torch.float32) for n in image.shape[2:]]
    depth = (idx[0][:, None, None] * normal[0] + idx[1][None, :, None] * normal[1]
             + idx[2][None, None, :] * normal[2])  # (I, J, K) along the normal
    inside = depth[head[0, 0]]
    lo, hi = float(inside.min()), float(inside.max())
    if u[6] < 0.7:  # one plane: the side of larger depth is cut away
        keep = depth <= hi - (0.05 + 0.40 * u[7]) * (hi - lo)
    else:  # a slab of 40-80 % of the extent, anywhere within it
        width = (0.4 + 0.4 * u[7]) * (hi - lo)
        start = lo + (u[6] - 0.7) / 0.3 * (hi - lo - width)
        keep = (depth >= start) & (depth <= start + width)
    return image * keep[None, None]


def contrast_image(labels: torch.Tensor, contrast: str, seed: int) -> np.ndarray:
    """A whole-head image of one label map in a named contrast (``t1``, ``t2``, ``pd``, ``flair``),
    seeded, without resolution loss: the images of the validation and calibration scripts.

    Args:
        labels: ``(I, J, K)`` integer label ids.

    Returns:
        ``(I, J, K)`` float32 image.
    """
    g = torch.Generator().manual_seed(seed)
    means = random_means(1, 1024, g, contrast=contrast)
    img = synthesize_image(labels[None, None].long(), g, augment=IntensityAugment(resolution_prob=0.0),
                           skull_strip=False, means=means)
    return img[0, 0].numpy()


def random_rotation(batch: int, generator: torch.Generator, *, max_degrees: float = 180.0,
                    device=None, dtype=torch.float64) -> torch.Tensor:
    """``(B, 3, 3)`` rotations about uniformly random axes by angles uniform in ``[0, max_degrees]``.

    With ``max_degrees=180`` every orientation can occur (the whole sphere).
    """
    axis = torch.randn((batch, 3), generator=generator, device=device, dtype=dtype)
    angle = torch.deg2rad(max_degrees * torch.rand((batch,), generator=generator, device=device, dtype=dtype))
    return rotation_matrix(axis, angle)


@dataclass
class SpatialAugment:
    """Ranges of the random spatial transform.

    Attributes:
        max_rotation: degrees (180 = any orientation).
        full_sphere_prob: probability that an image's rotation is drawn over the whole sphere instead
            (a mixture: near-canonical images for accuracy, any orientation for the first pass of the
            orientation search).
        max_translation: mm per axis.
        scale: maximum relative scaling per axis (0.1 = [0.9, 1.1]).
        shear: maximum shear coefficient.
        max_displacement: mm, amplitude of the smooth nonlinear deformation (0 disables).
        control_spacing: mm between control points of that deformation.
        brain_motion_prob: probability that the brain is also moved within the head
            (:func:`random_brain_motion`; 0 disables): heads differ in how the brain sits in them, and
            a network that places the brain by the skull misreads new subjects.
        brain_rotation: degrees, maximum rotation of the brain within the head.
        brain_translation: mm, maximum translation of the brain per axis.
        brain_scale: maximum relative scaling of the brain (isotropic).
    """

    max_rotation: float = 180.0
    full_sphere_prob: float = 0.0
    max_translation: float = 10.0
    scale: float = 0.1
    shear: float = 0.05
    max_displacement: float = 3.0
    control_spacing: float = 32.0
    brain_motion_prob: float = 0.0
    brain_rotation: float = 4.0
    brain_translation: float = 3.0
    brain_scale: float = 0.05


def random_affine(batch: int, generator: torch.Generator, center: torch.Tensor,
                  spec: SpatialAugment | None = None, *, device=None) -> torch.Tensor:
    """``(B, 4, 4)`` float64 world transforms about ``center`` (``(3,)`` mm): rotation, scaling, shear,
    translation."""
    s = spec or SpatialAugment()
    g = generator
    rot = random_rotation(batch, g, max_degrees=s.max_rotation, device=device)
    if s.full_sphere_prob > 0:
        anywhere = random_rotation(batch, g, max_degrees=180.0, device=device)
        pick = torch.rand((batch, 1, 1), generator=g, device=device) < s.full_sphere_prob
        rot = torch.where(pick, anywhere, rot)
    scale = torch.diag_embed(1 + _uniform((batch, 3), -s.scale, s.scale, g, device).double())
    shear = torch.eye(3, dtype=torch.float64, device=device).repeat(batch, 1, 1)
    shear[:, 0, 1], shear[:, 0, 2], shear[:, 1, 2] = _uniform((3, batch), -s.shear, s.shear, g, device).double()
    trans = _uniform((batch, 3), -s.max_translation, s.max_translation, g, device).double()
    return _about_center(rot @ scale @ shear, center, trans)


def _about_center(lin: torch.Tensor, center: torch.Tensor, trans: torch.Tensor) -> torch.Tensor:
    """``(B, 4, 4)`` float64 transforms ``x -> lin (x - center) + center + trans`` (``lin`` ``(B, 3, 3)``,
    ``center`` ``(3,)`` mm, ``trans`` ``(B, 3)`` mm)."""
    c = center.to(device=lin.device, dtype=torch.float64).reshape(1, 3)
    out = torch.eye(4, dtype=torch.float64, device=lin.device).repeat(lin.shape[0], 1, 1)
    out[:, :3, :3] = lin
    out[:, :3, 3] = c - (lin @ c[..., None])[..., 0] + trans
    return out


def random_brain_motion(batch: int, generator: torch.Generator, center: torch.Tensor,
                        spec: SpatialAugment | None = None, *, device=None) -> torch.Tensor:
    """``(B, 4, 4)`` float64 small world transforms about ``center`` (``(3,)`` mm, the brain's centre)
    that move the brain within the head: rotation up to ``brain_rotation`` degrees, isotropic scaling
    within ``1 +- brain_scale``, translation up to ``brain_translation`` mm per axis; the identity with
    probability ``1 - brain_motion_prob``."""
    s = spec or SpatialAugment()
    g = generator
    rot = random_rotation(batch, g, max_degrees=s.brain_rotation, device=device)
    scale = 1 + _uniform((batch, 1, 1), -s.brain_scale, s.brain_scale, g, device).double()
    trans = _uniform((batch, 3), -s.brain_translation, s.brain_translation, g, device).double()
    out = _about_center(rot * scale, center, trans)
    still = torch.rand((batch, 1, 1), generator=g, device=device) >= s.brain_motion_prob
    return torch.where(still, torch.eye(4, dtype=torch.float64, device=device), out)


def brain_weight(labels: torch.Tensor, voxel_size: float, falloff_mm: float = 20.0) -> torch.Tensor:
    """``(I, J, K)`` float32 weight in [0, 1] of a label map: 1 in the brain (not
    :func:`extracerebral_mask`, not CSF), falling smoothly (a half cosine of the distance) to 0 at
    ``falloff_mm`` mm from it.  A motion of the brain (:func:`warp_labels_on_grid`'s ``inner_motion``)
    then moves all of the brain rigidly and stretches the CSF and the tissues around it; the warp
    stays one-to-one while the motion moves no point by more than about ``0.6 falloff_mm``."""
    from scipy.ndimage import distance_transform_edt

    brain = (~extracerebral_mask(labels) & (labels != 24)).cpu().numpy()
    dist = distance_transform_edt(~brain) * voxel_size if brain.any() else np.full(brain.shape, np.inf)
    w = 0.5 * (1 + np.cos(np.pi * np.minimum(dist / falloff_mm, 1.0)))
    return torch.from_numpy(w.astype(np.float32)).to(labels.device)


def random_smooth_field(batch: int, shape: Sequence[int], voxel_size: float, generator: torch.Generator,
                        spec: SpatialAugment | None = None, *, device=None) -> torch.Tensor:
    """``(B, 3, I, J, K)`` smooth displacement (world mm): Gaussian values on a coarse control grid
    (``control_spacing`` mm), upsampled trilinearly; maximum amplitude ``max_displacement``."""
    s = spec or SpatialAugment()
    coarse = [max(2, int(round(n * voxel_size / s.control_spacing)) + 1) for n in shape]
    amp = _uniform((batch, 1, 1, 1, 1), 0.0, s.max_displacement / 2.0, generator, device)  # no host sync
    ctrl = amp * torch.randn((batch, 3, *coarse), generator=generator, device=device)
    return F.interpolate(ctrl, size=tuple(shape), mode="trilinear", align_corners=True)


def warp_labels_on_grid(
    labels: torch.Tensor,
    source_affine: torch.Tensor,
    out_shape: Sequence[int],
    out_affine: torch.Tensor,
    matrix: torch.Tensor,
    displacement: torch.Tensor | None = None,
    inner_motion: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Resample label maps once through ``x -> matrix @ (x + u(x))`` (nearest: ids never blended),
    and then, with ``inner_motion``, ``y -> y + w(motion @ y) (motion @ y - y)``: where the weight is 1
    the source is moved rigidly by ``motion``'s inverse, where it is 0 it stays.

    Args:
        labels: ``(B, C, I, J, K)`` integer ids on the source grid (e.g. labels and regions).
        source_affine, out_affine: ``(4, 4)`` world-from-voxel of the source and output grids.
        matrix: ``(B, 4, 4)`` world transform (output world -> source world).
        displacement: ``(B, 3, *out_shape)`` mm added before ``matrix`` (or ``None``).
        inner_motion: ``(weight, motion)``: a part of the source moved relative to the rest, ``weight``
            ``(I, J, K)`` in [0, 1] on the source grid (:func:`brain_weight`: 1 moves, 0 stays) and
            ``motion`` ``(B, 4, 4)`` a source-world transform (:func:`random_brain_motion`), or ``None``.

    Returns:
        ``(B, C, *out_shape)`` int64; 0 outside the source grid (every channel resampled alike).
    """
    b = labels.shape[0]
    dev = labels.device
    axes = [torch.arange(n, device=dev, dtype=torch.float64) for n in out_shape]
    idx = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(1, -1, 3)
    world = apply_affine(out_affine.to(dev, torch.float64)[None], idx).expand(b, -1, -1)
    if displacement is not None:
        world = world + displacement.flatten(2).transpose(1, 2).double()
    vox_from_world = torch.linalg.inv(source_affine.to(dev, torch.float64))
    src = apply_affine(vox_from_world[None] @ matrix.to(dev), world)
    if inner_motion is not None:  # in source voxels: y + w(M y) (M y - y), w trilinear
        weight, motion = inner_motion
        m_vox = vox_from_world[None] @ motion.to(dev, torch.float64) @ source_affine.to(dev, torch.float64)[None]
        moved = apply_affine(m_vox, src)
        size = torch.tensor(weight.shape, device=dev, dtype=torch.float64)
        norm = (2 * moved / (size - 1) - 1).flip(-1)  # grid_sample wants (x, y, z) = (k, j, i), in [-1, 1]
        w = F.grid_sample(weight[None, None].expand(b, 1, *weight.shape).to(dev), norm[:, :, None, None].float(),
                          mode="bilinear", padding_mode="zeros", align_corners=True).reshape(b, -1, 1).double()
        src = src + w * (moved - src)
    # nearest voxel by index and an integer gather: exact for any id (a float32 grid_sample is not above 2^24)
    n = torch.tensor(labels.shape[2:], device=dev)
    near = torch.round(src).long()  # (B, M, 3)
    inside = ((near >= 0) & (near < n)).all(-1)
    near = torch.minimum(near.clamp_min(0), n - 1)
    flat = (near[..., 0] * n[1] + near[..., 1]) * n[2] + near[..., 2]
    c = labels.shape[1]
    vals = torch.gather(labels.reshape(b, c, -1).long(), 2, flat[:, None].expand(b, c, -1))
    return torch.where(inside[:, None], vals, torch.zeros_like(vals)).reshape(b, c, *out_shape)
