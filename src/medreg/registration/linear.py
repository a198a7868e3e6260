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
from medreg.registration.intensity import flatten_bias, same_modality
from medreg.registration.objective import LevelObjective
from medreg.registration.plugins import INITIALIZERS, StageContext, StageOutput, resolve
from medreg.transforms.base import Transform
from medreg.transforms.linear import LinearTransform, linear_from_matrix


@dataclass(frozen=True)
class LinearOptions:
    """Schedule of a linear stage.

    Two schedules, chosen by ``stochastic``:

    * stochastic (default for point metrics: MI, NMI, NCC, MSE, L1): Adam on every level with
      new random points at every iteration (as elastix's random sampler) and the mean of the
      last iterates as the level's result. The coarse levels only need to come close, so
      they take a few thousand points for 30 iterations; the finest level takes 16,000 for
      40 iterations (MNI152 at 2 mm: as accurate as 8000 for 60 or 16,000 for 120, and each
      iteration's fixed cost is about that of 4000 points).
    * deterministic (default for LNCC, which needs the voxel grid): Adam on the coarse levels,
      SciPy L-BFGS-B in float64 on the finest one, on one fixed set of points per level.

    Attributes:
        levels: pyramid shrink factors, coarse first.
        iterations: iteration limit per level, or one for all (default: stochastic 30 per
            coarse level and 40 on the finest; deterministic 60 at the coarsest level, then 40, 25).
        optimizer: ``adam``, ``lbfgs`` or ``gd``, one for all levels or one per level
            (default: Adam on stochastic levels, L-BFGS-B in float64 on levels with all
            voxels; see :meth:`level_plan`).
        lr: Adam/GD step (mm-equivalent) at the finest level, doubled per coarser level.
        samples: points per iteration (stochastic) or per level (deterministic), one for all
            levels or one per level; ``None`` = all voxels; ``"auto"`` = stochastic 16,000 on
            the finest level and ``8000 / r`` (at least 2000) on a level ``r`` times coarser,
            deterministic one voxel in 10 within [30,000, 100,000]. Levels with fewer voxels
            (or, with ``"auto"``, at most :data:`SMALL_LEVEL`) use all of them.
        stochastic: ``True``, ``False`` or ``"auto"`` (see above).
        average: fraction of each stochastic level's iterations whose iterates are averaged.
        off_grid: jitter sampled points inside their voxels (removes MI's grid-alignment bias:
            on MNI152 at 2 mm it cut the MI error from 0.15 to 0.04 mm).
        bins: histogram bins for MI/NMI (``"auto"``: 32 for the stochastic schedule, whose
            few thousand points per iteration fill 64 x 64 joint bins too sparsely (multi-modal
            MNI at 2 mm: 0.16-0.17 mm error with 32 bins, 0.19-0.21 with 64), else 64).
        flatten_bias: divide both finest-level images by their own wide low-pass
            (:func:`~medreg.registration.intensity.flatten_bias`), which removes a smooth
            multiplicative intensity bias (MNI with a 15 % bias field and noise, mean error over
            seeds 0-3, MI: 0.172 -> 0.031 mm at 2 mm, 0.061 -> 0.023 mm at 1 mm; NCC with
            ``True``: 0.179 -> 0.042 mm at 2 mm; without a bias field MI gains, 0.048 -> 0.037
            mm, and NCC loses, 0.020 -> 0.035 mm). ``"auto"``: for :data:`FLATTEN_METRICS`
            when both images are non-negative and, after the coarse levels, correlate
            linearly (mono-modal; a cross-modality pair would be harmed); ``True``: always,
            any metric; ``False``: never.
        regions: MI/NMI on the finest level conditioned on this many spatial slabs per axis
            (conditional MI, Loeckx et al. 2010: one joint histogram per region, so a spatially
            varying intensity relation, such as a bias field under a contrast change, does not
            blur it). ``"auto"``: :data:`AUTO_REGIONS` when MI/NMI runs on images that were not
            bias-flattened, else 1 (multi-modal MNI with a bias field at 2 mm, seeds 0-3:
            0.163 -> 0.112 mm; without a bias field it costs a little: 4 mm remapped MNI
            0.078 -> 0.11 mm, clean mono 2 mm 0.048 -> 0.055 mm).
        window_mm: LNCC window in mm.
        tol, patience: convergence test (deterministic schedule).
    """

    levels: tuple[float, ...] = (4, 2, 1)
    iterations: int | tuple[int, ...] | None = None
    optimizer: str | tuple[str, ...] | None = None
    lr: float = 0.25
    samples: int | str | None | tuple[int | str | None, ...] = "auto"
    stochastic: bool | str = "auto"
    average: float = 0.5
    bins: int | str = "auto"
    off_grid: bool = True
    flatten_bias: bool | str = "auto"
    regions: int | str = "auto"
    window_mm: float | None = None
    tol: float = 1e-6
    patience: int = 5

    @classmethod
    def from_options(cls, options: dict, needs_grid: bool = False) -> LinearOptions:
        """Options from a dict, defaults resolved for a metric that (not) ``needs_grid``."""
        known = {k: v for k, v in options.items() if k in cls.__dataclass_fields__}
        opts = cls(**known)
        stochastic = opts.stochastic
        if stochastic == "auto":
            stochastic = not needs_grid
        if opts.regions != "auto" and (not isinstance(opts.regions, int) or opts.regions < 1):
            raise MedregError(f"regions must be a positive integer or 'auto', got "
                              f"{opts.regions!r}")
        if opts.flatten_bias not in (True, False, "auto"):
            raise MedregError(f"flatten_bias must be true, false or 'auto', got "
                              f"{opts.flatten_bias!r}")
        if not isinstance(stochastic, bool):
            raise MedregError(f"stochastic must be true, false or 'auto', got {stochastic!r}")
        n = len(opts.levels)
        iters = opts.iterations
        if iters is None:
            if stochastic:
                iters = (30,) * (n - 1) + (40,)
            else:
                iters = (60,) + (40,) * (n - 2) + (25,) if n > 1 else (40,)
        if isinstance(iters, int):
            iters = (iters,) * n
        if len(iters) != len(opts.levels):
            raise MedregError(f"give one iteration count per level: levels {opts.levels}, "
                              f"iterations {iters}")
        optim = opts.optimizer
        if isinstance(optim, str):
            optim = (optim,) * len(opts.levels)
        if optim is not None and len(optim) != len(opts.levels):
            raise MedregError(f"give one optimizer per level or one for all, got {optim}")
        samples = opts.samples
        if isinstance(samples, (tuple, list)):
            if len(samples) != n:
                raise MedregError(f"give one sample count per level or one for all, got "
                                  f"{samples}")
            samples = tuple(samples)
        return cls(**{**known, "levels": tuple(opts.levels), "iterations": tuple(iters),
                      "optimizer": None if optim is None else tuple(optim),
                      "stochastic": stochastic, "samples": samples})

    def level_plan(self, i: int, numel: int, needs_grid: bool) -> tuple[str, int | None, bool]:
        """``(optimizer, samples, stochastic)`` of level ``i`` with ``numel`` voxels.

        A level is stochastic when the schedule is, its optimizer is not L-BFGS-B (which needs
        one fixed function) and it has more voxels than points per iteration. By default the
        other levels use L-BFGS-B (a small level of a stochastic schedule: all its voxels) or,
        on the coarse levels of a deterministic schedule, Adam.
        """
        chosen = self.samples[i] if isinstance(self.samples, (tuple, list)) else self.samples
        ratio = float(self.levels[i]) / float(min(self.levels))
        samples = sample_count(chosen, numel, bool(self.stochastic), ratio)
        use_grid = samples is None or needs_grid or samples >= numel
        samples = None if use_grid else samples
        name = self.optimizer[i] if self.optimizer is not None else None
        stochastic = bool(self.stochastic) and not use_grid and name != "lbfgs"
        if not stochastic and self.stochastic and chosen == "auto" and not use_grid:
            samples = sample_count("auto", numel, False)  # an L-BFGS-B level: deterministic size
        if name is None:  # deterministic schedule: Adam, then L-BFGS-B on the finest level
            last = i == len(self.levels) - 1
            name = "lbfgs" if not stochastic and (last or self.stochastic) else "adam"
        return name, samples, stochastic


