"""Synthetic images and spatial augmentation from label maps."""

import numpy as np
import pytest
import torch

from keyreg.train.synth import (IntensityAugment, SpatialAugment, cut_field_of_view, random_affine, random_means,
                                random_rotation, random_smooth_field, synthesize_image, warp_labels_on_grid)

NO_AUG = IntensityAugment(std_range=(0, 0), noise_std=0, blur_sigma=0, bias_std=0, gamma_std=0,
                          resolution_prob=0, skull_strip_prob=0)


def _labels(shape=(20, 22, 18)):
    lab = torch.zeros((1, 1, *shape), dtype=torch.long)
    lab[..., 2:18, 2:20, 2:16] = 502     # "skull"
    lab[..., 4:16, 4:18, 4:14] = 24      # CSF
    lab[..., 5:15, 5:17, 5:13] = 3       # cortex
    lab[..., 7:13, 7:15, 7:11] = 2       # white matter
    return lab


def test_synthesis_is_seeded_normalised_and_piecewise_by_label():
    lab = _labels().repeat(2, 1, 1, 1, 1)
    a = synthesize_image(lab, torch.Generator().manual_seed(1))
    b = synthesize_image(lab, torch.Generator().manual_seed(1))
    c = synthesize_image(lab, torch.Generator().manual_seed(2))
    assert a.shape == lab.shape and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert float(a.min()) >= 0 and float(a.max()) <= 1
    # without augmentation each label has one intensity
    clean = synthesize_image(lab, torch.Generator().manual_seed(3), augment=NO_AUG)
    for b in range(2):
        for i in (0, 2, 3, 24, 502):
            vals = clean[b][lab[b] == i]
            assert float(vals.max() - vals.min()) < 1e-6


def test_field_of_view_cuts_are_planes_within_the_head_and_off_by_default():
    """A cut zeroes the image beyond a plane (or outside a slab) that crosses the head, leaves the rest
    untouched, and is drawn only when asked: seeds reproduce the images of before."""
    lab = _labels((32, 32, 32))
    plain = synthesize_image(lab, torch.Generator().manual_seed(5), augment=NO_AUG)
    again = synthesize_image(lab, torch.Generator().manual_seed(5),
                             augment=IntensityAugment(**{**NO_AUG.__dict__, "fov_cut_prob": 0.0}))
    assert torch.equal(plain, again)
    head = lab > 0
    image = torch.rand((1, 1, 32, 32, 32), generator=torch.Generator().manual_seed(0)) + 0.1
    g = torch.Generator().manual_seed(1)
    removed = []
    for _ in range(40):
        out = cut_field_of_view(image, head, g, 1.0)
        zero = out == 0
        assert torch.equal(out[~zero], image[~zero])  # the kept part is untouched
        removed.append(float(zero[head].float().mean()))
        assert 0 < removed[-1] < 0.8
    assert np.std(removed) > 0.05  # cuts of different depths
    assert not (cut_field_of_view(image, head, torch.Generator().manual_seed(2), 0.0) == 0).any()


def test_named_contrasts_order_tissues():
    lab = _labels()
    g = torch.Generator().manual_seed(0)
    t1 = synthesize_image(lab, g, contrast="t1", augment=NO_AUG, skull_strip=True)
    t2 = synthesize_image(lab, g, contrast="t2", augment=NO_AUG, skull_strip=True)
    m = {k: (float(t1[lab == k].mean()), float(t2[lab == k].mean())) for k in (2, 3, 24)}
    assert m[2][0] > m[3][0] > m[24][0]      # T1: WM > GM > CSF
    assert m[24][1] > m[3][1] > m[2][1]      # T2: CSF > GM > WM
    assert float(t1[lab == 502].max()) == 0  # skull stripped
    with pytest.raises(ValueError, match="unknown contrast"):
        random_means(1, 10, g, contrast="ct")


def test_shared_means_give_the_same_contrast_to_two_maps():
    lab = _labels()
    g = torch.Generator().manual_seed(0)
    means = random_means(1, 600, g)
    a = synthesize_image(lab, g, augment=NO_AUG, means=means)
    b = synthesize_image(lab.flip(2), g, augment=NO_AUG, means=means)
    assert torch.allclose(a.flip(2), b)


def test_random_rotations_are_proper_and_bounded():
    r = random_rotation(64, torch.Generator().manual_seed(0), max_degrees=30)
    eye = torch.eye(3, dtype=r.dtype).expand_as(r)
    assert torch.allclose(r @ r.transpose(1, 2), eye, atol=1e-12)
    assert torch.allclose(torch.linalg.det(r), torch.ones(64, dtype=r.dtype))
    angles = torch.rad2deg(torch.arccos(((r.diagonal(dim1=1, dim2=2).sum(1) - 1) / 2).clamp(-1, 1)))
    assert float(angles.max()) <= 30 + 1e-6
    full = random_rotation(2000, torch.Generator().manual_seed(1))
    full_angles = torch.rad2deg(torch.arccos(((full.diagonal(dim1=1, dim2=2).sum(1) - 1) / 2).clamp(-1, 1)))
    assert float(full_angles.max()) > 170


def test_label_warp_identity_is_exact_and_never_blends_ids():
    lab = _labels()
    aff = torch.from_numpy(np.diag([1.5, 1.0, 2.0, 1.0]))
    same = warp_labels_on_grid(lab, aff, lab.shape[2:], aff, torch.eye(4, dtype=torch.float64)[None])
    assert torch.equal(same, lab)
    g = torch.Generator().manual_seed(0)
    center = aff[:3, :3] @ ((torch.tensor(lab.shape[2:], dtype=torch.float64) - 1) / 2)
    mat = random_affine(1, g, center, SpatialAugment(max_rotation=180))
    disp = random_smooth_field(1, lab.shape[2:], 1.5, g, SpatialAugment(max_displacement=4))
    out = warp_labels_on_grid(lab, aff, lab.shape[2:], aff, mat, disp)
    assert set(out.unique().tolist()) <= set(lab.unique().tolist())


def test_label_warp_follows_the_pull_convention():
    lab = torch.zeros((1, 1, 9, 9, 9), dtype=torch.long)
    lab[0, 0, 6, 4, 4] = 7
    eye = torch.eye(4, dtype=torch.float64)
    shift = eye.clone()[None]
    shift[0, 0, 3] = 2.0  # output world x -> source world x + 2
    out = warp_labels_on_grid(lab, eye, (9, 9, 9), eye, shift)
    assert out[0, 0, 4, 4, 4] == 7 and int((out == 7).sum()) == 1
