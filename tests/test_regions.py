"""Anatomical keypoints: region definitions, their consistency under affine maps, the model config
that carries them, and the orientation search's geometry."""

import json
import zlib

import numpy as np
import pytest
import torch

from keyreg.errors import ConfigError
from keyreg.geometry import rotation_about
from keyreg.models.inference import (_trimmed_similarity, cube_rotations, detect_image_keypoints,
                                     fit_similarity)
from keyreg.models.regions import RegionAtlas, build_atlas


def _map(shift: int) -> np.ndarray:
    lab = np.zeros((40, 36, 32), np.int16)
    lab[4:36, 4:32, 4:28] = 507
    lab[7:33, 7:29, 6:26] = 24
    lab[9:31 - shift, 9:27, 8:24] = 3
    lab[9:20, 11:25, 10:22] = 2
    lab[20:31 - shift, 11:25, 10:22] = 41
    lab[14:18 + shift, 15:20, 14:18] = 4
    lab[22:26, 15:19 + shift, 12:16] = 17
    return lab


AFF = np.array([[-1.0, 0, 0, 20], [0, 0, 1.0, -16], [0, -1.0, 0, 18], [0, 0, 0, 1]])  # LIA, 1 mm


@pytest.fixture(scope="module")
def atlas():
    maps = [(_map(s), AFF) for s in range(3)]
    atlas, stats = build_atlas(maps, {(3,): 4, (507,): 3}, min_voxels_mm3=10)
    return atlas, stats


def test_build_atlas_names_and_template(atlas):
    a, stats = atlas
    names = a.names
    assert len(names) == len(set(names)) == stats["num_regions"] == stats["num_whole"] + stats["num_sub"]
    assert stats["num_sub"] == 7
    assert "Left-Hippocampus" in names and "Left-Lateral-Ventricle" in names
    assert sum(n.startswith("Left-Cerebral-Cortex/") for n in names) == 4
    assert a.template.shape == (len(a), 3) and np.isfinite(a.template).all()
    # every voxel of a split structure belongs to exactly one of its sub-regions
    rmap = a.region_map(_map(0), AFF)
    cortex = [k + 1 for k, r in enumerate(a.regions) if r.labels == (3,)]
    assert set(np.unique(rmap[_map(0) == 3])) <= set(cortex)
    assert len(set(np.unique(rmap[_map(0) == 3]))) == 4
    assert (rmap[_map(0) == 0] == 0).all()


def test_regions_follow_an_affine_change_of_world(atlas):
    """The same label map under another world frame (rotation, scaling, translation of its header)
    gets the same sub-regions, and its centroids move exactly with the frame."""
    a, _ = atlas
    p = np.eye(4)
    p[:3, :3] = rotation_about([0.3, -0.5, 0.8], 70.0) * 1.1
    p[:3, 3] = [12.0, -30.0, 5.0]
    lab = _map(1)
    assert np.array_equal(a.region_map(lab, AFF), a.region_map(lab, p @ AFF))
    c0, n0 = a.centroids(lab, AFF)
    c1, n1 = a.centroids(lab, p @ AFF)
    assert np.array_equal(n0, n1)
    np.testing.assert_allclose(c1, c0 @ p[:3, :3].T + p[:3, 3], atol=1e-6)


def test_atlas_json_round_trip_and_model_config(atlas):
    from keyreg.models import ArchitectureConfig, ModelConfig

    a, _ = atlas
    again = RegionAtlas.from_dict(json.loads(json.dumps(a.to_dict())))
    assert again.names == a.names
    np.testing.assert_allclose(again.template, a.template, atol=1e-3)
    cfg = ModelConfig("m", ArchitectureConfig("truncatedunet", len(a), num_levels=3, num_truncated=1, f_maps=8),
                      regions=a, orientation_search=True)
    back = ModelConfig.from_dict(json.loads(cfg.to_json()))
    assert back.keypoint_names == a.names and back.orientation_search
    assert ModelConfig("m", ArchitectureConfig("conv", 8)).keypoint_names is None
    bad = json.loads(cfg.to_json())
    bad["architecture"]["num_keypoints"] = len(a) + 1
    with pytest.raises(ConfigError, match="regions"):
        ModelConfig.from_dict(bad)
    bad = json.loads(cfg.to_json())
    bad["regions"]["template"] = [[0, 0, "x"]]
    with pytest.raises(ConfigError, match="regions"):
        ModelConfig.from_dict(bad)


