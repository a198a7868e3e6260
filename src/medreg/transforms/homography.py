"""2D projective transform (homography) in world coordinates.

Convention:
    * Maps fixed world points to moving world points (LPS mm), 2D only:
      ``[u, v, w]^T = H [x, y, 1]^T`` and ``T(x, y) = (u / w, v / w)``.
    * ``H`` is a ``(3, 3)`` float64 matrix normalized so that ``H[2, 2] == 1`` when possible.
    * Not linear (``is_linear`` is False): :func:`medreg.resample.resample` maps every voxel
      centre through :meth:`Homography.forward`.
"""

from __future__ import annotations

import numpy as np
import torch

from medreg.errors import MedregError
from medreg.transforms.base import Transform


def _normalized(matrix: np.ndarray) -> np.ndarray:
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape != (3, 3):
        raise MedregError(f"a homography is a 3x3 matrix, got shape {m.shape}")
    if not np.all(np.isfinite(m)):
        raise MedregError("homography matrix has NaN or infinite entries")
    if abs(np.linalg.det(m)) < 1e-12 * max(np.abs(m).max(), 1.0) ** 3:
        raise MedregError(f"homography matrix is singular: {m.tolist()}")
    return m / m[2, 2] if abs(m[2, 2]) > 1e-12 else m


class Homography(Transform):
    """Planar projective transform ``T(x) = (H x~)_{1:2} / (H x~)_3`` (fixed -> moving world).

    Args:
        matrix: ``(3, 3)`` homogeneous matrix acting on world (x, y, 1) in mm.

    Attributes:
        ndim: always 2.
    """

    ndim = 2

    def __init__(self, matrix: np.ndarray | torch.Tensor | None = None) -> None:
        super().__init__()
        m = np.eye(3) if matrix is None else _normalized(
            torch.as_tensor(matrix).detach().cpu().numpy())
        self.register_buffer("h", torch.as_tensor(m, dtype=torch.float64))

    def matrix(self) -> torch.Tensor:
        """``(3, 3)`` float64 fixed-world -> moving-world homogeneous matrix."""
        return self.h

    def matrix_numpy(self) -> np.ndarray:
        return self.h.detach().cpu().numpy().copy()

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        """Map ``(..., 2)`` fixed world points to ``(..., 2)`` moving world points.

        Convention:
            Points ``(x, y)`` in LPS mm; division by the projective coordinate ``w``.
            Points on the horizon line (``w == 0``) map to ``inf``.
        """
        if points.shape[-1] != 2:
            raise MedregError(f"a 2D homography maps (..., 2) points, got shape "
                              f"{tuple(points.shape)}")
        m = self.h.to(points.dtype)
        hom = points @ m[:2, :2].T + m[:2, 2]
        w = points @ m[2, :2] + m[2, 2]
        return hom / w[..., None]

    def inverse(self) -> Homography:
        """Moving-world -> fixed-world homography (matrix inverse)."""
        return Homography(np.linalg.inv(self.matrix_numpy()))

    def extra_repr(self) -> str:
        return "H=" + np.array2string(self.matrix_numpy(), precision=5, separator=", ")

    @classmethod
    def from_index_matrix(cls, h_index: np.ndarray, fixed_grid, moving_grid) -> Homography:
        """World homography from one acting on pixel indices.

        Convention:
            ``h_index`` maps fixed (x, y) pixel indices to moving (x, y) pixel indices; the
            result is ``moving.world_from_index @ h_index @ fixed.index_from_world``.
        """
        m = moving_grid.world_from_index @ np.asarray(h_index, float) @ fixed_grid.index_from_world
        return cls(m)
