"""Give memory-mapped pages back to the OS once a tensor has been copied out.

A file mapping keeps every page it touched in the process's resident set until it
is unmapped. Readers that must map a whole file (torch's zip checkpoints, gguf-py's
reader) call ``release`` after each tensor so that streaming a 30 GB file does not
look like holding it. The mappings are read-only or private and never written, so
dropped pages are simply read again from the file if touched again.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import sys

_PAGE = mmap.PAGESIZE
_MADV_DONTNEED = 4
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True) if sys.platform.startswith("linux") else None


def release(address: int, nbytes: int) -> None:
    """Advise the kernel that ``[address, address + nbytes)`` is not needed (Linux only)."""
    if _libc is None or nbytes <= 0:
        return
    start = address & ~(_PAGE - 1)
    end = address + nbytes
    length = (end - start + _PAGE - 1) & ~(_PAGE - 1)
    _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(length), _MADV_DONTNEED)