def test_cube_rotations_form_the_group():
    rots = cube_rotations()
    assert rots.shape == (24, 3, 3)
    np.testing.assert_allclose(np.linalg.det(rots), 1.0)
    keys = {tuple(np.rint(r).astype(int).ravel()) for r in rots}
    assert len(keys) == 24
    assert all(tuple(np.rint(a @ b).astype(int).ravel()) in keys for a in rots[:6] for b in rots)


def test_similarity_fit_and_trimmed_fit_with_outliers():
    rng = np.random.default_rng(0)
    src = rng.normal(scale=40, size=(60, 3))
    true = np.eye(4)
    true[:3, :3] = rotation_about([1, 2, 3], 130.0) * 1.2
    true[:3, 3] = [5, -7, 9]
    dst = src @ true[:3, :3].T + true[:3, 3]
    np.testing.assert_allclose(fit_similarity(src, dst), true, atol=1e-9)
    bad = dst.copy()
    bad[:18] += rng.normal(scale=60, size=(18, 3))  # 30 % outliers
    mat, res = _trimmed_similarity(src, bad)
    np.testing.assert_allclose(mat, true, atol=1e-6)
    assert (res[18:] < 1e-6).all() and (res[:18] > 1).sum() >= 15


def test_pose_hypotheses_are_distinct_good_looks():
    from keyreg.models.inference import _hypotheses

    rng = np.random.default_rng(3)
    template = rng.normal(scale=40, size=(60, 3))
    turned = [rotation_about([0, 0, 1], a)[:3, :3] for a in (0, 10, 180, 90)]
    noise = [0.3, 0.8, 1.0, 8.0]  # two looks of one pose, a distinct pose that fits as well, a poor look
    looks = [template @ r.T + rng.normal(scale=n, size=template.shape) for r, n in zip(turned, noise)]
    kept = _hypotheses(looks, template)
    assert len(kept) == 2 and kept[0] is looks[0] and kept[1] is looks[2]
    assert len(_hypotheses(looks, template, max_count=1)) == 1


class _FakeRunner:
    """Network stand-in: keypoints at fixed world places (``follows_anatomy``) or a layout drawn in the
    grid's own frame (a network reading any head as upright)."""

    def __init__(self, model, points, follows_anatomy):
        self.model, self.shape, self.points, self.follows = model, (8, 8, 8), points, follows_anatomy

    def grid(self, rotation, center):
        from keyreg.models.inference import _Runner

        return _Runner.grid(self, rotation, center)

    def run(self, grids):
        if self.follows:
            return [(self.points.copy(), None) for _ in grids]
        vs = np.asarray(self.model.config.preprocessing.grid.voxel_size)
        return [(self.points @ (g[:3, :3] / vs).T, None) for g in grids]


def test_drift_tells_anatomy_from_a_layout_drawn_in_the_grid(atlas):
    from conftest import tiny_model

    from keyreg.models.inference import _drift

    model = tiny_model(num_keypoints=len(atlas))
    rng = np.random.default_rng(4)
    pts = rng.normal(scale=50, size=(len(atlas), 3))
    for follows, lo, hi in ((True, 0.0, 1e-9), (False, 20.0, 80.0)):
        runner = _FakeRunner(model, pts, follows)
        grid = runner.grid(np.eye(3), np.zeros(3))
        assert lo <= _drift(runner, grid, pts) <= hi


