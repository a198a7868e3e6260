"""Deformable transforms: dense displacement field, stationary velocity field, cubic B-spline FFD.

Convention:
    * Each maps fixed world points to moving world points (LPS mm): ``T(x) = x + u(x)``.
    * Fields are ``(1, dim, *S)`` on a :class:`Grid`, vectors in world mm ordered (x, y[, z]).
    * ``displacement_on(grid)`` returns ``u`` at the voxel centres of any grid ``(1, dim, *S')``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from medreg.core.axes import tensor_axis, vectors_to_channels
from medreg.core.grid import Grid
from medreg.deformable.fields import (
    InversionResult,
    check_field,
    integrate_velocity,
    invert_displacement,
    resample_field,
    sample_field,
)
from medreg.errors import MedregError
from medreg.transforms.base import Transform, parameter_dtype


class DisplacementField(Transform):
    """Dense displacement field ``T(x) = x + u(x)``, ``u`` linearly interpolated on ``grid``.

    Args:
        grid: the field's geometry (usually the fixed image grid).
        displacement: ``(1, dim, *grid.shape)`` in mm; zeros when omitted.
        trainable: register ``u`` as an ``nn.Parameter`` (else a buffer).
        copy: keep a copy of ``displacement`` (``False`` adopts the caller's tensor, for fields
            nobody else holds: saves one field-sized buffer).

    Attributes:
        inversion: set on fields produced by :meth:`inverse` (residuals of the inversion).
    """

    def __init__(self, grid: Grid, displacement: torch.Tensor | None = None, *,
                 trainable: bool = False, copy: bool = True) -> None:
        super().__init__()
        self.grid = grid
        self.ndim = grid.ndim
        u = torch.zeros(1, grid.ndim, *grid.shape) if displacement is None else displacement
        check_field(u, grid, "displacement")
        u = u.detach().clone() if copy else u.detach()
        if trainable:
            self.field = nn.Parameter(u)
        else:
            self.register_buffer("field", u)
        self.inversion: InversionResult | None = None

    def displacement(self) -> torch.Tensor:
        """``(1, dim, *S)`` displacement on :attr:`grid`."""
        return self.field

    def displacement_on(self, grid: Grid) -> torch.Tensor:
        """``(1, dim, *S')`` displacement interpolated at the voxel centres of ``grid``."""
        if grid.is_close(self.grid):
            return self.field
        return resample_field(self.field, self.grid, grid)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        """``(..., dim)`` fixed world points -> ``(..., dim)`` moving world points."""
        return points + sample_field(self.field, self.grid, points)

    def inverse(self, iterations: int = 50, tol: float = 1e-3) -> DisplacementField:
        """Numerical inverse on the same grid (Newton iteration); see ``.inversion``."""
        res = invert_displacement(self.field.detach(), self.grid, iterations=iterations, tol=tol)
        inv = DisplacementField(self.grid, res.displacement)
        inv.inversion = res
        return inv


class StationaryVelocityField(Transform):
    """Diffeomorphism ``T = exp(v)`` of a stationary velocity field (scaling and squaring).

    Args:
        grid: geometry of ``v``.
        velocity: ``(1, dim, *grid.shape)`` in mm; zeros when omitted.
        steps: squarings used by :func:`~medreg.deformable.fields.integrate_velocity`.
    """

    def __init__(self, grid: Grid, velocity: torch.Tensor | None = None, steps: int = 6) -> None:
        super().__init__()
        self.grid = grid
        self.ndim = grid.ndim
        self.steps = int(steps)
        v = torch.zeros(1, grid.ndim, *grid.shape) if velocity is None else velocity
        check_field(v, grid, "velocity")
        self.velocity = nn.Parameter(v.detach().clone())

    def displacement(self) -> torch.Tensor:
        """``(1, dim, *S)`` displacement of ``exp(v)`` on :attr:`grid`."""
        return integrate_velocity(self.velocity, self.grid, self.steps)

    def displacement_on(self, grid: Grid) -> torch.Tensor:
        u = self.displacement()
        return u if grid.is_close(self.grid) else resample_field(u, self.grid, grid)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        return points + sample_field(self.displacement(), self.grid, points)

    def inverse(self) -> StationaryVelocityField:
        """``exp(-v)``: the exact inverse flow (up to interpolation)."""
        return StationaryVelocityField(self.grid, -self.velocity.detach(), self.steps)


def _cubic_weights(frac: torch.Tensor) -> torch.Tensor:
    """``(..., 4)`` uniform cubic B-spline weights for offsets -1, 0, 1, 2 at fraction ``frac``."""
    f, f2, f3 = frac, frac * frac, frac * frac * frac
    return torch.stack([(1 - f) ** 3 / 6, (3 * f3 - 6 * f2 + 4) / 6,
                        (-3 * f3 + 3 * f2 + 3 * f + 1) / 6, f3 / 6], dim=-1)


def control_grid(grid: Grid, spacing: float | Sequence[float]) -> Grid:
    """Control-point grid of a cubic B-spline FFD covering ``grid`` with ``spacing`` mm.

    Convention: same direction as ``grid``; ``ceil(L / c) + 3`` points per axis centred on the
    image extent ``L`` between the first and last voxel centres, so every voxel has its 4
    supporting control points.
    """
    d = grid.ndim
    c = np.broadcast_to(np.asarray(spacing, dtype=np.float64).ravel(), (d,)) \
        if np.size(spacing) in (1, d) else None
    if c is None or not np.all(np.isfinite(c)) or np.any(c <= 0):
        raise MedregError(f"control-point spacing must be 1 or {d} positive mm values, "
                          f"got {spacing}")
    if np.any(c < np.asarray(grid.spacing) - 1e-9):
        raise MedregError(f"control-point spacing {c.tolist()} mm is finer than the image voxels "
                          f"{list(grid.spacing)} mm; use at least one voxel")
    length = (np.asarray(grid.size) - 1) * np.asarray(grid.spacing)
    m = np.ceil(length / c - 1e-9).astype(int) + 3
    start = length / 2 - (m - 1) * c / 2  # mm along the index axes from voxel 0
    origin = np.asarray(grid.origin) + grid.direction_matrix @ start
    return Grid(m, c, origin, grid.direction)


def _basis_matrix(positions: torch.Tensor, m: int) -> torch.Tensor:
    """``(n, m)`` B-spline weights of ``n`` control-index ``positions`` on ``m`` control points."""
    j = torch.floor(positions)
    w = _cubic_weights(positions - j)  # (n, 4)
    cols = j[:, None].long() + torch.arange(-1, 3)
    keep = (cols >= 0) & (cols < m)
    out = torch.zeros(positions.shape[0], m, dtype=positions.dtype)
    rows = torch.arange(positions.shape[0])[:, None].expand_as(cols)
    out.index_put_((rows[keep], cols[keep]), w[keep], accumulate=True)
    return out


class BSplineTransform(Transform):
    """Cubic B-spline free-form deformation ``T(x) = x + sum_k c_k B((x - x_k) / s)``.

    Args:
        grid: image grid the FFD must cover (usually the fixed image grid).
        spacing: control-point spacing in mm (one value or one per axis x, y[, z]).
        coefficients: optional ``(1, dim, *ctrl.shape)`` control displacements in mm.
    """

    def __init__(self, grid: Grid, spacing: float | Sequence[float],
                 coefficients: torch.Tensor | None = None) -> None:
        super().__init__()
        self.grid = grid
        self.ndim = grid.ndim
        self.control = control_grid(grid, spacing)
        c = torch.zeros(1, grid.ndim, *self.control.shape) if coefficients is None else coefficients
        check_field(c, self.control, "B-spline coefficients")
        self.coefficients = nn.Parameter(c.detach().clone())
        self._bases: dict[Grid, list[torch.Tensor]] = {}

    def _axis_bases(self, grid: Grid) -> list[torch.Tensor]:
        """Per coordinate axis ``(n_a, m_a)`` basis matrices for an identically oriented grid."""
        if grid not in self._bases:
            ctrl = self.control
            start = ctrl.world_to_index(np.asarray(grid.origin)[None])[0]
            step = np.asarray(grid.spacing) / np.asarray(ctrl.spacing)
            self._bases[grid] = [
                _basis_matrix(torch.as_tensor(start[a] + step[a] * np.arange(grid.size[a]),
                                              dtype=torch.float64), ctrl.size[a])
                for a in range(grid.ndim)]
        return self._bases[grid]

    def displacement_on(self, grid: Grid, coefficients: torch.Tensor | None = None
                        ) -> torch.Tensor:
        """``(1, dim, *S)`` displacement at the voxel centres of ``grid`` (separable products).

        Args:
            grid: where to evaluate; an identically oriented grid uses per-axis basis matrices.
            coefficients: optional ``(1, dim, *ctrl.shape)`` to use instead of the parameters.
        """
        out = self.coefficients if coefficients is None else coefficients
        if not np.allclose(grid.direction, self.control.direction, atol=1e-6):
            pts = grid.world_points(out.dtype, out.device)
            moved = torch.func.functional_call(self, {"coefficients": out}, (pts,))
            return vectors_to_channels((moved - pts)[None])
        nsp = grid.ndim
        for a, basis in enumerate(self._axis_bases(grid)):
            ax = 2 + tensor_axis(a, nsp)
            b = basis.to(out.dtype).to(out.device)
            out = torch.movedim(torch.movedim(out, ax, -1) @ b.T, -1, ax)
        return out

    def displacement(self) -> torch.Tensor:
        return self.displacement_on(self.grid)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        """``(..., dim)`` world points -> moving points; exact B-spline sum (4^dim terms)."""
        d, ctrl = self.ndim, self.control
        m = torch.as_tensor(ctrl.index_from_world, dtype=points.dtype, device=points.device)
        t = points @ m[:d, :d].T + m[:d, d]
        j = torch.floor(t)
        w = _cubic_weights(t - j)  # (..., d, 4)
        coef = self.coefficients[0].reshape(d, -1).to(points.dtype)  # (dim, prod m) tensor order
        size = torch.as_tensor(ctrl.size, device=points.device)
        strides = [int(math.prod(ctrl.size[:a])) for a in range(d)]  # x fastest in flat layout
        disp = torch.zeros_like(points)
        for offs in itertools.product(range(4), repeat=d):
            idx = j.long() + torch.as_tensor(offs, device=points.device) - 1
            ok = ((idx >= 0) & (idx < size)).all(-1)
            flat = sum(idx[..., a].clamp(0, ctrl.size[a] - 1) * strides[a] for a in range(d))
            weight = torch.prod(torch.stack([w[..., a, offs[a]] for a in range(d)], -1), -1)
            disp = disp + (weight * ok)[..., None] * coef[:, flat].movedim(0, -1)
        return points + disp


def dense_from_transform(transform: Transform, grid: Grid,
                         dtype: torch.dtype = torch.float32) -> DisplacementField:
    """Collapse any fixed->moving transform into ``x + u(x)`` sampled on ``grid``.

    Convention: ``u(x) = T(x) - x`` at each voxel centre ``x`` (the ITK displacement-field
    convention); linear and deformable parts of a ``Compose`` are folded into one field.
    """
    if transform.ndim != grid.ndim:
        raise MedregError(f"a {transform.ndim}D transform cannot be sampled on a {grid.ndim}D grid")
    if isinstance(transform, DisplacementField) and grid.is_close(transform.grid):
        # exact: voxel centres are the field's nodes (saves ~10 float64 copies of the grid)
        return DisplacementField(grid, transform.field.detach().to(dtype))
    pts = grid.world_points(torch.float64)
    with torch.no_grad():
        moved = transform(pts.to(parameter_dtype(transform))).to(torch.float64)
    return DisplacementField(grid, vectors_to_channels((moved - pts)[None]).to(dtype))


