"""Where a memory-mapped tensor's bytes lie in its checkpoint file, so writers copy them in the kernel.

Most bytes of a NeoX -> HF conversion are copied unchanged: a renamed tensor, or one part of a
tensor-parallel merge along dim 0. Copying them through Python (``write(2)`` from the memory
map) costs a page fault per touched page and a copy through user space; ``copy_file_range(2)``
moves the same bytes file to file inside the kernel, as ``cp`` does. On the benchmark machine a
warm 3.6 GB copy took 1.3 s with ``sendfile`` against 3.3-9.9 s with ``write`` from a memory map.

``torch.load(mmap=True)`` maps the whole ``.pt`` zip file once and makes every storage a slice of
that map at its record's offset (records are stored uncompressed). So a handed-out tensor's offset
in its file is its address minus the map's base address. The base is not exposed by torch; it is
found here from the zip directory: the address ``B`` for which the loaded storages start at ``B``
plus a record's data offset, confirmed by comparing a few storages' first bytes with the file
(if no single ``B`` fits best, or the bytes differ, the file gets no ranges and its tensors are
written the ordinary way).

Every reader registers what it hands out in one registry (:func:`register_map`), and writers ask
it (:func:`mapped_range`): any contiguous tensor lying inside registered memory that is still
alive is a range of its file, views included (a dim-0 split of a weight into tensor-parallel
shards is a range of the input file, copied in the kernel). A safetensors tensor is mapped on its
own (``safetensors_io.map_tensor``) and its map is registered, the entry going with the map; a
tensor handed out from a ``.pt`` map (found inside one of the file's records) is registered with
its own bytes (:meth:`Placement.register`), the entry going with that tensor. Memory inside live mapped memory
belongs to it (nothing else can be allocated there), and no op writes into its inputs, so such a
tensor's bytes are the file's bytes; a tensor made by an op (a transpose, a cast, a copy...) lies
elsewhere and is never taken for file bytes.
"""

from __future__ import annotations

import bisect
import struct
import threading
import weakref
import zipfile
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")  # a zip local file header (30 bytes)
LOCAL_HEADER_MAGIC = b"PK\x03\x04"
SAMPLES, SAMPLE_BYTES = 3, 64  # storages compared with the file to confirm a base address


@dataclass(frozen=True)
class FileRange:
    """``nbytes`` bytes of ``path`` starting at ``offset``: exactly a tensor's raw bytes."""

    path: Path
    offset: int
    nbytes: int


@dataclass(frozen=True)
class ZipRecord:
    """One record of a zip file: its name, where its bytes start, its stored size, and whether it
    is stored as is (``torch.save`` never compresses; torch's zip reader would inflate one)."""

    name: str
    offset: int
    size: int
    stored: bool


def zip_records(path: Path) -> list[ZipRecord]:
    """Every record of the zip file ``path``, from its directory and local headers (as torch's
    reader finds them: the data starts after the local header's name and extra field)."""
    records = []
    with open(path, "rb") as f, zipfile.ZipFile(f) as archive:
        for info in archive.infolist():
            f.seek(info.header_offset)
            header = f.read(LOCAL_HEADER.size)
            if len(header) != LOCAL_HEADER.size or header[:4] != LOCAL_HEADER_MAGIC:
                raise zipfile.BadZipFile(f"record {info.filename!r} has no local header")
            fields = LOCAL_HEADER.unpack(header)
            offset = info.header_offset + LOCAL_HEADER.size + fields[9] + fields[10]
            records.append(ZipRecord(info.filename, offset, info.compress_size, info.compress_type == zipfile.ZIP_STORED))
    return records


def is_storage_record(name: str) -> bool:
    """``<archive>/data/<key>``: the bytes of one storage."""
    parent, _, key = name.rpartition("/")
    return parent.endswith("data") and key.isdigit()


def storage_records(path: Path) -> list[tuple[int, int]]:
    """(data offset, size) of every storage record (``<archive>/data/<key>``, stored
    uncompressed) of the ``torch.save`` zip file ``path``, sorted by offset."""
    return sorted(
        (record.offset, record.size) for record in zip_records(path)
        if is_storage_record(record.name) and record.stored and record.size > 0
    )


