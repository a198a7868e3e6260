"""Intensity-based pose refinement: BOBYQA (Py-BOBYQA) or Adam on NCC / LNCC / gradient NCC.

Convention:
    * The optimized pose is ``pose(p) = pose0 @ D(p)``: the CT is moved rigidly in its own world
      frame about ``center`` (LPS mm) before being viewed by ``pose0``.
    * ``p`` is 6 *scaled* numbers ``[radius * rotvec (rad), t (mm)]``: with ``radius`` = 100 mm a
      unit step moves points about 1 mm everywhere, so BOBYQA's trust region is balanced.
    * Coarse-to-fine: each level renders a binned detector (``geometry.binned(k)``: whole
      ``k x k`` blocks of the central crop) from a coarser ``mu`` volume; the X-ray is
      block-averaged to exactly the same pixels (:func:`bin_xray`).
    * Everything that depends only on the CT (``mu`` volumes, renderers) lives in a
      :class:`Pyramid`, built once per CT and geometry; :func:`refine_pose` times only the
      per-X-ray work.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pybobyqa
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from medreg.core.image import Image
from medreg.engine.threads import threads_for
from medreg.errors import MedregError
from medreg.transforms.rotations import rotation_3d
from medreg.xray.drr import DRRRenderer, attenuation_volume, crop_to_body
from medreg.xray.geometry import CArmGeometry, check_pose, project
from medreg.xray.similarity import Metric, get_metric


@dataclass(frozen=True)
class Level:
    """One pyramid level.

    Attributes:
        detector_factor: detector binning (``geometry.binned(round(detector_factor))``).
        voxel_mm: ``mu`` voxel size (mm) of the level's volume.
        rhobeg: BOBYQA initial trust radius (scaled units ~ mm); Adam learning rate x 10.
        maxfun: most DRR renders (BOBYQA) or iterations (Adam) on this level.
        rhoend: BOBYQA final trust radius, as a fraction of ``rhobeg``.
        step_factor: depth step of the level's renderer as a multiple of its volume's smallest
            voxel spacing (about ``voxel_mm``).
    """

    detector_factor: float
    voxel_mm: float
    rhobeg: float
    maxfun: int
    rhoend: float = 0.01
    step_factor: float = 1.0


def default_levels(geometry: CArmGeometry) -> tuple[Level, ...]:
    """Two levels: a ~30 px wide detector on a 10 mm volume, then ~60 px on a 2.5 mm volume.

    For the 120x94 fast detector this is 30x23 then 60x47 pixels (1/4 and 1/2). The coarse
    level (about 3 ms per render) absorbs the initialization's error of a few mm and degrees;
    the fine level starts at a trust radius of 2.5x the coarse level's final radius and samples
    every 1.5 voxels in depth (the fixed jitter keeps that from aliasing). Measured on held-out
    chest variants: mean projection distance about 0.06 mm, 2-4 s of CPU per X-ray on one
    thread (``docs/xray.md``); the detector's full resolution added time, not accuracy.
    """
    coarse = Level(max(1.0, geometry.width / 30.0), 10.0, 6.0, 150, 0.05)
    fine = Level(max(1.0, geometry.width / 60.0), 2.5, 0.75, 150, 0.04, step_factor=1.5)
    return (coarse, fine)


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


def bin_xray(image: torch.Tensor, k: int, binned: CArmGeometry,
             origin: tuple[int, int]) -> torch.Tensor:
    """Block-average ``(1, 1, H, W)`` onto the detector of :meth:`CArmGeometry.binned` ``(k)``.

    Args:
        image: the X-ray on the full detector.
        k: the binning factor.
        binned, origin: what ``geometry.binned(k)`` returned.

    Returns:
        ``(1, 1, h, w)``: each pixel the mean of its ``k x k`` original pixels.
    """
    r0, c0 = origin
    crop = image[..., r0:r0 + binned.height * k, c0:c0 + binned.width * k]
    return F.avg_pool2d(crop, k) if k > 1 else crop


class PyramidLevel:
    """The renderer of one level (pose- and X-ray-independent).

    Attributes:
        level: the settings.
        geometry: the binned detector of this level.
        k: the binning factor (``round(level.detector_factor)``).
        origin: ``(row0, col0)`` of the binned crop on the full detector.
        renderer: the level's :class:`DRRRenderer`.
    """

    def __init__(self, volume: Image, geometry: CArmGeometry, level: Level) -> None:
        self.level = level
        self.k = max(1, round(level.detector_factor))
        self.geometry, self.origin = geometry.binned(self.k)
        self.renderer = DRRRenderer(volume, self.geometry, step_factor=level.step_factor)

    def bin(self, xray: torch.Tensor) -> torch.Tensor:
        """The full-detector X-ray ``(1, 1, H, W)`` on this level's pixels ``(1, 1, h, w)``."""
        return bin_xray(xray, self.k, self.geometry, self.origin)

    @property
    def work(self) -> int:
        """Upper bound of the trilinear samples per render (rays x samples per ray): the work
        size that picks the thread count (:func:`medreg.engine.threads.threads_for`)."""
        return self.geometry.width * self.geometry.height * self.renderer.samples_per_ray()