class _TurnedHead:
    """Network stand-in for a head whose pose (``world_from_template`` rotation) is ``pose``: a grid
    within ``good_degrees`` of the pose reads the keypoints where they are (0.5 mm noise); a grid
    turned further reads the head as upright in its own frame (the layout drawn in the grid's axes,
    2 mm noise).  The noise is a function of the grid, so the same grid always gives the same reading."""

    def __init__(self, model, template, pose, good_degrees=70.0):
        self.model, self.shape, self.template, self.pose = model, (8, 8, 8), template, pose
        self.good_degrees = good_degrees
        self.truth = template @ pose.T
        self.base = self.grid(np.eye(3), np.zeros(3))
        self.passes = 0

    def grid(self, rotation, center):
        from keyreg.models.inference import _Runner

        return _Runner.grid(self, rotation, center)

    def run(self, grids):
        from keyreg.models.inference import _angle

        vs = np.asarray(self.model.config.preprocessing.grid.voxel_size)
        out = []
        for g in grids:
            self.passes += 1
            rot = g[:3, :3] / vs
            rng = np.random.default_rng(zlib.crc32(np.round(g, 6).tobytes()))
            good = _angle(rot, self.pose) <= self.good_degrees
            pts = self.truth if good else self.template @ rot.T
            out.append((pts + rng.normal(scale=0.5 if good else 2.0, size=pts.shape), np.ones(len(pts))))
        return out


def test_auto_search_looks_at_half_turns_first_and_stops_at_a_checked_pose(atlas):
    """A head turned by ~180° fails the upright reading; ``auto`` then looks at the 9 half turns
    first and stops when the best of them passes the checks (4 + 9 + 2 passes instead of 24 looks),
    with the keypoints ``always`` finds."""
    from conftest import tiny_model

    from keyreg.models.inference import _detection_steps, _drive, search_stages

    stages = search_stages()
    assert [len(s) for s in stages] == [9, 8, 7] and sorted(sum(stages, [])) == list(range(24))
    a, _ = atlas
    model = tiny_model(num_keypoints=len(a))
    model.config.regions = a
    template = 10 * (a.template - a.template.mean(0))  # a head-sized layout (the atlas is a toy's)
    pose = rotation_about([0, 0, 1], 180.0)[:3, :3] @ rotation_about([1, 1, 0], 12.0)[:3, :3]
    found = {}
    for mode in ("auto", "always"):
        head = _TurnedHead(model, template, pose)
        found[mode] = _drive(_detection_steps(head, mode), head.run)
        assert found[mode].searched and found[mode].passes == head.passes
        err = np.linalg.norm(found[mode].points.numpy() - head.truth, axis=1)
        assert np.median(err) < 1.5  # the right pose (a wrong one is off by ~ the head's size)
    assert found["auto"].passes <= 4 + 9 + 2 + 1 and found["always"].passes >= 25
    assert found["auto"].info["looks"] == 9
    np.testing.assert_allclose(found["auto"].points.numpy(), found["always"].points.numpy(), atol=1e-9)
    # a head turned by a quarter turn only: the half turns do not hold its pose, the later stages do
    # good readings within 45° only: the exact look alone (the other cube turns are >= 90° away)
    head = _TurnedHead(model, template, rotation_about([1, 0, 0], 90.0)[:3, :3], good_degrees=45.0)
    det = _drive(_detection_steps(head, "auto"), head.run)
    assert det.searched and det.info["looks"] > 9
    assert np.median(np.linalg.norm(det.points.numpy() - head.truth, axis=1)) < 1.5


