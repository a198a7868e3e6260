"""Keypoint registration in 2D with OpenCV: detect, match, robustly fit, report, draw.

Convention:
    * Keypoints are found in pixel indices ``(x, y)`` of each image and converted to world
      coordinates (LPS mm) with ``grid.index_to_world`` before any fitting, so spacing, origin
      and direction are respected and the fitted model is a world-space transform.
    * Every fitted model maps **fixed world -> moving world** (``T(fixed_pt) ~= moving_pt``).
    * RANSAC thresholds are given in fixed-image pixels and converted to mm with the mean
      pixel spacing of the fixed image.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from medreg.core.image import Image
from medreg.errors import MedregError
from medreg.features.landmarks import fit_linear
from medreg.features.preprocess import clahe, scalar_image, to_uint8
from medreg.transforms.base import Transform
from medreg.transforms.homography import Homography

DETECTORS = ("sift", "orb", "akaze")
KEYPOINT_MODELS = ("translation", "rigid", "similarity", "affine", "homography")
ROBUST_METHODS = {"ransac": cv2.RANSAC, "lmeds": cv2.LMEDS, "magsac": cv2.USAC_MAGSAC,
                  "usac": cv2.USAC_DEFAULT, "usac_accurate": cv2.USAC_ACCURATE}
#: Minimal sample size of each model (point pairs).
MINIMAL_SAMPLE = {"translation": 1, "rigid": 2, "similarity": 2, "affine": 3, "homography": 4}


@dataclass
class Features:
    """Keypoints of one image.

    Attributes:
        index: ``(n, 2)`` float64 pixel positions ``(x, y)``.
        world: ``(n, 2)`` float64 world positions (LPS mm).
        descriptors: ``(n, k)`` descriptors (uint8 for ORB/AKAZE, float32 for SIFT).
        binary: descriptors compare with the Hamming norm.
    """

    index: np.ndarray
    world: np.ndarray
    descriptors: np.ndarray
    binary: bool

    def __len__(self) -> int:
        return len(self.index)


def _make_detector(name: str, max_features: int):
    if name == "sift":
        return cv2.SIFT_create(nfeatures=max_features)
    if name == "orb":
        return cv2.ORB_create(nfeatures=max_features)
    if name == "akaze":
        # OpenCV 4 has it in the main module; OpenCV 5 moved it to contrib's xfeatures2d
        factory = getattr(cv2, "AKAZE_create", None) or getattr(
            getattr(cv2, "xfeatures2d", None), "AKAZE_create", None)
        if factory is None:
            raise MedregError(f"AKAZE is not in this OpenCV build ({cv2.__version__}; OpenCV 5 "
                              f"keeps it in opencv-contrib); use sift or orb")
        return factory()
    raise MedregError(f"unknown detector {name!r}; choose from {', '.join(DETECTORS)}")


def detect(image: Image, detector: str = "sift", *, max_features: int = 4000,
           mask: Image | None = None, contrast: str = "clahe") -> Features:
    """Detect keypoints and descriptors on a 2D image.

    Args:
        image: 2D image (channels averaged; a one-slice 3D image counts as 2D).
        detector: ``sift``, ``orb`` or ``akaze``.
        max_features: upper bound on keypoints (SIFT/ORB).
        mask: optional ``(1, H, W)`` mask on the same grid; keypoints only inside.
        contrast: ``clahe`` (adaptive equalization before detection, default) or ``window``
            (the 0.5-99.5 percentile window only).

    Returns:
        :class:`Features` with pixel and world positions.

    Convention:
        OpenCV keypoint ``(x, y)`` = column, row pixel index (pixel centres at integers), which
        is medreg's ``(x, y)`` index order; world = ``grid.index_to_world(index)``.
    """
    scalar = scalar_image(image)
    if contrast not in ("clahe", "window"):
        raise MedregError(f"unknown contrast mode {contrast!r}; choose from clahe, window")
    u8 = to_uint8(scalar, mask=mask)
    if contrast == "clahe":
        u8 = clahe(u8)
    cv_mask = None
    if mask is not None:
        cv_mask = (scalar_image(mask).tensor[0].numpy() != 0).astype(np.uint8) * 255
    kps, desc = _make_detector(detector, max_features).detectAndCompute(u8, cv_mask)
    index = np.array([k.pt for k in kps], dtype=np.float64).reshape(-1, 2)
    if desc is None:
        desc = np.zeros((0, 32), np.uint8)
    world = scalar.grid.index_to_world(index) if len(index) else np.zeros((0, 2))
    return Features(index, world, desc, binary=detector != "sift")


def match(fixed: Features, moving: Features, *, ratio: float = 0.75,
          cross_check: bool = True) -> np.ndarray:
    """Match descriptors: Lowe's ratio test, optionally mutual nearest neighbours.

    Returns:
        ``(k, 2)`` int array of ``(fixed_index, moving_index)`` pairs.
    """
    if not 0 < ratio <= 1:
        raise MedregError(f"ratio test threshold must lie in (0, 1], got {ratio}")
    if len(fixed) < 2 or len(moving) < 2:
        raise MedregError(f"too few keypoints to match: {len(fixed)} fixed and {len(moving)} "
                          f"moving, at least 2 each are needed (try another detector or a "
                          f"larger image)")
    matcher = cv2.BFMatcher(cv2.NORM_HAMMING if fixed.binary else cv2.NORM_L2)
    knn = matcher.knnMatch(fixed.descriptors, moving.descriptors, k=2)
    pairs = [(p[0].queryIdx, p[0].trainIdx) for p in knn
             if len(p) == 2 and p[0].distance < ratio * p[1].distance]
    if cross_check and pairs:
        back = matcher.match(moving.descriptors, fixed.descriptors)
        best_back = {b.queryIdx: b.trainIdx for b in back}
        pairs = [(i, j) for i, j in pairs if best_back.get(j) == i]
    return np.array(pairs, dtype=np.int64).reshape(-1, 2)


# --------------------------------------------------------------------------- robust fitting
def _default_method(model: str) -> str:
    return "magsac" if model in ("affine", "homography") else "ransac"


def fit_model(fixed_pts: np.ndarray, moving_pts: np.ndarray, model: str, *,
              method: str | None = None, threshold: float = 3.0, confidence: float = 0.999,
              max_iters: int = 5000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Robustly fit ``model`` to matched points, then refit it on the inliers.

    Args:
        fixed_pts, moving_pts: ``(k, 2)`` matched world points.
        model: one of :data:`KEYPOINT_MODELS`.
        method: ``ransac``, ``lmeds``, ``magsac``, ``usac`` or ``usac_accurate``
            (USAC variants for affine and homography only); default MAGSAC for affine and
            homography, RANSAC otherwise.
        threshold: inlier reprojection threshold in the points' units (mm).

    Returns:
        ``(3, 3)`` float64 fixed-world -> moving-world matrix and a ``(k,)`` bool inlier mask.

    Convention:
        ``moving_pts[i] ~= M fixed_pts[i]`` (homogeneous; divided by ``w`` for homographies).
    """
    if model not in KEYPOINT_MODELS:
        raise MedregError(f"unknown keypoint model {model!r}; choose from "
                          f"{', '.join(KEYPOINT_MODELS)}")
    method = method or _default_method(model)
    if method not in ROBUST_METHODS:
        raise MedregError(f"unknown robust method {method!r}; choose from "
                          f"{', '.join(ROBUST_METHODS)}")
    if method.startswith(("magsac", "usac")) and model not in ("affine", "homography"):
        raise MedregError(f"OpenCV offers USAC/MAGSAC for affine and homography only; use "
                          f"ransac or lmeds for a {model} model")
    need = MINIMAL_SAMPLE[model]
    if len(fixed_pts) < need:
        raise MedregError(f"{len(fixed_pts)} matches found; a {model} fit needs at least {need}")
    cv2.setRNGSeed(int(seed))
    src = np.ascontiguousarray(fixed_pts, dtype=np.float64)
    dst = np.ascontiguousarray(moving_pts, dtype=np.float64)
    matrix, inliers = _robust(src, dst, model, ROBUST_METHODS[method], float(threshold),
                              float(confidence), int(max_iters))
    if matrix is None or inliers is None or not inliers.any():
        raise MedregError(f"robust {model} fit ({method}) found no consensus among "
                          f"{len(src)} matches")
    if model != "homography" and inliers.sum() >= need:
        matrix = _refine(src, dst, inliers, model, need)
    return matrix, inliers


