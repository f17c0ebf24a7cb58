"""The safetensors file format, read and written by hand: validated headers, streamed data.

Layout: an 8-byte little-endian header length ``N``, ``N`` bytes of JSON (``{key: {"dtype",
"shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``, space-padded), then the
data; offsets are relative to the end of the header. Reading validates the header the way the
reference implementation does (the tensors tile the data region exactly: no overlap, no hole,
nothing past the end of the file) so a truncated or lying file is an error naming the file and
the tensor, not a crash or garbage. Writing streams each tensor's bytes from its own memory into
the file; there is never a whole-file buffer, and the writer may let go of each tensor as soon as
its bytes are written (``release``), so memory shrinks while the file grows.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mapper.dtypes import SAFETENSORS_DTYPES, SAFETENSORS_NAMES
from mapper.errors import CheckpointError, ConversionError
from mapper.formats.file_ranges import register_map
from mapper.formats.streaming import write_value
from mapper.formats.output import Cancelled
from mapper.input_files import check_regular
from mapper.keyorder import natural_key
from mapper.tensors import TensorMeta

MAX_HEADER = 100_000_000  # the reference implementation's limit
MAX_DIMS = 64  # dimensions of one tensor (torch's own limit is 64 too)

@dataclass(frozen=True)
class Entry:
    """One tensor of a safetensors file: its metadata and absolute byte range in the file."""

    meta: TensorMeta
    start: int
    end: int


@dataclass(frozen=True)
class Header:
    path: Path
    entries: dict[str, Entry]
    metadata: dict[str, str]


def _bad(path: Path, message: str, key: str | None = None) -> CheckpointError:
    where = f"{path}:{key}" if key else path
    return CheckpointError(
        message,
        where=where,
        hint="the file is truncated or was not written by a safetensors writer; copy or export it again",
    )


def _entry(path: Path, key: str, raw: Any) -> tuple[TensorMeta, int, int]:
    if not isinstance(raw, dict):
        raise _bad(path, f"header entry for {key!r} is a {type(raw).__name__}, expected an object", key)
    dtype_name, shape, offsets = raw.get("dtype"), raw.get("shape"), raw.get("data_offsets")
    if dtype_name not in SAFETENSORS_DTYPES:
        raise _bad(path, f"unknown dtype {dtype_name!r} (known: {', '.join(SAFETENSORS_DTYPES)})", key)
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise _bad(path, f"shape {shape!r} is not a list of non-negative integers", key)
    if len(shape) > MAX_DIMS or any(d >= 2**63 for d in shape) or math.prod(d for d in shape if d) >= 2**63:
        raise _bad(
            path, f"shape {shape!r} is beyond what a tensor can have (at most {MAX_DIMS} dimensions, "
            "and sizes whose product is below 2**63)", key,
        )
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise _bad(path, f"data_offsets {offsets!r} are not [begin, end] with 0 <= begin <= end", key)
    meta = TensorMeta(tuple(shape), SAFETENSORS_DTYPES[dtype_name])
    if offsets[1] - offsets[0] != meta.nbytes:
        raise _bad(
            path,
            f"data_offsets {offsets} span {offsets[1] - offsets[0]} bytes but a {meta} tensor "
            f"has {meta.nbytes}",
            key,
        )
    return meta, offsets[0], offsets[1]


def read_header(path: Path) -> Header:
    """Parse and validate the header of ``path`` without reading any tensor data."""
    size = check_regular(path, what="this safetensors file").st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _bad(path, f"only {size} bytes: too short for a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER:
            raise _bad(path, f"header length {n} exceeds the {MAX_HEADER}-byte limit")
        if 8 + n > size:
            raise _bad(path, f"header length {n} but the file has only {size} bytes")
        raw = f.read(n)
    try:
        parsed = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _bad(path, f"the header is not valid JSON ({exc})") from exc
    if not isinstance(parsed, dict):
        raise _bad(path, "the header is not a JSON object")
    metadata = parsed.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _bad(path, "__metadata__ must map strings to strings")
    data_start, data_len = 8 + n, size - 8 - n
    spans = sorted(
        ((*_entry(path, key, raw), key) for key, raw in parsed.items()), key=lambda e: (e[1], e[2])
    )
    cursor, previous = 0, None
    for meta, begin, end, key in spans:
        if begin < cursor:
            raise _bad(
                path,
                f"data_offsets [{begin}, {end}] overlap tensor {previous!r} (which ends at {cursor})",
                key,
            )
        if begin > cursor:
            raise _bad(path, f"data_offsets [{begin}, {end}] leave a hole after byte {cursor}", key)
        if end > data_len:
            raise _bad(
                path,
                f"data_offsets [{begin}, {end}] point past the end of the file (the data region "
                f"has {data_len} bytes): truncated file?",
                key,
            )
        cursor, previous = end, key
    if cursor != data_len:
        raise _bad(path, f"{data_len - cursor} bytes after the last tensor are not described by the header")
    entries = {
        key: Entry(meta, data_start + begin, data_start + end)
        for meta, begin, end, key in sorted(spans, key=lambda e: natural_key(e[3]))
    }
    return Header(path, entries, dict(metadata))


def map_tensor(path: Path, entry: Entry) -> torch.Tensor:
    """The tensor at ``entry`` of ``path`` as a view of a (copy-on-write) memory map of its own
    bytes only: the map, and the pages read through it, go away with the last view of the tensor,
    so a reader's memory follows the tensors still in use, not the shards it has read from. The
    map is registered (:func:`~mapper.formats.file_ranges.register_map`): a writer copies the
    tensor, or any contiguous piece of it, file to file in the kernel."""
    meta = entry.meta
    if meta.numel == 0:
        return torch.empty(meta.shape, dtype=meta.dtype)
    start = entry.start - entry.start % mmap.ALLOCATIONGRANULARITY
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), entry.end - start, access=mmap.ACCESS_COPY, offset=start)
    flat = torch.frombuffer(mapped, dtype=torch.uint8, count=entry.end - entry.start, offset=entry.start - start)
    if flat.data_ptr() % meta.dtype.itemsize:
        flat = flat.clone()
    else:
        register_map(mapped, flat.data_ptr(), entry.end - entry.start, path, entry.start)
    return flat.view(meta.dtype).reshape(meta.shape)


def data_order(keys: Sequence[str], metas: Mapping[str, TensorMeta]) -> list[str]:
    """Largest element size first, so every tensor starts at a multiple of its element size."""
    return sorted(keys, key=lambda k: (-metas[k].dtype.itemsize, natural_key(k)))


def header_bytes(keys: Sequence[str], metas: Mapping[str, TensorMeta], metadata: Mapping[str, str]) -> bytes:
    """The length prefix and JSON header for ``keys`` laid out in that order, padded to 8 bytes."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for key in keys:
        meta = metas[key]
        if meta.dtype not in SAFETENSORS_NAMES:
            raise ConversionError(
                f"safetensors cannot store dtype {meta.dtype}",
                where=key,
                hint=f"cast it to one of: {', '.join(str(d) for d in SAFETENSORS_NAMES)}",
            )
        header[key] = {
            "dtype": SAFETENSORS_NAMES[meta.dtype],
            "shape": list(meta.shape),
            "data_offsets": [offset, offset + meta.nbytes],
        }
        offset += meta.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-(len(raw) + 8) % 8)
    return struct.pack("<Q", len(raw)) + raw


