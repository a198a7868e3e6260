"""``Image``: a tensor plus one immutable :class:`~medreg.core.grid.Grid`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from medreg.core.grid import Grid


@dataclass(frozen=True, eq=False)
class Image:
    """An image in world space.

    Attributes:
        tensor: ``(C, [D,] H, W)`` data; spatial shape equals ``grid.shape``.
        grid: the image geometry.

    Images are immutable in spirit: every method returns a new ``Image`` and never edits the
    caller's tensor.
    """

    tensor: torch.Tensor
    grid: Grid

    def __post_init__(self) -> None:
        t = self.tensor
        if not isinstance(t, torch.Tensor):
            object.__setattr__(self, "tensor", t := torch.as_tensor(np.asarray(t)))
        if t.ndim != self.grid.ndim + 1:
            raise ValueError(
                f"image tensor must be (C, *spatial) with {self.grid.ndim} spatial dims, "
                f"got shape {tuple(t.shape)}"
            )
        if tuple(t.shape[1:]) != self.grid.shape:
            raise ValueError(
                f"image tensor spatial shape {tuple(t.shape[1:])} does not match grid shape "
                f"{self.grid.shape}"
            )

    # ----------------------------------------------------------------- constructors
    @classmethod
    def from_numpy(
        cls, array: np.ndarray, grid: Grid | None = None, *, channels: bool = False, **geometry
    ) -> Image:
        """Build an image from a ``([C,] [D,] H, W)`` array in tensor axis order.

        Args:
            array: data; ``channels=True`` means the first axis is C.
            grid: geometry; or give ``spacing=``, ``origin=``, ``direction=`` keywords.
        """
        arr = np.asarray(array)
        if not channels:
            arr = arr[None]
        if grid is None:
            from medreg.core.axes import size_from_shape

            grid = Grid(size_from_shape(arr.shape[1:]), **geometry)
        return cls(torch.from_numpy(np.ascontiguousarray(arr)), grid)

    # ----------------------------------------------------------------- properties
    @property
    def ndim(self) -> int:
        return self.grid.ndim

    @property
    def channels(self) -> int:
        return int(self.tensor.shape[0])

    @property
    def dtype(self) -> torch.dtype:
        return self.tensor.dtype

    @property
    def device(self) -> torch.device:
        return self.tensor.device

    @property
    def batch(self) -> torch.Tensor:
        """The tensor with a batch axis: ``(1, C, [D,] H, W)``."""
        return self.tensor[None]

    # ----------------------------------------------------------------- conversions
    def with_tensor(self, tensor: torch.Tensor) -> Image:
        """Same grid, new data ``(C, *spatial)``."""
        return Image(tensor, self.grid)

    def to(self, *args, **kwargs) -> Image:
        return Image(self.tensor.to(*args, **kwargs), self.grid)

    def float(self) -> Image:
        return self.to(torch.float32)

    def numpy(self) -> np.ndarray:
        """``(C, *spatial)`` numpy copy (detached, on CPU)."""
        return self.tensor.detach().cpu().numpy().copy()

    def check_finite(self, name: str = "image") -> Image:
        """Raise ``ValueError`` naming ``name`` if any voxel is NaN or infinite."""
        t = self.tensor  # a finite sum proves every voxel finite (a NaN or Inf would carry)
        if t.is_floating_point() and not (torch.isfinite(t.sum()) or torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(f"{name} contains {bad} NaN/Inf voxels; clean or mask them first")
        return self

    def __repr__(self) -> str:
        return f"Image(shape={tuple(self.tensor.shape)}, dtype={self.dtype}, {self.grid!r})"
