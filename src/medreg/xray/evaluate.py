"""The paper's evaluation protocol and error measures.

Measures (all from the ground-truth and estimated ``ct_to_camera`` poses):

* TRE: mean 3D distance (mm) of the *original* landmarks ``M`` moved by both poses
  (``|T_est X - T_gt X|`` in the camera frame).
* camera-centre distance: distance (mm) between the two source positions in CT world.
* rotation error: angle (deg) of ``R_est R_gt^T``.
* mPD (mean projection distance, van de Kraats et al. 2005): mean 3D distance (mm) of
  ``T_gt X`` to the ray from the source through the estimated projection of ``X``.
* success: ``mPD < 2.5 %`` of the detector width (9.6 mm for the 384 mm detector).

Protocol: held-out patients (variants with :data:`~medreg.xray.variants.TEST_SEEDS`), each
prepared with phases 2a-2c, then ``rz x rx x tz`` test poses (paper: 9 rotations about z in
+-40 deg x 3 tilts in +-15 deg x 3 shifts along z in +-15 mm = 81); every test X-ray is rendered
by the reference renderer from the patient's finer CT plus Poisson (quantum) noise.
"""

from __future__ import annotations

import copy
import csv
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from medreg.xray.drr import render_reference
from medreg.xray.geometry import (
    CArmGeometry,
    canonical_pose,
    pose_grid,
    rotation_error_deg,
    source_position,
    to_camera,
)

#: The paper's figures (Esteban et al. 2019, 6 pelvis CTs x 81 poses).
PAPER = {"init_tre": "15.0 +- 7.3", "init_ms": "102", "ncc_success": "472/486 (97.1 %)",
         "ncc_mpd": "3.4 +- 2.3", "lncc_success": "450/486 (92.6 %)", "lncc_mpd": "2.2 +- 1.6"}


def pose_errors(est: np.ndarray, gt: np.ndarray, points: np.ndarray,
                geometry: CArmGeometry) -> dict:
    """TRE, camera-centre distance, rotation error and mPD (mm, deg) of one estimate."""
    x_gt, x_est = to_camera(points, gt), to_camera(points, est)
    tre = float(np.linalg.norm(x_est - x_gt, axis=-1).mean())
    d = x_est / np.linalg.norm(x_est, axis=-1, keepdims=True)  # rays from the source (origin)
    along = (x_gt * d).sum(-1, keepdims=True)
    mpd = float(np.linalg.norm(x_gt - along * d, axis=-1).mean())
    return {"tre": tre, "centre": float(np.linalg.norm(source_position(est)
                                                        - source_position(gt))),
            "rotation": rotation_error_deg(est, gt), "mpd": mpd,
            "success": bool(mpd < 0.025 * geometry.detector_width_mm)}


def add_quantum_noise(line_integral: torch.Tensor, photons: float, seed: int) -> torch.Tensor:
    """Poisson noise of ``photons`` unattenuated counts per pixel, back to line integrals."""
    gen = torch.Generator().manual_seed(seed)
    counts = torch.poisson(photons * torch.exp(-line_integral.double()), generator=gen)
    return (-torch.log(counts.clamp(min=1.0) / photons)).float()


@dataclass
class EvalConfig:
    """Scale of the run (the paper: 6 patients, 9 x 3 x 3 poses, 240x188 detector)."""

    patients: int = 2
    rz: int = 9
    rx: int = 3
    tz: int = 3
    max_poses: int | None = None
    metrics: tuple[str, ...] = ("ncc",)
    finetune_epochs: int = 3
    photons: float = 1e6
    reference_step: float = 0.5
    reference_supersample: int = 2


def test_poses(center: np.ndarray, geometry: CArmGeometry, cfg: EvalConfig) -> np.ndarray:
    """``(K, 4, 4)`` test poses, an evenly spaced subset when ``cfg.max_poses`` is set."""
    poses = pose_grid(canonical_pose(center, geometry), center, rx=np.linspace(-15, 15, cfg.rx),
                      ry=[0.0], rz=np.linspace(-40, 40, cfg.rz), tz=np.linspace(-15, 15, cfg.tz))
    if cfg.max_poses and cfg.max_poses < len(poses):
        poses = poses[np.linspace(0, len(poses) - 1, cfg.max_poses).round().astype(int)]
    return poses


