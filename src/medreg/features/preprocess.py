"""Intensity preprocessing that registration users reach for.

Every function returns a new :class:`~medreg.core.image.Image` on the same grid and never edits
the caller's tensor. Masks are ``(1, *S)`` images on the same grid; non-zero voxels are inside.
Statistics are computed inside the mask only; the mapping is applied to every voxel.
"""

from __future__ import annotations

import numpy as np
import torch

from medreg.core.grid import Grid
from medreg.core.image import Image
from medreg.errors import MedregError


def scalar_image(image: Image) -> Image:
    """One float32 channel (channels averaged); a 3D image one voxel thick becomes 2D.

    Radiographs stored as ``(1, 1, H, W)`` 3D DICOM and RGB PNGs both come out ``(1, H, W)``.
    Convention: the 2D grid keeps the x/y spacing, origin and the in-plane 2x2 direction block.
    """
    t = image.tensor.to(torch.float32).mean(dim=0, keepdim=True)
    g = image.grid
    if g.ndim == 3 and g.size[2] == 1:
        d = g.direction_matrix[:2, :2]
        if np.abs(d.T @ d - np.eye(2)).max() > 1e-3:
            raise MedregError("single-slice 3D image is oblique out of plane; "
                              "cannot treat it as 2D")
        g = Grid(g.size[:2], g.spacing[:2], g.origin[:2], d)
        t = t[:, 0]
    return Image(t, g)


def _values(image: Image, mask: Image | None) -> np.ndarray:
    data = image.tensor.detach().to(torch.float64).cpu().numpy()
    if mask is None:
        return data.ravel()
    m = mask.tensor.detach().cpu().numpy()
    if m.shape[1:] != data.shape[1:]:
        raise MedregError(f"mask shape {m.shape[1:]} does not match image shape {data.shape[1:]}")
    inside = np.broadcast_to(m != 0, data.shape)
    if not inside.any():
        raise MedregError("mask is empty: it selects no voxel, at least one is needed")
    return data[inside]


def clip_intensity(image: Image, lower: float = 0.5, upper: float = 99.5,
                   mask: Image | None = None) -> Image:
    """Clip intensities to the ``[lower, upper]`` percentiles (inside ``mask``)."""
    if not 0 <= lower < upper <= 100:
        raise MedregError(f"clip percentiles must satisfy 0 <= lower < upper <= 100, "
                          f"got {lower}, {upper}")
    lo, hi = np.percentile(_values(image, mask), [lower, upper])
    return image.with_tensor(image.tensor.to(torch.float32).clamp(float(lo), float(hi)))


def normalize_intensity(image: Image, mode: str = "zscore", mask: Image | None = None) -> Image:
    """``zscore`` (mean 0, std 1) or ``minmax`` (to [0, 1]) using statistics inside ``mask``."""
    v = _values(image, mask)
    t = image.tensor.to(torch.float32)
    if mode == "zscore":
        return image.with_tensor((t - float(v.mean())) / max(float(v.std()), 1e-12))
    if mode == "minmax":
        lo, hi = float(v.min()), float(v.max())
        return image.with_tensor((t - lo) / max(hi - lo, 1e-12))
    raise MedregError(f"unknown normalization {mode!r}; choose from zscore, minmax")


def equalize_histogram(image: Image, bins: int = 256, mask: Image | None = None) -> Image:
    """Histogram equalization: map intensities through their CDF (inside ``mask``) to [0, 1]."""
    v = _values(image, mask)
    hist, edges = np.histogram(v, bins=bins)
    cdf = np.cumsum(hist).astype(np.float64)
    cdf /= cdf[-1]
    centers = (edges[:-1] + edges[1:]) / 2
    data = image.tensor.detach().to(torch.float64).cpu().numpy()
    out = np.interp(data, centers, cdf).astype(np.float32)
    return image.with_tensor(torch.from_numpy(out).to(image.device))


def match_histogram(image: Image, reference: Image, mask: Image | None = None,
                    reference_mask: Image | None = None) -> Image:
    """Map ``image`` intensities so their quantiles equal those of ``reference``."""
    src = np.sort(_values(image, mask))
    ref = np.sort(_values(reference, reference_mask))
    q = np.linspace(0.0, 1.0, min(src.size, 1024))
    src_q, ref_q = np.quantile(src, q), np.quantile(ref, q)
    src_q, keep = np.unique(src_q, return_index=True)
    data = image.tensor.detach().to(torch.float64).cpu().numpy()
    out = np.interp(data, src_q, ref_q[keep]).astype(np.float32)
    return image.with_tensor(torch.from_numpy(out).to(image.device))


def threshold_mask(image: Image, level: float | None = None) -> Image:
    """Foreground mask ``image > level``; ``level`` defaults to Otsu's threshold.

    Returns:
        ``(1, *S)`` uint8 image on the same grid.
    """
    v = image.tensor.detach().to(torch.float64).mean(0).cpu().numpy()
    if level is None:
        level = otsu_threshold(v.ravel())
    return Image(torch.from_numpy((v > level).astype(np.uint8))[None], image.grid)


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold maximizing the between-class variance of ``values``."""
    hist, edges = np.histogram(values, bins=bins)
    p = hist / max(hist.sum(), 1)
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(p)
    mu = np.cumsum(p * centers)
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mu[-1] * w0 - mu) ** 2 / (w0 * (1 - w0))
    return float(centers[int(np.nanargmax(between))])


def apply_mask(image: Image, mask: Image, fill: float = 0.0) -> Image:
    """Set voxels outside ``mask`` to ``fill``."""
    if mask.grid.shape != image.grid.shape:
        raise MedregError(f"mask shape {mask.grid.shape} does not match image {image.grid.shape}")
    inside = mask.tensor.to(image.device) != 0
    return image.with_tensor(torch.where(inside, image.tensor.to(torch.float32),
                                         torch.as_tensor(fill, dtype=torch.float32)))


def to_uint8(image: Image, lower: float = 0.5, upper: float = 99.5,
             mask: Image | None = None) -> np.ndarray:
    """2D ``(H, W)`` uint8 array (percentile window) for OpenCV detectors."""
    scalar = scalar_image(image)
    if scalar.ndim != 2:
        raise MedregError(f"keypoint detection needs a 2D image, got {scalar.ndim}D")
    lo, hi = np.percentile(_values(scalar, mask), [lower, upper])
    data = scalar.tensor[0].detach().cpu().numpy().astype(np.float64)
    scaled = np.clip((data - lo) / max(hi - lo, 1e-12), 0.0, 1.0) * 255.0
    return np.round(scaled).astype(np.uint8)


def clahe(u8: np.ndarray, clip_limit: float = 2.0, tiles: int = 8) -> np.ndarray:
    """Contrast-limited adaptive histogram equalization (OpenCV) of a 2D uint8 array.

    Brings out bone and soft-tissue texture in radiographs, where a global window leaves
    most of the range to a few structures; keypoint detectors then find many more, better
    spread features.
    """
    import cv2

    if u8.dtype != np.uint8 or u8.ndim != 2:
        raise MedregError(f"CLAHE needs a 2D uint8 array, got {u8.dtype} {u8.shape}")
    return cv2.createCLAHE(clipLimit=float(clip_limit), tileGridSize=(tiles, tiles)).apply(u8)
