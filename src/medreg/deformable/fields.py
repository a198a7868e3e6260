"""Operations on dense displacement and velocity fields sampled on a :class:`Grid`.

Convention:
    * A field is a ``(1, dim, *S)`` tensor on ``grid`` (``S = grid.shape``); channel ``i`` is
      the world (LPS mm) component ``i`` of the vector, ordered (x, y[, z]).
    * A displacement ``u`` defines the mapping ``phi(x) = x + u(x)`` from the grid's world points
      (fixed side) to world points (moving side), as ITK's DisplacementFieldTransform.
    * Between voxel centres fields are linearly interpolated; beyond the grid the border vector
      is repeated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from medreg.core.axes import channels_to_vectors, vectors_to_channels
from medreg.core.grid import Grid
from medreg.core.sampling import affine_norm_grid, sample, world_to_norm
from medreg.deformable.filters import central_difference
from medreg.errors import MedregError


def check_field(field: torch.Tensor, grid: Grid, name: str = "field") -> None:
    """Raise :class:`MedregError` unless ``field`` is ``(1, dim, *grid.shape)``."""
    want = (1, grid.ndim, *grid.shape)
    if tuple(field.shape) != want:
        raise MedregError(f"{name} must have shape {want} for its grid, got {tuple(field.shape)}")


def identity_norm(grid: Grid, dtype: torch.dtype = torch.float32,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """``(1, *S, dim)`` normalized coordinates of the grid's own voxel centres."""
    theta = torch.eye(grid.ndim + 1, dtype=torch.float64)[:-1]
    return affine_norm_grid(theta, grid, dtype).to(device)


def norm_offsets(field: torch.Tensor, grid: Grid) -> torch.Tensor:
    """World-mm vectors ``(1, dim, *S)`` -> normalized-space offsets ``(1, *S, dim)`` of ``grid``.

    Convention: normalized offset = ``norm_from_world[:dim, :dim] @ vector`` (no translation).
    """
    d = grid.ndim
    m = torch.as_tensor(grid.norm_from_world[:d, :d], dtype=field.dtype, device=field.device)
    return channels_to_vectors(field) @ m.T


def warp_field(field: torch.Tensor, grid: Grid, disp: torch.Tensor,
               ident: torch.Tensor | None = None) -> torch.Tensor:
    """``field(x + disp(x))`` at every voxel centre ``x`` of ``grid``; both ``(1, dim', *S)``.

    Args:
        field: ``(1, C, *S)`` values on ``grid`` (any channel count).
        disp: ``(1, dim, *S)`` displacement in mm on the same grid.
        ident: optional cached :func:`identity_norm` of ``grid``.

    Returns:
        ``(1, C, *S)``.

    Convention: pull-back (``out(x) = field(x + disp(x))``), linear interpolation, border repeat.
    """
    ident = identity_norm(grid, disp.dtype, disp.device) if ident is None else ident
    return sample(field, ident + norm_offsets(disp, grid), mode="linear", padding="border")


def sample_field(field: torch.Tensor, grid: Grid, points: torch.Tensor) -> torch.Tensor:
    """Interpolate a ``(1, C, *S)`` field on ``grid`` at world points ``(..., dim)``.

    Returns ``(..., C)``.

    Convention: points in world LPS mm; linear interpolation; border vector repeated outside.
    """
    shape = points.shape[:-1]
    norm = world_to_norm(points.reshape(1, -1, grid.ndim), grid)
    out = sample(field.to(points.dtype), norm, mode="linear", padding="border")  # (1, C, P)
    return out[0].T.reshape(*shape, field.shape[1])


def resample_field(field: torch.Tensor, grid: Grid, new_grid: Grid) -> torch.Tensor:
    """A field on ``grid`` interpolated at the voxel centres of ``new_grid`` -> ``(1, C, *S')``.

    Convention: vectors stay in world mm (no rescaling is needed between grids).
    """
    pts = new_grid.world_points(field.dtype, field.device)
    return vectors_to_channels(sample_field(field, grid, pts)[None])


def compose_displacements(first: torch.Tensor, second: torch.Tensor, grid: Grid,
                          ident: torch.Tensor | None = None) -> torch.Tensor:
    """Displacement of ``phi_2 o phi_1`` where ``phi_k(x) = x + u_k(x)`` (both on ``grid``).

    Args:
        first: ``(1, dim, *S)`` ``u_1``, applied first (on fixed-side points).
        second: ``(1, dim, *S)`` ``u_2``, applied to the points ``phi_1(x)``.

    Returns:
        ``(1, dim, *S)``: ``u(x) = u_1(x) + u_2(x + u_1(x))``.

    Convention: matches ``Compose(DisplacementField(u_1), DisplacementField(u_2))``.
    """
    return first + warp_field(second, grid, first, ident)


