"""Bundled demo sample (see README.md in this folder for its licence and attribution)."""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path


def demo_paths() -> dict[str, Path]:
    """Paths of the bundled demo files: ``fixed``, ``moving``, ``mask``, ``true_transform``."""
    root = Path(str(files("medreg.data")))
    meta = json.loads((root / "demo.json").read_text())
    return {k: root / v for k, v in meta.items() if isinstance(v, str)}
