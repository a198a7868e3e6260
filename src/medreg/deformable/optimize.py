"""Coarse-to-fine Adam optimization of fields (FireANTs-style), separate from the per-level solver.

Convention:
    * A *problem* owns the parametrization (velocity fields, B-spline coefficients) and returns
      ``(similarity, regularization)`` losses for a :class:`~medreg.deformable.pyramid.Level`.
    * :func:`solve_level` runs Adam on one level; :func:`coarse_to_fine` takes the solver as an
      argument and carries the fields between levels (vectors in mm need no rescaling).
    * Learning rates are in voxels of the level's field grid per iteration (Adam's step size is
      about ``lr`` in the parameter's units), so one value suits every level and voxel size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from medreg.core.axes import channels_to_vectors
from medreg.core.grid import Grid
from medreg.core.resize import resize_linear
from medreg.core.sampling import sample, world_to_norm
from medreg.deformable.filters import gaussian_smooth
from medreg.deformable.pyramid import Level, doubling_factors
from medreg.deformable.transforms import DisplacementField, dense_from_transform
from medreg.errors import MedregError
from medreg.transforms.base import Transform


@dataclass(frozen=True)
class SolverOptions:
    """Per-level optimizer settings.

    Attributes:
        iterations: maximum iterations per level (coarse to fine).
        lr: Adam step size in field-grid voxels.
        grad_sigma: Gaussian sigma (field voxels) applied to the gradient before each step.
        field_sigma: Gaussian sigma (field voxels) applied to the field after each step.
        tol: stop a level when the loss improved by less than ``tol`` (relative) over the
            last ``window`` iterations.
        window: iterations of the convergence test.
    """

    iterations: tuple[int, ...] = (100, 50, 25)
    lr: float = 0.25
    grad_sigma: float = 1.0
    field_sigma: float = 0.0
    tol: float = 1e-4
    window: int = 10

    def __post_init__(self) -> None:
        if any(int(i) < 0 for i in self.iterations):
            raise MedregError(f"iterations must be >= 0, got {list(self.iterations)}")
        if not self.lr > 0:
            raise MedregError(f"learning rate must be positive, got {self.lr}")
        if self.grad_sigma < 0 or self.field_sigma < 0:
            raise MedregError("smoothing sigmas must be >= 0")


class FieldAdam(torch.optim.Optimizer):
    """Adam for vector fields ``(1, dim, *S)`` with one second moment per field.

    The first moment is per voxel (momentum, as Adam); the second moment tracks the largest
    squared vector length of the gradient over the field, so the largest update is about
    ``lr`` and voxels with vanishing gradients (flat background) are not blown up to full steps
    as element-wise Adam does; this is ANTs' "normalize the update by its maximum" with
    Adam's momentum and bias correction.
    """

    def __init__(self, params, lr: float, betas: tuple[float, float] = (0.9, 0.99),
                 eps: float = 1e-12) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - torch API
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["t"], st["m"], st["v"] = 0, torch.zeros_like(p), p.new_zeros(())
                st["t"] += 1
                st["m"].mul_(b1).add_(p.grad, alpha=1 - b1)
                gmax = p.grad.pow(2).sum(1).max() if p.ndim > 2 else p.grad.pow(2).max()
                st["v"].mul_(b2).add_(gmax, alpha=1 - b2)
                m_hat = st["m"] / (1 - b1 ** st["t"])
                v_hat = st["v"] / (1 - b2 ** st["t"])
                p.add_(m_hat / (v_hat.sqrt() + group["eps"]), alpha=-group["lr"])


class FieldProblem(Protocol):
    """What :func:`solve_level` needs from a parametrization."""

    smooth: bool

    def initial(self, level: Level) -> list[torch.Tensor]: ...

    def upsample(self, params: list[torch.Tensor], old: Level, new: Level
                 ) -> list[torch.Tensor]: ...

    def loss(self, level: Level, params: list[torch.Tensor]
             ) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass
class LevelResult:
    """History and stop reason of one level."""

    history: list[float] = field(default_factory=list)
    stop_reason: str = ""
    iterations: int = 0


def solve_level(problem: FieldProblem, level: Level, params: list[torch.Tensor],
                iterations: int, opts: SolverOptions,
                callback: Callable[[int, float], None] | None = None) -> LevelResult:
    """Adam on ``params`` (edited in place) for one level; gradients and fields smoothed.

    Returns:
        :class:`LevelResult` with the total loss per iteration.
    """
    vox = float(np.mean(level.field_grid.spacing))
    opt = FieldAdam(params, lr=opts.lr * vox)
    out = LevelResult(stop_reason=f"maximum iterations ({iterations})")
    for it in range(iterations):
        opt.zero_grad(set_to_none=True)
        sim, reg = problem.loss(level, params)
        loss = sim + reg
        loss.backward()
        if problem.smooth and opts.grad_sigma > 0:
            for p in params:
                p.grad = gaussian_smooth(p.grad, opts.grad_sigma)
        opt.step()
        if problem.smooth and opts.field_sigma > 0:
            with torch.no_grad():
                for p in params:
                    p.copy_(gaussian_smooth(p, opts.field_sigma))
        out.history.append(float(loss.detach()))
        out.iterations = it + 1
        if callback is not None:
            callback(it, out.history[-1])
        if converged(out.history, opts):
            out.stop_reason = f"converged: loss change < {opts.tol:g} over {opts.window} iterations"
            break
    return out


def converged(history: Sequence[float], opts: SolverOptions) -> bool:
    """True when the mean loss of the last ``window`` iterations improved by less than ``tol``
    (relative) on the ``window`` before."""
    w = opts.window
    if len(history) < 2 * w:
        return False
    old, new = float(np.mean(history[-2 * w:-w])), float(np.mean(history[-w:]))
    return (old - new) < opts.tol * max(abs(old), 1e-12)


def coarse_to_fine(problem: FieldProblem, levels: Sequence[Level], opts: SolverOptions,
                   solver: Callable[..., LevelResult] = solve_level,
                   callback: Callable[[int, int, float], None] | None = None
                   ) -> tuple[list[torch.Tensor], list[LevelResult]]:
    """Run ``solver`` on each level, carrying the parameters from coarse to fine.

    Returns:
        the finest level's parameters and one :class:`LevelResult` per level.
    """
    if len(opts.iterations) != len(levels):
        raise MedregError(f"{len(levels)} pyramid levels but {len(opts.iterations)} iteration "
                          f"counts {list(opts.iterations)}")
    params = problem.initial(levels[0])
    results = []
    for i, level in enumerate(levels):
        if i > 0:
            params = problem.upsample(params, levels[i - 1], level)
        cb = None if callback is None else (lambda it, loss, i=i: callback(i, it, loss))
        results.append(solver(problem, level, params, int(opts.iterations[i]), opts, cb))
    return params, results


def same_extent(a: Grid, b: Grid, tol: float = 1e-4) -> bool:
    """True when two grids share direction and outer voxel boundaries (``Grid.downsample``)."""
    lo = [np.asarray(g.origin) - g.direction_matrix @ (np.asarray(g.spacing) / 2) for g in (a, b)]
    return (np.allclose(a.direction, b.direction, atol=1e-6) and np.allclose(lo[0], lo[1], atol=tol)
            and np.allclose(a.extent, b.extent, atol=tol))


class Upsampler:
    """Interpolate fields from a level's field grid onto its image grid.

    Convention: linear interpolation in world space with the border repeated. When the field
    grid is the image grid's :func:`~medreg.deformable.pyramid.doubled_grid` this is an exact
    doubling (separable ``lerp`` passes; ``F.interpolate`` when a gradient is needed) cropped to
    the image; when both grids cover the same extent, ``F.interpolate(..., align_corners=False)``;
    otherwise the world points are sampled.
    """

    def __init__(self, field_grid: Grid, grid: Grid) -> None:
        self.same = field_grid.is_close(grid)
        self.factors = None if self.same else doubling_factors(field_grid, grid)
        self.aligned = same_extent(field_grid, grid)
        self.shape = grid.shape
        self.norm = None if self.same or self.aligned or self.factors else world_to_norm(
            grid.world_points(torch.float32), field_grid)[None]

    def __call__(self, field_: torch.Tensor) -> torch.Tensor:
        """``(1, C, *S_field)`` -> ``(1, C, *S_image)``."""
        if self.same:
            return field_
        if self.factors is not None:
            return self._doubled(field_)
        if self.aligned and not field_.requires_grad:  # separable passes, no graph
            return resize_linear(field_, self.shape)
        if self.aligned:
            return _interpolate(field_, self.shape)
        return sample(field_, self.norm, padding="border")

    def _doubled(self, field_: torch.Tensor) -> torch.Tensor:
        full = [m * f for m, f in zip(field_.shape[2:], self.factors, strict=True)]
        if field_.requires_grad:
            return _crop(_interpolate(field_, full), self.shape)
        if list(self.shape) == full:
            return resize_linear(field_, full)
        # odd sizes: one channel at a time, so only one padded channel exists besides the output
        out = field_.new_empty(*field_.shape[:2], *self.shape)
        for c in range(field_.shape[1]):
            out[:, c:c + 1].copy_(_crop(resize_linear(field_[:, c:c + 1], full), self.shape))
        return out


def _interpolate(x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Differentiable linear resize of ``(N, C, *S)`` to ``shape`` (same extent)."""
    mode = "trilinear" if len(shape) == 3 else "bilinear"
    return F.interpolate(x, size=list(shape), mode=mode, align_corners=False)


