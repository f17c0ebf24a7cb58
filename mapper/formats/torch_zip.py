"""Writing a ``{name: tensor}`` dict in ``torch.save``'s zip format, each tensor's bytes streamed in.

``torch.save`` needs every tensor as one contiguous storage in memory: a tensor-parallel shard
that is a strided view, or a concatenation not made yet, must first be copied whole, and even
bytes that lie unchanged in an input file pass through the process. Here torch writes the
archive's structure and we write the data:

1. ``torch.save`` of *stand-ins* (``torch.empty`` of each tensor's shape and dtype: address
   space only, never touched) under ``torch.serialization.skip_data()``, into a recorder. torch
   then writes everything but the storage bytes (``archive/data.pkl``, ``.format_version``,
   ``.storage_alignment``, ``byteorder``, each ``archive/data/N`` record's header padded so its
   data starts at a multiple of 64 bytes, ``version``, ``.data/serialization_id``, the zip
   directory) and *seeks over* each storage's bytes. The recorder keeps the written pieces
   (a few KB) and the holes.
2. The file is written in one pass: the recorded pieces, and in each hole the bytes of its
   tensor (:func:`mapper.formats.streaming.write_value`: file to file where they lie in an input
   file, else from memory, a block at a time for views and concatenations).

torch numbers storages in the order the pickler meets them, which for a flat dict is its value
order, so hole ``N`` is the ``N``-th tensor with any bytes; the recorder checks every hole's size
against its tensor and refuses anything else (a future torch that orders differently is an error,
never a wrong file). The result is what ``torch.save`` writes for the same dict with
``torch.serialization.set_crc32_options(False)`` for the storage records: the same pickle (so
``torch.load(weights_only=True)`` and DeepSpeed load it the same), CRC-32 fields of the storage
records 0 (torch does not check them; computing them would mean reading every byte) and a
``serialization_id`` computed without the data.
"""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Mapping
from typing import Any

import torch

from mapper.errors import ConversionError
from mapper.formats.output import Cancelled
from mapper.formats.streaming import write_value
from mapper.tensors import LazyConcat, TensorMeta


class _Recorder:
    """A write-only, seekable file that keeps what is written and where torch skipped ahead."""

    def __init__(self) -> None:
        self.pieces: list[bytes | int] = []  # runs of bytes written, or the size of a hole
        self.position = 0

    def write(self, data: Any) -> int:
        chunk = bytes(data)
        if self.pieces and isinstance(self.pieces[-1], bytes):  # one write(2) per run of bytes
            self.pieces[-1] += chunk
        else:
            self.pieces.append(chunk)
        self.position += len(chunk)
        return len(chunk)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        target = {os.SEEK_SET: offset, os.SEEK_CUR: self.position + offset}.get(whence)
        if target is None or target < self.position:
            raise io.UnsupportedOperation("torch_zip records forward seeks only")
        if target > self.position:
            self.pieces.append(target - self.position)
            self.position = target
        return self.position

    def tell(self) -> int:
        return self.position

    def flush(self) -> None:
        pass


def skeleton(metas: Mapping[str, TensorMeta]) -> list[bytes | int]:
    """The pieces of ``torch.save({name: tensor})`` for tensors of these shapes and dtypes:
    bytes, and for each tensor with data, in dict order, an int (its size) where its bytes go."""
    stand_ins = {name: torch.empty(meta.shape, dtype=meta.dtype) for name, meta in metas.items()}
    recorder = _Recorder()
    with torch.serialization.skip_data():
        torch.save(stand_ins, recorder)  # type: ignore[arg-type]  # write/seek/tell/flush suffice
    holes = [p for p in recorder.pieces if isinstance(p, int)]
    expected = [meta.nbytes for meta in metas.values() if meta.nbytes]
    if holes != expected:
        raise ConversionError(
            f"torch.save laid out the storages as {holes[:5]}..., not as the tensors {expected[:5]}...",
            hint="this torch version writes its zip format differently; please report it "
            f"(torch {torch.__version__})",
        )
    return recorder.pieces


def write_torch_save(
    f: Any,
    tensors: dict[str, torch.Tensor | LazyConcat],
    *,
    stop: threading.Event | None = None,
    release: bool = False,
) -> None:
    """Write ``tensors`` to ``f`` as ``torch.save(tensors)`` would (see the module docstring).

    ``release=True`` removes each tensor from ``tensors`` (a dict the caller owns) once written,
    so its memory can go before the next one is written; ``stop`` cancels between tensors.
    """
    metas = {name: TensorMeta.of(t) for name, t in tensors.items()}
    pieces = skeleton(metas)
    with_data = iter([name for name, meta in metas.items() if meta.nbytes])
    for piece in pieces:
        if isinstance(piece, bytes):
            f.write(piece)
            continue
        name = next(with_data)
        if stop is not None and stop.is_set():
            raise Cancelled(f"writing was cancelled before {name}")
        written = write_value(f, tensors[name])
        if written != piece:
            raise ConversionError(
                f"tensor has {written} bytes, expected {piece}", where=name,
                hint="this is a bug in mapper's writer; please report it",
            )
        if release:
            del tensors[name]
