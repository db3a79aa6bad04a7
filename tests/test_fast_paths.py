"""The fast metric, writing and start-up paths give the same results as the straightforward ones."""

from __future__ import annotations

import gzip
import io
import subprocess

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from keyreg.io import Volume
from keyreg.metrics import dice_per_label, hausdorff95_per_label, jacobian_determinant
from keyreg.nifti_gzip import ParallelGzipWriter, write_nifti
from keyreg.transforms import DisplacementField


def _label_maps(seed: int = 0, shape=(30, 26, 22)) -> tuple[np.ndarray, np.ndarray]:
    """Two smooth, overlapping label maps (ids 0..6) that differ by a small deformation."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.standard_normal((2, *shape)), 3, axes=(1, 2, 3))
    a = np.digitize(field[0], np.quantile(field[0], [0.3, 0.45, 0.6, 0.7, 0.8, 0.9]))
    b = np.digitize(field[0] + 0.3 * field[1], np.quantile(field[0], [0.3, 0.45, 0.6, 0.7, 0.8, 0.9]))
    b[0:3] = 6  # a label touching the border
    a[a == 5] = 9  # a label only in one map
    return a.astype(np.int64), b.astype(np.int64)


def _hd95_reference(a: np.ndarray, b: np.ndarray, spacing) -> dict[int, float]:
    """The distance-transform definition, on the whole grid, label by label."""
    out = {}
    for lab in sorted(set(np.unique(a).tolist()) | set(np.unique(b).tolist())):
        if lab == 0:
            continue
        ma, mb = a == lab, b == lab
        if not ma.any() or not mb.any():
            out[lab] = float("nan")
            continue
        sa = ma & ~ndimage.binary_erosion(ma, border_value=0)
        sb = mb & ~ndimage.binary_erosion(mb, border_value=0)
        da = ndimage.distance_transform_edt(~sa, sampling=spacing)
        db = ndimage.distance_transform_edt(~sb, sampling=spacing)
        out[lab] = float(np.percentile(np.concatenate([db[sa], da[sb]]), 95))
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_hausdorff_equals_distance_transform_definition(seed):
    a, b = _label_maps(seed)
    spacing = (1.0, 1.3, 0.8)
    got, ref = hausdorff95_per_label(a, b, spacing), _hd95_reference(a, b, spacing)
    assert got.keys() == ref.keys() and any(np.isnan(v) for v in ref.values())
    for k in ref:
        assert (np.isnan(got[k]) and np.isnan(ref[k])) or abs(got[k] - ref[k]) < 1e-9, k
    assert any(v > 0 for v in ref.values() if np.isfinite(v))


def test_hausdorff_with_the_fixed_surfaces_kept_across_maps():
    """The fixed map's LabelSurfaces (its KD-trees built once) reused for several warped maps give
    the values of fresh calls; surfaces of another grid are refused."""
    from keyreg.errors import ConfigError
    from keyreg.metrics import LabelSurfaces

    a0, b = _label_maps(0)
    a1, _ = _label_maps(1)
    spacing = (1.0, 1.3, 0.8)
    kept = LabelSurfaces(b, spacing)
    for a in (a0, a1, a0):
        got, ref = hausdorff95_per_label(a, b, spacing, fixed_surfaces=kept), hausdorff95_per_label(a, b, spacing)
        assert got.keys() == ref.keys() and all((np.isnan(got[k]) and np.isnan(ref[k])) or got[k] == ref[k] for k in ref)
    with pytest.raises(ConfigError, match="another grid"):
        hausdorff95_per_label(a0, b, (1.0, 1.0, 1.0), fixed_surfaces=kept)


def test_dice_equals_per_label_counts_for_small_and_huge_ids():
    a, b = _label_maps(2)
    for shift in (0, 5000, 2**40):  # a joint histogram, three histograms, ranks among the ids (huge ids)
        aa, bb = np.where(a > 0, a + shift, 0), np.where(b > 0, b + shift, 0)
        got = dice_per_label(aa.astype(np.uint8) if shift == 0 else aa, bb.astype(np.uint16) if shift == 0 else bb)
        ref = {}
        for lab in sorted((set(np.unique(aa).tolist()) | set(np.unique(bb).tolist())) - {0}):
            ma, mb = aa == lab, bb == lab
            ref[lab] = 2.0 * np.count_nonzero(ma & mb) / (np.count_nonzero(ma) + np.count_nonzero(mb))
        assert got == ref


def test_dice_negative_ids():
    a = np.array([[-3, 0, 2], [2, -3, 0]])
    b = np.array([[-3, -3, 2], [0, 0, 0]])
    assert dice_per_label(a, b) == {-3: 2 * 1 / (2 + 2), 2: 2 * 1 / (2 + 1)}


def test_jacobian_equals_gradient_einsum_det():
    g = torch.Generator().manual_seed(0)
    disp = torch.nn.functional.interpolate(torch.randn(1, 3, 4, 4, 4, generator=g) * 2, size=(21, 18, 15),
                                           mode="trilinear", align_corners=True)
    aff = np.array([[0.9, 0.1, 0, 3], [0, 1.2, 0.2, -1], [0.1, 0, 1.1, 2], [0, 0, 0, 1]])
    for a in (aff, np.diag([-1.0, 1.0, 2.0, 1.0])):
        d = disp[0].numpy().astype(np.float64)
        grads = np.stack([np.gradient(d, axis=1 + k) for k in range(3)], axis=1)  # (c, a, ...)
        jac = np.einsum("ca...,aw->...cw", grads, np.linalg.inv(a[:3, :3])) + np.eye(3)
        ref = np.linalg.det(jac)
        got = jacobian_determinant(DisplacementField(disp, a), slab=4)
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12)


def test_parallel_gzip_is_standard_and_nibabel_identical(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 7, 3_000_000, dtype=np.uint8).tobytes()
    buf = io.BytesIO()
    w = ParallelGzipWriter(buf, block=65_536, workers=3)
    w.write(data[:1000])
    w.write(memoryview(data)[1000:])
    w.close()
    assert gzip.decompress(buf.getvalue()) == data
    (tmp_path / "x.gz").write_bytes(buf.getvalue())
    assert subprocess.run(["gzip", "-t", str(tmp_path / "x.gz")]).returncode == 0
    for shape, dt in [((20, 21, 22), np.float32), ((9, 8, 7, 1, 3), np.float32), ((12, 11, 10), np.int16)]:
        img = nib.Nifti1Image((rng.standard_normal(shape) * 9).astype(dt), np.diag([1.5, 2.0, 1.0, 1.0]))
        img.header.extensions.append(nib.nifti1.Nifti1Extension(6, b"comment"))
        nib.save(img, str(tmp_path / "ref.nii.gz"))
        write_nifti(img, tmp_path / "new.nii.gz")
        assert gzip.open(tmp_path / "new.nii.gz").read() == gzip.open(tmp_path / "ref.nii.gz").read()


def _gzip_checked(data: bytes, path, **options) -> bytes:
    """``data`` through a 2-worker ParallelGzipWriter with ``options``; the output decompresses to
    ``data`` and passes ``gzip -t``."""
    buf = io.BytesIO()
    with ParallelGzipWriter(buf, block=65_536, workers=2, **options) as w:
        w.write(data)
    out = buf.getvalue()
    assert gzip.decompress(out) == data
    path.write_bytes(out)
    assert subprocess.run(["gzip", "-t", str(path)]).returncode == 0
    return out


def test_parallel_gzip_stores_incompressible_blocks_and_round_trips(tmp_path):
    rng = np.random.default_rng(1)
    noise = rng.standard_normal(200_000).astype(np.float32).tobytes()  # ~90 %+ at level 1
    flat = np.repeat(np.arange(50, dtype=np.uint8), 16_000).tobytes()  # ~0.5 %
    data = noise + flat + noise[:123_457]
    outs = {ratio: _gzip_checked(data, tmp_path / f"x{ratio}.gz", store_ratio=ratio) for ratio in (0.9, 1.0)}
    # stored noise blocks: their raw size plus framing; the flat run is still deflated (but for the
    # flat bytes of the two blocks that start with noise)
    noise_bytes = len(noise) + 123_457
    assert noise_bytes < len(outs[0.9]) < noise_bytes * 1.01 + 2 * 65_536 + 0.02 * len(flat)
    assert len(outs[1.0]) < len(outs[0.9])  # every block compressed: a little smaller
    buf = io.BytesIO()  # the same bytes give the same file
    with ParallelGzipWriter(buf, block=65_536, workers=3) as w:
        w.write(data)
    assert buf.getvalue() == outs[0.9]


def test_parallel_gzip_uses_isal_when_installed_and_both_deflates_agree(tmp_path):
    import keyreg.nifti_gzip as gz

    pytest.importorskip("isal")
    assert gz._DEFLATE.__name__ == "isal.isal_zlib"  # a dependency: the fast path is the default
    rng = np.random.default_rng(2)
    img = np.cumsum(rng.standard_normal((40, 50, 60)), axis=0).astype(np.float32).round(1)
    data = img.tobytes() + bytes(300_000) + rng.integers(0, 255, 200_000, dtype=np.uint8).tobytes()
    outs = {fast: _gzip_checked(data, tmp_path / f"x{fast}.gz", fast=fast) for fast in (True, False)}
    assert outs[True] != outs[False]  # ISA-L wrote the compressed blocks, not zlib


def _brain_like_tps(n: int = 88, k: int = 28, seed: int = 0):
    """A TPS like a keyreg-anatomy fit, scaled down: keypoints ~20 mm apart in an ellipsoid of a 1 mm
    grid, moving = an affine of them + N(0, 1.5 mm) disagreement; with a blob label map."""
    from keyreg.transforms import fit_tps

    rng = np.random.default_rng(seed)
    semi = np.array([36.0, 40.0, 32.0])
    pts = []
    while len(pts) < k:
        p = rng.uniform(-1, 1, (4 * k, 3))
        pts.extend(p[(p ** 2).sum(1) <= 1])
    pf = np.asarray(pts[:k]) * semi
    pm = pf @ (np.eye(3) + rng.normal(0, 0.05, (3, 3))).T + rng.normal(0, 2, 3) + rng.normal(0, 1.5, pf.shape)
    affine = np.eye(4)
    affine[:3, 3] = -(n - 1) / 2
    tps = fit_tps(torch.as_tensor(pf)[None], torch.as_tensor(pm)[None], 0.0,
                  center=torch.zeros(3, dtype=torch.float64), scale=n / 2)
    ijk = np.stack(np.meshgrid(*[np.arange(n)] * 3, indexing="ij"), -1) - (n - 1) / 2
    r = ((ijk / semi) ** 2).sum(-1)
    labels = np.digitize(r + 0.15 * np.sin(ijk[..., 0] / 5.0), [0.15, 0.35, 0.6, 0.8, 1.0]) + 1
    labels[r > 1.05] = 0
    return tps, (n, n, n), affine, labels.astype(np.int16), r <= 1


@pytest.mark.parametrize("stride, p99_mm, max_mm, dice", [(2, 0.1, 0.3, 1e-3), (4, 0.3, 1.0, 3e-3)])
def test_strided_field_is_within_its_stated_bound_of_the_exact_field(stride, p99_mm, max_mm, dice):
    """A TPS sampled every ``stride`` voxels and trilinear in between, against the exact TPS at every
    voxel, on a 1 mm grid with lambda 0 (the least smooth TPS) and keypoints 20 mm apart that disagree
    by 1.5 mm: displacement error in the head (99th percentile, max; measured 0.055 / 0.21 mm at
    stride 2, 0.21 / 0.64 mm at stride 4) and the change of any label's Dice (5e-4, 2e-3)."""
    from keyreg.io import Volume
    from keyreg.results import warp_volumes
    from keyreg.transforms import sample_field

    tps, shape, affine, labels, head = _brain_like_tps()
    exact = sample_field(tps, shape, affine, stride=1)
    coarse = sample_field(tps, shape, affine, stride=stride)
    full = sample_field(tps, shape, affine, stride=stride, full_grid=True)
    assert coarse.shape != shape and full.shape == shape
    np.testing.assert_allclose(full.displacement.numpy(), coarse.upsample(shape, affine).displacement.numpy(), atol=1e-6)
    # at every voxel (where the warp reads it) the full-grid field is the coarse field, trilinear
    ijk = np.random.default_rng(1).integers(0, shape[0], (2000, 3))
    pts = torch.as_tensor(ijk + affine[:3, 3])[None]
    np.testing.assert_allclose(full.map_points(pts).numpy(), coarse.map_points(pts).numpy(), atol=1e-4)
    err = (full.displacement[0] - exact.displacement[0]).norm(dim=0).numpy()[head]
    assert float(exact.displacement.abs().max()) > 3.0  # a real deformation, not a near-identity
    assert np.quantile(err, 0.99) < p99_mm and err.max() < max_mm
    seg = Volume(labels, affine, None, "seg", "labels")
    a = warp_volumes(None, seg, seg, exact)[1].data
    b = warp_volumes(None, seg, seg, full)[1].data
    da, db = dice_per_label(a, labels), dice_per_label(b, labels)
    assert max(abs(da[k] - db[k]) for k in da) < dice


