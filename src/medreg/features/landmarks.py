"""Point-set registration: closed-form fits, thin-plate splines, ICP and FRE/TRE.

Convention:
    * Point arrays are ``(n, dim)`` world coordinates (LPS mm) ordered ``(x, y[, z])``; row
      ``i`` of ``fixed`` corresponds to row ``i`` of ``moving``.
    * Every fitted transform maps **fixed world -> moving world**: ``T(fixed[i]) ~= moving[i]``,
      the same direction as every other medreg transform (``warped(x) = moving(T(x))``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.spatial import cKDTree

from medreg.errors import MedregError
from medreg.transforms.base import Transform
from medreg.transforms.linear import LinearTransform, linear_from_matrix

LANDMARK_MODELS = ("translation", "rigid", "similarity", "affine", "tps")


def as_points(points, name: str = "points") -> np.ndarray:
    """``(n, dim)`` float64 array of finite 2D or 3D points, or a clear error."""
    try:
        arr = np.asarray(torch.as_tensor(points).detach().cpu() if isinstance(points, torch.Tensor)
                         else points, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise MedregError(f"{name} must be an (n, 2) or (n, 3) array of numbers") from exc
    if arr.ndim != 2 or arr.shape[1] not in (2, 3):
        raise MedregError(f"{name} must be an (n, 2) or (n, 3) array, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise MedregError(f"{name} contains NaN or infinite coordinates")
    return arr


def _min_points(model: str, dim: int) -> int:
    return {"translation": 1, "rigid": 2 if dim == 2 else 3, "similarity": 2 if dim == 2 else 3,
            "affine": dim + 1, "tps": dim + 1}[model]


def _needed_rank(model: str, dim: int) -> int:
    """Rank of the centred fixed points that makes ``model`` determined."""
    return {"translation": 0, "rigid": dim - 1, "similarity": dim - 1, "affine": dim,
            "tps": dim}[model]


def check_pairs(fixed, moving, model: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate paired landmarks for ``model``; returns float64 ``(n, dim)`` arrays.

    Raises:
        MedregError: mismatched counts or dimensions, too few points, or a degenerate
            (coincident / collinear / coplanar) configuration, saying what was found.
    """
    if model not in LANDMARK_MODELS:
        raise MedregError(f"unknown landmark model {model!r}; choose from "
                          f"{', '.join(LANDMARK_MODELS)}")
    f, m = as_points(fixed, "fixed points"), as_points(moving, "moving points")
    if f.shape[1] != m.shape[1]:
        raise MedregError(f"fixed points are {f.shape[1]}D but moving points are {m.shape[1]}D")
    if len(f) != len(m):
        raise MedregError(f"paired landmarks need equal counts: {len(f)} fixed vs "
                          f"{len(m)} moving points")
    dim, need = f.shape[1], _min_points(model, f.shape[1])
    if len(f) < need:
        raise MedregError(f"a {dim}D {model} fit needs at least {need} point pairs, got {len(f)}")
    rank = point_rank(f)
    if rank < _needed_rank(model, dim):
        shape = {0: "coincident", 1: "collinear", 2: "coplanar"}[rank]
        raise MedregError(f"the {len(f)} fixed points are {shape} (rank {rank}); a {dim}D "
                          f"{model} fit needs rank {_needed_rank(model, dim)}")
    return f, m


def point_rank(points: np.ndarray, rtol: float = 1e-6) -> int:
    """Affine rank of a point set: 0 coincident, 1 collinear, 2 coplanar, 3 general (3D)."""
    centred = points - points.mean(0)
    sv = np.linalg.svd(centred, compute_uv=False)
    scale = max(float(np.abs(points).max()), 1.0)
    return int(np.sum(sv > rtol * scale * np.sqrt(len(points))))


# --------------------------------------------------------------------------- closed forms
def umeyama(fixed, moving, *, scaling: bool = False,
            weights: np.ndarray | None = None) -> np.ndarray:
    """Least-squares rigid (Kabsch) or similarity (Umeyama) matrix with ``T(fixed) ~ moving``.

    Args:
        fixed, moving: ``(n, dim)`` paired points.
        scaling: also fit one isotropic scale.
        weights: optional ``(n,)`` non-negative weights.

    Returns:
        ``(dim+1, dim+1)`` float64 homogeneous matrix (a proper rotation, no reflection).

    Convention:
        Minimizes ``sum_i w_i |s R f_i + t - m_i|^2`` in world mm.
    """
    f, m = np.asarray(fixed, float), np.asarray(moving, float)
    w = np.ones(len(f)) if weights is None else np.asarray(weights, float)
    w = w / w.sum()
    fc, mc = w @ f, w @ m
    f0, m0 = f - fc, m - mc
    cov = (m0 * w[:, None]).T @ f0
    u, sv, vt = np.linalg.svd(cov)
    d = np.ones(len(sv))
    d[-1] = np.sign(np.linalg.det(u @ vt)) or 1.0
    r = u @ np.diag(d) @ vt
    s = float(sv @ d / (w @ (f0**2).sum(1))) if scaling else 1.0
    out = np.eye(f.shape[1] + 1)
    out[:-1, :-1] = s * r
    out[:-1, -1] = mc - s * r @ fc
    return out


