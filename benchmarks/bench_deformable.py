"""Deformable registration benchmark: medreg against ANTsPy, DIPY, elastix and SimpleITK.

Run from the repository root in the benchmark environment (``make bench-env``)::

    .venv-bench/bin/python benchmarks/bench_deformable.py --resolution 2 --timeout 900

Case: Colin27 (skull-stripped ``ch2bet``) is warped at 1 mm by ``exp(-v)`` for a random smooth
stationary velocity field ``v`` (mean 3 mm, correlation 15 mm, seed 1), so the true fixed->moving
mapping is ``exp(v)``; fixed and moving images are then smoothed and reduced to the benchmark
resolution in the same way. The AAL labels are warped at 1 mm with nearest neighbour.

Every tool runs in its own subprocess limited to 2 threads; its result is turned into one
fixed->moving displacement field on the fixed grid (ITK convention, LPS mm), which the parent
scores identically for everyone: mean / 95th percentile of ``|T(x) - exp(v)(x)|`` over the AAL
brain voxels, mean AAL Dice (fixed labels vs the 1 mm moving labels pulled through ``T``),
% of voxels with ``det J <= 0`` in the brain, wall and CPU time of the registration call
(reading and writing excluded; CPU summed over threads), CPU time of the whole child and its
peak RSS (imports included).

Conventions of the peers (verified by the recovered error, which would be of the order of the
true displacement were a sign or axis flip wrong):
    * ANTsPy: ``apply_transforms(..., compose=prefix)`` writes the composite fixed->moving field.
    * elastix: ``transformix_deformation_field`` gives the fixed->moving field (LPS).
    * SimpleITK: ``TransformToDisplacementField`` of the fitted B-spline transform.
    * DIPY: ``DiffeomorphicMap.get_forward_field()`` holds static->moving displacements in the
      NIfTI (RAS) world on the static voxel grid (i, j, k); x and y components are negated to LPS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from harness import peak_rss_mb, thread_env

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
COLIN = ROOT.parent / "shared/data/brain/colin27"
MNI = ROOT.parent / "shared/data/brain/mni152_2009a"
THREADS = "2"
PEERS = ("medreg-syn", "medreg-svf", "medreg-bspline", "ants-syn", "ants-synra", "dipy-syn",
         "elastix-bspline", "simpleitk-bspline", "medreg-affine-syn", "medreg-syn-masked",
         "ants-syn-masked")


# --------------------------------------------------------------------------- case
def build_case(root: Path, resolution: float, seed: int = 1) -> Path:
    """Write fixed/moving images, labels and the true velocity for one resolution."""
    import torch

    from medreg.deformable.pyramid import smooth_downsample
    from medreg.deformable.synthetic import random_velocity
    from medreg.io.images import read_image, write_image
    from medreg.resample import resample

    case = root / f"colin27-{resolution:g}mm"
    if (case / "done").exists():
        return case
    case.mkdir(parents=True, exist_ok=True)
    img = read_image(COLIN / "ch2bet.nii.gz").float()
    lab = read_image(COLIN / "aal.nii.gz")
    grid = img.grid.downsample(resolution) if resolution > 1 else img.grid
    true = random_velocity(img.grid.downsample(4), mean_mm=3.0, smoothness_mm=15.0, seed=seed)
    fixed = smooth_downsample(img, resolution, grid) if resolution > 1 else img
    warped = resample(img, img.grid, true.inverse())
    moving = smooth_downsample(warped, resolution, grid) if resolution > 1 else warped
    write_image(fixed, case / "fixed.nii.gz")
    write_image(moving, case / "moving.nii.gz")
    write_image(resample(lab, grid, interpolation="nearest"), case / "labels_fixed.nii.gz")
    write_image(resample(lab, lab.grid, true.inverse(), interpolation="nearest"),
                case / "labels_moving_1mm.nii.gz")
    torch.save(dict(velocity=true.velocity.detach(), grid=true.grid.to_dict(), steps=true.steps),
               case / "true.pt")
    (case / "done").write_text("ok")
    return case


def _tissue_kmeans(brain: np.ndarray, iterations: int = 30) -> np.ndarray:
    """CSF/GM/WM (0/1/2) by 1D 3-means of T1 intensities inside a skull-stripped brain (> 0)."""
    vals = brain[brain > 0].astype(np.float64)
    centres = np.percentile(vals, [10, 50, 90])
    for _ in range(iterations):
        cls = np.argmin(np.abs(vals[:, None] - centres[None]), axis=1)
        centres = np.array([vals[cls == k].mean() for k in range(3)])
    out = np.zeros(brain.shape, np.int16)
    out[brain > 0] = np.argmin(np.abs(vals[:, None] - centres[None]), axis=1)  # 0 CSF, 1 GM, 2 WM
    return out


def build_inter_case(root: Path, resolution: float) -> Path:
    """Colin27's brain (moving) onto the ICBM 2009a template (fixed), tissue labels.

    The template in ``../shared/data`` (nilearn's copy) is skull-stripped, so the moving image is
    Colin27's skull-stripped T1 (``ch2bet``): registering a whole head onto a brain-only
    template would reward squeezing the scalp into the brain.

    Fixed labels: GM (1) / WM (2) where the template's GM / WM probability is the larger and
    above 0.5. Moving labels (1 mm, Colin27 grid): the GM and WM classes of a 3-means of the
    skull-stripped Colin27 intensities. Both images live in MNI world space; the
    ``*-affine-*`` rows add a linear stage first. ``moving_mask.nii.gz`` (Colin27's brain) is
    used by the ``*-masked`` rows only.
    """
    import torch

    from medreg.core.image import Image
    from medreg.deformable.pyramid import smooth_downsample
    from medreg.io.images import read_image, write_image
    from medreg.resample import resample

    case = root / f"colin27brain-to-mni-{resolution:g}mm"
    if (case / "done").exists():
        return case
    case.mkdir(parents=True, exist_ok=True)
    t1 = read_image(MNI / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz").float()
    gm = read_image(MNI / "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz").tensor.float()
    wm = read_image(MNI / "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz").tensor.float()
    colin_bet = read_image(COLIN / "ch2bet.nii.gz")
    grid = t1.grid.downsample(resolution) if resolution > 1 else t1.grid
    fixed = smooth_downsample(t1, resolution, grid) if resolution > 1 else t1
    brain = colin_bet.float()
    mgrid = brain.grid.downsample(resolution) if resolution > 1 else brain.grid
    moving = smooth_downsample(brain, resolution, mgrid) if resolution > 1 else brain
    lab = torch.zeros_like(gm, dtype=torch.int16)
    lab[(gm >= wm) & (gm > 127)] = 1
    lab[(wm > gm) & (wm > 127)] = 2
    tissue = _tissue_kmeans(colin_bet.tensor[0].numpy())
    write_image(fixed, case / "fixed.nii.gz")
    write_image(moving, case / "moving.nii.gz")
    write_image(resample(Image(lab, t1.grid), grid, interpolation="nearest"),
                case / "labels_fixed.nii.gz")
    write_image(Image(torch.from_numpy(tissue)[None], colin_bet.grid),  # CSF (0) not scored
                case / "labels_moving_1mm.nii.gz")
    write_image(Image((colin_bet.tensor > 0).to(torch.uint8), colin_bet.grid),  # brain mask
                case / "moving_mask.nii.gz")
    (case / "done").write_text("ok")
    return case


# --------------------------------------------------------------------------- peers (child)
_T0: list[tuple[float, float]] = []
_CPU: list[float] = []  # process CPU seconds of the registration call (all threads)


def _start() -> None:
    _T0.append((time.perf_counter(), time.process_time()))


def _stop() -> float:
    wall0, cpu0 = _T0[-1]
    _CPU.append(time.process_time() - cpu0)
    return time.perf_counter() - wall0


def run_medreg(case: Path, out: Path, stage: str, masked: bool = False,
               linear: bool = False) -> float:
    """medreg's ``stage`` with LNCC; ``linear`` puts ``rigid,affine`` (MI, centres of mass) first,
    as ANTs' ``SyN`` does."""
    import torch

    from medreg.io.fields import write_displacement_field
    from medreg.io.images import read_image
    from medreg.registration.api import register

    torch.set_num_threads(int(THREADS))
    fixed, moving = read_image(case / "fixed.nii.gz"), read_image(case / "moving.nii.gz")
    mask = read_image(case / "moving_mask.nii.gz") if masked else None
    _start()
    opts = json.loads(os.environ.get("MEDREG_BENCH_OPTIONS", "{}"))
    if linear:
        opts = {"deformable_metric": "lncc", **opts}
    res = register(fixed, moving, transform=f"rigid,affine,{stage}" if linear else stage,
                   metric="mi" if linear else "lncc", init="com" if linear else "none",
                   moving_mask=mask, **opts)
    took = _stop()
    write_displacement_field(res.transform, fixed.grid, out)
    return took


def run_ants(case: Path, out: Path, kind: str, masked: bool = False) -> float:
    import ants

    fixed = ants.image_read(str(case / "fixed.nii.gz"))
    moving = ants.image_read(str(case / "moving.nii.gz"))
    mask = ants.image_read(str(case / "moving_mask.nii.gz")) if masked else None
    _start()
    reg = ants.registration(fixed, moving, type_of_transform=kind, moving_mask=mask)
    took = _stop()
    prefix = str(out.parent / "ants_composite_")
    field = ants.apply_transforms(fixed, moving, reg["fwdtransforms"], compose=prefix)
    os.replace(field, out)
    return took


def run_dipy(case: Path, out: Path) -> float:
    import nibabel as nib
    from dipy.align.imwarp import SymmetricDiffeomorphicRegistration
    from dipy.align.metrics import CCMetric

    f, m = nib.load(str(case / "fixed.nii.gz")), nib.load(str(case / "moving.nii.gz"))
    static, moving = np.asarray(f.dataobj, np.float64), np.asarray(m.dataobj, np.float64)
    _start()
    sdr = SymmetricDiffeomorphicRegistration(CCMetric(3), level_iters=[100, 100, 25])
    mapping = sdr.optimize(static, moving, f.affine, m.affine)
    took = _stop()
    disp = np.asarray(mapping.get_forward_field(), np.float32) * np.array([-1, -1, 1], np.float32)
    nii = nib.Nifti1Image(disp[:, :, :, None, :], f.affine)
    nii.header.set_intent("vector")
    nib.save(nii, str(out))
    return took


def run_elastix(case: Path, out: Path) -> float:
    import itk

    fixed = itk.imread(str(case / "fixed.nii.gz"), itk.F)
    moving = itk.imread(str(case / "moving.nii.gz"), itk.F)
    params = itk.ParameterObject.New()
    params.AddParameterMap(params.GetDefaultParameterMap("bspline"))
    _start()
    _, result = itk.elastix_registration_method(fixed, moving, parameter_object=params,
                                                log_to_console=False)
    took = _stop()
    field = itk.transformix_deformation_field(moving, result)
    field.CopyInformation(fixed)
    itk.imwrite(field, str(out))
    return took


def run_simpleitk(case: Path, out: Path) -> float:
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(int(THREADS))
    fixed = sitk.ReadImage(str(case / "fixed.nii.gz"), sitk.sitkFloat32)
    moving = sitk.ReadImage(str(case / "moving.nii.gz"), sitk.sitkFloat32)
    _start()
    mesh = [max(int(round(s * sp / 12.0)), 1) for s, sp in zip(fixed.GetSize(),
                                                               fixed.GetSpacing(), strict=True)]
    tx = sitk.BSplineTransformInitializer(fixed, mesh)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsCorrelation()
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.2, 1)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=100)
    reg.SetShrinkFactorsPerLevel([4, 2, 1])
    reg.SetSmoothingSigmasPerLevel([2, 1, 0])
    reg.SetInitialTransform(tx, inPlace=True)
    final = reg.Execute(fixed, moving)
    took = _stop()
    field = sitk.TransformToDisplacementField(final, sitk.sitkVectorFloat32, fixed.GetSize(),
                                              fixed.GetOrigin(), fixed.GetSpacing(),
                                              fixed.GetDirection())
    sitk.WriteImage(field, str(out))
    return took