def file_size(keys: Sequence[str], metas: Mapping[str, TensorMeta], metadata: Mapping[str, str]) -> int:
    return len(header_bytes(keys, metas, metadata)) + sum(metas[k].nbytes for k in keys)


def write_safetensors(
    f: Any,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
    *,
    stop: threading.Event | None = None,
    release: bool = False,
) -> None:
    """Stream ``tensors`` into the writable ``f`` (anything with ``write(bytes-like)``).

    ``stop`` lets another thread cancel between tensors (a KeyboardInterrupt, another error).
    ``release=True`` removes each tensor from ``tensors`` (then a dict the caller owns) once it
    is written: when nothing else refers to it, its memory is freed before the next one is written.
    Values may be :class:`~mapper.tensors.LazyConcat`; bytes that lie in an input file (mapped
    memory a reader registered) are appended with ``f.copy_range``
    (:class:`~mapper.formats.output.AtomicFile`), file to file (:mod:`mapper.formats.streaming`).
    """
    if sys.byteorder != "little":
        raise ConversionError(
            "writing safetensors needs a little-endian machine", hint="run on x86-64 or ARM64"
        )
    metas = {key: TensorMeta.of(t) for key, t in tensors.items()}
    order = data_order(list(tensors), metas)
    f.write(header_bytes(order, metas, metadata))
    for key in order:
        if stop is not None and stop.is_set():
            raise Cancelled(f"writing was cancelled before {key}")
        value = tensors[key]
        written = write_value(f, value)
        del value
        if written != metas[key].nbytes:
            raise ConversionError(
                f"tensor has {written} bytes, expected {metas[key].nbytes}",
                where=key,
                hint="this is a bug in mapper's writer; please report it",
            )
        if release:
            del tensors[key]  # type: ignore[attr-defined]
