"""Tensor metadata and the two interfaces the engine talks to: a source and a sink.

The engine never sees files. A *source* gives a manifest (key -> :class:`TensorMeta`) for free and
tensor data on demand; a *sink* receives finished output files' tensors. Readers and writers in
``mapper.formats`` implement these for NeoX and HuggingFace folders; tests use plain dicts.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol, TypeVar, runtime_checkable

import torch

from mapper.dtypes import dtype_name

@dataclass(frozen=True)
class TensorMeta:
    """What compile needs to know about a tensor without reading it."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @classmethod
    def of(cls, tensor: torch.Tensor) -> TensorMeta:
        return cls(tuple(tensor.shape), tensor.dtype)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def __str__(self) -> str:
        return f"{dtype_name(self.dtype)}[{', '.join(map(str, self.shape))}]"


Manifest = Mapping[str, TensorMeta]


@runtime_checkable
class Source(Protocol):
    """Where tensors come from: metadata up front, bytes on demand."""

    def manifest(self) -> Manifest:
        """Every key with its shape and dtype, without reading tensor data."""
        ...

    def get(self, key: str) -> torch.Tensor:
        """The tensor for ``key``; may be a view of a memory map (do not write to it)."""
        ...


Reader = TypeVar("Reader", bound="ClosingReader")


class ClosingReader:
    """Base of the file readers: ``with reader:`` calls :meth:`close` on the way out."""

    def close(self) -> None:
        """Let go of cached file maps (a later ``get`` opens them again)."""

    def __enter__(self: Reader) -> Reader:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


@runtime_checkable
class Sink(Protocol):
    """Where tensors go: one output file (a *group* of target keys) at a time."""

    def groups(self, manifest: Manifest) -> list[list[str]]:
        """Partition the target keys into output files, in the order they should be written."""
        ...

    def write_group(self, index: int, tensors: Mapping[str, torch.Tensor]) -> None:
        """Write output file ``index`` (all its tensors at once); called once per group.

        Values are tensors, or :class:`LazyConcat` when the sink sets ``writes_lazy = True``.
        """
        ...


