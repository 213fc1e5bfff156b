"""Keep freed memory in the process for reuse (Linux, glibc), so that large temporaries are not page-faulted afresh.

glibc's ``malloc`` serves every block above its mmap threshold (at most 32 MB) with a fresh ``mmap``
and returns the heap's free top to the OS. An energy evaluation of a brain allocates and frees many
such blocks, so every evaluation page-faults hundreds of thousands of fresh pages in again (the
README gives the measured cost). PyTorch has no caching allocator on CPU; :func:`retain_freed_memory`
makes glibc keep what it frees (the process keeps its peak memory).

Called by the ``brainmech`` command and the benchmarks; call it yourself in scripts that run the
solver, ``network+refine`` or training. It changes the whole process, so importing brainmech does not.
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD = -1  # mallopt parameters from glibc's <malloc.h>
M_MMAP_MAX = -4


def retain_freed_memory() -> bool:
    """Make glibc serve every block from its heap (no mmap) and never trim it.

    Returns True where it took effect (Linux with glibc), False elsewhere, where it does nothing.

    Example::

        from brainmech import Simulator, retain_freed_memory
        retain_freed_memory()
        simulation = Simulator("solver")(subject, atrophy)
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # symbols of the running process, libc's among them
    except (OSError, AttributeError):  # not glibc (e.g. musl has no effect) or no dynamic linking
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success; a trim threshold of -1 (as size_t: the maximum) disables trimming
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, -1) == 1
