"""Plug-in entry points: ``--method features|phase|landmarks`` and ``--init features|phase``.

Contracts (see :mod:`medreg.registration.plugins`): a method is ``run(ctx) -> StageOutput``,
an initializer ``init(ctx) -> LinearTransform``; both map fixed world -> moving world.

Options read from ``ctx.options`` (all optional unless stated):
    * features: ``model`` (translation|rigid|similarity|affine|homography, default
      similarity), ``detector`` (sift|orb|akaze), ``ratio``, ``cross_check``,
      ``robust_method``, ``threshold_px``, ``min_inliers``, ``max_features``, ``matches_png``
      (path of a picture of the matches).
    * phase: ``model`` (translation|rigid|similarity; 3D: translation), ``window``,
      ``upsample``.
    * landmarks (required: ``fixed_points``, ``moving_points`` as file paths or ``(n, dim)``
      arrays): ``model`` (translation|rigid|similarity|affine|tps), ``regularization``,
      ``fixed_targets`` / ``moving_targets`` for a target registration error.
    * initializers: ``init_model`` (default: the stage's kind when it is translation, rigid
      or similarity, else similarity in 2D and translation in 3D for phase).

A single-slice 3D input (a radiograph DICOM) is registered in 2D and a linear result is lifted
back to 3D (identity along z) so it applies to the images as given.
"""

from __future__ import annotations

import time

import numpy as np

from medreg.core.image import Image
from medreg.errors import MedregError
from medreg.features.keypoints import draw_matches, register_keypoints
from medreg.features.landmarks import fit_landmarks, registration_errors
from medreg.features.phase import register_phase
from medreg.features.preprocess import scalar_image
from medreg.registration.plugins import StageContext, StageOutput
from medreg.transforms.base import Transform
from medreg.transforms.linear import LinearTransform, linear_from_matrix


def _kind_of(t: LinearTransform) -> str:
    return type(t).__name__.lower()


def lift_to(transform: Transform, ndim: int) -> Transform:
    """A 2D linear transform as a 3D one acting as identity along z (for one-slice volumes).

    Convention:
        ``[[A, 0, t], [0, 1, 0]]`` in LPS mm: x and y map as in 2D, z is left unchanged.
    """
    if transform.ndim == ndim:
        return transform
    if not (isinstance(transform, LinearTransform) and transform.ndim == 2 and ndim == 3):
        raise MedregError(f"a {transform.ndim}D {type(transform).__name__} cannot act on "
                          f"{ndim}D images; give 2D images")
    m = np.eye(4)
    m2 = transform.matrix_numpy()
    m[:2, :2], m[:2, 3] = m2[:2, :2], m2[:2, 2]
    c = np.append(transform.center.detach().cpu().numpy(), 0.0)
    return linear_from_matrix(_kind_of(transform), m, center=c, radius=transform.radius)


def _mask(mask: Image | None) -> Image | None:
    return None if mask is None else scalar_image(mask)


def _timed(info: dict, start: float) -> dict:
    info["seconds"] = round(time.perf_counter() - start, 4)
    return info


# --------------------------------------------------------------------------- features
def _keypoints(ctx: StageContext, model: str):
    o = ctx.options
    fixed, moving = scalar_image(ctx.fixed), scalar_image(ctx.moving)
    if fixed.ndim != 2 or moving.ndim != 2:
        raise MedregError(f"keypoint registration is 2D only, got {fixed.ndim}D and "
                          f"{moving.ndim}D images; use --method phase or intensity for 3D")
    result = register_keypoints(
        fixed, moving, detector=o.get("detector", "sift"), model=model,
        ratio=float(o.get("ratio", 0.75)), cross_check=bool(o.get("cross_check", True)),
        method=o.get("robust_method"), threshold_px=float(o.get("threshold_px", 3.0)),
        min_inliers=o.get("min_inliers"), max_features=int(o.get("max_features", 4000)),
        fixed_mask=_mask(ctx.fixed_mask), moving_mask=_mask(ctx.moving_mask), seed=ctx.seed)
    if o.get("matches_png"):
        draw_matches(fixed, moving, result, o["matches_png"])
    return result


