"""``medreg xray drr`` and ``medreg xray register --init-pose`` end to end on a small phantom."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from medreg.cli.main import main
from medreg.core.grid import Grid
from medreg.core.image import Image
from medreg.io.images import write_image
from medreg.xray.geometry import (
    CArmGeometry,
    canonical_pose,
    load_pose,
    perturbation,
    save_pose,
    to_camera,
)


def _phantom(path):
    grid = Grid((40, 36, 32), (2.5, 2.5, 3.0), (-50.0, -45.0, -48.0))
    pts = grid.world_points(torch.float64)
    hu = torch.full(grid.shape, -1000.0, dtype=torch.float64)
    for c, s in (([10, 0, 5], 6.0), ([-14, 8, -6], 8.0), ([0, -12, 14], 5.0), ([16, 10, -15], 4.0)):
        hu += 2500.0 * torch.exp(-((pts - torch.tensor(c)) ** 2).sum(-1) / (2 * s * s))
    write_image(Image(hu[None].float(), grid), path)
    return grid


def test_cli_drr_and_register_init_pose(tmp_path, capsys):
    ct = tmp_path / "ct.nii.gz"
    _phantom(ct)
    g = CArmGeometry(width=64, height=48, pixel_size=2.4)
    g.save(tmp_path / "g.json")
    gt = canonical_pose(np.zeros(3), g)
    save_pose(gt, tmp_path / "gt.json")
    args = ["xray", "drr", str(ct), "--geometry", str(tmp_path / "g.json"), "--pose",
            str(tmp_path / "gt.json")]
    assert main([*args, "-o", str(tmp_path / "x.npy"), "--reference"]) == 0
    assert main([*args, "-o", str(tmp_path / "x.png")]) == 0
    assert main([*args, "-o", str(tmp_path / "x.npy")]) == 2  # exists: never overwritten
    assert "exists" in capsys.readouterr().err
    x = np.load(tmp_path / "x.npy")
    assert x.shape == (48, 64) and x.max() > 0.5
    start = gt @ perturbation((3, -2, 4), (4, 0, -5), np.zeros(3))
    save_pose(start, tmp_path / "start.json")
    out = tmp_path / "reg"
    rc = main(["xray", "register", str(tmp_path / "x.npy"), "--ct", str(ct), "--geometry",
               str(tmp_path / "g.json"), "--init-pose", str(tmp_path / "start.json"),
               "-o", str(out), "--metric", "ncc"])
    assert rc == 0
    pose = load_pose(out / "pose.json")
    report = json.loads((out / "report.json").read_text())
    assert report["evaluations"] > 10 and report["similarity"] > report["initial_similarity"]
    assert (out / "overlay.png").stat().st_size > 1000
    c = np.array([[10.0, 0, 5], [-14, 8, -6], [0, -12, 14]])
    before = np.abs(to_camera(c, start) - to_camera(c, gt))[:, :2].max()
    after = np.abs(to_camera(c, pose) - to_camera(c, gt))[:, :2].max()
    assert after < 1.0 < before  # in-plane (detector) directions recovered


def test_cli_register_bad_input(tmp_path, capsys):
    ct = tmp_path / "ct.nii.gz"
    _phantom(ct)
    g = CArmGeometry(width=64, height=48, pixel_size=2.4)
    g.save(tmp_path / "g.json")
    np.save(tmp_path / "wrong.npy", np.zeros((50, 64), np.float32))
    save_pose(canonical_pose(np.zeros(3), g), tmp_path / "p.json")
    rc = main(["xray", "register", str(tmp_path / "wrong.npy"), "--ct", str(ct), "--geometry",
               str(tmp_path / "g.json"), "--init-pose", str(tmp_path / "p.json"),
               "-o", str(tmp_path / "o")])
    assert rc == 2 and "64x48" in capsys.readouterr().err
    rc = main(["xray", "register", str(tmp_path / "wrong.npy"), "-o", str(tmp_path / "o2")])
    assert rc == 2 and "exactly one of" in capsys.readouterr().err
    rc = main(["xray", "register", str(tmp_path / "wrong.npy"), "--patient", str(tmp_path),
               "-o", str(tmp_path / "o3")])
    assert rc == 2 and "not a prepared patient" in capsys.readouterr().err


def _untrained_patient(tmp_path, g: CArmGeometry) -> Path:
    """A patient folder with random landmarks and an untrained network on detector ``g``."""
    from medreg.xray.landmarks import NAMES, save_landmarks
    from medreg.xray.network import LandmarkNet, save_model

    ct = tmp_path / "ct.nii.gz"
    _phantom(ct)
    patient = tmp_path / "patient"
    patient.mkdir()
    save_landmarks(patient / "landmarks.csv", np.random.default_rng(0).normal(0, 20, (23, 3)))
    torch.manual_seed(0)
    save_model(patient / "model.pt", LandmarkNet(23, 4),
               {"names": list(NAMES), "geometry": g.to_dict()})
    (patient / "patient.json").write_text(json.dumps(
        {"ct": str(ct), "geometry": g.to_dict(), "landmarks": "landmarks.csv",
         "model": "model.pt", "isocenter": [0.0, 0.0, 0.0]}))
    return patient


def test_cli_register_auto_reports_failed_initialization(tmp_path, capsys):
    """An untrained network gives no confident landmarks: a reported failure, never a pose."""
    g = CArmGeometry(width=64, height=48, pixel_size=2.4)
    patient = _untrained_patient(tmp_path, g)
    np.save(tmp_path / "x.npy", np.random.default_rng(1).random((48, 64)).astype(np.float32))
    out = tmp_path / "out"
    rc = main(["xray", "register", str(tmp_path / "x.npy"), "--patient", str(patient),
               "-o", str(out)])
    assert rc == 2 and "automatic initialization failed" in capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["message"] and not (out / "pose.json").exists()


def test_cli_register_auto_rejects_a_detector_the_network_was_not_trained_for(tmp_path, capsys):
    g = CArmGeometry(width=64, height=48, pixel_size=2.4)
    patient = _untrained_patient(tmp_path, g)
    other = CArmGeometry(width=64, height=48, pixel_size=3.0)  # same pixels, larger detector
    other.save(tmp_path / "other.json")
    np.save(tmp_path / "x.npy", np.zeros((48, 64), np.float32))
    rc = main(["xray", "register", str(tmp_path / "x.npy"), "--patient", str(patient),
               "--geometry", str(tmp_path / "other.json"), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "does not match the network" in err, err