def _refine(src: np.ndarray, dst: np.ndarray, inliers: np.ndarray, model: str,
            need: int) -> np.ndarray:
    """Least-squares refit on the inliers, then once more without gross residuals.

    The second pass drops inliers whose residual exceeds three robust standard deviations
    (1.4826 MAD), which removes near-threshold matches that RANSAC's hard cut lets in.
    """
    matrix = fit_linear(src[inliers], dst[inliers], model).matrix_numpy()
    res = np.linalg.norm(src @ matrix[:2, :2].T + matrix[:2, 2] - dst, axis=1)[inliers]
    sigma = 1.4826 * np.median(np.abs(res - np.median(res))) + 1e-12
    keep = res <= np.median(res) + 3.0 * sigma
    if keep.sum() >= need and not keep.all():
        idx = np.flatnonzero(inliers)[keep]
        matrix = fit_linear(src[idx], dst[idx], model).matrix_numpy()
    return matrix


def _robust(src, dst, model, flag, thr, conf, iters):
    if model == "homography":
        h, inl = cv2.findHomography(src, dst, flag, thr, maxIters=iters, confidence=conf)
        return h, None if inl is None else inl.ravel().astype(bool)
    if model == "translation":
        t, inl = cv2.estimateTranslation2D(src, dst, method=flag, ransacReprojThreshold=thr,
                                           maxIters=iters, confidence=conf)
        m = None if t is None else np.array([[1, 0, t[0]], [0, 1, t[1]]], dtype=np.float64)
    elif model == "affine":
        m, inl = cv2.estimateAffine2D(src, dst, method=flag, ransacReprojThreshold=thr,
                                      maxIters=iters, confidence=conf)
    else:
        m, inl = cv2.estimateAffinePartial2D(src, dst, method=flag, ransacReprojThreshold=thr,
                                             maxIters=iters, confidence=conf)
    if m is None or inl is None:
        return None, None
    return np.vstack([m, [0.0, 0.0, 1.0]]), inl.ravel().astype(bool)


