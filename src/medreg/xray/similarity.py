"""2D image similarities for X-ray / DRR comparison (higher is better, 1 = identical).

Convention: images are ``(B, 1, H, W)``; the fixed X-ray ``(1, 1, H, W)`` broadcasts over the
batch of DRRs. Every function returns ``(B,)``. All are invariant to a positive affine change of
intensities, which is what DRR-vs-X-ray comparison needs.

Global NCC is :func:`medreg.metrics.functional.ncc` (a loss, ``1 - NCC``), turned into a
per-DRR similarity here. LNCC is not the shared one on purpose: the shared LNCC averages the
*squared* local correlation (ANTs' CC, for inverted contrast between modalities) with an
absolute variance floor of 1e-5, while a DRR is never an inverted X-ray, so anti-correlated
windows must count against a pose, and the floor would weigh flat windows differently with
the X-ray's units (line integrals of 0-8 here). Gradient NCC is X-ray specific.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from medreg.errors import MedregError
from medreg.metrics import functional

_EPS = 1e-8


def ncc(fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
    """Global normalized cross-correlation in ``[-1, 1]`` of each DRR -> ``(B,)``."""
    return torch.stack([1.0 - functional.ncc(fixed, m[None]) for m in moving])


def lncc(fixed: torch.Tensor, moving: torch.Tensor, window: int = 9) -> torch.Tensor:
    """Mean of local NCC over ``window x window`` patches (box filter, odd size) -> ``(B,)``."""
    if window < 3 or window % 2 == 0:
        raise MedregError(f"LNCC window must be odd and >= 3, got {window}")
    f, m = torch.broadcast_tensors(fixed, moving)

    def box(x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, window, stride=1)

    mf, mm = box(f), box(m)
    vf = box(f * f) - mf * mf
    vm = box(m * m) - mm * mm
    cov = box(f * m) - mf * mm
    return (cov / torch.sqrt(vf.clamp(min=0) * vm.clamp(min=0) + _EPS)).mean(dim=(1, 2, 3))


def _gradients(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=x.dtype)
    gx = F.conv2d(x, kx.reshape(1, 1, 3, 3))
    gy = F.conv2d(x, kx.T.reshape(1, 1, 3, 3))
    return gx, gy


def gradncc(fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
    """Gradient correlation: mean NCC of the Sobel x and y derivatives -> ``(B,)``."""
    fx, fy = _gradients(fixed)
    mx, my = _gradients(moving)
    return 0.5 * (ncc(fx, mx) + ncc(fy, my))


#: A similarity: ``(fixed (1, 1, H, W), moving (B, 1, H, W)) -> (B,)``, higher is better.
Metric = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

METRICS: dict[str, Metric] = {
    "ncc": ncc, "lncc": lncc, "gradncc": gradncc}


def get_metric(name: str) -> Metric:
    """Look up a similarity by name (``ncc``, ``lncc``, ``gradncc``)."""
    try:
        return METRICS[name.lower()]
    except KeyError:
        raise MedregError(f"unknown X-ray metric {name!r}; choose one of {sorted(METRICS)}") \
            from None
