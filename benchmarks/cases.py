"""Benchmark cases for linear registration built from the MNI152 2009a T1 template.

Each case is a folder holding ``fixed.nii.gz``, ``moving.nii.gz``, ``mask.nii.gz`` (brain mask on
the fixed grid) and ``case.json`` (the true fixed->moving 4x4 LPS matrix and how the case was
made). Every peer tool reads the same files.

Convention:
    * World = LPS mm; ``truth`` maps fixed points to moving points: ``moving(T(x)) ~ fixed(x)``,
      so the moving image is the template resampled through ``T^-1``.
    * The moving image gets Gaussian noise and a smooth multiplicative bias field; the
      multi-modal variant also gets a non-monotonic intensity remap.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from scipy.spatial.transform import Rotation

from medreg import Affine, Grid, Image, read_image, resample, write_image

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MNI_DIR = SHARED / "brain" / "mni152_2009a"
T1 = MNI_DIR / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
GM = MNI_DIR / "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz"
WM = MNI_DIR / "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"


@dataclass(frozen=True)
class CaseSpec:
    """How to build one case.

    Attributes:
        name: folder name.
        spacing: isotropic voxel size of both images (mm).
        modality: ``"mono"`` or ``"multi"`` (non-monotonic intensity remap of the moving image).
        rotation_deg: Euler angles (x, y, z) of the true rotation.
        translation_mm: true translation.
        scales: axis scales; shear: (xy, xz, yz) shear terms.
        noise: Gaussian noise std as a fraction of the 99th intensity percentile.
        bias: peak amplitude of the multiplicative bias field (fraction).
        seed: seed for noise and bias.
    """

    name: str
    spacing: float
    modality: str = "mono"
    rotation_deg: tuple[float, float, float] = (6.0, -8.0, 7.0)
    translation_mm: tuple[float, float, float] = (7.0, -6.0, 9.0)
    scales: tuple[float, float, float] = (1.04, 0.96, 1.02)
    shear: tuple[float, float, float] = (0.03, -0.02, 0.015)
    noise: float = 0.03
    bias: float = 0.15
    seed: int = 0


CASES = {
    "mono-2mm": CaseSpec("mono-2mm", 2.0, "mono"),
    "multi-2mm": CaseSpec("multi-2mm", 2.0, "multi"),
    "mono-1mm": CaseSpec("mono-1mm", 1.0, "mono"),
    "multi-1mm": CaseSpec("multi-1mm", 1.0, "multi"),
    # diagnostic: the same affine without noise or bias field (the accuracy floor of the case)
    "clean-2mm": CaseSpec("clean-2mm", 2.0, "mono", noise=0.0, bias=0.0),
}


def true_matrix(spec: CaseSpec, center: np.ndarray) -> np.ndarray:
    """``(4, 4)`` fixed->moving LPS matrix: scale, shear, rotation about ``center``, shift."""
    rot = Rotation.from_euler("xyz", spec.rotation_deg, degrees=True).as_matrix()
    sxy, sxz, syz = spec.shear
    shear = np.array([[1.0, sxy, sxz], [0.0, 1.0, syz], [0.0, 0.0, 1.0]])
    a = rot @ shear @ np.diag(spec.scales)
    m = np.eye(4)
    m[:3, :3] = a
    m[:3, 3] = center + np.asarray(spec.translation_mm) - a @ center
    return m


def _target_grid(grid: Grid, spacing: float) -> Grid:
    """Grid of the same extent and direction at an isotropic ``spacing``."""
    return grid.downsample(spacing / min(grid.spacing)) if spacing > min(grid.spacing) else grid


def _smooth_to(image: Image, grid: Grid) -> Image:
    """Anti-aliased resampling of ``image`` onto a coarser ``grid`` (no transform)."""
    ratio = np.asarray(grid.spacing) / np.asarray(image.grid.spacing)
    sigma = np.sqrt(np.maximum(ratio**2 - 1.0, 0.0)) / 2.0  # voxels of the source grid
    if np.any(sigma > 0):
        data = ndimage.gaussian_filter(image.numpy()[0].astype(np.float64), sigma[::-1])
        image = image.with_tensor(torch.from_numpy(data)[None])
    return resample(image.to(torch.float64), grid, interpolation="linear")


def _bias_field(grid: Grid, amplitude: float, rng: np.random.Generator) -> np.ndarray:
    """Smooth multiplicative field ``exp(sum of low-order terms)``, about +-``amplitude``."""
    pts = grid.world_points(torch.float64).numpy()
    c = grid.center()
    r = (pts - c) / (np.asarray(grid.extent) / 2.0)
    coef = rng.uniform(-1.0, 1.0, 6)
    field = (coef[0] * r[..., 0] + coef[1] * r[..., 1] + coef[2] * r[..., 2]
             + coef[3] * r[..., 0] * r[..., 1] + coef[4] * r[..., 2] ** 2
             + coef[5] * np.sin(np.pi * r[..., 1]))
    field = field / max(np.abs(field).max(), 1e-9)
    return np.exp(np.log1p(amplitude) * field)


def remap_multimodal(data: np.ndarray, scale: float) -> np.ndarray:
    """Non-monotonic intensity remap: ``v -> 0.8 * 4 v (1 - v) + 0.2 v`` on ``v = data/scale``.

    Background stays dark, grey matter becomes brightest and white matter darker than grey
    matter, so no monotonic function relates the two images (MI is needed).
    """
    v = np.clip(data / scale, 0.0, 1.2)
    return scale * (0.8 * 4.0 * v * (1.0 - v) + 0.2 * v)


def brain_mask(grid: Grid) -> Image:
    """Brain mask on ``grid``: GM + WM probability > 0.5 (uint8)."""
    gm = read_image(GM).to(torch.float64)
    wm = read_image(WM).to(torch.float64)
    prob = gm.with_tensor((gm.tensor + wm.tensor) / 255.0)
    prob = resample(prob, grid, interpolation="linear")
    return prob.with_tensor((prob.tensor > 0.5).to(torch.uint8))


def build_case(spec: CaseSpec, root: Path) -> Path:
    """Write the case folder (cached: an existing complete folder is reused)."""
    out = root / spec.name
    meta_path = out / "case.json"
    if meta_path.exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(spec.seed)
    t1 = read_image(T1).to(torch.float64)
    grid = _target_grid(t1.grid, spec.spacing)
    truth = true_matrix(spec, grid.center())
    moving_hr = resample(t1, t1.grid, Affine.from_matrix(np.linalg.inv(truth)),
                         interpolation="bspline")
    fixed = _smooth_to(t1, grid)
    moving = _smooth_to(moving_hr, grid)
    scale = float(np.percentile(fixed.numpy(), 99))
    fdata = fixed.numpy()[0] + rng.normal(0, spec.noise * scale, grid.shape)
    mdata = moving.numpy()[0] * _bias_field(grid, spec.bias, rng)
    if spec.modality == "multi":
        mdata = remap_multimodal(mdata, scale)
    mdata = mdata + rng.normal(0, spec.noise * scale, grid.shape)
    write_image(Image(torch.from_numpy(np.clip(fdata, 0, None)).float()[None], grid),
                out / "fixed.nii.gz")
    write_image(Image(torch.from_numpy(np.clip(mdata, 0, None)).float()[None], grid),
                out / "moving.nii.gz")
    write_image(brain_mask(grid), out / "mask.nii.gz")
    meta = dict(name=spec.name, spacing=spec.spacing, modality=spec.modality,
                truth=truth.tolist(), spec=spec.__dict__)
    meta_path.write_text(json.dumps(meta, indent=1))
    return out


def mask_points(case_dir: Path) -> np.ndarray:
    """``(n, 3)`` LPS world positions of the brain-mask voxels of the fixed grid."""
    mask = read_image(case_dir / "mask.nii.gz")
    idx = np.argwhere(mask.numpy()[0] > 0)[:, ::-1].astype(np.float64)  # (z,y,x) -> (x,y,z)
    return mask.grid.index_to_world(idx)


def displacement_error(estimate: np.ndarray, truth: np.ndarray,
                       points: np.ndarray) -> tuple[float, float]:
    """Mean and 95th percentile of ``|T_est(x) - T_true(x)|`` (mm) over ``points``."""
    homo = np.c_[points, np.ones(len(points))]
    diff = homo @ (np.asarray(estimate) - np.asarray(truth)).T
    err = np.linalg.norm(diff[:, :3], axis=1)
    return float(err.mean()), float(np.percentile(err, 95))
