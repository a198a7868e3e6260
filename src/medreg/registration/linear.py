"""Coarse-to-fine linear registration (translation, rigid, similarity, affine).

Convention: the estimated transform maps fixed world points to moving world points (LPS mm);
its centre of rotation is the fixed image's geometric centre (or the initializer's centre).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from medreg.core.image import Image
from medreg.engine import OptimizerConfig, gaussian_pyramid, run_optimizer
from medreg.engine.threads import threads_for
from medreg.errors import MedregError
from medreg.metrics import get_metric
from medreg.registration.objective import LevelObjective
from medreg.registration.plugins import INITIALIZERS, StageContext, StageOutput, resolve
from medreg.transforms.base import Transform
from medreg.transforms.linear import LinearTransform, linear_from_matrix


@dataclass(frozen=True)
class LinearOptions:
    """Schedule of a linear stage.

    Attributes:
        levels: pyramid shrink factors, coarse first.
        iterations: iteration limit per level, or one for all (default 60 at the coarsest
            level, then 40, 25 for the finer ones).
        optimizer: ``adam``, ``lbfgs`` or ``gd``, one for all levels or one per level
            (default: Adam on the coarse levels for robust large moves, L-BFGS-B on the
            finest level for a precise optimum).
        lr: Adam/GD step (mm-equivalent) at the finest level, doubled per coarser level.
        samples: fixed points per level (``None`` = all voxels; ``"auto"`` = one voxel in 10,
            at least 30,000 and at most 100,000: on the 2 mm MNI cases 100k points gave
            0.155 mm where 30k gave 0.192 mm, for 2x the time); levels with fewer voxels use
            all.
        stochastic: redraw the points every iteration (Adam/GD only).
        off_grid: jitter sampled points inside their voxels (removes MI's grid-alignment bias:
            on MNI152 at 2 mm it cut the MI error from 0.15 to 0.04 mm).
        bins: histogram bins for MI/NMI. window_mm: LNCC window in mm.
        tol, patience: convergence test.
    """

    levels: tuple[float, ...] = (4, 2, 1)
    iterations: int | tuple[int, ...] | None = None
    optimizer: str | tuple[str, ...] | None = None
    lr: float = 0.25
    samples: int | str | None = "auto"
    stochastic: bool = False
    bins: int = 64
    off_grid: bool = True
    window_mm: float | None = None
    tol: float = 1e-6
    patience: int = 5

    @classmethod
    def from_options(cls, options: dict) -> LinearOptions:
        known = {k: v for k, v in options.items() if k in cls.__dataclass_fields__}
        opts = cls(**known)
        n = len(opts.levels)
        iters = opts.iterations
        if iters is None:
            iters = (60,) + (40,) * (n - 2) + (25,) if n > 1 else (40,)
        if isinstance(iters, int):
            iters = (iters,) * n
        if len(iters) != len(opts.levels):
            raise MedregError(f"give one iteration count per level: levels {opts.levels}, "
                              f"iterations {iters}")
        optim = opts.optimizer
        if optim is None:
            optim = ("adam",) * (n - 1) + ("lbfgs",)
        if isinstance(optim, str):
            optim = (optim,) * len(opts.levels)
        if len(optim) != len(opts.levels):
            raise MedregError(f"give one optimizer per level or one for all, got {optim}")
        return cls(**{**known, "levels": tuple(opts.levels), "iterations": tuple(iters),
                      "optimizer": tuple(optim)})


def sample_count(samples: int | str | None, numel: int) -> int | None:
    """Points to draw on a level of ``numel`` voxels (see :class:`LinearOptions`)."""
    if samples == "auto":
        return int(np.clip(numel // 10, 30_000, 100_000))
    if samples is not None and (not isinstance(samples, int) or samples < 1):
        raise MedregError(f"samples must be a positive integer, 'auto' or None, got {samples!r}")
    return samples


def parameter_radius(image: Image) -> float:
    """mm scale of rotation-like parameters: the mean half extent of the image."""
    return float(np.mean(image.grid.extent) / 2.0)


def _initial(ctx: StageContext, init: Transform | None) -> LinearTransform:
    radius = parameter_radius(ctx.fixed)
    if init is None:
        init = resolve(INITIALIZERS, ctx.options.get("init", "geometry"), "initializer")(ctx)
    if not init.is_linear:
        raise MedregError(f"a {ctx.stage} stage cannot follow a non-linear transform")
    center = getattr(init, "center", None)
    if center is None:
        center = torch.as_tensor(ctx.fixed.grid.center())
    return linear_from_matrix(ctx.stage, init.matrix().detach(), center=center, radius=radius)


def _metric_options(ctx: StageContext, opts: LinearOptions, level: Image) -> dict:
    if ctx.metric in ("mi", "nmi"):
        return {"bins": opts.bins}
    if ctx.metric == "lncc":
        w_mm = opts.window_mm or 4.0 * max(level.grid.spacing)
        from medreg.core.axes import tensor_order

        vox = tensor_order([max(1, int(round(w_mm / s))) // 2 * 2 + 1 for s in level.grid.spacing])
        return {"window": tuple(int(v) for v in vox)}
    return {}


def run_linear_stage(ctx: StageContext, init: Transform | None) -> StageOutput:
    """One linear stage (``ctx.stage`` in translation/rigid/similarity/affine), coarse to fine."""
    opts = LinearOptions.from_options(ctx.options)
    transform = _initial(ctx, init)
    fixed_levels = gaussian_pyramid(ctx.fixed, opts.levels)
    moving_levels = gaussian_pyramid(ctx.moving, opts.levels)
    history: list[float] = []
    level_info = []
    reason = ""
    for i, (f_l, m_l, n_iter) in enumerate(zip(fixed_levels, moving_levels, opts.iterations,
                                                strict=True)):
        t0 = time.perf_counter()
        samples = sample_count(opts.samples, f_l.grid.numel)
        work = f_l.grid.numel if samples is None or ctx.metric == "lncc" else samples
        with threads_for(work * f_l.channels):
            res = _solve_level(ctx, opts, transform, i, f_l, m_l, n_iter, samples)
        history.extend(res.history)
        reason = res.stop_reason
        level_info.append(dict(level=i, factor=opts.levels[i], size=list(f_l.grid.size),
                               iterations=res.iterations, stop_reason=res.stop_reason,
                               final_loss=res.best_loss, seconds=time.perf_counter() - t0))
    return StageOutput(transform=transform, history=history, stop_reason=reason,
                       info={"levels": level_info})


def _solve_level(ctx: StageContext, opts: LinearOptions, transform: LinearTransform, i: int,
                 f_l: Image, m_l: Image, n_iter: int, samples: int | None):
    """Optimize ``transform`` in place on pyramid level ``i``; returns the optimizer result."""
    metric = get_metric(ctx.metric, **_metric_options(ctx, opts, f_l))
    objective = LevelObjective(f_l, m_l, metric, fixed_mask=ctx.fixed_mask,
                               moving_mask=ctx.moving_mask, samples=samples,
                               resample_every_call=opts.stochastic, seed=ctx.seed + i,
                               dtype=torch.float64 if opts.optimizer[i] == "lbfgs"
                               else torch.float32, off_grid=opts.off_grid)
    scale = 2.0 ** (len(opts.levels) - 1 - i)
    cfg = OptimizerConfig(name=opts.optimizer[i], lr=opts.lr * scale, max_iter=n_iter,
                          tol=opts.tol, patience=opts.patience)

    def callback(it: int, loss: float) -> None:
        for cb in ctx.callbacks:
            cb(ctx.stage, i, it, loss)

    return run_optimizer([transform.params], lambda: objective(transform), cfg,
                         callback=callback, progress=ctx.progress,
                         desc=f"{ctx.stage} level {i + 1}/{len(opts.levels)}")


def evaluate_transforms(ctx: StageContext, candidates: Sequence[Transform],
                        factor: float = 4.0, samples: int | None = 20000) -> list[float]:
    """Metric value of each candidate transform on a coarse level (lower is better)."""
    f_l = gaussian_pyramid(ctx.fixed, (factor,))[0]
    m_l = gaussian_pyramid(ctx.moving, (factor,))[0]
    metric = get_metric(ctx.metric, **_metric_options(ctx, LinearOptions(), f_l))
    objective = LevelObjective(f_l, m_l, metric, fixed_mask=ctx.fixed_mask,
                               moving_mask=ctx.moving_mask, samples=samples, seed=ctx.seed)
    out = []
    with torch.no_grad():
        for t in candidates:
            out.append(float(objective(t)))
    return out
