"""ITK transform files: round trips through SimpleITK in both directions, .tfm/.txt/.mat/.h5."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from medreg import Affine, Compose, MedregError, Rigid, Similarity, Translation
from medreg.errors import InputFileError
from medreg.io import read_transform, write_transform
from medreg.transforms import LinearTransform

SUFFIXES = (".tfm", ".txt", ".mat", ".h5")


def _points(ndim: int, n: int = 50) -> np.ndarray:
    return np.random.default_rng(1).uniform(-120, 120, (n, ndim))


def _sitk_map(tx: sitk.Transform, pts: np.ndarray) -> np.ndarray:
    return np.array([tx.TransformPoint(p.tolist()) for p in pts])


def _medreg_map(t, pts: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return t(torch.as_tensor(pts, dtype=torch.float64)).numpy()


def _linear_cases(ndim: int) -> dict[str, LinearTransform]:
    c = [12.5, -30.0, 41.0][:ndim]
    rot = [0.2] if ndim == 2 else [0.1, -0.25, 0.3]
    a = np.eye(ndim) + np.random.default_rng(2).normal(0, 0.08, (ndim, ndim))
    return {
        "translation": Translation(ndim, [3.0, -7.5, 11.0][:ndim], center=c),
        "rigid": Rigid(ndim, rot, [4.0, 5.0, -6.0][:ndim], center=c),
        "similarity": Similarity(ndim, rot, [-2.0, 1.0, 8.0][:ndim], scale=1.07, center=c),
        "affine": Affine(ndim, a, [9.0, -3.0, 2.5][:ndim], center=c),
    }


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("kind", ["translation", "rigid", "similarity", "affine"])
def test_medreg_writes_simpleitk_reads(tmp_path, kind, ndim, suffix):
    t = _linear_cases(ndim)[kind]
    path = write_transform(t, tmp_path / f"t{suffix}")
    tx = sitk.ReadTransform(str(path))
    assert tx.GetDimension() == ndim
    pts = _points(ndim)
    np.testing.assert_allclose(_sitk_map(tx, pts), _medreg_map(t, pts), atol=1e-9)
    # the centre is stored as the fixed parameters
    np.testing.assert_allclose(tx.Downcast().GetCenter(), t.center.numpy(), atol=1e-12)
    back = read_transform(path)
    assert isinstance(back, Affine)
    np.testing.assert_allclose(_medreg_map(back, pts), _medreg_map(t, pts), atol=1e-9)
    np.testing.assert_allclose(back.center.numpy(), t.center.numpy(), atol=1e-12)


@pytest.mark.parametrize("ndim", [2, 3])
def test_linear_compose_is_written_as_one_affine(tmp_path, ndim):
    cases = _linear_cases(ndim)
    t = Compose(cases["rigid"], cases["affine"], cases["translation"])
    path = write_transform(t, tmp_path / "c.tfm")
    tx = sitk.ReadTransform(str(path)).Downcast()
    assert isinstance(tx, sitk.AffineTransform)
    pts = _points(ndim)
    np.testing.assert_allclose(_sitk_map(tx, pts), _medreg_map(t, pts), atol=1e-9)


def _sitk_cases() -> dict[str, sitk.Transform]:
    c3 = (10.0, -20.0, 15.0)
    aff = sitk.AffineTransform(3)
    aff.SetMatrix([1.05, 0.03, -0.02, -0.04, 0.97, 0.06, 0.01, -0.05, 1.02])
    aff.SetTranslation((2.0, -3.0, 4.0))
    aff.SetCenter(c3)
    ssv = sitk.ScaleSkewVersor3DTransform()
    ssv.SetCenter(c3)
    ssv.SetRotation((0.1, 0.2, 0.3), 0.2)
    ssv.SetScale((1.1, 0.9, 1.05))
    ssv.SetSkew((0.02, 0.01, -0.03, 0.0, 0.01, 0.02))
    ssv.SetTranslation((1.0, 2.0, 3.0))
    sim3 = sitk.Similarity3DTransform(1.08, (0.0, 0.0, 1.0), 0.3, (5.0, 1.0, -2.0), c3)
    comp = sitk.CompositeTransform(3)
    comp.AddTransform(sitk.TranslationTransform(3, (5.0, -1.0, 2.0)))
    comp.AddTransform(sitk.Euler3DTransform(c3, 0.3, -0.1, 0.2, (1.0, 2.0, 3.0)))
    comp.AddTransform(sitk.ScaleTransform(3, (1.1, 0.9, 1.0)))
    return {
        "euler3d": sitk.Euler3DTransform(c3, 0.1, -0.2, 0.3, (4.0, -5.0, 6.0)),
        "versor_rigid": sitk.VersorRigid3DTransform((0.0, 1.0, 0.0), 0.4, (1.0, 2.0, -3.0), c3),
        "similarity3d": sim3,
        "scale_skew_versor": ssv,
        "affine3d": aff,
        "translation3d": sitk.TranslationTransform(3, (7.0, -8.0, 9.0)),
        "euler2d": sitk.Euler2DTransform((3.0, -4.0), 0.35, (2.0, 1.0)),
        "similarity2d": sitk.Similarity2DTransform(0.9, 0.25, (1.0, -2.0), (5.0, 6.0)),
        "composite3d": comp,
    }


# ITK's MATLAB (.mat) format holds one transform, so the composite goes to .tfm and .h5 only.
_READ_CASES = [(name, suffix) for name in _sitk_cases() for suffix in (".tfm", ".mat", ".h5")
               if not (name == "composite3d" and suffix == ".mat")]


@pytest.mark.parametrize("name, suffix", _READ_CASES)
def test_simpleitk_writes_medreg_reads(tmp_path, name, suffix):
    tx = _sitk_cases()[name]
    path = tmp_path / f"t{suffix}"
    sitk.WriteTransform(tx, str(path))
    t = read_transform(path)
    pts = _points(tx.GetDimension())
    np.testing.assert_allclose(_medreg_map(t, pts), _sitk_map(tx, pts), atol=1e-9)


def test_composite_order_is_itk_order(tmp_path):
    """ITK applies the transform listed last first; medreg's Compose lists it first."""
    comp = sitk.CompositeTransform(2)
    comp.AddTransform(sitk.TranslationTransform(2, (10.0, 0.0)))
    comp.AddTransform(sitk.Euler2DTransform((0.0, 0.0), np.pi / 2, (0.0, 0.0)))
    sitk.WriteTransform(comp, str(tmp_path / "c.tfm"))
    t = read_transform(tmp_path / "c.tfm")
    assert isinstance(t, Compose) and len(t.parts) == 2
    # rotate (1, 0) by 90 degrees first -> (0, 1), then shift by 10 -> (10, 1)
    np.testing.assert_allclose(_medreg_map(t, np.array([[1.0, 0.0]])), [[10.0, 1.0]], atol=1e-12)


