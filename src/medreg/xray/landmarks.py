"""23 bone landmarks defined geometrically from a TotalSegmentator label map.

Each landmark is computed from one labelled structure by one rule (all in CT world LPS mm):

* ``centroid``: mean position of the structure's voxels.
* ``extreme`` along a world direction ``d``: mean position of the voxels whose ``x . d`` lies
  within ``depth`` mm (default 5 mm) of the structure's maximum of ``x . d`` (a stable "tip").
  An optional ``posterior`` filter keeps only the posterior half (``y >= median y``) first.

Convention: LPS, so ``+x`` is the patient's left, ``+y`` posterior, ``+z`` superior. "Medial" for a
left structure is ``-x``, for a right structure ``+x``.

The set (see :data:`LANDMARKS`): centroids of vertebrae C7, T2, T4, T6, T8, T10, T12; rib heads
(medial tip of the posterior half) of ribs 1, 4 and 8 on both sides; lateral tips of ribs 6;
superior (manubrium) and inferior (xiphoid) tips of the sternum; medial and lateral ends of both
clavicles; inferior angles of both scapulae.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.ndimage as ndi

from medreg.core.image import Image
from medreg.errors import MedregError


@dataclass(frozen=True)
class LandmarkDef:
    """One landmark: ``name``, the TotalSegmentator ``structure``, the rule and its direction."""

    name: str
    structure: str
    rule: str  # "centroid" | "extreme"
    direction: tuple[float, float, float] = (0.0, 0.0, 0.0)
    posterior: bool = False


_L, _R, _S, _I = (1.0, 0.0, 0.0), (-1.0, 0.0, 0.0), (0.0, 0.0, 1.0), (0.0, 0.0, -1.0)

LANDMARKS: tuple[LandmarkDef, ...] = (
    *(LandmarkDef(f"{v}_centroid", f"vertebrae_{v}", "centroid")
      for v in ("C7", "T2", "T4", "T6", "T8", "T10", "T12")),
    *(LandmarkDef(f"rib_{side}_{n}_head", f"rib_{side}_{n}", "extreme",
                  _R if side == "left" else _L, posterior=True)
      for n in (1, 4, 8) for side in ("left", "right")),
    LandmarkDef("rib_left_6_lateral", "rib_left_6", "extreme", _L),
    LandmarkDef("rib_right_6_lateral", "rib_right_6", "extreme", _R),
    LandmarkDef("sternum_superior", "sternum", "extreme", _S),
    LandmarkDef("sternum_inferior", "sternum", "extreme", _I),
    LandmarkDef("clavicle_left_medial", "clavicula_left", "extreme", _R),
    LandmarkDef("clavicle_right_medial", "clavicula_right", "extreme", _L),
    LandmarkDef("clavicle_left_lateral", "clavicula_left", "extreme", _L),
    LandmarkDef("clavicle_right_lateral", "clavicula_right", "extreme", _R),
    LandmarkDef("scapula_left_inferior_angle", "scapula_left", "extreme", _I),
    LandmarkDef("scapula_right_inferior_angle", "scapula_right", "extreme", _I),
)

NAMES: tuple[str, ...] = tuple(d.name for d in LANDMARKS)


def read_structures(path: str | Path) -> dict[str, int]:
    """TotalSegmentator ``structures.csv`` (columns ``structure``, ``id``) -> name -> label id."""
    p = Path(path)
    if not p.exists():
        raise MedregError(f"structure table not found: {p}")
    with p.open() as fh:
        rows = list(csv.DictReader(fh))
    if not rows or "structure" not in rows[0] or "id" not in rows[0]:
        raise MedregError(f"{p} needs the columns 'structure' and 'id'")
    return {r["structure"]: int(r["id"]) for r in rows}


def _rule_point(world: np.ndarray, d: LandmarkDef, depth: float) -> np.ndarray:
    if d.rule == "centroid":
        return world.mean(0)
    if d.posterior:
        world = world[world[:, 1] >= np.median(world[:, 1])]
    proj = world @ np.asarray(d.direction)
    return world[proj >= proj.max() - depth].mean(0)


def landmarks_from_labels(labels: Image, structures: dict[str, int], *,
                          depth: float = 5.0) -> np.ndarray:
    """Compute :data:`LANDMARKS` from a label map.

    Args:
        labels: 3D label image ``(1, D, H, W)`` (integer ids).
        structures: name -> id (see :func:`read_structures`).
        depth: thickness (mm) of the tip slab of the ``extreme`` rule.

    Returns:
        ``(23, 3)`` world LPS mm, in the order of :data:`NAMES`.
    """
    arr = labels.tensor[0].numpy()
    ids = {d.structure: structures.get(d.structure) for d in LANDMARKS}
    missing = [s for s, i in ids.items() if i is None]
    if missing:
        raise MedregError(f"structure table lacks {missing}")
    boxes = ndi.find_objects(arr.astype(np.int32), max_label=max(ids.values()))
    out = []
    for d in LANDMARKS:
        lab = ids[d.structure]
        box = boxes[lab - 1]
        if box is None:
            raise MedregError(f"label map has no voxels of {d.structure} (id {lab})")
        kji = np.argwhere(arr[box] == lab) + [s.start for s in box]
        world = labels.grid.index_to_world(kji[:, ::-1].astype(np.float64))
        out.append(_rule_point(world, d, depth))
    return np.stack(out)


def save_landmarks(path: str | Path, points: np.ndarray, names: tuple[str, ...] = NAMES,
                   extra: dict[str, np.ndarray] | None = None) -> Path:
    """CSV with ``name,x,y,z`` (LPS mm) and optional extra numeric columns."""
    p = Path(path)
    extra = extra or {}
    with p.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["name", "x", "y", "z", *extra])
        for i, (n, pt) in enumerate(zip(names, np.asarray(points), strict=True)):
            w.writerow([n, *(f"{v:.4f}" for v in pt), *(f"{extra[k][i]:.4f}" for k in extra)])
    return p


def load_landmarks(path: str | Path) -> tuple[tuple[str, ...], np.ndarray]:
    """Read a CSV written by :func:`save_landmarks` -> (names, ``(n, 3)`` LPS mm)."""
    p = Path(path)
    if not p.exists():
        raise MedregError(f"landmark file not found: {p}")
    with p.open() as fh:
        rows = list(csv.DictReader(fh))
    try:
        return tuple(r["name"] for r in rows), np.array([[float(r[k]) for k in "xyz"]
                                                         for r in rows])
    except (KeyError, ValueError) as exc:
        raise MedregError(f"{p} must have columns name,x,y,z with numbers: {exc}") from exc
