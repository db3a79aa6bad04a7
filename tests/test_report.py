"""report.html: content, self-containment, and rendering in a real (headless) Chromium."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from keyreg.io import Volume
from keyreg.report import (PairRecord, overlay_thumbnail, png_bytes, render_report, save_residual_plot,
                           thumbnail_data_uri)


def _volume(shift: int = 0) -> Volume:
    i, j, k = np.meshgrid(np.arange(24), np.arange(28), np.arange(20), indexing="ij")
    data = (np.hypot(i - 12 - shift, j - 14) < 8).astype(np.float32) * (1 + 0.02 * k)
    data += ((i - 12 - shift) ** 2 + (j - 10) ** 2 + (k - 10) ** 2 < 12).astype(np.float32)
    aff = np.diag([2.0, 2.0, 2.5, 1.0])
    return Volume(data, aff, name=f"vol{shift}")


def _records(tmp_path: Path, n: int) -> list[PairRecord]:
    fixed = _volume()
    thumbs = [thumbnail_data_uri(overlay_thumbnail(fixed, _volume(s))) for s in (0, 3)]
    labels = [f"K-{i + 1}" for i in range(20)]
    rng = np.random.default_rng(0)
    res = rng.random(20)
    plot = save_residual_plot(tmp_path / "pairs" / "p000" / "residuals.png", labels,
                              {"affine": (res, res * 2), "tps_0": (res * 0, res * 3)},
                              inlier_threshold_mm=1.5, rejected={"affine": res > 0.9}, title="p000")
    records = []
    for i in range(n):
        conf = float(rng.random())
        records.append(PairRecord(
            name=f"p{i:03d}", confidence=conf, flagged=conf < 0.3,
            details={"median_loo_mm": float(rng.random() * 10)},
            metrics={"affine": {"harddice": float(rng.random()), "mse": 0.01},
                     "tps_0": {"harddice": float(rng.random())}},
            thumbnail=thumbs[i % 2],
            figures=[("keypoint residuals", str(plot.relative_to(tmp_path)))] if i == 0 else []))
    return records


def test_report_content_flagged_first_escaped_and_self_contained(tmp_path):
    records = _records(tmp_path, 6)
    records.append(PairRecord(name="<script>alert(1)</script>", confidence=0.01, flagged=True))
    page = render_report(records, title="t & t", summary="keyreg register", threshold=0.3)
    names = re.findall(r'<tr class="pair [a-z]+" data-idx="\d+" data-name="([^"]*)"', page)
    flags = re.findall(r'<tr class="pair ([a-z]+)"', page)
    assert len(names) == 7
    assert flags == sorted(flags, key=lambda f: f != "flag")  # flagged first
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script>alert" not in page
    assert "t &amp; t" in page
    # no network: no external scripts, style sheets, fonts or images
    assert not re.search(r'(src|href)="(https?:)?//', page)
    assert "<link" not in page and "@import" not in page and "url(" not in page
    assert "affine<br>harddice" in page and "confidence" in page
    assert "the pair before registration" not in page  # no none column, no legend for it
    records[0].metrics = {"none": {"harddice": 0.1}, **records[0].metrics}
    page = render_report(records, title="t", summary="keyreg register", threshold=0.3)
    assert "none<br>harddice" in page and "Columns <b>none</b>: the pair before registration." in page


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("KEYREG_REQUIRE_CHROMIUM"):
        pytest.fail("KEYREG_REQUIRE_CHROMIUM is set (as in .ci/run) but no chromium is on PATH")
    pytest.skip("headless Chromium not installed (Debian: apt-get install chromium; .ci/run installs it)")


def _run_chromium(exe: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / "chromium-profile"
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def test_report_renders_in_headless_chromium(tmp_path):
    exe = _chromium()
    records = _records(tmp_path, 300)
    page = tmp_path / "report.html"
    page.write_text(render_report(records, title="keyreg report", summary="test batch", threshold=0.3))
    url = page.as_uri()

    # the DOM after the script ran, sorted by confidence (column 2) descending and with p000 opened
    dom = _run_chromium(exe, tmp_path, "--virtual-time-budget=5000", "--dump-dom", url + "#sort=2,desc&open=p000")
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert html.count('class="pair ') == 300
    confs = sorted((r.confidence for r in records), reverse=True)
    shown = [float(v) for v in re.findall(r'<tr class="pair [a-z]+"[^>]*><td class="status"[^>]*>\w+</td>'
                                          r'<td class="name">p\d+</td><td data-v="([^"]+)"', html)]
    assert shown == pytest.approx(confs)  # the inline script sorted the table
    # the opened pair's residual plot got its src (lazy images are only loaded when opened)
    assert re.search(r'<img[^>]* src="pairs/p000/residuals.png"', html)
    assert not re.search(r'<img[^>]* src="pairs/p000/residuals.png"[^>]*hidden', html)
    assert len(re.findall(r"data:image/png;base64,", html)) == 300

    # a screenshot: right size, not blank (several colours, the green/magenta thumbnails among them)
    shot = tmp_path / "shot.png"
    out = _run_chromium(exe, tmp_path, "--window-size=1200,900", "--hide-scrollbars",
                        "--virtual-time-budget=5000", f"--screenshot={shot}", url + "#open=p000")
    assert out.returncode == 0 and shot.exists(), out.stderr[-2000:]
    import matplotlib.image as mpimg

    img = mpimg.imread(str(shot))[..., :3]
    assert img.shape[:2] == (900, 1200)
    assert img.std() > 0.05
    flat = (img * 255).astype(np.uint8).reshape(-1, 3)
    assert len(np.unique(flat, axis=0)) > 50
    magenta = (flat[:, 0] > 150) & (flat[:, 2] > 150) & (flat[:, 1] < 100)
    assert magenta.sum() > 20


def test_png_bytes_decode_to_the_image_and_thumbnails_use_them():
    """The PNG writer (no matplotlib) gives a file that an independent reader (matplotlib/Pillow)
    decodes to the rounded 8-bit image; an overlay thumbnail is such a PNG, at most ``height`` rows."""
    import io

    import matplotlib.pyplot as plt

    rgb = np.random.default_rng(3).random((7, 11, 3))
    rgb[0, 0] = (-0.5, 1.5, 0.5)  # clipped
    back = plt.imread(io.BytesIO(png_bytes(rgb)), format="png")
    expected = np.clip(np.rint(rgb * 255), 0, 255) / 255
    assert back.shape == (7, 11, 3) and np.abs(back - expected).max() < 1e-6
    thumb = plt.imread(io.BytesIO(overlay_thumbnail(_volume(), _volume(3), height=10)), format="png")
    assert thumb.shape[2] == 3 and thumb.shape[0] <= 10 and thumb.max() > 0.5
    with pytest.raises(ValueError, match="H, W, 3"):
        png_bytes(np.zeros((4, 4)))
