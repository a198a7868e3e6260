"""Homography files: JSON with the 3x3 matrix, its convention and the image grids.

ITK has no 2D projective transform type, so a :class:`~medreg.transforms.homography.Homography`
is written as JSON instead of ``transform.tfm``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from medreg.core.grid import Grid
from medreg.errors import InputFileError
from medreg.transforms.homography import Homography

CONVENTION = ("maps fixed world (LPS mm) to moving world: [u, v, w] = H [x, y, 1], "
              "T(x, y) = (u / w, v / w); warped(x) = moving(T(x))")


def write_homography(h: Homography, path: str | os.PathLike, *, fixed_grid: Grid | None = None,
                     moving_grid: Grid | None = None) -> Path:
    """Write ``h`` (and optionally the grids it relates) as JSON; returns the path."""
    doc = {"type": "Homography2D", "convention": CONVENTION,
           "matrix": h.matrix_numpy().tolist(),
           "inverse_matrix": np.linalg.inv(h.matrix_numpy()).tolist(),
           "fixed_grid": fixed_grid.to_dict() if fixed_grid is not None else None,
           "moving_grid": moving_grid.to_dict() if moving_grid is not None else None}
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return p


def read_homography(path: str | os.PathLike) -> Homography:
    """Read a file written by :func:`write_homography`."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
        if doc.get("type") != "Homography2D":
            raise ValueError(f"type is {doc.get('type')!r}, not 'Homography2D'")
        return Homography(np.asarray(doc["matrix"], dtype=np.float64))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputFileError(f"cannot read homography file {p}: {exc}") from exc