def run_features_method(ctx: StageContext) -> StageOutput:
    """Keypoint registration (2D) as a complete method; homography returns a Homography."""
    start = time.perf_counter()
    result = _keypoints(ctx, ctx.options.get("model", "similarity"))
    t = result.transform
    if isinstance(t, LinearTransform):
        t = lift_to(t, ctx.fixed.ndim)
    info = dict(result.report, matrix=result.matrix.tolist())
    return StageOutput(transform=t, stop_reason="robust fit converged", info=_timed(info, start))


def init_features(ctx: StageContext) -> LinearTransform:
    """Keypoint initializer: a linear fixed->moving transform (homography is not linear)."""
    model = ctx.options.get("init_model") or _stage_model(ctx.stage, "similarity")
    if model == "homography":
        raise MedregError("a homography cannot initialize a linear stage; use "
                          "init_model affine or similarity")
    return lift_to(_keypoints(ctx, model).transform, ctx.fixed.ndim)


def _stage_model(stage: str, default: str) -> str:
    return stage if stage in ("translation", "rigid", "similarity", "affine") else default


# --------------------------------------------------------------------------- phase
def _phase(ctx: StageContext, model: str):
    o = ctx.options
    return register_phase(ctx.fixed, ctx.moving, model=model, window_kind=o.get("window", "hann"),
                          upsample=int(o.get("upsample", 100)))


def run_phase_method(ctx: StageContext) -> StageOutput:
    """Phase correlation as a complete method (translation 2D/3D, rigid/similarity 2D)."""
    start = time.perf_counter()
    result = _phase(ctx, ctx.options.get("model", "translation"))
    t = lift_to(result.transform, ctx.fixed.ndim)
    info = dict(result.info, matrix=t.matrix_numpy().tolist())
    return StageOutput(transform=t, stop_reason="phase correlation peak",
                       info=_timed(info, start))


def init_phase(ctx: StageContext) -> LinearTransform:
    """Phase-correlation initializer (similarity in 2D unless told, translation in 3D)."""
    is2d = scalar_image(ctx.fixed).ndim == 2
    model = ctx.options.get("init_model") or _stage_model(
        ctx.stage, "similarity" if is2d else "translation")
    if model == "affine":
        model = "similarity" if is2d else "translation"
    if not is2d:
        model = "translation"
    return lift_to(_phase(ctx, model).transform, ctx.fixed.ndim)


# --------------------------------------------------------------------------- landmarks
def _points(value, ndim: int, name: str) -> np.ndarray:
    from medreg.io.points import read_points

    if value is None:
        raise MedregError(f"landmark registration needs {name} (a landmark file)")
    if isinstance(value, str | bytes) or hasattr(value, "__fspath__"):
        return read_points(value, ndim=ndim).points
    return np.asarray(value, dtype=np.float64)


def run_landmarks_method(ctx: StageContext) -> StageOutput:
    """Landmark registration from paired point files (fixed world -> moving world)."""
    start = time.perf_counter()
    o = ctx.options
    ndim = scalar_image(ctx.fixed).ndim
    f = _points(o.get("fixed_points"), ndim, "fixed_points")
    m = _points(o.get("moving_points"), ndim, "moving_points")
    model = o.get("model", "rigid")
    t = fit_landmarks(f, m, model, regularization=float(o.get("regularization", 0.0)))
    info = {"model": model, "n_landmarks": int(len(f)),
            "fre": _summary(registration_errors(t, f, m))}
    if o.get("fixed_targets") is not None and o.get("moving_targets") is not None:
        tf = _points(o["fixed_targets"], ndim, "fixed_targets")
        tm = _points(o["moving_targets"], ndim, "moving_targets")
        info["tre"] = _summary(registration_errors(t, tf, tm))
    if isinstance(t, LinearTransform):
        info["matrix"] = t.matrix_numpy().tolist()
        t = lift_to(t, ctx.fixed.ndim)
    elif t.ndim != ctx.fixed.ndim:
        raise MedregError(f"a {t.ndim}D thin-plate spline cannot act on {ctx.fixed.ndim}D "
                          f"images; give 2D images")
    return StageOutput(transform=t, stop_reason="closed-form fit", info=_timed(info, start))


def _summary(errors: dict) -> dict:
    return {k: errors[k] for k in ("mean", "rms", "max", "n")}
