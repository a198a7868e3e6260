"""Gaussian pyramids that keep the world extent of the image.

Convention: level grids come from :meth:`Grid.downsample` (outer voxel boundaries kept), so a
transform estimated at any level applies unchanged to the full-resolution images.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from medreg.core.axes import tensor_order
from medreg.core.grid import Grid
from medreg.core.image import Image
from medreg.core.resize import block_mean
from medreg.resample import resample


def gaussian_kernel1d(sigma: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Normalized 1D Gaussian (truncated at 3 sigma); ``sigma`` in voxels."""
    radius = max(1, int(math.ceil(3.0 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).to(dtype)


def gaussian_smooth(tensor: torch.Tensor, sigma: Sequence[float]) -> torch.Tensor:
    """Separable Gaussian blur of ``(N, C, *S)``; ``sigma`` per tensor spatial axis (voxels).

    Kernels are truncated at ``ceil(3 sigma)``; borders are replicated so the image mean does
    not sag at the edges. CPU tensors that need no gradient go through SciPy's recursive-free
    separable filter (about 5x faster than a batched ``conv1d`` on 2 cores); otherwise one
    ``conv1d`` pass per axis keeps the result differentiable and on its device.
    """
    if not tensor.requires_grad and tensor.device.type == "cpu":
        return _smooth_scipy(tensor, sigma)
    out = tensor
    for axis, s in enumerate(sigma):
        if s <= 0:
            continue
        k = gaussian_kernel1d(s, tensor.dtype).to(tensor.device)
        r = k.numel() // 2
        dim = axis + 2
        moved = out.movedim(dim, -1)
        rows = moved.reshape(-1, 1, moved.shape[-1])
        rows = F.conv1d(F.pad(rows, (r, r), mode="replicate"), k.reshape(1, 1, -1))
        out = rows.reshape(moved.shape).movedim(-1, dim)
    return out.contiguous()


def _smooth_scipy(tensor: torch.Tensor, sigma: Sequence[float]) -> torch.Tensor:
    from scipy import ndimage

    arr = tensor.detach().numpy().copy()
    for axis, s in enumerate(sigma):
        if s > 0:
            radius = max(1, int(math.ceil(3.0 * s)))
            ndimage.gaussian_filter1d(arr, s, axis=axis + 2, mode="nearest", radius=radius,
                                      output=arr)
    return torch.from_numpy(arr)


def smooth_image(image: Image, sigma_mm: float) -> Image:
    """Gaussian blur with ``sigma_mm`` in millimetres (per-axis voxel sigma from the spacing)."""
    if sigma_mm <= 0:
        return image
    sig_vox = tensor_order([sigma_mm / s for s in image.grid.spacing])
    data = image.tensor.to(torch.float32) if not image.tensor.is_floating_point() else image.tensor
    return image.with_tensor(gaussian_smooth(data[None], sig_vox)[0])


def gaussian_pyramid(image: Image, factors: Sequence[float] = (4, 2, 1),
                     sigmas_mm: Sequence[float] | None = None) -> list[Image]:
    """Coarse-to-fine list of blurred, downsampled images.

    Args:
        image: ``(C, *S)`` image.
        factors: shrink factor per level, coarse first (e.g. ``(4, 2, 1)``).
        sigmas_mm: blur per level in mm; default ``0.5 * factor * min(spacing)`` for factors > 1
            and none at factor 1 (the anti-aliasing choice of ANTs/ITK schedules).

    Returns:
        One ``Image`` per level, float32 (float64 kept).
    """
    if any(f < 1 for f in factors):
        raise ValueError(f"pyramid factors must be >= 1, got {list(factors)}")
    base = min(image.grid.spacing)
    if sigmas_mm is None:
        sigmas_mm = [0.5 * f * base if f > 1 else 0.0 for f in factors]
    if len(sigmas_mm) != len(factors):
        raise ValueError("give one smoothing sigma per pyramid level")
    levels: dict[int, Image] = {}
    prev_f, prev_s, prev = 1.0, 0.0, image
    for i in sorted(range(len(factors)), key=lambda k: factors[k]):  # fine to coarse
        f, s = factors[i], sigmas_mm[i]
        recursive = f >= prev_f and s >= prev_s
        pooled = _pool_level(prev, image.grid.downsample(f), math.sqrt(s * s - prev_s * prev_s)) \
            if recursive and f > prev_f else None
        if pooled is not None:
            level = pooled
        else:
            # recursive: blur the finer level by the missing sigma (Gaussians add in variance),
            # on fewer voxels than the full-resolution image
            smoothed = smooth_image(prev, math.sqrt(s * s - prev_s * prev_s)) if recursive \
                else smooth_image(image, s)
            level = smoothed if f == 1 else resample(smoothed, image.grid.downsample(f))
        levels[i] = level
        if recursive:
            prev_f, prev_s, prev = f, s, level
    return [levels[i] for i in range(len(factors))]


def _pool_level(image: Image, grid: Grid, sigma_mm: float) -> Image | None:
    """``image`` shrunk onto the coarser ``grid`` by ``k``-voxel box averages, then blurred by
    ``sigma_mm`` there; ``None`` unless ``grid`` is ``image.grid`` shrunk ``k`` times exactly.

    The box average puts each coarse value at the centre of its ``k**dim`` fine voxels, which
    is exactly ``image.grid.downsample(k)``; for ``k = 2`` it is also what linear resampling
    onto that grid computes from a blurred image. Blurring after the shrink instead of before
    keeps each level's blur approximately (within 1.3 % in the tests) on ``k**dim`` times fewer
    voxels.
    """
    k = image.grid.size[0] // grid.size[0]
    if k < 2 or any(n != c * k for n, c in zip(image.grid.size, grid.size, strict=True)):
        return None
    data = image.tensor if image.tensor.is_floating_point() else image.tensor.float()
    return smooth_image(Image(block_mean(data[None], (k,) * image.ndim)[0], grid), sigma_mm)
