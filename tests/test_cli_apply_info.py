"""``medreg apply`` and ``medreg info`` through ``medreg.cli.main.main``."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from medreg import Grid, Image, Rigid, read_image, resample, write_image
from medreg.cli.main import main
from medreg.io import read_transform, write_transform
from tests.conftest import blob_image, oblique_grid


@pytest.fixture()
def files(tmp_path):
    g = oblique_grid((20, 18, 14))
    moving = blob_image(g, seed=1)
    labels = Image((torch.arange(g.numel).reshape(1, *g.shape) % 5 * 100 + 3).to(torch.int32), g)
    t = Rigid(3, [0.05, -0.08, 0.1], [2.0, -1.5, 3.0], center=g.center())
    paths = dict(moving=tmp_path / "moving.nii.gz", labels=tmp_path / "labels.nii.gz",
                 ref=tmp_path / "ref.mha", tfm=tmp_path / "t.tfm", mat=tmp_path / "t.mat")
    write_image(moving, paths["moving"])
    write_image(labels, paths["labels"])
    write_image(blob_image(g, seed=2), paths["ref"])
    write_transform(t, paths["tfm"])
    write_transform(t, paths["mat"])
    return paths, t


def test_apply_image_matches_resample(files, tmp_path):
    paths, t = files
    out = tmp_path / "w.nii.gz"
    assert main(["apply", str(paths["mat"]), str(paths["moving"]), "-o", str(out),
                 "--reference", str(paths["ref"])]) == 0
    got = read_image(out)
    ref = read_image(paths["ref"])
    expected = resample(read_image(paths["moving"]), ref.grid, t)
    assert got.grid.is_close(ref.grid)
    np.testing.assert_allclose(got.numpy(), expected.numpy(), atol=1e-5)


def test_apply_labels_nearest_keeps_values(files, tmp_path):
    paths, _ = files
    out = tmp_path / "l.nii.gz"
    assert main(["apply", str(paths["tfm"]), str(paths["labels"]), "-o", str(out),
                 "--reference", str(paths["ref"]), "--interpolation", "nearest",
                 "--fill", "3"]) == 0
    got = read_image(out).tensor
    assert not got.is_floating_point()
    assert set(got.unique().tolist()) <= {3, 103, 203, 303, 403}
    assert len(got.unique()) == 5


def _write_points(path, rows, header=("id", "x", "y", "z")):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        if header:
            w.writerow(header)
        w.writerows(rows)


def _read_rows(path):
    with open(path) as fh:
        return list(csv.reader(fh))


def test_apply_points_forward_and_inverse(files, tmp_path):
    paths, t = files
    pts = np.array([[0.0, 0.0, 0.0], [10.0, -20.0, 30.0], [-5.5, 7.25, 1.0]])
    src = tmp_path / "p.csv"
    _write_points(src, [[f"p{i}", *p] for i, p in enumerate(pts)])
    fwd, back = tmp_path / "fwd.csv", tmp_path / "back.csv"
    assert main(["apply", str(paths["tfm"]), str(src), "-o", str(fwd), "--points"]) == 0
    rows = _read_rows(fwd)
    assert rows[0] == ["id", "x", "y", "z"] and rows[1][0] == "p0"
    mapped = np.array([[float(v) for v in r[1:]] for r in rows[1:]])
    with torch.no_grad():
        expected = t(torch.as_tensor(pts)).numpy()  # fixed points -> moving points
    np.testing.assert_allclose(mapped, expected, atol=1e-9)
    assert main(["apply", str(paths["tfm"]), str(fwd), "-o", str(back), "--points",
                 "--invert"]) == 0
    again = np.array([[float(v) for v in r[1:]] for r in _read_rows(back)[1:]])
    np.testing.assert_allclose(again, pts, atol=1e-9)


def test_apply_points_without_header_2d(tmp_path):
    write_transform(Rigid(2, [np.pi / 2], [1.0, 0.0]), tmp_path / "t.txt")
    _write_points(tmp_path / "p.csv", [[1.0, 0.0]], header=None)
    assert main(["apply", str(tmp_path / "t.txt"), str(tmp_path / "p.csv"), "-o",
                 str(tmp_path / "o.csv"), "--points"]) == 0
    np.testing.assert_allclose([float(v) for v in _read_rows(tmp_path / "o.csv")[0]],
                               [1.0, 1.0], atol=1e-12)


def test_apply_refuses_to_overwrite(files, tmp_path, capsys):
    paths, _ = files
    out = tmp_path / "w.nii.gz"
    out.write_text("precious")
    args = ["apply", str(paths["tfm"]), str(paths["moving"]), "-o", str(out),
            "--reference", str(paths["ref"])]
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err
    assert out.read_text() == "precious"
    assert main([*args, "--overwrite"]) == 0
    assert read_image(out).grid.size == (20, 18, 14)


@pytest.mark.parametrize("case, message", [
    ("missing_transform", "transform file not found"),
    ("missing_input", "input file not found"),
    ("no_reference", "--reference is required"),
    ("csv_without_points", "pass --points"),
    ("bad_header", "lacks column"),
    ("dimension", "dimension mismatch"),
])
def test_apply_clear_errors(files, tmp_path, capsys, case, message):
    paths, _ = files
    out = str(tmp_path / "o.nii.gz")
    pts = tmp_path / "p.csv"
    _write_points(pts, [[1, 2, 3]], header=("a", "b", "c"))
    img2d = tmp_path / "img2d.mha"
    write_image(Image(torch.zeros(1, 6, 5), Grid((5, 6))), img2d)
    argv = {
        "missing_transform": ["apply", str(tmp_path / "no.tfm"), str(paths["moving"]), "-o", out,
                              "--reference", str(paths["ref"])],
        "missing_input": ["apply", str(paths["tfm"]), str(tmp_path / "no.nii"), "-o", out],
        "no_reference": ["apply", str(paths["tfm"]), str(paths["moving"]), "-o", out],
        "csv_without_points": ["apply", str(paths["tfm"]), str(pts), "-o", out],
        "bad_header": ["apply", str(paths["tfm"]), str(pts), "-o", out, "--points"],
        "dimension": ["apply", str(paths["tfm"]), str(img2d), "-o", out, "--reference",
                      str(img2d)],
    }[case]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("medreg apply: error:") and message in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "o.nii.gz").exists()


def test_unknown_options_exit_nonzero(files, capsys):
    paths, _ = files
    with pytest.raises(SystemExit) as exc:
        main(["apply", str(paths["tfm"]), str(paths["moving"]), "-o", "x.nii", "--bogus"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["apply", str(paths["tfm"]), str(paths["moving"]), "-o", "x.nii",
              "--interpolation", "cubic"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_info_image_and_transform(files, capsys):
    paths, t = files
    assert main(["info", str(paths["moving"]), str(paths["mat"])]) == 0
    text = capsys.readouterr().out
    assert "3D image" in text and "(20, 18, 14)" in text and "float32" in text
    assert "AffineTransform" in text and "fixed -> moving" in text
    assert main(["info", "--json", str(paths["ref"]), str(paths["tfm"])]) == 0
    img, tfm = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    g = read_image(paths["ref"]).grid
    np.testing.assert_allclose(img["spacing"], g.spacing, atol=1e-6)
    np.testing.assert_allclose(img["origin"], g.origin, atol=1e-5)
    assert img["min"] <= img["mean"] <= img["max"]
    np.testing.assert_allclose(tfm["matrix"], t.matrix().detach().numpy(), atol=1e-12)
    np.testing.assert_allclose(tfm["center"], t.center.numpy(), atol=1e-12)
    assert read_transform(paths["tfm"]).ndim == 3


def test_info_missing_and_unreadable(tmp_path, capsys):
    assert main(["info", str(tmp_path / "nope.nii.gz")]) == 2
    assert "file not found" in capsys.readouterr().err
    (tmp_path / "junk.tfm").write_text("junk")
    assert main(["info", str(tmp_path / "junk.tfm")]) == 2
    assert "cannot read transform" in capsys.readouterr().err