def test_matrix_offset_base_file_is_read(tmp_path):
    """Older ANTs/ITK files name the class MatrixOffsetTransformBase, which SimpleITK wraps."""
    aff = _sitk_cases()["affine3d"]
    sitk.WriteTransform(aff, str(tmp_path / "a.tfm"))
    text = (tmp_path / "a.tfm").read_text().replace("AffineTransform_double_3_3",
                                                     "MatrixOffsetTransformBase_double_3_3")
    (tmp_path / "m.tfm").write_text(text)
    itk_view = sitk.ReadTransform(str(tmp_path / "m.tfm"))
    t = read_transform(tmp_path / "m.tfm")
    pts = _points(3)
    np.testing.assert_allclose(_medreg_map(t, pts), _sitk_map(itk_view, pts), atol=1e-9)


def test_missing_and_garbage_files(tmp_path):
    with pytest.raises(InputFileError, match="not found"):
        read_transform(tmp_path / "nope.tfm")
    (tmp_path / "bad.tfm").write_text("this is not a transform\n")
    with pytest.raises(InputFileError, match="cannot read transform"):
        read_transform(tmp_path / "bad.tfm")


def test_bad_suffix_writes_nothing(tmp_path):
    t = Rigid(3, [0.1, 0, 0])
    with pytest.raises(MedregError, match="unknown suffix"):
        write_transform(t, tmp_path / "t.nii.gz")
    assert not list(tmp_path.iterdir())


def test_displacement_field_goes_to_fields_hook(tmp_path):
    disp = sitk.Image([4, 4], sitk.sitkVectorFloat64)
    tx = sitk.DisplacementFieldTransform(disp)
    sitk.WriteTransform(tx, str(tmp_path / "f.h5"))
    try:
        import medreg.io.fields as fields  # noqa: F401
        has_hook = hasattr(fields, "transform_from_sitk")
    except ModuleNotFoundError:
        has_hook = False
    if has_hook:
        t = read_transform(tmp_path / "f.h5")
        assert t.ndim == 2
    else:
        with pytest.raises(MedregError, match="medreg.io.fields"):
            read_transform(tmp_path / "f.h5")