# --------------------------------------------------------------------------- end to end
@dataclass
class KeypointRegistration:
    """Result of :func:`register_keypoints`.

    Attributes:
        transform: fixed world -> moving world (a linear transform or a :class:`Homography`).
        matrix: ``(3, 3)`` float64 world matrix of ``transform``.
        fixed, moving: the detected :class:`Features`.
        matches: ``(k, 2)`` matched keypoint indices; inliers: ``(k,)`` bool mask.
        report: numbers for ``report.json`` (counts, inlier ratio, residuals in mm).
    """

    transform: Transform
    matrix: np.ndarray
    fixed: Features
    moving: Features
    matches: np.ndarray
    inliers: np.ndarray
    report: dict = field(default_factory=dict)


def register_keypoints(fixed: Image, moving: Image, *, detector: str = "sift",
                       model: str = "similarity", ratio: float = 0.75, cross_check: bool = True,
                       method: str | None = None, threshold_px: float = 3.0,
                       min_inliers: int | None = None, max_features: int = 4000,
                       fixed_mask: Image | None = None, moving_mask: Image | None = None,
                       contrast: str = "clahe", seed: int = 0) -> KeypointRegistration:
    """Keypoint registration of two 2D images into a world-space transform.

    Args:
        fixed, moving: 2D images (any spacing, origin, direction).
        detector: ``sift``, ``orb`` or ``akaze``; model: one of :data:`KEYPOINT_MODELS`.
        ratio, cross_check: matching options (see :func:`match`).
        method: robust estimator (see :func:`fit_model`); threshold_px: inlier threshold in
            fixed-image pixels.
        min_inliers: fewest inliers accepted (default ``max(6, 2 * minimal sample)``).
        contrast: preparation before detection (see :func:`detect`).

    Returns:
        :class:`KeypointRegistration`.

    Convention:
        ``transform`` maps fixed world -> moving world (LPS mm), centre = fixed grid centre.
    """
    if model not in KEYPOINT_MODELS:
        raise MedregError(f"unknown keypoint model {model!r}; choose from "
                          f"{', '.join(KEYPOINT_MODELS)}")
    f = detect(fixed, detector, max_features=max_features, mask=fixed_mask, contrast=contrast)
    m = detect(moving, detector, max_features=max_features, mask=moving_mask, contrast=contrast)
    pairs = match(f, m, ratio=ratio, cross_check=cross_check)
    need = max(6, 2 * MINIMAL_SAMPLE[model]) if min_inliers is None else int(min_inliers)
    if len(pairs) < need:
        raise MedregError(f"only {len(pairs)} keypoint matches survived the ratio test"
                          f"{' and cross-check' if cross_check else ''} ({len(f)} fixed, "
                          f"{len(m)} moving keypoints); at least {need} are needed")
    grid = scalar_image(fixed).grid
    thr = threshold_px * float(np.mean(grid.spacing))
    src, dst = f.world[pairs[:, 0]], m.world[pairs[:, 1]]
    matrix, inliers = fit_model(src, dst, model, method=method, threshold=thr, seed=seed)
    if inliers.sum() < need:
        raise MedregError(f"only {int(inliers.sum())} of {len(pairs)} matches are {model} "
                          f"inliers within {threshold_px} px; at least {need} are needed")
    transform = _as_transform(matrix, model, grid)
    report = _report(detector, model, method or _default_method(model), f, m, pairs, inliers,
                     transform, src, dst, thr)
    return KeypointRegistration(transform, matrix, f, m, pairs, inliers, report)


