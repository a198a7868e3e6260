"""Patient preparation (paper phases 2a-2c): rays, triangulation, bone snapping, fine-tuning.

* 2a: DRRs of the patient's CT at ``K`` poses (default 10 rotations about z in +-40 deg x 3 about x
  in +-15 deg x 3 translations along z in +-15 mm = 90), landmarks detected by the phase-1
  network, each confident detection back-projected as a ray through the source.
* 2b: per landmark, the midpoint of the common perpendicular of every pair of rays (the closest
  point equidistant from both); pairs whose rays pass further apart than ``tau`` (6 mm) are
  dropped; the component-wise median of the midpoints; then the nearest bone-surface voxel (CT
  in HU ``[200, 500]``), searched in growing spheres up to ``max_snap_mm``.
* 2c: the network fine-tuned on DRRs of this CT labelled with the refined landmarks
  (phase-1 weights as the start, 10 % of the poses for validation).

Convention: world LPS mm; rays are ``origin + s * direction`` with unit directions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.ndimage as ndi
import torch
from scipy.spatial import cKDTree

from medreg.core.image import Image
from medreg.errors import MedregError
from medreg.xray.dataset import render_set, training_poses
from medreg.xray.geometry import CArmGeometry, backproject, canonical_pose, pose_grid
from medreg.xray.landmarks import save_landmarks
from medreg.xray.network import (
    MIN_CONFIDENCE,
    LandmarkNet,
    TrainConfig,
    detect,
    save_model,
    train,
)

BONE_HU = (200.0, 500.0)


@dataclass
class RayStats:
    """Per landmark: rays, kept pairs, median point, snapped point and the snap distance."""

    n_rays: np.ndarray
    n_pairs: np.ndarray
    median: np.ndarray
    snapped: np.ndarray
    snap_mm: np.ndarray


def pair_midpoints(origins: np.ndarray, dirs: np.ndarray, tau: float
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Closest equidistant points of all ray pairs; pairs further apart than ``tau`` dropped.

    Args:
        origins: ``(n, 3)`` ray origins; ``dirs``: ``(n, 3)`` unit directions.

    Returns:
        ``(m, 3)`` midpoints of the kept pairs and ``(m,)`` their ray distances (mm).
    """
    i, j = np.triu_indices(len(origins), k=1)
    p, q, d1, d2 = origins[i], origins[j], dirs[i], dirs[j]
    w = p - q
    b = (d1 * d2).sum(-1)
    d, e = (d1 * w).sum(-1), (d2 * w).sum(-1)
    den = 1.0 - b * b  # a = c = 1 for unit directions
    ok = den > 1e-8  # parallel rays carry no depth
    s = np.where(ok, (b * e - d) / np.where(ok, den, 1), 0.0)
    t = np.where(ok, (e - b * d) / np.where(ok, den, 1), 0.0)
    c1, c2 = p + s[:, None] * d1, q + t[:, None] * d2
    dist = np.linalg.norm(c1 - c2, axis=-1)
    keep = ok & (dist <= tau)
    return ((c1 + c2) / 2)[keep], dist[keep]


def bone_surface(ct: Image, hu_range: tuple[float, float] = BONE_HU) -> np.ndarray:
    """World positions ``(n, 3)`` of surface voxels of ``hu_range`` (mask minus its erosion)."""
    arr = ct.tensor[0].numpy()
    mask = (arr >= hu_range[0]) & (arr <= hu_range[1])
    if mask.sum() < 10:
        raise MedregError(f"the CT has no bone in the HU range {list(hu_range)}; "
                          "is it a CT in Hounsfield units?")
    surf = mask & ~ndi.binary_erosion(mask)
    kji = np.argwhere(surf)
    return ct.grid.index_to_world(kji[:, ::-1].astype(np.float64))