RUNNERS = {
    "medreg-syn": lambda c, o: run_medreg(c, o, "syn"),
    "medreg-svf": lambda c, o: run_medreg(c, o, "svf"),
    "medreg-bspline": lambda c, o: run_medreg(c, o, "bspline"),
    "medreg-affine-syn": lambda c, o: run_medreg(c, o, "syn", linear=True),
    "medreg-syn-masked": lambda c, o: run_medreg(c, o, "syn", masked=True),  # inter-subject
    "ants-syn": lambda c, o: run_ants(c, o, "SyN"),
    "ants-synra": lambda c, o: run_ants(c, o, "SyNRA"),
    "ants-syn-masked": lambda c, o: run_ants(c, o, "SyN", masked=True),  # inter-subject
    "dipy-syn": run_dipy,
    "elastix-bspline": run_elastix,
    "simpleitk-bspline": run_simpleitk,
}


def child_main(peer: str, case: Path, out: Path) -> int:
    took = RUNNERS[peer](case, out / "field.nii.gz")
    ru = resource.getrusage(resource.RUSAGE_SELF)
    (out / "result.json").write_text(json.dumps(dict(
        seconds=took, call_cpu_seconds=_CPU[-1] if _CPU else None,
        cpu_seconds=ru.ru_utime + ru.ru_stime, peak_rss_mb=peak_rss_mb())))
    return 0


