"""SimpleITK, imported on first use.

Reading NIfTI goes through nibabel, so a NIfTI-only workflow never needs SimpleITK, whose import
costs about 110 MB of resident memory and a fraction of a second. The I/O modules use
``from medreg.io.lazy import sitk`` and write ``sitk.ReadImage(...)`` as usual.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any


class LazyModule:
    """Stands in for a module and imports it when an attribute is first read."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._module: ModuleType | None = None

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        if self._module is None:
            self._module = importlib.import_module(self._name)
        return getattr(self._module, attr)


sitk = LazyModule("SimpleITK")
