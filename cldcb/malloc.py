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
A no-op where the C library has no ``mallopt`` (not glibc).
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 64 << 20


def keep_freed_memory() -> bool:
    """Set the limits (once per process, at start); False where that is not possible."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and \
        bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
