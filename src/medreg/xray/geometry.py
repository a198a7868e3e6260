"""C-arm geometry, poses, exact projection / back-projection of points, pose sampling.

Convention:
    * World is the CT's LPS mm frame. A pose is a ``(4, 4)`` float64 ``ct_to_camera`` matrix:
      ``X_c = R X_w + t``.
    * Camera frame: origin at the X-ray source, ``+z`` toward the detector centre, ``+x`` along
      increasing detector column ``u``, ``+y`` along increasing detector row ``v`` (mm).
    * Intrinsics: ``u = f x_c / z_c + c_u``, ``v = f y_c / z_c + c_v`` with
      ``f = sdd / pixel_size`` (pixels). Pixel ``(0, 0)`` is centred at ``(u, v) = (0, 0)``; the
      default principal point is the detector centre ``((W - 1) / 2, (H - 1) / 2)``.
    * Images of the detector are tensors ``(..., H, W)``: row index ``v``, column index ``u``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from scipy.spatial.transform import Rotation

from medreg.errors import MedregError

#: Camera axes of the canonical antero-posterior (AP) view, as rows in LPS world coordinates:
#: columns run to the patient's left (+x), rows run inferior (-z), the beam runs anterior to
#: posterior (+y). A proper rotation (det = +1).
R_AP = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])


@dataclass(frozen=True)
class CArmGeometry:
    """Intrinsic geometry of a C-arm (paper defaults: SDD 1200 mm, SID 700 mm, 384x300 mm).

    Attributes:
        sdd: source-to-detector distance, mm.
        sid: source-to-isocentre distance, mm (used to place the canonical pose).
        width: detector columns (pixels), along ``u``.
        height: detector rows (pixels), along ``v``.
        pixel_size: square pixel pitch, mm.
        cu: principal point column (pixels); ``None`` means ``(width - 1) / 2``.
        cv: principal point row (pixels); ``None`` means ``(height - 1) / 2``.
    """

    sdd: float = 1200.0
    sid: float = 700.0
    width: int = 240
    height: int = 188
    pixel_size: float = 1.6
    cu: float | None = None
    cv: float | None = None

    def __post_init__(self) -> None:
        if not (self.sdd > 0 and 0 < self.sid < self.sdd):
            raise MedregError(f"C-arm needs 0 < sid < sdd, got sid={self.sid}, sdd={self.sdd}")
        if self.width < 2 or self.height < 2 or not self.pixel_size > 0:
            raise MedregError(f"bad detector {self.width}x{self.height} at {self.pixel_size} mm")
        if self.cu is None:
            object.__setattr__(self, "cu", (self.width - 1) / 2.0)
        if self.cv is None:
            object.__setattr__(self, "cv", (self.height - 1) / 2.0)

    @property
    def focal(self) -> float:
        """Focal length in pixels, ``sdd / pixel_size``."""
        return self.sdd / self.pixel_size

    @property
    def detector_width_mm(self) -> float:
        return self.width * self.pixel_size

    def intrinsics(self) -> np.ndarray:
        """``(3, 3)`` float64 camera matrix ``K`` (OpenCV layout, same pixel-centre rule)."""
        f = self.focal
        return np.array([[f, 0.0, self.cu], [0.0, f, self.cv], [0.0, 0.0, 1.0]])

    def scaled(self, factor: float) -> CArmGeometry:
        """Same C-arm with pixels ``factor`` times larger (``factor=2``: 240x188 -> 120x94).

        Convention: the detector's physical extent and principal point (in mm) are kept; the
        pixel-centre rule still holds, so ``c' = (c + 0.5) / factor - 0.5``.
        """
        if not factor > 0:
            raise MedregError(f"detector scale factor must be positive, got {factor}")
        w, h = max(2, round(self.width / factor)), max(2, round(self.height / factor))
        return replace(self, width=w, height=h, pixel_size=self.pixel_size * self.width / w,
                       cu=(self.cu + 0.5) * w / self.width - 0.5,
                       cv=(self.cv + 0.5) * h / self.height - 0.5)

    def binned(self, k: int) -> tuple[CArmGeometry, tuple[int, int]]:
        """The detector of ``k x k`` pixel binning, exactly, and where its crop starts.

        Whole ``k x k`` blocks only: the central ``(W // k) * k`` columns and ``(H // k) * k``
        rows are kept (an odd leftover pixel goes to the end), so a binned pixel is exactly the
        mean of ``k x k`` original pixels (unlike :meth:`scaled`, whose rows may stretch when
        ``H / k`` is not whole).

        Returns:
            ``(geometry, (row0, col0))``: the binned detector (pixels ``k`` times larger, same
            physical positions) and the first original row and column of the crop.

        Convention: pixel ``i`` of the binned detector covers original pixels
        ``col0 + k i ... col0 + k i + k - 1``, so ``c' = (c - col0 + 0.5) / k - 0.5``.
        """
        k = int(k)
        if k < 1 or self.width // k < 2 or self.height // k < 2:
            raise MedregError(f"cannot bin the {self.width}x{self.height} detector by {k}")
        w, h = self.width // k, self.height // k
        col0, row0 = (self.width - w * k) // 2, (self.height - h * k) // 2
        g = replace(self, width=w, height=h, pixel_size=self.pixel_size * k,
                    cu=(self.cu - col0 + 0.5) / k - 0.5, cv=(self.cv - row0 + 0.5) / k - 0.5)
        return g, (row0, col0)

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        p.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return p

    @classmethod
    def from_dict(cls, data: dict) -> CArmGeometry:
        known = {"sdd", "sid", "width", "height", "pixel_size", "cu", "cv"}
        extra = set(data) - known
        if extra:
            raise MedregError(f"unknown geometry keys {sorted(extra)}; expected {sorted(known)}")
        try:
            return cls(**{k: (int(v) if k in ("width", "height") else
                              (None if v is None else float(v))) for k, v in data.items()})
        except (TypeError, ValueError) as exc:
            raise MedregError(f"bad geometry values {data}: {exc}") from exc

    @classmethod
    def load(cls, path: str | Path) -> CArmGeometry:
        p = Path(path)
        if not p.exists():
            raise MedregError(f"geometry file not found: {p}")
        return cls.from_dict(json.loads(p.read_text()))


# ----------------------------------------------------------------------------- poses
def check_pose(pose: np.ndarray, name: str = "pose") -> np.ndarray:
    """Validate a ``(4, 4)`` rigid ``ct_to_camera`` matrix and return it as float64."""
    m = np.asarray(pose, dtype=np.float64)
    if m.shape != (4, 4) or not np.all(np.isfinite(m)):
        raise MedregError(f"{name} must be a finite 4x4 matrix, got shape {m.shape}")
    r = m[:3, :3]
    if np.abs(r @ r.T - np.eye(3)).max() > 1e-4 or np.linalg.det(r) < 0:
        raise MedregError(f"{name} rotation block is not a proper rotation")
    if np.abs(m[3] - [0, 0, 0, 1]).max() > 1e-9:
        raise MedregError(f"{name} last row must be [0, 0, 0, 1]")
    return m


def save_pose(pose: np.ndarray, path: str | Path, **extra) -> Path:
    """Write ``{"ct_to_camera": 4x4 list, ...extra}`` as JSON."""
    p = Path(path)
    data = {"ct_to_camera": check_pose(pose).tolist(), **extra}
    p.write_text(json.dumps(data, indent=2) + "\n")
    return p


def load_pose(path: str | Path) -> np.ndarray:
    """Read a pose JSON written by :func:`save_pose` -> ``(4, 4)`` float64."""
    p = Path(path)
    if not p.exists():
        raise MedregError(f"pose file not found: {p}")
    data = json.loads(p.read_text())
    if "ct_to_camera" not in data:
        raise MedregError(f"pose file {p} has no 'ct_to_camera' entry")
    return check_pose(np.asarray(data["ct_to_camera"]), f"pose in {p}")


def source_position(pose: np.ndarray) -> np.ndarray:
    """World position (LPS mm) of the X-ray source (camera centre): ``-R^T t``, ``(3,)``."""
    m = check_pose(pose)
    return -m[:3, :3].T @ m[:3, 3]


def canonical_pose(isocenter: np.ndarray, geometry: CArmGeometry) -> np.ndarray:
    """AP pose with the CT point ``isocenter`` on the central ray at distance ``sid``.

    Convention: camera axes :data:`R_AP`; the source lies anterior of the isocentre.
    """
    iso = np.asarray(isocenter, dtype=np.float64).reshape(3)
    m = np.eye(4)
    m[:3, :3] = R_AP
    m[:3, 3] = np.array([0.0, 0.0, geometry.sid]) - R_AP @ iso
    return m


def perturbation(rot_deg: np.ndarray, trans_mm: np.ndarray, center: np.ndarray) -> np.ndarray:
    """``(4, 4)`` rigid motion of the CT: ``X' = Rp (X - c) + c + t`` in world LPS mm.

    Convention: ``rot_deg = (rx, ry, rz)`` are rotations about the world (patient) axes
    x (left-right: cranio-caudal tilt), y (antero-posterior: in-plane) and z (long axis:
    LAO/RAO), applied in the order x, then y, then z (extrinsic ``"xyz"``).
    """
    rp = Rotation.from_euler("xyz", np.asarray(rot_deg, float), degrees=True).as_matrix()
    c = np.asarray(center, dtype=np.float64).reshape(3)
    m = np.eye(4)
    m[:3, :3] = rp
    m[:3, 3] = c - rp @ c + np.asarray(trans_mm, dtype=np.float64)
    return m


def pose_from_params(base: np.ndarray, rot_deg, trans_mm, center) -> np.ndarray:
    """``base @ perturbation(rot_deg, trans_mm, center)``: the CT moved, then viewed by ``base``."""
    return check_pose(base) @ perturbation(rot_deg, trans_mm, center)


def pose_grid(base: np.ndarray, center: np.ndarray, *, rx: np.ndarray, ry: np.ndarray,
              rz: np.ndarray, tx: np.ndarray = (0.0,), ty: np.ndarray = (0.0,),
              tz: np.ndarray = (0.0,)) -> np.ndarray:
    """All combinations of the given rotations (deg) and translations (mm) -> ``(K, 4, 4)``."""
    out = [pose_from_params(base, (a, b, c), (x, y, z), center)
           for a in rx for b in ry for c in rz for x in tx for y in ty for z in tz]
    return np.stack(out)


def random_poses(base: np.ndarray, center: np.ndarray, n: int, rng: np.random.Generator, *,
                 rot_range=(35.0, 15.0, 45.0), trans_range=(15.0, 15.0, 15.0)) -> np.ndarray:
    """``(n, 4, 4)`` poses with uniform rotations ``+-rot_range`` deg and translations (mm)."""
    rots = rng.uniform(-1, 1, (n, 3)) * np.asarray(rot_range)
    trs = rng.uniform(-1, 1, (n, 3)) * np.asarray(trans_range)
    return np.stack([pose_from_params(base, r, t, center) for r, t in zip(rots, trs, strict=True)])


# ----------------------------------------------------------------------------- projection
def to_camera(points: np.ndarray, pose: np.ndarray) -> np.ndarray:
    """``(..., 3)`` world LPS mm -> ``(..., 3)`` camera mm."""
    m = np.asarray(pose, dtype=np.float64)
    return np.asarray(points, dtype=np.float64) @ m[:3, :3].T + m[:3, 3]


def project(points: np.ndarray, pose: np.ndarray, geometry: CArmGeometry,
            *, check: bool = True) -> np.ndarray:
    """Exact pinhole projection of world points onto the detector.

    Args:
        points: ``(..., 3)`` world LPS mm.
        pose: ``(4, 4)`` ``ct_to_camera``.
        geometry: the C-arm.
        check: raise when a point lies at or behind the source (``z_c <= 0``).

    Returns:
        ``(..., 2)`` pixel coordinates ``(u, v)`` (column, row).

    Convention: ``u = f x_c / z_c + c_u``, ``v = f y_c / z_c + c_v``, pixel centres at integers.
    """
    xc = to_camera(points, pose)
    z = xc[..., 2]
    if check and np.any(z <= 1e-6):
        raise MedregError("pose puts part of the CT at or behind the X-ray source (z_c <= 0)")
    f = geometry.focal
    u = f * xc[..., 0] / z + geometry.cu
    v = f * xc[..., 1] / z + geometry.cv
    return np.stack([u, v], axis=-1)


def backproject(uv: np.ndarray, pose: np.ndarray, geometry: CArmGeometry
                ) -> tuple[np.ndarray, np.ndarray]:
    """Rays through the source and detector pixels, in world coordinates.

    Args:
        uv: ``(..., 2)`` pixel coordinates (column, row).

    Returns:
        ``origin`` ``(3,)`` (the source, LPS mm) and unit ``directions`` ``(..., 3)`` pointing
        from the source toward the detector.
    """
    uv = np.asarray(uv, dtype=np.float64)
    d_cam = np.stack([(uv[..., 0] - geometry.cu) / geometry.focal,
                      (uv[..., 1] - geometry.cv) / geometry.focal,
                      np.ones(uv.shape[:-1])], axis=-1)
    r = check_pose(pose)[:3, :3]
    d = d_cam @ r  # R^T d_cam for row vectors
    d /= np.linalg.norm(d, axis=-1, keepdims=True)
    return source_position(pose), d


def rotation_error_deg(r_est: np.ndarray, r_gt: np.ndarray) -> float:
    """Angle (deg) of ``R_est R_gt^T``."""
    m = np.asarray(r_est)[:3, :3] @ np.asarray(r_gt)[:3, :3].T
    return math.degrees(math.acos(float(np.clip((np.trace(m) - 1) / 2, -1.0, 1.0))))