#: Stochastic levels draw the points of at most this many iterations at once and cycle through
#: them (drawing costs about as much as the iterations that use the points; cycling 20 batches
#: left the MNI 2 mm errors unchanged within seed spread).
POOL_BATCHES = 10


#: Metrics that ``flatten_bias="auto"`` applies to. Not NCC/MSE/L1: on bias-free pairs (the
#: synthetic tests, clean MNI: NCC 0.020 -> 0.035 mm) flattening loses more than it gains, and
#: a user who picks them for a biased mono-modal pair can ask (``flatten_bias=True``). Not LNCC,
#: which is blind to a smooth bias already.
FLATTEN_METRICS = ("mi", "nmi")

#: Regions per axis of conditional MI on the finest level (``regions="auto"``): 2 x 2 x 2 in 3D.
#: Three per axis spread 16,000 points too thinly (multi-modal MNI 2 mm: 0.136 vs 0.112 mm).
AUTO_REGIONS = 2

#: Levels with at most this many voxels use all of them (with the default ``samples="auto"``).
SMALL_LEVEL = 8000


def sample_count(samples: int | str | None, numel: int, stochastic: bool = False,
                 ratio: float = 1.0) -> int | None:
    """Points to draw on a level of ``numel`` voxels, ``ratio`` times coarser than the finest
    level (see :class:`LinearOptions`)."""
    if samples == "auto" and stochastic:
        if numel <= SMALL_LEVEL:
            return None  # all voxels, L-BFGS-B: converges fully where the motion is largest
        return 16_000 if ratio <= 1 else max(2000, int(8000 / ratio))
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
        return {"bins": (32 if opts.stochastic else 64) if opts.bins == "auto" else opts.bins}
    if ctx.metric == "lncc":
        w_mm = opts.window_mm or 4.0 * max(level.grid.spacing)
        from medreg.core.axes import tensor_order

        vox = tensor_order([max(1, int(round(w_mm / s))) // 2 * 2 + 1 for s in level.grid.spacing])
        return {"window": tuple(int(v) for v in vox)}
    return {}


def run_linear_stage(ctx: StageContext, init: Transform | None) -> StageOutput:
    """One linear stage (``ctx.stage`` in translation/rigid/similarity/affine), coarse to fine."""
    opts = LinearOptions.from_options(ctx.options, needs_grid=get_metric(ctx.metric).needs_grid)
    transform = _initial(ctx, init)
    fixed_levels = gaussian_pyramid(ctx.fixed, opts.levels)
    moving_levels = gaussian_pyramid(ctx.moving, opts.levels)
    history: list[float] = []
    level_info = []
    reason = ""

    needs_grid = get_metric(ctx.metric).needs_grid
    for i, (f_l, m_l, n_iter) in enumerate(zip(fixed_levels, moving_levels, opts.iterations,
                                                strict=True)):
        t0 = time.perf_counter()
        prep: dict = {}
        if i == len(opts.levels) - 1:
            f_l, m_l, prep = _finest_images(ctx, opts, transform, f_l, m_l)
        plan = opts.level_plan(i, f_l.grid.numel, needs_grid)
        samples = plan[1]
        work = f_l.grid.numel if samples is None or needs_grid else samples
        regions = _regions(ctx, opts, prep) if prep else 1
        objective = _level_objective(ctx, opts, i, f_l, m_l, n_iter, plan, regions)
        with threads_for(work * f_l.channels):  # drawing the point pool above uses them all
            res = _solve_level(ctx, opts, transform, i, objective, n_iter, plan)
        history.extend(res.history)
        reason = res.stop_reason
        level_info.append(dict(level=i, factor=opts.levels[i], size=list(f_l.grid.size),
                               optimizer=plan[0], samples=samples, stochastic=plan[2],
                               iterations=res.iterations, stop_reason=res.stop_reason,
                               final_loss=res.best_loss, seconds=time.perf_counter() - t0,
                               regions=regions, **prep))
    return StageOutput(transform=transform, history=history, stop_reason=reason,
                       info={"levels": level_info})


def _finest_images(ctx: StageContext, opts: LinearOptions, transform: LinearTransform,
                   f_l: Image, m_l: Image) -> tuple[Image, Image, dict]:
    """The finest level's images, bias-flattened when ``opts.flatten_bias`` asks for it, and
    what was decided: ``{"mono": bool, "correlation": r, "bias_flattened": bool}`` (the
    modality check runs only for MI/NMI on single-channel images with ``"auto"``).
    """
    flatten = opts.flatten_bias
    info: dict = {}
    if flatten == "auto" and ctx.metric in FLATTEN_METRICS and f_l.channels == m_l.channels == 1:
        mono, r = same_modality(f_l, m_l, transform, ctx.fixed_mask)
        info.update(mono=mono, correlation=None if np.isnan(r) else round(r, 4))
        nonneg = float(f_l.tensor.min()) >= 0 and float(m_l.tensor.min()) >= 0
        flatten = mono and nonneg
    flatten = flatten is True
    info["bias_flattened"] = flatten
    if flatten:
        f_l, m_l = flatten_bias(f_l), flatten_bias(m_l)
    return f_l, m_l, info


def _regions(ctx: StageContext, opts: LinearOptions, prep: dict) -> int:
    """Conditional-MI regions per axis on the finest level (see ``LinearOptions.regions``)."""
    if ctx.metric not in ("mi", "nmi"):
        return 1
    if opts.regions == "auto":
        return 1 if prep.get("bias_flattened") else AUTO_REGIONS
    return int(opts.regions)


def _level_objective(ctx: StageContext, opts: LinearOptions, i: int, f_l: Image, m_l: Image,
                     n_iter: int, plan: tuple[str, int | None, bool],
                     regions: int = 1) -> LevelObjective:
    """The metric of level ``i`` as a function of the transform, its point pool drawn."""
    optimizer, samples, stochastic = plan
    metric = get_metric(ctx.metric, **_metric_options(ctx, opts, f_l))
    return LevelObjective(f_l, m_l, metric, fixed_mask=ctx.fixed_mask,
                          moving_mask=ctx.moving_mask, samples=samples,
                          resample_every_call=stochastic,
                          batches=min(n_iter, POOL_BATCHES),
                          seed=ctx.seed + i,
                          dtype=torch.float64 if optimizer == "lbfgs" else torch.float32,
                          off_grid=opts.off_grid, regions=regions)


def _solve_level(ctx: StageContext, opts: LinearOptions, transform: LinearTransform, i: int,
                 objective: LevelObjective, n_iter: int, plan: tuple[str, int | None, bool]):
    """Optimize ``transform`` in place on pyramid level ``i``; returns the optimizer result."""
    optimizer = plan[0]
    scale = 2.0 ** (len(opts.levels) - 1 - i)
    cfg = OptimizerConfig(name=optimizer, lr=opts.lr * scale, max_iter=n_iter,
                          tol=opts.tol, patience=opts.patience,
                          average=opts.average if objective.stochastic else 0.0)

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
    metric = get_metric(ctx.metric, **_metric_options(ctx, LinearOptions(stochastic=False), f_l))
    objective = LevelObjective(f_l, m_l, metric, fixed_mask=ctx.fixed_mask,
                               moving_mask=ctx.moving_mask, samples=samples, seed=ctx.seed)
    out = []
    with torch.no_grad():
        for t in candidates:
            out.append(float(objective(t)))
    return out
