"""Reading and writing images with their world geometry.

Convention:
    * Returned images live in LPS mm. NIfTI/MGH files (RAS in their headers) are converted
      here, once: ``world_lps = diag(-1, -1, 1) @ world_ras``.
    * NIfTI and MGH go through nibabel; MHA/MHD, NRRD, DICOM series (a folder or a single
      file), PNG/TIFF/JPEG and the other ITK formats go through SimpleITK.
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from medreg.core.grid import Grid
from medreg.core.image import Image
from medreg.errors import InputFileError
from medreg.io.atomic import atomic_write
from medreg.io.lazy import sitk

#: Flip between RAS (NIfTI) and LPS (ITK, DICOM, medreg) homogeneous coordinates.
LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

_NIBABEL_SUFFIXES = (".nii", ".nii.gz", ".mgz", ".mgh")
_SITK_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr", ".dcm", ".png", ".tif", ".tiff", ".jpg",
                  ".jpeg", ".bmp", ".vtk", ".gipl", ".hdr", ".img")

# numpy dtypes torch cannot hold well are widened once here.
_WIDEN = {np.dtype("uint16"): np.int32, np.dtype("uint32"): np.int64, np.dtype("int8"): np.int16,
          np.dtype("uint64"): np.int64, np.dtype("float16"): np.float32}


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for s in _NIBABEL_SUFFIXES + _SITK_SUFFIXES:
        if name.endswith(s):
            return s
    return path.suffix.lower()


def _tensor_from_array(arr: np.ndarray) -> torch.Tensor:
    arr = np.asarray(arr)
    if arr.dtype in _WIDEN:
        arr = arr.astype(_WIDEN[arr.dtype])
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    return torch.from_numpy(np.ascontiguousarray(arr))


def grid_from_affine_lps(affine: np.ndarray, size: tuple[int, ...]) -> Grid:
    """Grid from a ``(dim+1, dim+1)`` index->LPS matrix (columns scaled by spacing)."""
    d = len(size)
    lin = affine[:d, :d]
    spacing = np.linalg.norm(lin, axis=0)
    if np.any(spacing <= 0):
        raise InputFileError(f"image affine has a zero-length axis: {affine.tolist()}")
    return Grid(size, spacing, affine[:d, d], lin / spacing)


def read_image(path: str | os.PathLike, *, dtype: torch.dtype | None = None) -> Image:
    """Read an image file (or a DICOM series folder) into an LPS-world :class:`Image`.

    Args:
        path: file, or a folder holding one DICOM series.
        dtype: cast the data (default: keep the stored type, unsigned 16/32-bit widened).

    Returns:
        ``Image`` with tensor ``(C, [D,] H, W)``.
    """
    p = Path(path)
    if not p.exists():
        raise InputFileError(f"image file not found: {p}")
    try:
        if p.is_dir():
            image = _read_dicom_series(p)
        elif _suffix(p) in _NIBABEL_SUFFIXES:
            image = _read_nibabel(p)
        else:
            image = _read_sitk(p)
    except InputFileError:
        raise
    except Exception as exc:  # any reader failure becomes one clear line
        raise InputFileError(f"cannot read image {p}: {type(exc).__name__}: {exc}") from exc
    if image.grid.numel == 0:
        raise InputFileError(f"image {p} has zero voxels")
    return image.to(dtype) if dtype is not None else image


def _read_nibabel(p: Path) -> Image:
    img = nib.load(str(p))
    arr = np.asanyarray(img.dataobj)
    if arr.ndim < 3:
        arr = arr.reshape(arr.shape + (1,) * (3 - arr.ndim))
    spatial = arr.shape[:3]
    comps = int(np.prod(arr.shape[3:])) if arr.ndim > 3 else 1
    arr = arr.reshape(spatial + (comps,))  # (i, j, k, C)
    data = np.transpose(arr, (3, 2, 1, 0))  # (C, k, j, i) = (C, D, H, W)
    affine = LPS_FROM_RAS @ np.asarray(img.affine, dtype=np.float64)
    return Image(_tensor_from_array(data), grid_from_affine_lps(affine, spatial))


def _image_from_sitk(img: sitk.Image) -> Image:
    arr = sitk.GetArrayFromImage(img)  # (D, H, W[, C]) or (H, W[, C])
    d = img.GetDimension()
    if d not in (2, 3):
        raise InputFileError(f"only 2D and 3D images are supported, got {d}D")
    arr = np.moveaxis(arr, -1, 0) if img.GetNumberOfComponentsPerPixel() > 1 else arr[None]
    grid = Grid(img.GetSize(), img.GetSpacing(), img.GetOrigin(), img.GetDirection())
    return Image(_tensor_from_array(arr), grid)


def _read_sitk(p: Path) -> Image:
    return _image_from_sitk(sitk.ReadImage(str(p)))


def _read_dicom_series(p: Path) -> Image:
    reader = sitk.ImageSeriesReader()
    ids = reader.GetGDCMSeriesIDs(str(p))
    if not ids:
        raise InputFileError(f"no DICOM series found in folder {p}")
    if len(ids) > 1:
        raise InputFileError(f"folder {p} holds {len(ids)} DICOM series; give one series folder")
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(p), ids[0]))
    return _image_from_sitk(reader.Execute())


def to_sitk(image: Image) -> sitk.Image:
    """SimpleITK image with the same data and LPS geometry."""
    arr = image.numpy()
    vec = image.channels > 1
    arr = np.moveaxis(arr, 0, -1) if vec else arr[0]
    if arr.dtype == np.int64:
        arr = arr.astype(np.int32)
    out = sitk.GetImageFromArray(arr, isVector=vec)
    g = image.grid
    out.SetSpacing(g.spacing)
    out.SetOrigin(g.origin)
    out.SetDirection(g.direction)
    return out


def from_sitk(img: sitk.Image) -> Image:
    """:class:`Image` from a SimpleITK image (geometry kept, LPS)."""
    return _image_from_sitk(img)


def write_image(image: Image, path: str | os.PathLike) -> Path:
    """Write an image; the format follows the suffix. The file appears whole or not at all.

    NIfTI files get RAS headers (qform and sform, code 1) from the LPS grid.
    """
    p = Path(path)
    suffix = _suffix(p)
    if suffix not in _NIBABEL_SUFFIXES + _SITK_SUFFIXES:
        raise InputFileError(f"cannot write {p}: unknown image suffix {suffix!r}")

    def writer(tmp: str) -> None:
        if suffix in (".nii", ".nii.gz"):
            _write_nifti(image, Path(tmp))
            return
        data = image
        if suffix in (".png", ".jpg", ".jpeg", ".bmp") and image.ndim == 2:
            data = image.with_tensor(_to_uint8_or_16(image.tensor))
        sitk.WriteImage(to_sitk(data), tmp, useCompression=suffix in (".mha", ".nrrd"))

    atomic_write(p, writer)
    return p


def _to_uint8_or_16(t: torch.Tensor) -> torch.Tensor:
    if t.dtype in (torch.uint8,):
        return t
    t = t.detach().float()
    lo, hi = float(t.min()), float(t.max())
    return ((t - lo) / max(hi - lo, 1e-12) * 255).round().to(torch.uint8)


def _write_nifti(image: Image, path: Path) -> None:
    g = image.grid
    if g.ndim == 2:
        g3 = Grid(g.size + (1,), g.spacing + (1.0,), g.origin + (0.0,),
                  np.block([[g.direction_matrix, np.zeros((2, 1))], [np.zeros((1, 2)), 1.0]]))
        data = image.numpy()[:, None]
    else:
        g3, data = g, image.numpy()
    arr = np.transpose(data, (3, 2, 1, 0))  # (i, j, k, C)
    if arr.shape[-1] == 1:
        arr = arr[..., 0]
    else:
        arr = arr[:, :, :, None, :]  # NIfTI vector: 5th dim holds components
    if arr.dtype == np.int64:
        arr = arr.astype(np.int32)
    affine = LPS_FROM_RAS @ g3.world_from_index  # the flip is its own inverse
    nii = nib.Nifti1Image(arr, affine)
    nii.set_qform(affine, code=1)
    nii.set_sform(affine, code=1)
    if arr.ndim == 5:
        nii.header.set_intent("vector")
    nib.save(nii, str(path))
