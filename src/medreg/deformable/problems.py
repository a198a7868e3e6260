"""Parametrizations optimized by :func:`~medreg.deformable.optimize.coarse_to_fine`.

Convention:
    * ``SVFProblem``: ``T = init o exp(v)``; loss ``sim(F, M o init o exp(v)) + R(v)``.
    * ``BSplineProblem``: ``T = init o (x + B(c)(x))``; loss ``sim + R(u)`` on the field grid.
    All velocities / coefficients are ``(1, dim, *S)`` in mm on the level's field grid. The
    ``syn`` stage is greedy and lives in :mod:`medreg.deformable.greedy`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from medreg.deformable.fields import identity_norm, integrate_velocity, resample_field
from medreg.deformable.optimize import MovingWarper, Upsampler
from medreg.deformable.pyramid import Level
from medreg.deformable.regularizers import FieldRegularizer
from medreg.deformable.transforms import BSplineTransform
from medreg.transforms.base import Transform

Metric = Callable[..., torch.Tensor]


class _LevelCache:
    """Per-level helpers built once (sampling points, identity grids)."""

    def __init__(self, init: Transform | None) -> None:
        self.init = init
        self._level: Level | None = None

    def get(self, level: Level) -> _LevelCache:
        if self._level is not level:
            self._level = level
            self.warper = MovingWarper(level, init=self.init)
            self.up = Upsampler(level.field_grid, level.grid)
            self.ident_field = identity_norm(level.field_grid)
            self.ident_image = identity_norm(level.grid)
        return self


def _zeros(level: Level) -> torch.Tensor:
    return torch.zeros(1, level.grid.ndim, *level.field_grid.shape, requires_grad=True)


def _carry(params: list[torch.Tensor], old: Level, new: Level) -> list[torch.Tensor]:
    with torch.no_grad():
        return [resample_field(p, old.field_grid, new.field_grid).requires_grad_(True)
                for p in params]


class SVFProblem:
    """Stationary velocity field on the fixed side (see module docstring)."""

    smooth = True

    def __init__(self, metric: Metric, regularizer: FieldRegularizer, init: Transform | None,
                 steps: int = 6) -> None:
        self.metric, self.reg, self.steps = metric, regularizer, steps
        self.cache = _LevelCache(init)

    def initial(self, level: Level) -> list[torch.Tensor]:
        return [_zeros(level)]

    def upsample(self, params, old, new):
        return _carry(params, old, new)

    def loss(self, level: Level, params: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.cache.get(level)
        u = integrate_velocity(params[0], level.field_grid, self.steps, c.ident_field)
        warped = c.warper(c.up(u))
        return self.metric(level.fixed.batch, warped, level.mask), self.reg(params[0],
                                                                             level.field_grid)


class BSplineProblem:
    """Cubic B-spline FFD coefficients (see module docstring)."""

    smooth = False

    def __init__(self, metric: Metric, regularizer: FieldRegularizer, init: Transform | None,
                 bspline: BSplineTransform) -> None:
        self.metric, self.reg, self.bspline = metric, regularizer, bspline
        self.cache = _LevelCache(init)

    def initial(self, level: Level) -> list[torch.Tensor]:
        return [self.bspline.coefficients]

    def upsample(self, params, old, new):
        return params  # the control grid is the same at every level

    def loss(self, level: Level, params: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.cache.get(level)
        warped = c.warper(self.bspline.displacement_on(level.grid))
        reg = self.reg(self.bspline.displacement_on(level.field_grid), level.field_grid) \
            if self.reg.weights.active else warped.new_zeros(())
        return self.metric(level.fixed.batch, warped, level.mask), reg