def affine_lstsq(fixed, moving, weights: np.ndarray | None = None) -> np.ndarray:
    """Least-squares affine ``(dim+1, dim+1)`` matrix with ``A f_i + t ~ m_i``.

    Convention:
        ``(n, dim)`` world points (x, y[, z]); the matrix maps fixed world -> moving world.
    """
    f, m = np.asarray(fixed, float), np.asarray(moving, float)
    hom = np.hstack([f, np.ones((len(f), 1))])
    if weights is not None:
        sw = np.sqrt(np.asarray(weights, float))[:, None]
        hom, m = hom * sw, m * sw
    sol, *_ = np.linalg.lstsq(hom, m, rcond=None)
    out = np.eye(f.shape[1] + 1)
    out[:-1] = sol.T
    return out


def fit_linear(fixed, moving, model: str = "rigid", *, center=None,
               weights: np.ndarray | None = None) -> LinearTransform:
    """Closed-form landmark fit of a ``translation|rigid|similarity|affine`` transform.

    Args:
        fixed, moving: ``(n, dim)`` paired world points.
        center: rotation centre of the returned transform (default: fixed centroid).

    Returns:
        medreg linear transform mapping fixed world -> moving world.

    Convention:
        ``T(fixed[i]) ~= moving[i]`` in LPS mm, least squares over all pairs.
    """
    if model == "tps":
        raise MedregError("use fit_tps for thin-plate splines")
    f, m = check_pairs(fixed, moving, model)
    if model == "translation":
        w = np.ones(len(f)) if weights is None else np.asarray(weights, float)
        mat = np.eye(f.shape[1] + 1)
        mat[:-1, -1] = (w @ (m - f)) / w.sum()
    elif model == "affine":
        mat = affine_lstsq(f, m, weights)
    else:
        mat = umeyama(f, m, scaling=model == "similarity", weights=weights)
    c = f.mean(0) if center is None else np.asarray(center, float)
    radius = max(float(np.linalg.norm(f - f.mean(0), axis=1).max()), 1.0)
    return linear_from_matrix(model, mat, center=c, radius=radius)


# --------------------------------------------------------------------------- thin-plate spline
def _tps_kernel(r: torch.Tensor, dim: int) -> torch.Tensor:
    """Biharmonic radial basis: ``r^2 log r`` in 2D, ``-r`` in 3D (0 at r = 0)."""
    if dim == 2:
        return torch.where(r > 0, r * r * torch.log(r.clamp_min(1e-300)), torch.zeros_like(r))
    return -r


