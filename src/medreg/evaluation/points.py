"""Target registration error of corresponding landmarks.

Convention: landmarks are ``(n, dim)`` world LPS mm; the transform maps fixed points to moving
points, so TRE is ``|T(p_fixed) - p_moving|``.
"""

from __future__ import annotations

import numpy as np
import torch

from medreg.errors import MedregError
from medreg.transforms.base import Transform, parameter_dtype


def landmark_tre(transform: Transform, fixed_points, moving_points) -> dict:
    """TRE per landmark with its mean, median, max (mm).

    Args:
        transform: fixed -> moving.
        fixed_points, moving_points: ``(n, dim)`` corresponding world points.
    """
    fp = torch.as_tensor(np.asarray(fixed_points, dtype=np.float64))
    mp = torch.as_tensor(np.asarray(moving_points, dtype=np.float64))
    if fp.ndim != 2 or fp.shape != mp.shape or fp.shape[1] != transform.ndim:
        raise MedregError(f"landmarks must be two (n, {transform.ndim}) arrays of equal shape, "
                          f"got {tuple(fp.shape)} and {tuple(mp.shape)}")
    with torch.no_grad():
        pts = fp.to(parameter_dtype(transform, torch.float64))
        err = (transform(pts).double() - mp).norm(dim=-1)
    return dict(per_point=err.tolist(), mean=float(err.mean()), median=float(err.median()),
                max=float(err.max()))


