"""File input and output: images, transforms, points."""

from medreg.io.images import from_sitk, read_image, to_sitk, write_image
from medreg.io.transforms import read_transform, write_transform

__all__ = ["from_sitk", "read_image", "read_transform", "to_sitk", "write_image",
           "write_transform"]
