"""Per-keypoint residuals, closed-form leave-one-out errors, confidence and robust fitting."""

from __future__ import annotations

import pytest
import torch

from keyreg.transforms import fit_affine, fit_rigid, fit_tps, parse_align
from keyreg.transforms.residuals import (keypoint_residuals, loo_errors, loo_errors_affine, loo_errors_rigid,
                                         loo_errors_tps, pair_confidence)
from keyreg.transforms.robust import robust_fit

from conftest import rotation


def _points(b=2, n=14, seed=0, noise=0.5):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, n, 3, generator=g, dtype=torch.float64) * 120 - 60
    rot = torch.as_tensor(rotation([1, 2, 3], 20))
    y = x @ (1.1 * rot).T + torch.tensor([5.0, -3.0, 8.0], dtype=torch.float64)
    y = y + 2 * torch.sin(x / 15)  # a little non-linear
    y = y + noise * torch.randn(b, n, 3, generator=g, dtype=torch.float64)
    w = torch.rand(b, n, generator=g, dtype=torch.float64) + 0.2
    return x, y, w


def _explicit_loo(fit_pred, x, y, w):
    """Refit without keypoint i, predict it: the definition the closed forms must reproduce."""
    b, n, _ = x.shape
    out = torch.empty_like(y)
    for i in range(n):
        keep = [j for j in range(n) if j != i]
        pred = fit_pred(x[:, keep], y[:, keep], w[:, keep], x[:, i : i + 1])
        out[:, i] = y[:, i] - pred[:, 0]
    return out


def _apply(m, p):
    return p @ m[:, :3, :3].transpose(1, 2) + m[:, None, :3, 3]


def test_affine_loo_closed_form_equals_refits():
    x, y, w = _points()
    ref = _explicit_loo(lambda a, b_, c, q: _apply(fit_affine(a, b_, c), q), x, y, w)
    assert torch.allclose(loo_errors_affine(x, y, w), ref, atol=1e-9)


def test_rigid_loo_equals_refits():
    x, y, w = _points(n=9)
    ref = _explicit_loo(lambda a, b_, c, q: _apply(fit_rigid(a, b_, c), q), x, y, w)
    assert torch.allclose(loo_errors_rigid(x, y, w), ref, atol=1e-9)


@pytest.mark.parametrize("lam", [0.0, 0.3, 5.0])
def test_tps_loo_closed_form_equals_refits(lam):
    x, y, w = _points(n=12)
    center = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    scale = 80.0

    def refit(a, b_, c, q):
        # fit_tps scales weights to mean 1 over the points it gets: compensate so that lambda / w_n is unchanged
        factor = (w.sum(1) / c.sum(1)) * (c.shape[1] / w.shape[1])
        t = fit_tps(a, b_, lam * factor, c, center=center, scale=scale)
        return t.map_points(q)

    ref = _explicit_loo(refit, x, y, w)
    got = loo_errors_tps(x, y, lam, w, center=center, scale=scale)
    assert torch.allclose(got, ref, atol=1e-6 * scale)


def test_zero_weight_keypoint_is_left_out_of_tps_and_gets_its_prediction_error():
    x, y, w = _points(n=12)
    w[:, 3] = 0
    keep = [j for j in range(12) if j != 3]
    full = fit_tps(x, y, 0.0, w)
    sub = fit_tps(x[:, keep], y[:, keep], 0.0, center=full.center, scale=full.scale)
    q = torch.randn(2, 20, 3, dtype=torch.float64) * 30
    assert torch.allclose(full.map_points(q), sub.map_points(q), atol=1e-6)
    loo = loo_errors_tps(x, y, 0.0, w)
    assert torch.allclose(loo[:, 3], y[:, 3] - sub.map_points(x[:, 3:4])[:, 0], atol=1e-6)
    # and the interpolating TPS has zero residuals at the kept keypoints only
    res = keypoint_residuals(parse_align("tps_0"), full, x, y, w)
    assert res.residual_mm[:, keep].max() < 1e-6
    assert res.residual_mm[:, 3].min() > 1e-3