# --------------------------------------------------------------------------- parent
def run_peer(peer: str, case: Path, timeout: float, work: Path) -> dict:
    out = work / peer
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", peer,
           str(case.resolve()), str(out.resolve())]
    load = os.getloadavg()[0]  # other users' jobs inflate wall times; recorded with each row
    try:  # run inside `out`: transformix leaves deformationField.nii in its working directory
        proc = subprocess.run(cmd, env=thread_env(THREADS), timeout=timeout, capture_output=True,
                              text=True, cwd=out)
    except subprocess.TimeoutExpired:
        return dict(peer=peer, error=f"timeout after {timeout:g} s")
    if proc.returncode != 0:
        lines = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        return dict(peer=peer, error=f"exit {proc.returncode}: " + (lines[-1][:200] if lines
                                                                     else "no message"))
    return dict(peer=peer, **json.loads((out / "result.json").read_text()),
                field=str(out / "field.nii.gz"), load_before=load,
                load_after=os.getloadavg()[0])


def evaluate(case: Path, field_path: Path) -> dict:
    """Dense error, Dice and folding of a fixed->moving field, the same for every tool."""
    import torch

    from medreg.core.grid import Grid
    from medreg.deformable.transforms import StationaryVelocityField
    from medreg.evaluation import dice, folding_percent, jacobian_map, std_log_jacobian
    from medreg.io.fields import read_displacement_field
    from medreg.io.images import read_image
    from medreg.resample import resample

    lab_f = read_image(case / "labels_fixed.nii.gz")
    lab_m = read_image(case / "labels_moving_1mm.nii.gz")
    if not (case / "true.pt").exists():
        return evaluate_tissue(lab_f, lab_m, read_displacement_field(field_path))
    saved = torch.load(case / "true.pt")
    true = StationaryVelocityField(Grid(**saved["grid"]), saved["velocity"], saved["steps"])
    field = read_displacement_field(field_path)
    if not field.grid.is_close(lab_f.grid, tol=1e-3):
        raise ValueError(f"field grid {field.grid} is not the fixed grid {lab_f.grid}")
    brain = lab_f.tensor[0] > 0
    pts = lab_f.grid.world_points()
    with torch.no_grad():
        truth = true(pts)
        err = (field(pts) - truth).norm(dim=-1)[brain]
        before = (truth - pts).norm(dim=-1)[brain]
    jac = jacobian_map(field, lab_f.grid)
    warped = resample(lab_m, lab_f.grid, field, interpolation="nearest")
    return dict(error_mm=float(err.mean()), error_p95_mm=float(err.quantile(0.95)),
                initial_error_mm=float(before.mean()), dice=dice(lab_f, warped)["mean"],
                folding_percent=folding_percent(jac, brain),
                std_log_jacobian=std_log_jacobian(jac, brain))


