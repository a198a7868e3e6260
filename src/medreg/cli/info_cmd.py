"""``medreg info``: print the geometry and value range of images and transform files.

Convention: geometry is reported in LPS mm as medreg holds it (NIfTI RAS headers are converted
on reading); sizes, spacings and origins are ordered (x, y[, z]); the direction matrix's
columns are the index axes. Transforms are reported as fixed->moving matrices.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from medreg.errors import InputFileError, MedregError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``medreg info``."""
    p = subparsers.add_parser(
        "info", help="print geometry, dtype and value range of images or transform files",
        description="Print the geometry (LPS mm), dtype and value range of images, or the "
                    "fixed->moving matrix of transform files (.tfm/.txt/.mat/.h5).")
    p.add_argument("files", nargs="+", metavar="FILE", help="image, DICOM folder or transform")
    p.add_argument("--json", action="store_true", help="print one JSON object per file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Describe every file; the first unreadable one ends the command with a clear error."""
    from medreg.io.transforms import is_transform_path

    for name in args.files:
        path = Path(name)
        if not path.exists():
            raise InputFileError(f"file not found: {path}")
        info = describe_transform(path) if is_transform_path(path) else describe_image(path)
        print(json.dumps(info) if args.json else format_info(info))
    return 0


def describe_image(path: Path) -> dict:
    """Geometry, dtype and intensity statistics of an image file."""
    from medreg.io.images import read_image

    image = read_image(path)
    g = image.grid
    data = image.tensor.detach()
    values = data.to(torch.float64)
    finite = torch.isfinite(values)
    corners = _world_corners(g)
    info = dict(file=str(path), kind="image", ndim=g.ndim, size=list(g.size),
                channels=image.channels, dtype=str(data.dtype).replace("torch.", ""),
                spacing=list(g.spacing), origin=list(g.origin),
                direction=g.direction_matrix.round(6).tolist(),
                world_min=corners.min(0).tolist(), world_max=corners.max(0).tolist(),
                non_finite=int((~finite).sum()))
    if finite.any():
        v = values[finite]
        info.update(min=float(v.min()), max=float(v.max()), mean=float(v.mean()))
    return info


def _world_corners(grid) -> np.ndarray:
    """``(2**dim, dim)`` world positions of the corner voxel centres."""
    d = grid.ndim
    idx = np.array(np.meshgrid(*[[0, n - 1] for n in grid.size], indexing="ij")).reshape(d, -1).T
    return grid.index_to_world(idx.astype(np.float64))


def describe_transform(path: Path) -> dict:
    """ITK type(s), dimension and fixed->moving matrix of a transform file."""
    import SimpleITK as sitk

    from medreg.io.transforms import read_transform

    try:
        tx = sitk.ReadTransform(str(path)).Downcast()
    except RuntimeError as exc:
        raise InputFileError(f"cannot read transform {path}: not an ITK transform file") from exc
    parts = ([tx.GetNthTransform(i).GetName() for i in range(tx.GetNumberOfTransforms())]
             if isinstance(tx, sitk.CompositeTransform) else [tx.GetName()])
    info = dict(file=str(path), kind="transform", ndim=tx.GetDimension(), itk_types=parts,
                direction="fixed->moving")
    try:
        t = read_transform(path)
    except MedregError as exc:  # e.g. a displacement field without deformable support
        info["note"] = str(exc)
        return info
    if t.is_linear:
        m = t.matrix().detach().to(torch.float64).numpy()
        d = t.ndim
        info.update(matrix=m.tolist(), determinant=float(np.linalg.det(m[:d, :d])),
                    translation_at_origin=m[:d, d].tolist())
        if hasattr(t, "center"):
            info["center"] = t.center.tolist()
    return info


def format_info(info: dict) -> str:
    """Human-readable lines for one :func:`describe_image`/:func:`describe_transform` dict."""
    fmt = lambda v: "(" + ", ".join(f"{x:.6g}" for x in v) + ")"  # noqa: E731
    lines = [f"{info['file']}: {info['ndim']}D {info['kind']}"]
    if info["kind"] == "image":
        lines += [f"  size      {tuple(info['size'])} x {info['channels']} channel(s)",
                  f"  dtype     {info['dtype']}",
                  f"  spacing   {fmt(info['spacing'])} mm",
                  f"  origin    {fmt(info['origin'])} mm (LPS)",
                  "  direction " + " ".join(fmt(r) for r in info["direction"]) + " (rows)",
                  f"  bounds    {fmt(info['world_min'])} .. {fmt(info['world_max'])} mm "
                  "(LPS, voxel centres)"]
        if "min" in info:
            lines.append(f"  range     [{info['min']:.6g}, {info['max']:.6g}], "
                         f"mean {info['mean']:.6g}")
        if info["non_finite"]:
            lines.append(f"  WARNING   {info['non_finite']} NaN/Inf voxels")
        return "\n".join(lines)
    lines.append(f"  ITK types {', '.join(info['itk_types'])} (maps fixed -> moving, LPS mm)")
    if "matrix" in info:
        lines.append("  matrix    " + "\n            ".join(fmt(r) for r in info["matrix"]))
        lines.append(f"  det(A)    {info['determinant']:.6g}")
        if "center" in info:
            lines.append(f"  centre    {fmt(info['center'])} mm")
    if "note" in info:
        lines.append(f"  note      {info['note']}")
    return "\n".join(lines)
