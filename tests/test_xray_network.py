"""Heatmap targets, sub-pixel peaks, a short training run, save/load; variants; error measures."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medreg.core.grid import Grid
from medreg.core.image import Image
from medreg.errors import MedregError
from medreg.xray.evaluate import add_quantum_noise, pose_errors
from medreg.xray.geometry import CArmGeometry, canonical_pose, perturbation
from medreg.xray.network import (
    LandmarkNet,
    TrainConfig,
    detect,
    heatmap_targets,
    load_model,
    peaks,
    save_model,
    train,
)
from medreg.xray.variants import VariantParams, make_variant


def test_targets_and_subpixel_peaks_round_trip():
    uv = torch.tensor([[[10.3, 7.8], [31.9, 20.2], [float("nan"), float("nan")]]])
    t = heatmap_targets(uv, (24, 32), sigma=1.5)
    assert t.shape == (1, 3, 24, 32)
    assert t[0, 2].abs().max() == 0  # off-detector landmark: empty map
    det = peaks(t)
    assert np.abs(det.uv[0, :2] - uv[0, :2].numpy()).max() < 0.01
    assert det.confidence[0, 0] > 0.8 and det.confidence[0, 2] == 0


def _dots(n, gen):
    """Images with one Gaussian dot each, and its position."""
    uv = torch.rand(n, 1, 2, generator=gen) * torch.tensor([40.0, 28.0]) + 4
    vv, uu = torch.meshgrid(torch.arange(36.0), torch.arange(48.0), indexing="ij")
    img = torch.exp(-((uu - uv[:, :, 0, None, None]) ** 2 + (vv - uv[:, :, 1, None, None]) ** 2)
                    / 8.0)
    return img + 0.05 * torch.rand(img.shape, generator=gen), uv


def test_short_training_learns_to_find_a_dot(tmp_path):
    gen = torch.Generator().manual_seed(0)
    imgs, uv = _dots(160, gen)
    model = LandmarkNet(1, width=8)
    hist = train(model, imgs, uv, TrainConfig(epochs=8, batch=16, lr=3e-3), progress=False,
                 checkpoint=tmp_path / "m.pt", meta={"names": ["dot"]})
    assert hist.val_loss[-1] < hist.val_loss[0]
    test, tuv = _dots(20, gen)
    err = np.linalg.norm(detect(model, test).uv - tuv.numpy(), axis=-1)
    assert np.median(err) < 2.0, np.median(err)
    back, meta = load_model(tmp_path / "m.pt")
    assert meta["names"] == ["dot"] and (tmp_path / "m.pt").stat().st_size < 1_000_000
    again = np.linalg.norm(detect(back, test).uv - tuv.numpy(), axis=-1)
    assert np.median(again) < 2.5  # float16 weights on disk
    save_model(tmp_path / "full.pt", LandmarkNet(), {})
    assert (tmp_path / "full.pt").stat().st_size < 1_000_000  # the 23-landmark net ships small
    with pytest.raises(MedregError, match="need >= 2 images"):
        train(model, imgs[:1], uv[:1], TrainConfig(epochs=1), progress=False)


def test_variant_landmarks_follow_the_deformation():
    grid = Grid((40, 40, 30), (2.0, 2.0, 3.0), (-40.0, -40.0, -45.0))
    pts = grid.world_points(torch.float64)
    hu = -1000 + 2000 * torch.exp(-((pts - torch.tensor([8.0, -5.0, 6.0])) ** 2).sum(-1) / 50.0)
    ct = Image(hu[None].float(), grid)
    var = make_variant(ct, 1001, voxel_mm=2.0, params=VariantParams(amplitude=4.0, noise=0.0,
                                                                     bone=0.0, soft=0.0))
    p = np.array([[8.0, -5.0, 6.0]])
    x = var.from_source(p)
    assert np.abs(var.phi(x) - p).max() < 1e-3
    assert np.linalg.norm(x - p) > 0.2  # it did move
    # the blob's peak in the variant sits where the landmark was mapped
    v = var.ct.tensor[0]
    k = np.unravel_index(int(v.argmax()), v.shape)
    peak = var.ct.grid.index_to_world(np.array([k[::-1]], float))[0]
    assert np.linalg.norm(peak - x[0]) < 2.5


def test_pose_error_measures_closed_form():
    g = CArmGeometry()
    gt = canonical_pose(np.zeros(3), g)
    pts = np.array([[0.0, 0, 0], [50.0, 0, 0]])
    # a shift along the beam: TRE = 10, the source moves 10, points stay on their rays at x=0
    est = gt @ perturbation((0, 0, 0), (0, 10, 0), np.zeros(3))
    e = pose_errors(est, gt, pts, g)
    assert np.isclose(e["tre"], 10) and np.isclose(e["centre"], 10)
    assert e["rotation"] < 1e-9 and e["success"]
    assert np.isclose(e["mpd"], 0.5 * 50 * 10 / np.hypot(50, 710))  # only x=50 leaves its ray
    est = gt @ perturbation((0, 0, 0), (20, 0, 0), np.zeros(3))  # in-plane: mPD ~ TRE
    e = pose_errors(est, gt, pts, g)
    assert np.isclose(e["tre"], 20) and 19 < e["mpd"] < 20 and not e["success"]


def test_quantum_noise_is_unbiased_enough():
    p = torch.full((1, 1, 64, 64), 2.0)
    noisy = add_quantum_noise(p, 2e4, seed=0)
    assert abs(noisy.mean().item() - 2.0) < 0.01 and 0.01 < noisy.std().item() < 0.05
