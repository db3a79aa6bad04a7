"""Dense refinement (keyreg.refine): integration, inverse, recovery of a known deformation, safeguard,
and agreement of the exported field with SimpleITK.  Small synthetic volumes, CPU, deterministic."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import blob_image, grid_affine, make_volume, rotation, world_points

from keyreg.errors import ConfigError, ImageContentError
from keyreg.formats import write_displacement_field
from keyreg.refine import (
    AffineConfig,
    DeformableConfig,
    RefinedTransform,
    RefineOptions,
    inverse_field,
    optimize_affine,
    optimize_velocity,
    refine_transform,
)
from keyreg.refine.similarity import gaussian_blur, lncc_loss, mind_loss, mind_ssc
from keyreg.refine.velocity import (
    compose_displacements,
    integrate_velocity,
    jacobian_determinant_torch,
)
from keyreg.transforms import AffineTransform, DisplacementField, sample_field
from keyreg.warp import warp_image

SHAPE = (30, 30, 24)
SPACING = (3.0, 3.0, 4.0)  # anisotropic on purpose


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: deterministic, and fair on a shared CPU


def _affine():
    return grid_affine(SPACING, rotation([0.2, 1, 0.3], 10), shape=SHAPE)


def _image(affine, shape=SHAPE) -> np.ndarray:
    rng = np.random.default_rng(0)
    centers = rng.uniform(-25, 25, (14, 3))
    img = blob_image(shape, affine, centers, radius=9.0, levels=rng.uniform(0.3, 1.0, 14))
    t = torch.from_numpy(img)[None, None]
    return gaussian_blur(t, 0.8)[0, 0].numpy()


def _smooth_velocity(shape, affine, amp_mm: float, seed: int = 1) -> torch.Tensor:
    """A smooth (1, 3, I, J, K) velocity in mm: sines over the world coordinates."""
    p = torch.from_numpy(world_points(shape, affine)).float()
    v = torch.stack([torch.sin(p[..., 1] / 14.0 + 0.3), torch.cos(p[..., 2] / 16.0),
                     torch.sin(p[..., 0] / 12.0 - 0.5)], dim=0)[None]
    return amp_mm * v


def test_similarities_basic():
    a = torch.from_numpy(_image(_affine()))[None, None]
    d = mind_ssc(a)
    assert d.shape == (1, 12, *SHAPE) and float(d.max()) <= 1.0 + 1e-6 and float(d.min()) > 0
    assert float(mind_loss(d, d)) == 0.0
    assert float(mind_loss(mind_ssc(1.0 - 2.0 * a), d)) < 1e-6  # contrast-invariant: MIND of an inverted image
    same = float(lncc_loss(a, a))  # flat background windows count as 0 correlation
    assert float(lncc_loss(a, 3 * a + 1)) == pytest.approx(same, abs=1e-3)
    assert float(lncc_loss(a, torch.roll(a, 3, dims=2))) > same + 0.05
    assert float(lncc_loss(a, -a)) > same + 0.5


def test_mind_on_the_mask_points_equals_the_dense_masked_loss():
    """With a mask, MIND is compared only at the mask's voxels (features sampled there); the value
    and its gradient equal the dense, mask-weighted loss on the whole grid."""
    from keyreg.refine.optimize import _Features
    from keyreg.refine.velocity import identity_grid, sample_displaced

    aff = _affine()
    img = torch.from_numpy(_image(aff))[None, None].float()
    moved = torch.roll(img, 2, dims=3)
    mask = (gaussian_blur(img, 1.0) > 0.3).float() * 0.5 + (img > 0.6).float() * 0.5  # weights in {0, .5, 1}
    assert 0 < float((mask > 0).float().mean()) < 0.9
    ident = identity_grid(SHAPE)
    u0 = 1.5 * _smooth_velocity(SHAPE, aff, 1.0)
    grads = []
    for points in (True, False):
        feat = _Features("mind", img, moved, mask)
        assert feat.points is not None
        if not points:
            feat.points = None  # the dense path, same mask
        u = u0.clone().requires_grad_(True)
        loss = feat.warped_loss(u, aff, ident)
        loss.backward()
        grads.append((float(loss.detach()), u.grad))
    (sparse, g_sparse), (dense, g_dense) = grads
    assert sparse == pytest.approx(dense, rel=1e-5)
    assert torch.allclose(g_sparse, g_dense, atol=1e-7 * float(g_dense.abs().max()) + 1e-12, rtol=1e-4)
    dense_direct = mind_loss(sample_displaced(mind_ssc(moved), u0, aff, ident=ident), mind_ssc(img), mask)
    assert sparse == pytest.approx(float(dense_direct), rel=1e-5)


def test_the_similarity_counts_the_fixed_foreground_without_a_mask():
    """Without a fixed mask the refinement measures its similarity on the fixed image's foreground
    (isolated noise voxels of the background do not count); a given mask is used as it is."""
    from keyreg.refine.similarity import foreground_mask

    img = torch.zeros(1, 1, 20, 20, 20)
    img[..., 5:15, 5:15, 5:15] = 1.0
    img[..., 17, 3, 10] = 0.25  # one bright noise voxel in the background
    fg = foreground_mask(img)
    assert float(fg[..., 10, 10, 10]) == 1.0 and float(fg[..., 17, 3, 10]) == 0.0 and float(fg[..., 0, 18, 0]) == 0.0
    assert float(fg[..., 4, 10, 10]) == 1.0  # the blur keeps the head's edge
    pair = _shifted_pair()
    start = AffineTransform(torch.eye(4, dtype=torch.float64)[None])
    opts = RefineOptions(similarity="lncc")
    auto = refine_transform(pair["fixed"], pair["moving"], start, stage="affine", options=opts)
    assert auto.report["region"] == "fixed foreground"
    mask = make_volume(np.ones(SHAPE, np.uint8), pair["fixed"].affine, kind="labels")
    given = refine_transform(pair["fixed"], pair["moving"], start, stage="affine", options=opts, fixed_mask=mask)
    assert given.report["region"] == "fixed mask"
    assert given.report["nmi_start"] != auto.report["nmi_start"]  # the measures count other voxels


def test_velocity_inverse_composes_to_identity():
    """exp(v) o exp(-v) = id within 0.1 mm for a smooth field of up to 5 mm (interior voxels)."""
    aff = _affine()
    v = _smooth_velocity(SHAPE, aff, 5.0)
    u, ui = integrate_velocity(v, aff), integrate_velocity(-v, aff)
    assert float(u.norm(dim=1).max()) > 3.0
    for c in (compose_displacements(u, ui, aff), compose_displacements(ui, u, aff)):
        err = c[:, :, 3:-3, 3:-3, 3:-3].norm(dim=1)
        assert float(err.max()) < 0.1
    assert float(jacobian_determinant_torch(u, aff).min()) > 0
    assert float(integrate_velocity(torch.zeros_like(v), aff).abs().max()) == 0.0


def test_integration_in_the_normalised_frame_equals_composing_in_mm():
    """``integrate_velocity`` squares in grid_sample's frame; that is the same scaling and squaring as
    composing the mm displacements (``compose_displacements``), on an oblique anisotropic grid and on
    a grid that is flat along one axis (where it composes in mm)."""
    for shape, aff in ((SHAPE, _affine()), ((30, 30, 1), grid_affine(SPACING, rotation([1, 0, 0], 20), shape=(30, 30, 1)))):
        v = _smooth_velocity(shape, aff, 6.0).double()
        u = v / 2 ** 7
        for _ in range(7):
            u = compose_displacements(u, u, aff)
        torch.testing.assert_close(integrate_velocity(v, aff), u, atol=1e-9, rtol=0)


def test_identity_pair_stays_identity():
    aff = _affine()
    img = torch.from_numpy(_image(aff))[None, None]
    out = optimize_affine(img, img, aff, AffineConfig(spacing_mm=4.0, iterations=(20,)))
    assert np.abs(out.matrix - np.eye(4)).max() < 0.3  # translation column in mm, linear part ~1e-3
    assert np.abs(out.matrix[:3, :3] - np.eye(3)).max() < 5e-3
    # stated error: the identity pair moves no voxel by more than 0.6 mm (a fifth of a voxel)
    vel = optimize_velocity(img, img, aff, DeformableConfig(spacing_mm=3.0, iterations=(10, 10)))
    u = integrate_velocity(vel.velocity, vel.affine)
    assert float(u.norm(dim=1).max()) < 0.6
    res = refine_transform(make_volume(img[0, 0].numpy(), aff), make_volume(img[0, 0].numpy(), aff),
                           AffineTransform(torch.eye(4, dtype=torch.float64)[None]), stage="deformable",
                           options=RefineOptions(iterations=(10, 10)))
    field = sample_field(res.transform, SHAPE, aff)
    assert float(field.displacement.norm(dim=1).max()) < 0.6


@pytest.mark.parametrize("similarity,tolerance", [("mind", 0.35), ("lncc", 0.5)])
def test_known_smooth_deformation_is_recovered(similarity, tolerance):
    """moving = fixed o exp(-v): the refined correction should be exp(v).  Stated error: the mean
    error inside the image content is below 35 % (MIND) / 50 % (LNCC) of the mean true displacement
    (about 4.7 mm on 3-4 mm voxels) after 80 iterations."""
    aff = _affine()
    fixed = torch.from_numpy(_image(aff))[None, None]
    v_true = _smooth_velocity(SHAPE, aff, 4.0)
    psi = integrate_velocity(-v_true, aff)
    moving = warp_image(fixed, aff, SHAPE, aff, DisplacementField(psi, aff))
    cfg = DeformableConfig(similarity=similarity, spacing_mm=3.0, iterations=(40, 40), smooth_mm=4.0,
                           reg_weight=0.1, control_factor=1, lr=0.5)
    vel = optimize_velocity(fixed, moving, aff, cfg)
    u = integrate_velocity(vel.velocity, vel.affine)
    u = torch.nn.functional.interpolate(u, size=SHAPE, mode="trilinear", align_corners=True)
    u_true = integrate_velocity(v_true, aff)
    content = gaussian_blur((fixed > 0.05).float(), 1.0)[0, 0] > 0.5
    content[:3], content[-3:], content[:, :3], content[:, -3:], content[:, :, :3], content[:, :, -3:] = (False,) * 6
    err = (u - u_true).norm(dim=1)[0][content].mean()
    true = u_true.norm(dim=1)[0][content].mean()
    assert float(true) > 2.0
    assert float(err) < tolerance * float(true), (float(err), float(true))
    assert vel.loss_end < vel.loss_start


def test_working_grid_coarsens_only_voxels_finer_than_half_the_finest_level():
    from keyreg.refine.run import working_grid

    coarse = grid_affine((2.0, 2.0, 2.0), rotation([1, 0, 0], 10), shape=(40, 40, 30))
    shape, aff = working_grid((40, 40, 30), coarse, 3.0)
    assert shape == (40, 40, 30) and np.array_equal(aff, coarse)  # 2 mm >= 1.5 mm: the fixed grid itself
    fine = grid_affine((1.0, 1.0, 3.0), rotation([0, 1, 1], 20), shape=(121, 101, 30))
    shape, aff = working_grid((121, 101, 30), fine, 3.0)
    assert shape == (81, 68, 30)  # 1 mm axes at ~1.5 mm, the 3 mm axis kept
    np.testing.assert_allclose(np.sqrt((aff[:3, :3] ** 2).sum(0)), [1.5, 100 / 67, 3.0])
    corner = np.array([120.0, 100.0, 29.0, 1.0])  # the same field of view: the corner voxel centres agree
    np.testing.assert_allclose(aff @ np.array([80.0, 67.0, 29.0, 1.0]), fine @ corner, atol=1e-9)
    np.testing.assert_allclose(aff[:3, 3], fine[:3, 3])


def test_refinement_of_a_fine_grid_on_its_working_grid(monkeypatch):
    """On 1 mm voxels the refinement works on a 1.5 mm grid (``working_grid``): its transform stays
    within 0.25 mm (median over the image content) of the same refinement run on the 1 mm grid
    itself, and both move towards the true shift."""
    from keyreg.refine import run

    shape = (56, 56, 48)
    aff = grid_affine((1.0, 1.0, 1.0), rotation([0.2, 1, 0.3], 10), shape=shape)
    img = _image(aff, shape)
    shift = np.array([2.5, -1.5, 1.0])
    moved = np.eye(4)
    moved[:3, 3] = shift  # moving_from_fixed: p -> p + shift, so moving(p + shift) = fixed(p)
    moving = warp_image(torch.from_numpy(img)[None, None], aff, shape, aff,
                        AffineTransform(torch.from_numpy(np.linalg.inv(moved))[None]))[0, 0].numpy()
    probe = torch.from_numpy(world_points(shape, aff)[img > 0.1].reshape(1, -1, 3))  # the blobs
    start = AffineTransform(torch.eye(4, dtype=torch.float64)[None])
    mapped = {}
    for name in ("working", "full"):
        if name == "full":
            monkeypatch.setattr(run, "working_grid", lambda shape, affine, spacing: (tuple(shape), affine))
        res = refine_transform(make_volume(img, aff), make_volume(moving, aff), start, stage="affine")
        assert not res.kept_start
        mapped[name] = res.transform.map_points(probe)
        err = (mapped[name] - (probe + torch.from_numpy(shift))).norm(dim=-1).median()
        assert float(err) < 1.0 < float(np.linalg.norm(shift)), (name, float(err))
    assert float((mapped["working"] - mapped["full"]).norm(dim=-1).median()) < 0.25


def test_adam_matches_torch_adam_with_a_linear_decay():
    """The written-out Adam (no torch.optim import at run time) takes torch.optim.Adam's steps."""
    from keyreg.refine.optimize import _Adam

    target = torch.linspace(-2, 3, 12).reshape(3, 4)
    sched = lambda k: 1.0 - 0.9 * min(k / 10, 1.0)  # noqa: E731
    a = torch.zeros(3, 4, requires_grad=True)
    b = torch.zeros(3, 4, requires_grad=True)
    ours = _Adam([a], lr=0.3, schedule=sched)
    ref = torch.optim.Adam([b], lr=0.3)
    ref_sched = torch.optim.lr_scheduler.LambdaLR(ref, sched)
    for _ in range(15):
        for p, opt in ((a, ours), (b, ref)):
            opt.zero_grad()
            ((p - target) ** 4).sum().backward()
            opt.step()
        ref_sched.step()
    torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)


