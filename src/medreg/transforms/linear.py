"""Linear transforms in world coordinates: translation, rigid, similarity, affine.

Convention:
    * Maps fixed world points to moving world points (LPS mm):
      ``T(x) = A (x - c) + c + t`` with centre of rotation ``c`` (ITK's MatrixOffset form).
    * Each transform holds one flat parameter vector ``params`` in *scaled* units: physical value
      = ``params / scales``. Rotation-like entries are scaled by ``radius`` (mm), so a unit step
      in any parameter moves points by about 1 mm; every optimizer then sees balanced steps
      (elastix's automatic scales, made explicit).
    * Layouts (physical units): translation ``[t]``; rigid ``[angle(s), t]`` with the 2D angle
      or the 3D rotation vector in radians; similarity ``[angle(s), t, log(scale)]``;
      affine ``[(A - I) row-major, t]``.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from medreg.transforms.base import Transform
from medreg.transforms.rotations import (
    nearest_rotation,
    rotation_2d,
    rotation_3d,
    rotvec_from_matrix,
)

_DTYPE = torch.float64  # parameters and matrices are kept in float64


def _vec(values: Sequence[float] | np.ndarray | torch.Tensor | None, n: int,
         name: str) -> torch.Tensor:
    if values is None:
        return torch.zeros(n, dtype=_DTYPE)
    t = torch.as_tensor(np.asarray(values, dtype=np.float64) if not isinstance(values, torch.Tensor)
                        else values.detach(), dtype=_DTYPE).reshape(-1)
    if t.numel() != n:
        raise ValueError(f"{name} needs {n} values, got {t.numel()}")
    return t.clone()


class LinearTransform(Transform):
    """Base of the matrix transforms ``T(x) = A (x - c) + c + t``.

    Args:
        ndim: 2 or 3.
        center: centre of rotation ``c`` in world mm (default origin).
        radius: mm scale of rotation-like parameters (typically half the image extent).
    """

    def __init__(self, ndim: int, center=None, radius: float = 100.0) -> None:
        super().__init__()
        if ndim not in (2, 3):
            raise ValueError(f"linear transforms are 2D or 3D, got ndim={ndim}")
        if not radius > 0:
            raise ValueError(f"parameter radius must be positive, got {radius}")
        self.ndim = ndim
        self.radius = float(radius)
        self.register_buffer("center", _vec(center, ndim, "center"))

    # -- subclasses define the layout
    @abc.abstractmethod
    def _linear_from_physical(self, p: torch.Tensor) -> torch.Tensor:
        """``(dim, dim)`` matrix ``A`` from the physical parameter vector."""

    @abc.abstractmethod
    def _translation_from_physical(self, p: torch.Tensor) -> torch.Tensor:
        """``(dim,)`` translation ``t`` from the physical parameter vector."""

    def _init_params(self, physical: torch.Tensor, scales: torch.Tensor) -> None:
        self.register_buffer("scales", scales.to(_DTYPE))
        self.params = nn.Parameter((physical * scales).to(_DTYPE))

    @property
    def physical(self) -> torch.Tensor:
        """Parameters in physical units (rad, mm, log-scale, matrix entries)."""
        return self.params / self.scales

    @property
    def is_linear(self) -> bool:
        return True

    def linear(self) -> torch.Tensor:
        """``(dim, dim)`` matrix ``A``."""
        return self._linear_from_physical(self.physical)

    def translation(self) -> torch.Tensor:
        """``(dim,)`` translation ``t`` in mm."""
        return self._translation_from_physical(self.physical)

    def linear_and_offset(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, o)``, ``(dim, dim)`` and ``(dim,)`` float64, with ``T(x) = A x + o``."""
        p = self.physical
        a = self._linear_from_physical(p)
        c = self.center
        return a, c + self._translation_from_physical(p) - a @ c

    def matrix(self) -> torch.Tensor:
        """``(dim+1, dim+1)`` homogeneous fixed-world -> moving-world matrix (float64)."""
        a, offset = self.linear_and_offset()
        top = torch.cat([a, offset[:, None]], dim=1)
        bottom = torch.zeros(1, self.ndim + 1, dtype=a.dtype, device=a.device)
        bottom[0, -1] = 1.0
        return torch.cat([top, bottom], dim=0)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        """``(..., dim)`` fixed world points -> ``(..., dim)`` moving world points."""
        m = self.matrix().to(points.dtype)
        return points @ m[:-1, :-1].T + m[:-1, -1]

    def inverse(self) -> Affine:
        inv = torch.linalg.inv(self.matrix().detach())
        return Affine.from_matrix(inv, center=self.center, radius=self.radius)

    def to_affine(self) -> Affine:
        return Affine.from_matrix(self.matrix().detach(), center=self.center, radius=self.radius)

    def matrix_numpy(self) -> np.ndarray:
        return self.matrix().detach().cpu().numpy()

    def extra_repr(self) -> str:
        vals = ", ".join(f"{v:.5g}" for v in self.physical.detach().cpu().tolist())
        return f"ndim={self.ndim}, physical=[{vals}]"


