"""Pose from 2D-3D landmark correspondences: OpenCV's RANSAC Perspective-n-Point.

Convention: OpenCV's camera model is exactly medreg's (``X_c = R X_w + t``, ``x`` right along
columns, ``y`` down along rows, ``z`` forward, pixel centres at integer coordinates), so the
intrinsics of :meth:`CArmGeometry.intrinsics` are passed unchanged and ``[R | t]`` is the
``ct_to_camera`` pose.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from medreg.errors import MedregError
from medreg.xray.geometry import CArmGeometry, project, to_camera

#: Fewest correspondences accepted; EPnP needs 4, RANSAC needs a few spare to vote.
MIN_POINTS = 6


@dataclass
class PnPResult:
    """Outcome of :func:`solve_pnp`.

    Attributes:
        pose: ``(4, 4)`` ``ct_to_camera`` or ``None`` on failure.
        inliers: indices (into the given points) that RANSAC kept.
        reprojection_px: mean reprojection error of the inliers (pixels).
        success: whether a pose was found and passes the checks.
        message: the reason of a failure (empty on success).
    """

    pose: np.ndarray | None
    inliers: np.ndarray = field(default_factory=lambda: np.zeros(0, int))
    reprojection_px: float = float("nan")
    success: bool = False
    message: str = ""


def solve_pnp(points_3d: np.ndarray, points_2d: np.ndarray, geometry: CArmGeometry, *,
              reprojection_px: float | None = None, iterations: int = 500,
              min_inliers: int = 5, seed: int = 0) -> PnPResult:
    """RANSAC PnP (EPnP hypotheses) then Levenberg-Marquardt on the inliers.

    Args:
        points_3d: ``(N, 3)`` landmarks in CT world LPS mm.
        points_2d: ``(N, 2)`` detections ``(u, v)`` in pixels.
        geometry: the C-arm (intrinsics).
        reprojection_px: RANSAC inlier threshold (default 3 % of the detector width).
        min_inliers: fewer inliers is a reported failure.

    Returns:
        :class:`PnPResult`. Fewer than :data:`MIN_POINTS` correspondences raise ``MedregError``.
    """
    p3 = np.asarray(points_3d, dtype=np.float64).reshape(-1, 3)
    p2 = np.asarray(points_2d, dtype=np.float64).reshape(-1, 2)
    if len(p3) != len(p2):
        raise MedregError(f"PnP needs as many 3D as 2D points, got {len(p3)} and {len(p2)}")
    if len(p3) < MIN_POINTS:
        raise MedregError(f"too few landmarks for PnP: {len(p3)} detected, need {MIN_POINTS}")
    thr = reprojection_px if reprojection_px is not None else 0.03 * geometry.width
    k = geometry.intrinsics()
    cv2.setRNGSeed(seed)
    ok, rvec, tvec, inl = cv2.solvePnPRansac(
        p3, p2, k, None, iterationsCount=iterations, reprojectionError=float(thr),
        confidence=0.999, flags=cv2.SOLVEPNP_EPNP)
    if not ok or inl is None or len(inl) < min_inliers:
        n = 0 if inl is None else len(inl)
        return PnPResult(None, message=f"RANSAC PnP found {n} inliers, need {min_inliers}")
    inl = inl.ravel()
    rvec, tvec = cv2.solvePnPRefineLM(p3[inl], p2[inl], k, None, rvec, tvec)
    pose = np.eye(4)
    pose[:3, :3] = cv2.Rodrigues(rvec)[0]
    pose[:3, 3] = tvec.ravel()
    if np.any(to_camera(p3[inl], pose)[:, 2] <= 0):
        return PnPResult(None, inl, message="PnP pose puts landmarks behind the X-ray source")
    err = np.linalg.norm(project(p3[inl], pose, geometry) - p2[inl], axis=-1).mean()
    return PnPResult(pose, inl, float(err), True)
