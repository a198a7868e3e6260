"""``medreg register`` and ``medreg demo`` end to end: outputs, interop, and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from medreg import Translation, read_image, resample, write_image
from medreg.cli.main import main
from medreg.data import demo_paths
from tests.conftest import blob_image, oblique_grid


@pytest.fixture()
def pair(tmp_path):
    g = oblique_grid((40, 36, 30))
    fixed = blob_image(g, seed=5)
    true = Translation(3, [2.5, -1.5, 1.0])
    moving = resample(fixed, g, true.inverse())
    f = write_image(fixed, tmp_path / "fixed.nii.gz")
    m = write_image(moving, tmp_path / "moving.mha")
    return f, m, true, g


def test_register_writes_every_output_and_itk_reads_the_transform(pair, tmp_path, capsys):
    f, m, true, g = pair
    out = tmp_path / "out"
    code = main(["register", str(f), str(m), "-o", str(out), "--transform", "rigid",
                 "--metric", "ncc", "--levels", "2,1"])
    assert code == 0, capsys.readouterr().err
    for name in ("transform.tfm", "warped.nii.gz", "report.json", "qc.png"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    assert report["stages"][0]["name"] == "rigid" and report["stop_reason"]
    assert report["versions"]["medreg"] and report["timings_s"]["total"] > 0
    # SimpleITK maps fixed points to moving points as we do
    tx = sitk.ReadTransform(str(out / "transform.tfm"))
    p = np.asarray(g.center()) + [5.0, -3.0, 2.0]
    expect = true(torch.as_tensor(p)[None]).detach().numpy()[0]
    np.testing.assert_allclose(tx.TransformPoint(p.tolist()), expect, atol=0.25)
    warped = read_image(out / "warped.nii.gz")
    assert warped.grid.is_close(g, tol=1e-4)


def test_existing_output_is_never_overwritten(pair, tmp_path, capsys):
    f, m, _, _ = pair
    out = tmp_path / "out"
    out.mkdir()
    keep = out / "precious.txt"
    keep.write_text("mine")
    assert main(["register", str(f), str(m), "-o", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert keep.read_text() == "mine"


@pytest.mark.parametrize("args,message", [
    (["missing.nii.gz"], "not found"),
    (["--transform", "rigid,bend"], "unknown transform"),
    (["--fixed-mask", "EMPTY"], "empty"),
    (["--levels", "4,2,1", "--iterations", "5,5"], "one iteration count per level"),
    (["--labels-fixed", "x.nii.gz"], "both --labels-fixed and --labels-moving"),
])
def test_bad_input_is_one_clear_line(pair, tmp_path, capsys, args, message):
    f, m, _, g = pair
    empty = write_image(blob_image(g).with_tensor(torch.zeros(1, *g.shape)), tmp_path / "e.nii.gz")
    args = [str(empty) if a == "EMPTY" else a for a in args]
    if args[0] == "missing.nii.gz":
        argv = ["register", str(tmp_path / "missing.nii.gz"), str(m), "-o", str(tmp_path / "o")]
    else:
        argv = ["register", str(f), str(m), "-o", str(tmp_path / "o"), *args]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_nan_voxels_are_reported(tmp_path, capsys):
    g = oblique_grid((12, 12, 12))
    img = blob_image(g)
    bad = img.tensor.clone()
    bad[0, 3, 3, 3] = float("nan")
    f = write_image(img, tmp_path / "f.nii.gz")
    m = write_image(img.with_tensor(bad), tmp_path / "m.nii.gz")
    assert main(["register", str(f), str(m), "-o", str(tmp_path / "o")]) == 2
    assert "NaN" in capsys.readouterr().err


def test_demo_data_is_bundled_and_consistent():
    paths = demo_paths()
    for key in ("fixed", "moving", "mask", "true_transform"):
        assert paths[key].is_file(), key
    fixed, mask = read_image(paths["fixed"]), read_image(paths["mask"])
    assert fixed.grid.is_close(mask.grid) and np.allclose(fixed.grid.spacing, 2.0, atol=0.02)
    assert int(mask.tensor.sum()) > 10000


def test_linear_register_reports_dice_of_label_maps(pair, tmp_path):
    f, m, true, g = pair
    fixed = read_image(f)
    labels = fixed.with_tensor((fixed.tensor > 0.3).to(torch.int16) + (fixed.tensor > 0.8))
    moving_labels = resample(labels, g, true.inverse(), interpolation="nearest")
    lf = write_image(labels, tmp_path / "lf.nii.gz")
    lm = write_image(moving_labels, tmp_path / "lm.nii.gz")
    out = tmp_path / "o"
    assert main(["register", str(f), str(m), "-o", str(out), "--transform", "translation",
                 "--metric", "mse", "--levels", "2,1", "--labels-fixed", str(lf),
                 "--labels-moving", str(lm)]) == 0
    dice = json.loads((out / "report.json").read_text())["outputs"]["dice"]
    assert set(dice["per_label"]) == {"1", "2"} and dice["mean"] > 0.9
