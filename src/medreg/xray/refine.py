"""Intensity-based pose refinement: BOBYQA (Py-BOBYQA) or Adam on NCC / LNCC / gradient NCC.

Convention:
    * The optimized pose is ``pose(p) = pose0 @ D(p)``: the CT is moved rigidly in its own world
      frame about ``center`` (LPS mm) before being viewed by ``pose0``.
    * ``p`` is 6 *scaled* numbers ``[radius * rotvec (rad), t (mm)]``: with ``radius`` = 100 mm a
      unit step moves points about 1 mm everywhere, so BOBYQA's trust region is balanced.
    * Coarse-to-fine: each level renders a smaller detector (``geometry.scaled(f)``) from a
      coarser ``mu`` volume; the X-ray is area-averaged to the same detector.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from medreg.core.image import Image
from medreg.errors import MedregError
from medreg.transforms.rotations import rotation_3d
from medreg.xray.drr import DRRRenderer, attenuation_volume, crop_to_body
from medreg.xray.geometry import CArmGeometry, check_pose
from medreg.xray.similarity import get_metric

OPTIMIZERS = ("bobyqa", "adam")


@dataclass(frozen=True)
class Level:
    """One pyramid level: detector shrink factor and ``mu`` voxel size (mm)."""

    detector_factor: float
    voxel_mm: float
    rhobeg: float  # BOBYQA initial trust radius (scaled units ~ mm); Adam learning rate x 10
    maxfun: int
    rhoend: float = 0.01  # BOBYQA final trust radius, as a fraction of rhobeg


def default_levels(geometry: CArmGeometry) -> tuple[Level, ...]:
    """Two levels: a ~60 px wide detector on a 5 mm volume, then ~120 px on a 2.5 mm volume.

    For the paper's 240x188 detector this is 1/4 then 1/2 (the 120x94 fast mode).
    """
    f1 = max(1.0, geometry.width / 60.0)
    f2 = max(1.0, geometry.width / 120.0)
    return (Level(f1, 5.0, 6.0, 250, 0.05), Level(f2, 2.5, 1.5, 120, 0.02))


@dataclass
class RefineResult:
    """Outcome of :func:`refine_pose`.

    Attributes:
        pose: refined ``(4, 4)`` ``ct_to_camera``.
        similarity: metric value at the final pose (last level).
        initial_similarity: metric value at the starting pose (last level).
        evaluations: DRR renders, all levels.
        seconds: wall time.
        cpu_seconds: CPU time of this process (all threads); on a shared machine it shows the
            compute cost without the waiting.
        history: per level: ``{"level", "evaluations", "similarity", "stop"}``.
    """

    pose: np.ndarray
    similarity: float
    initial_similarity: float
    evaluations: int
    seconds: float
    history: list[dict] = field(default_factory=list)
    cpu_seconds: float = float("nan")


def delta_matrix(p: torch.Tensor, center: torch.Tensor, radius: float) -> torch.Tensor:
    """``(6,)`` scaled parameters -> ``(4, 4)`` rigid motion ``X' = R (X - c) + c + t``."""
    r = rotation_3d(p[:3] / radius)
    t = center - r @ center + p[3:]
    top = torch.cat([r, t[:, None]], dim=1)
    bottom = torch.tensor([[0.0, 0.0, 0.0, 1.0]], dtype=p.dtype)
    return torch.cat([top, bottom], dim=0)


def xray_tensor(xray: Image | np.ndarray | torch.Tensor, geometry: CArmGeometry) -> torch.Tensor:
    """Check an X-ray against the detector and return it as ``(1, 1, H, W)`` float32."""
    t = xray.tensor if isinstance(xray, Image) else torch.as_tensor(np.asarray(xray))
    t = t.detach().float()
    while t.ndim > 2 and t.shape[0] == 1:
        t = t[0]
    if t.ndim != 2:
        raise MedregError(f"the X-ray must be a single 2D image, got shape {tuple(t.shape)}")
    if tuple(t.shape) != (geometry.height, geometry.width):
        raise MedregError(f"X-ray is {t.shape[1]}x{t.shape[0]} pixels but the geometry's "
                          f"detector is {geometry.width}x{geometry.height}")
    if not torch.isfinite(t).all():
        raise MedregError("the X-ray contains NaN or infinite pixels")
    return t[None, None]


def shrink(image: torch.Tensor, geometry: CArmGeometry, factor: float) -> torch.Tensor:
    """Area-average ``(1, 1, H, W)`` to the detector of ``geometry.scaled(factor)``."""
    g = geometry.scaled(factor)
    if (g.height, g.width) == tuple(image.shape[-2:]):
        return image
    return F.adaptive_avg_pool2d(image, (g.height, g.width))


class PyramidLevel:
    """A renderer and the X-ray at one resolution."""

    def __init__(self, ct: Image, geometry: CArmGeometry, xray: torch.Tensor, level: Level,
                 step_factor: float = 1.0) -> None:
        self.level = level
        self.geometry = geometry.scaled(level.detector_factor)
        vol = crop_to_body(attenuation_volume(ct, level.voxel_mm))
        self.renderer = DRRRenderer(vol, self.geometry, step_factor=step_factor)
        self.xray = shrink(xray, geometry, level.detector_factor)