def test_inputs_read_on_threads_equal_one_by_one_and_report_the_first_bad_one(tmp_path):
    from keyreg.errors import ImageIOError
    from keyreg.io import load_volume, load_volumes

    rng = np.random.default_rng(3)
    aff = np.diag([1.2, 1.0, 0.9, 1.0])
    img = rng.standard_normal((12, 10, 9)).astype(np.float32)
    nib.save(nib.Nifti1Image(img, aff), str(tmp_path / "img.nii.gz"))
    for name, ids in (("small", [0, 3, 200]), ("fs", [0, 2, 2035]), ("big", [0, 41, 1_000_003])):
        seg = rng.choice(ids, size=(12, 10, 9)).astype(np.int32)
        nib.save(nib.Nifti1Image(seg, aff), str(tmp_path / f"{name}.nii.gz"))
    sources = [(tmp_path / "img.nii.gz", "image"), *((tmp_path / f"{n}.nii.gz", "labels") for n in ("small", "fs", "big"))]
    threaded = load_volumes(sources, compact_labels=True)
    for (src, kind), v in zip(sources, threaded):
        one = load_volume(src, kind=kind)  # int64 labels, the default
        assert np.array_equal(v.data, one.data) and np.array_equal(v.affine, one.affine) and v.name == one.name
    assert [v.data.dtype for v in threaded] == [np.float32, np.uint8, np.int16, np.int32]
    assert load_volumes(sources)[1].data.dtype == np.int64
    bad = [(tmp_path / "img.nii.gz", "image"), (tmp_path / "missing_1.nii.gz", "image"),
           (tmp_path / "missing_2.nii.gz", "labels")]
    with pytest.raises(ImageIOError, match="missing_1"):
        load_volumes(bad)


