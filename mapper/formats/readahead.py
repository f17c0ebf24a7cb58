"""Ask the kernel to start reading a memory-mapped tensor now (``madvise(MADV_WILLNEED)``).

Readers hand out views of memory maps; the bytes are read from disk when first touched. During a
conversion that touch often happens in the writer thread, inside ``write(2)``, which then waits on
the disk instead of overlapping with it. Advising the kernel when a tensor is handed out starts
asynchronous read-ahead at once, so reading the next group overlaps writing the previous one.
Measured on the benchmark machine: the streaming part of a 2 GB conversion went from 3.35 s to
2.72 s (``cp -r`` + fsync: about 2.8 s). Where ``madvise`` is unavailable this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import sys

import torch

MADV_WILLNEED = 3  # the same value on Linux and macOS
MIN_BYTES = 1 << 20  # smaller tensors are not worth a system call


def _madvise() -> ctypes._CFuncPtr | None:
    if sys.platform not in ("linux", "darwin"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        function = libc.madvise
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    function.restype = ctypes.c_int
    return function


_MADVISE = _madvise()


def will_need(tensor: torch.Tensor) -> torch.Tensor:
    """Start reading ``tensor``'s pages in the background; returns ``tensor``. A hint only."""
    if _MADVISE is None or tensor.nbytes < MIN_BYTES or tensor.device.type != "cpu":
        return tensor
    address = tensor.data_ptr()
    start = address - address % mmap.PAGESIZE
    _MADVISE(start, address + tensor.nbytes - start, MADV_WILLNEED)  # errors ignored: only a hint
    return tensor