class DictSource:
    """A source over an in-memory state dict (tests, the demo, library users)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        self._tensors = dict(tensors)

    def manifest(self) -> dict[str, TensorMeta]:
        return {key: TensorMeta.of(t) for key, t in self._tensors.items()}

    def get(self, key: str) -> torch.Tensor:
        return self._tensors[key]


class DictSink:
    """A sink collecting every output tensor into one dict (one group per ``group_size`` keys)."""

    def __init__(self, group_size: int | None = None):
        self.tensors: dict[str, torch.Tensor] = {}
        self.group_size = group_size

    def groups(self, manifest: Manifest) -> list[list[str]]:
        keys = list(manifest)
        size = self.group_size or max(len(keys), 1)
        return [keys[i : i + size] for i in range(0, len(keys), size)]

    def write_group(self, index: int, tensors: Mapping[str, torch.Tensor]) -> None:
        self.tensors.update(tensors)


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bits (NaN payloads and the sign of zero included).

    Compared through the widest integer view the bytes allow: ``torch.equal`` on int64 runs ~6
    times faster than on uint8 (the masters' rounding check compares gigabytes)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    raw_a, raw_b = _raw_bytes(a), _raw_bytes(b)
    for wide in (torch.int64, torch.int32, torch.int16):  # the widest view both allow
        size = wide.itemsize
        if raw_a.numel() % size == 0 and raw_a.storage_offset() % size == 0 == raw_b.storage_offset() % size:
            return torch.equal(raw_a.view(wide), raw_b.view(wide))
    return torch.equal(raw_a, raw_b)


def _raw_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


CHUNK_BYTES = 16 << 20  # the reused buffer of a streamed concatenation or strided view


class LazyConcat:
    """``torch.cat(parts, dim)``, not made yet: the tensor-parallel merge of most weights.

    Concatenating shards into fresh memory only to write the result out costs a copy and a page
    fault per page. The engine hands a sink that sets ``writes_lazy = True`` (both writers) this
    instead of the result of a node that only concatenates (``Op.concat_dim``); the writer streams
    the parts (:func:`byte_chunks`): along dim 0 each part's bytes in turn, straight from the
    source's memory map or file; along another dim a block of rows at a time through one reused
    buffer. Everything else gets a real tensor from :func:`materialize`.
    """

    def __init__(self, parts: list[torch.Tensor], dim: int):
        self.parts = list(parts)
        self.dim = dim % parts[0].dim()
        shape = list(parts[0].shape)
        shape[self.dim] = sum(p.shape[self.dim] for p in parts)
        self.shape = torch.Size(shape)
        self.dtype = parts[0].dtype

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    def numel(self) -> int:
        return math.prod(self.shape)

    def materialize(self) -> torch.Tensor:
        return torch.cat(self.parts, dim=self.dim)

    def split(self, sizes: list[int]) -> list[LazyConcat]:
        """Cut along :attr:`dim` into pieces of ``sizes`` (positive, adding up to the length),
        each again unmade: views of the parts it overlaps, nothing copied. Re-sharding merges
        the ranks and shards them again; a shard of the merge is then a slice of one old rank."""
        pieces: list[LazyConcat] = []
        start = 0
        for size in sizes:
            stop, offset, views = start + size, 0, []
            for part in self.parts:
                length = part.shape[self.dim]
                low, high = max(start, offset), min(stop, offset + length)
                if low < high:
                    views.append(part.narrow(self.dim, low - offset, high - low))
                offset += length
            pieces.append(LazyConcat(views, self.dim))
            start = stop
        return pieces

    def chunks(self, buffer_bytes: int = CHUNK_BYTES) -> Iterator[torch.Tensor]:
        """Contiguous tensors whose bytes, in order, are the concatenation's bytes.

        A chunk may be a reused buffer: consume each before asking for the next.
        """
        if math.prod(self.shape[: self.dim]) == 1:  # dim 0 (or leading 1s): parts follow each other
            for part in self.parts:
                yield from byte_chunks(part, buffer_bytes)
            return
        rows = self.shape[0]
        block = _rows_per_block(self.shape, self.dtype, buffer_bytes)
        buffer = torch.empty((block, *self.shape[1:]), dtype=self.dtype)
        for start in range(0, rows, block):
            stop = min(rows, start + block)
            out = buffer[: stop - start]
            torch.cat([p[start:stop] for p in self.parts], dim=self.dim, out=out)
            yield out



def _rows_per_block(shape: torch.Size, dtype: torch.dtype, buffer_bytes: int) -> int:
    rows = shape[0]
    row_bytes = max(math.prod(shape[1:]) * dtype.itemsize, 1)
    return max(1, min(rows, buffer_bytes // row_bytes))


def byte_chunks(value: torch.Tensor | LazyConcat, buffer_bytes: int = CHUNK_BYTES) -> Iterator[torch.Tensor]:
    """Contiguous CPU tensors whose bytes, in order, are ``value``'s bytes in C order.

    A contiguous tensor is its own (only) chunk, so a writer can still tell where its bytes lie
    (:mod:`mapper.formats.file_ranges`); a strided view (a dim-1 split, a transpose) is copied a
    block of rows at a time through one reused buffer, never whole. A chunk may be that buffer:
    consume each before asking for the next.
    """
    if isinstance(value, LazyConcat):
        yield from value.chunks(buffer_bytes)
        return
    t = value.detach() if value.requires_grad else value  # the same object: a reader may know it
    if t.device.type != "cpu":
        t = t.cpu()
    if t.is_contiguous() or t.dim() == 0:
        yield t.contiguous()
        return
    if t.dim() == 1:
        block = max(1, buffer_bytes // max(t.element_size(), 1))
        buffer = torch.empty(min(block, t.shape[0]), dtype=t.dtype)
        for start in range(0, t.shape[0], block):
            out = buffer[: min(t.shape[0], start + block) - start]
            out.copy_(t[start : start + out.shape[0]])
            yield out
        return
    block = _rows_per_block(t.shape, t.dtype, buffer_bytes)
    buffer = torch.empty((block, *t.shape[1:]), dtype=t.dtype)
    for start in range(0, t.shape[0], block):
        stop = min(t.shape[0], start + block)
        out = buffer[: stop - start]
        out.copy_(t[start:stop])
        yield out


def materialize(value: torch.Tensor | LazyConcat) -> torch.Tensor:
    """A real tensor for a value that may be a :class:`LazyConcat`."""
    return value.materialize() if isinstance(value, LazyConcat) else value
