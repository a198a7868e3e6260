"""Stage runners ``bspline``, ``svf`` and ``syn`` for :data:`medreg.registration.plugins.STAGES`.

Contract: ``run(ctx: StageContext, init: Transform | None) -> StageOutput``; the returned
transform is the full fixed->moving mapping ``Compose(deformable, init)`` (the deformable part
acts on fixed points first, then ``init``: ANTs' ordering). ``syn`` and ``svf`` also return the
inverse (moving->fixed).

Options (``ctx.options``; strings such as ``"4,2,1"`` are accepted for tuples):
    levels, iterations, lr, grad_sigma, field_sigma, field_factor, steps, window (LNCC box,
    voxels), tol, spacing (B-spline control points, mm), diffusion, bending, elastic, tv,
    folding, mu, lam (regularizer weights, physical units), deformable_metric (overrides
    ``ctx.metric`` for these stages only, e.g. ``mi`` for ``rigid,affine`` and ``lncc`` for
    ``syn``).
    ``syn`` is greedy (:mod:`medreg.deformable.greedy`): ``step`` (longest update, level voxels)
    replaces ``lr``; its regularization is the smoothing (``grad_sigma``, ``field_sigma``), so
    it takes no regularizer weights. Its ``window``, ``step``, ``grad_sigma`` and
    ``field_sigma`` take one value for all levels or one per level (coarse to fine).
    ``preset`` (``syn`` only, see :data:`PRESETS`): named settings in place of the defaults,
    e.g. ``"intersubject"``; the other options still override them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

import torch

from medreg.deformable.greedy import GreedySchedule, GreedySyN, syn_mappings
from medreg.deformable.memory import estimate_bytes, estimate_greedy_bytes, peak_bytes
from medreg.deformable.metrics import get_deformable_metric
from medreg.deformable.optimize import LevelResult, SolverOptions, coarse_to_fine, solve_level
from medreg.deformable.problems import BSplineProblem, SVFProblem
from medreg.deformable.pyramid import build_levels
from medreg.deformable.regularizers import FieldRegularizer, RegularizerWeights
from medreg.deformable.transforms import (
    BSplineTransform,
    DisplacementField,
    StationaryVelocityField,
)
from medreg.errors import MedregError
from medreg.registration.plugins import StageContext, StageOutput
from medreg.transforms.base import Compose, Transform

_COMMON = dict(levels=(4.0, 2.0, 1.0), iterations=(100, 60, 30), tol=1e-4, window=5,
               diffusion=0.0, bending=0.0, elastic=0.0, tv=0.0, folding=0.0, mu=1.0, lam=1.0,
               metric=None)
DEFAULTS: dict[str, dict[str, Any]] = {
    "svf": dict(_COMMON, lr=0.25, grad_sigma=1.0, field_sigma=0.5, field_factor=2.0, steps=6),
    "syn": dict(levels=(4.0, 2.0, 1.0), iterations=(40, 20, 4), tol=1e-4, window=5,
                metric=None, step=0.25, grad_sigma=3.0, field_sigma=0.5, field_factor=2.0),
    "bspline": dict(_COMMON, lr=0.05, grad_sigma=0.0, field_sigma=0.0, field_factor=2.0,
                    steps=0, spacing=12.0, bending=0.0, folding=10.0),
}
# Named settings that replace the defaults (explicit options still override them). "intersubject":
# less smoothing and smaller windows towards the finest level, which fits the cortex of another
# subject; the smooth known warp of the benchmark prefers the defaults (docs/notes,
# issue-3-session4.md).
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "syn": {"intersubject": dict(levels=(4.0, 2.0, 1.0), iterations=(60, 20, 12), window=(9, 7, 5),
                                 step=(0.25, 0.25, 0.5), grad_sigma=(3.0, 1.5, 1.25))},
}
_TUPLES = {"levels": float, "iterations": int}
_PER_LEVEL = {"window": int, "step": float, "grad_sigma": float, "field_sigma": float}  # syn


def _as_tuple(value: Any, cast: type, name: str) -> tuple:
    if isinstance(value, str):
        value = value.replace("x", ",").split(",")
    elif not isinstance(value, (list, tuple)):
        value = [value]
    try:
        return tuple(cast(v) for v in value if str(v).strip() != "")
    except (TypeError, ValueError):
        raise MedregError(f"option {name} must be a list of numbers, got {value!r}") from None


def _config(ctx: StageContext, kind: str) -> dict[str, Any]:
    cfg = dict(DEFAULTS[kind])
    preset = ctx.options.get("preset")
    if preset is not None and kind in PRESETS:
        if preset not in PRESETS[kind]:
            raise MedregError(f"unknown {kind} preset {preset!r}; "
                              f"choose from {sorted(PRESETS[kind])}")
        cfg.update(PRESETS[kind][preset])
    for key, value in ctx.options.items():
        if key == "deformable_metric":  # the linear stages use ``ctx.metric``
            key = "metric"
        if key not in cfg:
            continue  # options of other stages travel in the same dict
        if key in _TUPLES:
            cfg[key] = _as_tuple(value, _TUPLES[key], key)
        elif kind == "syn" and key in _PER_LEVEL:
            cfg[key] = _as_tuple(value, _PER_LEVEL[key], key)
        elif key == "spacing":
            cfg[key] = _as_tuple(value, float, key)
        elif key == "metric":
            cfg[key] = value
        else:
            try:
                cfg[key] = type(DEFAULTS[kind][key])(value)
            except (TypeError, ValueError):
                raise MedregError(f"option {key} must be a number, got {value!r}") from None
    n = len(cfg["levels"])
    for key in ("iterations", *(_PER_LEVEL if kind == "syn" else ())):
        value = _as_tuple(cfg[key], _TUPLES.get(key) or _PER_LEVEL[key], key)
        if len(value) == 1 and n > 1:
            value = value * n
        if key != "iterations" and len(value) != n:
            hint = (f" (preset {preset!r} sets {key} for {len(value)} levels: give {key} for "
                    f"your {n} levels too)" if preset is not None and key not in ctx.options
                    else "")
            raise MedregError(f"{n} pyramid levels but {len(value)} values of {key}{hint}")
        cfg[key] = value
    return cfg


@dataclass
class _Setup:
    cfg: dict[str, Any]
    levels: list
    metric: Any
    reg: FieldRegularizer
    solver: SolverOptions
    estimate: int


def _setup(ctx: StageContext, kind: str, n_fields: int) -> _Setup:
    cfg = _config(ctx, kind)
    if ctx.fixed.ndim != ctx.moving.ndim:
        raise MedregError(f"fixed image is {ctx.fixed.ndim}D but moving is {ctx.moving.ndim}D")
    name = cfg["metric"] or ctx.metric
    window = cfg["window"][-1] if isinstance(cfg["window"], tuple) else cfg["window"]
    metric = get_deformable_metric(name, **({"window": window}
                                            if name.lower() in ("lncc", "cc") else {}))
    levels = build_levels(ctx.fixed, ctx.moving, cfg["levels"], field_factor=cfg["field_factor"],
                          mask=ctx.fixed_mask, relative_fields=kind == "syn",
                          moving_mask=ctx.moving_mask if kind == "syn" else None)
    weights = RegularizerWeights(**{k: cfg.get(k, 0.0) for k in (
        "diffusion", "bending", "elastic", "tv", "folding", "mu", "lam")})
    solver = SolverOptions(iterations=cfg["iterations"], lr=_first(cfg.get("lr", cfg.get("step"))),
                           grad_sigma=_first(cfg["grad_sigma"]),
                           field_sigma=_first(cfg["field_sigma"]), tol=cfg["tol"])
    est = estimate_bytes(levels[-1].grid, levels[-1].moving.grid, levels[-1].field_grid,
                         n_fields=n_fields, steps=max(cfg.get("steps", 0), 1))
    return _Setup(cfg, levels, metric, FieldRegularizer(weights), solver, est)


def _first(value: float | tuple) -> float:
    """A scalar option, or the first level's value of a per-level one (``syn`` replaces it)."""
    return value[0] if isinstance(value, tuple) else value


