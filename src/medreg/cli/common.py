"""Helpers shared by CLI commands: output folders that are never silently overwritten."""

from __future__ import annotations

import argparse
from pathlib import Path


def prepare_outdir(path: str | Path, overwrite: bool) -> Path:
    """Create ``path``; refuse an existing non-empty folder unless ``overwrite``."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise FileExistsError(f"output path {p} exists and is not a folder")
    if p.exists() and any(p.iterdir()) and not overwrite:
        raise FileExistsError(f"output folder {p} already exists and is not empty; "
                              f"pass --overwrite to replace its files")
    p.mkdir(parents=True, exist_ok=True)
    return p


def add_overwrite(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true",
                        help="allow writing into an existing, non-empty output folder")
