"""``medreg register FIXED MOVING -o OUTDIR ...``: any method, any stage list, standard outputs.

Writes ``OUTDIR/transform.tfm`` (ITK text, fixed->moving) for linear results, the deformable
outputs (``field.nii.gz``, ``inverse_field.nii.gz``, ``affine.tfm``) for deformable ones,
``transform.json`` for a homography, and always ``warped.nii.gz``, ``report.json``, ``qc.png``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from medreg.cli.common import add_overwrite, prepare_outdir
from medreg.errors import MedregError
from medreg.io.images import read_image, write_image
from medreg.metrics import METRICS
from medreg.registration.plugins import INITIALIZERS, METHODS, STAGES
from medreg.resample import resample


def _number_list(cast: type, what: str):
    """argparse type for comma-separated ``cast`` values, e.g. ``4,2,1``."""

    def parse(text: str) -> tuple:
        try:
            return tuple(cast(v) for v in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {what}, got {text!r}") from None

    return parse


_floats = _number_list(float, "numbers")
_ints = _number_list(int, "integers")


def _option(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--option needs KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("register", help="register MOVING to FIXED",
                       description="Register MOVING onto FIXED. The transform maps fixed world "
                                   "points to moving world points (ITK convention).")
    p.add_argument("fixed")
    p.add_argument("moving")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--transform", default="rigid,affine",
                   help=f"comma-separated stages from: {', '.join(STAGES)} (default rigid,affine)")
    p.add_argument("--metric", default="mi", choices=sorted(METRICS))
    p.add_argument("--deformable-metric", choices=sorted(METRICS),
                   help="metric of the bspline/svf/syn stages (default: --metric), e.g. "
                        "--metric mi --deformable-metric lncc for rigid,affine,syn")
    p.add_argument("--method", default="intensity", choices=sorted(METHODS))
    p.add_argument("--init", default="geometry", choices=sorted(INITIALIZERS))
    p.add_argument("--fixed-mask")
    p.add_argument("--moving-mask")
    p.add_argument("--levels", type=_floats, help="pyramid shrink factors, e.g. 4,2,1")
    p.add_argument("--iterations", type=_ints, help="iterations per level, e.g. 60,40,25")
    p.add_argument("--optimizer", choices=["adam", "lbfgs", "gd"])
    p.add_argument("--samples", type=int,
                   help="fixed points per iteration (stochastic linear schedule, the default "
                        "for point metrics) or per level (0 = every voxel; "
                        "--option stochastic=false for one fixed set per level)")
    p.add_argument("--bins", type=int, help="histogram bins for mi/nmi")
    p.add_argument("--flatten-bias", choices=["auto", "on", "off"],
                   help="divide both images by their wide low-pass on the finest linear level "
                        "(removes MR intensity bias; auto: mi/nmi on non-negative images that "
                        "look mono-modal once roughly aligned)")
    p.add_argument("--model", help="features/phase/landmarks model "
                                   "(translation|rigid|similarity|affine|homography|tps)")
    p.add_argument("--fixed-points", help="landmarks in the fixed image (CSV/.fcsv/.mrk.json)")
    p.add_argument("--moving-points", help="corresponding landmarks in the moving image")
    p.add_argument("--labels-fixed", help="label map on the fixed image (Dice report)")
    p.add_argument("--labels-moving", help="label map on the moving image (Dice report)")
    p.add_argument("--option", action="append", type=_option, default=[], metavar="KEY=VALUE",
                   help="any stage option, value as JSON (e.g. --option smooth_sigma=1.5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--progress", action="store_true", help="show progress bars")
    add_overwrite(p)
    p.set_defaults(func=run)


def _options(args: argparse.Namespace) -> dict[str, Any]:
    opts: dict[str, Any] = dict(args.option)
    for key in ("levels", "iterations", "optimizer", "bins", "model", "fixed_points",
                "moving_points", "deformable_metric"):
        value = getattr(args, key)
        if value is not None:
            opts[key] = value
    if args.samples is not None:
        opts["samples"] = None if args.samples == 0 else args.samples
    if args.flatten_bias is not None:
        opts["flatten_bias"] = {"on": True, "off": False}.get(args.flatten_bias, "auto")
    return opts


def run(args: argparse.Namespace) -> int:
    from medreg.registration.api import register

    fixed, moving = read_image(args.fixed), read_image(args.moving)
    masks = {k: read_image(getattr(args, k)) for k in ("fixed_mask", "moving_mask")
             if getattr(args, k)}
    if bool(args.labels_fixed) != bool(args.labels_moving):
        raise MedregError("give both --labels-fixed and --labels-moving for a Dice report")
    out = prepare_outdir(args.output, args.overwrite)
    t0 = time.perf_counter()
    result = register(fixed, moving, transform=args.transform, metric=args.metric,
                      method=args.method, init=args.init, seed=args.seed,
                      progress=args.progress, **masks, **_options(args))
    report = result.report()
    report["outputs"] = write_outputs(result, out, args)
    report["command"] = {k: (v if isinstance(v, (str, int, float, bool, list, tuple, type(None)))
                             else str(v)) for k, v in vars(args).items() if k != "func"}
    report["timings_s"]["with_io"] = time.perf_counter() - t0
    (out / "report.json").write_text(json.dumps(report, indent=2, default=_json_default))
    print(f"registered in {result.timings['total']:.2f} s ({result.stop_reason}); "
          f"outputs in {out}")
    return 0


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def write_outputs(result, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Write transform file(s), the warped image and the QC picture; return extra report data."""
    from medreg.viz.qc import qc_figure

    extra: dict[str, Any] = {}
    t = result.transform
    if t.is_linear:
        from medreg.io.transforms import write_transform

        write_transform(t, out / "transform.tfm")
        if args.labels_fixed:
            extra["dice"] = _linear_dice(result, args)
    elif type(t).__name__ == "Homography":
        from medreg.features.homography_io import write_homography

        write_homography(t, out / "transform.json", fixed_grid=result.fixed.grid)
    else:
        from medreg.deformable.outputs import write_deformable_outputs

        labels = None
        if args.labels_fixed:
            labels = (read_image(args.labels_fixed), read_image(args.labels_moving))
        extra.update(write_deformable_outputs(t, result.inverse, result.fixed, result.moving,
                                              out, labels_fixed=labels and labels[0],
                                              labels_moving=labels and labels[1]))
    write_image(result.warped, out / "warped.nii.gz")
    before = resample(result.moving.float(), result.fixed.grid)
    qc_figure(result.fixed, before, result.warped, out / "qc.png",
              title=f"medreg {args.transform if args.method == 'intensity' else args.method}")
    return extra


def build_args(argv: list[str]) -> argparse.Namespace:
    """Parse ``medreg register`` arguments (for commands that reuse it)."""
    parser = argparse.ArgumentParser(prog="medreg")
    add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["register", *argv])


def _linear_dice(result, args: argparse.Namespace) -> dict[str, Any]:
    """Dice per label between the fixed labels and the moving labels warped (nearest)."""
    from medreg.evaluation.overlap import dice

    fixed_labels = read_image(args.labels_fixed)
    warped = resample(read_image(args.labels_moving), fixed_labels.grid, result.transform,
                      interpolation="nearest")
    return dice(fixed_labels, warped)
