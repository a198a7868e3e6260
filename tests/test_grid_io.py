"""Grid conversions, image I/O round trips and agreement with SimpleITK/nibabel."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from medreg import Grid, Image, InputFileError, read_image, write_image
from medreg.core.axes import index_from_flat, shape_from_size, size_from_shape, tensor_axis
from medreg.io import from_sitk, to_sitk
from tests.conftest import MNI_T1, blob_image, need, oblique_grid


def test_axis_helpers():
    assert shape_from_size((4, 5, 6)) == (6, 5, 4)
    assert size_from_shape((6, 5, 4)) == (4, 5, 6)
    assert tensor_axis(0, 3) == 2 and tensor_axis(2, 3) == 0


def test_world_points_match_index_formula():
    g = oblique_grid((5, 4, 3))
    pts = g.world_points(torch.float64)
    assert pts.shape == (3, 4, 5, 3)
    # voxel tensor[k=2, j=1, i=3] has index (3, 1, 2)
    expect = np.asarray(g.origin) + g.direction_matrix @ (np.asarray(g.spacing) * [3, 1, 2])
    np.testing.assert_allclose(pts[2, 1, 3].numpy(), expect, atol=1e-12)


def test_norm_matrices_send_corners_to_pm1():
    g = oblique_grid((7, 9, 4))
    corners = g.index_to_world(np.array([[0, 0, 0], [6, 8, 3]]))
    m = g.norm_from_world
    norm = corners @ m[:3, :3].T + m[:3, 3]
    np.testing.assert_allclose(norm, [[-1, -1, -1], [1, 1, 1]], atol=1e-12)


def test_world_position_agrees_with_simpleitk():
    g = oblique_grid((6, 7, 8))
    s = to_sitk(Image(torch.zeros(1, *g.shape), g))
    idx = np.array([[0.0, 0, 0], [1.5, 2.25, 7], [5, 6, 0.5]])
    ours = g.index_to_world(idx)
    theirs = [s.TransformContinuousIndexToPhysicalPoint(i.tolist()) for i in idx]
    np.testing.assert_allclose(ours, theirs, atol=1e-9)


def test_downsample_keeps_extent():
    g = oblique_grid((20, 15, 9))
    c = g.downsample(2)
    assert c.size == (10, 8, 4)
    np.testing.assert_allclose(c.extent, g.extent)
    # the outer voxel boundary (index -0.5) is the same world point
    np.testing.assert_allclose(c.index_to_world([[-0.5] * 3]), g.index_to_world([[-0.5] * 3]),
                               atol=1e-9)


@pytest.mark.parametrize("bad", [dict(size=(0, 3)), dict(size=(3, 3), spacing=(1, -1)),
                                 dict(size=(3, 3, 3, 3)),
                                 dict(size=(3, 3), direction=[1, 1, 0, 1])])
def test_grid_rejects_bad_geometry(bad):
    with pytest.raises(ValueError):
        Grid(**bad)


def test_image_shape_must_match_grid():
    with pytest.raises(ValueError, match="does not match"):
        Image(torch.zeros(1, 3, 4), Grid((3, 4)))


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".mha", ".nrrd", ".mhd"])
def test_round_trip_keeps_geometry_and_data(tmp_path, suffix):
    g = oblique_grid((6, 5, 4))
    img = blob_image(g)
    p = write_image(img, tmp_path / f"img{suffix}")
    back = read_image(p)
    assert back.grid.is_close(g, tol=1e-5), (back.grid, g)
    np.testing.assert_allclose(back.numpy(), img.numpy(), atol=1e-6)
    # SimpleITK reads the same world geometry from our file
    s = sitk.ReadImage(str(p))
    np.testing.assert_allclose(s.GetOrigin(), g.origin, atol=1e-4)
    np.testing.assert_allclose(s.GetDirection(), g.direction, atol=1e-5)
    np.testing.assert_allclose(sitk.GetArrayFromImage(s), img.numpy()[0], atol=1e-6)


def test_nifti_is_ras_on_disk(tmp_path):
    g = Grid((4, 4, 4), (2, 2, 2), (10, 20, 30))
    p = write_image(Image(torch.zeros(1, 4, 4, 4), g), tmp_path / "a.nii.gz")
    aff = nib.load(str(p)).affine
    # LPS (10, 20, 30) is RAS (-10, -20, 30)
    np.testing.assert_allclose(aff[:3, 3], [-10, -20, 30])
    np.testing.assert_allclose(np.diag(aff)[:3], [-2, -2, 2])


def test_2d_round_trip_and_multichannel(tmp_path):
    g = oblique_grid((9, 7))
    img = Image(torch.rand(3, *g.shape), g)
    back = read_image(write_image(img, tmp_path / "rgb.mha"))
    assert back.channels == 3 and back.grid.is_close(g, 1e-5)
    np.testing.assert_allclose(back.numpy(), img.numpy(), atol=1e-6)


def test_real_nifti_agrees_with_simpleitk():
    p = need(MNI_T1)
    ours = read_image(p)
    s = sitk.ReadImage(str(p))
    assert ours.grid.is_close(from_sitk(s).grid, tol=1e-4)
    np.testing.assert_array_equal(ours.numpy()[0], sitk.GetArrayFromImage(s))


def test_read_errors_name_the_problem(tmp_path):
    with pytest.raises(InputFileError, match="not found"):
        read_image(tmp_path / "missing.nii.gz")
    bad = tmp_path / "junk.nii.gz"
    bad.write_bytes(b"not an image")
    with pytest.raises(InputFileError, match="cannot read"):
        read_image(bad)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputFileError, match="no DICOM series"):
        read_image(tmp_path / "empty")


def test_dicom_series_folder(tmp_path):
    g = Grid((8, 6, 5), (0.8, 0.8, 2.0), (-3, 4, 10))
    data = (np.arange(8 * 6 * 5).reshape(5, 6, 8) % 300).astype(np.int16)
    s = to_sitk(Image(torch.from_numpy(data)[None], g))
    folder = tmp_path / "series"
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    uid = "1.2.826.0.1.3680043.2.1125.1"
    for k in range(5):
        sl = s[:, :, k]
        for key, val in [("0020|000e", uid), ("0020|0013", str(k + 1)),
                         ("0020|0032",
                          "\\".join(map(str, s.TransformIndexToPhysicalPoint((0, 0, k))))),
                         ("0020|0037", "1\\0\\0\\0\\1\\0"), ("0008|0060", "CT")]:
            sl.SetMetaData(key, val)
        writer.SetFileName(str(folder / f"{k:03d}.dcm"))
        writer.Execute(sl)
    img = read_image(folder)
    assert img.grid.size == (8, 6, 5)
    np.testing.assert_allclose(img.grid.spacing, g.spacing, atol=1e-4)
    np.testing.assert_array_equal(img.numpy()[0], data)


def test_simpleitk_is_imported_only_when_needed():
    """NIfTI reading goes through nibabel; SimpleITK (about 110 MB) loads on first use."""
    import subprocess
    import sys

    code = ("import sys, medreg; from pathlib import Path; "
            "d = Path(medreg.__file__).parent / 'data'; "
            "medreg.read_image(sorted(d.glob('*.nii.gz'))[0]); "
            "print('SimpleITK' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    from medreg.io.lazy import sitk

    assert sitk.sitkFloat32 == __import__("SimpleITK").sitkFloat32



def test_index_from_flat_matches_the_tensor_layout():
    t = torch.arange(4 * 3 * 2).reshape(shape_from_size((4, 3, 2)))  # (z, y, x) = (2, 3, 4)
    flat = torch.tensor([0, 5, 13, 23])
    idx = index_from_flat(flat, (4, 3, 2))  # (x, y, z)
    assert idx.tolist() == [[0, 0, 0], [1, 1, 0], [1, 0, 1], [3, 2, 1]]
    assert [int(t[z, y, x]) for x, y, z in idx.tolist()] == flat.tolist()
