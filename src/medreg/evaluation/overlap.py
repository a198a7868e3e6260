"""Label overlap and surface distances.

Convention: label maps are integer :class:`Image` objects on the same grid (label 0 is
background); distances are in world mm (the grid's spacing).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage

from medreg.core.image import Image
from medreg.errors import MedregError


def _check_labels(a: Image, b: Image) -> None:
    for name, im in (("first", a), ("second", b)):
        if im.tensor.is_floating_point():
            raise MedregError(f"{name} label map has float voxels; give an integer label image "
                              "(e.g. warp labels with nearest interpolation)")
    if not a.grid.is_close(b.grid):
        raise MedregError("label maps must share one grid; resample one onto the other first")


def _labels(a: Image, b: Image, labels: Sequence[int] | None) -> list[int]:
    if labels is not None:
        return [int(v) for v in labels]
    both = torch.cat([a.tensor.unique(), b.tensor.unique()]).unique()
    return [int(v) for v in both.tolist() if v != 0]


def dice(a: Image, b: Image, labels: Sequence[int] | None = None) -> dict:
    """Dice per label and their mean.

    Args:
        a, b: integer label maps on the same grid.
        labels: labels to score (default: every non-zero label in either map).

    Returns:
        ``{"per_label": {label: dice}, "mean": float}``; a label absent from both maps scores
        nan and is left out of the mean.
    """
    _check_labels(a, b)
    ta, tb = a.tensor.reshape(-1).long(), b.tensor.reshape(-1).long()
    labs = _labels(a, b, labels)
    n = int(max(labs + [int(ta.max()), int(tb.max())])) + 1 if labs else 1
    ca = torch.bincount(ta.clamp_min(0), minlength=n).double()
    cb = torch.bincount(tb.clamp_min(0), minlength=n).double()
    both = torch.bincount(ta[ta == tb].clamp_min(0), minlength=n).double()
    per = {}
    for lab in labs:
        denom = float(ca[lab] + cb[lab])
        per[lab] = 2 * float(both[lab]) / denom if denom > 0 else float("nan")
    vals = [v for v in per.values() if v == v]
    return dict(per_label=per, mean=float(np.mean(vals)) if vals else float("nan"))


def _surface_distances(x: np.ndarray, y: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Distances (mm) from the surface voxels of ``x`` to the surface of ``y``."""
    sx = x & ~ndimage.binary_erosion(x)
    sy = y & ~ndimage.binary_erosion(y)
    dt = ndimage.distance_transform_edt(~sy, sampling=spacing)
    return dt[sx]


def hausdorff95(a: Image, b: Image, labels: Sequence[int] | None = None) -> dict:
    """Symmetric 95th-percentile Hausdorff distance (mm) per label and their mean.

    Returns:
        ``{"per_label": {label: mm}, "mean": float}``; inf where a label is in only one map.
    """
    _check_labels(a, b)
    arr_a, arr_b = a.numpy()[0], b.numpy()[0]
    spacing = tuple(reversed(a.grid.spacing))  # tensor axis order for scipy
    per = {}
    for lab in _labels(a, b, labels):
        x, y = arr_a == lab, arr_b == lab
        if not x.any() and not y.any():
            per[lab] = float("nan")
        elif not x.any() or not y.any():
            per[lab] = float("inf")
        else:
            d = np.concatenate([_surface_distances(x, y, spacing),
                                _surface_distances(y, x, spacing)])
            per[lab] = float(np.percentile(d, 95))
    vals = [v for v in per.values() if v == v]
    return dict(per_label=per, mean=float(np.mean(vals)) if vals else float("nan"))
