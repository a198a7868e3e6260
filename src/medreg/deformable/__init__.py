"""Deformable registration: B-spline FFD, dense and stationary-velocity fields, SyN, regularizers.

Convention:
    * Every field is a displacement or velocity ``(1, dim, *S)`` tensor on a :class:`Grid`,
      channels ordered (x, y[, z]), vectors in world LPS mm.
    * Transforms map fixed world points to moving world points: ``T(x) = x + u(x)``.
"""

from medreg.deformable.fields import (
    compose_displacements,
    integrate_velocity,
    invert_displacement,
    jacobian_matrix,
)
from medreg.deformable.transforms import (
    BSplineTransform,
    DisplacementField,
    StationaryVelocityField,
    dense_from_transform,
)

__all__ = ["BSplineTransform", "DisplacementField", "StationaryVelocityField",
           "compose_displacements", "dense_from_transform", "integrate_velocity",
           "invert_displacement", "jacobian_matrix"]