def snap_to_surface(points: np.ndarray, surface: np.ndarray, max_mm: float = 20.0
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Nearest surface point to each point (growing sphere = nearest neighbour within ``max_mm``).

    Returns:
        snapped ``(n, 3)`` (unchanged where nothing lies within ``max_mm``) and distances ``(n,)``
        (``inf`` where not snapped).
    """
    dist, idx = cKDTree(surface).query(points, distance_upper_bound=max_mm)
    ok = np.isfinite(dist)
    out = np.asarray(points, float).copy()
    out[ok] = surface[idx[ok]]
    return out, dist


def triangulate(uv: np.ndarray, conf: np.ndarray, poses: np.ndarray, geometry: CArmGeometry, *,
                tau: float = 6.0, min_conf: float = MIN_CONFIDENCE
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Phase 2b (before snapping) for all landmarks.

    Args:
        uv: ``(K, L, 2)`` detections; ``conf``: ``(K, L)``; ``poses``: ``(K, 4, 4)``.

    Returns:
        medians ``(L, 3)`` (NaN when no pair survives), rays used ``(L,)``, pairs kept ``(L,)``.
    """
    k, n_lm = conf.shape
    med = np.full((n_lm, 3), np.nan)
    n_rays, n_pairs = np.zeros(n_lm, int), np.zeros(n_lm, int)
    for lm in range(n_lm):
        sel = np.nonzero(conf[:, lm] >= min_conf)[0]
        if len(sel) < 2:
            continue
        o, d = zip(*(backproject(uv[i, lm], poses[i], geometry) for i in sel), strict=True)
        mids, _ = pair_midpoints(np.stack(o), np.stack(d), tau)
        n_rays[lm], n_pairs[lm] = len(sel), len(mids)
        if len(mids):
            med[lm] = np.median(mids, axis=0)
    return med, n_rays, n_pairs


def phase2a_poses(center: np.ndarray, geometry: CArmGeometry, *, n_rz: int = 10, n_rx: int = 3,
                  n_tz: int = 3) -> np.ndarray:
    """The paper's K = 10 x 3 x 3 = 90 poses: z rotations +-40, x rotations +-15, z shifts +-15."""
    return pose_grid(canonical_pose(center, geometry), center,
                     rx=np.linspace(-15, 15, n_rx), ry=[0.0], rz=np.linspace(-40, 40, n_rz),
                     tz=np.linspace(-15, 15, n_tz))


def prepare_patient(ct: Image, model: LandmarkNet, meta: dict, geometry: CArmGeometry,
                    outdir: Path, *, tau: float = 6.0, min_conf: float = MIN_CONFIDENCE,
                    finetune: TrainConfig | None = None, finetune_poses: int = 120,
                    voxel_mm: float = 2.5, ct_path: str | None = None,
                    progress: bool = True) -> RayStats:
    """Run phases 2a-2c and write ``outdir/{landmarks.csv, rays.csv, model.pt, patient.json}``.

    Args:
        ct: the patient's CT (HU).
        model, meta: phase-1 network and its meta (``meta["isocenter"]`` optional).
        geometry: detector the network works on.
        finetune: phase-2c options (``None``: a short default); ``epochs=0`` skips 2c.
    """
    surface = bone_surface(ct)  # fails early on CTs without bone
    center = np.asarray(meta.get("isocenter", ct.grid.center()), float)
    poses = phase2a_poses(center, geometry)
    images, _ = render_set(ct, np.zeros((1, 3)) + center, geometry, poses, voxel_mm=voxel_mm,
                           progress=progress, desc="phase 2a DRRs")
    det = detect(model, images)
    med, n_rays, n_pairs = triangulate(det.uv, det.confidence, poses, geometry, tau=tau,
                                       min_conf=min_conf)
    found = np.isfinite(med[:, 0])
    if found.sum() < 6:
        raise MedregError(f"only {int(found.sum())} landmarks could be triangulated "
                          f"(tau={tau} mm); the network does not fit this CT")
    snapped, dist = med.copy(), np.full(len(med), np.nan)
    snapped[found], dist[found] = snap_to_surface(med[found], surface)
    stats = RayStats(n_rays, n_pairs, med, snapped, dist)
    names = tuple(meta.get("names", [f"L{i}" for i in range(len(med))]))
    keep = np.nonzero(found)[0]
    save_landmarks(outdir / "landmarks.csv", snapped[keep], tuple(names[i] for i in keep))
    _save_rays(outdir / "rays.csv", names, stats)
    cfg = finetune or TrainConfig(epochs=4, lr=5e-4, seed=1)
    history = None
    if cfg.epochs > 0:  # phase 2c: targets are the refined landmarks (NaN where not found)
        tposes = training_poses(snapped[found], geometry, finetune_poses, seed=7)
        timgs, tuv = render_set(ct, np.where(found[:, None], snapped, np.nan), geometry, tposes,
                                voxel_mm=voxel_mm, progress=progress, desc="phase 2c DRRs")
        history = train(model, timgs, torch.nan_to_num(tuv, nan=float("nan")), cfg,
                        progress=progress)
    new_meta = {**meta, "isocenter": center.tolist(), "names": list(names),
                "finetuned": history is not None}
    save_model(outdir / "model.pt", model, new_meta)
    info = {"ct": ct_path, "geometry": geometry.to_dict(), "landmarks": "landmarks.csv",
            "model": "model.pt",
            "rays": "rays.csv", "tau_mm": tau, "bone_hu": list(BONE_HU), "isocenter":
            center.tolist(), "phase2a_drrs": len(poses), "landmarks_found": int(found.sum()),
            "finetune": None if history is None else {
                "epochs": len(history.val_loss), "val_median_px": history.val_median_px,
                "seconds": history.seconds}}
    (outdir / "patient.json").write_text(json.dumps(info, indent=2) + "\n")
    return stats


def _save_rays(path: Path, names, s: RayStats) -> None:
    with path.open("w") as fh:
        fh.write("name,n_rays,n_pairs,median_x,median_y,median_z,x,y,z,snap_mm\n")
        for i, n in enumerate(names):
            vals = [*s.median[i], *s.snapped[i], s.snap_mm[i]]
            fh.write(f"{n},{s.n_rays[i]},{s.n_pairs[i]}," + ",".join(f"{v:.3f}" for v in vals)
                     + "\n")
