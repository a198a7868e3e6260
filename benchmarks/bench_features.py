"""Feature, Fourier and keypoint registration: medreg side by side with peer tools.

Run in the benchmark environment (``make bench-env``)::

    OMP_NUM_THREADS=1 .venv-bench/bin/python benchmarks/bench_features.py [--repeat 5]

Peers: scikit-image ``phase_cross_correlation``, imreg_dft (``translation``, ``similarity``),
OpenCV ``phaseCorrelate`` and a direct OpenCV keypoint script (SIFT, ratio test,
``estimateAffinePartial2D`` / ``findHomography`` with MAGSAC). Every case has a known answer:
the ITK BrainWeb slices (shift 13/17 px, rotation 10 deg, scale 1/1.2), exact sub-pixel
shifts of a real slice (Fourier shift theorem), a downsampled MNI152 volume, and a radiograph
under a known homography. Accuracy is the error against that answer; time is the median wall
time of ``--repeat`` calls on one thread.

Sign conventions are converted to medreg's (``moving(i + s) = fixed(i)``, fixed->moving
angle and scale): scikit-image and imreg_dft report the shift that moves the moving image
back (``-s``, in (row, col) order); imreg_dft reports the moving->fixed scale (``1/s``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import cv2
import imreg_dft as ird
import numpy as np
import scipy.fft as sfft
import torch
from scipy import ndimage
from skimage.registration import phase_cross_correlation

from medreg.features.keypoints import register_keypoints
from medreg.features.phase import phase_correlate, register_phase
from medreg.features.preprocess import scalar_image, to_uint8
from medreg.io import read_image
from medreg.resample import resample
from medreg.transforms import Similarity
from medreg.transforms.homography import Homography

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
ITK = DATA / "2d/itk"


def timed(fn, repeat: int):
    """Result of the last call and the median wall time (s) of ``repeat`` calls."""
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return out, statistics.median(times)


def slice_array(name: str) -> np.ndarray:
    return scalar_image(read_image(ITK / name)).tensor[0].numpy().astype(np.float64)


# --------------------------------------------------------------------------- translation
def translation_peers(fixed: np.ndarray, moving: np.ndarray, repeat: int, upsample: int = 100):
    """Shift estimates in (x, y[, z]) voxels, medreg convention, and times, per tool."""
    rows = {}
    r, t = timed(lambda: phase_correlate(fixed, moving, upsample=upsample), repeat)
    rows["medreg phase_correlate (hann)"] = (r.shift, t)
    r, t = timed(lambda: phase_correlate(fixed, moving, upsample=upsample, window_kind="none"),
                 repeat)
    rows["medreg phase_correlate (no window)"] = (r.shift, t)
    r, t = timed(lambda: phase_cross_correlation(fixed, moving, upsample_factor=upsample),
                 repeat)
    rows["skimage phase_cross_correlation"] = (-np.asarray(r[0])[::-1], t)
    if fixed.ndim == 2:
        r, t = timed(lambda: ird.translation(fixed, moving), repeat)
        rows["imreg_dft translation"] = (-np.asarray(r["tvec"])[::-1], t)
        win = cv2.createHanningWindow(fixed.shape[::-1], cv2.CV_64F)
        r, t = timed(lambda: cv2.phaseCorrelate(fixed, moving, win), repeat)
        rows["OpenCV phaseCorrelate (hann)"] = (np.asarray(r[0]), t)
    return rows


def bench_translation(repeat: int) -> list[dict]:
    out = []
    fixed = slice_array("BrainProtonDensitySliceBorder20.png")
    moving = slice_array("BrainProtonDensitySliceShifted13x17y.png")
    for tool, (shift, t) in translation_peers(fixed, moving, repeat).items():
        out.append({"case": "BrainWeb shift 13,17 px (2D)", "tool": tool,
                    "error": float(np.abs(shift - [13, 17]).max()), "unit": "px",
                    "seconds": t})
    rng = np.random.default_rng(0)
    shifts = rng.uniform(-12, 12, (10, 2))
    errs: dict[str, list] = {}
    for s in shifts:
        mov = sfft.ifftn(ndimage.fourier_shift(sfft.fftn(fixed), s[::-1])).real
        for tool, (est, t) in translation_peers(fixed, mov, max(1, repeat // 2)).items():
            errs.setdefault(tool, []).append((float(np.abs(est - s).max()), t))
    for tool, vals in errs.items():
        out.append({"case": "sub-pixel shifts of a real slice, 10 cases (2D)", "tool": tool,
                    "error": max(v[0] for v in vals), "error_mean": float(np.mean(
                        [v[0] for v in vals])), "unit": "px",
                    "seconds": statistics.median(v[1] for v in vals)})
    return out


def bench_3d(repeat: int) -> list[dict]:
    mni = read_image(DATA / "brain/mni152_2009a/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
    vol = resample(mni.float(), mni.grid.downsample(2)).tensor[0].numpy().astype(np.float64)
    truth = np.array([5.37, -3.81, 7.22])  # (x, y, z) voxels
    mov = sfft.ifftn(ndimage.fourier_shift(sfft.fftn(vol), truth[::-1])).real
    rows = []
    for tool, (est, t) in translation_peers(vol, mov, repeat, upsample=20).items():
        rows.append({"case": f"MNI152 {vol.shape[::-1]} 2 mm, shift (5.37,-3.81,7.22) (3D)",
                     "tool": tool, "error": float(np.abs(est - truth).max()), "unit": "voxel",
                     "seconds": t})
    return rows


# --------------------------------------------------------------------------- rotation, scale
def opencv_similarity(fixed: np.ndarray, moving: np.ndarray):
    """Direct OpenCV: SIFT, ratio test, RANSAC similarity; returns (angle_deg, scale)."""
    sift = cv2.SIFT_create()
    to8 = lambda a: cv2.normalize(a, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)  # noqa
    k1, d1 = sift.detectAndCompute(to8(fixed), None)
    k2, d2 = sift.detectAndCompute(to8(moving), None)
    good = [m for m, n in cv2.BFMatcher().knnMatch(d1, d2, k=2) if m.distance < 0.75 * n.distance]
    p1 = np.float32([k1[m.queryIdx].pt for m in good])
    p2 = np.float32([k2[m.trainIdx].pt for m in good])
    mat, _ = cv2.estimateAffinePartial2D(p1, p2, method=cv2.RANSAC)
    return np.degrees(np.arctan2(mat[1, 0], mat[0, 0])), float(np.hypot(mat[0, 0], mat[1, 0]))


def similarity_cases():
    fixed_img = scalar_image(read_image(ITK / "BrainProtonDensitySliceBorder20.png"))
    yield ("BrainWeb Rotated10", fixed_img,
           scalar_image(read_image(ITK / "BrainProtonDensitySliceRotated10.png")), 10.0, 1.0)
    yield ("BrainWeb R10X13Y17", fixed_img,
           scalar_image(read_image(ITK / "BrainProtonDensitySliceR10X13Y17.png")), 10.0, 1.0)
    yield ("BrainWeb R10X13Y17S12", fixed_img,
           scalar_image(read_image(ITK / "BrainProtonDensitySliceR10X13Y17S12.png")),
           -10.0, 1 / 1.2)
    for angle, scale in [(-23.0, 1.15), (35.0, 0.9)]:
        truth = Similarity(2, rotation=[np.radians(angle)], translation=[4.0, -6.0],
                           scale=scale, center=fixed_img.grid.center())
        yield (f"synthetic {angle:+.0f} deg x{scale}", fixed_img,
               resample(fixed_img, fixed_img.grid, truth.inverse()), angle, scale)


def bench_similarity(repeat: int) -> list[dict]:
    rows = []
    for name, fixed, moving, angle, scale in similarity_cases():
        fa, ma = (im.tensor[0].numpy().astype(np.float64) for im in (fixed, moving))

        def record(tool, a, s, t, name=name, angle=angle, scale=scale):
            rows.append({"case": f"{name} (angle {angle:+.0f}, scale {scale:.4g})", "tool": tool,
                         "angle_error_deg": abs((a - angle + 180) % 360 - 180),
                         "scale_error_pct": 100 * abs(s / scale - 1), "seconds": t})

        r, t = timed(lambda fixed=fixed, moving=moving: register_phase(
            fixed, moving, model="similarity"), repeat)
        record("medreg phase (log-polar)", r.info["angle_deg"],
               float(r.transform.scale().detach()), t)
        r, t = timed(lambda fixed=fixed, moving=moving: register_keypoints(
            fixed, moving, detector="sift", model="similarity"), repeat)
        record("medreg keypoints (SIFT)", np.degrees(float(r.transform.physical[0].detach())),
               float(r.transform.scale().detach()), t)
        r, t = timed(lambda fa=fa, ma=ma: ird.similarity(fa, ma), repeat)
        record("imreg_dft similarity", float(r["angle"]), 1.0 / float(r["scale"]), t)
        r, t = timed(lambda fa=fa, ma=ma: opencv_similarity(fa, ma), repeat)
        record("OpenCV script (SIFT+RANSAC)", r[0], r[1], t)
    return rows


# --------------------------------------------------------------------------- homography
def opencv_homography(fixed_u8: np.ndarray, moving_u8: np.ndarray) -> np.ndarray:
    """Direct OpenCV: SIFT, ratio test, MAGSAC homography in pixel indices."""
    sift = cv2.SIFT_create()
    k1, d1 = sift.detectAndCompute(fixed_u8, None)
    k2, d2 = sift.detectAndCompute(moving_u8, None)
    good = [m for m, n in cv2.BFMatcher().knnMatch(d1, d2, k=2) if m.distance < 0.75 * n.distance]
    p1 = np.float32([k1[m.queryIdx].pt for m in good])
    p2 = np.float32([k2[m.trainIdx].pt for m in good])
    h, _ = cv2.findHomography(p1, p2, cv2.USAC_MAGSAC, 3.0)
    return h


def bench_homography(repeat: int) -> list[dict]:
    rows = []
    for name in ("RG1_UNCR_chest_xray.dcm", "RG3_UNCR_tibia_xray.dcm"):
        xray = scalar_image(read_image(DATA / "2d/xray" / name))
        fixed = resample(xray, xray.grid.downsample(4))
        h_index = np.array([[1.04, 0.05, -14.0], [-0.03, 0.97, 9.0], [1.5e-4, -1.0e-4, 1.0]])
        truth = Homography.from_index_matrix(h_index, fixed.grid, fixed.grid)
        moving = resample(fixed, fixed.grid, truth.inverse())
        # judge over the central 60% of the field of view, in pixels (= mm here)
        n = np.asarray(fixed.grid.size)
        xs, ys = np.meshgrid(np.linspace(0.2, 0.8, 9) * n[0], np.linspace(0.2, 0.8, 9) * n[1])
        probe = np.stack([xs.ravel(), ys.ravel()], 1)
        pts = torch.from_numpy(fixed.grid.index_to_world(probe))
        want = truth(pts).numpy()

        def err(h_world: np.ndarray, pts=pts, want=want) -> float:
            return float(np.linalg.norm(Homography(h_world)(pts).numpy() - want, axis=1).max())

        r, t = timed(lambda fixed=fixed, moving=moving: register_keypoints(
            fixed, moving, detector="sift", model="homography"), repeat)
        rows.append({"case": f"{name[:-4]} /4 under a known homography",
                     "tool": "medreg keypoints (SIFT, CLAHE, MAGSAC)", "error": err(r.matrix),
                     "unit": "px", "seconds": t})
        r, t = timed(lambda fixed=fixed, moving=moving: register_keypoints(
            fixed, moving, detector="sift", model="homography", contrast="window"), repeat)
        rows.append({"case": f"{name[:-4]} /4 under a known homography",
                     "tool": "medreg keypoints (SIFT, no CLAHE)", "error": err(r.matrix),
                     "unit": "px", "seconds": t})
        fu8, mu8 = to_uint8(fixed), to_uint8(moving)
        h, t = timed(lambda fu8=fu8, mu8=mu8: opencv_homography(fu8, mu8), repeat)
        h_world = fixed.grid.world_from_index @ h @ fixed.grid.index_from_world
        rows.append({"case": f"{name[:-4]} /4 under a known homography",
                     "tool": "OpenCV script (SIFT+MAGSAC)", "error": err(h_world),
                     "unit": "px", "seconds": t})
    return rows


# --------------------------------------------------------------------------- main
def table(rows: list[dict], cols: list[str]) -> str:
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write all rows to this JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    rows = {"translation": bench_translation(args.repeat) + bench_3d(args.repeat),
            "similarity": bench_similarity(args.repeat),
            "homography": bench_homography(args.repeat)}
    print(table(rows["translation"], ["case", "tool", "error", "error_mean", "unit", "seconds"]))
    print()
    print(table(rows["similarity"], ["case", "tool", "angle_error_deg", "scale_error_pct",
                                     "seconds"]))
    print()
    print(table(rows["homography"], ["case", "tool", "error", "unit", "seconds"]))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