def test_check_view_ensemble_averages_the_check_pass_it_already_read(atlas):
    """``check_view_ensemble``: the keypoints are the mean of the chosen canonical reading and its
    check pass's (the grid turned by 40°), which is always read (its drift is reported): no extra
    pass, the same pose, in either mode."""
    from conftest import tiny_model

    from keyreg.models.detector import ModelConfig
    from keyreg.models.inference import _detection_steps, _drift_steps, _drive

    a, _ = atlas
    model = tiny_model(num_keypoints=len(a))
    model.config.regions = a
    template = 10 * (a.template - a.template.mean(0))
    pose = rotation_about([1, 1, 0], 12.0)[:3, :3]
    found = {}
    for on in (False, True):
        model.config.check_view_ensemble = on
        for mode in ("auto", "always"):
            head = _TurnedHead(model, template, pose)
            found[on, mode] = _drive(_detection_steps(head, mode), head.run)
            assert found[on, mode].passes == head.passes
    single, ens = found[False, "auto"], found[True, "auto"]
    assert ens.passes == single.passes and ens.info["readings"] == 2 and single.info["readings"] == 1
    np.testing.assert_array_equal(ens.world_from_net, single.world_from_net)
    head = _TurnedHead(model, template, pose)
    check = _drive(_drift_steps(head, single.world_from_net, single.points.numpy()), head.run)
    assert check.drift_mm < 5.0
    np.testing.assert_allclose(ens.points.numpy(), (single.points.numpy() + check.points) / 2, atol=1e-12)
    # always: the hypotheses' check passes were read to choose among them; a single one gets its own
    always = found[False, "always"]
    assert found[True, "always"].passes == always.passes and always.drift_mm is not None
    assert found[True, "always"].info["readings"] == 2
    # the setting travels in the JSON config and is checked there; off, it is not written
    d = model.config.to_dict()
    assert d["check_view_ensemble"] is True and ModelConfig.from_dict(d).check_view_ensemble
    model.config.check_view_ensemble = False
    assert "check_view_ensemble" not in model.config.to_dict()
    with pytest.raises(ConfigError, match="check_view_ensemble"):
        ModelConfig.from_dict({**d, "check_view_ensemble": "yes"})


def test_shift_ensemble_averages_the_chosen_reading_with_four_shifted_ones(atlas):
    """``shift_ensemble_voxels``: four more passes on the chosen canonical grid moved by +-v network
    voxels along its own axes (tetrahedron signs, centred on the grid), and the keypoints are the mean
    of the five readings: per-reading noise averages out, the pose search is unchanged."""
    from conftest import tiny_model

    from keyreg.models.detector import ModelConfig
    from keyreg.models.inference import _detection_steps, _drive, shifted_grids

    grid = np.eye(4)
    grid[:3, :3] = rotation_about([1, 2, 3], 30.0)[:3, :3] @ np.diag([4.0, 4.0, 2.0])
    grid[:3, 3] = [5.0, -7.0, 11.0]
    shifted = shifted_grids(grid, 1.0)
    assert shifted_grids(grid, 0.0) == [] and len(shifted) == 4
    steps = np.array([np.linalg.solve(grid[:3, :3], g[:3, 3] - grid[:3, 3]) for g in shifted])
    np.testing.assert_allclose(np.abs(steps), 1.0, atol=1e-12)  # one voxel along every grid axis
    np.testing.assert_allclose(steps.sum(0), 0.0, atol=1e-12)  # centred on the grid
    assert all(np.array_equal(g[:3, :3], grid[:3, :3]) for g in shifted)

    a, _ = atlas
    model = tiny_model(num_keypoints=len(a))
    model.config.regions = a
    template = 10 * (a.template - a.template.mean(0))
    pose = rotation_about([1, 1, 0], 12.0)[:3, :3]
    head = _TurnedHead(model, template, pose)
    single = _drive(_detection_steps(head, "auto"), head.run)
    model.config.shift_ensemble_voxels = 1.0
    head = _TurnedHead(model, template, pose)
    ens = _drive(_detection_steps(head, "auto"), head.run)
    assert ens.passes == single.passes + 4 == head.passes
    np.testing.assert_array_equal(ens.world_from_net, single.world_from_net)
    readings = [single.points.numpy()] + [p for p, _ in head.run(shifted_grids(single.world_from_net, 1.0))]
    np.testing.assert_allclose(ens.points.numpy(), np.mean(readings, 0), atol=1e-12)
    err = lambda det: np.median(np.linalg.norm(det.points.numpy() - head.truth, axis=1))  # noqa: E731
    assert err(ens) < 0.7 * err(single)
    # the setting travels in the JSON config and is checked there
    d = model.config.to_dict()
    assert d["shift_ensemble_voxels"] == 1.0
    assert ModelConfig.from_dict(d).shift_ensemble_voxels == 1.0
    with pytest.raises(ConfigError, match="shift_ensemble_voxels"):
        ModelConfig.from_dict({**d, "shift_ensemble_voxels": -1})