def _bobyqa_level(lv: PyramidLevel, metric, pose0: torch.Tensor, center: torch.Tensor,
                  radius: float, bounds: np.ndarray, x0: np.ndarray, bar) -> tuple:
    import pybobyqa

    count = [0]

    def objective(x: np.ndarray) -> float:
        with torch.no_grad():
            pose = pose0 @ delta_matrix(torch.as_tensor(x), center, radius)
            val = metric(lv.xray, lv.renderer(pose[None]))
        count[0] += 1
        bar.update(1)
        return -float(val)

    rhobeg = min(lv.level.rhobeg, 0.49 * float(np.min(2 * bounds)))
    soln = pybobyqa.solve(objective, x0, bounds=(-bounds, bounds), rhobeg=rhobeg,
                          rhoend=lv.level.rhoend * rhobeg, maxfun=lv.level.maxfun,
                          seek_global_minimum=False, objfun_has_noise=False)
    return soln.x, -soln.f, count[0], soln.msg


def _adam_level(lv: PyramidLevel, metric, pose0: torch.Tensor, center: torch.Tensor,
                radius: float, bounds: np.ndarray, x0: np.ndarray, bar) -> tuple:
    p = torch.tensor(x0, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([p], lr=lv.level.rhobeg / 10.0)
    lim = torch.as_tensor(bounds)
    best = (x0.copy(), -np.inf)
    for _ in range(lv.level.maxfun):
        opt.zero_grad()
        val = metric(lv.xray, lv.renderer((pose0 @ delta_matrix(p, center, radius))[None]))[0]
        if float(val.detach()) > best[1]:
            best = (p.detach().numpy().copy(), float(val.detach()))
        (-val).backward()
        opt.step()
        with torch.no_grad():
            p.copy_(torch.maximum(torch.minimum(p, lim), -lim))
        bar.update(1)
    return best[0], best[1], lv.level.maxfun, "fixed iteration count"


def refine_pose(xray: Image | np.ndarray | torch.Tensor, ct: Image, geometry: CArmGeometry,
                pose0: np.ndarray, *, metric: str = "ncc", optimizer: str = "bobyqa",
                levels: Sequence[Level] | None = None, center: np.ndarray | None = None,
                radius: float = 100.0, max_rotation_deg: float = 20.0,
                max_translation_mm: float = 40.0, progress: bool = False) -> RefineResult:
    """Refine a pose by maximizing the similarity of the X-ray and the DRR.

    Args:
        xray: ``(H, W)`` X-ray in attenuation (line-integral) form, on ``geometry``'s detector.
        ct: 3D CT in HU.
        geometry: the C-arm of the X-ray.
        pose0: ``(4, 4)`` initial ``ct_to_camera``.
        metric: ``ncc``, ``lncc`` or ``gradncc``.
        optimizer: ``bobyqa`` (derivative-free, the paper's) or ``adam`` (autograd).
        center: rotation centre in CT world (default the CT's centre).
        max_rotation_deg, max_translation_mm: search box around ``pose0``.

    Returns:
        :class:`RefineResult`.
    """
    t_start, c_start = time.perf_counter(), time.process_time()
    if optimizer not in OPTIMIZERS:
        raise MedregError(f"unknown optimizer {optimizer!r}; choose one of {list(OPTIMIZERS)}")
    sim = get_metric(metric)
    x = xray_tensor(xray, geometry)
    p0 = torch.as_tensor(check_pose(pose0, "initial pose"))
    c = torch.as_tensor(ct.grid.center() if center is None else np.asarray(center, float))
    bounds = np.array([np.deg2rad(max_rotation_deg) * radius] * 3 + [max_translation_mm] * 3)
    run = _bobyqa_level if optimizer == "bobyqa" else _adam_level
    levels = default_levels(geometry) if levels is None else levels
    xk, history, evals = np.zeros(6), [], 0
    pyramid = [PyramidLevel(ct, geometry, x, lv) for lv in levels]
    with torch.no_grad():
        first = float(sim(pyramid[-1].xray, pyramid[-1].renderer(p0[None]))[0])
    bar = tqdm(total=sum(lv.maxfun for lv in levels), desc=f"refine {optimizer}/{metric}",
               disable=not progress, leave=False)
    for i, lv in enumerate(pyramid):
        xk, val, n, msg = run(lv, sim, p0, c, radius, bounds, xk, bar)
        evals += n
        history.append({"level": i, "detector": [lv.geometry.width, lv.geometry.height],
                        "voxel_mm": lv.level.voxel_mm, "evaluations": n, "similarity": val,
                        "stop": str(msg).strip()})
    bar.close()
    pose = (p0 @ delta_matrix(torch.as_tensor(xk), c, radius)).numpy()
    return RefineResult(pose, float(val), first, evals, time.perf_counter() - t_start, history,
                        time.process_time() - c_start)