def run_protocol(ct_path: str, landmarks_path: str, model_path: str, outdir: Path,
                 cfg: EvalConfig, geometry_path: str | None = None) -> str:
    """Run the protocol; write ``cases.csv``, ``summary.json``, ``table.md``; return the table."""
    from medreg.io.images import read_image
    from medreg.xray.landmarks import load_landmarks
    from medreg.xray.network import load_model
    from medreg.xray.pipeline import load_patient, register_auto
    from medreg.xray.prepare import prepare_patient
    from medreg.xray.refine import Pyramid
    from medreg.xray.variants import TEST_SEEDS, make_variant

    ct = read_image(ct_path, dtype=torch.float32)
    _, lm = load_landmarks(landmarks_path)
    model, meta = load_model(model_path)
    net_geom = CArmGeometry.from_dict(meta["geometry"])
    geometry = CArmGeometry.load(geometry_path) if geometry_path else net_geom
    rows, pyramid_s = [], []
    for pi, seed in enumerate(TEST_SEEDS[: cfg.patients]):
        var = make_variant(ct, seed)
        m_true = var.from_source(lm)  # original landmark set M in this patient
        pdir = outdir / f"patient_{seed}"
        pdir.mkdir(exist_ok=True)
        from medreg.xray.network import TrainConfig

        prepare_patient(var.ct, copy.deepcopy(model), dict(meta), net_geom, pdir,
                        finetune=TrainConfig(epochs=cfg.finetune_epochs, lr=5e-4, seed=1),
                        progress=False)
        patient = load_patient(pdir)
        center = np.asarray(patient.info["isocenter"])
        poses = test_poses(center, geometry, cfg)
        t0 = time.perf_counter()
        pyramid = Pyramid(var.ct, geometry)  # once per patient: mu volumes and renderers
        pyramid_s.append(time.perf_counter() - t0)
        for k, gt in enumerate(tqdm(poses, desc=f"patient {seed}")):
            xray = render_reference(var.ct, geometry, gt, step=cfg.reference_step,
                                    supersample=cfg.reference_supersample, seed=k)
            xray = add_quantum_noise(xray, cfg.photons, seed=1000 * pi + k)[0, 0]
            for mi, metric in enumerate(cfg.metrics):
                t0 = time.perf_counter()
                res = register_auto(xray, patient, pyramid, geometry, metric=metric)
                row = {"patient": seed, "case": k, "metric": metric,
                       "detected": res.detected, "inliers": res.inliers,
                       "init_ms": 1000 * res.timings.get("init_s", np.nan),
                       "refine_s": res.timings.get("refine_s", np.nan),
                       "refine_cpu_s": res.timings.get("refine_cpu_s", np.nan),
                       "total_s": time.perf_counter() - t0, "message": res.message}
                if res.pose is None:
                    row.update(init_tre=np.nan, tre=np.nan, mpd=np.nan, success=False)
                else:
                    init = pose_errors(res.init_pose, gt, m_true, geometry)
                    fin = pose_errors(res.pose, gt, m_true, geometry)
                    row.update({f"init_{k2}": v for k2, v in init.items()})
                    row.update(fin)
                rows.append(row)
                if mi == 0 and k < 2 and res.pose is not None:
                    _overlay(xray, var.ct, geometry, res, pdir / f"case{k}_{metric}.png")
        _write_rows(outdir / "cases.csv", rows)
    summary = summarize(rows, cfg.metrics)
    summary["pyramid_build_s"] = pyramid_s
    summary["config"] = asdict(cfg)
    summary["geometry"] = geometry.to_dict()
    (outdir / "summary.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    table = format_table(summary, cfg.metrics)
    (outdir / "table.md").write_text(table + "\n")
    return table


def _overlay(xray, ct, geometry, res, path) -> None:
    from medreg.xray.drr import DRRRenderer, attenuation_volume, crop_to_body
    from medreg.xray.io import save_overlay

    r = DRRRenderer(crop_to_body(attenuation_volume(ct, 2.5)), geometry)
    save_overlay(xray, r.render_many(res.pose[None])[0, 0], path,
                 points={"detected": res.uv}, title=path.stem)


def _write_rows(path: Path, rows: list[dict]) -> None:
    keys = sorted({k for r in rows for k in r})
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, keys)
        w.writeheader()
        w.writerows(rows)


