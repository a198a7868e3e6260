"""DRR render time and accuracy: medreg vs DiffDRR (Siddon and trilinear) on the chest CT.

Run in the benchmark environment (``make bench-env``; DiffDRR 0.6.1 also needs ``torchio``)::

    OMP_NUM_THREADS=1 .venv-bench/bin/python benchmarks/bench_xray.py --threads 1 \
        [--patient PREPARED_FOLDER] [--json out.json]

Per renderer and detector (240x188 @ 1.6 mm, the paper's; 120x94 @ 3.2 mm, the fast mode):
median wall time of ``--repeats`` renders of one AP pose (after a warm-up), and the relative RMS
error against the same tool's exact/near-exact render of the same view (DiffDRR: Siddon, the
exact voxel line integral; medreg: its reference mode, full-resolution CT at 0.25 mm steps), so
each tool is judged against its own ground truth and the poses need not be converted between
the tools' frames. With ``--patient`` it also times initialization (network detection + PnP).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

CT = Path(__file__).resolve().parents[2] / "shared/data/ct/chest/cxr.nii.gz"
SDD, SID = 1200.0, 900.0
DETECTORS = ((240, 188, 1.6), (120, 94, 3.2))


def _time(fn, repeats: int) -> tuple[float, torch.Tensor]:
    out = fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _rel_rms(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double().flatten(), ref.double().flatten()
    return float(torch.sqrt(((a - ref) ** 2).mean()) / torch.sqrt((ref**2).mean()))


def bench_medreg(repeats: int) -> list[dict]:
    from medreg.io.images import read_image
    from medreg.xray.drr import DRRRenderer, attenuation_volume, crop_to_body, render_reference
    from medreg.xray.geometry import CArmGeometry, canonical_pose

    ct = read_image(CT, dtype=torch.float32)
    rows = []
    for w, h, px in DETECTORS:
        g = CArmGeometry(sdd=SDD, sid=SID, width=w, height=h, pixel_size=px)
        pose = canonical_pose(ct.grid.center(), g)
        ref = render_reference(ct, g, pose, step=0.25, supersample=1)
        for voxel in (None, 2.5):
            vol = crop_to_body(attenuation_volume(ct, voxel))
            r = DRRRenderer(vol, g)
            with torch.no_grad():
                sec, img = _time(lambda r=r, p=pose: r(p), repeats)
            mode = "ray-march, full CT" if voxel is None else "ray-march, 2.5 mm CT"
            rows.append({"tool": "medreg", "mode": mode,
                         "detector": f"{w}x{h}", "seconds": sec,
                         "rel_rms_vs_own_reference": _rel_rms(img, ref)})
    return rows


def bench_refine_levels(repeats: int) -> list[dict]:
    """Render time of each default refinement level (120x94 X-ray geometry, AP pose)."""
    from medreg.io.images import read_image
    from medreg.xray.drr import render_reference
    from medreg.xray.geometry import CArmGeometry, canonical_pose
    from medreg.xray.refine import Pyramid

    ct = read_image(CT, dtype=torch.float32)
    g = CArmGeometry(sdd=SDD, sid=SID, width=120, height=94, pixel_size=3.2)
    pose = canonical_pose(ct.grid.center(), g)
    rows = []
    for stage in Pyramid(ct, g).stages:
        lg, lv = stage.geometry, stage.level
        ref = render_reference(ct, lg, pose, step=0.25, supersample=1)
        with torch.no_grad():
            sec, img = _time(lambda r=stage.renderer: r(pose), repeats)
        rows.append({"tool": "medreg", "mode": f"refine level, {lv.voxel_mm:g} mm CT, "
                     f"step x{lv.step_factor:g}", "detector": f"{lg.width}x{lg.height}",
                     "seconds": sec, "rel_rms_vs_own_reference": _rel_rms(img, ref)})
    return rows


def bench_diffdrr(repeats: int) -> list[dict]:
    from diffdrr.data import read
    from diffdrr.drr import DRR

    subject = read(str(CT), orientation="AP")
    rows = []
    rot = torch.tensor([[0.0, 0.0, 0.0]])
    trans = torch.tensor([[0.0, SID, 0.0]])
    for w, h, px in DETECTORS:
        exact = DRR(subject, sdd=SDD, height=h, width=w, delx=px, renderer="siddon")
        with torch.no_grad():
            sec_s, ref = _time(lambda d=exact: d(rot, trans, parameterization="euler_angles",
                                                  convention="ZXY"), repeats)
        rows.append({"tool": "diffdrr", "mode": "siddon", "detector": f"{w}x{h}",
                     "seconds": sec_s, "rel_rms_vs_own_reference": 0.0})
        for n_points in (500, 250):
            tri = DRR(subject, sdd=SDD, height=h, width=w, delx=px, renderer="trilinear")
            with torch.no_grad():
                sec, img = _time(lambda d=tri, n=n_points: d(
                    rot, trans, parameterization="euler_angles", convention="ZXY",
                    n_points=n), repeats)
            # DiffDRR scales Siddon and trilinear differently; compare after a least-squares gain
            gain = float((img.double() * ref.double()).sum() / (img.double() ** 2).sum())
            rows.append({"tool": "diffdrr", "mode": f"trilinear, {n_points} points",
                         "detector": f"{w}x{h}", "seconds": sec,
                         "rel_rms_vs_own_reference": _rel_rms(img * gain, ref)})
    return rows


def bench_init(patient: str, repeats: int) -> dict:
    from medreg.io.images import read_image
    from medreg.xray.drr import render_reference
    from medreg.xray.geometry import CArmGeometry, canonical_pose
    from medreg.xray.network import MIN_CONFIDENCE
    from medreg.xray.pipeline import detect_landmarks, load_patient
    from medreg.xray.pnp import solve_pnp

    p = load_patient(patient)
    g = CArmGeometry.from_dict(p.info["geometry"])
    ct = read_image(p.info["ct"], dtype=torch.float32) if p.info.get("ct") else None
    if ct is None:
        return {"init": "patient folder names no CT"}
    x = render_reference(ct, g, canonical_pose(np.asarray(p.info["isocenter"]), g), step=0.5)
    index = {n: i for i, n in enumerate(p.meta["names"])}
    rows = [index[n] for n in p.names]

    def init():
        uv, conf = detect_landmarks(p, x, g)
        ok = conf[rows] >= MIN_CONFIDENCE
        return solve_pnp(p.landmarks[ok], uv[rows][ok], g)

    sec, res = _time(init, repeats)
    return {"init_ms": 1000 * sec, "init_success": bool(res.success), "detector": g.width}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--patient", help="prepared patient folder: also time detection + PnP")
    ap.add_argument("--skip-diffdrr", action="store_true")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = bench_medreg(args.repeats) + bench_refine_levels(args.repeats)
    if not args.skip_diffdrr:
        rows += bench_diffdrr(args.repeats)
    print(f"torch {torch.__version__}, {args.threads} thread(s)")
    print(f"{'tool':8s} {'mode':36s} {'detector':9s} {'ms':>9s} {'rel RMS':>8s}")
    for r in rows:
        print(f"{r['tool']:8s} {r['mode']:36s} {r['detector']:9s} {1000 * r['seconds']:9.1f} "
              f"{r['rel_rms_vs_own_reference']:8.5f}")
    out = {"threads": args.threads, "torch": torch.__version__, "rows": rows}
    if args.patient:
        out["init"] = bench_init(args.patient, args.repeats)
        print("initialization:", out["init"])
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