def test_parallel_gzip_file_does_not_depend_on_how_the_bytes_are_handed_in():
    rng = np.random.default_rng(4)
    data = rng.integers(0, 4, 400_000, dtype=np.uint8).tobytes() + rng.standard_normal(60_000).astype(np.float32).tobytes()
    outs = []
    for pattern in ([len(data)], [1, 65_535, 65_536, 70_000, 0, 10], [100_000] * 5, [65_536] * 3):
        buf = io.BytesIO()
        with ParallelGzipWriter(buf, block=65_536, workers=2) as w:
            pos = 0
            for k in pattern:
                w.write(data[pos:pos + k])
                pos += k
            w.write(memoryview(data)[pos:])
        outs.append(buf.getvalue())
        assert gzip.decompress(outs[-1]) == data
    assert all(o == outs[0] for o in outs)


@pytest.mark.parametrize("sigma", [0.45, 0.8, 1.7])
def test_gaussian_prefilter_equals_scipy_nearest(sigma):
    """The anti-aliasing filter (shifted copies, no scipy import at inference) is scipy's
    ``gaussian_filter1d(mode="nearest", truncate=3)`` along every axis."""
    from keyreg.preprocess import _gaussian_filter1d

    x = torch.from_numpy(np.random.default_rng(1).random((1, 1, 19, 14, 11)) * 50)
    for dim in (2, 3, 4):
        ref = ndimage.gaussian_filter1d(x.numpy(), sigma, axis=dim, mode="nearest", truncate=3.0)
        assert np.abs(_gaussian_filter1d(x, sigma, dim).numpy() - ref).max() < 1e-12


