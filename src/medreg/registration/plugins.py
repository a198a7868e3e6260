"""Name -> implementation tables that the whole package plugs into.

Each table maps the name a user types (``--transform syn``, ``--method features``,
``--init moments``) to ``"module:function"``; modules are imported only when used, so a
family of methods lives in its own package and adds one line here.

Contracts:
    * stage runner ``run(ctx: StageContext, init: Transform | None) -> StageOutput``; the
      returned transform is the full fixed->moving mapping including ``init``.
    * method ``run(ctx: StageContext) -> StageOutput`` (a complete registration by itself).
    * initializer ``init(ctx: StageContext) -> LinearTransform`` (fixed->moving).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from medreg.core.image import Image
from medreg.transforms.base import Transform

STAGES: dict[str, str] = {
    "translation": "medreg.registration.linear:run_linear_stage",
    "rigid": "medreg.registration.linear:run_linear_stage",
    "similarity": "medreg.registration.linear:run_linear_stage",
    "affine": "medreg.registration.linear:run_linear_stage",
    "bspline": "medreg.deformable.stages:run_bspline_stage",
    "svf": "medreg.deformable.stages:run_svf_stage",
    "syn": "medreg.deformable.stages:run_syn_stage",
}

METHODS: dict[str, str] = {
    "intensity": "medreg.registration.api:run_intensity_method",
    "features": "medreg.features.methods:run_features_method",
    "phase": "medreg.features.methods:run_phase_method",
    "landmarks": "medreg.features.methods:run_landmarks_method",
}

INITIALIZERS: dict[str, str] = {
    "none": "medreg.registration.initialize:init_identity",
    "geometry": "medreg.registration.initialize:init_geometric_center",
    "com": "medreg.registration.initialize:init_center_of_mass",
    "moments": "medreg.registration.initialize:init_principal_axes",
    "search": "medreg.registration.initialize:init_rotation_search",
    "features": "medreg.features.methods:init_features",
    "phase": "medreg.features.methods:init_phase",
}


@dataclass
class StageContext:
    """Everything a stage, method or initializer may need.

    Attributes:
        fixed, moving: float images (``(C, *S)``), same dimension.
        fixed_mask, moving_mask: optional ``(1, *S)`` masks on the images' grids.
        stage: the stage name being run (``"rigid"``, ``"syn"``, ...).
        metric: metric name (``"mse"``, ``"ncc"``, ``"lncc"``, ``"mi"``, ``"nmi"``, ...).
        options: stage options (levels, iterations, weights, ...); never mutated.
        seed: random seed; progress: show progress bars; device: torch device.
        callbacks: called as ``cb(stage, level, iteration, loss)``.
    """

    fixed: Image
    moving: Image
    fixed_mask: Image | None = None
    moving_mask: Image | None = None
    stage: str = "affine"
    metric: str = "mi"
    options: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    progress: bool = False
    device: str = "cpu"
    callbacks: tuple[Callable, ...] = ()


@dataclass
class StageOutput:
    """What a stage or method returns.

    Attributes:
        transform: full fixed->moving transform (including the incoming initial transform).
        history: metric value per iteration, in order, all levels concatenated.
        stop_reason: why the optimizer stopped (last level).
        info: extra numbers worth reporting (per-level stops, timings, inliers, ...).
        inverse: moving->fixed transform when the method produces one (SyN).
    """

    transform: Transform
    history: list[float] = field(default_factory=list)
    stop_reason: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    inverse: Transform | None = None


def resolve(table: dict[str, str], name: str, what: str) -> Callable:
    """Import and return the function registered under ``name``; clear error otherwise."""
    try:
        target = table[name]
    except KeyError:
        raise ValueError(f"unknown {what} {name!r}; choose from "
                         f"{', '.join(sorted(table))}") from None
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)