class Pyramid:
    """Everything of a refinement that depends on the CT but not on the pose or the X-ray.

    Build it once per CT (``mu`` volumes, cropped to the body, one per voxel size, and the
    renderers) and pass it to :func:`refine_pose` in place of the CT to refine many X-rays.

    Args:
        ct: 3D CT in HU.
        geometry: the C-arm of the X-rays (full detector).
        levels: coarse to fine (default :func:`default_levels`).
    """

    def __init__(self, ct: Image, geometry: CArmGeometry,
                 levels: Sequence[Level] | None = None) -> None:
        self.geometry = geometry
        self.center = np.asarray(ct.grid.center(), float)
        self.levels = tuple(default_levels(geometry) if levels is None else levels)
        volumes: dict[float, Image] = {}
        for lv in self.levels:
            if lv.voxel_mm not in volumes:
                volumes[lv.voxel_mm] = crop_to_body(attenuation_volume(ct, lv.voxel_mm))
        self.stages = [PyramidLevel(volumes[lv.voxel_mm], geometry, lv) for lv in self.levels]


@dataclass(frozen=True)
class _Search:
    """Search space: ``pose(p) = pose0 @ delta_matrix(p, center, radius)``, ``|p| <= bounds``."""

    pose0: torch.Tensor
    center: torch.Tensor
    radius: float
    bounds: np.ndarray

    def pose(self, p: torch.Tensor) -> torch.Tensor:
        return self.pose0 @ delta_matrix(p, self.center, self.radius)


def _bobyqa_level(lv: PyramidLevel, xray: torch.Tensor, metric: Metric, search: _Search,
                  x0: np.ndarray, bar) -> tuple[np.ndarray, float, int, str]:
    """Maximize ``metric`` on one level with Py-BOBYQA -> (x, value, renders, stop reason)."""
    count = [0]

    def objective(x: np.ndarray) -> float:
        with torch.no_grad():
            val = metric(xray, lv.renderer(search.pose(torch.as_tensor(x))[None]))
        count[0] += 1
        bar.update(1)
        return -float(val)

    rhobeg = min(lv.level.rhobeg, 0.49 * float(np.min(2 * search.bounds)))
    soln = pybobyqa.solve(objective, x0, bounds=(-search.bounds, search.bounds), rhobeg=rhobeg,
                          rhoend=lv.level.rhoend * rhobeg, maxfun=lv.level.maxfun,
                          seek_global_minimum=False, objfun_has_noise=False, do_logging=False)
    return soln.x, -soln.f, count[0], str(soln.msg).strip()


