"""``report.html``: one self-contained page per batch, for a person to check the registrations.

The page is a table with one row per pair (flagged pairs first, every column sortable by a click
on its header), with the pair's confidence, its metrics per align and a small fixed/warped overlay
thumbnail (a PNG data URI).  A click on a row opens the pair's details below it: the QC figures of
every align (``keyreg.viz``: fixed, moving, warped, checkerboard, overlay, keypoints) and the plot
of its keypoint residuals, both linked as files next to the report (relative paths) and loaded only
when the row is opened, so a batch of hundreds of pairs stays light.

No network access, no external script, style sheet or font: the script and CSS are inline, the
fonts are the browser's defaults.  Everything shown is HTML-escaped.

Pure pieces: :func:`render_report` (records -> HTML text), :func:`overlay_thumbnail` (two volumes ->
PNG bytes), :func:`save_residual_plot` (one pair's residuals -> PNG); :func:`write_report` writes
the page atomically.
"""

from __future__ import annotations

import base64
import html
import math
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .atomic import atomic_path, atomic_write_text
from .io import Volume

__all__ = ["PairRecord", "render_report", "write_report", "overlay_thumbnail", "png_bytes", "save_residual_plot",
           "thumbnail_data_uri"]


@dataclass
class PairRecord:
    """One pair of a batch, as the report shows it.

    Attributes:
        name: the pair's name (its directory under ``pairs/``).
        metrics: ``{align: {metric: value}}``; scalar values become table columns ``align metric``.
        confidence: the pair's confidence in ``[0, 1]`` (``None``: not computed).
        flagged: shown first, marked ``check``.
        details: more per-pair numbers shown in the table (e.g. median LOO error, inlier fraction).
        thumbnail: a ``data:image/png;base64,...`` URI (or a relative path), shown in the table.
        figures: ``(caption, relative path)`` of images shown when the row is opened.
        note: free text shown in the details (e.g. an error message).
    """

    name: str
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    confidence: float | None = None
    flagged: bool = False
    details: dict[str, float] = field(default_factory=dict)
    thumbnail: str | None = None
    figures: list[tuple[str, str]] = field(default_factory=list)
    note: str = ""


