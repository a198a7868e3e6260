"""Geometry core: axis conventions, grids and images."""

from medreg.core.axes import ALIGN_CORNERS
from medreg.core.grid import Grid
from medreg.core.image import Image

__all__ = ["ALIGN_CORNERS", "Grid", "Image"]