def test_levels_stop_early_once_converged():
    """The convergence rule (windows of ``patience`` similarity values), and levels after the first
    stopping early on an identity pair while the first level runs all its iterations."""
    from keyreg.refine.optimize import _Stopping

    def stops_at(values, patience=3, tolerance=1e-3):
        rule = _Stopping(patience, tolerance)
        return next((k + 1 for k, v in enumerate(values) if rule.converged(v)), None)

    assert stops_at([1.0 - 0.01 * k for k in range(30)]) is None  # steady 1 %/step progress: runs on
    assert stops_at([0.5] * 30) == 6  # flat: stops after two windows
    assert stops_at([0.5, 0.48, 0.46, 0.45, 0.45, 0.45, 0.45, 0.45, 0.45, 0.45]) == 9  # converged after a fall
    assert stops_at([0.5] * 30, patience=0) is None
    assert stops_at([0.5, float("nan"), 0.5, 0.5, 0.5, 0.5]) == 6  # a NaN is never progress

    # a known smooth deformation: the second level converges before its 20 iterations, the first runs all
    aff = _affine()
    img = torch.from_numpy(_image(aff))[None, None]
    v_true = _smooth_velocity(SHAPE, aff, 4.0)
    moving = warp_image(img, aff, SHAPE, aff, DisplacementField(integrate_velocity(-v_true, aff), aff))
    full = optimize_velocity(img, moving, aff, DeformableConfig(spacing_mm=3.0, iterations=(20, 20), patience=0))
    assert [len(h) for h in full.history] == [20, 20] and full.iterations == 40
    early = optimize_velocity(img, moving, aff, DeformableConfig(spacing_mm=3.0, iterations=(20, 20), patience=4,
                                                                tolerance=1e-3))
    assert len(early.history[0]) == 20 and 8 <= len(early.history[1]) < 20
    assert early.iterations == sum(len(h) for h in early.history)
    assert early.loss_end < 0.7 * early.loss_start and early.loss_end < full.loss_end + 0.002


