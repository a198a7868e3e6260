"""The files and report numbers of a deformable registration, and the CLI end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medreg.core.image import Image
from medreg.deformable.outputs import linear_part, numerical_inverse, write_deformable_outputs
from medreg.deformable.synthetic import random_velocity
from medreg.deformable.transforms import BSplineTransform
from medreg.errors import MedregError
from medreg.io.fields import read_displacement_field
from medreg.io.images import write_image
from medreg.io.transforms import read_transform
from medreg.transforms import Affine, Compose
from tests.conftest import blob_image, oblique_grid


@pytest.fixture()
def case():
    grid = oblique_grid((24, 22, 20))
    fixed = blob_image(grid, seed=1)
    svf = random_velocity(grid, mean_mm=1.5, smoothness_mm=8.0, seed=2)
    aff = Affine(3, linear=np.eye(3) * 1.02, translation=[1.0, 0.5, -1.0], center=grid.center())
    labels = Image((fixed.tensor > 0.5).to(torch.int32), grid)
    return fixed, Compose(svf, aff), labels


def test_outputs_files_and_numbers(tmp_path, case):
    fixed, t, labels = case
    rep = write_deformable_outputs(t, None, fixed, fixed, tmp_path, labels, labels)
    for name in ("field.nii.gz", "inverse_field.nii.gz", "affine.tfm", "qc_grid.png",
                 "qc_jacobian.png", "warped_labels.nii.gz"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert rep["folding_percent"] == 0.0 and rep["std_log_jacobian"] > 0
    assert rep["inverse_consistency_mm"]["mean"] < 0.1
    assert 0.5 < rep["dice"]["mean"] <= 1.0
    json.dumps(rep)
    aff = read_transform(tmp_path / "affine.tfm")
    assert torch.allclose(aff.matrix(), linear_part(t).matrix(), atol=1e-6)
    fwd = read_displacement_field(tmp_path / "field.nii.gz")
    inv = read_displacement_field(tmp_path / "inverse_field.nii.gz")
    pts = fixed.grid.world_points()[4:-4, 4:-4, 4:-4]
    with torch.no_grad():
        assert float((inv(fwd(pts)) - pts).norm(dim=-1).mean()) < 0.1


def test_bspline_inverse_is_numerical(case):
    fixed, _, _ = case
    bsp = BSplineTransform(fixed.grid, 8.0)
    with torch.no_grad():
        bsp.coefficients.normal_(0, 0.7)
    inv = numerical_inverse(Compose(bsp, Affine(3, translation=[1.0, 2.0, 3.0])))
    pts = fixed.grid.world_points()[4:-4, 4:-4, 4:-4]
    with torch.no_grad():
        back = inv(Compose(bsp, Affine(3, translation=[1.0, 2.0, 3.0]))(pts))
    assert float((back - pts).norm(dim=-1).max()) < 0.05


def test_float_labels_fail_before_anything_is_written(tmp_path, case):
    fixed, t, labels = case
    with pytest.raises(MedregError, match="labels must be integers"):
        write_deformable_outputs(t, None, fixed, fixed, tmp_path / "o", labels.float(), labels)
    assert not (tmp_path / "o").exists()


def test_cli_register_syn_writes_the_deformable_outputs(tmp_path):
    from medreg.cli.main import main

    grid = oblique_grid((28, 26, 24), spacing=[2.0, 2.0, 2.0])
    fixed = blob_image(grid, seed=4)
    true = random_velocity(grid, mean_mm=1.5, smoothness_mm=10.0, seed=5)
    from medreg.resample import resample

    moving = resample(fixed, grid, true.inverse())
    write_image(fixed, tmp_path / "f.nii.gz")
    write_image(moving, tmp_path / "m.nii.gz")
    code = main(["register", str(tmp_path / "f.nii.gz"), str(tmp_path / "m.nii.gz"), "-o",
                 str(tmp_path / "out"), "--transform", "syn", "--metric", "mse", "--init",
                 "none", "--levels", "2,1", "--iterations", "30,15"])
    assert code == 0
    rep = json.loads((tmp_path / "out/report.json").read_text())
    assert rep["outputs"]["folding_percent"] == 0.0
    field = read_displacement_field(tmp_path / "out/field.nii.gz")
    pts = grid.world_points()[3:-3, 3:-3, 3:-3]
    with torch.no_grad():
        err = (field(pts) - true(pts)).norm(dim=-1).mean()
        before = (true(pts) - pts).norm(dim=-1).mean()
    assert float(err) < 0.7 * float(before)  # smooth blobs carry little local detail
