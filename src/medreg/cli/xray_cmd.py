"""``medreg xray``: DRRs, landmark training, patient preparation, registration, evaluation."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from medreg.cli.common import add_overwrite, prepare_outdir
from medreg.errors import MedregError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("xray", help="X-ray to CT registration (Esteban et al. 2019)",
                              description="X-ray to CT registration: DRRs, landmark training, "
                              "patient preparation, registration, evaluation.")
    sub = p.add_subparsers(dest="xray_command", required=True)
    _add_drr(sub)
    _add_landmarks(sub)
    _add_train(sub)
    _add_prepare(sub)
    _add_register(sub)
    _add_evaluate(sub)


def _geometry(path: str | None):
    from medreg.xray.geometry import CArmGeometry

    return CArmGeometry.load(path) if path else CArmGeometry()


def _threads(args) -> None:
    import torch

    torch.set_num_threads(max(1, int(args.threads)))


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1 is often fastest for these small kernels)")


def _check_file_out(path: Path, overwrite: bool) -> Path:
    if path.exists() and not overwrite:
        raise FileExistsError(f"output file {path} exists; pass --overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


# ----------------------------------------------------------------------------- drr
def _add_drr(sub) -> None:
    p = sub.add_parser("drr", help="render a DRR of a CT at a pose")
    p.add_argument("ct", help="CT in HU (NIfTI, MHA, DICOM folder, ...)")
    p.add_argument("--geometry", help="C-arm geometry JSON (default: the paper's C-arm)")
    p.add_argument("--pose", required=True, help="pose JSON with 'ct_to_camera'")
    p.add_argument("-o", "--output", required=True, help="drr.nii.gz, .mha, .png or .npy")
    p.add_argument("--voxel-mm", type=float, default=None,
                   help="block-average the CT to about this voxel size first (fast mode)")
    p.add_argument("--reference", action="store_true",
                   help="high-fidelity renderer (full resolution, 0.25 mm steps, 2x2 rays)")
    _common(p)
    add_overwrite(p)
    p.set_defaults(func=run_drr)


def run_drr(args) -> int:
    from medreg.io.images import read_image
    from medreg.xray.drr import DRRRenderer, attenuation_volume, crop_to_body, render_reference
    from medreg.xray.geometry import load_pose
    from medreg.xray.io import write_drr

    _threads(args)
    out = _check_file_out(Path(args.output), args.overwrite)
    geometry, pose = _geometry(args.geometry), load_pose(args.pose)
    ct = read_image(args.ct)
    t0 = time.perf_counter()
    if args.reference:
        drr = render_reference(ct, geometry, pose)
    else:
        renderer = DRRRenderer(crop_to_body(attenuation_volume(ct, args.voxel_mm)), geometry)
        drr = renderer.render_many(pose[None])
    write_drr(drr[0, 0], geometry, out)
    print(f"wrote {out} ({geometry.width}x{geometry.height}, {time.perf_counter() - t0:.2f} s)")
    return 0


# ----------------------------------------------------------------------------- landmarks
def _add_landmarks(sub) -> None:
    p = sub.add_parser("landmarks", help="the 23 bone landmarks from a TotalSegmentator label map")
    p.add_argument("labels", help="label map (same grid as the CT)")
    p.add_argument("--structures", required=True, help="structures.csv (structure,id)")
    p.add_argument("-o", "--output", required=True, help="landmarks CSV (name,x,y,z LPS mm)")
    add_overwrite(p)
    p.set_defaults(func=run_landmarks)


def run_landmarks(args) -> int:
    from medreg.io.images import read_image
    from medreg.xray.landmarks import landmarks_from_labels, read_structures, save_landmarks

    out = _check_file_out(Path(args.output), args.overwrite)
    pts = landmarks_from_labels(read_image(args.labels), read_structures(args.structures))
    save_landmarks(out, pts)
    print(f"wrote {len(pts)} landmarks to {out}")
    return 0


# ----------------------------------------------------------------------------- train
def _add_train(sub) -> None:
    p = sub.add_parser("train", help="phase 1: train the landmark network on DRRs")
    p.add_argument("ct", nargs="+", help="annotated CT(s) in HU")
    p.add_argument("--landmarks", nargs="+", required=True, help="one landmarks CSV per CT")
    p.add_argument("-o", "--output", required=True, help="model file (.pt)")
    p.add_argument("--geometry", help="C-arm geometry JSON (default: the paper's C-arm)")
    p.add_argument("--detector-scale", type=float, default=2.0,
                   help="network detector = geometry shrunk by this (2: 240x188 -> 120x94)")
    p.add_argument("--variants", type=int, default=3,
                   help="training variants per CT (deformation, intensity, noise) besides it")
    p.add_argument("--poses", type=int, default=100,
                   help="random DRR poses per CT/variant (the paper: 3456 on a 6x3x3x4x4x4 grid)")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--time-limit", type=float, default=None, help="stop training after S s")
    p.add_argument("--width", type=int, default=16, help="network width (channels)")
    p.add_argument("--sigma", type=float, default=1.5, help="heatmap Gaussian sigma (px / 2)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--init-model", help="start from these weights (continue training)")
    p.add_argument("--seed", type=int, default=0, help="seed of poses, variants and training")
    _common(p)
    add_overwrite(p)
    p.set_defaults(func=run_train)


def run_train(args) -> int:
    import torch

    from medreg.io.images import read_image
    from medreg.xray.dataset import isocenter, render_set, training_poses
    from medreg.xray.landmarks import load_landmarks
    from medreg.xray.network import LandmarkNet, TrainConfig, load_model, save_model, train
    from medreg.xray.variants import make_variant

    _threads(args)
    if len(args.landmarks) != len(args.ct):
        raise MedregError(f"give one landmarks CSV per CT ({len(args.ct)} CTs, "
                          f"{len(args.landmarks)} CSVs)")
    out = _check_file_out(Path(args.output), args.overwrite)
    geometry = _geometry(args.geometry).scaled(args.detector_scale)
    images, uvs, names, iso = [], [], None, None
    for k, (ct_path, lm_path) in enumerate(zip(args.ct, args.landmarks, strict=True)):
        names_k, lm = load_landmarks(lm_path)
        names = names or names_k
        if names_k != names:
            raise MedregError(f"{lm_path} names differ from the first landmarks file")
        ct = read_image(ct_path, dtype=torch.float32)
        iso = isocenter(lm) if iso is None else iso
        patients = [(ct, lm)]
        for s in range(args.variants):
            v = make_variant(ct, seed=100 * k + s + 10 * args.seed)
            patients.append((v.ct, v.from_source(lm)))
        for j, (vol, pts) in enumerate(patients):
            poses = training_poses(pts, geometry, args.poses, seed=1000 * k + j + 7 * args.seed)
            im, uv = render_set(vol, pts, geometry, poses, progress=True,
                                desc=f"DRRs CT {k + 1} variant {j}")
            images.append(im)
            uvs.append(uv)
    images, uv = torch.cat(images), torch.cat(uvs)
    if args.init_model:
        model, old = load_model(args.init_model)
        if old["names"] != list(names) or old["geometry"] != geometry.to_dict():
            raise MedregError(f"{args.init_model} was trained for other landmarks or detector")
    else:
        model = LandmarkNet(len(names), args.width)
    meta = {"names": list(names), "geometry": geometry.to_dict(), "isocenter": iso.tolist(),
            "train_images": len(images)}
    cfg = TrainConfig(epochs=args.epochs, time_limit_s=args.time_limit, sigma=args.sigma,
                      lr=args.lr, seed=args.seed)
    hist = train(model, images, uv, cfg, checkpoint=out, meta=meta)
    meta["history"] = {"val_median_px": hist.val_median_px, "seconds": hist.seconds,
                       "stop": hist.stop}
    save_model(out, model, meta)
    print(f"wrote {out}: {len(images)} DRRs, val median error "
          f"{min(hist.val_median_px):.2f} px, {hist.seconds:.0f} s ({hist.stop})")
    return 0


# ----------------------------------------------------------------------------- prepare
def _add_prepare(sub) -> None:
    p = sub.add_parser("prepare", help="phases 2a-2c: refined landmarks + fine-tuned model")
    p.add_argument("ct", help="the patient's CT in HU")
    p.add_argument("--model", required=True, help="phase-1 model (.pt)")
    p.add_argument("-o", "--output", required=True, help="patient folder")
    p.add_argument("--tau", type=float, default=6.0, help="ray-pair distance threshold (mm)")
    p.add_argument("--finetune-epochs", type=int, default=4, help="phase 2c epochs (0: skip)")
    p.add_argument("--finetune-poses", type=int, default=120)
    _common(p)
    add_overwrite(p)
    p.set_defaults(func=run_prepare)


def run_prepare(args) -> int:
    import torch

    from medreg.io.images import read_image
    from medreg.xray.geometry import CArmGeometry
    from medreg.xray.network import TrainConfig, load_model
    from medreg.xray.prepare import prepare_patient

    _threads(args)
    outdir = prepare_outdir(args.output, args.overwrite)
    model, meta = load_model(args.model)
    ct = read_image(args.ct, dtype=torch.float32)
    geometry = CArmGeometry.from_dict(meta["geometry"])
    cfg = TrainConfig(epochs=args.finetune_epochs, lr=5e-4, seed=1)
    stats = prepare_patient(ct, model, meta, geometry, outdir, tau=args.tau, finetune=cfg,
                            finetune_poses=args.finetune_poses,
                            ct_path=str(Path(args.ct).resolve()))
    found = np.isfinite(stats.median[:, 0])
    print(f"wrote {outdir}: {int(found.sum())}/{len(found)} landmarks triangulated, "
          f"median snap {np.nanmedian(stats.snap_mm[found]):.1f} mm")
    return 0


# ----------------------------------------------------------------------------- register
def _add_register(sub) -> None:
    p = sub.add_parser("register", help="register an X-ray: automatic (--patient) or from a pose")
    p.add_argument("xray", help="X-ray (DICOM, NIfTI, PNG/TIFF or .npy)")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--patient", help="prepared patient folder (automatic initialization)")
    p.add_argument("--ct", help="CT in HU (default: the patient's)")
    p.add_argument("--geometry", help="X-ray geometry JSON (default: the patient's / paper's)")
    p.add_argument("--init-pose", help="initial pose JSON (intensity-only refinement)")
    p.add_argument("--metric", choices=("ncc", "lncc", "gradncc"), default="ncc")
    p.add_argument("--optimizer", choices=("bobyqa", "adam"), default="bobyqa")
    p.add_argument("--xray-kind", choices=("attenuation", "intensity"), default="attenuation",
                   help="attenuation: bone bright like a DRR; intensity: raw counts (-log used)")
    _common(p)
    add_overwrite(p)
    p.set_defaults(func=run_register)


def run_register(args) -> int:
    import torch

    from medreg.io.images import read_image
    from medreg.xray.drr import DRRRenderer, attenuation_volume, crop_to_body
    from medreg.xray.geometry import CArmGeometry, load_pose, save_pose
    from medreg.xray.io import read_xray, save_overlay
    from medreg.xray.refine import refine_pose

    _threads(args)
    if bool(args.patient) == bool(args.init_pose):
        raise MedregError("give exactly one of --patient (automatic) or --init-pose")
    outdir = prepare_outdir(args.output, args.overwrite)
    xray = read_xray(args.xray, args.xray_kind)
    report: dict = {"xray": str(args.xray), "metric": args.metric, "optimizer": args.optimizer}
    if args.init_pose:
        if not args.ct:
            raise MedregError("--init-pose needs --ct")
        geometry = _geometry(args.geometry)
        ct = read_image(args.ct, dtype=torch.float32)
        res = refine_pose(xray, ct, geometry, load_pose(args.init_pose), metric=args.metric,
                          optimizer=args.optimizer, progress=True)
        pose = res.pose
        report.update(similarity=res.similarity, initial_similarity=res.initial_similarity,
                      evaluations=res.evaluations, seconds=res.seconds, levels=res.history)
    else:
        from medreg.xray.pipeline import load_patient, register_auto

        patient = load_patient(args.patient)
        geometry = (CArmGeometry.load(args.geometry) if args.geometry
                    else CArmGeometry.from_dict(patient.info["geometry"]))
        ct_path = args.ct or patient.info.get("ct")
        if not ct_path:
            raise MedregError("the patient folder names no CT; pass --ct")
        ct = read_image(ct_path, dtype=torch.float32)
        auto = register_auto(xray, patient, ct, geometry, metric=args.metric,
                             optimizer=args.optimizer)
        report.update(detected=auto.detected, inliers=auto.inliers, timings=auto.timings,
                      refine=auto.refine, message=auto.message)
        if auto.pose is None:
            (outdir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
            raise MedregError(f"automatic initialization failed: {auto.message}")
        pose = auto.pose
        save_pose(auto.init_pose, outdir / "init_pose.json")
    save_pose(pose, outdir / "pose.json")
    (outdir / "report.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    renderer = DRRRenderer(crop_to_body(attenuation_volume(ct, 2.5)), geometry)
    save_overlay(xray, renderer.render_many(pose[None])[0, 0], outdir / "overlay.png",
                 title=f"{args.metric}/{args.optimizer}")
    print(f"wrote {outdir}/pose.json, report.json, overlay.png")
    return 0


# ----------------------------------------------------------------------------- evaluate
def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="the paper's protocol on held-out patient variants")
    p.add_argument("ct", help="annotated source CT in HU")
    p.add_argument("--landmarks", required=True, help="its landmarks CSV")
    p.add_argument("--model", required=True, help="phase-1 model (.pt)")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--geometry", help="C-arm geometry JSON (default: the model's detector)")
    p.add_argument("--patients", type=int, default=2, help="held-out variants (paper: 6 CTs)")
    p.add_argument("--rz", type=int, default=9, help="rotations about z in +-40 (paper: 9)")
    p.add_argument("--rx", type=int, default=3, help="rotations about x in +-15 (paper: 3)")
    p.add_argument("--tz", type=int, default=3, help="translations along z in +-15 (paper: 3)")
    p.add_argument("--max-poses", type=int, default=None,
                   help="evaluate an evenly spaced subset of each patient's poses")
    p.add_argument("--metrics", default="ncc", help="comma list of ncc,lncc,gradncc")
    p.add_argument("--finetune-epochs", type=int, default=3)
    p.add_argument("--photons", type=float, default=1e6,
                   help="unattenuated photons per detector pixel of the test X-rays (noise)")
    _common(p)
    add_overwrite(p)
    p.set_defaults(func=run_evaluate)


def run_evaluate(args) -> int:
    from medreg.xray.evaluate import EvalConfig, run_protocol

    _threads(args)
    outdir = prepare_outdir(args.output, args.overwrite)
    cfg = EvalConfig(patients=args.patients, rz=args.rz, rx=args.rx, tz=args.tz,
                     max_poses=args.max_poses, metrics=tuple(args.metrics.split(",")),
                     finetune_epochs=args.finetune_epochs, photons=args.photons)
    table = run_protocol(args.ct, args.landmarks, args.model, outdir, cfg,
                         geometry_path=args.geometry)
    print(table)
    return 0
