"""DRR training sets: poses around a CT's landmarks, rendered DRRs and projected landmarks.

Convention: ``uv`` is ``(N, L, 2)`` detector pixels ``(u, v)``, NaN where the landmark projects
outside the detector (more than ``margin`` pixels inside the border is required).
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from medreg.core.image import Image
from medreg.xray.drr import DRRRenderer, attenuation_volume, crop_to_body
from medreg.xray.geometry import CArmGeometry, canonical_pose, project, random_poses

#: Phase-1 pose ranges used here: rotations about world x, y, z (deg) and translations (mm).
TRAIN_ROT = (15.0, 15.0, 45.0)
TRAIN_TRANS = (15.0, 15.0, 15.0)


def isocenter(landmarks: np.ndarray) -> np.ndarray:
    """Centre of the landmarks' bounding box (LPS mm): the C-arm isocentre used throughout."""
    p = np.asarray(landmarks, float)
    return (p.min(0) + p.max(0)) / 2.0


def visible_uv(points: np.ndarray, pose: np.ndarray, geometry: CArmGeometry,
               margin: float = 1.0) -> np.ndarray:
    """``(L, 2)`` projections with NaN for points off the detector."""
    uv = project(points, pose, geometry)
    off = ((uv[:, 0] < margin) | (uv[:, 0] > geometry.width - 1 - margin)
           | (uv[:, 1] < margin) | (uv[:, 1] > geometry.height - 1 - margin))
    uv[off] = np.nan
    return uv


def render_set(ct: Image, landmarks: np.ndarray, geometry: CArmGeometry, poses: np.ndarray, *,
               voxel_mm: float = 2.5, progress: bool = False, desc: str = "render DRRs"
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """DRRs of ``ct`` (HU) at ``poses`` ``(K, 4, 4)`` and the landmarks' projections.

    Returns:
        ``images`` ``(K, 1, H, W)`` float32 and ``uv`` ``(K, L, 2)`` float32.
    """
    renderer = DRRRenderer(crop_to_body(attenuation_volume(ct, voxel_mm)), geometry)
    imgs = []
    for i in tqdm(range(0, len(poses), 8), desc=desc, disable=not progress, leave=False):
        imgs.append(renderer.render_many(poses[i:i + 8], batch=8))
    uv = np.stack([visible_uv(landmarks, p, geometry) for p in poses])
    return torch.cat(imgs), torch.as_tensor(uv, dtype=torch.float32)


def training_poses(landmarks: np.ndarray, geometry: CArmGeometry, n: int, seed: int, *,
                   rot_range=TRAIN_ROT, trans_range=TRAIN_TRANS) -> np.ndarray:
    """``(n, 4, 4)`` random poses (uniform in the ranges) around :func:`isocenter`."""
    iso = isocenter(landmarks)
    return random_poses(canonical_pose(iso, geometry), iso, n, np.random.default_rng(seed),
                        rot_range=rot_range, trans_range=trans_range)
