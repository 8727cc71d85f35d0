"""Give memory-mapped pages back to the OS once a tensor has been copied out; read byte ranges.

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
import os
import sys
from pathlib import Path

from ..lazy import torch

from ..errors import CheckpointError

_PAGE = mmap.PAGESIZE
_MADV_DONTNEED = 4
_MADV_HUGEPAGE = 14
_HUGE = 2 * 1024 * 1024
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True) if sys.platform.startswith("linux") else None


def release(address: int, nbytes: int) -> None:
    """Advise the kernel that ``[address, address + nbytes)`` is not needed (Linux only)."""
    if _libc is None or nbytes <= 0:
        return
    start = address & ~(_PAGE - 1)
    end = address + nbytes
    length = (end - start + _PAGE - 1) & ~(_PAGE - 1)
    _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(length), _MADV_DONTNEED)


def pread_exact(fd: int, nbytes: int, offset: int, file: Path, name: str) -> torch.Tensor:
    """``nbytes`` from ``offset`` of an open file into a fresh uint8 tensor (one copy, no mapping).

    The buffer is advised to use huge pages: a 4 KB page fault (and zeroing) per page of
    every tensor read would cost the kernel 2-4 x what copying the bytes does.

    Raises:
        CheckpointError: the file ends first (naming the file and the tensor).
    """
    buf = torch.empty(nbytes, dtype=torch.uint8)
    if _libc is not None and nbytes >= _HUGE:
        start = (buf.data_ptr() + _PAGE - 1) & ~(_PAGE - 1)
        end = (buf.data_ptr() + nbytes) & ~(_PAGE - 1)
        _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_HUGEPAGE)
    view, done = memoryview(buf.numpy()), 0
    while done < nbytes:  # preadv may return short reads for huge tensors
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise CheckpointError(f"{file}: unexpected end of file reading '{name}'")
        done += n
    return buf
