"""Give memory-mapped pages back to the OS once a tensor has been copied out; read, copy and hash byte ranges.

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


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def return_freed_buffers() -> None:
    """Have glibc map each allocation of 1 MiB or more on its own, and unmap it when it is freed (Linux, glibc).

    glibc raises its mapping threshold to the size of the last mapped block freed (up to 32 MiB), so
    tensor-sized buffers soon come from the heap, where freed memory stays with the process: streaming a
    1.41 B LLaVA to GGUF held about 0.2 GiB more that way (peak 0.83 GiB against 0.63 with this; measured).
    A fixed threshold keeps a conversion's resident memory at what its queue holds (7B rename + cast: 0.58 GiB
    against 0.85-0.91). The price: each new buffer's pages are faulted in afresh instead of reused (README,
    Benchmarks). Process-wide.
    """
    mallopt = getattr(_libc, "mallopt", None) if _libc is not None else None
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, 1 << 20)


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


_WINDOW = 64 * 1024 * 1024  # bytes mapped at a time: the mapping's pages count in the resident set while mapped


def hash_file_range(digest, file: Path, offset: int, nbytes: int) -> None:
    """Feed ``nbytes`` of ``file`` from ``offset`` into ``digest`` (a hashlib object) without copying them.

    The bytes are hashed where they lie in the page cache, through a read-only mapping of one
    window at a time: no buffer to fill (and zero) and no copy, which halves the memory traffic of
    hashing a multi-GB file. hashlib lets go of the GIL while it hashes.

    Raises:
        CheckpointError: the file ends before ``offset + nbytes``.
    """
    if nbytes <= 0:
        return
    if os.stat(file).st_size < offset + nbytes:
        raise CheckpointError(f"{file}: unexpected end of file (needs {offset + nbytes} bytes)")
    with open(file, "rb") as f:
        end = offset + nbytes
        position = offset
        while position < end:
            start = position - position % mmap.ALLOCATIONGRANULARITY
            length = min(end, start + _WINDOW) - start
            with mmap.mmap(f.fileno(), length, access=mmap.ACCESS_READ, offset=start) as mapped:
                mapped.madvise(mmap.MADV_SEQUENTIAL)
                with memoryview(mapped) as view:
                    digest.update(view[position - start:])
            position = start + length


def copy_file_range(source_fd: int, destination_fd: int, offset: int, nbytes: int, file: Path, name: str) -> None:
    """Copy ``nbytes`` from ``offset`` of the source to the destination's current position, inside the kernel.

    One copy from page cache to page cache, as ``cp`` makes; no user-space buffer.

    Raises:
        CheckpointError: the source ends first (naming the file and the tensor).
        OSError: the kernel or filesystem cannot copy between these files (EXDEV, EINVAL, ENOSYS,
            EOPNOTSUPP, ...); the destination's position may have moved by what was copied.
    """
    done = 0
    while done < nbytes:
        n = os.copy_file_range(source_fd, destination_fd, nbytes - done, offset + done)
        if n == 0:
            raise CheckpointError(f"{file}: unexpected end of file reading '{name}'")
        done += n
