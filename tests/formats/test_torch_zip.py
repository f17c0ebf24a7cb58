"""Writing torch.save's zip format with every tensor's bytes streamed in (mapper.formats.torch_zip).

Specification: for a flat ``{name: tensor}`` dict the file is what ``torch.save`` writes for the
same dict (each value as a contiguous tensor of its own): the same zip entries at the same
offsets, the same pickle, the same storage bytes; only the storage records' CRC-32 fields (0)
and the ``serialization_id`` differ. So ``torch.load(weights_only=True)`` (memory-mapped or not)
gives the same tensors, and DeepSpeed, which unpickles the same structure, loads it the same.
Values may be strided views or concatenations not made yet; bytes lying in a mapped input file
are copied file to file.
"""

from __future__ import annotations

import gc
import io
import threading
import weakref
import zipfile
from pathlib import Path

import pytest
import torch

from mapper.formats.file_ranges import storage_records
from mapper.formats.output import AtomicFile, Cancelled
from mapper.formats.safetensors_io import map_tensor, read_header, write_safetensors
from mapper.formats.torch_zip import skeleton, write_torch_save
from mapper.tensors import LazyConcat, TensorMeta, materialize


def values() -> dict[str, torch.Tensor | LazyConcat]:
    gen = torch.Generator().manual_seed(0)
    big = torch.randn(64, 48, generator=gen)
    a, b = torch.randn(8, 6, generator=gen).to(torch.bfloat16), torch.randn(8, 6, generator=gen).to(torch.bfloat16)
    return {
        "attention.dense.weight": torch.randn(32, 16, generator=gen).to(torch.bfloat16),
        "attention.dense.bias": torch.randn(32, generator=gen).to(torch.float16),
        "rows.of.a.bigger.storage": big[8:40],  # contiguous, storage_offset != 0
        "columns.of.it": big[:, 8:24],  # strided
        "transposed": big.T,
        "concat.dim0": LazyConcat([a, b], 0),
        "concat.dim1": LazyConcat([a, b], 1),
        "scalar": torch.tensor(3.5, dtype=torch.float64),
        "steps": torch.arange(5, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "mlp._extra_state": torch.empty(0, dtype=torch.uint8),
    }


def plain(tensors: dict[str, torch.Tensor | LazyConcat]) -> dict[str, torch.Tensor]:
    """What torch.save is given for the same dict: each value a contiguous tensor of its own."""
    return {k: materialize(v).contiguous().clone() for k, v in tensors.items()}


def write(path: Path, tensors: dict[str, torch.Tensor | LazyConcat], **options) -> Path:  # type: ignore[no-untyped-def]
    with AtomicFile(path) as f:
        write_torch_save(f, tensors, **options)
    return path


def raw_records(path: Path) -> list[bytes]:
    data = path.read_bytes()
    return [data[offset : offset + size] for offset, size in storage_records(path)]


def test_the_file_is_torch_saves_but_for_the_storage_crcs_and_the_serialization_id(tmp_path: Path) -> None:
    ours = write(tmp_path / "ours.pt", values())
    theirs = tmp_path / "theirs.pt"
    with open(theirs, "wb") as f:  # a file object, as the writer is (entries under "archive/")
        torch.save(plain(values()), f)
    assert ours.stat().st_size == theirs.stat().st_size
    with zipfile.ZipFile(ours) as a, zipfile.ZipFile(theirs) as b:
        entries_a, entries_b = a.infolist(), b.infolist()
        assert [(e.filename, e.header_offset, e.file_size) for e in entries_a] == [
            (e.filename, e.header_offset, e.file_size) for e in entries_b
        ]
        assert a.read("archive/data.pkl") == b.read("archive/data.pkl")
        assert a.read("archive/byteorder") == b"little" and a.read("archive/.storage_alignment") == b"64"
        stored = {e.filename: e.CRC for e in entries_a if "/data/" in e.filename}
        assert stored and set(stored.values()) == {0}
    assert raw_records(ours) == raw_records(theirs)
    assert all(offset % 64 == 0 for offset, _ in storage_records(ours))


def test_torch_load_gives_the_same_tensors_memory_mapped_or_not(tmp_path: Path) -> None:
    path = write(tmp_path / "layer.pt", values())
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(path)) == []
    expected = plain(values())
    for mmap in (False, True):
        loaded = torch.load(path, weights_only=True, mmap=mmap)
        assert list(loaded) == list(expected)
        for key, tensor in expected.items():
            got = loaded[key]
            assert got.dtype == tensor.dtype and got.shape == tensor.shape and got.stride() == tensor.stride(), key
            assert torch.equal(got.view(-1).view(torch.uint8) if got.numel() else got,
                               tensor.view(-1).view(torch.uint8) if tensor.numel() else tensor), key


