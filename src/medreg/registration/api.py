"""High-level API: ``register(fixed, moving, transform="rigid,affine", metric="mi", ...)``.

Convention: ``result.transform`` maps fixed world points to moving world points (LPS mm);
``result.warped = moving(T(x))`` on the fixed grid.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import torch

import medreg.registration.linear  # noqa: F401  the default stages load with the API, not in a call
from medreg.core.image import Image
from medreg.errors import MedregError
from medreg.io.images import read_image
from medreg.metrics import METRICS
from medreg.registration.plugins import (
    INITIALIZERS,
    METHODS,
    STAGES,
    StageContext,
    StageOutput,
    resolve,
)
from medreg.resample import resample
from medreg.transforms.base import Transform


@dataclass
class RegistrationResult:
    """Outcome of :func:`register`.

    Attributes:
        transform: fixed->moving transform (all stages composed).
        fixed, moving: the input images.
        stages: per stage: name, history, stop reason, info, seconds.
        timings: seconds for ``total`` and each stage.
        inverse: moving->fixed transform when the method provides one.
    """

    transform: Transform
    fixed: Image
    moving: Image
    stages: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    inverse: Transform | None = None

    @property
    def history(self) -> list[float]:
        """Metric values of every iteration of every stage, in order."""
        return [v for s in self.stages for v in s["history"]]

    @property
    def stop_reason(self) -> str:
        return self.stages[-1]["stop_reason"] if self.stages else ""

    @cached_property
    def warped(self) -> Image:
        """The moving image resampled onto the fixed grid (linear interpolation)."""
        return resample(self.moving.float(), self.fixed.grid, self.transform)

    def report(self) -> dict[str, Any]:
        """JSON-ready summary: parameters, histories, stop reasons, timings, versions."""
        out: dict[str, Any] = {
            "stages": [{k: v for k, v in s.items()} for s in self.stages],
            "stop_reason": self.stop_reason,
            "timings_s": self.timings,
            "fixed_grid": self.fixed.grid.to_dict(),
            "moving_grid": self.moving.grid.to_dict(),
            "versions": versions(),
        }
        if self.transform.is_linear:
            out["matrix_fixed_to_moving"] = self.transform.matrix().detach().cpu().tolist()
        return out


def versions() -> dict[str, str]:
    from importlib.metadata import version

    from medreg import __version__

    return {"medreg": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "nibabel": version("nibabel"), "SimpleITK": version("SimpleITK"),
            "python": platform.python_version()}


def _load(image: Image | str | os.PathLike, name: str) -> Image:
    img = read_image(image) if isinstance(image, (str, os.PathLike)) else image
    if not isinstance(img, Image):
        raise MedregError(f"{name} must be an Image or a file path, got {type(image).__name__}")
    return img


def _prepare(image: Image, name: str) -> Image:
    img = image.float() if not image.tensor.is_floating_point() else image
    img.check_finite(name)
    if img.grid.numel < 8:
        raise MedregError(f"{name} is too small to register ({img.grid.size})")
    return img


def _check_mask(mask: Image | None, image: Image, name: str) -> Image | None:
    if mask is None:
        return None
    if mask.ndim != image.ndim:
        raise MedregError(f"{name} is {mask.ndim}D but its image is {image.ndim}D")
    if not bool((mask.tensor != 0).any()):
        raise MedregError(f"{name} is empty (no non-zero voxel)")
    return mask


def parse_stages(transform: str | Sequence[str]) -> list[str]:
    """``"rigid,affine"`` -> ``["rigid", "affine"]`` with a clear error for unknown names."""
    names = transform.split(",") if isinstance(transform, str) else list(transform)
    names = [n.strip().lower() for n in names if n.strip()]
    if not names:
        raise MedregError("no transform stage given")
    for n in names:
        if n not in STAGES:
            raise MedregError(f"unknown transform {n!r}; choose from {', '.join(STAGES)}")
    return names


def register(fixed: Image | str | os.PathLike, moving: Image | str | os.PathLike, *,
             transform: str | Sequence[str] = "affine", metric: str = "mi",
             method: str = "intensity", fixed_mask: Image | str | None = None,
             moving_mask: Image | str | None = None, init: str = "geometry",
             seed: int = 0, progress: bool = False, device: str = "cpu",
             callbacks: Sequence[Callable] = (), **options: Any) -> RegistrationResult:
    """Register ``moving`` to ``fixed``.

    Args:
        fixed, moving: images (or paths); same dimension, any grids.
        transform: stage list, e.g. ``"rigid,affine"`` or ``"rigid,affine,syn"``.
        metric: ``mse``/``ssd``, ``l1``, ``ncc``, ``lncc``, ``mi``, ``nmi`` (and ``ngf``, ``mind``).
        method: ``intensity`` (default), ``features``, ``phase`` or ``landmarks``.
        fixed_mask, moving_mask: optional masks (non-zero = use).
        init: ``geometry``, ``com``, ``moments``, ``search``, ``none``, ``features``, ``phase``.
        seed: seeds every random choice (point sampling), so results repeat exactly.
        progress: show progress bars. callbacks: ``cb(stage, level, iteration, loss)``.
        **options: stage options such as ``levels=(4, 2, 1)``, ``iterations=(60, 40, 25)``,
            ``optimizer="lbfgs"``, ``samples=60000``, ``bins=32``.

    Returns:
        :class:`RegistrationResult`.
    """
    t0 = time.perf_counter()
    fixed_img = _prepare(_load(fixed, "fixed image"), "fixed image")
    moving_img = _prepare(_load(moving, "moving image"), "moving image")
    if fixed_img.ndim != moving_img.ndim:
        raise MedregError(f"fixed image is {fixed_img.ndim}D but moving image is "
                          f"{moving_img.ndim}D")
    fmask = _check_mask(_load(fixed_mask, "fixed mask") if fixed_mask is not None else None,
                        fixed_img, "fixed mask")
    mmask = _check_mask(_load(moving_mask, "moving mask") if moving_mask is not None else None,
                        moving_img, "moving mask")
    if metric.lower() not in METRICS:
        raise MedregError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    if init not in INITIALIZERS:
        raise MedregError(f"unknown initializer {init!r}; choose from {', '.join(INITIALIZERS)}")
    ctx = StageContext(fixed=fixed_img.to(device), moving=moving_img.to(device),
                       fixed_mask=fmask, moving_mask=mmask, metric=metric.lower(),
                       options={**options, "init": init, "stages": parse_stages(transform)},
                       seed=seed, progress=progress, device=device, callbacks=tuple(callbacks))
    t_method = time.perf_counter()
    out = resolve(METHODS, method, "method")(ctx)
    stages = out.info.get("stages") or [dict(name=method, history=out.history,
                                             stop_reason=out.stop_reason, info=out.info,
                                             seconds=time.perf_counter() - t_method)]
    timings = {s["name"]: s.get("seconds", 0.0) for s in stages}
    timings["total"] = time.perf_counter() - t0
    return RegistrationResult(out.transform, fixed_img, moving_img, stages, timings, out.inverse)


def run_intensity_method(ctx: StageContext) -> StageOutput:
    """Run the stages in ``ctx.options["stages"]`` in order, each starting from the last."""
    current: Transform | None = None
    inverse = None
    records = []
    for name in ctx.options["stages"]:
        t0 = time.perf_counter()
        stage_ctx = StageContext(**{**ctx.__dict__, "stage": name})
        out = resolve(STAGES, name, "transform")(stage_ctx, current)
        current, inverse = out.transform, out.inverse
        records.append(dict(name=name, history=out.history, stop_reason=out.stop_reason,
                            info=out.info, seconds=time.perf_counter() - t0))
    assert current is not None
    return StageOutput(current, [v for r in records for v in r["history"]],
                       records[-1]["stop_reason"], {"stages": records}, inverse)