def test_loo_exceeds_residual_and_flags_an_outlier():
    x, y, _ = _points(b=1, n=30, noise=0.3)
    y[0, 7] += torch.tensor([25.0, -10.0, 5.0], dtype=torch.float64)
    for name in ("rigid", "affine", "tps_0", "tps_1"):
        spec = parse_align(name)
        from keyreg.transforms import fit_transform
        t = fit_transform(spec, x, y)
        r = keypoint_residuals(spec, t, x, y)
        assert (r.loo_mm >= r.residual_mm - 1e-9).all(), name
        # an interpolating TPS bends towards the outlier, so a close neighbour may be predicted as badly
        top = 2 if name == "tps_0" else 1
        assert 7 in r.loo_mm[0].topk(top).indices.tolist(), name


def test_confidence_definition():
    d = torch.tensor([[1.0, 2.0, 3.0, 4.0, 50.0], [20.0, 30.0, 40.0, 50.0, 60.0]], dtype=torch.float64)
    c = pair_confidence(d, inlier_threshold_mm=10.0, scale_mm=10.0)
    assert torch.allclose(c["inlier_fraction"], torch.tensor([0.8, 0.0], dtype=torch.float64))
    assert torch.allclose(c["median_loo_mm"], torch.tensor([3.0, 40.0], dtype=torch.float64))
    assert torch.allclose(c["confidence"][0], torch.tensor(0.8 * torch.exp(torch.tensor(-0.3)).item(),
                                                             dtype=torch.float64))
    assert c["confidence"][1] == 0
    # clean keypoints are more confident than scattered ones
    x, y, _ = _points(b=1, n=40, noise=0.5)
    good = pair_confidence(loo_errors(parse_align("affine"), x, y).norm(dim=-1))["confidence"]
    bad = pair_confidence(loo_errors(parse_align("affine"), x, y + 15 * torch.randn_like(y)).norm(dim=-1))["confidence"]
    assert good > 0.5 > bad


@pytest.mark.parametrize("name", ["rigid", "affine", "tps_0", "tps_2"])
def test_robust_fit_equals_plain_fit_on_clean_pairs(name):
    from keyreg.transforms import fit_transform

    spec = parse_align(name)
    x, y, w = _points(b=2, n=30, noise=0.2)
    if spec.kind == "rigid":
        y = x @ torch.as_tensor(rotation([0, 1, 1], 30)).T + 4.0 + 0.2 * torch.randn_like(x)
    rf = robust_fit(spec, x, y, w)
    assert bool(rf.kept.all())
    plain = fit_transform(spec, x, y, w)
    q = torch.randn(2, 50, 3, dtype=torch.float64) * 40
    assert torch.allclose(rf.transform.map_points(q), plain.map_points(q), atol=1e-9)


@pytest.mark.parametrize("name", ["rigid", "affine", "tps_0"])
def test_robust_fit_rejects_outliers_and_recovers_the_clean_fit(name):
    from keyreg.transforms import fit_transform

    spec = parse_align(name)
    g = torch.Generator().manual_seed(3)
    x = torch.rand(1, 40, 3, generator=g, dtype=torch.float64) * 120 - 60
    rot = torch.as_tensor(rotation([1, 0, 1], 25))
    lin = rot if spec.kind == "rigid" else 1.05 * rot
    y_clean = x @ lin.T + torch.tensor([3.0, 2.0, -6.0], dtype=torch.float64)
    y = y_clean + 0.3 * torch.randn(1, 40, 3, generator=g, dtype=torch.float64)
    bad = [2, 11, 19, 33, 38]
    y[0, bad] += 30 * torch.randn(len(bad), 3, generator=g, dtype=torch.float64).sign() * 1.0
    rf = robust_fit(spec, x, y)
    assert set(torch.nonzero(~rf.kept[0]).flatten().tolist()) == set(bad)
    q = torch.rand(1, 200, 3, generator=g, dtype=torch.float64) * 100 - 50
    truth = q @ lin.T + torch.tensor([3.0, 2.0, -6.0], dtype=torch.float64)
    err_robust = (rf.transform.map_points(q) - truth).norm(dim=-1).mean()
    err_plain = (fit_transform(spec, x, y).map_points(q) - truth).norm(dim=-1).mean()
    assert err_robust < 1.0 and 2 * err_robust < err_plain, (err_robust, err_plain)
    assert (rf.loo.norm(dim=-1)[0, bad] > 20).all()