def _split_center(matrix: np.ndarray, center: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(A, t)`` such that ``M x = A (x - c) + c + t``."""
    d = matrix.shape[0] - 1
    a = matrix[:d, :d]
    t = matrix[:d, d] - center + a @ center
    return a, t


class Translation(LinearTransform):
    """Pure translation ``T(x) = x + t``."""

    def __init__(self, ndim: int, translation=None, center=None, radius: float = 100.0) -> None:
        super().__init__(ndim, center, radius)
        self._init_params(_vec(translation, ndim, "translation"), torch.ones(ndim, dtype=_DTYPE))

    def _linear_from_physical(self, p):
        return torch.eye(self.ndim, dtype=p.dtype, device=p.device)

    def _translation_from_physical(self, p):
        return p

    @classmethod
    def from_matrix(cls, matrix, center=None, radius: float = 100.0) -> Translation:
        m = np.asarray(torch.as_tensor(matrix).detach().cpu(), dtype=np.float64)
        d = m.shape[0] - 1
        return cls(d, translation=m[:d, d], center=center, radius=radius)


class Rigid(LinearTransform):
    """Rotation about ``center`` followed by translation. 2D: 1 angle; 3D: rotation vector."""

    def __init__(self, ndim: int, rotation=None, translation=None, center=None,
                 radius: float = 100.0) -> None:
        super().__init__(ndim, center, radius)
        nr = 1 if ndim == 2 else 3
        phys = torch.cat([_vec(rotation, nr, "rotation"), _vec(translation, ndim, "translation")])
        scales = torch.cat([torch.full((nr,), self.radius), torch.ones(ndim)])
        self._init_params(phys, scales)

    @property
    def n_rot(self) -> int:
        return 1 if self.ndim == 2 else 3

    def _rotation(self, p):
        r = p[: self.n_rot]
        return rotation_2d(r) if self.ndim == 2 else rotation_3d(r)

    def _linear_from_physical(self, p):
        return self._rotation(p)

    def _translation_from_physical(self, p):
        return p[self.n_rot: self.n_rot + self.ndim]

    @classmethod
    def from_matrix(cls, matrix, center=None, radius: float = 100.0) -> Rigid:
        """Nearest rigid transform to a homogeneous matrix (rotation by polar decomposition).

        The centre keeps its image ``T(c)``, so a near-rigid affine about the image centre
        becomes the rigid motion that best matches it there.
        """
        m = np.asarray(torch.as_tensor(matrix).detach().cpu(), dtype=np.float64)
        d = m.shape[0] - 1
        c = np.zeros(d) if center is None else np.asarray(torch.as_tensor(center).cpu(), float)
        a, t = _split_center(m, c)  # t keeps T(c): exact for rigid input, centred otherwise
        r = nearest_rotation(a)
        rot = [np.arctan2(r[1, 0], r[0, 0])] if d == 2 else rotvec_from_matrix(r)
        return cls(d, rotation=rot, translation=t, center=c, radius=radius)


class Similarity(Rigid):
    """Rigid plus one isotropic scale ``s = exp(log_scale)``."""

    def __init__(self, ndim: int, rotation=None, translation=None, scale: float = 1.0,
                 center=None, radius: float = 100.0) -> None:
        if not scale > 0:
            raise ValueError(f"similarity scale must be positive, got {scale}")
        LinearTransform.__init__(self, ndim, center, radius)
        nr = 1 if ndim == 2 else 3
        phys = torch.cat([_vec(rotation, nr, "rotation"), _vec(translation, ndim, "translation"),
                          torch.tensor([np.log(scale)], dtype=_DTYPE)])
        scales = torch.cat([torch.full((nr,), self.radius), torch.ones(ndim),
                            torch.tensor([self.radius])])
        self._init_params(phys, scales)

    def scale(self) -> torch.Tensor:
        return torch.exp(self.physical[-1])

    def _linear_from_physical(self, p):
        return torch.exp(p[-1]) * self._rotation(p)

    @classmethod
    def from_matrix(cls, matrix, center=None, radius: float = 100.0) -> Similarity:
        m = np.asarray(torch.as_tensor(matrix).detach().cpu(), dtype=np.float64)
        d = m.shape[0] - 1
        c = np.zeros(d) if center is None else np.asarray(torch.as_tensor(center).cpu(), float)
        a, t = _split_center(m, c)  # t keeps T(c)
        s = abs(np.linalg.det(a)) ** (1.0 / d)
        r = nearest_rotation(a / s)
        rot = [np.arctan2(r[1, 0], r[0, 0])] if d == 2 else rotvec_from_matrix(r)
        return cls(d, rotation=rot, translation=t, scale=s, center=c, radius=radius)


class Affine(LinearTransform):
    """General affine ``T(x) = A (x - c) + c + t``."""

    def __init__(self, ndim: int, linear=None, translation=None, center=None,
                 radius: float = 100.0) -> None:
        super().__init__(ndim, center, radius)
        a = torch.eye(ndim, dtype=_DTYPE) if linear is None else torch.as_tensor(
            np.asarray(torch.as_tensor(linear).detach().cpu(), dtype=np.float64)
        ).reshape(ndim, ndim)
        phys = torch.cat([(a - torch.eye(ndim, dtype=_DTYPE)).reshape(-1),
                          _vec(translation, ndim, "translation")])
        scales = torch.cat([torch.full((ndim * ndim,), self.radius), torch.ones(ndim)])
        self._init_params(phys, scales)

    def _linear_from_physical(self, p):
        d = self.ndim
        return p[: d * d].reshape(d, d) + torch.eye(d, dtype=p.dtype, device=p.device)

    def _translation_from_physical(self, p):
        return p[self.ndim * self.ndim:]

    @classmethod
    def from_matrix(cls, matrix, center=None, radius: float = 100.0) -> Affine:
        """Affine with a given ``(dim+1, dim+1)`` homogeneous matrix and centre."""
        m = np.asarray(torch.as_tensor(matrix).detach().cpu(), dtype=np.float64)
        d = m.shape[0] - 1
        if m.shape != (d + 1, d + 1) or d not in (2, 3):
            raise ValueError(f"affine matrix must be 3x3 (2D) or 4x4 (3D), got {m.shape}")
        c = np.zeros(d) if center is None else np.asarray(torch.as_tensor(center).cpu(), float)
        a, t = _split_center(m, c)
        return cls(d, linear=a, translation=t, center=c, radius=radius)


#: Linear transform classes by the names users type.
LINEAR_TRANSFORMS: dict[str, type[LinearTransform]] = {
    "translation": Translation,
    "rigid": Rigid,
    "similarity": Similarity,
    "affine": Affine,
}


def linear_from_matrix(kind: str, matrix, center=None, radius: float = 100.0) -> LinearTransform:
    """Build a ``kind`` transform closest to ``matrix`` (exact when the matrix is of that kind)."""
    try:
        cls = LINEAR_TRANSFORMS[kind]
    except KeyError:
        raise ValueError(f"unknown linear transform {kind!r}; choose from "
                         f"{', '.join(LINEAR_TRANSFORMS)}") from None
    return cls.from_matrix(matrix, center=center, radius=radius)