class ThinPlateSpline(Transform):
    """Thin-plate spline ``T(x) = A x + b + sum_i w_i U(|x - c_i|)`` (2D or 3D).

    Built by :func:`fit_tps`. With ``regularization == 0`` it interpolates the landmarks
    exactly; larger values trade exactness for smoothness (approximating spline).

    Attributes:
        ndim: 2 or 3.
        centers: ``(n, dim)`` fixed-space control points (world mm).
        weights: ``(n, dim)`` radial-basis coefficients.
        affine: ``(dim + 1, dim)`` affine part, rows ``[A^T; b]``.

    Convention:
        Maps fixed world -> moving world; ``U`` is ``r^2 log r`` (2D) or ``-r`` (3D), ``r`` in mm.
    """

    def __init__(self, centers: np.ndarray, weights: np.ndarray, affine: np.ndarray,
                 regularization: float = 0.0) -> None:
        super().__init__()
        self.ndim = int(centers.shape[1])
        self.regularization = float(regularization)
        self.register_buffer("centers", torch.as_tensor(centers, dtype=torch.float64))
        self.register_buffer("weights", torch.as_tensor(weights, dtype=torch.float64))
        self.register_buffer("affine", torch.as_tensor(affine, dtype=torch.float64))

    def forward(self, points: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
        """``(..., dim)`` fixed world points -> ``(..., dim)`` moving world points."""
        shape = points.shape
        flat = points.reshape(-1, self.ndim).to(torch.float64)
        out = []
        for part in flat.split(chunk):
            basis = _tps_kernel(torch.cdist(part, self.centers), self.ndim)
            lin = part @ self.affine[:-1] + self.affine[-1]
            out.append(lin + basis @ self.weights)
        return torch.cat(out).reshape(shape).to(points.dtype)

    def bending_energy(self) -> float:
        """``trace(W^T K W)``: zero for a purely affine spline, in mm^2 (2D) units."""
        k = _tps_kernel(torch.cdist(self.centers, self.centers), self.ndim)
        return float(torch.trace(self.weights.T @ k @ self.weights))

    def inverse(self) -> Transform:
        raise TypeError("a thin-plate spline has no closed-form inverse; fit one from the "
                        "moving to the fixed landmarks with fit_tps(moving, fixed)")

    def extra_repr(self) -> str:
        return f"ndim={self.ndim}, n_centers={len(self.centers)}, " \
               f"regularization={self.regularization:g}"


def fit_tps(fixed, moving, regularization: float = 0.0) -> ThinPlateSpline:
    """Fit a thin-plate spline with ``T(fixed[i]) ~= moving[i]``.

    Args:
        fixed, moving: ``(n, dim)`` paired world points; ``n >= dim + 1``, not collinear
            (2D) / coplanar (3D).
        regularization: ``lambda >= 0`` added to the kernel diagonal; 0 interpolates exactly.

    Returns:
        :class:`ThinPlateSpline` (fixed world -> moving world).

    Convention:
        Centres are the fixed points; ``T(fixed[i]) = moving[i]`` exactly when
        ``regularization == 0``.
    """
    if not regularization >= 0:
        raise MedregError(f"TPS regularization must be >= 0, got {regularization}")
    f, m = check_pairs(fixed, moving, "tps")
    n, d = f.shape
    if len(np.unique(np.round(f, 9), axis=0)) < n:
        raise MedregError("fixed landmarks contain duplicate points; a TPS needs distinct centres")
    k = _tps_kernel(torch.cdist(torch.from_numpy(f), torch.from_numpy(f)), d).numpy()
    p = np.hstack([f, np.ones((n, 1))])
    system = np.zeros((n + d + 1, n + d + 1))
    system[:n, :n] = k + regularization * np.eye(n)
    system[:n, n:] = p
    system[n:, :n] = p.T
    rhs = np.vstack([m, np.zeros((d + 1, d))])
    try:
        sol = np.linalg.solve(system, rhs)
    except np.linalg.LinAlgError as exc:
        raise MedregError(f"TPS system is singular for these {n} landmarks; check for "
                          f"degenerate positions") from exc
    return ThinPlateSpline(f, sol[:n], sol[n:], regularization)


# --------------------------------------------------------------------------- ICP
@dataclass
class IcpResult:
    """Result of :func:`icp`.

    Attributes:
        transform: fixed world -> moving world.
        rms: root-mean-square closest-point distance of the kept pairs (mm), last iteration.
        iterations: iterations run; converged: the change of ``rms`` fell below tolerance.
        history: rms per iteration.
    """

    transform: LinearTransform
    rms: float
    iterations: int
    converged: bool
    history: list[float] = field(default_factory=list)


def icp(fixed, moving, *, model: str = "rigid", init: LinearTransform | np.ndarray | None = None,
        max_iterations: int = 100, tolerance: float = 1e-6, trim: float = 1.0,
        principal_axes: bool = True) -> IcpResult:
    """Iterative closest point between unpaired point sets (surfaces).

    Args:
        fixed: ``(n, dim)`` fixed points; moving: ``(k, dim)`` moving points (any counts).
        model: ``rigid``, ``similarity`` or ``affine``.
        init: starting fixed->moving transform or matrix. Without one, ICP starts from the
            centroid alignment and, with ``principal_axes``, also from every proper alignment
            of the principal axes, keeping the run with the lowest final RMS (point-to-point
            ICP alone often stalls in a local minimum on real anatomy).
        trim: fraction of closest pairs kept per iteration (``< 1`` rejects outliers, as in
            trimmed ICP).

    Returns:
        :class:`IcpResult`.

    Convention:
        Each fixed point is paired with the moving point nearest to its current image
        ``T(fixed)``; the fit then updates ``T`` (fixed world -> moving world).
    """
    if model not in ("rigid", "similarity", "affine"):
        raise MedregError(f"ICP model must be rigid, similarity or affine, got {model!r}")
    if not 0 < trim <= 1:
        raise MedregError(f"ICP trim fraction must lie in (0, 1], got {trim}")
    f, m = as_points(fixed, "fixed points"), as_points(moving, "moving points")
    if f.shape[1] != m.shape[1]:
        raise MedregError(f"fixed points are {f.shape[1]}D but moving points are {m.shape[1]}D")
    need = max(_min_points(model, f.shape[1]), 3)
    if len(f) < need or len(m) < need:
        raise MedregError(f"ICP needs at least {need} points in each set, got {len(f)} fixed "
                          f"and {len(m)} moving")
    tree = cKDTree(m)
    starts = [_icp_start(f, m, init)]
    if init is None and principal_axes:
        starts += _principal_starts(f, m)
    runs = [_icp_run(f, m, tree, s, model, need, max_iterations, tolerance, trim) for s in starts]
    mat, history, converged = min(runs, key=lambda r: r[1][-1])
    radius = max(float(np.linalg.norm(f - f.mean(0), axis=1).max()), 1.0)
    t = linear_from_matrix(model, mat, center=f.mean(0), radius=radius)
    return IcpResult(t, history[-1], len(history), converged, history)


def _icp_run(f, m, tree, mat, model, need, max_iterations, tolerance, trim):
    history: list[float] = []
    converged = False
    for _ in range(max_iterations):
        moved = f @ mat[:-1, :-1].T + mat[:-1, -1]
        dist, idx = tree.query(moved)
        keep = np.argsort(dist)[: max(need, int(round(trim * len(f))))]
        history.append(float(np.sqrt(np.mean(dist[keep] ** 2))))
        mat = (affine_lstsq(f[keep], m[idx[keep]]) if model == "affine"
               else umeyama(f[keep], m[idx[keep]], scaling=model == "similarity"))
        if len(history) > 1 and abs(history[-2] - history[-1]) < tolerance:
            converged = True
            break
    return mat, history, converged


def _principal_starts(f: np.ndarray, m: np.ndarray) -> list[np.ndarray]:
    """Matrices aligning centroids and principal axes, one per proper choice of axis signs."""
    d = f.shape[1]
    ef = np.linalg.eigh(np.cov((f - f.mean(0)).T))[1]
    em = np.linalg.eigh(np.cov((m - m.mean(0)).T))[1]
    out = []
    for signs in np.array(np.meshgrid(*[[1.0, -1.0]] * d)).reshape(d, -1).T:
        r = em @ np.diag(signs) @ ef.T
        if np.linalg.det(r) < 0:
            continue
        mat = np.eye(d + 1)
        mat[:d, :d], mat[:d, d] = r, m.mean(0) - r @ f.mean(0)
        out.append(mat)
    return out


def _icp_start(f: np.ndarray, m: np.ndarray, init) -> np.ndarray:
    if init is None:
        mat = np.eye(f.shape[1] + 1)
        mat[:-1, -1] = m.mean(0) - f.mean(0)
        return mat
    if isinstance(init, LinearTransform):
        return init.matrix_numpy()
    mat = np.asarray(init, float)
    if mat.shape != (f.shape[1] + 1,) * 2:
        raise MedregError(f"ICP init matrix must be {(f.shape[1] + 1,) * 2}, got {mat.shape}")
    return mat


# --------------------------------------------------------------------------- errors
def registration_errors(transform: Transform, fixed, moving) -> dict:
    """Distances ``|T(fixed_i) - moving_i|`` (mm) and their summary.

    Use the fiducials the fit used for the fiducial registration error (FRE) and held-out
    points for the target registration error (TRE).

    Returns:
        ``{"per_point": [...], "mean": ..., "rms": ..., "max": ..., "n": ...}``.
    """
    f, m = as_points(fixed, "fixed points"), as_points(moving, "moving points")
    if f.shape != m.shape:
        raise MedregError(f"error evaluation needs paired points, got {f.shape} and {m.shape}")
    with torch.no_grad():
        mapped = transform(torch.from_numpy(f)).detach().cpu().numpy().astype(np.float64)
    d = np.linalg.norm(mapped - m, axis=1)
    return {"per_point": d.tolist(), "mean": float(d.mean()), "rms": float(np.sqrt((d**2).mean())),
            "max": float(d.max()), "n": int(len(d))}


def fre(transform: Transform, fixed, moving) -> float:
    """Fiducial registration error: RMS residual (mm) on the landmarks used for the fit."""
    return registration_errors(transform, fixed, moving)["rms"]


def tre(transform: Transform, fixed_targets, moving_targets) -> float:
    """Target registration error: RMS distance (mm) on held-out targets."""
    return registration_errors(transform, fixed_targets, moving_targets)["rms"]


def fit_landmarks(fixed, moving, model: str = "rigid", *, regularization: float = 0.0
                  ) -> Transform:
    """Any landmark model by name: linear kinds through :func:`fit_linear`, ``tps``."""
    if model == "tps":
        return fit_tps(fixed, moving, regularization)
    return fit_linear(fixed, moving, model)