def _adam_level(lv: PyramidLevel, xray: torch.Tensor, metric: Metric, search: _Search,
                x0: np.ndarray, bar) -> tuple[np.ndarray, float, int, str]:
    """Maximize ``metric`` on one level with Adam through the renderer's autograd."""
    p = torch.tensor(x0, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([p], lr=lv.level.rhobeg / 10.0)
    lim = torch.as_tensor(search.bounds)
    best = (x0.copy(), -np.inf)
    for _ in range(lv.level.maxfun):
        opt.zero_grad()
        val = metric(xray, lv.renderer(search.pose(p)[None]))[0]
        if float(val.detach()) > best[1]:
            best = (p.detach().numpy().copy(), float(val.detach()))
        (-val).backward()
        opt.step()
        with torch.no_grad():
            p.copy_(torch.maximum(torch.minimum(p, lim), -lim))
        bar.update(1)
    return best[0], best[1], lv.level.maxfun, "fixed iteration count"


SOLVERS = {"bobyqa": _bobyqa_level, "adam": _adam_level}


def refine_pose(xray: Image | np.ndarray | torch.Tensor, ct: Image | Pyramid,
                geometry: CArmGeometry, pose0: np.ndarray, *, metric: str = "ncc",
                optimizer: str = "bobyqa", levels: Sequence[Level] | None = None,
                center: np.ndarray | None = None, radius: float = 100.0,
                max_rotation_deg: float = 20.0, max_translation_mm: float = 40.0,
                progress: bool = False) -> RefineResult:
    """Refine a pose by maximizing the similarity of the X-ray and the DRR.

    Args:
        xray: ``(H, W)`` X-ray in attenuation (line-integral) form, on ``geometry``'s detector.
        ct: 3D CT in HU, or a :class:`Pyramid` built from it for ``geometry`` (then ``levels``
            must be ``None``; its build time is not counted in ``seconds``).
        geometry: the C-arm of the X-ray.
        pose0: ``(4, 4)`` initial ``ct_to_camera``.
        metric: ``ncc``, ``lncc`` or ``gradncc``.
        optimizer: ``bobyqa`` (derivative-free, the paper's) or ``adam`` (autograd).
        levels: coarse to fine (default :func:`default_levels`).
        center: rotation centre in CT world (default the CT's centre).
        max_rotation_deg, max_translation_mm: search box around ``pose0``.

    Returns:
        :class:`RefineResult`.
    """
    t_start, c_start = time.perf_counter(), time.process_time()
    if optimizer not in SOLVERS:
        raise MedregError(f"unknown optimizer {optimizer!r}; choose one of {list(SOLVERS)}")
    sim = get_metric(metric)
    x = xray_tensor(xray, geometry)
    pyramid = _pyramid(ct, geometry, levels)
    c = pyramid.center if center is None else np.asarray(center, float)
    bounds = np.array([np.deg2rad(max_rotation_deg) * radius] * 3 + [max_translation_mm] * 3)
    search = _Search(torch.as_tensor(_check_in_front(pyramid, pose0)), torch.as_tensor(c),
                     radius, bounds)
    xrays = [st.bin(x) for st in pyramid.stages]
    last = pyramid.stages[-1]
    with torch.no_grad(), threads_for(last.work):
        first = float(sim(xrays[-1], last.renderer(search.pose0[None]))[0])
    bar = tqdm(total=sum(lv.maxfun for lv in pyramid.levels),
               desc=f"refine {optimizer}/{metric}", disable=not progress, leave=False)
    xk, history = np.zeros(6), []
    for i, (st, xr) in enumerate(zip(pyramid.stages, xrays, strict=True)):
        with threads_for(st.work) as nthreads:
            xk, val, n, msg = SOLVERS[optimizer](st, xr, sim, search, xk, bar)
        history.append({"level": i, "detector": [st.geometry.width, st.geometry.height],
                        "voxel_mm": st.level.voxel_mm, "threads": nthreads, "evaluations": n,
                        "similarity": val, "stop": msg})
    bar.close()
    pose = search.pose(torch.as_tensor(xk)).numpy()
    return RefineResult(pose, float(val), first, sum(h["evaluations"] for h in history),
                        time.perf_counter() - t_start, history, time.process_time() - c_start)


def _check_in_front(pyramid: Pyramid, pose0: np.ndarray) -> np.ndarray:
    """Validate the initial pose: a rigid ``(4, 4)`` matrix with the whole (cropped) CT in front
    of the source. Raises :class:`MedregError` otherwise; returns the pose as float64."""
    pose = check_pose(pose0, "initial pose")
    grid = pyramid.stages[0].renderer.grid
    hi = np.asarray(grid.size, float) - 1.0
    corners = np.array([[x, y, z] for x in (0.0, hi[0]) for y in (0.0, hi[1])
                        for z in (0.0, hi[2])])
    project(grid.index_to_world(corners), pose, pyramid.geometry)  # raises when behind
    return pose


def _pyramid(ct: Image | Pyramid, geometry: CArmGeometry,
             levels: Sequence[Level] | None) -> Pyramid:
    """Use a prepared :class:`Pyramid` (checking it fits) or build one from a CT."""
    if not isinstance(ct, Pyramid):
        return Pyramid(ct, geometry, levels)
    if levels is not None and tuple(levels) != ct.levels:
        raise MedregError("pass the levels when building the Pyramid, not to refine_pose")
    if ct.geometry != geometry:
        raise MedregError("the Pyramid was built for another C-arm geometry than the X-ray's")
    return ct