def mapping_base(records: list[tuple[int, int]], tensors: Iterable[torch.Tensor]) -> int | None:
    """The address at which the file was mapped, from tensors loaded out of it.

    The candidate ``B`` that puts the most storages (of non-zero size) exactly at ``B`` + a
    record's offset; storages made elsewhere (a copy, an ``_extra_state`` read from a BytesIO)
    fit no record. None when there is no storage to go by, or two candidates fit as well.
    """
    offsets = {offset for offset, _ in records}
    addresses = {t.untyped_storage().data_ptr() for t in tensors if t.untyped_storage().nbytes() > 0}
    votes = Counter(address - offset for address in addresses for offset in offsets if address >= offset)
    ranked = votes.most_common(2)
    if not ranked or (len(ranked) == 2 and ranked[0][1] == ranked[1][1]):
        return None
    return ranked[0][0]


def verified_base(path: Path, records: list[tuple[int, int]], tensors: Iterable[torch.Tensor]) -> int | None:
    """:func:`mapping_base`, confirmed by comparing the first bytes of a few storages in memory
    with the file's bytes at the offsets it implies (a wrong base would copy the wrong bytes)."""
    tensors = list(tensors)
    base = mapping_base(records, tensors)
    if base is None:
        return None
    offsets = {offset for offset, _ in records}
    storages = [t.untyped_storage() for t in tensors]
    samples = [s for s in storages if s.nbytes() > 0 and s.data_ptr() - base in offsets][:SAMPLES]
    with open(path, "rb") as f:
        for storage in samples:
            count = min(SAMPLE_BYTES, storage.nbytes())
            f.seek(storage.data_ptr() - base)
            in_memory = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (count,)).numpy().tobytes()
            if f.read(count) != in_memory:
                return None
    return base if samples else None


@dataclass(frozen=True)
class Placement:
    """Where a ``torch.save`` zip file was mapped: the address of its first byte, and its storage
    records ((data offset, size), sorted)."""

    path: Path
    base: int
    records: list[tuple[int, int]]

    def range_of(self, tensor: torch.Tensor) -> FileRange | None:
        """The file range of ``tensor``, if it is a contiguous CPU tensor lying inside one record."""
        if tensor.device.type != "cpu" or not tensor.is_contiguous() or tensor.nbytes == 0:
            return None
        offset = tensor.data_ptr() - self.base
        index = bisect.bisect_right(self.records, (offset, float("inf"))) - 1
        if index < 0:
            return None
        start, size = self.records[index]
        if not (start <= offset and offset + tensor.nbytes <= start + size):
            return None
        return FileRange(self.path, offset, tensor.nbytes)

    def register(self, tensor: torch.Tensor) -> None:
        """Register ``tensor``'s bytes as bytes of the file (:func:`register_map`) for as long as
        ``tensor`` lives (it keeps the map alive)."""
        found = self.range_of(tensor)
        if found is not None:
            register_map(tensor, tensor.data_ptr(), found.nbytes, found.path, found.offset)


def place(path: Path, tensors: Iterable[torch.Tensor]) -> Placement | None:
    """Where ``path`` was mapped, from ``tensors`` loaded out of it (:func:`verified_base`), or
    None when that cannot be told for sure."""
    records = storage_records(path)
    base = verified_base(path, records, tensors)
    return Placement(path, base, records) if base is not None else None


@dataclass(frozen=True)
class _Map:
    owner: weakref.ref[Any]  # an object keeping the memory mapped: the map is live while it is
    address: int
    nbytes: int
    path: Path
    offset: int  # file offset of ``address``


_maps: dict[int, _Map] = {}
_maps_lock = threading.Lock()


def register_map(owner: Any, address: int, nbytes: int, path: Path, offset: int) -> None:
    """Remember that ``nbytes`` of memory at ``address`` hold ``path`` from ``offset`` on, for as
    long as ``owner`` lives: the mmap object (which tensors viewing the memory keep alive), or a
    tensor handed out from a mapped ``.pt`` file (which keeps its file's map alive)."""
    key = id(owner)
    with _maps_lock:
        _maps[key] = _Map(weakref.ref(owner), address, nbytes, path, offset)
    weakref.finalize(owner, _forget_map, key)


def _forget_map(key: int) -> None:
    with _maps_lock:
        _maps.pop(key, None)


def mapped_range(tensor: object) -> FileRange | None:
    """The file range of a contiguous CPU tensor lying inside registered, live mapped memory."""
    if not isinstance(tensor, torch.Tensor) or tensor.device.type != "cpu" or not tensor.is_contiguous():
        return None
    start, nbytes = tensor.data_ptr(), tensor.nbytes
    if nbytes == 0:
        return None
    with _maps_lock:
        for entry in _maps.values():
            if entry.address <= start and start + nbytes <= entry.address + entry.nbytes and entry.owner() is not None:
                return FileRange(entry.path, entry.offset + start - entry.address, nbytes)
    return None
