"""``medreg`` command line: each sub-command lives in its own module with ``add_parser``."""

from __future__ import annotations

import argparse
import importlib
import sys

#: Modules that contribute sub-commands; each defines ``add_parser(subparsers)`` which
#: registers one or more commands whose ``func(args) -> int`` runs them.
COMMAND_MODULES = (
    "medreg.cli.register_cmd",
    "medreg.cli.apply_cmd",
    "medreg.cli.info_cmd",
    "medreg.cli.demo_cmd",
    "medreg.cli.xray_cmd",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medreg", description="Medical image registration.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # a command family not installed in this build
                continue
            raise
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; bad input ends with one line on stderr and exit code 2."""
    from medreg.errors import MedregError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (MedregError, ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"medreg {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
