"""Resizing ``(N, C, *S)`` tensors between grids of the same extent, fast on the CPU.

Convention:
    * Voxel centres of ``n`` and ``m`` samples over the same extent: output centre ``i`` lies at
      input position ``(i + 1/2) n / m - 1/2`` (``align_corners=False``), borders repeated.
    * Shapes and kernels are in tensor order (first spatial axis first). No autograd: these
      are for tensors that need no gradient (use ``F.interpolate`` / ``F.avg_pool`` there).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from medreg.errors import MedregError


def block_mean(x: torch.Tensor, kernel: Sequence[int]) -> torch.Tensor:
    """Mean over whole ``kernel`` blocks of ``(N, C, *S)`` (``avg_pool`` with stride = kernel).

    Each spatial size must be a multiple of its kernel entry. Strided sums, one axis at a
    time: elementwise additions that use every intra-op thread (ATen's CPU ``avg_pool3d``
    splits only over ``N*C``), about four times faster for one channel on two cores.
    """
    out = x
    for axis, k in enumerate(kernel):
        if k == 1:
            continue
        n = out.shape[2 + axis]
        if n % k:
            raise MedregError(f"axis {axis} has {n} samples, not a multiple of {k}")
        lead = (slice(None),) * (2 + axis)
        parts = [out[lead + (slice(j, None, k),)] for j in range(k)]
        total = parts[0] + parts[1]
        for extra in parts[2:]:
            total.add_(extra)
        out = total
    if out is x:
        return x.clone()
    return out.mul_(1.0 / math.prod(kernel))


def resize_linear(x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Linear interpolation of ``(N, C, *S)`` onto ``shape`` voxels covering the same extent.

    The result equals ``F.interpolate(x, shape, mode="(bi|tri)linear", align_corners=False)``
    (voxel centres at ``(i + 1/2) n / m - 1/2``, the border voxel repeated). Where every axis
    keeps its size or grows by a whole factor ``k``, it is computed by ``k`` ``lerp`` passes
    per enlarged axis into strided slices of the output, several times faster on the CPU than
    ATen's kernel; channels go one at a time into the output, so the intermediate passes add
    at most one channel's worth of memory. Other sizes use ``F.interpolate`` itself. No
    autograd: for tensors that need no gradient.

    Args:
        x: ``(N, C, *S)``.
        shape: output spatial shape (tensor order).

    Returns:
        ``(N, C, *shape)``.
    """
    shape = tuple(int(m) for m in shape)
    sizes = list(zip(x.shape[2:], shape, strict=True))
    if any(m % n for n, m in sizes):
        mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(shape)]
        return F.interpolate(x, size=shape, mode=mode, align_corners=False)
    axes = [a for a, (n, m) in enumerate(sizes) if m > n][::-1]  # contiguous axis first
    if not axes:
        return x.clone()
    out = x.new_empty(*x.shape[:2], *shape)
    for c in range(x.shape[1]):
        y = x[:, c:c + 1]
        for j, a in enumerate(axes):
            n, m = sizes[a]
            y = _enlarge_axis(y, 2 + a, m // n, out[:, c:c + 1] if j == len(axes) - 1 else None)
    return out


def _enlarge_axis(x: torch.Tensor, dim: int, k: int, out: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """``x`` linearly interpolated onto ``k`` times as many samples along ``dim``.

    Output sample ``j k + r`` lies at input position ``j + t`` with ``t = (r + 1/2) / k - 1/2``
    in (-1/2, 1/2): a ``lerp`` of ``x[j]`` towards ``x[j - 1]`` or ``x[j + 1]`` by ``|t|``, the
    border sample repeated past the ends. One pass per ``r`` into a strided slice of ``out``.
    """
    n = x.shape[dim]
    if out is None:
        shape = list(x.shape)
        shape[dim] = k * n
        out = x.new_empty(shape)
    phases = out.unflatten(dim, (n, k))
    last = n - 1
    for r in range(k):
        t = (r + 0.5) / k - 0.5
        dst = phases.select(dim + 1, r)
        if t < 0:  # towards the previous sample; the first one repeats
            torch.lerp(x.narrow(dim, 1, last), x.narrow(dim, 0, last), -t,
                       out=dst.narrow(dim, 1, last))
            dst.narrow(dim, 0, 1).copy_(x.narrow(dim, 0, 1))
        elif t > 0:  # towards the next sample; the last one repeats
            torch.lerp(x.narrow(dim, 0, last), x.narrow(dim, 1, last), t,
                       out=dst.narrow(dim, 0, last))
            dst.narrow(dim, last, 1).copy_(x.narrow(dim, last, 1))
        else:  # odd k: the middle phase is the sample itself
            dst.copy_(x)
    return out
