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
import numpy as np
import torch

from medreg.core.grid import Grid
from medreg.core.image import Image
from medreg.deformable.transforms import DisplacementField, dense_from_transform
from medreg.errors import InputFileError, MedregError
from medreg.io.images import from_sitk, read_image, to_sitk, write_image
from medreg.io.lazy import sitk
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


def read_field_transform(path: str | os.PathLike) -> DisplacementField:
    """Hook for :func:`medreg.io.transforms.load_transform`: a field image as a transform."""
    return read_displacement_field(path)


def transform_from_sitk(tx: sitk.Transform) -> DisplacementField:
    """medreg transform from a SimpleITK ``DisplacementFieldTransform`` or ``BSplineTransform``.

    Displacement fields are taken as they are; B-spline transforms are sampled (in C++, by
    ``TransformToDisplacementField``) on their own domain at a quarter of the control spacing.
    """
    tx = tx.Downcast()
    if isinstance(tx, sitk.DisplacementFieldTransform):
        img = tx.GetDisplacementField()
    elif isinstance(tx, sitk.BSplineTransform):
        mesh = np.asarray(tx.GetTransformDomainMeshSize())
        phys = np.asarray(tx.GetTransformDomainPhysicalDimensions())
        spacing = phys / (4 * mesh)
        size = [int(v) for v in np.round(phys / spacing) + 1]
        img = sitk.TransformToDisplacementField(
            tx, sitk.sitkVectorFloat64, size, tx.GetTransformDomainOrigin(), spacing.tolist(),
            tx.GetTransformDomainDirection())
    else:
        raise MedregError(f"ITK transform {tx.GetName()} is not a displacement field or B-spline")
    image = from_sitk(img)
    return DisplacementField(image.grid, image.tensor[None].float().contiguous())


def transform_to_sitk(transform: Transform) -> sitk.DisplacementFieldTransform:
    """SimpleITK ``DisplacementFieldTransform`` equal to a deformable medreg transform.

    The transform is sampled on its own grid (``transform.grid``: the fixed image grid for
    fields, velocity fields and B-spline FFDs).
    """
    grid = getattr(transform, "grid", None)
    if grid is None:
        raise MedregError(f"{type(transform).__name__} has no grid to sample a displacement "
                          "field on; write it with write_displacement_field(transform, grid)")
    field = dense_from_transform(transform, grid, torch.float64).field
    img = to_sitk(Image(field[0], grid))
    return sitk.DisplacementFieldTransform(sitk.Cast(img, sitk.sitkVectorFloat64))
