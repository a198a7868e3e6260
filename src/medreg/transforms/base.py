"""Transform base classes.

Convention:
    * A transform maps **fixed-space world points to moving-space world points** (LPS mm):
      ``warped(x) = moving(T(x))``, as in ITK.
    * Points are ``(..., dim)`` tensors ordered ``(x, y[, z])``.
"""

from __future__ import annotations

import abc

import torch
from torch import nn


class Transform(nn.Module, abc.ABC):
    """A spatial transform ``T: fixed world -> moving world``.

    Subclasses implement :meth:`forward` on ``(..., dim)`` points and may implement
    :meth:`inverse`.
    """

    ndim: int

    @abc.abstractmethod
    def forward(self, points: torch.Tensor) -> torch.Tensor:
        """``(..., dim)`` fixed world points -> ``(..., dim)`` moving world points."""

    @property
    def is_linear(self) -> bool:
        return False

    def inverse(self) -> Transform:  # pragma: no cover - overridden where it exists
        raise TypeError(f"{type(self).__name__} has no closed-form inverse")


def parameter_dtype(transform: Transform, default: torch.dtype = torch.float32) -> torch.dtype:
    """dtype of a transform's first floating parameter or buffer (points are cast to it)."""
    for p in transform.parameters():
        return p.dtype
    for b in transform.buffers():
        if b.is_floating_point():
            return b.dtype
    return default


class Compose(Transform):
    """Apply transforms in the listed order: ``Compose(a, b)(x) = b(a(x))``.

    With ``a`` a deformable part and ``b`` an affine this is ANTs' ``A(x + u(x))`` ordering:
    the first transform acts on fixed-space points.
    """

    def __init__(self, *transforms: Transform) -> None:
        super().__init__()
        flat: list[Transform] = []
        for t in transforms:
            flat.extend(t.parts if isinstance(t, Compose) else [t])
        if not flat:
            raise ValueError("Compose needs at least one transform")
        dims = {t.ndim for t in flat}
        if len(dims) != 1:
            raise ValueError(f"cannot compose transforms of different dimensions {sorted(dims)}")
        self.ndim = flat[0].ndim
        self.parts = nn.ModuleList(flat)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        for t in self.parts:
            points = t(points)
        return points

    @property
    def is_linear(self) -> bool:
        return all(t.is_linear for t in self.parts)

    def matrix(self) -> torch.Tensor:
        """``(dim+1, dim+1)`` homogeneous matrix when every part is linear."""
        if not self.is_linear:
            raise TypeError("Compose.matrix() needs every part to be linear")
        m = self.parts[0].matrix()
        for t in self.parts[1:]:
            m = t.matrix() @ m
        return m

    def inverse(self) -> Transform:
        return Compose(*[t.inverse() for t in reversed(self.parts)])