def test_orientation_search_runs_on_an_anatomical_model(atlas):
    from conftest import tiny_model

    from keyreg.io import Volume

    a, _ = atlas
    model = tiny_model(num_keypoints=len(a))
    vol = Volume(_map(0).astype(np.float32), AFF, name="img")
    plain = detect_image_keypoints(model, vol)
    assert plain.passes == 1 and plain.points.shape == (len(a), 3)
    model.config.regions, model.config.orientation_search = a, True
    det = detect_image_keypoints(model, vol)
    # auto: upright reading (1 look, 1-2 canonical, 1 check), the search only when that does not hold
    assert 3 <= det.passes <= 4 + 33 and det.points.shape == (len(a), 3)
    assert torch.isfinite(det.points).all() and det.template_residual_mm.shape == (len(a),)
    assert det.searched == (det.passes > 4)
    always = detect_image_keypoints(model, vol, search="always")
    assert 25 <= always.passes <= 33 and always.searched  # 24 looks; per hypothesis (<= 3) 1-2 canonical passes + a check
    assert detect_image_keypoints(model, vol, search=False).passes == 1


def test_images_detected_in_lockstep_equal_each_alone(atlas):
    """Several images detected together (their network passes batched) give exactly the keypoints
    each gives alone, for the search and for plain one-pass models: an image's result does not
    depend on what it is run with (KeypointDetector.infer)."""
    from conftest import tiny_model

    from keyreg.io import Volume
    from keyreg.keypoints import detect_keypoints
    from keyreg.models.inference import detect_images_keypoints

    a, _ = atlas
    model = tiny_model(num_keypoints=len(a))
    vols = [Volume(_map(s).astype(np.float32) * (1 + 0.3 * s), AFF, name=f"img{s}") for s in (0, 2, 3)]
    plain = [detect_keypoints(model, [v])[0].points for v in vols]
    batched = detect_keypoints(model, vols, batch_size=3)
    assert all(torch.equal(p, b.points) for p, b in zip(plain, batched))
    model.config.regions, model.config.orientation_search = a, "always"
    alone = [detect_image_keypoints(model, v) for v in vols]
    together = detect_images_keypoints(model, vols)
    for x, y in zip(alone, together):
        assert torch.equal(x.points, y.points) and torch.equal(x.mass, y.mass) and x.passes == y.passes
        assert np.array_equal(x.world_from_net, y.world_from_net)


def test_identity_kept_for_an_aligned_pair_and_not_for_a_moved_one():
    from keyreg.transforms import AlignSpec, fit_transform, keep_identity_if_aligned

    rng = np.random.default_rng(1)
    pf = torch.from_numpy(rng.normal(scale=40, size=(1, 100, 3)))
    noisy = pf + torch.from_numpy(rng.normal(scale=1.5, size=pf.shape))  # same anatomy, detection noise
    specs = [AlignSpec("rigid"), AlignSpec("affine"), AlignSpec("tps", 1.0)]
    center, scale = torch.zeros(3, dtype=torch.float64), 100.0
    fits = {s.name: fit_transform(s, pf, noisy, center=center, scale=scale) for s in specs}
    kept = keep_identity_if_aligned(fits, pf, noisy)
    probe = torch.from_numpy(rng.normal(scale=50, size=(1, 20, 3)))
    for name, tr in kept.items():
        torch.testing.assert_close(tr.map_points(probe), probe, atol=1e-9, rtol=0)
    assert type(kept["tps_1"]) is type(fits["tps_1"])
    moved = noisy + torch.tensor([2.0, 0.0, 0.0], dtype=torch.float64)  # a 2 mm shift is real
    fits = {s.name: fit_transform(s, pf, moved, center=center, scale=scale) for s in specs}
    kept = keep_identity_if_aligned(fits, pf, moved)
    assert all(kept[n] is fits[n] for n in fits)


