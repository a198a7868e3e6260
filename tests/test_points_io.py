"""Landmark files: round trips, RAS/LPS handling of Slicer files, ITK point text, bad files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medreg import Grid
from medreg.errors import InputFileError
from medreg.io.points import read_points, write_points

PTS3 = np.array([[-12.25, 30.5, 7.125], [40.0, -3.75, 0.5], [1e-3, 2.0, -88.0]])


@pytest.mark.parametrize("suffix", [".csv", ".fcsv", ".mrk.json", ".txt"])
def test_round_trip_3d(tmp_path, suffix):
    path = write_points(tmp_path / f"pts{suffix}", PTS3, labels=["a", "b", "c"])
    back = read_points(path)
    np.testing.assert_allclose(back.points, PTS3, atol=1e-12)
    if suffix != ".txt":
        assert back.labels == ["a", "b", "c"]


@pytest.mark.parametrize("suffix", [".csv", ".fcsv", ".mrk.json", ".txt"])
def test_round_trip_2d(tmp_path, suffix):
    pts = PTS3[:, :2]
    back = read_points(write_points(tmp_path / f"p{suffix}", pts), ndim=2)
    np.testing.assert_allclose(back.points, pts, atol=1e-12)


def test_fcsv_ras_is_converted_to_lps(tmp_path):
    text = ("# Markups fiducial file version = 4.10\n# CoordinateSystem = 0\n"
            "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID\n"
            "vtkMRMLMarkupsFiducialNode_0,10.5,-20,30,0,0,0,1,1,1,0,F-1,,\n")
    (tmp_path / "ras.fcsv").write_text(text)
    np.testing.assert_allclose(read_points(tmp_path / "ras.fcsv").points, [[-10.5, 20.0, 30.0]])
    lps = text.replace("= 0", "= LPS")
    (tmp_path / "lps.fcsv").write_text(lps)
    np.testing.assert_allclose(read_points(tmp_path / "lps.fcsv").points, [[10.5, -20.0, 30.0]])
    old = text.replace("# CoordinateSystem = 0\n", "")  # very old files: RAS, no field
    (tmp_path / "old.fcsv").write_text(old)
    np.testing.assert_allclose(read_points(tmp_path / "old.fcsv").points, [[-10.5, 20.0, 30.0]])


def test_mrk_json_coordinate_system(tmp_path):
    doc = {"markups": [{"type": "Fiducial", "coordinateSystem": "RAS",
                        "controlPoints": [{"label": "nose", "position": [1.0, 2.0, 3.0]}]}]}
    (tmp_path / "a.mrk.json").write_text(json.dumps(doc))
    ps = read_points(tmp_path / "a.mrk.json")
    np.testing.assert_allclose(ps.points, [[-1.0, -2.0, 3.0]])
    assert ps.labels == ["nose"]
    written = json.loads(write_points(tmp_path / "b.mrk.json", ps.points).read_text())
    assert written["markups"][0]["coordinateSystem"] == "LPS"


def test_itk_index_file_needs_and_uses_grid(tmp_path):
    (tmp_path / "idx.txt").write_text("index\n2\n0 0\n10 5\n")
    with pytest.raises(InputFileError, match="grid"):
        read_points(tmp_path / "idx.txt")
    grid = Grid((20, 20), [0.5, 2.0], [-3.0, 4.0])
    pts = read_points(tmp_path / "idx.txt", grid=grid).points
    np.testing.assert_allclose(pts, [[-3.0, 4.0], [2.0, 14.0]])


def test_bad_files_say_what_is_wrong(tmp_path):
    with pytest.raises(InputFileError, match="not found"):
        read_points(tmp_path / "missing.csv")
    (tmp_path / "nohead.csv").write_text("1,2,3\n4,5,6\n")
    with pytest.raises(InputFileError, match="x,y"):
        read_points(tmp_path / "nohead.csv")
    (tmp_path / "count.txt").write_text("point\n3\n1 2\n3 4\n")
    with pytest.raises(InputFileError, match="announces 3 points but 2"):
        read_points(tmp_path / "count.txt")
    (tmp_path / "bad.csv").write_text("x,y\n1,abc\n")
    with pytest.raises(InputFileError, match="malformed"):
        read_points(tmp_path / "bad.csv")
    (tmp_path / "bin.mrk.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(InputFileError):
        read_points(tmp_path / "bin.mrk.json")
    (tmp_path / "pts.xyz").write_text("1 2 3\n")
    with pytest.raises(InputFileError, match="unknown landmark file type"):
        read_points(tmp_path / "pts.xyz")
    (tmp_path / "z.fcsv").write_text(
        "# CoordinateSystem = LPS\n1,0,0,1,0,0,0,1,1,1,0,a,,\n2,1,0,5,0,0,0,1,1,1,0,b,,\n")
    with pytest.raises(InputFileError, match="z varies"):
        read_points(tmp_path / "z.fcsv", ndim=2)