def evaluate_tissue(lab_f, lab_m, field) -> dict:
    """Inter-subject case: GM / WM Dice and folding inside the template's tissue."""
    from medreg.evaluation import dice, folding_percent, jacobian_map, std_log_jacobian
    from medreg.resample import resample

    if not field.grid.is_close(lab_f.grid, tol=1e-3):
        raise ValueError(f"field grid {field.grid} is not the fixed grid {lab_f.grid}")
    brain = lab_f.tensor[0] > 0
    jac = jacobian_map(field, lab_f.grid)
    warped = resample(lab_m, lab_f.grid, field, interpolation="nearest")
    d = dice(lab_f, warped, labels=[1, 2])
    return dict(gm_dice=d["per_label"][1], wm_dice=d["per_label"][2], dice=d["mean"],
                folding_percent=folding_percent(jac, brain),
                std_log_jacobian=std_log_jacobian(jac, brain))


def identity_scores(case: Path, work: Path) -> dict:
    import torch

    from medreg.deformable.transforms import DisplacementField
    from medreg.io.fields import write_displacement_field
    from medreg.io.images import read_image

    grid = read_image(case / "labels_fixed.nii.gz").grid
    path = write_displacement_field(DisplacementField(grid, torch.zeros(1, 3, *grid.shape)),
                                    grid, work / "identity.nii.gz")
    return evaluate(case, path)


