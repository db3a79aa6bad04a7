"""Closed-form fits (rigid, affine, TPS), their properties, errors and gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import rotation
from keyreg.errors import ConfigError, DegenerateFitError, ShapeError
from keyreg.transforms import (AffineTransform, fit_affine, fit_rigid, fit_tps, fit_transform, invert_points,
                               parse_align, parse_aligns, sample_field)

DT = torch.float64


def random_points(b=2, n=40, seed=0, spread=60.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, 3, generator=g, dtype=DT) * spread + torch.tensor([5.0, -10.0, 20.0], dtype=DT)


def apply(m, x):
    return x @ m[..., :3, :3].transpose(-1, -2) + m[..., :3, 3].unsqueeze(-2)


def known_rigid(b=2):
    mats = []
    for i in range(b):
        m = torch.eye(4, dtype=DT)
        m[:3, :3] = torch.as_tensor(rotation([1, -2 + i, 0.7], 35 + 60 * i))
        m[:3, 3] = torch.tensor([12.0, -7.0 + i, 3.5], dtype=DT)
        mats.append(m)
    return torch.stack(mats)


def known_affine(b=2):
    m = known_rigid(b).clone()
    m[:, :3, :3] = m[:, :3, :3] @ torch.tensor([[1.1, 0.15, 0.0], [0.0, 0.9, 0.1], [0.05, 0.0, 1.25]], dtype=DT)
    return m


# ------------------------------------------------------------------------------------------ rigid

def test_rigid_recovers_known_transform():
    x = random_points()
    m = known_rigid()
    est = fit_rigid(x, apply(m, x))
    assert est.shape == (2, 4, 4)
    torch.testing.assert_close(est, m, atol=1e-10, rtol=0)


def test_rigid_is_proper_rotation_for_reflected_targets():
    x = random_points(1)
    mirror = torch.diag(torch.tensor([1.0, 1.0, -1.0, 1.0], dtype=DT))
    est = fit_rigid(x, apply(mirror, x))
    r = est[0, :3, :3]
    assert torch.linalg.det(r).item() == pytest.approx(1.0, abs=1e-12)
    torch.testing.assert_close(r @ r.T, torch.eye(3, dtype=DT), atol=1e-12, rtol=0)


def test_rigid_reflection_fix_on_planar_points():
    # Planar points leave a zero singular value; the reflection fix must flip that (smallest) axis.
    # Fixing any other axis (the official code's bug) gives a wrong rotation.
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 30, 3, generator=g, dtype=DT) * 40
    x[..., 2] = 0.0
    for deg in (20, 100, 170):
        m = torch.eye(4, dtype=DT)
        m[:3, :3] = torch.as_tensor(rotation([0.2, 0.3, 1.0], deg))
        m[:3, 3] = torch.tensor([1.0, 2.0, 3.0], dtype=DT)
        torch.testing.assert_close(fit_rigid(x, apply(m, x)), m.unsqueeze(0), atol=1e-9, rtol=0)


def test_rigid_weights_ignore_outliers():
    x = random_points(1, 30)
    m = known_rigid(1)
    y = apply(m, x)
    y[0, :5] += 50.0  # five wild outliers
    w = torch.ones(1, 30, dtype=DT)
    w[0, :5] = 0
    torch.testing.assert_close(fit_rigid(x, y, w), m, atol=1e-9, rtol=0)
    assert (fit_rigid(x, y) - m).abs().max() > 0.1


# ------------------------------------------------------------------------------------------ affine

def test_affine_recovers_known_transform():
    x = random_points()
    m = known_affine()
    torch.testing.assert_close(fit_affine(x, apply(m, x)), m, atol=1e-10, rtol=0)


def test_weighted_affine_matches_weighted_lstsq():
    x = random_points(1, 25, seed=5)
    y = apply(known_affine(1), x) + torch.randn(1, 25, 3, dtype=DT, generator=torch.Generator().manual_seed(1))
    w = torch.rand(1, 25, dtype=DT, generator=torch.Generator().manual_seed(2)) + 0.1
    xh = np.concatenate([x[0].numpy(), np.ones((25, 1))], 1)
    sw = np.sqrt(w[0].numpy())[:, None]
    theta, *_ = np.linalg.lstsq(xh * sw, y[0].numpy() * sw, rcond=None)
    expected = np.eye(4)
    expected[:3] = theta.T
    np.testing.assert_allclose(fit_affine(x, y, w)[0].numpy(), expected, atol=1e-9)


def test_affine_with_large_world_offsets_is_well_conditioned():
    x = random_points(1, 20, spread=5.0) + 1000.0  # far from the origin, small spread
    m = known_affine(1)
    torch.testing.assert_close(fit_affine(x, apply(m, x)), m, atol=1e-7, rtol=0)


@pytest.mark.parametrize("fit,rank_name", [(fit_rigid, "collinear"), (fit_affine, "coplanar")])
def test_degenerate_point_sets_raise(fit, rank_name):
    t = torch.linspace(-1, 1, 10, dtype=DT)
    if rank_name == "collinear":
        x = torch.stack([t, 2 * t, -t], -1).unsqueeze(0) * 30
    else:
        g = torch.Generator().manual_seed(0)
        uv = torch.randn(1, 10, 2, generator=g, dtype=DT)
        x = uv[..., :1] * torch.tensor([1.0, 0, 1], dtype=DT) + uv[..., 1:] * torch.tensor([0, 1.0, 1], dtype=DT)
    with pytest.raises(DegenerateFitError, match=rank_name):
        fit(x, x + 1)


def test_too_few_points_raise():
    x = random_points(1, 3)
    with pytest.raises(DegenerateFitError, match="at least 4"):
        fit_affine(x, x)
    with pytest.raises(DegenerateFitError, match="at least 3"):
        fit_rigid(x[:, :2], x[:, :2])


def test_coplanar_moving_points_raise_for_affine():
    x = random_points(1, 12)
    y = x.clone()
    y[..., 2] = 0
    with pytest.raises(DegenerateFitError, match="moving keypoints are coplanar"):
        fit_affine(x, y)


def test_zero_weights_raise_and_shapes_checked():
    x = random_points(1, 10)
    with pytest.raises(DegenerateFitError, match="all zero"):
        fit_affine(x, x, torch.zeros(1, 10, dtype=DT))
    with pytest.raises(ShapeError, match=r"\(B, N, 3\)"):
        fit_rigid(x[0], x[0])
    with pytest.raises(ShapeError, match="must match"):
        fit_affine(x, x[:, :5])


# ------------------------------------------------------------------------------------------ TPS

def test_tps_interpolates_exactly_with_lambda_zero():
    x = random_points()
    y = apply(known_affine(), x) + torch.randn_like(x) * 4
    tps = fit_tps(x, y, 0.0)
    torch.testing.assert_close(tps.map_points(x), y, atol=1e-8, rtol=0)


def test_tps_identical_keypoints_give_identity():
    x = random_points(1)
    tps = fit_tps(x, x, 0.0)
    assert tps.kernel_weights.abs().max() < 1e-10
    torch.testing.assert_close(tps.affine_part(), torch.eye(4, dtype=DT).unsqueeze(0), atol=1e-12, rtol=0)
    q = random_points(1, 100, seed=9)
    torch.testing.assert_close(tps.map_points(q), q, atol=1e-9, rtol=0)


def test_tps_of_affine_targets_has_zero_kernel_weights():
    x = random_points(1)
    m = known_affine(1)
    tps = fit_tps(x, apply(m, x), 0.0)
    assert tps.kernel_weights.abs().max() < 1e-9
    torch.testing.assert_close(tps.affine_part(), m, atol=1e-9, rtol=0)


def test_tps_large_lambda_tends_to_affine_fit():
    x = random_points(1)
    y = apply(known_affine(1), x) + torch.randn_like(x) * 3
    lam_small = (fit_tps(x, y, 1.0).affine_part() - fit_affine(x, y)).abs().max()
    lam_large = (fit_tps(x, y, 1e7).affine_part() - fit_affine(x, y)).abs().max()
    assert lam_large < 1e-4 < lam_small


def test_tps_weights_trust_heavy_points_more():
    x = random_points(1, 20)
    y = x.clone()
    y[0, 0] += 10.0  # one displaced point
    w = torch.ones(1, 20, dtype=DT)
    heavy, light = w.clone(), w.clone()
    heavy[0, 0], light[0, 0] = 20.0, 0.05
    err = lambda ww: (fit_tps(x, y, 1.0, ww).map_points(x[:, :1]) - y[:, :1]).norm()  # noqa: E731
    assert err(heavy) < err(None) < err(light)


def test_tps_batched_lambda_and_chunking():
    x = random_points(2)
    y = x + torch.randn_like(x) * 3
    tps = fit_tps(x, y, torch.tensor([0.0, 5.0], dtype=DT))
    q = random_points(2, 300, seed=4)
    torch.testing.assert_close(tps.map_points(q, chunk_elements=97), tps.map_points(q), atol=1e-12, rtol=0)
    single = fit_tps(x[1:], y[1:], 5.0)
    torch.testing.assert_close(tps[1].map_points(q[1:]), single.map_points(q[1:]), atol=1e-10, rtol=0)


def test_tps_errors():
    x = random_points(1, 10)
    dup = torch.cat([x, x[:, :1]], dim=1)
    with pytest.raises(DegenerateFitError, match="coincide"):
        fit_tps(dup, dup + torch.randn_like(dup), 0.0)
    fit_tps(dup, dup + torch.randn_like(dup), 1.0)  # regularised: fine
    with pytest.raises(ShapeError, match="lmbda"):
        fit_tps(x, x, -1.0)


def test_float32_agrees_with_float64():
    x = random_points(1)
    y = apply(known_affine(1), x) + torch.randn_like(x)
    for fit in (fit_rigid, fit_affine):
        torch.testing.assert_close(fit(x.float(), y.float()).double(), fit(x, y), atol=1e-3, rtol=1e-4)
    q = random_points(1, 50, seed=3)
    a = fit_tps(x.float(), y.float(), 0.1).map_points(q.float()).double()
    torch.testing.assert_close(a, fit_tps(x, y, 0.1).map_points(q), atol=1e-3, rtol=1e-5)


# ------------------------------------------------------------------------------------------ gradients

def test_gradcheck_fits():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(1, 8, 3, generator=g, dtype=DT) * 10).requires_grad_()
    y = (x.detach() + torch.randn(1, 8, 3, generator=g, dtype=DT)).requires_grad_()
    w = (torch.rand(1, 8, generator=g, dtype=DT) + 0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b, c: fit_rigid(a, b, c), (x, y, w), fast_mode=True)
    assert torch.autograd.gradcheck(lambda a, b, c: fit_affine(a, b, c), (x, y, w), fast_mode=True)
    q = torch.randn(1, 5, 3, generator=g, dtype=DT) * 10
    assert torch.autograd.gradcheck(lambda a, b, c: fit_tps(a, b, 0.5, c).map_points(q), (x, y, w),
                                    fast_mode=True)


# ------------------------------------------------------------------------------------------ names, inverse

def test_parse_align_names():
    assert parse_align("rigid").name == "rigid"
    assert parse_align("TPS_10").lmbda == 10.0
    assert parse_align("tps_0.5").name == "tps_0.5"
    assert parse_align("tps_1e-2").lmbda == pytest.approx(0.01)
    assert [s.name for s in parse_aligns(["affine", "tps_0", "affine"])] == ["affine", "tps_0"]
    for bad in ("similarity", "tps", "tps_-1", "tps_x", ""):
        with pytest.raises(ConfigError, match="unknown align"):
            parse_align(bad)


def test_fit_transform_dispatch():
    x = random_points(1)
    y = apply(known_rigid(1), x)
    assert isinstance(fit_transform(parse_align("rigid"), x, y), AffineTransform)
    assert fit_transform(parse_align("tps_0"), x, y).kernel_weights.shape == (1, 40, 3)


def test_invert_points_of_tps():
    x = random_points(1, 30)
    y = apply(known_affine(1), x) + torch.randn_like(x) * 3
    tps = fit_tps(x, y, 0.0)
    q = random_points(1, 20, seed=7, spread=30.0)
    p, residual = invert_points(tps, q)
    assert residual.max() < 1e-4
    torch.testing.assert_close(tps.map_points(p), q, atol=1e-4, rtol=0)
    p_kp, _ = invert_points(tps, y)  # moving keypoints go back to fixed keypoints
    torch.testing.assert_close(p_kp, x, atol=1e-4, rtol=0)


def test_sampled_field_reproduces_affine_exactly():
    shape = (9, 11, 7)
    aff = np.diag([2.0, 1.5, 3.0, 1.0])
    m = AffineTransform(known_affine(1))
    field = sample_field(m, shape, aff, stride=3, dtype=torch.float64)
    extent = torch.tensor([16.0, 15.0, 18.0], dtype=DT)  # (shape - 1) * spacing: inside the grid
    q = torch.rand(1, 50, 3, dtype=DT, generator=torch.Generator().manual_seed(0)) * extent
    torch.testing.assert_close(field.map_points(q), m.map_points(q), atol=1e-9, rtol=0)
    outside = torch.tensor([[[-50.0, 1.0, 1.0]]], dtype=DT)  # ITK convention: no displacement outside
    torch.testing.assert_close(field.map_points(outside), outside)