def _syn_schedule(setup: _Setup, cc: bool) -> GreedySchedule:
    """Per-level :class:`SolverOptions` and LNCC windows of the ``syn`` stage."""
    cfg = setup.cfg
    opts = [replace(setup.solver, lr=cfg["step"][i], grad_sigma=cfg["grad_sigma"][i],
                    field_sigma=cfg["field_sigma"][i]) for i in range(len(setup.levels))]
    windows = list(cfg["window"]) if cc else [None] * len(setup.levels)
    return GreedySchedule(setup.levels, opts, windows)


def _run(ctx: StageContext, setup: _Setup, problem, solver=solve_level
         ) -> tuple[list[torch.Tensor], dict]:
    def callback(level: int, it: int, loss: float) -> None:
        for cb in ctx.callbacks:
            cb(ctx.stage, level, it, loss)

    torch.manual_seed(ctx.seed)
    t0 = time.perf_counter()
    params, results = coarse_to_fine(problem, setup.levels, setup.solver, solver=solver,
                                     callback=callback)
    info = dict(memory_estimate_bytes=setup.estimate, peak_memory_bytes=peak_bytes(ctx.device),
                seconds=time.perf_counter() - t0, levels=list(setup.cfg["levels"]),
                level_iterations=[r.iterations for r in results],
                level_stop_reasons=[r.stop_reason for r in results],
                metric=setup.cfg["metric"] or ctx.metric)
    info["_results"] = results
    return [p.detach() for p in params], info


