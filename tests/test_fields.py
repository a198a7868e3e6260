"""Displacement-field files: ITK/ANTs layout, read back by SimpleITK, round trips."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from medreg.core.grid import Grid
from medreg.deformable.synthetic import random_velocity
from medreg.errors import InputFileError, MedregError
from medreg.io.fields import read_displacement_field, write_displacement_field
from medreg.io.images import to_sitk, write_image
from medreg.io.transforms import load_transform, read_transform, write_transform
from medreg.resample import resample
from medreg.transforms import Affine, Compose
from tests.conftest import blob_image, oblique_grid


@pytest.fixture()
def mapping():
    grid = oblique_grid((22, 20, 18))
    svf = random_velocity(grid, mean_mm=2.0, smoothness_mm=8.0, seed=2)
    aff = Affine(3, linear=np.eye(3) * 1.04, translation=[2.0, -3.0, 1.5], center=grid.center())
    return grid, Compose(svf, aff)


@pytest.mark.parametrize("suffix", [".nii.gz", ".mha", ".nrrd"])
def test_simpleitk_reads_our_field_and_maps_points_as_medreg(tmp_path, mapping, suffix):
    grid, t = mapping
    path = write_displacement_field(t, grid, tmp_path / f"field{suffix}")
    img = sitk.ReadImage(str(path), sitk.sitkVectorFloat64)
    assert img.GetNumberOfComponentsPerPixel() == 3
    assert np.allclose(img.GetDirection(), grid.direction, atol=1e-6)
    tx = sitk.DisplacementFieldTransform(img)
    pts = grid.world_points(torch.float64).reshape(-1, 3)[::53]
    with torch.no_grad():
        ours = t(pts.float()).double().numpy()
    theirs = np.array([tx.TransformPoint(p.tolist()) for p in pts.numpy()])
    assert np.abs(ours - theirs).max() < 1e-3


def test_simpleitk_resampling_with_our_field_reproduces_our_warp(tmp_path, mapping):
    grid, t = mapping
    moving = blob_image(oblique_grid((26, 24, 22), angle_deg=5.0), seed=3)
    ours = resample(moving, grid, t).numpy()[0]
    path = write_displacement_field(t, grid, tmp_path / "field.nii.gz")
    tx = sitk.DisplacementFieldTransform(sitk.ReadImage(str(path), sitk.sitkVectorFloat64))
    ref = sitk.Image(list(grid.size), sitk.sitkFloat32)
    ref.SetSpacing(grid.spacing)
    ref.SetOrigin(grid.origin)
    ref.SetDirection(grid.direction)
    theirs = sitk.GetArrayFromImage(sitk.Resample(to_sitk(moving), ref, tx, sitk.sitkLinear, 0.0))
    inside = ours != 0
    assert np.abs(ours - theirs)[inside].max() < 2e-3 * np.abs(ours).max()


def test_nifti_layout_is_itk_vector_with_lps_components(tmp_path):
    grid = Grid((4, 5, 6), (2.0, 2.0, 2.0))
    shift = torch.zeros(1, 3, 6, 5, 4)
    shift[:, 0], shift[:, 1], shift[:, 2] = 1.0, 2.0, 3.0  # LPS mm
    from medreg.deformable.transforms import DisplacementField

    path = write_displacement_field(DisplacementField(grid, shift), grid, tmp_path / "f.nii.gz")
    nii = nib.load(str(path))
    assert nii.shape == (4, 5, 6, 1, 3)
    assert nii.header.get_intent()[0] == "vector"
    assert np.allclose(np.asarray(nii.dataobj)[1, 2, 3, 0], [1.0, 2.0, 3.0])


def test_ras_dispvect_files_are_converted_on_read(tmp_path):
    """Files with intent DISPVECT hold RAS components (ITK converts them; so do we)."""
    arr = np.zeros((4, 5, 6, 1, 3), np.float32)
    arr[..., 0], arr[..., 1], arr[..., 2] = 1.0, 2.0, 3.0
    nii = nib.Nifti1Image(arr, np.diag([-2.0, -2.0, 2.0, 1.0]))
    nii.header.set_intent("displacement vector")
    nib.save(nii, str(tmp_path / "d.nii.gz"))
    ours = read_displacement_field(tmp_path / "d.nii.gz")
    assert np.allclose(ours.field[0, :, 0, 0, 0].numpy(), [-1.0, -2.0, 3.0])
    itk = sitk.ReadImage(str(tmp_path / "d.nii.gz"))
    assert np.allclose(itk[0, 0, 0], [-1.0, -2.0, 3.0])


def test_round_trip_through_file_and_load_transform(tmp_path, mapping):
    grid, t = mapping
    path = write_displacement_field(t, grid, tmp_path / "field.nii.gz")
    back = load_transform(path)
    pts = grid.world_points()
    with torch.no_grad():
        assert torch.allclose(back(pts), t(pts), atol=1e-4)


def test_composite_with_field_round_trips_through_h5(tmp_path, mapping):
    grid, t = mapping
    write_transform(t, tmp_path / "t.h5")
    back = read_transform(tmp_path / "t.h5")
    pts = grid.world_points()
    with torch.no_grad():
        assert torch.allclose(back(pts.double()).float(), t(pts), atol=1e-3)


def test_2d_field_round_trip(tmp_path):
    grid = oblique_grid((30, 26))
    svf = random_velocity(grid, mean_mm=2.0, smoothness_mm=6.0, seed=1)
    path = write_displacement_field(svf, grid, tmp_path / "f2.nii.gz")
    back = read_displacement_field(path)
    assert back.ndim == 2 and back.grid.is_close(grid)
    pts = grid.world_points()
    with torch.no_grad():
        assert torch.allclose(back(pts), svf(pts), atol=1e-4)


def test_not_a_field_is_a_clear_error(tmp_path):
    path = write_image(blob_image(Grid((6, 7, 8))), tmp_path / "scalar.nii.gz")
    with pytest.raises(InputFileError, match="not a displacement field"):
        read_displacement_field(path)
    grid2 = Grid((6, 7))
    with pytest.raises(MedregError, match="cannot be written"):
        write_displacement_field(Affine(3), grid2, tmp_path / "x.nii.gz")
    assert not (tmp_path / "x.nii.gz").exists()
