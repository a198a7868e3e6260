"""Displacement-field files in the ITK / ANTs convention.

Convention:
    * The file stores, at every voxel centre ``x`` of its grid (the fixed image grid), the
      vector ``T(x) - x`` in world LPS millimetres (fixed -> moving), components ordered
      (x, y[, z]): exactly what SimpleITK's ``DisplacementFieldTransform`` and ANTs'
      ``antsApplyTransforms`` read.
    * NIfTI: 5D ``(i, j, k, 1, dim)`` float32 with intent ``NIFTI_INTENT_VECTOR`` (1007) and
      a RAS header made from the LPS grid by :mod:`medreg.io.images`. ITK (5.4) keeps the
      components of VECTOR files as they are (LPS) and converts only files with intent
      ``NIFTI_INTENT_DISPVECT`` (1006) from RAS; we write the former and read both.
    * MHA / NRRD go through SimpleITK (LPS throughout).
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import torch

from medreg.core.grid import Grid
from medreg.core.image import Image
from medreg.deformable.transforms import DisplacementField, dense_from_transform
from medreg.errors import InputFileError, MedregError
from medreg.io.images import read_image, write_image
from medreg.transforms.base import Transform

NIFTI_INTENT_DISPVECT = 1006


def write_displacement_field(transform: Transform, grid: Grid, path: str | os.PathLike) -> Path:
    """Write the full mapping ``T`` as a displacement field sampled on ``grid``.

    Args:
        transform: any fixed->moving transform (linear parts are folded in).
        grid: where to sample (normally the fixed image grid).
        path: ``.nii``/``.nii.gz`` (ITK/ANTs layout, see module docstring), ``.mha``, ``.nrrd``.

    Returns:
        the written path (the file appears whole or not at all).
    """
    if transform.ndim != grid.ndim:
        raise MedregError(f"a {transform.ndim}D transform cannot be written on a {grid.ndim}D grid")
    field = dense_from_transform(transform, grid, torch.float32).field
    return write_image(Image(field[0], grid), path)


def _is_ras_dispvect(path: Path) -> bool:
    name = path.name.lower()
    if not (name.endswith(".nii") or name.endswith(".nii.gz")):
        return False
    return int(nib.load(str(path)).header["intent_code"]) == NIFTI_INTENT_DISPVECT


def read_displacement_field(path: str | os.PathLike) -> DisplacementField:
    """Read an ITK/ANTs displacement field file as a :class:`DisplacementField` transform.

    Raises:
        InputFileError: unreadable file, or a file that is not a 2- or 3-component vector
            image matching its dimension.
    """
    p = Path(path)
    image = read_image(p, dtype=torch.float32)
    grid, data = image.grid, image.tensor
    if grid.ndim == 3 and grid.size[2] == 1 and image.channels == 2:  # 2D field stored in NIfTI
        d2 = grid.direction_matrix[:2, :2]
        grid = Grid(grid.size[:2], grid.spacing[:2], grid.origin[:2], d2)
        data = data[:, 0]
    if image.channels != grid.ndim:
        raise InputFileError(f"{p} is not a displacement field: {image.channels} component(s) "
                             f"per voxel in a {grid.ndim}D image (need {grid.ndim})")
    if _is_ras_dispvect(p):
        flip = torch.ones(grid.ndim)
        flip[:2] = -1
        data = data * flip.reshape(-1, *([1] * grid.ndim))
    return DisplacementField(grid, data[None].contiguous())
