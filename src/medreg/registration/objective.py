"""The metric as a function of a transform, on one pyramid level.

Convention: ``loss(T) = metric(fixed(x), moving(T(x)))`` over fixed voxel centres ``x`` (world
LPS mm), restricted to the fixed mask, the moving mask and the moving field of view.
"""

from __future__ import annotations

import torch

from medreg.core.axes import index_from_flat
from medreg.core.image import Image
from medreg.core.sampling import (
    index_bounds,
    inside_bounds,
    norm_bounds,
    sample,
    world_to_norm,
)
from medreg.errors import MedregError
from medreg.metrics import Metric
from medreg.metrics.functional import FIXED_WINDOW, MI_BINS, parzen_fixed_rows
from medreg.registration.interp import PointInterpolator, index_map_gradient
from medreg.resample import resample
from medreg.transforms.base import Transform
from medreg.transforms.linear import LinearTransform


def _as_float(image: Image) -> Image:
    return image if image.tensor.is_floating_point() else image.to(torch.float32)


def mask_on_grid(mask: Image | None, like: Image) -> torch.Tensor | None:
    """``(1, *S)`` 0/1 float mask resampled onto ``like``'s grid, or ``None``."""
    if mask is None:
        return None
    m = resample(_as_float(mask), like.grid, interpolation="linear").tensor[:1]
    return (m > 0.5).to(like.tensor.dtype)


#: Loss returned when the transform leaves no overlap between the images.
NO_OVERLAP_LOSS = 1e12


