"""Regularizers of displacement / velocity fields, with derivatives in world millimetres.

Convention:
    * Fields are ``(1, dim, *S)`` on a :class:`Grid`, vectors in mm ordered (x, y[, z]).
    * Derivatives are taken per mm (not per voxel) and energies are volume averages, so a
      weight means the same thing at every resolution and voxel size:
      diffusion and TV are dimensionless, bending is in mm^-2, elastic is dimensionless.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import nn

from medreg.core.grid import Grid
from medreg.deformable.fields import jacobian_matrix
from medreg.errors import MedregError


def _index_gradients(u: torch.Tensor, grid: Grid) -> torch.Tensor:
    """``(dim_axes, C, *S)``: derivative per mm along each index axis (coordinate order)."""
    d = grid.ndim
    out = []
    for a in range(d):
        tax = 1 + d - 1 - a  # inside (C, *S)
        if u.shape[tax] > 1:
            out.append(torch.gradient(u, spacing=float(grid.spacing[a]), dim=tax)[0])
        else:
            out.append(torch.zeros_like(u))
    return torch.stack(out)


def diffusion(disp: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Mean ``sum_ij (du_i/dx_j)^2`` (membrane energy; rotation invariant)."""
    return _index_gradients(disp[0], grid).pow(2).sum((0, 1)).mean()


def bending(disp: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Mean ``sum_i sum_ab (d2 u_i / dx_a dx_b)^2`` (thin-plate bending energy, mm^-2)."""
    g = _index_gradients(disp[0], grid)  # (a, C, *S)
    h = torch.stack([_index_gradients(g[a], grid) for a in range(grid.ndim)])  # (a, b, C, *S)
    return h.pow(2).sum((0, 1, 2)).mean()


def linear_elastic(disp: torch.Tensor, grid: Grid, mu: float = 1.0, lam: float = 1.0
                   ) -> torch.Tensor:
    """Mean ``mu |eps|_F^2 + lam / 2 tr(eps)^2`` with ``eps = (grad u + grad u^T) / 2``."""
    j = jacobian_matrix(disp, grid) - torch.eye(grid.ndim, dtype=disp.dtype, device=disp.device)
    eps = 0.5 * (j + j.transpose(-1, -2))
    tr = torch.diagonal(eps, dim1=-2, dim2=-1).sum(-1)
    return (mu * eps.pow(2).sum((-1, -2)) + 0.5 * lam * tr.pow(2)).mean()


def total_variation(disp: torch.Tensor, grid: Grid, eps: float = 1e-3) -> torch.Tensor:
    """Mean ``sqrt(sum_ij (du_i/dx_j)^2 + eps^2)`` (isotropic TV of the field)."""
    return (_index_gradients(disp[0], grid).pow(2).sum((0, 1)) + eps**2).sqrt().mean()


def folding(disp: torch.Tensor, grid: Grid, threshold: float = 0.05) -> torch.Tensor:
    """Mean ``relu(threshold - det J)^2``: zero unless the local volume ratio drops below it."""
    det = torch.linalg.det(jacobian_matrix(disp, grid))
    return torch.relu(threshold - det).pow(2).mean()


@dataclass(frozen=True)
class RegularizerWeights:
    """Weights of each energy (physical units, see module docstring); 0 switches it off."""

    diffusion: float = 0.0
    bending: float = 0.0
    elastic: float = 0.0
    tv: float = 0.0
    folding: float = 0.0
    mu: float = 1.0
    lam: float = 1.0

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if not (isinstance(v, (int, float)) and v >= 0 and v == v and v != float("inf")):
                raise MedregError(f"regularizer weight {f.name} must be a finite number >= 0, "
                                  f"got {v!r}")

    @property
    def active(self) -> bool:
        """True when any energy has a non-zero weight."""
        return any((self.diffusion, self.bending, self.elastic, self.tv, self.folding))


class FieldRegularizer(nn.Module):
    """Weighted sum of the energies above: ``forward(disp, grid) -> scalar``."""

    def __init__(self, weights: RegularizerWeights | None = None) -> None:
        super().__init__()
        self.weights = weights or RegularizerWeights()

    def forward(self, disp: torch.Tensor, grid: Grid) -> torch.Tensor:
        w = self.weights
        total = disp.new_zeros(())
        if w.diffusion:
            total = total + w.diffusion * diffusion(disp, grid)
        if w.bending:
            total = total + w.bending * bending(disp, grid)
        if w.elastic:
            total = total + w.elastic * linear_elastic(disp, grid, w.mu, w.lam)
        if w.tv:
            total = total + w.tv * total_variation(disp, grid)
        if w.folding:
            total = total + w.folding * folding(disp, grid)
        return total