def test_network_source_normalises_after_filtering_as_before():
    """Min-max applied to the pooled, blurred volume equals min-max first (it is affine in the
    intensities); with percentile clipping (not linear) the image is normalised first."""
    from keyreg.preprocess import (
        GridSpec,
        IntensitySpec,
        PreprocessConfig,
        _antialias,
        _box_pool,
        network_grid_affine,
        network_source,
        normalize_intensity,
    )

    rng = np.random.default_rng(2)
    vol = Volume((rng.random((40, 36, 30)) * 900 + 100).astype(np.float32), np.diag([1.0, 1.0, 1.2, 1.0]))
    for clip in (None, (1.0, 99.0)):
        cfg = PreprocessConfig(grid=GridSpec(mode="ras", shape=(10, 9, 8), voxel_size=(4.0, 4.0, 4.0)),
                               intensity=IntensitySpec(clip_percentiles=clip))
        grid = network_grid_affine(vol.affine, vol.shape, cfg.grid)
        got, _ = network_source(vol, cfg, grid)
        factors = np.sqrt(((np.linalg.inv(vol.affine) @ grid)[:3, :3] ** 2).sum(axis=1))
        pooled, ifp, var = _box_pool(normalize_intensity(vol.tensor(), cfg.intensity), factors)
        step = np.diag(ifp)[:3]
        ref = _antialias(pooled, factors / step, np.sqrt(var) / step)
        assert float((got - ref).abs().max()) < 1e-5


