"""Plug-in entry points (``--method features|phase|landmarks``, ``--init features|phase``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medreg.errors import MedregError
from medreg.features.homography_io import read_homography, write_homography
from medreg.io import read_image
from medreg.io.points import write_points
from medreg.registration.plugins import INITIALIZERS, METHODS, StageContext, resolve
from medreg.transforms import LinearTransform, Rigid
from medreg.transforms.homography import Homography
from tests.conftest import ITK2D, need


def _pair(moving: str = "BrainProtonDensitySliceShifted13x17y.png"):
    fixed = read_image(need(ITK2D / "BrainProtonDensitySliceBorder20.png")).float()
    return fixed, read_image(need(ITK2D / moving)).float()


@pytest.mark.parametrize("method,options", [("features", {"model": "translation"}),
                                            ("phase", {})])
def test_methods_recover_the_known_shift(method, options):
    fixed, moving = _pair()
    out = resolve(METHODS, method, "method")(StageContext(fixed, moving, options=options))
    np.testing.assert_allclose(out.transform.matrix_numpy()[:2, 2], [13.0, 17.0], atol=0.05)
    json.dumps(out.info)  # report.json material must be plain JSON
    assert out.info["seconds"] > 0


def test_features_homography_method_returns_homography(tmp_path):
    fixed, moving = _pair("BrainProtonDensitySliceR10X13Y17.png")
    ctx = StageContext(fixed, moving, options={"model": "homography", "detector": "orb",
                                               "matches_png": str(tmp_path / "m.png")})
    out = resolve(METHODS, "features", "method")(ctx)
    assert isinstance(out.transform, Homography)
    assert (tmp_path / "m.png").stat().st_size > 10_000
    path = write_homography(out.transform, tmp_path / "h.json", fixed_grid=fixed.grid,
                            moving_grid=moving.grid)
    doc = json.loads(path.read_text())
    assert "fixed world" in doc["convention"] and doc["fixed_grid"]["size"] == [221, 257]
    back = read_homography(path)
    pts = torch.rand(20, 2, dtype=torch.float64) * 200
    torch.testing.assert_close(back(pts), out.transform(pts))


@pytest.mark.parametrize("init", ["features", "phase"])
def test_initializers_return_linear_transforms(init):
    fixed, moving = _pair("BrainProtonDensitySliceR10X13Y17.png")
    t = resolve(INITIALIZERS, init, "init")(StageContext(fixed, moving, stage="rigid"))
    assert isinstance(t, Rigid)
    angle = np.degrees(float(t.physical[0].detach()))
    assert angle == pytest.approx(10.0, abs=0.15)


def test_single_slice_volume_gets_a_3d_transform():
    fixed = read_image(need(ITK2D / "BrainProtonDensitySliceBorder20.mhd")).float()
    moving = read_image(need(ITK2D / "BrainProtonDensitySliceShifted13x17y.mhd")).float()
    volume = lambda im: type(im)(im.tensor[:, None], im.grid.__class__(  # noqa: E731
        im.grid.size + (1,), im.grid.spacing + (1.0,), im.grid.origin + (0.0,)))
    ctx = StageContext(volume(fixed), volume(moving), options={"model": "rigid"})
    out = resolve(METHODS, "features", "method")(ctx)
    m = out.transform.matrix_numpy()
    assert m.shape == (4, 4)
    np.testing.assert_allclose(m[:3, 3], [13.0, 17.0, 0.0], atol=0.05)


def test_landmarks_method_from_files(tmp_path):
    fixed, moving = _pair()
    rng = np.random.default_rng(0)
    f = rng.uniform(20, 200, (8, 2))
    write_points(tmp_path / "f.csv", f)
    write_points(tmp_path / "m.fcsv", f + [13.0, 17.0])
    opts = {"fixed_points": str(tmp_path / "f.csv"), "moving_points": str(tmp_path / "m.fcsv"),
            "model": "similarity", "fixed_targets": f[:3], "moving_targets": f[:3] + [13, 17.0]}
    out = resolve(METHODS, "landmarks", "method")(StageContext(fixed, moving, options=opts))
    assert isinstance(out.transform, LinearTransform)
    assert out.info["fre"]["rms"] < 1e-9 and out.info["tre"]["rms"] < 1e-9
    opts["model"] = "tps"
    out = resolve(METHODS, "landmarks", "method")(StageContext(fixed, moving, options=opts))
    assert out.info["fre"]["max"] < 1e-6


def test_method_bad_input():
    fixed, moving = _pair()
    with pytest.raises(MedregError, match="fixed_points"):
        resolve(METHODS, "landmarks", "method")(StageContext(fixed, moving))
    with pytest.raises(MedregError, match="equal counts"):
        resolve(METHODS, "landmarks", "method")(StageContext(
            fixed, moving, options={"fixed_points": np.zeros((4, 2)),
                                    "moving_points": np.zeros((3, 2))}))
    with pytest.raises(MedregError, match="cannot initialize"):
        resolve(INITIALIZERS, "features", "init")(StageContext(
            fixed, moving, options={"init_model": "homography"}))
    vol = read_image(need(ITK2D / "BrainProtonDensity3Slices.mha")).float()
    with pytest.raises(MedregError, match="2D only"):
        resolve(METHODS, "features", "method")(StageContext(vol, vol))
