"""Files and report numbers of a deformable registration (``medreg register --transform ...syn``).

Convention:
    * ``field.nii.gz``: the full fixed->moving mapping ``T`` on the fixed grid, ITK/ANTs
      displacement-field layout (:mod:`medreg.io.fields`); ``inverse_field.nii.gz``: the
      moving->fixed mapping on the moving grid; ``affine.tfm``: the linear part of ``T``
      (the parts applied after the deformable ones), identity when there is none.
    * Label maps are warped with nearest-neighbour interpolation; Dice compares the fixed
      labels with the warped moving labels on the fixed grid.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from medreg.core.grid import Grid
from medreg.core.image import Image
from medreg.deformable.transforms import DisplacementField, dense_from_transform
from medreg.errors import MedregError
from medreg.evaluation.jacobian import (
    folding_percent,
    inverse_consistency,
    jacobian_map,
    std_log_jacobian,
)
from medreg.evaluation.overlap import dice
from medreg.io.fields import write_displacement_field
from medreg.io.images import write_image
from medreg.resample import resample
from medreg.transforms.base import Compose, Transform
from medreg.transforms.linear import Affine


def _parts(transform: Transform) -> list[Transform]:
    return list(transform.parts) if isinstance(transform, Compose) else [transform]


def linear_part(transform: Transform) -> Transform:
    """The trailing linear parts of ``T`` composed (identity ``Affine`` when there are none)."""
    tail: list[Transform] = []
    for part in reversed(_parts(transform)):
        if not part.is_linear:
            break
        tail.insert(0, part)
    if not tail:
        return Affine(transform.ndim)
    return tail[0] if len(tail) == 1 else Compose(*tail)


def numerical_inverse(transform: Transform) -> Transform:
    """Inverse of any composition: closed form where a part has one, else fixed-point.

    Deformable parts without ``inverse()`` (B-spline) are sampled on their grid and inverted
    by :func:`medreg.deformable.fields.invert_displacement`.
    """
    inv = []
    for part in reversed(_parts(transform)):
        try:
            inv.append(part.inverse())
        except TypeError:
            grid = getattr(part, "grid", None)
            if grid is None:
                raise MedregError(f"cannot invert {type(part).__name__}: no inverse and no grid"
                                  ) from None
            inv.append(dense_from_transform(part, grid).inverse())
    return inv[0] if len(inv) == 1 else Compose(*inv)


def _inversion_residual(transform: Transform) -> dict[str, float] | None:
    for part in _parts(transform):
        res = getattr(part, "inversion", None)
        if isinstance(part, DisplacementField) and res is not None:
            return dict(max_mm=res.residual_max, mean_mm=res.residual_mean,
                        iterations=res.iterations)
    return None


def _check_labels(labels_fixed: Image | None, labels_moving: Image | None,
                  fixed: Image, moving: Image) -> None:
    if (labels_fixed is None) != (labels_moving is None):
        raise MedregError("give both fixed and moving label maps for a Dice report")
    for name, lab, img in (("fixed", labels_fixed, fixed), ("moving", labels_moving, moving)):
        if lab is None:
            continue
        if lab.tensor.is_floating_point():
            raise MedregError(f"{name} label map has float voxels; labels must be integers")
        if lab.ndim != img.ndim:
            raise MedregError(f"{name} label map is {lab.ndim}D but the image is {img.ndim}D")


def write_deformable_outputs(result_transform: Transform, inverse: Transform | None,
                             fixed: Image, moving: Image, outdir: str | Path,
                             labels_fixed: Image | None = None,
                             labels_moving: Image | None = None) -> dict[str, Any]:
    """Write fields, the linear part, warped labels and QC pictures; return report numbers.

    Args:
        result_transform: full fixed->moving transform.
        inverse: moving->fixed transform, or ``None`` to compute it numerically.
        fixed, moving: the registered images (their grids define the fields).
        outdir: output folder (created).
        labels_fixed, labels_moving: optional integer label maps for Dice.

    Returns:
        dict with ``files``, ``folding_percent``, ``std_log_jacobian``, ``jacobian_min/max``,
        ``inverse_consistency_mm``, ``inverse_residual`` and ``dice`` (when labels are given).
    """
    _check_labels(labels_fixed, labels_moving, fixed, moving)
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    inverse = inverse if inverse is not None else numerical_inverse(result_transform)
    files = dict(field=write_displacement_field(result_transform, fixed.grid, out / "field.nii.gz"),
                 inverse_field=write_displacement_field(inverse, moving.grid,
                                                        out / "inverse_field.nii.gz"),
                 affine=_write_linear(linear_part(result_transform), out / "affine.tfm"))
    jac = jacobian_map(result_transform, fixed.grid)
    report: dict[str, Any] = dict(
        folding_percent=folding_percent(jac), std_log_jacobian=std_log_jacobian(jac),
        jacobian_min=float(jac.tensor.min()), jacobian_max=float(jac.tensor.max()),
        inverse_consistency_mm=inverse_consistency(result_transform, inverse,
                                                   _coarse(fixed.grid)),
        inverse_residual=_inversion_residual(inverse))
    if labels_fixed is not None and labels_moving is not None:
        warped = resample(labels_moving, labels_fixed.grid, result_transform,
                          interpolation="nearest")
        files["warped_labels"] = write_image(warped, out / "warped_labels.nii.gz")
        d = dice(labels_fixed, warped)
        report["dice"] = dict(mean=d["mean"], per_label={str(k): v for k, v in
                                                         d["per_label"].items()})
        mask = labels_fixed.tensor[0] > 0
        report["folding_percent_in_labels"] = folding_percent(jac, mask)
        report["std_log_jacobian_in_labels"] = std_log_jacobian(jac, mask)
    files["qc_grid"] = deformed_grid_figure(result_transform, fixed, out / "qc_grid.png")
    files["qc_jacobian"] = jacobian_figure(jac, out / "qc_jacobian.png")
    report["files"] = {k: str(v) for k, v in files.items()}
    return report


def _coarse(grid: Grid, max_points: int = 300_000) -> Grid:
    factor = max(1.0, (grid.numel / max_points) ** (1 / grid.ndim))
    return grid.downsample(factor) if factor > 1 else grid


def _write_linear(transform: Transform, path: Path) -> Path:
    from medreg.io.transforms import write_transform

    return write_transform(transform, path)


def _mid_slices(grid: Grid) -> list[tuple[str, int, int]]:
    """``(name, coordinate axis held fixed, index)`` of the central slices."""
    if grid.ndim == 2:
        return [("", 2, 0)]
    return [(n, a, grid.size[a] // 2) for n, a in (("sagittal", 0), ("coronal", 1),
                                                    ("axial", 2))]


def _slice(volume: np.ndarray, grid: Grid, axis: int, index: int) -> np.ndarray:
    """2D array of a ``(*S)`` tensor-order volume with coordinate ``axis`` held at ``index``."""
    if grid.ndim == 2:
        return volume
    return np.take(volume, index, axis=grid.ndim - 1 - axis)


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=100)
    return path


def deformed_grid_figure(transform: Transform, fixed: Image, path: str | Path,
                         lines: int = 24) -> Path:
    """Central slices of the fixed image with the deformed grid ``T(x)`` drawn on top.

    Convention: each panel shows the slice's two in-plane index axes; a grid line through
    voxels ``x`` is drawn at ``x + P (T(x) - x)`` in voxel units, ``P`` projecting the world
    displacement onto the slice's index axes (linear parts of ``T`` included).
    """
    grid = fixed.grid
    disp = dense_from_transform(transform, grid).field[0].numpy()  # (dim, *S)
    img = fixed.numpy()[0].astype(np.float32)
    panels = _mid_slices(grid)
    fig = Figure(figsize=(4 * len(panels), 4))
    inv_axes = np.linalg.inv(grid.direction_matrix @ np.diag(grid.spacing))  # world -> index
    for k, (name, axis, index) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), k + 1)
        plane = [a for a in range(grid.ndim) if a != axis]
        vec = np.einsum("ij,j...->i...", inv_axes, disp)  # index-unit displacement
        u = [_slice(vec[a], grid, axis, index) for a in plane]  # (rows, cols) = (2nd, 1st)
        ax.imshow(_slice(img, grid, axis, index), cmap="gray", origin="lower")
        rows, cols = u[0].shape
        jj, ii = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
        x, y = ii + u[0], jj + u[1]
        step_r, step_c = max(rows // lines, 1), max(cols // lines, 1)
        for r in range(0, rows, step_r):
            ax.plot(x[r], y[r], color="yellow", lw=0.5)
        for c in range(0, cols, step_c):
            ax.plot(x[:, c], y[:, c], color="yellow", lw=0.5)
        ax.set_title(f"deformed grid {name}".strip())
        ax.set_axis_off()
    return _save(fig, Path(path))


def jacobian_figure(jac: Image, path: str | Path) -> Path:
    """Central slices of ``log det J`` (blue: shrink, red: grow; black: folded voxels)."""
    grid = jac.grid
    det = jac.numpy()[0]
    logj = np.log(np.clip(det, 1e-6, None))
    lim = max(float(np.percentile(np.abs(logj), 99.5)), 1e-3)
    panels = _mid_slices(grid)
    fig = Figure(figsize=(4 * len(panels) + 1, 4))
    for k, (name, axis, index) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), k + 1)
        sl = _slice(logj, grid, axis, index)
        im = ax.imshow(np.ma.masked_where(_slice(det, grid, axis, index) <= 0, sl), cmap="RdBu_r",
                       vmin=-lim, vmax=lim, origin="lower")
        ax.set_facecolor("black")
        ax.set_title(f"log det J {name}".strip())
        ax.set_axis_off()
    fig.colorbar(im, ax=fig.axes, shrink=0.8)
    return _save(fig, Path(path))


__all__ = ["deformed_grid_figure", "jacobian_figure", "linear_part", "numerical_inverse",
           "write_deformable_outputs"]
