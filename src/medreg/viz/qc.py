"""Quality-control pictures: checkerboard, magenta/green overlay and difference, before/after.

Convention:
    * Inputs are :class:`~medreg.core.image.Image` objects shown on the **fixed grid**: the
      moving image "before" (identity) and the warped image "after". An input on another grid
      is resampled onto the fixed grid with the identity (world positions kept, linear).
    * 2D arrays are ``(H, W)`` in tensor order; they are drawn with row 0 at the top and
      column 0 on the left (index space, no world flips), the same way for every panel.
    * Intensities are normalized robustly: the 1st..99th percentiles of each image map to
      [0, 1] (clipped), so outliers and different modalities stay comparable.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from medreg.core.image import Image
from medreg.errors import MedregError

_PERCENTILES = (1.0, 99.0)


def normalize(array: np.ndarray, percentiles: Sequence[float] = _PERCENTILES) -> np.ndarray:
    """Map the given percentiles of ``array`` to 0 and 1 and clip; float64, same shape.

    A constant image becomes all zeros. NaN/Inf are ignored for the percentiles and set to 0.
    """
    a = np.asarray(array, dtype=np.float64)
    finite = np.isfinite(a)
    if not finite.any():
        return np.zeros_like(a)
    lo, hi = np.percentile(a[finite], percentiles)
    if hi - lo <= 1e-12 * max(abs(hi), 1.0):
        return np.zeros_like(a)
    return np.clip(np.where(finite, (a - lo) / (hi - lo), 0.0), 0.0, 1.0)


def _check_pair(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise MedregError(f"QC images must have the same shape, got {a.shape} and {b.shape}")


def checkerboard(a: np.ndarray, b: np.ndarray, tiles: int | Sequence[int] = 8) -> np.ndarray:
    """Alternate square tiles of ``a`` and ``b`` (both ``(H, W)`` or ``(D, H, W)``).

    Args:
        a, b: arrays of the same shape (normalize them first for display).
        tiles: number of tiles along every axis, or one count per axis (tensor order).

    Returns:
        Array of the same shape; the tile containing index 0 comes from ``a``.
    """
    a, b = np.asarray(a), np.asarray(b)
    _check_pair(a, b)
    counts = [int(tiles)] * a.ndim if np.isscalar(tiles) else [int(t) for t in tiles]
    if len(counts) != a.ndim or min(counts) < 1:
        raise MedregError(f"checkerboard tiles must be positive, one per axis; got {tiles}")
    parity = np.zeros(a.shape, dtype=np.int64)
    for axis, (n, k) in enumerate(zip(a.shape, counts, strict=True)):
        idx = (np.arange(n) * k) // max(n, 1)
        shape = [1] * a.ndim
        shape[axis] = n
        parity = parity + idx.reshape(shape)
    return np.where(parity % 2 == 0, a, b)


def overlay(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Magenta/green overlay ``(..., 3)`` RGB in [0, 1]: ``a`` in magenta, ``b`` in green.

    Where both agree the pixel is grey; magenta shows ``a`` brighter, green shows ``b``
    brighter. Inputs are normalized with :func:`normalize`.
    """
    a, b = np.asarray(a), np.asarray(b)
    _check_pair(a, b)
    na, nb = normalize(a), normalize(b)
    return np.stack([na, nb, na], axis=-1)


def difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Signed difference of the normalized images, ``normalize(a) - normalize(b)`` in [-1, 1]."""
    a, b = np.asarray(a), np.asarray(b)
    _check_pair(a, b)
    return normalize(a) - normalize(b)


def orthogonal_slices(volume: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """Mid-slices of a ``(D, H, W)`` volume in its three index orientations, or the 2D image.

    Returns:
        ``[(label, (rows, cols) array), ...]``: for 3D, the slice across D (axial for an
        axial acquisition), across H and across W, each flipped so the slowest remaining index
        axis runs upwards; for 2D a single ``(H, W)`` image.
    """
    v = np.asarray(volume)
    if v.ndim == 2:
        return [("image", v)]
    if v.ndim != 3:
        raise MedregError(f"QC needs a 2D or 3D image, got {v.ndim} dimensions")
    d, h, w = v.shape
    return [("k (z) mid-slice", v[d // 2]),
            ("j (y) mid-slice", v[:, h // 2, :][::-1]),
            ("i (x) mid-slice", v[:, :, w // 2][::-1])]


def _scalar(image: Image, name: str) -> np.ndarray:
    if not isinstance(image, Image):
        raise MedregError(f"{name} must be a medreg Image, got {type(image).__name__}")
    data = image.numpy().astype(np.float64)
    return data.mean(axis=0) if data.shape[0] > 1 else data[0]


def _on_grid(image: Image, fixed: Image, name: str) -> Image:
    """``image`` on the fixed grid (identity resampling when the grids differ)."""
    from medreg.resample import resample

    if not isinstance(image, Image):
        raise MedregError(f"{name} must be a medreg Image, got {type(image).__name__}")
    if image.ndim != fixed.ndim:
        raise MedregError(f"QC {name} is {image.ndim}D but the fixed image is {fixed.ndim}D")
    if image.grid.is_close(fixed.grid):
        return image
    return resample(image.to(torch.float64), fixed.grid)


def qc_figure(fixed: Image, moving_before: Image, warped_after: Image,
              path: str | os.PathLike, *, tiles: int = 8, title: str | None = None) -> Path:
    """Write one PNG: rows before/after x columns (checkerboard, overlay, difference).

    Args:
        fixed: fixed image ``(C, *S)`` (multi-channel images are averaged).
        moving_before: moving image before registration (resampled onto the fixed grid
            with the identity when it lies on another grid).
        warped_after: moving image warped onto the fixed grid by the result.
        path: output PNG path (parent folders are created).
        tiles: checkerboard tiles per axis.
        title: optional figure title.

    Returns:
        The PNG path. A 3D input shows its three mid-slice orientations side by side in
        each panel group (one row per orientation and stage).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    f = _scalar(fixed, "fixed")
    pairs = [("before", _scalar(_on_grid(moving_before, fixed, "moving_before"), "")),
             ("after", _scalar(_on_grid(warped_after, fixed, "warped_after"), ""))]
    views = [(stage, label, fs, ms) for stage, m in pairs
             for (label, fs), (_, ms) in zip(orthogonal_slices(f), orthogonal_slices(m),
                                             strict=True)]
    fig = Figure(figsize=(11, 3.4 * len(views)), layout="constrained")
    FigureCanvasAgg(fig)  # the Agg canvas, set on this figure only: no display, no global state
    axes = fig.subplots(len(views), 3, squeeze=False)
    for row, (stage, label, fs, ms) in enumerate(views):
        _draw_row(axes[row], normalize(fs), normalize(ms), f"{stage}, {label}", tiles)
    if title:
        fig.suptitle(title)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    return out


def _draw_row(axes, fs: np.ndarray, ms: np.ndarray, label: str, tiles: int) -> None:
    """Checkerboard, overlay and difference panels of one slice pair."""
    panels = [(checkerboard(fs, ms, tiles), dict(cmap="gray", vmin=0, vmax=1), "checkerboard"),
              (overlay(fs, ms), {}, "overlay (fixed magenta, moving green)"),
              (difference(fs, ms), dict(cmap="RdBu_r", vmin=-1, vmax=1), "difference")]
    for ax, (img, kw, name) in zip(axes, panels, strict=True):
        ax.imshow(img, interpolation="nearest", **kw)
        ax.set_title(f"{label}: {name}", fontsize=8)
        ax.set_axis_off()