def _number(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _columns(records: Sequence[PairRecord]) -> tuple[list[str], list[tuple[str, str]]]:
    details: list[str] = []
    metrics: list[tuple[str, str]] = []
    for r in records:
        for k, v in r.details.items():
            if k not in details and _number(v) is not None:
                details.append(k)
        for align, vals in r.metrics.items():
            for k, v in vals.items():
                if (align, k) not in metrics and _number(v) is not None:
                    metrics.append((align, k))
    return details, metrics


def _fmt(v: float | None) -> str:
    if v is None:
        return "n/a"
    if v != 0 and (abs(v) >= 1e4 or abs(v) < 1e-3):
        return f"{v:.3g}"
    return f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}"


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:1em;color:#222;background:#fff}
h1{font-size:1.3em;margin:.2em 0}
p.summary{margin:.3em 0 1em 0}
table{border-collapse:collapse;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 6px;text-align:right;white-space:nowrap}
th{background:#eee;cursor:pointer;position:sticky;top:0;user-select:none}
th.sorted-asc::after{content:" \\25B2"} th.sorted-desc::after{content:" \\25BC"}
td.name,th.name{text-align:left}
tr.pair{cursor:pointer} tr.pair:hover{background:#f3f7ff}
tr.flag td.status{background:#ffd9d0;color:#900;font-weight:bold}
tr.ok td.status{color:#070}
td.thumb{padding:1px}
td.thumb img{height:64px;display:block}
tr.detail td{text-align:left;background:#fafafa;white-space:normal}
tr.detail img{max-width:100%;border:1px solid #ddd;margin:4px 0}
figure{margin:6px 0;display:inline-block;vertical-align:top;max-width:49%}
figcaption{font-size:12px;color:#555}
input#filter{margin:0 0 .6em 0;padding:3px;width:20em}
"""

_JS = """
(function(){
  var table=document.getElementById('pairs'), body=table.tBodies[0];
  function rows(){var out=[];for(var i=0;i<body.rows.length;i++){var r=body.rows[i];
    if(r.classList.contains('pair'))out.push([r,document.getElementById('d-'+r.dataset.idx)]);}return out;}
  function key(cell,numeric){var v=cell.getAttribute('data-v');
    if(numeric){var x=parseFloat(v);return isNaN(x)?null:x;}return (v===null?cell.textContent:v).toLowerCase();}
  var heads=table.tHead.rows[0].cells;
  for(var c=0;c<heads.length;c++){(function(col){var th=heads[col];if(th.dataset.sort==='none')return;
    th.addEventListener('click',function(){
      var asc=!th.classList.contains('sorted-asc');
      for(var j=0;j<heads.length;j++)heads[j].classList.remove('sorted-asc','sorted-desc');
      th.classList.add(asc?'sorted-asc':'sorted-desc');
      var numeric=th.dataset.sort==='num', list=rows();
      list.sort(function(a,b){var x=key(a[0].cells[col],numeric),y=key(b[0].cells[col],numeric);
        if(x===y)return a[0].dataset.idx-b[0].dataset.idx; if(x===null)return 1; if(y===null)return -1;
        return (x<y?-1:1)*(asc?1:-1);});
      var frag=document.createDocumentFragment();
      list.forEach(function(p){frag.appendChild(p[0]);frag.appendChild(p[1]);});
      body.appendChild(frag);});})(c);}
  body.addEventListener('click',function(ev){var r=ev.target.closest('tr.pair');if(!r)return;
    var d=document.getElementById('d-'+r.dataset.idx);
    if(d.hidden){var imgs=d.querySelectorAll('img[data-src]');
      for(var i=0;i<imgs.length;i++){imgs[i].src=imgs[i].dataset.src;imgs[i].removeAttribute('data-src');}}
    d.hidden=!d.hidden;});
  // report.html#sort=<column>[,desc]&open=<pair>: open sorted by a column (0 = status) and/or with a pair shown
  var h=location.hash.replace(/^#/,'').split('&');
  h.forEach(function(kv){var p=kv.split('=');if(p[0]==='sort'){var s=decodeURIComponent(p[1]||'').split(',');
      var th=heads[parseInt(s[0],10)];if(th){th.click();if(s[1]==='desc')th.click();}}
    if(p[0]==='open'){var name=decodeURIComponent(p[1]||'');rows().forEach(function(q){
      if(q[0].dataset.name===name)q[0].click();});}});
  document.getElementById('filter').addEventListener('input',function(){
    var q=this.value.toLowerCase();rows().forEach(function(p){
      var show=p[0].dataset.name.toLowerCase().indexOf(q)>=0;p[0].hidden=!show;if(!show)p[1].hidden=true;});});
})();
"""


def render_report(records: Sequence[PairRecord], *, title: str = "keyreg report", summary: str = "",
                  threshold: float | None = None) -> str:
    """The HTML text of the report (see the module docstring); flagged pairs first, then by name.

    Args:
        records: the pairs.
        title: page title.
        summary: one line of plain text under the title (e.g. the command and model).
        threshold: the confidence threshold below which pairs are flagged (stated on the page).
    """
    order = sorted(range(len(records)), key=lambda i: (not records[i].flagged, records[i].name))
    details, metrics = _columns(records)
    has_conf = any(r.confidence is not None for r in records)
    has_thumb = any(r.thumbnail for r in records)
    e = html.escape
    n_flag = sum(r.flagged for r in records)
    head = ['<th data-sort="text">status</th>', '<th class="name" data-sort="text">pair</th>']
    if has_conf:
        head.append('<th data-sort="num">confidence</th>')
    head += [f'<th data-sort="num">{e(k)}</th>' for k in details]
    head += [f'<th data-sort="num">{e(a)}<br>{e(k)}</th>' for a, k in metrics]
    if has_thumb:
        head.append('<th data-sort="none">fixed / warped</th>')
    ncols = len(head)
    body: list[str] = []
    for idx in order:
        r = records[idx]
        cls = "flag" if r.flagged else "ok"
        cells = [f'<td class="status" data-v="{0 if r.flagged else 1}">{"check" if r.flagged else "ok"}</td>',
                 f'<td class="name">{e(r.name)}</td>']
        if has_conf:
            c = _number(r.confidence)
            cells.append(f'<td data-v="{"" if c is None else repr(c)}">{_fmt(c)}</td>')
        for k in details:
            v = _number(r.details.get(k))
            cells.append(f'<td data-v="{"" if v is None else repr(v)}">{_fmt(v)}</td>')
        for a, k in metrics:
            v = _number(r.metrics.get(a, {}).get(k))
            cells.append(f'<td data-v="{"" if v is None else repr(v)}">{_fmt(v)}</td>')
        if has_thumb:
            img = f'<img src="{e(r.thumbnail)}" alt="{e(r.name)}" loading="lazy">' if r.thumbnail else ""
            cells.append(f'<td class="thumb">{img}</td>')
        body.append(f'<tr class="pair {cls}" data-idx="{idx}" data-name="{e(r.name)}">' + "".join(cells) + "</tr>")
        figs = "".join(f'<figure><figcaption>{e(cap)}</figcaption><a href="{e(src)}"><img data-src="{e(src)}" '
                       f'alt="{e(cap)}"></a></figure>' for cap, src in r.figures)
        note = f"<p>{e(r.note)}</p>" if r.note else ""
        body.append(f'<tr class="detail" id="d-{idx}" hidden><td colspan="{ncols}">'
                    f'<b>{e(r.name)}</b>{note}<br>{figs or "no figures (run with --visualize)"}</td></tr>')
    thr = "" if threshold is None else (f" Pairs with confidence below {threshold:g} (or, with an anatomical model, "
                                        "an image not read as a whole head or read on no grid where its keypoints "
                                        "stay with the anatomy: detection_residual_mm or detection_drift_mm "
                                        "above their limits) are flagged <b>check</b> and listed first.")
    if any(a == "none" for a, _ in metrics):
        thr += " Columns <b>none</b>: the pair before registration."
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{e(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{e(title)}</h1><p class=\"summary\">{e(summary)} {len(records)} pair(s), {n_flag} flagged.{thr} "
        "Click a column header to sort, a row to show its QC figures and keypoint residuals.</p>"
        "<input id=\"filter\" type=\"search\" placeholder=\"filter pairs by name\">"
        f"<table id=\"pairs\"><thead><tr>{''.join(head)}</tr></thead><tbody>{''.join(body)}</tbody></table>"
        f"<script>{_JS}</script></body></html>\n")


def write_report(path: str | Path, records: Sequence[PairRecord], **kwargs) -> Path:
    """Write :func:`render_report` to ``path`` atomically; returns ``path``."""
    return atomic_write_text(Path(path), render_report(records, **kwargs))


def _mpl():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def overlay_thumbnail(fixed: Volume, warped: Volume, height: int = 96) -> bytes:
    """PNG bytes of the middle axial slice: fixed (green) and warped (magenta), grey where they agree."""
    from .viz import _display_range, canonical_view

    f, _ = canonical_view(fixed)
    w, _ = canonical_view(warped)
    k = f.shape[2] // 2
    sl = []
    for d in (f, w):
        s = np.asarray(d[:, :, k], dtype=np.float64).T[::-1]  # rows: anterior at the top
        lo, hi = _display_range(s)
        sl.append(np.clip((s - lo) / (hi - lo), 0, 1))
    rgb = np.stack([sl[1], sl[0], sl[1]], axis=-1)
    step = max(1, int(math.ceil(rgb.shape[0] / height)))
    return png_bytes(rgb[::step, ::step])


def png_bytes(rgb: np.ndarray) -> bytes:
    """PNG bytes of an ``(H, W, 3)`` image with values in [0, 1] (8 bits per channel, rounded).

    Written directly (zlib): a thumbnail in every report must not cost matplotlib's import (~1 s)."""
    px = np.clip(np.rint(np.asarray(rgb, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)
    if px.ndim != 3 or px.shape[2] != 3:
        raise ValueError(f"png_bytes needs an (H, W, 3) image, got {px.shape}")
    h, w = px.shape[:2]
    rows = np.concatenate([np.zeros((h, 1), np.uint8), px.reshape(h, 3 * w)], axis=1)  # filter 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8-bit RGB, deflate, no interlace
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
            + chunk(b"IEND", b""))


def thumbnail_data_uri(png: bytes) -> str:
    """``data:image/png;base64,...`` for PNG bytes."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def save_residual_plot(path: str | Path, labels: Sequence[str], residuals: dict[str, tuple[np.ndarray, np.ndarray]],
                       *, inlier_threshold_mm: float | None = None,
                       rejected: dict[str, np.ndarray] | None = None, title: str = "") -> Path:
    """A PNG of every keypoint's residual and leave-one-out error (mm), one panel per align.

    Args:
        path: output PNG.
        labels: ``K`` keypoint names.
        residuals: ``{align: (residual_mm (K,), loo_mm (K,))}``.
        inlier_threshold_mm: drawn as a dashed line.
        rejected: ``{align: (K,) bool}`` keypoints left out by the robust fit (drawn as red crosses).
        title: figure title.
    """
    plt = _mpl()
    n = max(1, len(residuals))
    k = len(labels)
    fig, axes = plt.subplots(n, 1, figsize=(max(6.0, min(16.0, 0.09 * k + 3)), 2.2 * n + 0.4), squeeze=False)
    x = np.arange(k)
    for ax, (align, (res, loo)) in zip(axes[:, 0], residuals.items()):
        ax.bar(x, np.asarray(loo, dtype=float), color="#f0a040", width=0.8, label="leave-one-out error")
        ax.bar(x, np.asarray(res, dtype=float), color="#3070c0", width=0.5, label="residual")
        if rejected and align in rejected and np.any(rejected[align]):
            r = np.asarray(rejected[align], dtype=bool)
            ax.scatter(x[r], np.asarray(loo, dtype=float)[r], marker="x", c="red", s=20, zorder=3,
                       label="left out (robust)")
        if inlier_threshold_mm is not None:
            ax.axhline(inlier_threshold_mm, color="gray", ls="--", lw=0.8, label=f"{inlier_threshold_mm:g} mm")
        ax.set_ylabel(f"{align}\nmm", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_xlim(-1, k)
        if k <= 40:
            ax.set_xticks(x)
            ax.set_xticklabels(labels, rotation=90, fontsize=6)
        ax.legend(fontsize=7, loc="upper right", ncol=4)
    axes[-1, 0].set_xlabel("keypoint", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    return path