def _ms(v: np.ndarray, digits: int = 1) -> str:
    v = v[np.isfinite(v)]
    return f"{v.mean():.{digits}f} +- {v.std():.{digits}f}" if len(v) else "n/a"


def _timing(v: np.ndarray, limit: float = 10.0) -> str:
    """``mean +- sd (median m, max M; k/n under limit)`` of seconds."""
    v = v[np.isfinite(v)]
    if not len(v):
        return "n/a"
    return (f"{v.mean():.2f} +- {v.std():.2f} (median {np.median(v):.2f}, max {v.max():.2f}; "
            f"{int((v < limit).sum())}/{len(v)} under {limit:g} s)")


def summarize(rows: list[dict], metrics) -> dict:
    """Aggregate per metric: success count, mPD / TRE over successes, timings."""
    out: dict = {}
    first = [r for r in rows if r["metric"] == metrics[0]]
    init_tre = np.array([r.get("init_tre", np.nan) for r in first], float)
    out["cases"] = len(first)
    out["init_failures"] = int(np.sum(~np.isfinite(init_tre)))
    out["init_tre"] = _ms(init_tre)
    out["init_median_tre"] = float(np.nanmedian(init_tre)) if np.isfinite(init_tre).any() else None
    out["init_ms"] = _ms(np.array([r["init_ms"] for r in first], float))
    for m in metrics:
        rs = [r for r in rows if r["metric"] == m]
        ok = np.array([bool(r["success"]) for r in rs])
        mpd = np.array([r["mpd"] for r in rs], float)
        tre = np.array([r["tre"] for r in rs], float)
        rot = np.array([r.get("rotation", np.nan) for r in rs], float)
        out[m] = {"success": f"{int(ok.sum())}/{len(rs)} ({100 * ok.mean():.1f} %)",
                  "mpd_success": _ms(mpd[ok], 2), "tre_success": _ms(tre[ok], 2),
                  "rotation_success": _ms(rot[ok], 2), "mpd_all": _ms(mpd, 2),
                  "refine_s": _timing(np.array([r["refine_s"] for r in rs], float)),
                  "refine_cpu_s": _timing(np.array([r.get("refine_cpu_s", np.nan) for r in rs],
                                                   float))}
    return out


def table_from_cases(path: str | Path, metrics) -> str:
    """Rebuild the comparison table from a ``cases.csv`` written by :func:`run_protocol`."""
    with Path(path).open() as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        for k, v in r.items():
            if k not in ("metric", "message"):
                r[k] = (v == "True") if v in ("True", "False") else float(v) if v else np.nan
    return format_table(summarize(rows, tuple(metrics)), tuple(metrics))


def format_table(s: dict, metrics) -> str:
    """Markdown table: the paper's figures beside ours."""
    lines = ["| measure | paper (6 pelvis CTs, 486 X-rays) | medreg (chest variants, "
             f"{s['cases']} X-rays) |", "|---|---|---|",
             f"| initialization TRE (mm) | {PAPER['init_tre']} | {s['init_tre']} "
             f"({s['init_failures']} init failures) |",
             f"| initialization time (ms) | {PAPER['init_ms']} | {s['init_ms']} |"]
    for m in metrics:
        if m in ("ncc", "lncc"):
            lines.append(f"| BOBYQA+{m.upper()} success | {PAPER[m + '_success']} | "
                         f"{s[m]['success']} |")
            lines.append(f"| BOBYQA+{m.upper()} mPD (mm, successes) | {PAPER[m + '_mpd']} | "
                         f"{s[m]['mpd_success']} |")
        else:
            lines.append(f"| BOBYQA+{m} success | - | {s[m]['success']} |")
            lines.append(f"| BOBYQA+{m} mPD (mm) | - | {s[m]['mpd_success']} |")
        lines.append(f"| BOBYQA+{m} TRE on M (mm, successes) | - | {s[m]['tre_success']} |")
        lines.append(f"| BOBYQA+{m} rotation error (deg) | - | {s[m]['rotation_success']} |")
        lines.append(f"| {m} refinement wall time (s) | - | {s[m]['refine_s']} |")
        lines.append(f"| {m} refinement CPU time (s) | - | {s[m]['refine_cpu_s']} |")
    return "\n".join(lines)
