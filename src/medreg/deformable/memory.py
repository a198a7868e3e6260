"""Memory accounting for field optimization: an estimate before the run, the peak after.

Convention: bytes; the peak is the process resident-set high-water mark (``ru_maxrss``), the
figure that matters on a shared CPU machine, or the CUDA allocator peak on a GPU.
"""

from __future__ import annotations

import ctypes
import functools
import resource
import sys

import torch

from medreg.core.grid import Grid


def estimate_bytes(fixed: Grid, moving: Grid, field: Grid, *, n_fields: int = 1,
                   steps: int = 6, dtype_bytes: int = 4) -> int:
    """Rough peak of one finest-level iteration (forward + backward graph).

    Counted: the two images and their warped copies with LNCC box-filter temporaries (~12
    image-sized tensors), and per field its value, gradient, two Adam moments and the
    ``steps`` compositions kept for backward (~4 field-sized tensors each), plus the
    image-grid displacement and sampling grid (2 x dim tensors).
    """
    d = fixed.ndim
    img = 12 * fixed.numel + moving.numel
    fld = n_fields * d * field.numel * (4 + 4 * steps)
    up = n_fields * 2 * d * fixed.numel
    return int((img + fld + up) * dtype_bytes)


def estimate_greedy_bytes(fixed: Grid, moving: Grid, field: Grid, *,
                          dtype_bytes: int = 4) -> int:
    """Rough peak of one finest-level greedy SyN iteration (no autograd graph).

    Counted: the moving image; on the level grid the two midpoint images, the two LNCC forces
    (whose box statistics are slab-sized) and one upsampled offset field with its sampling
    points or one per-axis gradient (2 x dim); on the field grid the two fields with update,
    composition and smoothing buffers (~5 x dim each). Measured growth during the finest level
    (known warp, in-process): 1 mm (181x217x181) ~350 MB (this estimate: ~400 MB), 2 mm
    ~60 MB (~51 MB).
    """
    d = fixed.ndim
    img = (2 + 2 + 2 * d) * fixed.numel + moving.numel
    fld = 2 * 5 * d * field.numel
    return int((img + fld) * dtype_bytes)


def peak_bytes(device: str | torch.device = "cpu") -> int:
    """Peak memory so far: CUDA allocator peak on a GPU, else the process max RSS."""
    if torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def release_free_heap() -> None:
    """Hand freed heap memory back to the system (glibc ``malloc_trim``; a no-op elsewhere).

    glibc keeps freed blocks for reuse, so a level's temporaries stay resident while the next
    level allocates differently sized ones; trimming between levels keeps the process peak
    near the live data plus one level's temporaries (greedy SyN at 2 mm: about -17 MB).
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or ``None`` where there is none (resolved once)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
