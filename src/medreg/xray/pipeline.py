"""Phase 3: automatic registration of one X-ray to a prepared patient (detect, PnP, refine).

Convention: the X-ray's detector is ``geometry``; the network runs on the detector it was trained
for (``model meta["geometry"]``) after area-averaging, and its detections are mapped back with the
pixel-centre rule ``u = (u' + 0.5) * f - 0.5``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from medreg.core.image import Image
from medreg.errors import MedregError
from medreg.xray.geometry import CArmGeometry
from medreg.xray.landmarks import load_landmarks
from medreg.xray.network import MIN_CONFIDENCE, LandmarkNet, detect, load_model
from medreg.xray.pnp import solve_pnp
from medreg.xray.refine import Level, Pyramid, refine_pose, shrink, xray_tensor


@dataclass
class Patient:
    """A prepared patient folder (see :func:`medreg.xray.prepare.prepare_patient`)."""

    folder: Path
    names: tuple[str, ...]
    landmarks: np.ndarray
    model: LandmarkNet
    meta: dict
    info: dict

    @property
    def net_geometry(self) -> CArmGeometry:
        return CArmGeometry.from_dict(self.meta["geometry"])


def load_patient(folder: str | Path) -> Patient:
    """Read ``patient.json``, ``landmarks.csv`` and ``model.pt`` from a prepared folder."""
    f = Path(folder)
    if not (f / "patient.json").exists():
        raise MedregError(f"{f} is not a prepared patient folder (no patient.json)")
    info = json.loads((f / "patient.json").read_text())
    names, pts = load_landmarks(f / info["landmarks"])
    model, meta = load_model(f / info["model"])
    return Patient(f, names, pts, model, meta, info)


@dataclass
class AutoResult:
    """Outcome of :func:`register_auto` (``pose`` is ``None`` when initialization failed)."""

    pose: np.ndarray | None
    init_pose: np.ndarray | None
    detected: int
    inliers: int
    timings: dict = field(default_factory=dict)
    refine: dict | None = None
    message: str = ""
    uv: np.ndarray | None = None


def detect_landmarks(patient: Patient, xray: torch.Tensor, geometry: CArmGeometry
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Detections on an ``(1, 1, H, W)`` X-ray -> (``(L, 2)`` uv on ``geometry``, ``(L,)`` conf)."""
    ng = patient.net_geometry
    factor = geometry.width / ng.width
    if abs(geometry.height / ng.height - factor) > 0.02 or abs(
            geometry.pixel_size * geometry.width - ng.pixel_size * ng.width) > 1e-3 * ng.width:
        raise MedregError(f"X-ray detector {geometry.width}x{geometry.height} @ "
                          f"{geometry.pixel_size} mm does not match the network's "
                          f"{ng.width}x{ng.height} @ {ng.pixel_size} mm detector")
    small = shrink(xray, geometry, factor)
    det = detect(patient.model, small)
    uv = (det.uv[0] + 0.5) * factor - 0.5
    return uv, det.confidence[0]


def register_auto(xray: Image | np.ndarray | torch.Tensor, patient: Patient,
                  ct: Image | Pyramid, geometry: CArmGeometry, *, metric: str = "ncc",
                  optimizer: str = "bobyqa", levels: tuple[Level, ...] | None = None,
                  min_conf: float = MIN_CONFIDENCE, refine: bool = True) -> AutoResult:
    """Detect landmarks, PnP with RANSAC, then intensity refinement.

    ``ct`` is the patient's CT in HU or a :class:`~medreg.xray.refine.Pyramid` built from it
    (build that once to register many X-rays). Failures (too few confident landmarks, RANSAC
    without consensus) are reported in ``AutoResult.message`` with ``pose=None``; nothing is
    guessed.
    """
    x = xray_tensor(xray, geometry)
    t0 = time.perf_counter()
    uv, conf = detect_landmarks(patient, x, geometry)
    t1 = time.perf_counter()
    index = {n: i for i, n in enumerate(patient.meta["names"])}
    rows = [index[n] for n in patient.names]
    ok = conf[rows] >= min_conf
    res = AutoResult(None, None, int(ok.sum()), 0, {"detect_s": t1 - t0}, uv=uv[rows])
    try:
        pnp = solve_pnp(patient.landmarks[ok], uv[rows][ok], geometry)
    except MedregError as exc:
        res.message = str(exc)
        return res
    res.timings["pnp_s"] = time.perf_counter() - t1
    res.timings["init_s"] = time.perf_counter() - t0
    if not pnp.success:
        res.message = pnp.message
        return res
    res.init_pose, res.inliers = pnp.pose, len(pnp.inliers)
    res.pose = pnp.pose
    if refine:
        default = ct.center if isinstance(ct, Pyramid) else ct.grid.center()
        center = np.asarray(patient.info.get("isocenter", default))
        r = refine_pose(x, ct, geometry, pnp.pose, metric=metric, optimizer=optimizer,
                        levels=levels, center=center)
        res.pose = r.pose
        res.refine = {"similarity": r.similarity, "initial_similarity": r.initial_similarity,
                      "evaluations": r.evaluations, "history": r.history}
        res.timings["refine_s"] = r.seconds
        res.timings["refine_cpu_s"] = r.cpu_seconds
    return res
