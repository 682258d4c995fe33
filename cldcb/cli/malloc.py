"""Keep freed heap memory for reuse instead of handing it back to the kernel at once.

glibc's malloc serves a large block (128 KiB and up, by default) with its own
``mmap`` and gives memory at the top of the heap back to the kernel as soon as
128 KiB of it are free. A process that allocates and frees megabyte buffers
one after the other (every snapshot chunk: read, sealed, framed, encrypted;
on the server: received, decrypted, decoded, written) then takes a page fault
for every 4 KiB of every buffer: sealing a 1 MiB chunk measured 1.1 ms that
way, 0.33 ms with the limits below. :func:`keep_freed_memory` raises them
(blocks up to 32 MiB come from the heap; up to 64 MiB of free heap stay
mapped). The peak memory is the same; only what is kept between peaks grows.

What is kept must still go back after a burst (a flood of sessions, many
large snapshots at once): :func:`release_freed_memory` hands the free heap
back to the kernel (``malloc_trim``) when the process's resident size is
above :data:`TRIM_ABOVE`; the daemon calls it when a connection ends.

Both are no-ops where the C library has no ``mallopt``/``malloc_trim`` (not glibc).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import os

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 64 << 20
TRIM_ABOVE = 96 << 20
"""Resident size above which :func:`release_freed_memory` trims the heap."""


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or None)
    except OSError:
        return None


def keep_freed_memory() -> bool:
    """Set the limits (once per process, at start); False where that is not possible."""
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and \
        bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def resident_bytes() -> int:
    """This process's resident set size (0 where /proc is not there)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def release_freed_memory(above: int = TRIM_ABOVE) -> bool:
    """Give free heap memory back to the kernel if the resident size exceeds ``above``;
    True if it trimmed."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is None or resident_bytes() <= above:
        return False
    gc.collect()              # buffers held only by reference cycles (closed connections)
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    trim(0)
    return True
