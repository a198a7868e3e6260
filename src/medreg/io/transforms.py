"""Reading and writing ITK transform files (``.tfm``/``.txt``, ANTs' binary ``.mat``, ``.h5``).

Convention:
    * Both medreg and ITK transform files map **fixed-space points to moving-space points**
      in LPS mm (``warped(x) = moving(T(x))``), so no inversion or axis flip happens here.
    * ITK's matrix-offset form is ``T(x) = A (x - c) + c + t``: matrix ``A``, translation
      ``t`` (the parameters) and centre ``c`` (the fixed parameters); medreg's linear
      transforms use the same form, so the centre is kept through a round trip.
    * An ITK ``CompositeTransform`` applies the transform listed **last** in the file first:
      ``T(x) = T_0(T_1(...T_n(x)))``. medreg's ``Compose(a, b)(x) = b(a(x))`` applies the
      first part first, so the order is reversed in both directions.

File I/O goes through SimpleITK; no transform file is parsed by hand.

Hooks for deformable transforms (implemented in :mod:`medreg.io.fields`, imported lazily):
    * ``medreg.io.fields.transform_from_sitk(tx: sitk.Transform) -> Transform`` turns a
      SimpleITK ``DisplacementFieldTransform`` or ``BSplineTransform`` into a medreg transform.
    * ``medreg.io.fields.transform_to_sitk(transform: Transform) -> sitk.Transform`` does the
      reverse for non-linear medreg transforms.
    * ``medreg.io.fields.read_field_transform(path) -> Transform`` reads a displacement-field
      image (ITK convention, e.g. ``field.nii.gz``) as a transform; :func:`load_transform`
      calls it for image suffixes.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import numpy as np
import torch

from medreg.errors import InputFileError, MedregError
from medreg.io.atomic import atomic_write
from medreg.io.lazy import sitk
from medreg.transforms.base import Compose, Transform
from medreg.transforms.linear import Affine

#: Suffixes SimpleITK reads and writes as transform files.
TRANSFORM_SUFFIXES = (".tfm", ".txt", ".mat", ".h5", ".hdf5")

#: SimpleITK transform classes that medreg hands to :mod:`medreg.io.fields`.
_FIELD_TYPES = ("DisplacementFieldTransform", "BSplineTransform")

_FIELDS_MODULE = "medreg.io.fields"


def is_transform_path(path: str | os.PathLike) -> bool:
    """True when ``path`` has a transform-file suffix (``.tfm``, ``.txt``, ``.mat``, ``.h5``)."""
    return Path(path).name.lower().endswith(TRANSFORM_SUFFIXES)


# --------------------------------------------------------------------------- medreg -> ITK
def linear_to_sitk(transform: Transform) -> sitk.AffineTransform:
    """SimpleITK ``AffineTransform`` equal to a linear medreg transform.

    Args:
        transform: ``Translation``/``Rigid``/``Similarity``/``Affine`` or a ``Compose`` of them.

    Returns:
        ``sitk.AffineTransform`` with the same matrix and, where the transform has one, the
        same centre (for a ``Compose``, the centre of its first part).

    Convention:
        fixed world -> moving world, LPS mm, ``T(x) = A (x - c) + c + t``.
    """
    if not transform.is_linear:
        raise MedregError(f"{type(transform).__name__} is not linear; it cannot be written "
                          f"as an ITK affine")
    m = transform.matrix().detach().to(torch.float64).cpu().numpy()
    d = m.shape[0] - 1
    c = _center_of(transform)
    a = m[:d, :d]
    t = m[:d, d] - c + a @ c
    tx = sitk.AffineTransform(d)
    tx.SetMatrix(a.ravel().tolist())
    tx.SetTranslation(t.tolist())
    tx.SetCenter(c.tolist())
    return tx


def _center_of(transform: Transform) -> np.ndarray:
    first = transform.parts[0] if isinstance(transform, Compose) else transform
    center = getattr(first, "center", None)
    if center is None:
        return np.zeros(transform.ndim)
    return np.asarray(torch.as_tensor(center).detach().cpu(), dtype=np.float64).reshape(-1)


def transform_to_sitk(transform: Transform) -> sitk.Transform:
    """SimpleITK transform for any medreg transform (linear ones as one ``AffineTransform``).

    A ``Compose`` with non-linear parts becomes a ``CompositeTransform`` whose parts are
    listed in ITK's order (the part applied first is added last).
    """
    if transform.is_linear:
        return linear_to_sitk(transform)
    if isinstance(transform, Compose):
        comp = sitk.CompositeTransform(transform.ndim)
        for part in reversed(list(transform.parts)):
            comp.AddTransform(transform_to_sitk(part))
        return comp
    return _fields_hook("transform_to_sitk", type(transform).__name__)(transform)


def write_transform(transform: Transform, path: str | os.PathLike) -> Path:
    """Write a fixed->moving transform to an ITK transform file.

    Args:
        transform: a medreg transform; linear ones (also a linear ``Compose``) are written as
            one ITK ``AffineTransform_double_D_D`` with the same centre.
        path: ``.tfm``/``.txt`` (ITK text), ``.mat`` (ITK/ANTs binary MATLAB, one linear
            transform only) or ``.h5`` (HDF5).

    Returns:
        The path written. The file appears whole or not at all.
    """
    p = Path(path)
    if not is_transform_path(p):
        raise MedregError(f"cannot write transform {p}: unknown suffix; use one of "
                          f"{', '.join(TRANSFORM_SUFFIXES)}")
    tx = transform_to_sitk(transform)
    if p.suffix.lower() == ".mat" and isinstance(tx, sitk.CompositeTransform):
        raise MedregError(f"cannot write {p}: a .mat file holds one linear transform; "
                          f"use .h5 or .tfm for composite transforms")
    return atomic_write(p, lambda tmp: sitk.WriteTransform(tx, tmp))


# --------------------------------------------------------------------------- ITK -> medreg
def read_transform(path: str | os.PathLike) -> Transform:
    """Read an ITK transform file as a medreg fixed->moving transform.

    Args:
        path: ``.tfm``/``.txt``, ``.mat`` (ANTs) or ``.h5`` file holding any ITK
            matrix-offset transform (Euler, Versor, Similarity, ScaleSkewVersor, Affine,
            MatrixOffset, Translation, Scale), a composite of them, or displacement-field /
            B-spline transforms (read through :mod:`medreg.io.fields`).

    Returns:
        ``Affine`` for a single linear transform (same matrix and centre), ``Compose`` for a
        composite (parts in medreg's application order).
    """
    p = Path(path)
    if not p.exists():
        raise InputFileError(f"transform file not found: {p}")
    if p.is_dir():
        raise InputFileError(f"transform path {p} is a folder, not a file")
    try:
        tx = sitk.ReadTransform(str(p))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = next((line.strip() for line in first if "rror" in line or "nable" in line),
                      first[-1].strip() if first else "")
        raise InputFileError(f"cannot read transform {p}: {detail}") from exc
    return transform_from_sitk(tx)


def load_transform(path: str | os.PathLike) -> Transform:
    """Any transform medreg can apply: an ITK transform file or a displacement-field image.

    Transform-file suffixes go to :func:`read_transform`; image suffixes (``.nii``,
    ``.nii.gz``, ``.mha``, ``.nrrd``, ...) to ``medreg.io.fields.read_field_transform``.
    """
    p = Path(path)
    if is_transform_path(p):
        return read_transform(p)
    if not p.exists():
        raise InputFileError(f"transform file not found: {p}")
    return _fields_hook("read_field_transform", f"displacement field {p.name}")(p)


def transform_from_sitk(tx: sitk.Transform) -> Transform:
    """medreg transform equal to a SimpleITK transform (see :func:`read_transform`)."""
    tx = tx.Downcast()
    name = tx.GetName()
    if isinstance(tx, sitk.CompositeTransform):
        n = tx.GetNumberOfTransforms()
        if n == 0:
            raise MedregError("the composite transform holds no transforms")
        first = tx.GetNthTransform(0).Downcast()
        if n == 1 and isinstance(first, sitk.CompositeTransform):
            # SimpleITK wraps ITK types it has no class for (MatrixOffsetTransformBase, ...)
            # as a composite that contains itself; read those through their point mapping.
            return _opaque_from_sitk(tx)
        parts = [transform_from_sitk(tx.GetNthTransform(i)) for i in range(n)]
        return parts[0] if n == 1 else Compose(*reversed(parts))
    if name in _FIELD_TYPES:
        return _fields_hook("transform_from_sitk", name)(tx)
    if tx.GetDimension() not in (2, 3):
        raise MedregError(f"only 2D and 3D transforms are supported, got {tx.GetDimension()}D")
    if not tx.IsLinear():
        raise MedregError(f"ITK transform {name} is not supported by medreg")
    return _affine_from_linear_sitk(tx)


def _opaque_from_sitk(tx: sitk.Transform) -> Affine:
    """Affine from a SimpleITK transform whose ITK class SimpleITK does not wrap."""
    if not tx.IsLinear():
        raise MedregError("the file holds an ITK transform type that SimpleITK cannot wrap "
                          "and that is not linear")
    return _affine_from_linear_sitk(tx)


def _affine_from_linear_sitk(tx: sitk.Transform) -> Affine:
    """Affine from any linear SimpleITK transform, keeping its centre where it has one.

    Matrix-offset types give ``A``, ``t``, ``c`` directly; others (Translation) are read from
    the images of the origin and the unit vectors, which is exact for linear maps.
    """
    d = tx.GetDimension()
    if all(hasattr(tx, f) for f in ("GetMatrix", "GetTranslation", "GetCenter")):
        a = np.asarray(tx.GetMatrix(), dtype=np.float64).reshape(d, d)
        t = np.asarray(tx.GetTranslation(), dtype=np.float64)
        c = np.asarray(tx.GetCenter(), dtype=np.float64)
    else:
        c = np.zeros(d)
        t = np.asarray(tx.TransformPoint([0.0] * d), dtype=np.float64)
        a = np.stack([np.asarray(tx.TransformPoint(e.tolist())) - t for e in np.eye(d)], axis=1)
    m = np.eye(d + 1)
    m[:d, :d] = a
    m[:d, d] = c + t - a @ c
    return Affine.from_matrix(m, center=c)


def _fields_hook(function: str, what: str):
    """``medreg.io.fields.<function>``, or a clear error when deformable I/O is unavailable."""
    try:
        module = importlib.import_module(_FIELDS_MODULE)
    except ModuleNotFoundError as exc:
        if exc.name != _FIELDS_MODULE:
            raise
        module = None
    hook = getattr(module, function, None)
    if hook is None:
        raise MedregError(f"{what} needs {_FIELDS_MODULE}.{function} (deformable transform "
                          f"I/O), which this medreg build does not provide")
    return hook
