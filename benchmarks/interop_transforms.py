"""Transform-file interoperability with ANTsPy (and ITK Python): both directions, 2D and 3D.

Run in the benchmark environment::

    .venv-bench/bin/python benchmarks/interop_transforms.py

medreg writes ``.mat``/``.tfm`` -> ANTs reads and maps points; ANTs writes -> medreg reads;
the same points must land on the same points (max difference printed, in mm). Exit code 1 when
any difference exceeds TOL (1e-4 mm). Not a test: ANTsPy is only in ``.venv-bench``.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from medreg import Affine, Rigid, Similarity
from medreg.io import read_transform, write_transform

TOL = 1e-4  # mm: ANTsPy maps points in single precision (~1e-7 relative at 100 mm)


def _points(ndim: int) -> np.ndarray:
    return np.random.default_rng(0).uniform(-100, 100, (20, ndim))


def _medreg_map(t, pts: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return t(torch.as_tensor(pts, dtype=torch.float64)).numpy()


def medreg_to_ants(tmp: Path) -> list[tuple[str, float]]:
    """medreg writes; ``ants.read_transform(...).apply_to_point`` maps the points."""
    import ants

    out = []
    for ndim in (2, 3):
        c = [10.0, -20.0, 30.0][:ndim]
        rot = [0.2] if ndim == 2 else [0.1, -0.2, 0.15]
        a = np.eye(ndim) + np.random.default_rng(ndim).normal(0, 0.05, (ndim, ndim))
        for t in (Rigid(ndim, rot, [3.0, -4.0, 5.0][:ndim], center=c),
                  Similarity(ndim, rot, [1.0, 2.0, 3.0][:ndim], scale=1.1, center=c),
                  Affine(ndim, a, [-2.0, 6.0, 1.0][:ndim], center=c)):
            for suffix in (".mat", ".tfm"):
                path = write_transform(t, tmp / f"m{ndim}{type(t).__name__}{suffix}")
                tx = ants.read_transform(str(path), precision="double")
                pts = _points(ndim)
                got = np.array([tx.apply_to_point(tuple(p)) for p in pts])
                err = float(np.abs(got - _medreg_map(t, pts)).max())
                out.append((f"medreg -> ANTs {ndim}D {type(t).__name__} {suffix}", err))
    return out


def ants_to_medreg(tmp: Path) -> list[tuple[str, float]]:
    """ANTs writes an affine with a centre; medreg reads it and maps the points."""
    import ants

    out = []
    for ndim in (2, 3):
        m = np.eye(ndim) + np.random.default_rng(10 + ndim).normal(0, 0.05, (ndim, ndim))
        tx = ants.create_ants_transform(transform_type="AffineTransform", dimension=ndim,
                                        precision="double",
                                        matrix=m, translation=[4.0, -3.0, 2.0][:ndim],
                                        center=[5.0, 15.0, -25.0][:ndim])
        for suffix in (".mat", ".tfm"):
            path = tmp / f"ants{ndim}{suffix}"
            ants.write_transform(tx, str(path))
            t = read_transform(path)
            pts = _points(ndim)
            want = np.array([tx.apply_to_point(tuple(p)) for p in pts])
            err = float(np.abs(_medreg_map(t, pts) - want).max())
            out.append((f"ANTs -> medreg {ndim}D AffineTransform {suffix}", err))
    return out


def main() -> int:
    with tempfile.TemporaryDirectory() as d:
        rows = medreg_to_ants(Path(d)) + ants_to_medreg(Path(d))
    worst = max(e for _, e in rows)
    for name, err in rows:
        print(f"{name:45s} max |difference| = {err:.2e} mm")
    print(f"worst {worst:.2e} mm: {'OK' if worst < TOL else 'FAILED'}")
    return 0 if worst < TOL else 1


if __name__ == "__main__":
    sys.exit(main())
