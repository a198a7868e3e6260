"""``medreg demo``: register the bundled sample and print the error against the known truth."""

from __future__ import annotations

import argparse

import torch

from medreg.cli.common import add_overwrite


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="register the bundled MNI152 sample and report the error")
    p.add_argument("-o", "--output", default="demo-output", help="output folder")
    p.add_argument("--transform", default="rigid,affine")
    p.add_argument("--metric", default="mi")
    add_overwrite(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from medreg.cli import register_cmd
    from medreg.data import demo_paths
    from medreg.io.images import read_image
    from medreg.io.transforms import read_transform

    paths = demo_paths()
    print(f"fixed : {paths['fixed'].name}\nmoving: {paths['moving'].name} "
          f"(known affine + bias field + noise)")
    reg_args = register_cmd.build_args([str(paths["fixed"]), str(paths["moving"]),
                                        "-o", args.output, "--transform", args.transform,
                                        "--metric", args.metric] +
                                       (["--overwrite"] if args.overwrite else []))
    code = register_cmd.run(reg_args)
    if code:
        return code
    est = read_transform(f"{args.output}/transform.tfm")
    true = read_transform(paths["true_transform"])
    mask = read_image(paths["mask"])
    pts = mask.grid.world_points(torch.float64)[mask.tensor[0] > 0]
    with torch.no_grad():
        err = (est(pts) - true(pts)).norm(dim=-1)
    print(f"recovered transform error in the brain ({pts.shape[0]} voxels): "
          f"mean {err.mean():.3f} mm, 95th percentile {err.quantile(0.95):.3f} mm, "
          f"max {err.max():.3f} mm")
    print(f"see {args.output}/qc.png and {args.output}/report.json")
    return 0
