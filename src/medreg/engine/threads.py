"""Intra-op thread count for small tensors.

Each torch operation on a few tens of thousands of points takes microseconds; handing it to a
thread pool costs more than it saves (on 2 cores a linear registration ran 3x slower with 2
threads than with 1). Loops over such small work run single-threaded; the caller's setting is
restored afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

#: Work items (points x channels) below which one thread is faster than several.
SMALL_WORK = 500_000


@contextmanager
def threads_for(work: int) -> Iterator[int]:
    """Use one intra-op thread while ``work`` elements are below :data:`SMALL_WORK`."""
    before = torch.get_num_threads()
    n = 1 if work < SMALL_WORK else before
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)
