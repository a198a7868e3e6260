"""File input and output: images, transforms, points."""

from medreg.io.images import from_sitk, read_image, to_sitk, write_image

__all__ = ["from_sitk", "read_image", "to_sitk", "write_image"]