def _output(transform: Transform, inverse: Transform | None, info: dict,
            init: Transform | None) -> StageOutput:
    results: list[LevelResult] = info.pop("_results")
    history = [h for r in results for h in r.history]
    full = transform if init is None else Compose(transform, init)
    inv = None
    if inverse is not None:
        try:
            inv = inverse if init is None else Compose(init.inverse(), inverse)
        except TypeError:
            inv = None
    return StageOutput(full, history, results[-1].stop_reason, info, inv)


def run_svf_stage(ctx: StageContext, init: Transform | None) -> StageOutput:
    """Diffeomorphic stationary-velocity-field registration ``T = init o exp(v)``."""
    setup = _setup(ctx, "svf", 1)
    problem = SVFProblem(setup.metric, setup.reg, init, setup.cfg["steps"])
    params, info = _run(ctx, setup, problem)
    svf = StationaryVelocityField(setup.levels[-1].field_grid, params[0], setup.cfg["steps"])
    return _output(svf, svf.inverse(), info, init)


def run_syn_stage(ctx: StageContext, init: Transform | None) -> StageOutput:
    """Greedy symmetric (midpoint) diffeomorphic registration; forward and inverse dense fields.

    See :mod:`medreg.deformable.greedy`; the result is ``init o B o A^-1`` as one displacement
    field on the fixed grid, the inverse ``A o B^-1`` composed with ``init^-1``.
    """
    setup = _setup(ctx, "syn", 2)
    last = setup.levels[-1]
    setup.estimate = estimate_greedy_bytes(last.grid, last.moving.grid, last.field_grid)
    name = (setup.cfg["metric"] or ctx.metric).lower()
    cc = name in ("lncc", "cc")
    problem = GreedySyN(setup.metric, init, cc_window=setup.cfg["window"][-1] if cc else None)
    (u_f, u_m), info = _run(ctx, setup, problem, _syn_schedule(setup, cc))
    t0 = time.perf_counter()
    grid = ctx.fixed.grid
    forward, backward, residuals = syn_mappings(u_f, u_m, setup.levels[-1].field_grid, grid)
    info.update(residuals)
    info["seconds_inversion"] = time.perf_counter() - t0
    info["field_grid"] = setup.levels[-1].field_grid.to_dict()
    info["peak_memory_bytes"] = peak_bytes(ctx.device)
    return _output(DisplacementField(grid, forward, copy=False),
                   DisplacementField(grid, backward, copy=False), info, init)


def run_bspline_stage(ctx: StageContext, init: Transform | None) -> StageOutput:
    """Cubic B-spline FFD registration ``T = init o (x + B(c)(x))`` (control spacing in mm)."""
    setup = _setup(ctx, "bspline", 1)
    spacing = _as_tuple(setup.cfg["spacing"], float, "spacing")
    bspline = BSplineTransform(ctx.fixed.grid, spacing if len(spacing) > 1 else spacing[0])
    problem = BSplineProblem(setup.metric, setup.reg, init, bspline)
    params, info = _run(ctx, setup, problem)
    info["control_grid"] = bspline.control.to_dict()
    return _output(bspline, None, info, init)
