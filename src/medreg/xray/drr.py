"""Digitally reconstructed radiographs: fast differentiable ray marching and a reference mode.

Convention:
    * A DRR pixel is the line integral (dimensionless) of ``mu = mu_water * max(0, 1 + HU/1000)``
      (``mu`` in 1/mm) along the ray from the source through the pixel centre.
    * Poses and pixels follow :mod:`medreg.xray.geometry`; DRR tensors are ``(B, 1, H, W)`` with
      row ``v`` and column ``u``.
    * Samples are taken at camera depths ``z_k = z_0 + (k + o) dz`` (``dz`` = ``step`` mm along the
      central axis, tied to the voxel size), trilinear interpolation through
      :func:`medreg.core.sampling.sample`; outside the CT ``mu = 0`` (air), which the sampler's
      zero padding gives exactly because the volume holds ``mu``, not HU.
    * ``o`` is a per-pixel offset in ``[0, 1)``: fixed and seeded (``jitter=True``), so the
      renderer is deterministic in the pose but its depth-aliasing error is decorrelated across
      pixels instead of forming pose-dependent moire bands.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medreg.core.grid import Grid
from medreg.core.image import Image
from medreg.core.sampling import sample
from medreg.errors import MedregError
from medreg.xray.geometry import CArmGeometry

#: Linear attenuation of water near 70 keV, 1/mm.
MU_WATER = 0.02


def mu_from_hu(hu: torch.Tensor, mu_water: float = MU_WATER) -> torch.Tensor:
    """``mu = mu_water * max(0, 1 + HU / 1000)`` (1/mm), same shape as ``hu``."""
    return mu_water * torch.clamp(1.0 + hu.float() / 1000.0, min=0.0)


def attenuation_volume(ct: Image, spacing: float | None = None,
                       mu_water: float = MU_WATER) -> Image:
    """CT in HU -> ``mu`` volume, optionally block-averaged to about ``spacing`` mm.

    Averaging whole blocks (integer factor per axis) keeps each block's attenuation, so line
    integrals are preserved up to the block's partial volume.

    Args:
        ct: 3D HU image ``(1, D, H, W)``.
        spacing: target voxel size in mm (``None``: keep the CT's grid).

    Returns:
        ``Image`` ``(1, D', H', W')`` float32 of ``mu`` in 1/mm on the coarser grid.
    """
    if ct.ndim != 3:
        raise MedregError(f"the CT must be a 3D image, got {ct.ndim}D")
    mu = mu_from_hu(ct.tensor[:1], mu_water)
    if spacing is None:
        return Image(mu, ct.grid)
    k = [max(1, int(round(spacing / s))) for s in ct.grid.spacing]  # (x, y, z)
    if k == [1, 1, 1]:
        return Image(mu, ct.grid)
    size = [n // f for n, f in zip(ct.grid.size, k, strict=True)]
    if min(size) < 2:
        raise MedregError(f"CT too small to resample to {spacing} mm")
    crop = mu[:, : size[2] * k[2], : size[1] * k[1], : size[0] * k[0]]
    pooled = F.avg_pool3d(crop[None], kernel_size=k[::-1])[0]
    g = ct.grid
    new_spacing = np.asarray(g.spacing) * k
    shift = (np.asarray(k) - 1) / 2.0 * np.asarray(g.spacing)
    origin = np.asarray(g.origin) + g.direction_matrix @ shift
    return Image(pooled.contiguous(), Grid(size, new_spacing, origin, g.direction))


def crop_to_body(volume: Image, mu_min: float = 0.1 * MU_WATER, margin: int = 1) -> Image:
    """Crop a ``mu`` volume to the bounding box of voxels above ``mu_min`` (plus ``margin``).

    Only air is removed (``mu_min`` defaults to HU -900), so every line integral is unchanged
    while rays get shorter. Raises when nothing is above the threshold.
    """
    t = volume.tensor[0]
    nz = (t > mu_min).nonzero()
    if nz.numel() == 0:
        raise MedregError("the CT holds no tissue above HU -900; is it in Hounsfield units?")
    lo = (nz.min(0).values - margin).clamp(min=0)  # tensor order (z, y, x)
    hi = torch.minimum(nz.max(0).values + margin + 1, torch.as_tensor(t.shape))
    crop = volume.tensor[:, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].contiguous()
    start = lo.flip(0).double().numpy()  # (x, y, z) index of the new voxel 0
    origin = volume.grid.index_to_world(start[None])[0]
    size = tuple(int(v) for v in (hi - lo).flip(0))
    return Image(crop, volume.grid.with_(size=size, origin=origin))


def detector_grid(geometry: CArmGeometry) -> Grid:
    """2D grid of the detector image: size ``(W, H)``, pixel pitch in mm, index = ``(u, v)``."""
    return Grid((geometry.width, geometry.height), (geometry.pixel_size,) * 2)


def pixel_uv(geometry: CArmGeometry, supersample: int = 1,
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Pixel (or sub-pixel) centres ``(H*s, W*s, 2)`` as ``(u, v)``; ``s = supersample``.

    Convention: sub-pixels of pixel ``(u, v)`` sit at ``u + (i + 0.5)/s - 0.5``; averaging
    ``s x s`` blocks gives the pixel's value.
    """
    s = int(supersample)
    off = (torch.arange(s, dtype=torch.float64) + 0.5) / s - 0.5
    u = (torch.arange(geometry.width, dtype=torch.float64)[:, None] + off).reshape(-1)
    v = (torch.arange(geometry.height, dtype=torch.float64)[:, None] + off).reshape(-1)
    vv, uu = torch.meshgrid(v, u, indexing="ij")
    return torch.stack([uu, vv], dim=-1).to(dtype)


def _depth_range(grid: Grid, poses: np.ndarray) -> tuple[float, float]:
    """Camera-depth interval ``[z0, z1]`` covering the volume's support for all poses."""
    lo, hi = -1.0, np.asarray(grid.size, float)  # trilinear support with zero padding
    corners = np.array([[a, b, c] for a in (lo, hi[0]) for b in (lo, hi[1]) for c in (lo, hi[2])])
    world = grid.index_to_world(corners)
    z = np.einsum("bj,nj->bn", poses[:, 2, :3], world) + poses[:, 2, 3:4]
    z0, z1 = float(z.min()), float(z.max())
    if z1 <= 1.0:
        raise MedregError("pose puts the whole CT behind the X-ray source")
    return max(z0, 1.0), z1


def march(mu: torch.Tensor, grid: Grid, poses: torch.Tensor, uv: torch.Tensor,
          geometry: CArmGeometry, *, step: float, offsets: torch.Tensor | None,
          depth: tuple[float, float] | None = None) -> torch.Tensor:
    """Line integrals of ``mu`` along the rays of ``uv`` for a batch of poses.

    Args:
        mu: ``(1, 1, D, H, W)`` attenuation (1/mm) on ``grid``.
        poses: ``(B, 4, 4)`` ``ct_to_camera`` (may require grad).
        uv: ``(h, w, 2)`` pixel coordinates ``(u, v)``.
        step: depth step ``dz`` in mm.
        offsets: ``(h, w)`` per-ray offsets in ``[0, 1)`` (``None``: 0.5, the midpoint rule).
        depth: ``(z0, z1)`` depth interval; computed from the volume's corners if ``None``.

    Returns:
        ``(B, 1, h, w)`` line integrals.
    """
    b = poses.shape[0]
    dtype = mu.dtype
    if depth is None:
        depth = _depth_range(grid, poses.detach().double().cpu().numpy())
    z0, z1 = depth
    n = max(1, math.ceil((z1 - z0) / step))
    f = geometry.focal
    d_cam = torch.stack([(uv[..., 0] - geometry.cu) / f, (uv[..., 1] - geometry.cv) / f,
                         torch.ones_like(uv[..., 0])], dim=-1).to(dtype)  # (h, w, 3)
    nfw = torch.as_tensor(grid.norm_from_world, dtype=dtype)
    p = poses.to(dtype)
    rot_t = p[:, :3, :3].transpose(1, 2)  # world_from_camera rotation
    lin = nfw[:3, :3] @ rot_t  # (B, 3, 3): camera -> norm (linear part)
    off = nfw[:3, 3] - (lin @ p[:, :3, 3:4])[..., 0]  # (B, 3)
    dirs = torch.einsum("hwj,bij->bhwi", d_cam, lin)  # (B, h, w, 3)
    o = offsets.to(dtype) if offsets is not None else torch.full(uv.shape[:2], 0.5, dtype=dtype)
    k = torch.arange(n, dtype=dtype).reshape(1, 1, 1, n, 1)
    start = (z0 + o * step)[None, ..., None, None] * dirs[:, :, :, None, :] \
        + off[:, None, None, None, :]  # (B, h, w, 1, 3)
    pts = torch.addcmul(start, k, dirs[:, :, :, None, :] * step)  # (B, h, w, n, 3)
    vals = sample(mu.expand(b, -1, -1, -1, -1), pts)  # (B, 1, h, w, n)
    ray_len = torch.linalg.norm(d_cam, dim=-1) * step  # mm per sample, (h, w)
    return vals.sum(-1) * ray_len


class DRRRenderer(nn.Module):
    """Fast differentiable DRR renderer for one CT and one C-arm geometry.

    Args:
        volume: ``mu`` image from :func:`attenuation_volume` ``(1, D, H, W)``.
        geometry: the detector.
        step_factor: depth step as a multiple of the smallest voxel spacing.
        jitter: per-pixel fixed random offsets (seeded) instead of the midpoint rule.
        seed: seed of the offsets.
    """

    def __init__(self, volume: Image, geometry: CArmGeometry, *, step_factor: float = 1.0,
                 jitter: bool = True, seed: int = 0) -> None:
        super().__init__()
        if not step_factor > 0:
            raise MedregError(f"step factor must be positive, got {step_factor}")
        self.grid = volume.grid
        self.geometry = geometry
        self.step = step_factor * min(volume.grid.spacing)
        self.register_buffer("mu", volume.tensor.float()[None].contiguous())
        self.register_buffer("uv", pixel_uv(geometry))
        gen = torch.Generator().manual_seed(seed)
        offsets = (torch.rand(geometry.height, geometry.width, generator=gen) if jitter
                   else torch.full((geometry.height, geometry.width), 0.5))
        self.register_buffer("offsets", offsets)

    def samples_per_ray(self) -> int:
        """Upper bound of the depth samples per ray: the volume's diagonal over the step."""
        diag = float(np.linalg.norm(np.asarray(self.grid.size) * np.asarray(self.grid.spacing)))
        return max(1, math.ceil(diag / self.step))

    def forward(self, poses: torch.Tensor | np.ndarray) -> torch.Tensor:
        """``(B, 4, 4)`` or ``(4, 4)`` poses -> ``(B, 1, H, W)`` DRRs."""
        p = torch.as_tensor(poses, dtype=torch.float64) if not isinstance(poses, torch.Tensor) \
            else poses
        if p.ndim == 2:
            p = p[None]
        if p.shape[-2:] != (4, 4):
            raise MedregError(f"poses must be (B, 4, 4), got {tuple(p.shape)}")
        return march(self.mu, self.grid, p, self.uv, self.geometry, step=self.step,
                     offsets=self.offsets)

    def render_many(self, poses: np.ndarray, batch: int = 4) -> torch.Tensor:
        """Render ``(K, 4, 4)`` poses without gradients, ``batch`` at a time -> ``(K, 1, H, W)``."""
        with torch.no_grad():
            return torch.cat([self(poses[i:i + batch]) for i in range(0, len(poses), batch)])


def render_reference(ct: Image, geometry: CArmGeometry, pose: np.ndarray, *,
                     step: float = 0.25, supersample: int = 2, mu_water: float = MU_WATER,
                     rows_per_chunk: int = 16, seed: int = 1) -> torch.Tensor:
    """High-fidelity DRR for making test X-rays (not used inside any optimizer).

    Differences from :class:`DRRRenderer`, on purpose (no "inverse crime"): the CT at its full
    resolution, a depth step of ``step`` mm (10x finer than a 2.5 mm renderer), random
    (not fixed) stratified offsets, and ``supersample x supersample`` rays per pixel averaged
    (the detector integrates over the pixel area).

    Args:
        ct: 3D HU image.
        pose: ``(4, 4)`` ``ct_to_camera``.

    Returns:
        ``(1, 1, H, W)`` float32 line integrals.
    """
    vol = attenuation_volume(ct, None, mu_water)
    mu = vol.tensor.float()[None]
    poses = torch.as_tensor(np.asarray(pose, float)[None])
    depth = _depth_range(vol.grid, poses.numpy())
    uv = pixel_uv(geometry, supersample)
    gen = torch.Generator().manual_seed(seed)
    rows = []
    with torch.no_grad():
        for r in range(0, uv.shape[0], rows_per_chunk):
            chunk = uv[r:r + rows_per_chunk]
            offs = torch.rand(chunk.shape[:2], generator=gen)
            rows.append(march(mu, vol.grid, poses, chunk, geometry, step=step, offsets=offs,
                              depth=depth))
    full = torch.cat(rows, dim=2)
    return F.avg_pool2d(full, supersample) if supersample > 1 else full


def as_image(drr: torch.Tensor, geometry: CArmGeometry) -> Image:
    """``(1, 1, H, W)`` or ``(H, W)`` DRR -> 2D :class:`Image` on :func:`detector_grid`."""
    t = drr.detach().float().reshape(1, geometry.height, geometry.width)
    return Image(t, detector_grid(geometry))