def _refined(aff, seed_amp=3.0):
    start = np.eye(4)
    start[:3, :3] = rotation([0, 0, 1], 4.0)
    start[:3, 3] = [2.0, -1.5, 1.0]
    v = _smooth_velocity(SHAPE, aff, seed_amp)
    u, ui = integrate_velocity(v, aff), integrate_velocity(-v, aff)
    corr = np.eye(4)
    corr[:3, 3] = [0.5, 0.0, -0.5]
    return RefinedTransform(AffineTransform(torch.from_numpy(start)[None]), corr, DisplacementField(u, aff),
                            DisplacementField(ui, aff))


def test_full_inverse_composes_to_identity():
    """T(T^-1(q)) = q within 0.15 mm on the interior of the moving grid (affine start + diffeomorphism)."""
    aff = _affine()
    t = _refined(aff)
    moving = make_volume(np.zeros(SHAPE, np.float32), aff)
    inv = inverse_field(t, moving)
    q = torch.from_numpy(world_points(SHAPE, aff)).reshape(1, -1, 3)
    p = inv.map_points(q.float()).double()
    back = t.map_points(p.float()).double()
    err = (back - q).norm(dim=-1).reshape(SHAPE)[5:-5, 5:-5, 5:-5]
    assert float(err.max()) < 0.15