def test_identity_kept_within_the_models_tolerance():
    from keyreg.transforms import AlignSpec, fit_transform, keep_identity_if_aligned, keypoint_motion_mm

    rng = np.random.default_rng(2)
    pf = torch.from_numpy(rng.normal(scale=40, size=(1, 150, 3)))
    # a systematic, contrast-like bias (a 2.6 % scaling: ~1.8 mm RMS) that no noise test absorbs
    biased = pf * 1.026 + torch.from_numpy(rng.normal(scale=0.5, size=pf.shape))
    specs = [AlignSpec("affine"), AlignSpec("tps", 1.0)]
    center, scale = torch.zeros(3, dtype=torch.float64), 100.0
    fits = {s.name: fit_transform(s, pf, biased, center=center, scale=scale) for s in specs}
    motion = float(keypoint_motion_mm(pf, fits["affine"].matrix)[0])
    assert 1.6 < motion < 2.1  # 2.6 % of an RMS radius of 40 * sqrt(3) = 69 mm
    info: dict = {}
    assert keep_identity_if_aligned(fits, pf, biased, info=info)["affine"] is fits["affine"]
    assert info == {"affine_motion_mm": pytest.approx(motion), "already_aligned": False}
    kept = keep_identity_if_aligned(fits, pf, biased, tolerance_mm=motion + 0.1, info=info)
    assert info["already_aligned"]
    probe = torch.from_numpy(rng.normal(scale=50, size=(1, 20, 3)))
    for tr in kept.values():
        torch.testing.assert_close(tr.map_points(probe), probe, atol=1e-9, rtol=0)
    assert keep_identity_if_aligned(fits, pf, biased, tolerance_mm=motion - 0.1)["tps_1"] is fits["tps_1"]


def test_models_command_lists_keypoint_names(atlas, tmp_path, capsys):
    from conftest import tiny_model

    from keyreg.cli import main
    from keyreg.models import load_model, save_model

    a, _ = atlas
    model = tiny_model(num_keypoints=len(a))
    model.config.regions, model.config.orientation_search = a, True
    model.config.fit_exclude = ("Extracerebral-*",)
    weights, _ = save_model(model, tmp_path / "anat")
    loaded = load_model(weights)
    assert loaded.config.keypoint_names == a.names
    mask = loaded.config.fit_mask()
    assert mask == [not n.startswith("Extracerebral-") for n in a.names] and not all(mask)
    assert loaded.config.fit_mask([]) is None
    assert main(["models", str(weights), "--keypoints"]) == 0
    out = capsys.readouterr().out
    assert f"{len(a)} named anatomical points" in out and "Left-Hippocampus" in out
    assert "Left-Cerebral-Cortex/" in out


def test_dense_target_centre_of_mass_is_the_region_centroid():
    """The heatmap-grid mask each heatmap is pulled towards has its centre of mass, as the detector
    reads it, exactly at the region's centroid: the dense and the regression terms agree."""
    from types import SimpleNamespace

    from keyreg.geometry import apply_affine, normalized_to_voxel
    from keyreg.models.keypoints import center_of_mass
    from keyreg.train.trainer import Trainer

    reg = torch.zeros(2, 1, 32, 28, 24, dtype=torch.long)
    reg[0, 0, 3:9, 20:26, 5:8] = 1
    reg[0, 0, 15:17, 10:13, 20:24] = 2
    reg[1, 0, 25:32, 0:2, 2:19] = 1
    reg[1, 0, 0:32, 5:6, 7:8] = 2
    aff = torch.tensor([[0, 3.0, 0, -40], [2.5, 0, 0, 10], [0, 0, 4.0, 7], [0, 0, 0, 1]], dtype=torch.float64)
    trainer = SimpleNamespace(model=SimpleNamespace(num_keypoints=2))
    cent, count, mask = Trainer._anatomical_targets(trainer, reg, aff, (8, 7, 6))
    assert count.tolist() == [[108, 24], [238, 32]]
    pts, _ = center_of_mass(mask)
    world = apply_affine(aff.float(), normalized_to_voxel(pts, (32, 28, 24)))
    torch.testing.assert_close(world, cent, atol=1e-3, rtol=0)


