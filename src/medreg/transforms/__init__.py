"""Spatial transforms (fixed world -> moving world, LPS mm)."""

from medreg.transforms.base import Compose, Transform
from medreg.transforms.linear import (
    LINEAR_TRANSFORMS,
    Affine,
    LinearTransform,
    Rigid,
    Similarity,
    Translation,
    linear_from_matrix,
)

__all__ = ["LINEAR_TRANSFORMS", "Affine", "Compose", "LinearTransform", "Rigid", "Similarity",
           "Transform", "Translation", "linear_from_matrix"]