def _crop(x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """The leading ``shape`` voxels of ``(N, C, *S)`` (a view)."""
    for a, n in enumerate(shape):
        x = x.narrow(2 + a, 0, n)
    return x


class MovingWarper:
    """``moving(init(x + u(x)))`` at every voxel ``x`` of a level's fixed grid.

    Convention: ``u`` is ``(1, dim, *S)`` in mm on the level grid; ``init`` (fixed->moving) is
    applied after the displacement, as ``Compose(field, init)``; linear inits fold into one
    matrix, others into a dense field on the level grid.
    """

    def __init__(self, level: Level, init: Transform | None) -> None:
        d = level.grid.ndim
        self.points = level.grid.world_points(torch.float32)[None]  # (1, *S, dim)
        self.moving = level.moving.batch.float()
        nfw = torch.as_tensor(level.moving.grid.norm_from_world, dtype=torch.float64)
        self.init_field: DisplacementField | None = None
        if init is not None and not init.is_linear:
            self.init_field = dense_from_transform(init, level.grid)
            m = nfw
        else:
            lin = torch.eye(d + 1, dtype=torch.float64) if init is None else \
                init.matrix().detach().to(torch.float64).cpu()
            m = nfw @ lin
        self.a = m[:d, :d].float()
        self.b = m[:d, d].float()

    def __call__(self, disp: torch.Tensor) -> torch.Tensor:
        """``(1, dim, *S)`` displacement -> ``(1, 1, *S)`` warped moving image."""
        p = self.points + channels_to_vectors(disp)
        if self.init_field is not None:
            p = self.init_field(p)
        return sample(self.moving, p @ self.a.T + self.b, padding="border")