def test_pipeline_uses_the_model_exclusions_and_keeps_an_aligned_pair(atlas, tmp_path):
    """An anatomical model: its default exclusions apply unless the user gives their own, its
    keypoints carry their names, and a pair of identical images keeps the exact identity."""
    from conftest import tiny_model

    import keyreg
    from keyreg.io import Volume

    a, _ = atlas
    model = tiny_model(num_keypoints=len(a))
    model.config.regions, model.config.orientation_search = a, "auto"
    model.config.fit_exclude = ("Extracerebral-*",)
    img = Volume(_map(0).astype(np.float32) / 600, AFF, name="img")
    reg = keyreg.register(img, img, model=model, aligns=["affine", "tps_1"])
    assert reg.excluded_keypoints == [n for n in a.names if n.startswith("Extracerebral-")]
    assert reg.fixed_keypoints.names == a.names
    np.testing.assert_allclose(reg["affine"].matrix, np.eye(4), atol=1e-12)
    probe = torch.randn(1, 5, 3, dtype=torch.float64) * 10
    tps = reg["tps_1"].transform
    torch.testing.assert_close(tps.map_points(probe), probe, atol=1e-9, rtol=0)
    every = keyreg.register(img, img, model=model, aligns=["affine"], exclude_keypoints=[])
    assert every.excluded_keypoints == []


def test_orientation_search_override_reaches_the_network(atlas):
    """``orientation_search`` of the options (CLI ``--orientation_search``, API ``orientation_search=``)
    overrides the model's setting for every image: ``off`` is one pass per image, ``always`` the full
    search; an unknown mode is a one-line ConfigError."""
    from conftest import tiny_model

    from keyreg.errors import ConfigError
    from keyreg.io import Volume
    from keyreg.keypoints import detect_keypoints
    from keyreg.pipeline import Registrar, RegistrationOptions

    a, _ = atlas
    model = tiny_model(num_keypoints=len(a))
    model.config.regions, model.config.orientation_search = a, "auto"
    img = Volume(_map(0).astype(np.float32) / 600, AFF, name="img")
    moved = Volume(_map(2).astype(np.float32) / 600, AFF, name="moved")
    passes = {}
    for mode in ("off", "auto", "always"):
        reg = Registrar(model, device="cpu", aligns=["affine"], orientation_search=mode)
        reg.register(moved, img)
        passes[mode] = reg.network_passes
    assert passes["off"] == 2 and passes["auto"] >= 6 and passes["always"] >= 50
    off = detect_keypoints(model, [img], search="off")[0]
    plain = detect_image_keypoints(model, img, search=False)
    torch.testing.assert_close(off.points, plain.points, atol=1e-9, rtol=0)
    assert model.config.orientation_search == "auto"  # the model itself is not changed
    with pytest.raises(ConfigError, match="unknown orientation search 'sometimes'"):
        RegistrationOptions(orientation_search="sometimes")