def markdown_tissue(rows: list[dict]) -> str:
    head = ("| tool | GM Dice | WM Dice | mean | folded % | SD log J | wall (s) | CPU call (s) "
            "| peak RSS (MB) | load before/after |\n|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['peer']} | {r['error']} | | | | | | | | |")
            continue
        lines.append(f"| {r['peer']} | {r['gm_dice']:.3f} | {r['wm_dice']:.3f} | "
                     f"{r['dice']:.3f} | {r['folding_percent']:.4f} | "
                     f"{r['std_log_jacobian']:.3f} | {r.get('seconds', 0):.1f} | "
                     f"{r.get('call_cpu_seconds') or 0:.1f} | {r.get('peak_rss_mb', 0):.0f} | "
                     f"{r.get('load_before', 0):.1f} / {r.get('load_after', 0):.1f} |")
    return head + "\n".join(lines)


def markdown(rows: list[dict]) -> str:
    if rows and "gm_dice" in rows[0]:
        return markdown_tissue(rows)
    head = ("| tool | mean error (mm) | p95 (mm) | AAL Dice | folded % | SD log J | wall (s) "
            "| CPU call (s) | CPU process (s) | peak RSS (MB) | load before/after |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['peer']} | {r['error']} | | | | | | | | | |")
            continue
        lines.append(f"| {r['peer']} | {r['error_mm']:.3f} | {r['error_p95_mm']:.2f} | "
                     f"{r['dice']:.3f} | {r['folding_percent']:.4f} | "
                     f"{r['std_log_jacobian']:.3f} | {r.get('seconds', 0):.1f} | "
                     f"{r.get('call_cpu_seconds') or 0:.1f} | {r.get('cpu_seconds', 0):.1f} | "
                     f"{r.get('peak_rss_mb', 0):.0f} | {r.get('load_before', 0):.1f} / "
                     f"{r.get('load_after', 0):.1f} |")
    return head + "\n".join(lines)


def parent_main(args: argparse.Namespace) -> int:
    work = Path(args.workdir or tempfile.mkdtemp(prefix="medreg-bench-deformable-"))
    case = (build_inter_case(work, args.resolution) if args.case == "inter-subject"
            else build_case(work, args.resolution))
    rows = [dict(peer="identity (before)", **identity_scores(case, work))]
    for peer in args.peers:
        res = run_peer(peer, case, args.timeout, work)
        if "error" not in res:
            res.update(evaluate(case, Path(res["field"])))
        rows.append(res)
        print(markdown(rows[-1:]).splitlines()[-1], flush=True)
    print(markdown(rows))
    if args.json:
        out = dict(resolution=args.resolution, case=args.case, rows=rows)
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", nargs=3, metavar=("PEER", "CASE", "OUT"), help=argparse.SUPPRESS)
    p.add_argument("--resolution", type=float, default=2.0, help="mm (default 2)")
    p.add_argument("--case", default="known-warp", choices=("known-warp", "inter-subject"),
                   help="Colin27 warped by a known field (default), or Colin27's brain onto the "
                        "(skull-stripped) ICBM 2009a template scored by tissue Dice")
    p.add_argument("--peers", nargs="+", default=list(PEERS), choices=PEERS)
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per tool")
    p.add_argument("--workdir", help="keep cases and fields here (default: a temp folder)")
    p.add_argument("--json", help="write all numbers to this file")
    p.add_argument("--medreg-options", default="{}",
                   help="JSON stage options for the medreg runs, e.g. "
                        "'{\"iterations\": [60, 30, 10]}'")
    args = p.parse_args(argv)
    if args.child:
        peer, case, out = args.child
        return child_main(peer, Path(case), Path(out))
    os.environ["MEDREG_BENCH_OPTIONS"] = args.medreg_options  # read by the medreg children
    return parent_main(args)


if __name__ == "__main__":
    sys.exit(main())