def test_bytes_lying_in_a_mapped_file_are_copied_in_the_kernel(tmp_path: Path, kernel_copies: list[int]) -> None:
    weight = torch.randn(16, 32).to(torch.bfloat16)
    write_safetensors(open(tmp_path / "m.safetensors", "wb"), {"w": weight}, {"format": "pt"})  # noqa: SIM115
    header = read_header(tmp_path / "m.safetensors")
    mapped = map_tensor(tmp_path / "m.safetensors", header.entries["w"])
    top, bottom = torch.split(mapped, 8, dim=0)  # tensor-parallel shards: ranges of the file
    left, _ = torch.split(mapped, 16, dim=1)  # strided: through memory
    path = write(tmp_path / "layer.pt", {"top": top, "bottom": bottom, "left": left})
    assert kernel_copies == [top.nbytes, bottom.nbytes]
    loaded = torch.load(path, weights_only=True)
    assert torch.equal(loaded["top"], weight[:8]) and torch.equal(loaded["bottom"], weight[8:])
    assert torch.equal(loaded["left"], weight[:, :16])


def test_a_map_is_found_for_its_contiguous_pieces_and_forgotten_with_its_last_tensor(tmp_path: Path) -> None:
    from mapper.formats import file_ranges

    write_safetensors(open(tmp_path / "m.safetensors", "wb"), {"w": torch.ones(1024)}, {"format": "pt"})  # noqa: SIM115
    entry = read_header(tmp_path / "m.safetensors").entries["w"]
    mapped = map_tensor(tmp_path / "m.safetensors", entry)
    piece = mapped[256:512]
    whole, part = file_ranges.mapped_range(mapped), file_ranges.mapped_range(piece)
    assert whole is not None and (whole.offset, whole.nbytes) == (entry.start, 4096)
    assert part is not None and (part.offset, part.nbytes) == (entry.start + 1024, 1024)
    assert file_ranges.mapped_range(piece.clone()) is None and file_ranges.mapped_range(mapped[::2]) is None
    registered = len(file_ranges._maps)
    del mapped, whole
    gc.collect()
    assert len(file_ranges._maps) == registered  # the piece still holds the map
    del piece
    gc.collect()
    assert len(file_ranges._maps) == registered - 1


def test_written_tensors_are_released_and_a_stop_cancels(tmp_path: Path) -> None:
    tensors = {"a": torch.randn(64, 64), "b": torch.randn(64)}
    alive = [weakref.ref(t) for t in tensors.values()]
    owned = dict(tensors)
    del tensors
    write(tmp_path / "x.pt", owned, release=True)
    gc.collect()
    assert owned == {} and all(ref() is None for ref in alive)
    stop = threading.Event()
    stop.set()
    with pytest.raises(Cancelled):
        write(tmp_path / "y.pt", {"a": torch.ones(3)}, stop=stop)
    assert not (tmp_path / "y.pt").exists()


def test_the_skeleton_has_one_hole_per_tensor_with_bytes_in_dict_order() -> None:
    metas = {"a": TensorMeta((3, 2), torch.float32), "empty": TensorMeta((0,), torch.uint8),
             "b": TensorMeta((5,), torch.bfloat16)}
    pieces = skeleton(metas)
    assert [p for p in pieces if isinstance(p, int)] == [24, 10]
    assert sum(len(p) if isinstance(p, bytes) else p for p in pieces) == len(_saved(metas))


def _saved(metas: dict[str, TensorMeta]) -> bytes:
    buffer = io.BytesIO()
    torch.save({k: torch.zeros(m.shape, dtype=m.dtype) for k, m in metas.items()}, buffer)
    return buffer.getvalue()