def test_register_cli_orientation_search_flag(atlas, tmp_path):
    """``keyreg register --orientation_search off`` registers with one pass per image and records
    the mode with the pair's options; an unknown mode is refused by the parser (exit 2)."""
    import json

    from conftest import save_nifti, tiny_model

    from keyreg.cli import main
    from keyreg.models import save_model

    a, _ = atlas
    model = tiny_model(num_keypoints=len(a))
    model.config.regions, model.config.orientation_search = a, "always"
    weights, _ = save_model(model, tmp_path / "anat")
    fixed = save_nifti(tmp_path / "fixed.nii.gz", _map(0).astype(np.float32) / 600, AFF)
    moving = save_nifti(tmp_path / "moving.nii.gz", _map(2).astype(np.float32) / 600, AFF)
    out = tmp_path / "out"
    args = ["register", "--moving", str(moving), "--fixed", str(fixed), "--load_path", str(weights),
            "--list_of_aligns", "affine", "--save_dir", str(out), "--no_progress", "--save_eval_to_disk"]
    assert main([*args, "--orientation_search", "off"]) == 0
    (done,) = out.rglob("done.json")
    assert json.loads(done.read_text())["config"]["options"]["orientation_search"] == "off"
    with pytest.raises(SystemExit) as e:
        main([*args, "--orientation_search", "sometimes"])
    assert e.value.code == 2


def test_detection_facts_reach_the_confidence_and_flag_a_head_not_read_whole(atlas, monkeypatch):
    """An anatomical model's pair confidence says how its keypoints were detected: the larger template
    residual of the two images and which of them needed the orientation search; a residual beyond
    ``DETECTION_RESIDUAL_LIMIT_MM`` flags the pair (an image not read as a whole head), and so does a
    drift under the turned check grid beyond ``DETECTION_DRIFT_LIMIT_MM`` (no reading followed the
    anatomy)."""
    from conftest import tiny_model

    import keyreg
    import keyreg.qc
    from keyreg.io import Volume

    a, _ = atlas
    model = tiny_model(num_keypoints=len(a))
    model.config.regions, model.config.orientation_search = a, "off"
    img = Volume(_map(0).astype(np.float32) / 600, AFF, name="img")
    plain = keyreg.register(img, img, model=model, aligns=["affine"], exclude_keypoints=[]).confidence
    # one pass: the keypoints are still compared with the template; no check pass, hence no drift
    assert plain["detection_residual_mm"] > 0 and "detection_drift_mm" not in plain
    assert plain["orientation_searched"] == "none"
    model.config.orientation_search = "always"
    reg = keyreg.register(img, img, model=model, aligns=["affine"], exclude_keypoints=[])
    conf = reg.confidence
    assert conf["orientation_searched"] == "fixed moving"
    expected = max(kp.template_residual_mm for kp in (reg.fixed_keypoints, reg.moving_keypoints))
    assert conf["detection_residual_mm"] == expected and expected > 0
    monkeypatch.setattr(keyreg.qc, "DETECTION_RESIDUAL_LIMIT_MM", expected - 1e-9)
    reg._confidence = None
    assert reg.confidence["flag"] == "check"
    monkeypatch.setattr(keyreg.qc, "DETECTION_RESIDUAL_LIMIT_MM", expected + 1e-9)
    drift = max(kp.drift_mm for kp in (reg.fixed_keypoints, reg.moving_keypoints))
    assert conf["detection_drift_mm"] == drift and drift > 0
    monkeypatch.setattr(keyreg.qc, "DETECTION_DRIFT_LIMIT_MM", drift + 1e-9)
    reg._confidence = None
    assert reg.confidence["flag"] == ("check" if conf["confidence"] < keyreg.qc.CONFIDENCE_THRESHOLD else "ok")
    monkeypatch.setattr(keyreg.qc, "DETECTION_DRIFT_LIMIT_MM", drift - 1e-9)
    reg._confidence = None
    assert reg.confidence["flag"] == "check"
    assert keyreg.qc.detection_concerns(reg.confidence) == [f"detection_drift_mm {drift:.1f} above {drift - 1e-9:g}"]
    assert reg.confidence["flag_reason"].endswith(f"detection_drift_mm {drift:.1f} above {drift - 1e-9:g}")