def _as_transform(matrix: np.ndarray, model: str, grid) -> Transform:
    if model == "homography":
        return Homography(matrix)
    from medreg.transforms.linear import linear_from_matrix

    return linear_from_matrix(model, matrix, center=grid.center(),
                              radius=float(np.max(grid.extent)) / 2)


def _report(detector, model, method, f, m, pairs, inliers, transform, src, dst, thr) -> dict:
    import torch

    with torch.no_grad():
        mapped = transform(torch.from_numpy(src[inliers])).numpy()
    res = np.linalg.norm(mapped - dst[inliers], axis=1)
    return {"detector": detector, "model": model, "robust_method": method,
            "keypoints_fixed": len(f), "keypoints_moving": len(m), "matches": int(len(pairs)),
            "inliers": int(inliers.sum()), "inlier_ratio": float(inliers.mean()),
            "inlier_rms_mm": float(np.sqrt(np.mean(res**2))), "inlier_max_mm": float(res.max()),
            "threshold_mm": float(thr)}


# --------------------------------------------------------------------------- picture
def draw_matches(fixed: Image, moving: Image, result: KeypointRegistration,
                 path: str | Path, max_lines: int = 200) -> Path:
    """Save a side-by-side picture of the matches (inliers green, outliers red) as PNG.

    Uses matplotlib's Agg canvas (no display needed).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    a, b = to_uint8(fixed), to_uint8(moving)
    h = max(a.shape[0], b.shape[0])
    pad = lambda x: np.pad(x, ((0, h - x.shape[0]), (0, 0)))  # noqa: E731
    canvas = np.hstack([pad(a), pad(b)])
    fig = Figure(figsize=(10, 10 * h / canvas.shape[1] + 0.6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(111)
    ax.imshow(canvas, cmap="gray")
    rng = np.random.default_rng(0)
    order = rng.permutation(len(result.matches))[:max_lines]
    for k in order:
        i, j = result.matches[k]
        (x0, y0), (x1, y1) = result.fixed.index[i], result.moving.index[j]
        ok = bool(result.inliers[k])
        ax.plot([x0, x1 + a.shape[1]], [y0, y1], "-", lw=0.8 if ok else 0.4,
                color="lime" if ok else "red", alpha=0.9 if ok else 0.5)
    r = result.report
    ax.set_title(f"{r['detector']} / {r['model']}: {r['inliers']} of {r['matches']} matches "
                 f"are inliers, RMS {r['inlier_rms_mm']:.2f} mm")
    ax.axis("off")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100, bbox_inches="tight")
    return out
