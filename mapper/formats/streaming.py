"""A value's bytes into an output file: file to file where they lie in a file, else from memory.

Both writers stream every tensor this way (safetensors shards, the ``.pt`` files of a NeoX
checkpoint): a contiguous tensor whose bytes are a range of an input file (any contiguous piece of
mapped memory a reader registered: :mod:`mapper.formats.file_ranges`) is
appended with the file's ``copy_range`` (``copy_file_range(2)``, as ``cp`` copies); any other
tensor is written from its own memory, without a copy; a strided view or a concatenation not
made yet is written a block at a time through one reused buffer (:func:`mapper.tensors.byte_chunks`).
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from mapper.errors import ConversionError
from mapper.formats.file_ranges import mapped_range
from mapper.tensors import LazyConcat, byte_chunks


def memory_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor, without a copy."""
    if tensor.numel() == 0:
        return memoryview(b"")
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]


def write_value(f: Any, value: torch.Tensor | LazyConcat) -> int:
    """Append ``value``'s bytes (C order, little-endian) to ``f``; returns the count written.

    ``f`` needs ``write(bytes-like)``; with a ``copy_range(path, offset, nbytes)`` method
    (:class:`~mapper.formats.output.AtomicFile`) bytes found in a file are copied in the kernel.
    """
    if sys.byteorder != "little":
        raise ConversionError("writing tensors needs a little-endian machine", hint="run on x86-64 or ARM64")
    kernel = getattr(f, "copy_range", None)
    written = 0
    for piece in byte_chunks(value):
        where = mapped_range(piece) if kernel is not None else None
        if where is not None:
            written += kernel(where.path, where.offset, where.nbytes)
            continue
        view = memory_bytes(piece)
        f.write(view)
        written += len(view)
        del view
    return written
