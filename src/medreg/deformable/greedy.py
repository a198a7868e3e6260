"""Greedy symmetric SyN (ANTs / FireANTs style): compositive updates of two displacement fields.

Convention:
    * Two displacement fields on the level's *field grid* (fixed-image geometry, the midpoint
      space): ``A(x) = x + u_f(x)`` maps midpoint points into the fixed image, ``B(x) = x + u_m(x)``
      into the moving image *before* the linear ``init`` (so the moving image is read at
      ``init(B(x))``). Vectors are world LPS mm, ``(1, dim, *S_field)``, channels (x, y[, z]).
    * One iteration: pull both images to the midpoint (``F o A``, ``M o init o B``), take the
      metric's derivative with respect to the two midpoint images (the pointwise CC force for
      LNCC, autograd for other metrics), multiply by the spatial gradients of the midpoint images
      (world mm), average onto the field grid, Gaussian-smooth the two forces (``grad_sigma``),
      scale each so its longest vector is ``step``, and compose: ``A <- A o (id + d_f)``,
      ``B <- B o (id + d_m)``. Small smooth updates composed this way keep both maps
      diffeomorphic; ``field_sigma`` also smooths the total fields. ``step`` and the sigmas are in
      voxels of the level's *image* grid (ANTs' convention), whatever the field grid.
    * The full fixed->moving mapping is ``init o B o A^-1`` and its inverse ``A o B^-1 o init^-1``;
      the inverses of ``A`` and ``B`` are computed once at the end by Newton iteration.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from medreg.core.axes import channels_to_vectors
from medreg.core.grid import Grid
from medreg.core.resize import block_mean
from medreg.core.sampling import affine_norm_ramps, sample, theta_between
from medreg.deformable.fields import (
    compose_displacements,
    identity_norm,
    invert_displacement,
    resample_field,
)
from medreg.deformable.filters import central_difference, gaussian_smooth
from medreg.deformable.memory import release_free_heap
from medreg.deformable.metrics import lncc_force
from medreg.deformable.optimize import (
    LevelResult,
    MovingWarper,
    SolverOptions,
    Upsampler,
    converged,
)
from medreg.deformable.pyramid import Level
from medreg.engine.threads import threads_for
from medreg.errors import MedregError
from medreg.transforms.base import Transform

Metric = Callable[..., torch.Tensor]


def world_gradient(image: torch.Tensor, grid: Grid,
                   weight: torch.Tensor | None = None,
                   reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Central-difference gradient of ``(1, 1, *S)`` in world mm -> ``(1, dim, *S)``.

    With ``weight`` ``(1, 1, *S)`` and a linear ``reduce`` (e.g. area averaging onto a coarser
    grid), returns ``reduce(weight * gradient)`` ``(1, dim, *S')``, one index axis at a time, so
    only one image-sized derivative exists at once.

    Convention: index axis ``a`` runs along world direction ``D[:, a]`` with spacing ``s_a``, so
    ``grad_world = D @ (df/ds_a)_a``; channels are world (x, y[, z]); one-sided at the borders.
    """
    d = grid.ndim
    sp = [float(s) for s in grid.spacing]
    parts = []
    for a in range(d):  # derivative along index axis a (coordinate order), one at a time
        g = central_difference(image, 2 + d - 1 - a, sp[a])
        if weight is not None:
            g.mul_(weight)
        parts.append(g if reduce is None else reduce(g))
    g = torch.cat(parts, dim=1)
    dmat = np.asarray(grid.direction_matrix)  # D commutes with the (linear) weight and reduce
    if np.allclose(dmat, np.eye(d), atol=1e-9):
        return g
    m = torch.as_tensor(dmat, dtype=g.dtype, device=g.device)
    return torch.einsum("ja,ba...->bj...", m, g)


class _Resizer:
    """Fields between a level's image grid and its (same-extent, coarser) field grid."""

    def __init__(self, field_grid: Grid, grid: Grid) -> None:
        self.up = Upsampler(field_grid, grid)
        self.field_grid, self.grid = field_grid, grid
        self.same = self.up.same
        self.aligned = self.up.aligned
        self.factors = self.up.factors  # field grid = doubled image grid (whole blocks)

    def down(self, x: torch.Tensor) -> torch.Tensor:
        """``(1, C, *S_image)`` -> ``(1, C, *S_field)`` by area averaging (resampling otherwise).

        On a doubled grid, the last block of an odd axis holds one image voxel: the voxel is
        repeated once, so the block's mean is that voxel's value.
        """
        if self.same:
            return x
        if self.factors is not None:  # whole blocks: several times faster than adaptive pooling
            pad = []
            for n, f in zip(reversed(x.shape[2:]), reversed(self.factors), strict=True):
                pad += [0, (-n) % f]
            if any(pad):
                x = F.pad(x, pad, mode="replicate")
            return block_mean(x, self.factors)
        if self.aligned:
            return area_average(x, self.field_grid.shape)
        return resample_field(x, self.grid, self.field_grid)


