"""Point files: keyreg keypoint CSVs, ANTs point CSVs and 3D Slicer markups (``.mrk.json``, ``.fcsv``).

Convention: in memory points are ``(N, 3)`` float64 world RAS mm.  keyreg CSVs say their frame in
the header (``x_ras`` / ``x_lps``); plain ``x,y,z`` columns (ANTs ``antsApplyTransformsToPoints``
files, which are LPS) are read in the frame the caller names.  Slicer files declare their frame
(``coordinateSystem`` in ``.mrk.json``, default LPS; ``# CoordinateSystem =`` in ``.fcsv``:
``LPS``/``1`` or ``RAS``/``0``).  LPS = RAS with x and y negated.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..atomic import atomic_write_text
from ..errors import ConfigError, ImageIOError, ShapeError
from ..geometry import ras_to_lps_points
from ._common import PathLike, as_labels, as_points, check_suffix, fmt, read_text, reading

__all__ = ["write_points_csv", "read_points_csv", "write_markups_json", "write_markups_fcsv",
           "read_markups", "MARKUPS_SCHEMA"]

#: The ``@schema`` written into ``.mrk.json`` files.
MARKUPS_SCHEMA = ("https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/"
                  "Resources/Schema/markups-schema-v1.0.3.json#")

_FCSV_COLUMNS = "id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID"


def _space(value: str, name: str = "space") -> str:
    s = str(value).strip().upper()
    if s not in ("RAS", "LPS"):
        raise ConfigError(f"{name} must be 'RAS' or 'LPS', got {value!r}")
    return s


def _to_ras(points: np.ndarray, space: str) -> np.ndarray:
    return ras_to_lps_points(points) if space == "LPS" else np.asarray(points, dtype=np.float64)


# --------------------------------------------------------------------------------------------- CSV

def write_points_csv(path: PathLike, points_ras, labels=None, weights=None, selected=None) -> Path:
    """Write keypoints as ``label,x_ras,y_ras,z_ras[,weight][,selected]`` CSV, atomically.

    Args:
        path: output ``.csv``.
        points_ras: ``(N, 3)`` world RAS mm.
        labels: ``N`` names (default ``K-1 .. K-N``).
        weights: optional ``(N,)`` per-point weights (adds a ``weight`` column).
        selected: optional ``(N,)`` bools (adds a ``selected`` column of 1 / 0: 0 = left out of fits,
            as an unticked point of a Slicer list).

    Returns:
        ``path``.  Numbers are written with round-trip (exact float64) precision.
    """
    pts = as_points(points_ras, "points_ras")
    labs = as_labels(labels, len(pts))
    w = None
    if weights is not None:
        if hasattr(weights, "detach"):
            weights = weights.detach().cpu().numpy()
        w = np.asarray(weights, dtype=np.float64).reshape(-1)
        if w.shape != (len(pts),) or not np.all(np.isfinite(w)):
            raise ShapeError(f"weights must be {len(pts)} finite numbers, got shape {np.shape(weights)}")
    sel = _selected(selected, len(pts))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["label", "x_ras", "y_ras", "z_ras"] + (["weight"] if w is not None else [])
                    + (["selected"] if sel is not None else []))
    for n, (lab, p) in enumerate(zip(labs, pts)):
        writer.writerow([lab, *(fmt(v) for v in p)] + ([fmt(w[n])] if w is not None else [])
                        + ([int(sel[n])] if sel is not None else []))
    return atomic_write_text(path, buf.getvalue())


def _selected(selected, n: int) -> np.ndarray | None:
    if selected is None:
        return None
    sel = np.asarray(selected, dtype=bool).reshape(-1)
    if sel.shape != (n,):
        raise ShapeError(f"selected must be {n} booleans, got shape {np.shape(selected)}")
    return sel


@dataclass
class PointSet:
    """Points read from a file: ``points`` ``(N, 3)`` float64 world RAS mm, ``labels`` (``N`` strings),
    ``weights`` (``(N,)`` or ``None``) and ``selected`` (``(N,)`` bools from a CSV ``selected`` column, or
    ``None``)."""

    points: np.ndarray
    labels: list[str]
    weights: np.ndarray | None = None
    selected: np.ndarray | None = None


def read_point_set(path: PathLike, space: str | None = None) -> PointSet:
    """Points of a keypoint CSV (``space`` for plain ``x,y,z`` columns), a Slicer ``.mrk.json`` or an
    ``.fcsv`` file, always as a :class:`PointSet` (weights only from a CSV ``weight`` column)."""
    if str(path).lower().endswith(".csv"):
        return _read_points_csv(path, space)
    pts, labels = read_markups(path)
    return PointSet(pts, labels, None)


def read_points_csv(path: PathLike, space: str | None = None) -> tuple[np.ndarray, list[str]]:
    """``(points_ras, labels)`` of a points CSV (see :func:`_read_points_csv`; :func:`read_point_set`
    also gives the weights)."""
    ps = _read_points_csv(path, space)
    return ps.points, ps.labels


def _read_points_csv(path: PathLike, space: str | None = None) -> PointSet:
    """Read points from a CSV file with a header row.

    Coordinate columns (case-insensitive): ``x_ras,y_ras,z_ras`` (RAS), ``x_lps,y_lps,z_lps`` (LPS)
    or plain ``x,y,z``, interpreted in ``space``.  ANTs' ``antsApplyTransformsToPoints`` CSVs
    (``x,y,z,t[,label,comment]``) are LPS: pass ``space='LPS'``.  A ``label`` (or ``name``) column
    gives the labels (default ``K-1 .. K-N``); a ``weight`` column the weights.

    Args:
        path: the CSV file.
        space: ``'RAS'`` or ``'LPS'``, the frame of plain ``x,y,z`` columns (``None``: RAS); given
            for a file whose columns name their frame (``x_ras``, ``x_lps``), it must agree.

    Returns:
        A :class:`PointSet`: ``(N, 3)`` float64 world RAS mm, ``N`` labels, weights (``None``
        without a ``weight`` column).

    Raises:
        ConfigError: ``space`` is not RAS or LPS.
        ImageIOError: missing file, no coordinate columns, columns of another frame than ``space`` or
            of both frames, a column named twice, non-numeric values, a row with more values than the
            header, a negative or non-finite weight, a ``selected`` value other than 1, 0, true, false.
    """
    given = None if space is None else _space(space)
    space = given or "RAS"
    p, text = read_text(path, "a points CSV file")
    with reading(p, "a points CSV file"):
        rows = [r for r in csv.reader(io.StringIO(text))
                if r and any(c.strip() for c in r) and not r[0].lstrip().startswith("#")]
        if not rows:
            raise ImageIOError(f"{p}: empty CSV file (expected a header such as label,x_ras,y_ras,z_ras)")
        header = [h.strip().lower() for h in rows[0]]
        for c in ("x_ras", "y_ras", "z_ras", "x_lps", "y_lps", "z_lps", "x", "y", "z", "label", "name", "weight",
                  "selected"):
            if header.count(c) > 1:
                raise ImageIOError(f"{p}: column {c!r} occurs {header.count(c)} times in the header")
        if all(c in header for c in ("x_ras", "y_ras", "z_ras", "x_lps", "y_lps", "z_lps")):
            raise ImageIOError(f"{p}: both x_ras,y_ras,z_ras and x_lps,y_lps,z_lps columns; keep the points of one frame")
        for cols, frame in ((("x_ras", "y_ras", "z_ras"), "RAS"), (("x_lps", "y_lps", "z_lps"), "LPS"),
                            (("x", "y", "z"), space)):
            if all(c in header for c in cols):
                idx = [header.index(c) for c in cols]
                if given is not None and frame != given:
                    raise ImageIOError(f"{p}: the columns {cols[0]},{cols[1]},{cols[2]} are {frame}, not the {given} "
                                       "given for this file")
                break
        else:
            raise ImageIOError(f"{p}: no coordinate columns in header {','.join(rows[0])[:80]!r} "
                               "(expected x_ras,y_ras,z_ras or x_lps,y_lps,z_lps or x,y,z)")
        lab_col = next((header.index(c) for c in ("label", "name") if c in header), None)
        w_col = header.index("weight") if "weight" in header else None
        s_col = header.index("selected") if "selected" in header else None
        pts, labels, weights, selected = [], [], [], []
        for n, row in enumerate(rows[1:]):
            if any(c.strip() for c in row[len(header):]):
                raise ImageIOError(f"{p}: data row {n + 1} has {len(row)} values but the header has "
                                   f"{len(header)} columns: {','.join(row)[:80]!r}")
            try:
                pts.append([float(row[i]) for i in idx])
                if w_col is not None:
                    weights.append(float(row[w_col]))
            except (ValueError, IndexError):
                raise ImageIOError(f"{p}: data row {n + 1} is not numeric or too short: "
                                   f"{','.join(row)[:80]!r}") from None
            if w_col is not None and not np.isfinite(weights[-1]):
                raise ImageIOError(f"{p}: data row {n + 1}: weight {row[w_col].strip()!r} is not a finite number")
            if w_col is not None and weights[-1] < 0:
                raise ImageIOError(f"{p}: data row {n + 1}: weight {row[w_col].strip()} is negative "
                                   "(weights must be >= 0)")
            labels.append(row[lab_col].strip() if lab_col is not None and lab_col < len(row)
                          else f"K-{n + 1}")
            if s_col is not None:
                flag = row[s_col].strip().lower() if s_col < len(row) else ""
                if flag not in ("1", "0", "true", "false"):
                    raise ImageIOError(f"{p}: data row {n + 1}: selected {flag!r} is not 1, 0, true or false")
                selected.append(flag in ("1", "true"))
        points = np.asarray(pts, dtype=np.float64).reshape(-1, 3)
        if not np.all(np.isfinite(points)):
            raise ImageIOError(f"{p}: coordinates contain NaN or Inf")
        points = _to_ras(points, frame)
    return PointSet(points, labels, np.asarray(weights, dtype=np.float64) if w_col is not None else None,
                    np.asarray(selected, dtype=bool) if s_col is not None else None)


# ------------------------------------------------------------------------------------ Slicer markups

def write_markups_json(path: PathLike, points_ras, labels=None, coordinate_system: str = "LPS",
                       selected=None) -> Path:
    """Write a 3D Slicer point list (``.mrk.json``, schema v1.0.3), atomically.

    Args:
        path: output file ending in ``.json`` (Slicer expects ``.mrk.json``).
        points_ras: ``(N, 3)`` world RAS mm.
        labels: ``N`` names (default ``K-1 .. K-N``).
        coordinate_system: ``'LPS'`` (Slicer's file default) or ``'RAS'``: the frame of the
            positions written.
        selected: optional ``(N,)`` bools: Slicer's ``selected`` check box of each point (``False``:
            left out of fits); default: all selected.

    Returns:
        ``path``.  One ``Fiducial`` markup, ``coordinateUnits`` mm, control points with ids
        ``'1'..`` and ``positionStatus`` ``'defined'``.
    """
    cs = _space(coordinate_system, "coordinate_system")
    check_suffix(path, (".json",), "Slicer markups")
    pts = as_points(points_ras, "points_ras")
    labs = as_labels(labels, len(pts))
    pos = ras_to_lps_points(pts) if cs == "LPS" else pts
    sel = _selected(selected, len(pts))
    sel = np.ones(len(pts), bool) if sel is None else sel
    doc = {
        "@schema": MARKUPS_SCHEMA,
        "markups": [{
            "type": "Fiducial",
            "coordinateSystem": cs,
            "coordinateUnits": "mm",
            "controlPoints": [
                {"id": str(n + 1), "label": lab, "position": [float(v) + 0.0 for v in q],
                 "positionStatus": "defined", "selected": bool(sel[n])}
                for n, (lab, q) in enumerate(zip(labs, pos))
            ],
        }],
    }
    return atomic_write_text(path, json.dumps(doc, indent=2) + "\n")


def write_markups_fcsv(path: PathLike, points_ras, labels=None, coordinate_system: str = "LPS") -> Path:
    """Write a legacy Slicer fiducial file (``.fcsv``, version 4.11 layout), atomically.

    Args:
        path: output file ending in ``.fcsv``.
        points_ras: ``(N, 3)`` world RAS mm.
        labels: ``N`` names (default ``K-1 .. K-N``).
        coordinate_system: ``'LPS'`` or ``'RAS'``, declared on the ``# CoordinateSystem`` line.

    Returns:
        ``path``.
    """
    cs = _space(coordinate_system, "coordinate_system")
    check_suffix(path, (".fcsv",), "Slicer fiducial")
    pts = as_points(points_ras, "points_ras")
    labs = as_labels(labels, len(pts))
    pos = ras_to_lps_points(pts) if cs == "LPS" else pts
    buf = io.StringIO()
    buf.write(f"# Markups fiducial file version = 4.11\n# CoordinateSystem = {cs}\n# columns = {_FCSV_COLUMNS}\n")
    writer = csv.writer(buf, lineterminator="\n")
    for n, (lab, q) in enumerate(zip(labs, pos)):
        writer.writerow([n + 1, *(fmt(v) for v in q), 0, 0, 0, 1, 1, 1, 0, lab, "", ""])
    return atomic_write_text(path, buf.getvalue())


def _read_markups_json(p: Path, text: str) -> tuple[np.ndarray, list[str], list[dict]]:
    doc = json.loads(text)
    if not isinstance(doc, dict) or not isinstance(doc.get("markups"), list):
        raise ImageIOError(f"{p}: not a Slicer markups file (no 'markups' list)")
    pts: list[np.ndarray] = []
    labels: list[str] = []
    states: list[dict] = []
    found = False
    for mk in doc["markups"]:
        if not isinstance(mk, dict) or mk.get("type") != "Fiducial":
            continue
        found = True
        cs = str(mk.get("coordinateSystem", "LPS")).upper()
        if cs not in ("LPS", "RAS"):
            raise ImageIOError(f"{p}: unknown coordinateSystem {mk.get('coordinateSystem')!r}")
        units = str(mk.get("coordinateUnits", "mm"))
        if units not in ("mm", "um"):
            raise ImageIOError(f"{p}: unknown coordinateUnits {units!r} (expected mm or um)")
        scale = 1e-3 if units == "um" else 1.0
        for n, cp in enumerate(mk.get("controlPoints") or []):
            if not isinstance(cp, dict):
                raise ImageIOError(f"{p}: control point {n + 1} is not a JSON object")
            status = cp.get("positionStatus", "defined")
            if status in ("undefined", "missing"):
                continue  # a placeholder (not placed yet, or skipped): no position
            if status not in ("defined", "preview"):
                raise ImageIOError(f"{p}: control point {n + 1} has unknown positionStatus {status!r} "
                                   "(expected defined, preview, undefined or missing)")
            try:
                q = np.asarray(cp.get("position"), dtype=np.float64)
            except (ValueError, TypeError):
                q = np.zeros(0)
            if q.shape != (3,) or not np.all(np.isfinite(q)):
                raise ImageIOError(f"{p}: control point {n + 1} has no valid 3-number position")
            pts.append(_to_ras(q * scale, cs))
            labels.append(str(cp.get("label", cp.get("id", f"K-{len(labels) + 1}"))))
            states.append({"selected": _json_flag(p, cp, n, "selected", True),
                           "locked": _json_flag(p, cp, n, "locked", False)})
    if not found:
        raise ImageIOError(f"{p}: no point list (markup of type 'Fiducial') in the file")
    return np.asarray(pts, dtype=np.float64).reshape(-1, 3), labels, states


def _json_flag(p: Path, cp: dict, n: int, key: str, default: bool) -> bool:
    value = cp.get(key, default)
    if not isinstance(value, bool):
        raise ImageIOError(f"{p}: control point {n + 1}: {key!r} must be true or false (a JSON boolean), "
                           f"got {value!r:.80}")
    return value


def _read_fcsv(p: Path, text: str) -> tuple[np.ndarray, list[str], list[dict]]:
    space = "RAS"  # files without the line predate Slicer 4.11, which wrote RAS
    columns = _FCSV_COLUMNS.split(",")
    data_lines = []
    for ln in text.splitlines():
        s = ln.strip()
        if not s:
            continue
        if s.startswith("#"):
            key, sep, value = s[1:].partition("=")
            key = key.strip().lower()
            if sep and key == "coordinatesystem":
                code = value.strip().upper()
                if code in ("LPS", "1"):
                    space = "LPS"
                elif code in ("RAS", "0"):
                    space = "RAS"
                else:
                    raise ImageIOError(f"{p}: unknown CoordinateSystem {value.strip()!r} (expected LPS, RAS, 0 or 1)")
            elif sep and key == "columns":
                columns = [c.strip().lower() for c in value.split(",")]
            continue
        data_lines.append(ln)
    if not all(c in columns for c in ("x", "y", "z")):
        raise ImageIOError(f"{p}: the '# columns' line has no x, y, z")
    idx = [columns.index(c) for c in ("x", "y", "z")]
    lab_col = columns.index("label") if "label" in columns else None
    sel_col = columns.index("sel") if "sel" in columns else None
    lock_col = columns.index("lock") if "lock" in columns else None
    pts, labels, states = [], [], []
    for n, row in enumerate(csv.reader(io.StringIO("\n".join(data_lines)))):
        try:
            pts.append([float(row[i]) for i in idx])
        except (ValueError, IndexError):
            raise ImageIOError(f"{p}: point row {n + 1} is not numeric or too short: "
                               f"{','.join(row)[:80]!r}") from None
        labels.append(row[lab_col] if lab_col is not None and lab_col < len(row) else f"K-{n + 1}")
        states.append({"selected": _fcsv_flag(row, sel_col, True), "locked": _fcsv_flag(row, lock_col, False)})
    points = np.asarray(pts, dtype=np.float64).reshape(-1, 3)
    if not np.all(np.isfinite(points)):
        raise ImageIOError(f"{p}: coordinates contain NaN or Inf")
    return _to_ras(points, space), labels, states


def _fcsv_flag(row: list[str], col: int | None, default: bool) -> bool:
    if col is None or col >= len(row) or not row[col].strip():
        return default
    return row[col].strip().lower() not in ("0", "false")


def read_markups(path: PathLike, *, with_states: bool = False):
    """Read the points of a 3D Slicer markups file (``.mrk.json`` / ``.json`` or legacy ``.fcsv``).

    JSON: every ``Fiducial`` markup; positions in its ``coordinateSystem`` (default LPS) and
    ``coordinateUnits`` (mm or um); points whose ``positionStatus`` is ``undefined`` or ``missing``
    are skipped; ``selected`` / ``locked`` must be JSON booleans.
    FCSV: the ``# CoordinateSystem =`` line (``LPS``/``1`` or ``RAS``/``0``; RAS when absent, as in
    files older than Slicer 4.11) and the ``# columns =`` line are honoured.

    Args:
        path: the markups file.
        with_states: also return each point's Slicer state.

    Returns:
        ``(points_ras, labels)``: ``(N, 3)`` float64 world RAS mm and ``N`` strings; with
        ``with_states=True``, ``(points_ras, labels, states)``, ``states`` being ``N`` dicts
        ``{"selected": bool, "locked": bool}`` (defaults ``True`` / ``False`` when absent).

    Raises:
        ImageIOError: missing, malformed or unsupported file.
    """
    p, text = read_text(path, "a Slicer markups file (.mrk.json or .fcsv)")
    name = p.name.lower()
    with reading(p, "a Slicer markups file"):
        if name.endswith(".json") or (not name.endswith(".fcsv") and text.lstrip().startswith("{")):
            out = _read_markups_json(p, text)
            return out if with_states else out[:2]
        if name.endswith(".fcsv") or text.lstrip().startswith("#"):
            out = _read_fcsv(p, text)
            return out if with_states else out[:2]
    raise ImageIOError(f"{p}: not a Slicer markups file (expected .mrk.json or .fcsv)")
