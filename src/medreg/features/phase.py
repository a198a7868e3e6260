"""Fourier phase correlation: sub-pixel translation (2D/3D), rotation and scale (2D).

Convention:
    * Arrays passed to the array-level functions are in tensor axis order ``([D,] H, W)``;
      every returned shift is in coordinate order ``(x, y[, z])``, in voxels.
    * A shift ``s`` means ``moving(i + s) ~= fixed(i)``: the moving content sits ``s`` voxels
      further along each axis. In world terms the fixed->moving map is ``x -> x + D diag(h) s``.
    * Rotation angles are counter-clockwise from +x towards +y (index axes), radians; a scale
      ``s > 1`` means the moving content is larger: ``moving_index = s R (fixed_index - c) + ...``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.fft as sfft
import torch
from scipy import ndimage

from medreg.core.axes import xyz_to_tensor_order
from medreg.core.grid import Grid
from medreg.core.image import Image
from medreg.errors import MedregError
from medreg.features.preprocess import scalar_image
from medreg.resample import resample
from medreg.transforms.linear import LinearTransform, linear_from_matrix

WINDOWS = ("hann", "tukey", "none")


@dataclass(frozen=True)
class PhaseShift:
    """Result of :func:`phase_correlate`.

    Attributes:
        shift: ``(dim,)`` float64 shift in voxels, ordered ``(x, y[, z])``.
        confidence: height of the normalized phase-correlation peak in ``[0, 1]``; 1 for a
            pure circular shift, about ``1/sqrt(n_voxels)`` for unrelated images.
    """

    shift: np.ndarray
    confidence: float


@dataclass
class PhaseRegistration:
    """Result of :func:`register_phase`: a world transform and how it was found."""

    transform: LinearTransform
    confidence: float
    info: dict = field(default_factory=dict)


def _xyz(values_tensor_order: np.ndarray) -> np.ndarray:
    """Tensor-order vector -> coordinate order (through the one axis helper)."""
    return xyz_to_tensor_order(torch.from_numpy(np.asarray(values_tensor_order, float))).numpy()


def window(shape: tuple[int, ...], kind: str = "hann", alpha: float = 0.5) -> np.ndarray:
    """Separable apodization window of ``shape`` (tensor order), float32.

    Args:
        kind: ``hann`` (full cosine taper), ``tukey`` (flat centre, cosine edges of
            fraction ``alpha``) or ``none``.
    """
    if kind not in WINDOWS:
        raise MedregError(f"unknown window {kind!r}; choose from {', '.join(WINDOWS)}")
    out = np.ones((), dtype=np.float32)
    for n in shape:
        if kind == "none" or n < 3:
            w = np.ones(n)
        elif kind == "hann":
            w = np.hanning(n)
        else:
            w = _tukey(n, alpha)
        out = np.multiply.outer(out, w.astype(np.float32))
    return out


def _tukey(n: int, alpha: float) -> np.ndarray:
    x = np.linspace(0.0, 1.0, n)
    w = np.ones(n)
    edge = x < alpha / 2
    w[edge] = 0.5 * (1 + np.cos(2 * np.pi / alpha * (x[edge] - alpha / 2)))
    edge = x > 1 - alpha / 2
    w[edge] = 0.5 * (1 + np.cos(2 * np.pi / alpha * (x[edge] - 1 + alpha / 2)))
    return w


def _spectrum(arr: np.ndarray, win: np.ndarray) -> np.ndarray:
    """Half (real-input) spectrum of the windowed, mean-free array; complex64."""
    a = np.asarray(arr, dtype=np.float32)
    return sfft.rfftn((a - a.mean()) * win)


def cross_power(f_fixed: np.ndarray, f_moving: np.ndarray, power: float = 1.0) -> np.ndarray:
    """Cross-power spectrum ``F_m conj(F_f) / |F_m conj(F_f)|^power`` (peak at +shift).

    ``power=1`` is phase correlation (every frequency weighs the same), ``0`` plain
    cross-correlation; values between trade robustness to noise against peak sharpness.
    """
    r = f_moving * np.conj(f_fixed)
    if power == 0:
        return r
    mag = np.abs(r)
    return r / np.maximum(mag, 1e-12 * max(float(mag.max()), 1e-30)) ** power


def _upsampled_dft(r: np.ndarray, shape: tuple[int, ...], centre: np.ndarray, upsample: int,
                   half: int) -> np.ndarray:
    """Real part of the inverse DFT of a half spectrum ``r`` on a fine grid around ``centre``.

    ``r`` is a real-input (``rfftn``) spectrum of an array of ``shape`` (tensor order).
    Samples lie at ``centre + (j - half) / upsample`` for ``j = 0 .. 2 half`` on every axis;
    evaluating only there costs ``O(n * half)`` per axis instead of an ``upsample``-fold FFT.
    Hermitian symmetry makes the full sum twice the real part of the half sum, except for the
    self-conjugate columns (zero and, for even sizes, Nyquist frequency) counted once.
    """
    out = r
    last = len(shape) - 1
    for axis, n in enumerate(shape):
        pos = centre[axis] + (np.arange(2 * half + 1) - half) / upsample
        if axis == last:
            freq = sfft.rfftfreq(n) * n
            weight = np.full(freq.size, 2.0)
            weight[0] = 1.0
            if n % 2 == 0:
                weight[-1] = 1.0
        else:
            freq, weight = sfft.fftfreq(n) * n, np.ones(n)
        kernel = (weight * np.exp(2j * np.pi * np.outer(pos, freq) / n)).astype(r.dtype)
        out = np.moveaxis(np.tensordot(kernel, out, axes=([1], [axis])), 0, axis)
    return out.real / float(np.prod(shape))


def _peak(corr: np.ndarray) -> np.ndarray:
    """Integer peak position, wrapped to signed shifts (tensor order)."""
    idx = np.array(np.unravel_index(int(np.argmax(corr)), corr.shape), dtype=np.float64)
    shape = np.asarray(corr.shape, dtype=np.float64)
    return np.where(idx > shape // 2, idx - shape, idx)


def correlate_spectra(f_fixed: np.ndarray, f_moving: np.ndarray, shape: tuple[int, ...],
                      upsample: int = 100, power: float = 1.0) -> PhaseShift:
    """Phase-correlate two precomputed half spectra (``rfftn``) of arrays of ``shape``.

    See :func:`phase_correlate`. The confidence is the peak height of the correlation surface
    normalized so that a pure circular shift gives 1.
    """
    r = cross_power(f_fixed, f_moving, power)
    r = r / max(float(np.abs(r).mean()), 1e-30)
    corr = sfft.irfftn(r, s=shape)
    coarse = _peak(corr)
    peak_value = float(corr.max())
    if upsample > 1:
        half = int(np.ceil(1.5 * upsample / 2))
        fine = _upsampled_dft(r, shape, coarse, upsample, half)
        j = np.array(np.unravel_index(int(np.argmax(fine)), fine.shape), dtype=np.float64)
        coarse = coarse + (j - half) / upsample
        peak_value = float(fine.max())
    return PhaseShift(shift=_xyz(coarse), confidence=float(np.clip(peak_value, 0.0, 1.0)))


def phase_correlate(fixed: np.ndarray, moving: np.ndarray, *, window_kind: str = "hann",
                    upsample: int = 100) -> PhaseShift:
    """Sub-voxel translation between two arrays of the same shape by phase correlation.

    Args:
        fixed, moving: ``([D,] H, W)`` arrays (tensor order).
        window_kind: apodization against edge effects (:data:`WINDOWS`).
        upsample: sub-voxel precision ``1 / upsample`` by a local upsampled DFT of the
            cross-power spectrum (1 disables the refinement).

    Returns:
        :class:`PhaseShift` with ``shift`` in ``(x, y[, z])`` voxels.

    Convention:
        ``moving(i + shift) ~= fixed(i)``; shifts are taken modulo the array size and wrapped to
        ``(-n/2, n/2]``.
    """
    f, m = np.asarray(fixed), np.asarray(moving)
    if f.shape != m.shape:
        raise MedregError(f"phase correlation needs arrays of one shape, got {f.shape} "
                          f"and {m.shape}")
    if f.ndim not in (2, 3) or min(f.shape) < 4:
        raise MedregError(f"phase correlation needs a 2D or 3D array at least 4 voxels wide, "
                          f"got shape {f.shape}")
    if upsample < 1:
        raise MedregError(f"upsample must be >= 1, got {upsample}")
    win = window(f.shape, window_kind)
    return correlate_spectra(_spectrum(f, win), _spectrum(m, win), f.shape, upsample)


# --------------------------------------------------------------------------- rotation and scale
def _highpass(shape: tuple[int, int]) -> np.ndarray:
    """Reddy-Chatterji emphasis filter on the fftshifted spectrum (0 at DC, ~1 at the edges)."""
    y = np.cos(np.pi * np.linspace(-0.5, 0.5, shape[0]))
    x = np.cos(np.pi * np.linspace(-0.5, 0.5, shape[1]))
    xx = np.outer(y, x)
    return (1.0 - xx) * (2.0 - xx)


def log_polar_magnitude(arr: np.ndarray, n_angles: int, n_radii: int, window_kind: str = "hann",
                        r_min: float = 3.0) -> tuple[np.ndarray, float]:
    """Log-polar resampling of the high-passed magnitude spectrum of a 2D array.

    Returns:
        ``(n_angles, n_radii)`` float32 map (rows: angle over ``[0, pi)``, counter-clockwise
        from +kx towards +ky; columns: log-radius from ``r_min / min(H, W)`` to 0.5 cycles per
        pixel), and the log-radius step per column.

    Convention:
        The magnitude spectrum is centro-symmetric, so half a turn covers it. If
        ``moving_index = s R(theta) fixed_index + t`` then the moving map equals the fixed map
        shifted by ``theta`` along the rows and by ``-log(s) / step`` along the columns.
    """
    spec = np.abs(sfft.fftshift(sfft.fft2(
        (arr - arr.mean()) * window(arr.shape, window_kind))))
    spec = spec * _highpass(arr.shape)
    h, w = arr.shape
    if min(h, w) <= 4 * r_min:
        raise MedregError(f"image of shape {arr.shape} is too small for a log-polar spectrum; "
                          f"at least {int(4 * r_min) + 1} pixels a side are needed")
    # frequencies in cycles per pixel, so that non-square arrays rotate correctly
    f_min, f_max = r_min / min(h, w), 0.5
    step = np.log(f_max / f_min) / n_radii
    freq = f_min * np.exp(np.arange(n_radii) * step)
    theta = np.arange(n_angles) * np.pi / n_angles
    ky = h // 2 + h * np.sin(theta)[:, None] * freq[None]
    kx = w // 2 + w * np.cos(theta)[:, None] * freq[None]
    out = ndimage.map_coordinates(spec, [ky, kx], order=1, mode="constant")
    return out.astype(np.float32), float(step)


@dataclass(frozen=True)
class RotationScale:
    """Rotation (radians, modulo pi) and scale from :func:`estimate_rotation_scale`."""

    angle: float
    scale: float
    confidence: float


def estimate_rotation_scale(fixed: np.ndarray, moving: np.ndarray, *, n_angles: int = 360,
                            n_radii: int | None = None, window_kind: str = "hann",
                            upsample: int = 100, power: float = 0.5) -> RotationScale:
    """Rotation and scale between two 2D arrays from their log-polar magnitude spectra.

    The angle is found modulo pi (the magnitude spectrum cannot tell ``theta`` from
    ``theta + pi``); :func:`register_phase` resolves it with a translation search.
    ``power`` < 1 (partially normalized cross-power) is markedly more robust here than pure
    phase correlation, whose flat weighting lets the noisy high frequencies of the
    log-polar map win.

    Convention:
        ``moving_index = scale * R(angle) (fixed_index - c) + ...`` with ``R`` counter-clockwise
        from +x to +y; the returned angle lies in ``[-pi/2, pi/2)``.
    """
    if np.asarray(fixed).ndim != 2:
        raise MedregError(f"rotation/scale by log-polar phase correlation is 2D only, got "
                          f"{np.asarray(fixed).ndim}D arrays")
    n_radii = n_radii or int(min(fixed.shape))
    lp_f, step = log_polar_magnitude(np.asarray(fixed, np.float32), n_angles, n_radii, window_kind)
    lp_m, _ = log_polar_magnitude(np.asarray(moving, np.float32), n_angles, n_radii, window_kind)
    radial = window((n_radii,), "hann")[None]  # the angle axis is periodic: no window there
    res = correlate_spectra(sfft.rfft2(lp_f * radial), sfft.rfft2(lp_m * radial), lp_f.shape,
                            upsample, power)
    d_radius, d_angle = res.shift  # (x = radius column, y = angle row)
    angle = d_angle * np.pi / n_angles
    angle = (angle + np.pi / 2) % np.pi - np.pi / 2
    return RotationScale(angle=float(angle), scale=float(np.exp(-d_radius * step)),
                         confidence=res.confidence)


# --------------------------------------------------------------------------- images -> transforms
PHASE_MODELS = ("translation", "rigid", "similarity")


def working_grid(grid: Grid) -> Grid:
    """``grid`` itself when its spacing is isotropic, else the same frame at the finest spacing.

    Convention: same origin and direction; isotropic pixels make an index-space similarity a
    world-space similarity.
    """
    h = min(grid.spacing)
    if np.allclose(grid.spacing, h):
        return grid
    size = np.maximum(np.round(grid.extent / h), 1).astype(int)
    return Grid(size, [h] * grid.ndim, grid.origin, grid.direction)


def _on_grid(image: Image, grid: Grid) -> np.ndarray:
    """``image`` resampled (identity world map) onto ``grid`` as a float32 tensor-order array."""
    if not image.grid.is_close(grid):
        image = resample(image, grid)
    return image.tensor[0].detach().to(torch.float32).cpu().numpy()


def _index_similarity(angle: float, scale: float, centre: np.ndarray,
                      shift: np.ndarray) -> np.ndarray:
    """``(3, 3)`` index map ``p -> s R (p + shift - c) + c``."""
    a = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    m = np.eye(3)
    m[:2, :2] = a
    m[:2, 2] = centre - a @ centre + a @ shift
    return m


def register_phase(fixed: Image, moving: Image, *, model: str = "translation",
                   window_kind: str = "hann", upsample: int = 100,
                   n_angles: int = 360) -> PhaseRegistration:
    """Register two images by phase correlation.

    Args:
        fixed, moving: 2D or 3D images (channels are averaged); the moving image is resampled
            onto the fixed image's (isotropic) grid first, so differing grids are handled.
        model: ``translation`` (2D/3D), ``rigid`` or ``similarity`` (2D, log-polar).
        window_kind: apodization window; upsample: sub-voxel factor.
        n_angles: angular samples over half a turn for the log-polar step.

    Returns:
        :class:`PhaseRegistration` whose ``transform`` maps fixed world -> moving world.

    Convention:
        World LPS mm; the rotation centre is the fixed grid centre.
    """
    if model not in PHASE_MODELS:
        raise MedregError(f"unknown phase-correlation model {model!r}; choose from "
                          f"{', '.join(PHASE_MODELS)}")
    f, m = scalar_image(fixed), scalar_image(moving)
    if f.ndim != m.ndim:
        raise MedregError(f"fixed image is {f.ndim}D but moving image is {m.ndim}D")
    if model != "translation" and f.ndim != 2:
        raise MedregError(f"phase correlation recovers rotation/scale in 2D only; use "
                          f"model='translation' for {f.ndim}D images")
    grid = working_grid(f.grid)
    fa, ma = _on_grid(f, grid), _on_grid(m, grid)
    if model == "translation":
        return _translation_result(fa, ma, grid, f.grid, window_kind, upsample)
    return _similarity_result(fa, ma, grid, f.grid, model, window_kind, upsample, n_angles)


def _radius(grid: Grid) -> float:
    return float(np.max(grid.extent)) / 2.0


def _translation_result(fa, ma, grid: Grid, fixed_grid: Grid, window_kind: str,
                        upsample: int) -> PhaseRegistration:
    ps = phase_correlate(fa, ma, window_kind=window_kind, upsample=upsample)
    mat = np.eye(grid.ndim + 1)
    mat[:-1, -1] = grid.world_from_index[:-1, :-1] @ ps.shift
    t = linear_from_matrix("translation", mat, center=fixed_grid.center(),
                           radius=_radius(fixed_grid))
    info = {"shift_voxels": ps.shift.tolist(), "confidence": ps.confidence}
    return PhaseRegistration(t, ps.confidence, info)


def _tensor_order_matrix(m: np.ndarray) -> np.ndarray:
    """Homogeneous ``(x, y)`` index matrix -> the same map on ``(row, col)`` tensor indices."""
    d = m.shape[0] - 1
    lin = torch.from_numpy(np.ascontiguousarray(m[:d, :d]))
    lin_t = xyz_to_tensor_order(xyz_to_tensor_order(lin).T).T
    out = np.eye(d + 1)
    out[:d, :d] = lin_t.numpy()
    out[:d, d] = xyz_to_tensor_order(torch.from_numpy(m[:d, d].copy())).numpy()
    return out


def warp_index(arr: np.ndarray, index_map: np.ndarray) -> np.ndarray:
    """``out(p) = arr(index_map p)`` with linear interpolation, zero outside.

    Convention: ``index_map`` is ``(dim+1, dim+1)`` acting on ``(x, y[, z])`` voxel indices of
    one and the same grid (so it is a pure index-space warp, used for the undo step).
    """
    m = _tensor_order_matrix(index_map)
    d = arr.ndim
    return ndimage.affine_transform(arr, m[:d, :d], m[:d, d], order=1, mode="constant")


def _similarity_result(fa, ma, grid: Grid, fixed_grid: Grid, model: str, window_kind: str,
                       upsample: int, n_angles: int) -> PhaseRegistration:
    rs = estimate_rotation_scale(fa, ma, n_angles=n_angles, window_kind=window_kind)
    centre = (np.asarray(grid.size, float) - 1.0) / 2.0
    best = None
    for angle in (rs.angle, rs.angle + np.pi):
        undo = _index_similarity(angle, rs.scale, centre, np.zeros(2))
        ps = phase_correlate(fa, warp_index(ma, undo), window_kind=window_kind,
                             upsample=upsample)
        if best is None or ps.confidence > best[1].confidence:
            best = (angle, ps)
    angle, ps = best
    index_map = _index_similarity(angle, rs.scale, centre, ps.shift)
    world = grid.world_from_index @ index_map @ grid.index_from_world
    t = linear_from_matrix(model, world, center=fixed_grid.center(), radius=_radius(fixed_grid))
    angle = (angle + np.pi) % (2 * np.pi) - np.pi
    info = {"angle_deg": float(np.degrees(angle)), "scale_estimate": rs.scale,
            "shift_voxels": ps.shift.tolist(), "confidence": ps.confidence,
            "rotation_scale_confidence": rs.confidence}
    return PhaseRegistration(t, ps.confidence, info)