def test_box_pool_equals_avg_pool3d():
    """Block means by strided sums equal ``avg_pool3d`` (blocks of 2 and 3, a padded tail)."""
    import torch.nn.functional as F

    from keyreg.preprocess import _box_pool

    x = torch.from_numpy(np.random.default_rng(4).random((1, 1, 12, 13, 9)))
    for factors in ((4.0, 4.0, 4.0), (6.5, 2.2, 4.1), (1.0, 4.0, 1.0)):
        got, ifp, _ = _box_pool(x, np.array(factors))
        s = tuple(int(v) for v in np.diag(ifp)[:3])
        pad = [0, -x.shape[4] % s[2], 0, -x.shape[3] % s[1], 0, -x.shape[2] % s[0]]
        ref = F.avg_pool3d(F.pad(x, pad, mode="replicate"), s)
        assert got.shape == ref.shape and float((got - ref).abs().max()) < 1e-12


def test_image_metrics_normalise_chunk_by_chunk_as_full_copies():
    """mse / ncc of lazily min-max-normalised images (:class:`MinMaxScaled`, no full-size copy) equal
    those of the full normalised float32 copies the measure stage used to make."""
    import keyreg.metrics as M
    from keyreg.metrics import MinMaxScaled, mse, ncc

    rng = np.random.default_rng(5)
    fixed = (rng.random((37, 29, 23)) * 700 - 50).astype(np.float32)
    warped = (rng.random((37, 29, 23)) * 300 + 20).astype(np.float32)
    lo, hi = fixed.min(), fixed.max()
    f_full = (fixed - lo) / (hi - lo)
    w_full = (warped - np.float32(10.0)) / np.float32(400.0)
    f_lazy = MinMaxScaled(fixed, lo, np.float32(hi - lo))
    w_lazy = MinMaxScaled(warped, np.float32(10.0), np.float32(400.0))
    chunk = M._CHUNK
    try:
        M._CHUNK = 1000  # several chunks on a small volume
        assert mse(w_lazy, f_lazy) == mse(w_full, f_full)
        assert ncc(w_lazy, f_lazy) == pytest.approx(ncc(w_full, f_full), abs=1e-12)
    finally:
        M._CHUNK = chunk
