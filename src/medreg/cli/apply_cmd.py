"""``medreg apply``: apply a transform file to an image, a label map or a CSV of points.

Convention:
    A transform file maps fixed-space points to moving-space points (LPS mm), as medreg and
    ITK/ANTs write them. The two kinds of input therefore go in opposite directions:

    * an **image** (the moving image) is resampled onto the ``--reference`` (fixed) grid:
      ``out(x) = image(T(x))``, so the moving image's content lands in fixed space;
    * **points** are mapped through the transform itself: ``p -> T(p)``, so fixed-space points
      land in moving space. To bring moving-space points (e.g. landmarks picked on the moving
      image) into fixed space, add ``--invert`` (``p -> T^-1(p)``).

    ``--invert`` on an image resamples the fixed image into moving space instead.
"""

from __future__ import annotations

import argparse
import csv
import io
from pathlib import Path

import numpy as np
import torch

from medreg.errors import InputFileError, MedregError
from medreg.io.atomic import atomic_write
from medreg.transforms.base import Transform

INTERPOLATIONS = ("linear", "nearest", "bspline")
_CSV_SUFFIXES = (".csv",)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``medreg apply``."""
    p = subparsers.add_parser(
        "apply", help="apply a transform file to an image, a label map or points",
        description=("Apply a fixed->moving transform file (.tfm/.txt/.mat/.h5). Images are "
                     "resampled onto --reference: out(x) = input(T(x)). Points (CSV with x,y[,z] "
                     "columns, LPS mm) are mapped p -> T(p), i.e. from fixed to moving space; "
                     "use --invert to map moving-space points into fixed space."))
    p.add_argument("transform", help="transform file (fixed->moving), e.g. transform.tfm")
    p.add_argument("input", help="image or label map to resample, or a CSV of points")
    p.add_argument("-o", "--output", required=True, help="output image or CSV file")
    p.add_argument("--reference", help="image whose grid the output takes (images only)")
    p.add_argument("--interpolation", choices=INTERPOLATIONS, default="linear",
                   help="linear (default), nearest (label maps: exact values), bspline (cubic)")
    p.add_argument("--points", action="store_true",
                   help="INPUT is a CSV of points (columns x,y[,z] in LPS mm)")
    p.add_argument("--invert", action="store_true",
                   help="apply the inverse transform (moving->fixed)")
    p.add_argument("--fill", type=float, default=0.0,
                   help="value outside the input image (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``medreg apply``; returns the exit code."""
    from medreg.io.transforms import load_transform

    out = Path(args.output)
    _check_output(out, args.overwrite)
    src = Path(args.input)
    if not src.exists():
        raise InputFileError(f"input file not found: {src}")
    transform = load_transform(args.transform)
    if args.invert:
        transform = _inverse(transform)
    if args.points:
        n = apply_to_points_csv(transform, src, out)
        print(f"mapped {n} points -> {out}")
        return 0
    if src.name.lower().endswith(_CSV_SUFFIXES):
        raise MedregError(f"{src} looks like a CSV of points; pass --points to map points")
    apply_to_image_file(transform, src, out, args.reference, args.interpolation, args.fill)
    print(f"wrote {out}")
    return 0


def _check_output(out: Path, overwrite: bool) -> None:
    if out.exists() and out.is_dir():
        raise FileExistsError(f"output {out} is a folder; give a file name")
    if out.exists() and not overwrite:
        raise FileExistsError(f"output file {out} already exists; pass --overwrite to replace it")


def _inverse(transform: Transform) -> Transform:
    try:
        return transform.inverse()
    except (TypeError, NotImplementedError) as exc:
        raise MedregError(f"--invert: {exc}") from exc


# --------------------------------------------------------------------------- images
def apply_to_image_file(transform: Transform, src: Path, out: Path, reference: str | None,
                        interpolation: str, fill: float) -> Path:
    """Resample the image ``src`` onto the reference grid through ``transform``; write ``out``."""
    from medreg.io.images import read_image, write_image
    from medreg.resample import resample

    if reference is None:
        raise MedregError("--reference is required to resample an image (the output grid)")
    image = read_image(src)
    ref = read_image(reference)
    if image.ndim != ref.ndim or transform.ndim != ref.ndim:
        raise MedregError(f"dimension mismatch: input {image.ndim}D, reference {ref.ndim}D, "
                          f"transform {transform.ndim}D")
    image.check_finite(f"input image {src}")
    warped = resample(image, ref.grid, transform, interpolation=interpolation, fill=fill)
    return write_image(warped, out)


# --------------------------------------------------------------------------- points
def read_points_csv(path: Path, ndim: int) -> tuple[list[str] | None, list[list[str]], list[int]]:
    """Rows of a point CSV and the indices of its coordinate columns.

    Returns:
        ``(header or None, rows, coordinate column indices)``. With a header the columns named
        ``x, y[, z]`` (case-insensitive) are the coordinates; without one the first ``ndim``
        columns are.
    """
    text = path.read_text()
    rows = [r for r in csv.reader(io.StringIO(text)) if r and any(c.strip() for c in r)]
    if not rows:
        raise MedregError(f"point file {path} holds no rows")
    header = None
    if not _is_number(rows[0][0]):
        header, rows = [c.strip() for c in rows[0]], rows[1:]
    names = ("x", "y", "z")[:ndim]
    if header is not None:
        lower = [h.lower() for h in header]
        missing = [n for n in names if n not in lower]
        if missing:
            raise MedregError(f"point file {path} header {header} lacks column(s) "
                              f"{', '.join(missing)} for a {ndim}D transform")
        cols = [lower.index(n) for n in names]
    else:
        cols = list(range(ndim))
    return header, rows, cols


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def points_from_rows(rows: list[list[str]], cols: list[int], path: Path) -> np.ndarray:
    """``(n, ndim)`` float64 coordinates; a clear error names the first bad row."""
    pts = np.empty((len(rows), len(cols)))
    for i, row in enumerate(rows):
        try:
            pts[i] = [float(row[c]) for c in cols]
        except (IndexError, ValueError):
            raise MedregError(f"point file {path} row {i + 1} is not numeric in columns "
                              f"{cols}: {row}") from None
    if not np.isfinite(pts).all():
        raise MedregError(f"point file {path} contains NaN/Inf coordinates")
    return pts


def apply_to_points_csv(transform: Transform, src: Path, out: Path) -> int:
    """Map the points of ``src`` through ``transform`` (``p -> T(p)``); write ``out``.

    Other columns are copied unchanged; the header (if any) is kept.

    Returns:
        The number of points.
    """
    header, rows, cols = read_points_csv(src, transform.ndim)
    pts = points_from_rows(rows, cols, src)
    with torch.no_grad():
        mapped = transform(torch.as_tensor(pts, dtype=torch.float64)).numpy()
    for row, p in zip(rows, mapped, strict=True):
        for c, v in zip(cols, p, strict=True):
            row[c] = repr(float(v))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    if header is not None:
        writer.writerow(header)
    writer.writerows(rows)
    _write_text_atomic(out, buf.getvalue())
    return len(rows)


def _write_text_atomic(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
