"""Landmark (point) files: CSV, 3D Slicer ``.fcsv`` / ``.mrk.json``, elastix/ITK point text.

Convention:
    * Points returned and accepted here are ``(n, dim)`` world coordinates in **LPS mm**,
      ordered ``(x, y[, z])`` (medreg's world).
    * CSV: a header naming columns ``x, y[, z]`` (any case; an optional ``label``/``name``
      column), values in LPS mm.
    * Slicer files carry their own coordinate system: ``.fcsv`` in the ``# CoordinateSystem``
      comment (``RAS``/``LPS`` or the old codes 0 = RAS, 1 = LPS; absent means RAS, Slicer's
      historical default) and ``.mrk.json`` in ``coordinateSystem`` (default LPS). RAS points are
      converted with ``(x, y, z) -> (-x, -y, z)``. Files are always written in LPS.
    * ITK/elastix point text: first line ``point`` (LPS world mm) or ``index`` (voxel indices,
      converted with a given grid), second line the count, then one point per line.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medreg.core.grid import Grid
from medreg.errors import InputFileError, MedregError

POINT_SUFFIXES = (".csv", ".fcsv", ".mrk.json", ".txt", ".pts")
_RAS_LPS = np.array([-1.0, -1.0, 1.0])
_SLICER_SCHEMA = ("https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/"
                  "Markups/Resources/Schema/markups-schema-v1.0.3.json#")


@dataclass
class PointSet:
    """Landmarks read from a file.

    Attributes:
        points: ``(n, dim)`` float64 LPS mm.
        labels: one name per point (may be empty strings).
    """

    points: np.ndarray
    labels: list[str] = field(default_factory=list)


def _kind(path: Path) -> str:
    name = path.name.lower()
    for s in POINT_SUFFIXES:
        if name.endswith(s):
            return s
    raise InputFileError(f"unknown landmark file type {path.name!r}; use one of "
                         f"{', '.join(POINT_SUFFIXES)}")


def read_points(path: str | os.PathLike, *, ndim: int | None = None,
                grid: Grid | None = None) -> PointSet:
    """Read a landmark file into LPS world points.

    Args:
        path: ``.csv``, ``.fcsv``, ``.mrk.json`` or ITK/elastix ``.txt``/``.pts``.
        ndim: 2 keeps x and y of 3D points (Slicer files are always 3D) after checking that
            z is constant; default keeps what the file holds.
        grid: needed for ITK/elastix ``index`` files (voxel indices -> world).

    Returns:
        :class:`PointSet` with ``(n, dim)`` points in LPS mm.
    """
    p = Path(path)
    if not p.is_file():
        raise InputFileError(f"landmark file not found: {p}")
    kind = _kind(p)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputFileError(f"cannot read landmark file {p}: {exc}") from exc
    try:
        reader = {".csv": _read_csv, ".fcsv": _read_fcsv, ".mrk.json": _read_mrk_json}.get(kind)
        result = reader(text) if reader else _read_itk(text, grid)
    except MedregError as exc:
        raise InputFileError(f"landmark file {p}: {exc}") from exc
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise InputFileError(f"landmark file {p} is malformed: {type(exc).__name__}: {exc}") \
            from exc
    if len(result.points) == 0:
        raise InputFileError(f"landmark file {p} holds no points")
    return _to_ndim(result, ndim, p)


def _to_ndim(ps: PointSet, ndim: int | None, p: Path) -> PointSet:
    if ndim is None or ndim == ps.points.shape[1]:
        return ps
    if ndim == 2 and ps.points.shape[1] == 3:
        z = ps.points[:, 2]
        if np.ptp(z) > 1e-6 * max(1.0, float(np.abs(z).max())):
            raise InputFileError(f"landmark file {p}: 2D points requested but z varies "
                                 f"from {z.min():g} to {z.max():g}")
        return PointSet(ps.points[:, :2].copy(), ps.labels)
    raise InputFileError(f"landmark file {p} holds {ps.points.shape[1]}D points; "
                         f"{ndim}D were requested")


def _read_csv(text: str) -> PointSet:
    rows = list(csv.reader(io.StringIO(text)))
    rows = [r for r in rows if any(c.strip() for c in r)]
    if not rows:
        raise MedregError("the CSV file is empty; a header x,y[,z] and rows are needed")
    header = [c.strip().lower() for c in rows[0]]
    if "x" not in header or "y" not in header:
        raise MedregError(f"CSV header {rows[0]} lacks x and y columns; a header naming "
                          f"x,y[,z] (LPS mm) is needed")
    cols = [header.index(a) for a in ("x", "y", "z") if a in header]
    lab = next((header.index(a) for a in ("label", "name", "id") if a in header), None)
    pts = np.array([[float(r[c]) for c in cols] for r in rows[1:]], dtype=np.float64)
    labels = [r[lab].strip() if lab is not None else "" for r in rows[1:]]
    return PointSet(pts.reshape(-1, len(cols)), labels)


def _fcsv_system(text: str) -> str:
    for line in text.splitlines():
        if line.startswith("#") and "coordinatesystem" in line.lower().replace(" ", ""):
            value = line.split("=", 1)[1].strip().upper()
            return {"0": "RAS", "1": "LPS", "RAS": "RAS", "LPS": "LPS"}.get(value, value)
    return "RAS"


def _read_fcsv(text: str) -> PointSet:
    system = _fcsv_system(text)
    if system not in ("RAS", "LPS"):
        raise MedregError(f"unsupported .fcsv coordinate system {system!r}; RAS or LPS needed")
    columns = ["id", "x", "y", "z"] + [""] * 10
    for line in text.splitlines():
        if line.startswith("#") and line[1:].strip().lower().startswith("columns"):
            columns = [c.strip().lower() for c in line.split("=", 1)[1].split(",")]
    body = [r for r in csv.reader(io.StringIO(text)) if r and not r[0].startswith("#")]
    ix = [columns.index(a) for a in ("x", "y", "z")]
    lab = columns.index("label") if "label" in columns else None
    pts = np.array([[float(r[i]) for i in ix] for r in body], dtype=np.float64).reshape(-1, 3)
    labels = [r[lab] if lab is not None and lab < len(r) else "" for r in body]
    return PointSet(pts * _RAS_LPS if system == "RAS" else pts, labels)


def _read_mrk_json(text: str) -> PointSet:
    doc = json.loads(text)
    markups = doc.get("markups") or []
    if not markups:
        raise MedregError("no 'markups' list in the .mrk.json file")
    pts, labels = [], []
    for mk in markups:
        system = str(mk.get("coordinateSystem", "LPS")).upper()
        if system not in ("RAS", "LPS"):
            raise MedregError(f"unsupported markups coordinate system {system!r}")
        for cp in mk.get("controlPoints", []):
            pos = np.asarray(cp["position"], dtype=np.float64)
            pts.append(pos * _RAS_LPS if system == "RAS" else pos)
            labels.append(str(cp.get("label", "")))
    return PointSet(np.array(pts, dtype=np.float64).reshape(-1, 3), labels)


def _read_itk(text: str, grid: Grid | None) -> PointSet:
    lines = [ln.split("//")[0].strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln]
    if len(lines) < 2 or lines[0].lower() not in ("point", "index"):
        raise MedregError("ITK/elastix point files start with 'point' or 'index', then the count")
    n = int(float(lines[1]))
    pts = np.array([[float(v) for v in ln.split()] for ln in lines[2:]], dtype=np.float64)
    if len(pts) != n:
        raise MedregError(f"header announces {n} points but {len(pts)} follow")
    if pts.ndim != 2 or pts.shape[1] not in (2, 3):
        raise MedregError(f"points must have 2 or 3 coordinates, got rows of {pts.shape[-1]}")
    if lines[0].lower() == "index":
        if grid is None or grid.ndim != pts.shape[1]:
            raise MedregError("an 'index' point file needs the image grid to convert voxel "
                              "indices to world coordinates")
        pts = grid.index_to_world(pts)
    return PointSet(pts, [""] * len(pts))


# --------------------------------------------------------------------------- writing
def write_points(path: str | os.PathLike, points, labels: list[str] | None = None) -> Path:
    """Write ``(n, dim)`` LPS points; the format follows the suffix (Slicer files in LPS).

    2D points get ``z = 0`` in Slicer files, which are always 3D.
    """
    p = Path(path)
    kind = _kind(p)
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] not in (2, 3):
        raise MedregError(f"points must be an (n, 2) or (n, 3) array, got shape {pts.shape}")
    labels = list(labels) if labels is not None else [f"P{i + 1}" for i in range(len(pts))]
    if len(labels) != len(pts):
        raise MedregError(f"{len(labels)} labels given for {len(pts)} points")
    writer = {".csv": _csv_text, ".fcsv": _fcsv_text, ".mrk.json": _mrk_json_text}.get(kind)
    text = writer(pts, labels) if writer else _itk_text(pts)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text, encoding="utf-8")
    return p


def _pad3(pts: np.ndarray) -> np.ndarray:
    return pts if pts.shape[1] == 3 else np.hstack([pts, np.zeros((len(pts), 1))])


def _csv_text(pts: np.ndarray, labels: list[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["label", "x", "y", "z"][: pts.shape[1] + 1])
    for lab, row in zip(labels, pts, strict=True):
        w.writerow([lab, *(repr(float(v)) for v in row)])
    return buf.getvalue()


def _fcsv_text(pts: np.ndarray, labels: list[str]) -> str:
    lines = ["# Markups fiducial file version = 4.11", "# CoordinateSystem = LPS",
             "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID"]
    for i, (lab, row) in enumerate(zip(labels, _pad3(pts), strict=True)):
        x, y, z = (repr(float(v)) for v in row)
        lines.append(f"{i + 1},{x},{y},{z},0,0,0,1,1,1,0,{lab},,")
    return "\n".join(lines) + "\n"


def _mrk_json_text(pts: np.ndarray, labels: list[str]) -> str:
    cps = [{"id": str(i + 1), "label": lab, "position": [float(v) for v in row],
            "positionStatus": "defined"}
           for i, (lab, row) in enumerate(zip(labels, _pad3(pts), strict=True))]
    doc = {"@schema": _SLICER_SCHEMA,
           "markups": [{"type": "Fiducial", "coordinateSystem": "LPS", "coordinateUnits": "mm",
                        "controlPoints": cps}]}
    return json.dumps(doc, indent=2) + "\n"


def _itk_text(pts: np.ndarray) -> str:
    rows = [" ".join(repr(float(v)) for v in row) for row in pts]
    return "\n".join(["point", str(len(pts)), *rows]) + "\n"
