"""medreg: image registration for medical images, built on PyTorch.

World coordinates are LPS millimetres. A registration transform maps fixed-space points to
moving-space points: ``warped(x) = moving(T(x))``.
"""

from medreg.core import ALIGN_CORNERS, Grid, Image
from medreg.errors import InputFileError, MedregError
from medreg.io import read_image, write_image
from medreg.registration.api import RegistrationResult, register
from medreg.resample import resample
from medreg.transforms import Affine, Compose, Rigid, Similarity, Transform, Translation

__version__ = "0.1.0"

__all__ = ["ALIGN_CORNERS", "Affine", "Compose", "Grid", "Image", "InputFileError",
           "MedregError", "RegistrationResult", "Rigid", "Similarity", "Transform",
           "Translation", "__version__",
           "read_image", "register", "resample", "write_image"]
