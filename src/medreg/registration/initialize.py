"""Initial transforms for large misalignments.

Convention: every initializer returns a fixed->moving linear transform (LPS mm) whose centre is
the fixed image's centre (geometric or of mass).
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from medreg.core.image import Image
from medreg.errors import MedregError
from medreg.registration.objective import mask_on_grid
from medreg.registration.plugins import StageContext
from medreg.transforms.linear import Affine, Rigid, Translation


def init_identity(ctx: StageContext) -> Translation:
    """No initial motion (centre of rotation at the fixed image centre)."""
    return Translation(ctx.fixed.ndim, center=ctx.fixed.grid.center())


def init_geometric_center(ctx: StageContext) -> Translation:
    """Translate the fixed image's geometric centre onto the moving image's."""
    cf, cm = ctx.fixed.grid.center(), ctx.moving.grid.center()
    return Translation(ctx.fixed.ndim, cm - cf, center=cf)


def _weights(image: Image, mask: Image | None) -> torch.Tensor:
    """Non-negative ``(*S)`` float64 weights: intensity above the minimum, inside the mask."""
    t = image.tensor[0].to(torch.float64)
    w = (t - t.min()).clamp_min(0)
    m = mask_on_grid(mask, image)
    if m is not None:
        w = w * m[0].to(torch.float64)
    if float(w.sum()) <= 0:
        raise MedregError("cannot compute image moments: the image (inside its mask) is constant")
    return w


def moments(image: Image, mask: Image | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Intensity-weighted centre of mass ``(dim,)`` and covariance ``(dim, dim)`` in world mm."""
    w = _weights(image, mask).reshape(-1)
    pts = image.grid.world_points(torch.float64).reshape(-1, image.ndim)
    total = w.sum()
    com = (pts * w[:, None]).sum(0) / total
    d = pts - com
    cov = (d * w[:, None]).T @ d / total
    return com.numpy(), cov.numpy()


def init_center_of_mass(ctx: StageContext) -> Translation:
    """Translate the fixed centre of mass onto the moving centre of mass."""
    cf, _ = moments(ctx.fixed, ctx.fixed_mask)
    cm, _ = moments(ctx.moving, ctx.moving_mask)
    return Translation(ctx.fixed.ndim, cm - cf, center=cf)


def _sign_flips(dim: int) -> list[np.ndarray]:
    return [np.diag(s) for s in itertools.product((1.0, -1.0), repeat=dim)]


def init_principal_axes(ctx: StageContext) -> Affine:
    """Align centres of mass and principal axes; the axis-sign ambiguity is settled by the metric.

    Returns a rigid motion (as an ``Affine``) ``T(x) = R (x - c_f) + c_m``.
    """
    from medreg.registration.linear import evaluate_transforms

    cf, cov_f = moments(ctx.fixed, ctx.fixed_mask)
    cm, cov_m = moments(ctx.moving, ctx.moving_mask)
    ef = np.linalg.eigh(cov_f)[1]
    em = np.linalg.eigh(cov_m)[1]
    candidates = []
    for s in _sign_flips(ctx.fixed.ndim):
        r = em @ s @ ef.T
        if np.linalg.det(r) > 0:
            candidates.append(Affine(ctx.fixed.ndim, r, cm - cf, center=cf))
    scores = evaluate_transforms(ctx, candidates)
    return candidates[int(np.argmin(scores))]


def init_rotation_search(ctx: StageContext) -> Rigid:
    """Centre-of-mass alignment plus the best rotation on a coarse grid of angles.

    Options (``ctx.options``): ``search_angles`` in degrees (default -30..30 step 15 about
    every axis in 3D, -180..150 step 30 in 2D).
    """
    from medreg.registration.linear import evaluate_transforms

    com = init_center_of_mass(ctx)
    t = com.translation().detach().numpy()
    cf = com.center.numpy()
    dim = ctx.fixed.ndim
    default = np.arange(-180, 180, 30) if dim == 2 else np.arange(-30, 31, 15)
    angles = np.deg2rad(np.asarray(ctx.options.get("search_angles", default), dtype=float))
    if dim == 2:
        combos = [[a] for a in angles]
    else:
        from scipy.spatial.transform import Rotation

        combos = [Rotation.from_euler("xyz", a).as_rotvec() for a in
                  itertools.product(angles, repeat=3)]
    candidates = [Rigid(dim, r, t, center=cf) for r in combos]
    scores = evaluate_transforms(ctx, candidates)
    return candidates[int(np.argmin(scores))]
