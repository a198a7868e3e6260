"""Differentiable rotation parameterizations.

Convention: right-handed rotations acting on column vectors ``(x, y[, z])``; angles in radians.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def rotation_2d(angle: torch.Tensor) -> torch.Tensor:
    """``()`` or ``(1,)`` angle (rad, counter-clockwise from +x to +y) -> ``(2, 2)`` matrix."""
    a = angle.reshape(())
    c, s = torch.cos(a), torch.sin(a)
    return torch.stack([torch.stack([c, -s]), torch.stack([s, c])])


def skew(v: torch.Tensor) -> torch.Tensor:
    """``(3,)`` vector -> ``(3, 3)`` cross-product matrix."""
    z = torch.zeros((), dtype=v.dtype, device=v.device)
    return torch.stack([
        torch.stack([z, -v[2], v[1]]),
        torch.stack([v[2], z, -v[0]]),
        torch.stack([-v[1], v[0], z]),
    ])


def rotation_3d(rotvec: torch.Tensor) -> torch.Tensor:
    """``(3,)`` rotation vector (axis * angle, rad) -> ``(3, 3)`` matrix, smooth at zero."""
    return torch.linalg.matrix_exp(skew(rotvec))


def rotvec_from_matrix(r: np.ndarray) -> np.ndarray:
    """``(3, 3)`` rotation matrix -> ``(3,)`` rotation vector (numpy, float64)."""
    from scipy.spatial.transform import Rotation

    return Rotation.from_matrix(np.asarray(r, dtype=np.float64)).as_rotvec()


def rotation_angle_deg(r: np.ndarray) -> float:
    """Angle in degrees of a 2x2 or 3x3 rotation matrix (0 for identity)."""
    r = np.asarray(r, dtype=np.float64)
    if r.shape == (2, 2):
        return abs(math.degrees(math.atan2(r[1, 0], r[0, 0])))
    c = (np.trace(r) - 1.0) / 2.0
    return math.degrees(math.acos(float(np.clip(c, -1.0, 1.0))))


def nearest_rotation(m: np.ndarray) -> np.ndarray:
    """Closest proper rotation to a square matrix (polar decomposition by SVD)."""
    u, _, vt = np.linalg.svd(np.asarray(m, dtype=np.float64))
    d = np.ones(u.shape[0])
    d[-1] = np.sign(np.linalg.det(u @ vt))
    return u @ np.diag(d) @ vt