def integrate_velocity(velocity: torch.Tensor, grid: Grid, steps: int = 6,
                       ident: torch.Tensor | None = None) -> torch.Tensor:
    """Scaling and squaring: displacement of ``exp(v)`` for a stationary velocity field.

    Args:
        velocity: ``(1, dim, *S)`` velocity in mm (per unit time) on ``grid``.
        steps: number of squarings ``n``; ``u_0 = v / 2**n`` then ``u <- u + u o (id + u)``.

    Returns:
        ``(1, dim, *S)`` displacement of the time-1 flow (differentiable in ``velocity``).

    Convention: ``exp(v)`` maps the grid's world points forward along ``v``; ``exp(-v)`` is its
    inverse.
    """
    if steps < 0:
        raise MedregError(f"scaling-and-squaring steps must be >= 0, got {steps}")
    ident = identity_norm(grid, velocity.dtype, velocity.device) if ident is None else ident
    disp = velocity / (2.0**steps)
    for _ in range(steps):
        disp = compose_displacements(disp, disp, grid, ident)
    return disp


@dataclass(frozen=True)
class InversionResult:
    """Result of :func:`invert_displacement`.

    Attributes:
        displacement: ``(1, dim, *S)`` inverse displacement ``w``.
        residual_max, residual_mean: ``|w(y) + u(y + w(y))|`` in mm over the grid.
        iterations: Newton iterations used.
    """

    displacement: torch.Tensor
    residual_max: float
    residual_mean: float
    iterations: int


#: A voxel whose inversion residual is below this fraction of ``tol`` stops iterating.
RETIRE_FRACTION = 0.1


def invert_displacement(disp: torch.Tensor, grid: Grid, *, iterations: int = 50,
                        tol: float = 1e-3) -> InversionResult:
    """Invert ``phi(x) = x + u(x)``: fixed-point steps, Newton's once those diverge.

    Args:
        disp: ``(1, dim, *S)`` displacement ``u`` in mm on ``grid``.
        iterations: maximum iterations.
        tol: stop when the largest residual falls below ``tol`` mm.

    Returns:
        :class:`InversionResult`; the residual is ``|phi(phi^-1(y)) - y|`` at every voxel ``y``.

    Convention: ``phi^-1(y) = y + w(y)``, starting from ``w = -u``. Steps are the plain
    fixed-point ``w <- -u(y + w)`` (``r = w + u(y + w)`` subtracted) until a residual above
    ``tol`` grows at a voxel whose ``y + w`` is inside the grid: that step diverges where
    ``|grad u| >= 1``, e.g. where greedy SyN compresses tissue strongly. From then on the steps
    are Newton's, ``w <- w - J(y + w)^-1 r`` with ``J`` the Jacobian of ``phi`` (its inverse
    interpolated from the voxel centres; ``I`` where ``det J`` is small or negative), at most
    one (smallest) voxel long, which converge wherever ``phi`` is unfolded; points ``y + w``
    beyond the border voxel centres keep the plain step, since the border-clamped ``u`` makes
    the interpolated ``J`` wrong there. A voxel whose residual (above ``tol``) grew goes back to
    its last point and halves its step (doubled again, up to one, after a success). Each
    voxel's residual depends on its own ``w`` only, so a voxel stops iterating once its
    residual is below ``RETIRE_FRACTION * tol``; later iterations sample the others only.
    """
    check_field(disp, grid, "displacement")
    d = grid.ndim
    with torch.no_grad():
        ident = identity_norm(grid, disp.dtype, disp.device).reshape(-1, d)  # (P, dim)
        nfw = torch.as_tensor(grid.norm_from_world[:d, :d], dtype=disp.dtype,
                              device=disp.device).T
        w = (-disp).reshape(d, -1).T.contiguous()  # (P, dim) vectors, updated per voxel
        res_all = torch.zeros(w.shape[0], dtype=disp.dtype, device=disp.device)
        idx = torch.arange(w.shape[0], device=disp.device)  # the voxels still iterating
        wa, damp = w.clone(), torch.ones_like(w[:, 0])
        it, prev, jinv, cap = 0, None, None, float(min(grid.spacing))
        for it in range(1, iterations + 1):  # noqa: B007 - the count is reported
            points = ident[idx] + wa @ nfw
            r = _sample_points(disp, points).add_(wa)
            res = r.square().sum(1).sqrt_()
            if prev is not None:
                worse = (res > prev[2]) & (res > tol)
                if bool(worse.any()):  # undo the steps that did not help
                    if jinv is None and bool((worse & ~_outside(points)).any()):
                        jinv = _inverse_jacobians(disp, grid)  # the plain step fails: Newton
                    damp = torch.where(worse, damp * 0.5, (damp * 2).clamp_(max=1.0))
                    back = worse[:, None]
                    wa, r = torch.where(back, prev[0], wa), torch.where(back, prev[1], r)
                    res = torch.where(worse, prev[2], res)
                    points = ident[idx] + wa @ nfw
                elif jinv is not None:
                    damp = (damp * 2).clamp_(max=1.0)
            done = float(res.max()) < tol
            keep = None if done else res >= RETIRE_FRACTION * tol
            if done or not bool(keep.all()):  # retire converged voxels
                out = ~keep if keep is not None else slice(None)
                w[idx[out]], res_all[idx[out]] = wa[out], res[out]
                if done:
                    break
                idx, wa, r, res, points, damp = (x[keep] for x in (idx, wa, r, res, points, damp))
            prev = (wa, r, res)
            step = r if jinv is None else _newton_step(jinv, points, r, cap)
            wa = wa - step * damp[:, None]
        else:
            r = _sample_points(disp, ident[idx] + wa @ nfw).add_(wa)
            w[idx], res_all[idx] = wa, r.square().sum(1).sqrt_()
        field = w.T.reshape(1, d, *grid.shape).contiguous()
    return InversionResult(field, float(res_all.max()), float(res_all.mean()), it)


