"""Reading X-rays (DICOM, NIfTI, PNG/TIFF, NumPy) and writing DRRs and overlay figures.

Convention: X-rays are returned as ``(H, W)`` float32 tensors with row ``v`` and column ``u``
of the detector (a file's first index axis is ``u``). ``kind="attenuation"`` images (bone bright,
like DRRs) are used as they are; ``kind="intensity"`` images (bone dark, raw detector counts)
become line integrals with ``-log(I / max(I))``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from medreg.errors import MedregError
from medreg.xray.geometry import CArmGeometry

KINDS = ("attenuation", "intensity")


def read_xray(path: str | Path, kind: str = "attenuation") -> torch.Tensor:
    """Read one X-ray -> ``(H, W)`` float32 line-integral image."""
    from medreg.io.images import read_image

    p = Path(path)
    if kind not in KINDS:
        raise MedregError(f"unknown X-ray kind {kind!r}; choose one of {list(KINDS)}")
    if p.suffix.lower() == ".npy":
        if not p.exists():
            raise MedregError(f"X-ray file not found: {p}")
        t = torch.as_tensor(np.load(p).astype(np.float32))
    else:
        img = read_image(p, dtype=torch.float32)
        t = img.tensor[0] if img.channels == 1 else img.tensor.mean(0)  # RGB PNG -> grey
    t = t.squeeze()
    if t.ndim != 2:
        raise MedregError(f"X-ray {p} must be one 2D image, got shape {tuple(t.shape)}")
    if kind == "intensity":
        t = -torch.log(torch.clamp(t / t.max().clamp(min=1e-12), min=1e-6))
    return t.contiguous()


def write_drr(drr: torch.Tensor, geometry: CArmGeometry, path: str | Path) -> Path:
    """Write a ``(H, W)`` DRR by suffix: NIfTI/MHA (pixel pitch kept), PNG (8-bit), ``.npy``."""
    from medreg.io.images import write_image
    from medreg.xray.drr import as_image

    p = Path(path)
    if p.suffix.lower() == ".npy":
        np.save(p, drr.detach().float().reshape(geometry.height, geometry.width).numpy())
        return p
    return write_image(as_image(drr, geometry), p)


def save_overlay(xray: torch.Tensor, drr: torch.Tensor, path: str | Path, *,
                 points: dict[str, np.ndarray] | None = None, title: str = "") -> Path:
    """X-ray in grey with the DRR's strongest edges in red (and optional point sets).

    Args:
        xray, drr: ``(H, W)`` images on the same detector.
        points: name -> ``(n, 2)`` pixel coordinates ``(u, v)`` to scatter.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = xray.detach().float().numpy()
    d = drr.detach().float().reshape(x.shape).numpy()
    gy, gx = np.gradient(d)
    mag = np.hypot(gx, gy)
    edges = np.ma.masked_less(mag, np.percentile(mag, 92))
    fig, ax = plt.subplots(figsize=(6, 6 * x.shape[0] / x.shape[1]))
    ax.imshow(x, cmap="gray")
    ax.imshow(edges, cmap="autumn", alpha=0.6)
    for (name, uv), marker in zip((points or {}).items(), "ox+^", strict=False):
        ax.scatter(uv[:, 0], uv[:, 1], s=18, marker=marker, label=name)
    if points:
        ax.legend(loc="lower right", fontsize=7)
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