def area_average(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``adaptive_avg_pool`` of ``(N, C, *S)`` to ``shape``, separably for 3D.

    3D: the ``(H, W)`` pass treats every slice as a channel, so the CPU spreads it over the
    intra-op threads even for one channel (``adaptive_avg_pool3d`` splits only over ``N*C``);
    box means are separable, so the result is the same.
    """
    if x.ndim == 4:
        return F.adaptive_avg_pool2d(x, shape)
    n, c, d, h, w = x.shape
    od, oh, ow = shape
    y = F.adaptive_avg_pool2d(x.reshape(n, c * d, h, w), (oh, ow))
    y = F.adaptive_avg_pool1d(y.reshape(n * c, d, oh * ow).transpose(1, 2), od)
    return y.reshape(n, c, oh, ow, od).permute(0, 1, 4, 2, 3).contiguous()


class _Puller:
    """``image(L(x + u(x)))`` on a level grid for a fixed->image linear map ``L`` (identity or
    ``init``), with ``u`` given on the (coarser) field grid.

    Convention: normalized sampling points are ``base(x) + N u(x)`` with ``base = norm_from_world
    o L`` at the level's voxel centres and ``N`` its linear part; ``N u`` is formed on the field
    grid and then upsampled (interpolation commutes with the constant matrix), which saves a
    full-resolution matrix product per iteration. ``base`` is affine in the level's normalized
    coordinates, so it is added as one broadcast 1D ramp per axis rather than stored as a
    full-resolution grid (``dim`` image-sized tensors saved per puller).
    """

    def __init__(self, image: torch.Tensor, image_grid: Grid, level_grid: Grid,
                 resize: _Resizer, matrix: np.ndarray | None = None) -> None:
        d = level_grid.ndim
        lin = np.eye(d + 1) if matrix is None else np.asarray(matrix, dtype=np.float64)
        m = np.asarray(image_grid.norm_from_world) @ lin
        self.image, self.resize = image, resize
        self.lin = torch.as_tensor(m[:d, :d], dtype=torch.float32)
        theta = theta_between(level_grid, image_grid, lin)  # level norm -> image norm
        self.ramps = affine_norm_ramps(theta, level_grid.shape)

    def __call__(self, u: torch.Tensor) -> torch.Tensor:
        """``(1, dim, *S_field)`` mm -> ``(1, C, *S_level)`` pulled image."""
        offsets = torch.einsum("ij,bj...->bi...", self.lin, u)
        moved = self.resize.up(offsets)  # a new tensor (or ``offsets``, itself new)
        for k, ramps in enumerate(self.ramps):  # in place: no extra full-resolution buffer
            for ramp in ramps:
                moved[0, k].add_(ramp)
        return sample(self.image, channels_to_vectors(moved), padding="border")


class GreedySyN:
    """Parametrization and one-iteration update of greedy symmetric SyN (module docstring).

    Args:
        metric: ``loss(fixed, warped, mask)``, differentiable in both images.
        init: the incoming fixed->moving transform (applied after ``B``) or ``None``.
    """

    smooth = False  # the solver below smooths; coarse_to_fine must not

    def __init__(self, metric: Metric, init: Transform | None, *,
                 cc_window: int | None = None) -> None:
        self.metric, self.init, self.cc_window = metric, init, cc_window
        self._level: Level | None = None

    def _cache(self, level: Level) -> None:
        if self._level is not level:
            self._level = level
            self.resize = _Resizer(level.field_grid, level.grid)
            self.ident_field = identity_norm(level.field_grid)
            self.pull_fixed = _Puller(level.fixed.batch, level.grid, level.grid, self.resize)
            if self.init is None or self.init.is_linear:
                lin = None if self.init is None else \
                    self.init.matrix().detach().to(torch.float64).cpu().numpy()
                self.pull_moving = _Puller(level.moving.batch.float(), level.moving.grid,
                                           level.grid, self.resize, lin)
            else:  # a dense init: sample through it at full resolution
                warper = MovingWarper(level, init=self.init)
                self.pull_moving = lambda u: warper(self.resize.up(u))
                lin = None
            self.pull_masks = self._mask_pullers(level, lin)

    def _mask_pullers(self, level: Level, lin: np.ndarray | None) -> list:
        """Pullers of the fixed mask through ``A`` and the moving mask through ``init o B``."""
        out: list = []
        if level.mask is not None:
            out.append((0, _Puller(level.mask.float(), level.grid, level.grid, self.resize)))
        if level.moving_mask is not None:
            if self.init is not None and not self.init.is_linear:
                raise MedregError("a moving mask needs a linear (or no) initial transform")
            out.append((1, _Puller(level.moving_mask.float(), level.moving.grid, level.grid,
                                   self.resize, lin)))
        return out

    def midpoint_mask(self, params: Sequence[torch.Tensor]) -> torch.Tensor | None:
        """Product of the masks pulled to the midpoint ``(1, 1, *S)``, or ``None`` without any.

        Convention: the fixed mask is read through ``A`` and the moving mask through
        ``init o B``, so both cover the midpoint images they belong to.
        """
        mask = None
        for i, puller in self.pull_masks:
            m = puller(params[i])
            mask = m if mask is None else mask.mul_(m)
        return mask

    def initial(self, level: Level) -> list[torch.Tensor]:
        """Two zero fields ``(1, dim, *S_field)`` (``u_f``, ``u_m``)."""
        z = torch.zeros(1, level.grid.ndim, *level.field_grid.shape)
        return [z, z.clone()]

    def upsample(self, params: list[torch.Tensor], old: Level, new: Level
                 ) -> list[torch.Tensor]:
        """Carry both fields to the next level's field grid (vectors stay in mm)."""
        return [resample_field(p, old.field_grid, new.field_grid) for p in params]

    def midpoint_images(self, level: Level, params: Sequence[torch.Tensor]
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """``F o A`` and ``M o init o B`` on the level's image grid, each ``(1, 1, *S)``."""
        self._cache(level)
        return self.pull_fixed(params[0]), self.pull_moving(params[1])

    def forces(self, level: Level, params: Sequence[torch.Tensor]
               ) -> tuple[float, list[torch.Tensor]]:
        """Loss and the two descent directions' raw forces ``(1, dim, *S_field)`` (mm^-1).

        The force on ``u_f`` is ``dL/d(F o A) * grad(F o A)``: the derivative of the loss for a
        displacement ``d`` composed as ``A o (id + d)``; likewise for ``u_m``. With
        ``cc_window`` set, ``dL/d(F o A)`` is the pointwise CC force of
        :func:`~medreg.deformable.metrics.lncc_force` (ANTs' and DIPY's), else autograd's.
        """
        fixed, moving = self.midpoint_images(level, params)
        mask = self.midpoint_mask(params)
        if self.cc_window is not None:
            loss, g_f, g_m = lncc_force(fixed, moving, mask, self.cc_window)
        else:
            fixed.requires_grad_(True)
            moving.requires_grad_(True)
            loss = self.metric(fixed, moving, mask)
            g_f, g_m = torch.autograd.grad(loss, (fixed, moving))
        out = []
        for img, g in ((fixed, g_f), (moving, g_m)):
            out.append(world_gradient(img.detach(), level.grid, g, self.resize.down))
        return float(loss.detach()), out

    def step(self, level: Level, params: list[torch.Tensor], opts: SolverOptions) -> float:
        """One greedy iteration; ``params`` are replaced in place. Returns the loss before it."""
        loss, forces = self.forces(level, params)
        ratio = np.asarray(level.grid.spacing) / np.asarray(level.field_grid.spacing)
        step_mm = opts.lr * float(np.mean(level.grid.spacing))
        for i, force in enumerate(forces):
            if opts.grad_sigma > 0:
                force = gaussian_smooth(force, tuple(opts.grad_sigma * ratio))
            longest = float(force.pow(2).sum(1).max().sqrt())
            if longest <= 0:
                continue
            update = force * (-step_mm / longest)
            new = compose_displacements(update, params[i], level.field_grid, self.ident_field)
            if opts.field_sigma > 0:
                new = gaussian_smooth(new, tuple(opts.field_sigma * ratio))
            params[i] = new
        return loss


def solve_greedy_level(problem: GreedySyN, level: Level, params: list[torch.Tensor],
                       iterations: int, opts: SolverOptions,
                       callback: Callable[[int, float], None] | None = None) -> LevelResult:
    """Greedy SyN iterations on one level (``params`` replaced in place), with a convergence stop.

    Small levels run on one intra-op thread (:func:`medreg.engine.threads.threads_for`); an
    iteration's largest operations filter the five LNCC statistics of every voxel, so its work
    is counted as five times the voxels.
    """
    out = LevelResult(stop_reason=f"maximum iterations ({iterations})")
    release_free_heap()  # the previous level's freed buffers: not part of this level's peak
    with torch.no_grad(), threads_for(5 * level.grid.numel):
        for it in range(iterations):
            with torch.enable_grad():
                loss = problem.step(level, params, opts)
            out.history.append(loss)
            out.iterations = it + 1
            if callback is not None:
                callback(it, loss)
            if converged(out.history, opts):
                out.stop_reason = (f"converged: loss change < {opts.tol:g} over {opts.window} "
                                   "iterations")
                break
    return out


class GreedySchedule:
    """Per-level greedy SyN settings, a drop-in ``solver`` for :func:`coarse_to_fine`.

    Args:
        levels: the pyramid levels, coarse to fine.
        opts: one :class:`SolverOptions` per level (``lr`` is the step, level voxels).
        windows: the LNCC window (voxels) of each level, or ``None`` for autograd metrics.
    """

    def __init__(self, levels: Sequence[Level], opts: Sequence[SolverOptions],
                 windows: Sequence[int | None]) -> None:
        if not len(levels) == len(opts) == len(windows):
            raise MedregError(f"{len(levels)} levels but {len(opts)} option sets and "
                              f"{len(windows)} windows")
        self.levels, self.opts, self.windows = list(levels), list(opts), list(windows)

    def __call__(self, problem: GreedySyN, level: Level, params: list[torch.Tensor],
                 iterations: int, opts: SolverOptions,
                 callback: Callable[[int, float], None] | None = None) -> LevelResult:
        """:func:`solve_greedy_level` with this level's settings (``opts`` is ignored)."""
        i = next(k for k, lv in enumerate(self.levels) if lv is level)
        problem.cc_window = self.windows[i]
        return solve_greedy_level(problem, level, params, iterations, self.opts[i], callback)


def syn_mappings(u_f: torch.Tensor, u_m: torch.Tensor, field_grid: Grid, grid: Grid, *,
                 iterations: int = 30, tol: float = 1e-2
                 ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Forward ``B o A^-1`` and inverse ``A o B^-1`` displacements ``(1, dim, *S)`` on ``grid``.

    Args:
        u_f, u_m: ``(1, dim, *S_field)`` displacements of ``A`` and ``B`` on ``field_grid``.
        grid: output grid (the fixed image grid).
        iterations, tol: inversion limits (``tol`` in mm, largest residual).
            Inverses and compositions are computed on ``field_grid``, the results interpolated
            (linearly, border repeated) onto ``grid``.

    Returns:
        forward, inverse, and the inversion residuals (mm, max and mean of ``A^-1`` and
        ``B^-1``) with their iteration counts.

    Convention: both returned fields map points of ``grid``: the forward one into the moving
    space before ``init``, the inverse one from that space back to the fixed space.
    """
    release_free_heap()
    with torch.no_grad():
        inv_f = invert_displacement(u_f, field_grid, iterations=iterations, tol=tol)
        inv_m = invert_displacement(u_m, field_grid, iterations=iterations, tol=tol)
        ident = identity_norm(field_grid)
        forward = compose_displacements(inv_f.displacement, u_m, field_grid, ident)
        backward = compose_displacements(inv_m.displacement, u_f, field_grid, ident)
        release_free_heap()  # the inversions' many shrinking temporaries
        up = Upsampler(field_grid, grid)  # the composed fields are as smooth as their parts
        forward, backward = up(forward), up(backward)
    release_free_heap()  # and the resizing passes': the caller's next buffers start afresh
    report = {f"{name}_{key}": float(getattr(res, attr))
              for name, res in (("inverse_a", inv_f), ("inverse_b", inv_m))
              for key, attr in (("residual_max_mm", "residual_max"),
                                ("residual_mean_mm", "residual_mean"),
                                ("iterations", "iterations"))}
    return forward, backward, report
