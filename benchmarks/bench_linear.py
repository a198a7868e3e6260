"""Linear (affine) registration benchmark: medreg against SimpleITK, elastix, ANTsPy and DIPY.

Run from the repository root in the benchmark environment (``make bench-env``)::

    .venv-bench/bin/python benchmarks/bench_linear.py --cases mono-2mm multi-2mm

Each (case, peer) pair runs in its own subprocess limited to 2 threads, so peak memory (max RSS
of that process, imports included) and wall time (the registration call only, image reading
excluded) are clean. Every peer's result is converted to a fixed->moving 4x4 LPS matrix and
compared with the known transform over the brain-mask voxels of the fixed image.

Conventions of the peers (all verified by the recovered error on the known cases, which would
be of the order of the true displacement were a direction or axis flip wrong):
    * SimpleITK / ANTs ``fwdtransforms`` / elastix ``TransformParameters``: fixed->moving, LPS.
    * DIPY ``AffineMap.affine``: static->moving in the NIfTI (RAS) world of the files, so the
      LPS matrix is ``F A F`` with ``F = diag(-1, -1, 1, 1)``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from harness import peak_rss_mb, thread_env

HERE = Path(__file__).resolve().parent
THREADS = "2"
PEERS = ("medreg-mi", "medreg-mi-ra", "medreg-ncc", "simpleitk", "elastix", "ants", "dipy")
LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


# --------------------------------------------------------------------------- helpers (child)
def _matrix_from_points(map_point, ndim: int = 3) -> np.ndarray:
    """4x4 matrix of a linear point map, read from the images of 0 and the unit vectors."""
    o = np.asarray(map_point([0.0] * ndim), dtype=np.float64)
    m = np.eye(ndim + 1)
    for i, e in enumerate(np.eye(ndim)):
        m[:ndim, i] = np.asarray(map_point(e.tolist()), dtype=np.float64) - o
    m[:ndim, ndim] = o
    return m


def run_simpleitk(case: Path) -> np.ndarray:
    """Mattes MI, affine, 3 levels (4, 2, 1), regular-step GD, physical-shift scales."""
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(int(THREADS))
    fixed = sitk.ReadImage(str(case / "fixed.nii.gz"), sitk.sitkFloat32)
    moving = sitk.ReadImage(str(case / "moving.nii.gz"), sitk.sitkFloat32)
    t0 = time.perf_counter()
    init = sitk.CenteredTransformInitializer(
        fixed, moving, sitk.AffineTransform(3),
        sitk.CenteredTransformInitializerFilter.GEOMETRY)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=50)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.2, seed=0)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=1.0, minStep=1e-4, numberOfIterations=300,
        gradientMagnitudeTolerance=1e-8, relaxationFactor=0.5)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([4, 2, 1])
    reg.SetSmoothingSigmasPerLevel([2, 1, 0])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    reg.SetInitialTransform(init, inPlace=False)
    tx = reg.Execute(fixed, moving)
    _record_time(t0)
    return _matrix_from_points(tx.TransformPoint)


def run_elastix(case: Path) -> np.ndarray:
    """itk-elastix with its default affine parameter map."""
    import itk

    fixed = itk.imread(str(case / "fixed.nii.gz"), itk.F)
    moving = itk.imread(str(case / "moving.nii.gz"), itk.F)
    params = itk.ParameterObject.New()
    params.AddParameterMap(params.GetDefaultParameterMap("affine"))
    t0 = time.perf_counter()
    _, result = itk.elastix_registration_method(
        fixed, moving, parameter_object=params, log_to_console=False,
        number_of_threads=int(THREADS))
    _record_time(t0)
    pmap = result.GetParameterMap(result.GetNumberOfParameterMaps() - 1)
    if result.GetNumberOfParameterMaps() != 1 or pmap["Transform"][0] != "AffineTransform":
        raise RuntimeError(f"unexpected elastix result {pmap['Transform']}")
    p = np.array([float(v) for v in pmap["TransformParameters"]])
    c = np.array([float(v) for v in pmap["CenterOfRotationPoint"]])
    a, t = p[:9].reshape(3, 3), p[9:]
    m = np.eye(4)
    m[:3, :3], m[:3, 3] = a, c + t - a @ c
    return m


def run_ants(case: Path) -> np.ndarray:
    """ANTsPy ``registration(type_of_transform="Affine")``; fwdtransforms map fixed->moving."""
    import ants
    import SimpleITK as sitk

    fixed = ants.image_read(str(case / "fixed.nii.gz"))
    moving = ants.image_read(str(case / "moving.nii.gz"))
    t0 = time.perf_counter()
    out = ants.registration(fixed, moving, type_of_transform="Affine", random_seed=0)
    _record_time(t0)
    tx = sitk.ReadTransform(out["fwdtransforms"][0])
    return _matrix_from_points(tx.TransformPoint)


def run_dipy(case: Path) -> np.ndarray:
    """DIPY AffineRegistration with MI: centres of mass -> translation -> rigid -> affine."""
    import nibabel as nib
    from dipy.align.imaffine import (
        AffineRegistration,
        MutualInformationMetric,
        transform_centers_of_mass,
    )
    from dipy.align.transforms import AffineTransform3D, RigidTransform3D, TranslationTransform3D

    f = nib.load(str(case / "fixed.nii.gz"))
    mv = nib.load(str(case / "moving.nii.gz"))
    static, s_aff = np.asarray(f.dataobj, dtype=np.float64), f.affine
    moving, m_aff = np.asarray(mv.dataobj, dtype=np.float64), mv.affine
    t0 = time.perf_counter()
    c_of_mass = transform_centers_of_mass(static, s_aff, moving, m_aff)
    reg = AffineRegistration(metric=MutualInformationMetric(32, None),
                             level_iters=[10000, 1000, 100], sigmas=[3.0, 1.0, 0.0],
                             factors=[4, 2, 1], verbosity=0)
    current = c_of_mass.affine
    for tr in (TranslationTransform3D(), RigidTransform3D(), AffineTransform3D()):
        current = reg.optimize(static, moving, tr, None, s_aff, m_aff,
                               starting_affine=current).affine
    _record_time(t0)
    return LPS_FROM_RAS @ current @ LPS_FROM_RAS


def _run_medreg(case: Path, metric: str, transform: str) -> np.ndarray:
    import torch

    import medreg

    torch.set_num_threads(int(THREADS))
    fixed = medreg.read_image(case / "fixed.nii.gz", dtype=torch.float32)
    moving = medreg.read_image(case / "moving.nii.gz", dtype=torch.float32)
    t0 = time.perf_counter()
    result = medreg.register(fixed, moving, transform=transform, metric=metric, seed=0)
    _record_time(t0)
    return result.transform.matrix().detach().to(torch.float64).numpy()


def run_medreg_mi(case: Path) -> np.ndarray:
    """medreg, Mattes MI, affine stage (defaults otherwise)."""
    return _run_medreg(case, "mi", "affine")


def run_medreg_mi_ra(case: Path) -> np.ndarray:
    """medreg, Mattes MI, two stages ``rigid,affine``."""
    return _run_medreg(case, "mi", "rigid,affine")


def run_medreg_ncc(case: Path) -> np.ndarray:
    """medreg, NCC, affine stage (mono-modal cases only)."""
    return _run_medreg(case, "ncc", "affine")


RUNNERS = {"medreg-mi": run_medreg_mi, "medreg-mi-ra": run_medreg_mi_ra,
           "medreg-ncc": run_medreg_ncc,
           "simpleitk": run_simpleitk, "elastix": run_elastix, "ants": run_ants,
           "dipy": run_dipy}

_TIMES: list[float] = []


def _record_time(t0: float) -> None:
    _TIMES.append(time.perf_counter() - t0)


def child_main(peer: str, case: Path, out: Path) -> int:
    """Run one peer on one case; write matrix, seconds and peak RSS to ``out`` (JSON)."""
    matrix = RUNNERS[peer](case)
    rss_mb = peak_rss_mb()
    out.write_text(json.dumps(dict(matrix=np.asarray(matrix).tolist(), seconds=_TIMES[-1],
                                   peak_rss_mb=rss_mb)))
    return 0


# --------------------------------------------------------------------------- parent
def run_peer(peer: str, case: Path, timeout: float, workdir: Path) -> dict:
    """Run a peer in a subprocess; returns its JSON plus ``status``."""
    out = workdir / f"{case.name}-{peer}.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", peer, str(case), str(out)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=thread_env(THREADS, ANTS_RANDOM_SEED="0"),
                              capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(status=f"timeout > {timeout:.0f} s")
    total = time.perf_counter() - t0
    if proc.returncode != 0 or not out.exists():
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return dict(status=f"failed: {last[:160]}")
    res = json.loads(out.read_text())
    res.update(status="ok", process_seconds=total)
    return res


def evaluate(case: Path, res: dict) -> dict:
    """Add mean / p95 displacement error (mm) against the known transform."""
    from cases import displacement_error, mask_points

    truth = np.asarray(json.loads((case / "case.json").read_text())["truth"])
    if res.get("status") == "ok":
        res["mean_mm"], res["p95_mm"] = displacement_error(res["matrix"], truth,
                                                           mask_points(case))
    return res


def markdown_table(rows: list[dict]) -> str:
    lines = ["| case | tool | mean error (mm) | p95 error (mm) | wall (s) | peak RSS (MB) |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        if r.get("status") == "ok":
            lines.append(f"| {r['case']} | {r['peer']} | {r['mean_mm']:.3f} | {r['p95_mm']:.3f} "
                         f"| {r['seconds']:.1f} | {r['peak_rss_mb']:.0f} |")
        else:
            lines.append(f"| {r['case']} | {r['peer']} | - | - | - | {r['status']} |")
    return "\n".join(lines)


def parent_main(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(HERE))
    from cases import CASES, build_case, displacement_error, mask_points

    root = Path(args.workdir)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.cases:
        case = build_case(CASES[name], root)
        truth = np.asarray(json.loads((case / "case.json").read_text())["truth"])
        m0, p0 = displacement_error(np.eye(4), truth, mask_points(case))
        print(f"{name}: error before registration mean {m0:.2f} mm, p95 {p0:.2f} mm",
              flush=True)
        for peer in args.peers:
            if peer == "medreg-ncc" and CASES[name].modality == "multi":
                continue
            res = evaluate(case, run_peer(peer, case, args.timeout, root))
            res.update(case=name, peer=peer)
            rows.append(res)
            print(markdown_table([res]).splitlines()[-1], flush=True)
    table = markdown_table(rows)
    print("\n" + table)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        return child_main(argv[1], Path(argv[2]), Path(argv[3]))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", default=["mono-2mm", "multi-2mm"],
                   choices=["mono-2mm", "multi-2mm", "mono-1mm", "multi-1mm", "clean-2mm"])
    p.add_argument("--peers", nargs="+", default=list(PEERS), choices=list(PEERS))
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per peer run")
    p.add_argument("--workdir", default="/tmp/medreg-bench-linear",
                   help="where cases and per-run results are written")
    p.add_argument("--json", help="also write all rows as JSON here")
    return parent_main(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