def _sample_points(field: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """``(1, C, *S)`` field at normalized ``points`` ``(P, dim)`` -> ``(P, C)`` (linear,
    border repeated)."""
    return sample(field, points[None], mode="linear", padding="border")[0].T


def _newton_step(jinv: torch.Tensor, points: torch.Tensor, r: torch.Tensor, cap: float
                 ) -> torch.Tensor:
    """``J^-1 r`` ``(P, dim)`` at normalized ``points`` ``(P, dim)``, at most ``cap`` mm long;
    the plain step ``r`` at points beyond the border voxel centres."""
    d = r.shape[1]
    mats = _sample_points(jinv, points).reshape(-1, d, d)  # row-major J^-1 per point
    step = torch.bmm(mats, r[:, :, None])[:, :, 0]
    step.mul_((cap / step.square().sum(1).sqrt_().clamp_(min=cap))[:, None])
    return torch.where(_outside(points)[:, None], r, step)


def _outside(points: torch.Tensor) -> torch.Tensor:
    """``(P,)`` True where normalized ``points`` ``(P, dim)`` lie beyond the border voxel
    centres (``identity_norm`` puts those at +-1)."""
    return (points.abs() > 1 + 1e-5).any(-1)


def _inverse_jacobians(disp: torch.Tensor, grid: Grid, min_det: float = 1e-2) -> torch.Tensor:
    """``(1, dim*dim, *S)`` row-major ``J^-1`` of ``phi = id + u`` (identity where ``det J``
    is below ``min_det``)."""
    d = grid.ndim
    jac = jacobian_matrix(disp, grid)  # (*S, d, d)
    eye = torch.eye(d, dtype=jac.dtype, device=jac.device)
    bad = torch.linalg.det(jac) < min_det
    jinv = torch.linalg.inv(torch.where(bad[..., None, None], eye, jac))
    return jinv.reshape(*jinv.shape[:d], d * d).movedim(-1, 0)[None].contiguous()


def jacobian_matrix(disp: torch.Tensor, grid: Grid) -> torch.Tensor:
    """World Jacobian of ``phi(x) = x + u(x)`` by central differences (one-sided at borders).

    Args:
        disp: ``(1, dim, *S)`` displacement in mm on ``grid``.

    Returns:
        ``(*S, dim, dim)`` with entry ``[..., i, j] = d phi_i / d x_j`` (world x, y[, z]).

    Convention: index axis ``a`` points along world direction ``D[:, a]`` with spacing ``s_a``,
    so ``du/dx = (du/ds) D^T`` with ``s`` the mm distance along the index axes.
    """
    d = grid.ndim
    sp = [float(s) for s in grid.spacing]
    u = disp[0]
    grads = []
    for a in range(d):  # derivative along index axis a (coordinate order)
        tax = 1 + d - 1 - a  # tensor axis of coordinate a inside (dim, *S)
        if u.shape[tax] > 1:
            grads.append(central_difference(u, tax, sp[a]))
        else:
            grads.append(torch.zeros_like(u))
    g = torch.stack(grads, dim=-1)  # (dim, *S, a)
    g = g.movedim(0, -2)  # (*S, i, a)
    dmat = torch.as_tensor(grid.direction_matrix, dtype=u.dtype, device=u.device)
    return torch.eye(d, dtype=u.dtype, device=u.device) + g @ dmat.T


def jacobian_determinant(disp: torch.Tensor, grid: Grid) -> torch.Tensor:
    """``(*S)`` determinant of :func:`jacobian_matrix` (volume change of ``phi``)."""
    return torch.linalg.det(jacobian_matrix(disp, grid))
