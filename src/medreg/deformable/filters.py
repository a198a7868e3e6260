"""Separable Gaussian and box filters on ``(N, C, *S)`` tensors (no Python loops over voxels).

Convention:
    * Sigmas and widths are given per coordinate axis ``(x, y[, z])`` in voxels; they are
      applied to the tensor axis holding that coordinate (via :mod:`medreg.core.axes`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from medreg.core.axes import tensor_axis, tensor_order
from medreg.errors import MedregError

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _per_axis(value: float | Sequence[float], ndim: int, name: str) -> list[float]:
    vals = [float(value)] * ndim if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(vals) != ndim:
        raise MedregError(f"{name} needs 1 or {ndim} values, got {len(vals)}")
    return vals


def _conv_axis(x: torch.Tensor, kernel: torch.Tensor, axis: int, mode: str) -> torch.Tensor:
    """Convolve each channel of ``x`` ``(N, C, *S)`` with a 1D ``kernel`` along spatial ``axis``."""
    nsp = x.ndim - 2
    k = kernel.numel()
    shape = [1] * nsp
    shape[axis] = k
    weight = kernel.to(x.dtype).reshape(1, 1, *shape).expand(x.shape[1], 1, *shape)
    pad = [0] * (2 * nsp)
    pad[2 * (nsp - 1 - axis)] = pad[2 * (nsp - 1 - axis) + 1] = k // 2
    xp = F.pad(x, pad, mode=mode) if mode != "zeros" else F.pad(x, pad)
    return _CONV[nsp](xp, weight, groups=x.shape[1])


def gaussian_kernel1d(sigma: float, truncate: float = 3.0) -> torch.Tensor:
    """Normalized 1D Gaussian ``(2r+1,)`` float64 with ``r = ceil(truncate * sigma)``."""
    r = max(int(math.ceil(truncate * sigma)), 1)
    t = torch.arange(-r, r + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def gaussian_smooth(x: torch.Tensor, sigma: float | Sequence[float]) -> torch.Tensor:
    """Separable Gaussian smoothing with replicated borders.

    Args:
        x: ``(N, C, *S)`` tensor (images, displacement or velocity fields, gradients).
        sigma: standard deviation in voxels, one value or one per coordinate axis (x, y[, z]);
            0 leaves that axis unchanged.

    Returns:
        ``(N, C, *S)`` smoothed tensor (differentiable).
    """
    nsp = x.ndim - 2
    sig = _per_axis(sigma, nsp, "sigma")
    if not x.requires_grad and x.device.type == "cpu" and all(
            x.shape[2 + tensor_axis(c, nsp)] > gaussian_kernel1d(s).numel() // 2
            for c, s in enumerate(sig) if s > 0):
        # no gradient needed: the engine's SciPy path is several times faster on the CPU
        from medreg.engine.pyramid import gaussian_smooth as fast_smooth

        return fast_smooth(x, tensor_order(sig))
    for coord, s in enumerate(sig):
        if s > 0:
            axis = tensor_axis(coord, nsp)
            if x.shape[2 + axis] > 1:
                wide = x.shape[2 + axis] > gaussian_kernel1d(s).numel() // 2
                mode = "replicate" if wide else "zeros"
                x = _conv_axis(x, gaussian_kernel1d(s), axis, mode)
    return x


def central_difference(x: torch.Tensor, dim: int, spacing: float) -> torch.Tensor:
    """Derivative of ``x`` along tensor axis ``dim`` with sample ``spacing``: central
    differences inside, one-sided at both ends (``torch.gradient(..., edge_order=1)``).

    Without autograd it writes into one output buffer, about ten times faster on the CPU than
    ``torch.gradient``; with autograd it is ``torch.gradient``. ``x`` needs 2 or more samples
    along ``dim``. Returns a tensor shaped like ``x``.
    """
    n = x.shape[dim]
    if x.requires_grad:
        return torch.gradient(x, spacing=float(spacing), dim=dim, edge_order=1)[0]
    if n < 2:
        raise MedregError(f"a derivative needs 2 or more samples along axis {dim}, got {n}")
    out = torch.empty_like(x)
    inner = out.narrow(dim, 1, n - 2)
    torch.sub(x.narrow(dim, 2, n - 2), x.narrow(dim, 0, n - 2), out=inner).mul_(0.5 / spacing)
    for i, (hi, lo) in ((0, (1, 0)), (n - 1, (n - 1, n - 2))):
        end = out.narrow(dim, i, 1)
        torch.sub(x.narrow(dim, hi, 1), x.narrow(dim, lo, 1), out=end).mul_(1.0 / spacing)
    return out


def box_mean(x: torch.Tensor, window: int) -> torch.Tensor:
    """Local mean over a ``window``^dim box: separable running sums (cumulative sums).

    Args:
        x: ``(N, C, *S)``.
        window: odd box width in voxels.

    Returns:
        ``(N, C, *S)``; borders are zero-padded and divided by the full window size, the
        convention of ANTs' and VoxelMorph's local NCC. Cost is O(N) per axis, independent
        of the window on the contiguous axis and O(window N) (contiguous slab additions) on the
        others.
    """
    if window < 1 or window % 2 == 0:
        raise MedregError(f"box window must be an odd positive number of voxels, got {window}")
    nsp = x.ndim - 2
    r = window // 2
    for axis in range(nsp):
        dim = 2 + axis
        n = x.shape[dim]
        pad = [0] * (2 * nsp)
        if axis == nsp - 1:  # contiguous axis: running sum by cumsum
            pad[0], pad[1] = r + 1, r
            c = F.pad(x, pad)
            c = c.cumsum_(dim) if not c.requires_grad else torch.cumsum(c, dim=dim)
            x = c.narrow(dim, window, n) - c.narrow(dim, 0, n)
            del c  # one padded buffer at a time
        else:  # outer axes: adding shifted slabs is ~3x faster than cumsum there
            pad[2 * (nsp - 1 - axis)] = pad[2 * (nsp - 1 - axis) + 1] = r
            xp = F.pad(x, pad)
            acc = xp.narrow(dim, 0, n).clone()
            for k in range(1, window):
                acc = acc + xp.narrow(dim, k, n) if acc.requires_grad else \
                    acc.add_(xp.narrow(dim, k, n))
            x = acc
            del xp, acc  # the next axis pads a new buffer: free this one first
    scale = 1.0 / float(window**nsp)
    return x * scale if x.requires_grad else x.mul_(scale)  # x is always a new tensor here