def test_exported_field_agrees_with_simpleitk(tmp_path):
    """warp.nii.gz of a refined transform, read by SimpleITK's DisplacementFieldTransform, resamples the
    moving image like keyreg does (same grid, trilinear)."""
    sitk = pytest.importorskip("SimpleITK")
    import nibabel as nib

    aff = _affine()
    t = _refined(aff)
    moving = _image(aff)
    full = sample_field(t, SHAPE, aff, stride=1)
    disp = full.displacement[0].permute(1, 2, 3, 0).numpy()
    write_displacement_field(tmp_path / "warp.nii.gz", disp, aff)
    img = nib.Nifti1Image(moving, aff)
    img.set_qform(aff, code=1)
    img.set_sform(aff, code=1)
    nib.save(img, str(tmp_path / "moving.nii.gz"))
    ours = warp_image(torch.from_numpy(moving)[None, None], aff, SHAPE, aff, t)[0, 0].numpy()
    field_img = sitk.Cast(sitk.ReadImage(str(tmp_path / "warp.nii.gz")), sitk.sitkVectorFloat64)
    m = sitk.ReadImage(str(tmp_path / "moving.nii.gz"))
    ref = sitk.Resample(m, m, sitk.DisplacementFieldTransform(field_img), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    ref = sitk.GetArrayFromImage(ref).transpose(2, 1, 0)
    inner = (slice(3, -3),) * 3
    assert np.abs(ours - ref)[inner].max() < 2e-3 * float(np.ptp(moving))


def test_nmi_and_safeguard_verdict():
    from keyreg.refine import normalized_mutual_information, safeguard_verdict

    a = torch.from_numpy(_image(_affine()))[None, None]
    assert normalized_mutual_information(a, a) == pytest.approx(2.0)
    assert normalized_mutual_information(a, 1.0 - a) == pytest.approx(2.0)  # any one-to-one intensity map
    shifted = torch.roll(a, 4, dims=2)
    assert 1.0 <= normalized_mutual_information(a, shifted) < normalized_mutual_information(a, a) - 0.05
    noise = torch.rand(a.shape, generator=torch.Generator().manual_seed(0))
    assert normalized_mutual_information(a, noise) < normalized_mutual_information(a, shifted)
    mask = torch.zeros_like(a)
    mask[..., :1, :1, :1] = 1
    assert normalized_mutual_information(a, noise, mask) == 1.0  # a single voxel: nothing to measure
    good, bad = {"dissimilarity": 0.2, "nmi": 1.3}, {"dissimilarity": 0.3, "nmi": 1.2}
    assert safeguard_verdict(bad, good) == (False, "")
    keep, why = safeguard_verdict(good, bad, similarity="mind")
    assert keep and "mind dissimilarity" in why and "NMI" in why
    # the independent measure alone vetoes; a tolerance lets a small NMI fall pass
    keep, why = safeguard_verdict(good, {"dissimilarity": 0.1, "nmi": 1.29})
    assert keep and why.startswith("NMI")
    assert not safeguard_verdict(good, {"dissimilarity": 0.1, "nmi": 1.29}, nmi_tolerance=0.02)[0]
    assert safeguard_verdict(good, {"dissimilarity": float("nan"), "nmi": 1.4})[0]
    # an LNCC refinement must not raise the MIND-SSC dissimilarity either (LNCC across two contrasts)
    lncc_start, lncc_end = {**good, "mind": 0.063}, {"dissimilarity": 0.1, "nmi": 1.35, "mind": 0.088}
    keep, why = safeguard_verdict(lncc_start, lncc_end, similarity="lncc")
    assert keep and why.startswith("MIND-SSC dissimilarity 0.08800 > start 0.06300")
    assert safeguard_verdict(lncc_start, {**lncc_end, "mind": 0.05}, similarity="lncc") == (False, "")


def test_lncc_refinement_is_measured_with_mind_too():
    """The safeguard's measures of a deformable LNCC refinement carry the MIND-SSC dissimilarity (equal
    to what a MIND refinement optimises on the same grid); a MIND refinement's carry none extra."""
    from keyreg.refine.run import _Measures

    aff = _affine()
    fixed = torch.from_numpy(_image(aff))[None, None]
    moving = torch.roll(fixed, 2, dims=3)
    by_lncc = _Measures(fixed, None, aff, 3.0, "lncc")(moving)
    by_mind = _Measures(fixed, None, aff, 3.0, "mind")(moving)
    assert set(by_lncc) == {"dissimilarity", "nmi", "mind"} and set(by_mind) == {"dissimilarity", "nmi"}
    assert by_lncc["mind"] == pytest.approx(by_mind["dissimilarity"]) and by_lncc["nmi"] == by_mind["nmi"]


def _failing_affine(monkeypatch, shift_mm=(6.0, -5.0, 4.0)):
    """Make the affine refinement fail: it returns a large wrong translation instead of its optimum
    (the affine stage is judged on its optimiser's own loss and on the NMI, the deformable one on dense measures)."""
    import keyreg.refine.run as run_module
    from keyreg.refine.optimize import AffineOutcome

    def broken(*args, **kwargs):
        m = np.eye(4)
        m[:3, 3] = shift_mm
        return AffineOutcome(m, 0.10, 0.12, 1, False)  # and says its loss rose

    monkeypatch.setattr(run_module, "optimize_affine", broken)


@pytest.mark.parametrize("stage", ["affine", "deformable"])
def test_safeguard_keeps_the_start_of_a_failed_refinement(monkeypatch, stage):
    """A refinement made to fail (a wrong affine correction) is caught from the images alone: the
    start is kept and the report says why, with the Dice change when segmentations are given."""
    aff = _affine()
    img = _image(aff)
    seg = (img > 0.4).astype(np.int16)
    start = AffineTransform(torch.eye(4, dtype=torch.float64)[None])
    _failing_affine(monkeypatch)
    res = refine_transform(make_volume(img, aff), make_volume(img, aff), start, stage=stage,
                           options=RefineOptions(similarity="mind", iterations=(2,)),
                           fixed_seg=make_volume(seg, aff, kind="labels"),
                           moving_seg=make_volume(seg, aff, kind="labels"))
    assert res.kept_start and res.transform is start
    rep = res.report
    assert rep["kept_start"] and "dissimilarity" in rep["reason"] and "NMI" in rep["reason"]
    assert rep["nmi_end"] < rep["nmi_start"] and rep["similarity_end"] > rep["similarity_start"]
    assert rep["dice_start"] == pytest.approx(1.0) and rep["dice_change"] < -0.01
    assert rep["dice_drop_missed"] is False  # caught, so not missed


def test_safeguard_without_segmentations_and_a_mask(monkeypatch):
    """No segmentations: the images alone decide; the mask limits the measures; a good refinement
    is accepted."""
    pair = _shifted_pair()
    start = AffineTransform(torch.eye(4, dtype=torch.float64)[None])
    mask = make_volume((pair["fixed"].data > 0.1).astype(np.uint8), pair["fixed"].affine, kind="labels")
    ok = refine_transform(pair["fixed"], pair["moving"], start, stage="affine", fixed_mask=mask,
                          options=RefineOptions(similarity="lncc"))
    assert not ok.kept_start and "dice_start" not in ok.report and "reason" not in ok.report
    assert ok.report["nmi_end"] > ok.report["nmi_start"]
    _failing_affine(monkeypatch, (-8.0, 6.0, 0.0))
    bad = refine_transform(pair["fixed"], pair["moving"], start, stage="affine", fixed_mask=mask,
                           options=RefineOptions(similarity="lncc"))
    assert bad.kept_start and bad.transform is start and "lncc dissimilarity" in bad.report["reason"]


def test_bad_options_and_mask():
    aff = _affine()
    img = make_volume(_image(aff), aff)
    start = AffineTransform(torch.eye(4, dtype=torch.float64)[None])
    with pytest.raises(ConfigError):
        refine_transform(img, img, start, options=RefineOptions(similarity="mi"))
    with pytest.raises(ConfigError):
        refine_transform(img, img, start, stage="bspline")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        refine_transform(img, img, start, options=RefineOptions(seconds=0))
    with pytest.raises(ConfigError):
        refine_transform(img, img, start, options=RefineOptions(nmi_tolerance=-0.1))
    bad_mask = make_volume(np.ones((5, 5, 5), np.uint8), np.eye(4), kind="labels")
    with pytest.raises(ImageContentError):
        refine_transform(img, img, start, fixed_mask=bad_mask)


def _shifted_pair(tmp_path=None):
    """A fixed image, the same content 2 mm away in the moving image, keypoints half-way: an
    affine/TPS start that refinement must finish."""
    from keyreg.keypoints import ImageKeypoints

    aff = _affine()
    fixed = _image(aff)
    shift = np.eye(4)
    shift[:3, 3] = [2.0, -1.0, 1.5]
    moving_aff = shift @ aff
    pts = world_points(SHAPE, aff)[::7, ::7, ::6].reshape(-1, 3)
    kf = ImageKeypoints(torch.as_tensor(pts), torch.ones(len(pts)), aff, SHAPE)
    km = ImageKeypoints(torch.as_tensor(pts + shift[:3, 3] * 0.5), torch.ones(len(pts)), aff, SHAPE)
    seg = (fixed > 0.4).astype(np.int16)
    return dict(moving=make_volume(fixed, moving_aff, "moving"), fixed=make_volume(fixed, aff, "fixed"),
                fixed_kp=kf, moving_kp=km, moving_seg=make_volume(seg, moving_aff, kind="labels"),
                fixed_seg=make_volume(seg, aff, kind="labels"))


def test_refine_stage_of_the_pipeline_outputs_and_apply(tmp_path):
    """The Registrar's refine stage from a keypoint TPS and affine: <align>+<stage> results measured and
    saved like keypoint aligns; files that `keyreg apply` reads (the align directory's warp.nii.gz);
    an inverse that undoes the forward."""
    from keyreg.apply import apply_transform
    from keyreg.formats import read_displacement_field
    from keyreg.pipeline import Registrar
    from keyreg.refine import RefinedAlignment, refine_registration

    pair = _shifted_pair()
    registrar = Registrar(aligns=["affine", "tps_1"], device="cpu", refine=("deformable",), refine_iterations=(10, 10))
    reg = registrar.register_keypoints(pair["moving"], pair["fixed"], pair["fixed_kp"], pair["moving_kp"],
                                       moving_seg=pair["moving_seg"], fixed_seg=pair["fixed_seg"])
    assert list(reg.results) == ["affine", "tps_1", "affine+deformable", "tps_1+deformable"]
    assert "refine" in registrar.timer.seconds
    metrics = registrar.measure(reg, ["mse", "harddice", "jdlessthan0"])
    ra = reg["affine+deformable"]
    assert isinstance(ra, RefinedAlignment) and ra.warped is not None and ra.warped_seg is not None
    assert metrics["affine+deformable"]["jdlessthan0"] == 0.0
    assert metrics["affine+deformable"]["refine_kept_start"] in (0, 1)
    assert "refine_kept_start" not in metrics["affine"]
    report = ra.result.report
    assert report["dice_end"] >= report["dice_start"] - 0.01 and not report["dice_drop_missed"]
    assert metrics["affine+deformable"]["harddice"] >= metrics["affine"]["harddice"] - 0.01
    files = registrar.save(reg, tmp_path)
    d = tmp_path / "affine+deformable"
    for name in ("warp.nii.gz", "inverse_warp.nii.gz", "refine.json", "warped.nii.gz", "warped_seg.nii.gz",
                 "keypoints_aligned.csv"):
        assert (d / name).is_file(), name
    assert files["affine+deformable/warp"] == d / "warp.nii.gz"
    u, a = read_displacement_field(d / "warp.nii.gz")
    assert u.shape == (*SHAPE, 3) and np.allclose(a, pair["fixed"].affine)
    # keyreg apply with the align directory gives the saved warped image
    applied = apply_transform(pair["moving"], [d])
    assert np.abs(applied.data - ra.warped.data).max() < 1e-3
    # the inverse field maps the moving grid back: T(T^-1(q)) = q inside
    w, wa = read_displacement_field(d / "inverse_warp.nii.gz")
    moving_aff = pair["moving"].affine
    assert np.allclose(wa, moving_aff)
    q = torch.from_numpy(world_points(SHAPE, moving_aff)).reshape(1, -1, 3)
    p = q + torch.from_numpy(w).reshape(1, -1, 3).double()
    back = ra.transform.map_points(p.float()).double()
    err = (back - q).norm(dim=-1).reshape(SHAPE)[6:-6, 6:-6, 6:-6]
    assert float(err.max()) < 0.2
    # called directly, refine_registration refines the keypoint aligns only and adds nothing to reg
    direct = refine_registration(reg, "affine", aligns=["affine"], options=RefineOptions(iterations=(2,)))
    assert set(direct) == {"affine+affine"} and "affine+affine" not in reg.results


def test_refine_stage_keeps_a_linear_result_linear_and_a_rejected_start(tmp_path, monkeypatch):
    """An affine refinement of an affine start is a matrix (written in every linear format, and
    warp.nii.gz); a refinement the safeguard rejects keeps its start, and says so; a Dice drop the
    images cannot see is reported, not acted on."""
    import json

    from keyreg.pipeline import Registrar

    pair = _shifted_pair()
    registrar = Registrar(aligns=["affine"], device="cpu", refine=("affine",))
    reg = registrar.register_keypoints(pair["moving"], pair["fixed"], pair["fixed_kp"], pair["moving_kp"],
                                       moving_seg=pair["moving_seg"], fixed_seg=pair["fixed_seg"])
    ra = reg["affine+affine"]
    assert ra.matrix is not None and isinstance(ra.dense_transform(), AffineTransform)
    registrar.save(reg, tmp_path)
    for name in ("transform_matrix.txt", "transform.tfm", "warp.nii.gz", "inverse_warp.nii.gz", "refine.json"):
        assert (tmp_path / "affine+affine" / name).is_file(), name
    # segmentations that agree at the start while the images are 3 mm apart: the refinement follows
    # the images (they improve), Dice falls; the images decide, the drop is reported
    moved = make_volume(np.roll(pair["fixed"].data, 1, axis=0), pair["fixed"].affine, "moved")  # 3 mm voxels
    reg = registrar.register_keypoints(moved, pair["fixed"], pair["fixed_kp"], pair["fixed_kp"],
                                       moving_seg=pair["fixed_seg"], fixed_seg=pair["fixed_seg"])
    followed = reg["affine+affine"]
    assert not followed.kept_start and followed.result.report["dice_drop_missed"] is True
    registrar.measure(reg, ["harddice"])
    assert "not caught" in followed.metrics["refine_safeguard"]
    # a refinement made to fail: the start is kept, in the metrics and refine.json
    _failing_affine(monkeypatch)
    reg = registrar.register_keypoints(pair["moving"], pair["fixed"], pair["fixed_kp"], pair["moving_kp"],
                                       moving_seg=pair["moving_seg"], fixed_seg=pair["fixed_seg"])
    kept = reg["affine+affine"]
    assert kept.kept_start and kept.transform is reg["affine"].transform
    registrar.measure(reg, ["harddice"])
    assert kept.metrics["refine_kept_start"] == 1
    assert kept.metrics["refine_safeguard"].startswith("start kept: ")
    assert kept.metrics["harddice"] == pytest.approx(reg["affine"].metrics["harddice"])
    registrar.save(reg, tmp_path / "kept")
    doc = json.loads((tmp_path / "kept" / "affine+affine" / "refine.json").read_text())
    assert doc["kept_start"] is True and "NMI" in doc["report"]["reason"]
    assert doc["metrics"]["refine_safeguard"].startswith("start kept: ")
    assert (tmp_path / "kept" / "affine+affine" / "inverse_warp.nii.gz").is_file()