class LevelObjective:
    """Loss of a transform on one level, on all fixed voxels or on a seeded random subset.

    Args:
        fixed, moving: float ``(C, *S)`` level images.
        metric: a :class:`~medreg.metrics.Metric`.
        fixed_mask, moving_mask: optional masks (any grid; resampled to the level).
        samples: number of fixed points to use (``None`` = all voxels; ignored for metrics
            that need the voxel grid, such as LNCC).
        resample_every_call: use new random points at every evaluation (stochastic
            gradients, as elastix's random sampler; use with Adam/GD only).
        batches: with ``resample_every_call``, the points of this many evaluations are drawn
            at once (one fixed-image sampling) and then used in turn, cycling.
        seed: seed of the point sampler.
        off_grid: sampled points are jittered uniformly inside their voxel (fixed values then
            interpolated too).
        dtype: arithmetic precision (float64 lets line searches resolve tiny improvements).
    """

    def __init__(self, fixed: Image, moving: Image, metric: Metric, *,
                 fixed_mask: Image | None = None, moving_mask: Image | None = None,
                 samples: int | None = None, resample_every_call: bool = False,
                 batches: int = 1, seed: int = 0, dtype: torch.dtype = torch.float32,
                 off_grid: bool = False, regions: int = 1) -> None:
        self.fixed, self.moving = fixed.to(dtype), moving.to(dtype)
        self.metric = metric
        self.generator = torch.Generator().manual_seed(seed)
        fmask = mask_on_grid(fixed_mask, self.fixed)
        self.moving_mask = mask_on_grid(moving_mask, self.moving)
        if fmask is not None and float(fmask.sum()) == 0:
            raise MedregError("the fixed mask is empty at this resolution")
        self.fvals = self.fixed.tensor  # (C, *S)
        self.fmask = fmask
        self.use_grid = samples is None or metric.needs_grid or samples >= self.fixed.grid.numel
        self.samples, self.stochastic = samples, resample_every_call and not self.use_grid
        self.off_grid = off_grid
        self._norm_from_world = torch.as_tensor(self.moving.grid.norm_from_world,
                                                dtype=torch.float64)
        self._bounds: tuple[torch.Tensor, torch.Tensor] | None = None  # moving FOV, norm coords
        self._sampler: PointInterpolator | None = None  # built on first use
        ifw = torch.as_tensor(self.moving.grid.index_from_world, dtype=torch.float64)
        self._index_from_world = ifw[:-1, :-1], ifw[:-1, -1]  # linear part, offset
        # moving field of view in voxel indices (ITK's rule), as (dim, 1) columns
        lo, hi = index_bounds(self.moving.grid, dtype)
        self._index_lo, self._index_hi = lo[:, None], hi[:, None]
        self.candidates = None if fmask is None else torch.nonzero(fmask.reshape(-1)).squeeze(1)
        self.batches = max(1, int(batches)) if self.stochastic else 1
        self.n_regions = int(regions) ** self.fixed.ndim if metric.is_histogram else 1
        self._per_axis = int(regions)
        self._draw()
        self._next = -1  # the first stochastic evaluation uses batch 0
        self.ranges = {}
        if metric.is_histogram:
            self.ranges = dict(fixed_range=self._range(self.fixed.tensor, fmask),
                               moving_range=self._range(self.moving.tensor, self.moving_mask))
        # the fixed side of a fused MI histogram, per point batch (it depends on those alone)
        self._fixed_rows: dict | None = \
            {} if metric.is_histogram and self.fvals.shape[0] == 1 else None

    @staticmethod
    def _range(t: torch.Tensor, mask: torch.Tensor | None) -> tuple[float, float]:
        vals = t[0][mask[0] > 0] if mask is not None else t[0]
        return float(vals.min()), float(vals.max())

    def _draw(self) -> None:
        """Choose the fixed points: all voxels, or ``batches`` random subsets of ``samples``."""
        if self.use_grid:
            self.points = self.fixed.grid.world_points(self.fvals.dtype)  # (*S, dim)
            self.rows = self.points.reshape(-1, self.points.shape[-1]).T.contiguous()
            self.values, self.weights = self.fvals, self.fmask
            if self.n_regions > 1:
                flat = torch.arange(self.fixed.grid.numel, device=self.fvals.device)
                index = index_from_flat(flat, self.fixed.grid.size).T.to(self.fvals.dtype)
                self.regions = self._region_ids(index)
            return
        pool = self.candidates
        n_pool = pool.numel() if pool is not None else self.fixed.grid.numel
        n = min(self.samples, n_pool)
        # stratified: one point in each of n equal runs of the (memory-ordered) pool, so each
        # batch is already in memory order (2x faster sampling) and covers the image evenly
        u = torch.rand(self.batches, n, generator=self.generator).double()  # float32 RNG: 3x faster
        pick = ((torch.arange(n, dtype=torch.float64) + u) * (n_pool / n)).long().reshape(-1)
        pick = pick.clamp_max(n_pool - 1).to(self.fvals.device)  # drawn on the CPU generator
        idx = pool[pick] if pool is not None else pick
        index = index_from_flat(idx, self.fixed.grid.size).T.to(self.fvals.dtype)  # (dim, B*n)
        if self.off_grid:
            # jitter within the voxel so fixed and moving are both interpolated: this removes
            # the grid-alignment bias of MI with interpolated samples (elastix RandomCoordinate)
            index = index + (torch.rand(index.shape, generator=self.generator)
                             .to(index) - 0.5)
            nfi = torch.as_tensor(self.fixed.grid.norm_from_index, dtype=index.dtype,
                                  device=index.device)
            norm = torch.addmm(nfi[:-1, -1:], nfi[:-1, :-1], index).T  # (B*n, dim)
            # grid_sample's border clamp is interp_linear's, at a fraction of the cost here
            values = sample(self.fvals[None], norm[None], padding="border")[0]
        else:
            values = self.fvals.reshape(self.fvals.shape[0], -1)[:, idx]
        w = torch.as_tensor(self.fixed.grid.world_from_index, dtype=index.dtype,
                            device=index.device)
        rows = torch.addmm(w[:-1, -1:], w[:-1, :-1], index)  # (dim, B*n) world mm
        dim, c = rows.shape[0], values.shape[0]
        self._pool_rows = rows.reshape(dim, self.batches, n).transpose(0, 1).contiguous()
        self._pool_values = values.reshape(c, self.batches, n).transpose(0, 1).contiguous()
        self._pool_regions = (self._region_ids(index).reshape(self.batches, n)
                              if self.n_regions > 1 else None)
        self.weights = None
        self._set_batch(0)

    def _region_ids(self, index: torch.Tensor) -> torch.Tensor:
        """Spatial region of each fixed point ``(dim, P)`` voxel indices -> ``(P,)`` int64:
        the fixed grid cut into ``regions`` equal slabs per axis."""
        g = self._per_axis
        ids = torch.zeros(index.shape[1], dtype=torch.long, device=index.device)
        for a, size in enumerate(self.fixed.grid.size):
            r = ((index[a] + 0.5) * (g / size)).floor().long().clamp_(0, g - 1)
            ids += r * g ** a
        return ids

    def _set_batch(self, b: int) -> None:
        self.rows, self.values = self._pool_rows[b], self._pool_values[b]
        if self._pool_regions is not None:
            self.regions = self._pool_regions[b]
        self.points = self.rows.T  # (n, dim) view, for transforms other than LinearTransform

    def _next_batch(self) -> None:
        """Move to the next pre-drawn batch of points (stochastic mode), cycling."""
        self._next = (self._next + 1) % self.batches
        self._set_batch(self._next)

    def warped_points(self, transform: Transform) -> torch.Tensor:
        """Moving-space normalized coordinates of the fixed points, ``(*P, dim)``."""
        if transform.is_linear:
            m = (self._norm_from_world @ transform.matrix()).to(self.points.dtype)
            return self.points @ m[:-1, :-1].T + m[:-1, -1]
        return world_to_norm(transform(self.points), self.moving.grid)

    def __call__(self, transform: Transform) -> torch.Tensor:
        if self.stochastic:
            self._next_batch()
        if isinstance(transform, LinearTransform):
            a, o = transform.linear_and_offset()
            m, t = self._index_from_world
            lin, off = m @ a, torch.addmv(t, m, o)
            if not (lin.requires_grad or off.requires_grad):  # e.g. scoring candidates
                return self.linear_value_and_grad(lin, off, with_grad=False)[0]
            return _IndexMapLoss.apply(lin, off, self)
        warped, weight = self._warp_general(transform)
        weight, extra = self._metric_weight(weight)
        if weight is None:
            # no overlap: a huge but finite loss (with a zero gradient) sends line searches back
            return warped.sum() * 0.0 + NO_OVERLAP_LOSS
        return self.metric(self.values[None], warped, weight, **self.ranges, **extra)

    def _metric_weight(self, weight: torch.Tensor) -> tuple[torch.Tensor | None, dict]:
        """The ``(1, 1, *P)`` overlap ``weight`` times the fixed mask (``None`` where nothing
        overlaps), and the metric's per-batch keyword arguments."""
        if self.weights is not None:
            weight = weight * self.weights[None].to(weight.dtype)
        if float(weight.sum()) == 0:
            return None, {}
        extra = {"regions": (self.regions, self.n_regions)} if self.n_regions > 1 else {}
        if self._fixed_rows is not None:
            extra["fixed_rows"] = self._batch_fixed_rows()
        return weight, extra

    def _batch_fixed_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`~medreg.metrics.functional.parzen_fixed_rows` of the current points, computed
        on a batch's first use."""
        key = self._next if self.stochastic else -1
        if key not in self._fixed_rows:
            opts = self.metric.options
            self._fixed_rows[key] = parzen_fixed_rows(
                self.values.reshape(-1), int(opts.get("bins", MI_BINS)),
                self.ranges["fixed_range"], opts.get("fixed_window", FIXED_WINDOW),
                self.regions if self.n_regions > 1 else None)
        return self._fixed_rows[key]

    def linear_value_and_grad(self, lin: torch.Tensor, off: torch.Tensor, with_grad: bool = True
                              ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Loss of the points mapped to moving voxel indices ``lin @ x + off`` and its gradient
        with respect to ``lin`` ``(dim, dim)`` and ``off`` ``(dim,)``, in one pass without an
        autograd graph: linear interpolation gives the values and their index gradients
        together (:class:`PointInterpolator`), the metric its gradient in closed form where it
        has one (:meth:`Metric.value_and_grad`), and the chain rule ends in two small products.
        Without ``with_grad``, the loss alone (the gradients are ``None``).
        """
        if self._sampler is None:
            self._sampler = PointInterpolator(self.moving.tensor, self.rows.dtype)
            self._mask_sampler = (None if self.moving_mask is None else
                                  PointInterpolator(self.moving_mask.to(self.rows.dtype)))
        index = torch.addmm(off.to(self.rows.dtype)[:, None], lin.to(self.rows.dtype), self.rows)
        values, grad = self._sampler.linear(index, with_grad)  # (C, n), (dim, C, n)
        inside = (index >= self._index_lo) & (index <= self._index_hi)  # (dim, n)
        weight = inside.all(0).to(values.dtype)
        if self.moving_mask is not None:
            weight = weight * self._mask_sampler.nearest(index)[0]
        shape = self.points.shape[:-1]
        weight, extra = self._metric_weight(weight.reshape(1, 1, *shape))
        if weight is None:  # no overlap: a huge but finite loss with a zero gradient
            return (torch.tensor(NO_OVERLAP_LOSS, dtype=values.dtype), torch.zeros_like(lin),
                    torch.zeros_like(off))
        warped = values.reshape(1, -1, *shape)
        if not with_grad:
            with torch.no_grad():
                return self.metric(self.values[None], warped, weight, **self.ranges, **extra), \
                    None, None
        loss, g_values = self.metric.value_and_grad(self.values[None], warped, weight,
                                                    **self.ranges, **extra)
        g_lin, g_off = index_map_gradient(grad, g_values.reshape(values.shape), self.rows)
        return loss, g_lin.to(lin.dtype), g_off.to(off.dtype)

    def _warp_general(self, transform: Transform) -> tuple[torch.Tensor, torch.Tensor]:
        """Any transform, through ``grid_sample`` and autograd."""
        norm = self.warped_points(transform)
        warped = sample(self.moving.batch, norm[None], padding="border")  # (1, C, *P)
        if self._bounds is None:
            self._bounds = norm_bounds(self.moving.grid, norm.dtype, norm.device)
        weight = inside_bounds(norm.detach(), *self._bounds).to(warped.dtype)[None, None]
        if self.moving_mask is not None:
            mm = sample(self.moving_mask[None].to(norm.dtype), norm.detach()[None], mode="nearest")
            weight = weight * mm
        return warped, weight


class _IndexMapLoss(torch.autograd.Function):
    """``LevelObjective`` loss as a function of its index map ``(lin, off)``: the forward pass
    computes the gradient too (:meth:`LevelObjective.linear_value_and_grad`), the backward
    pass scales what it kept. Autograd then only sees the transform's few parameters."""

    @staticmethod
    def forward(ctx, lin, off, objective):  # noqa: D102
        loss, g_lin, g_off = objective.linear_value_and_grad(lin.detach(), off.detach())
        ctx.grads = g_lin, g_off
        return loss

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        g_lin, g_off = ctx.grads
        return grad_out * g_lin, grad_out * g_off, None
