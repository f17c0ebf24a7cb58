"""Copying tensors file to file: where a memory-mapped tensor's bytes lie, and the kernel copy.

A tensor handed out by the NeoX reader is a view of its file's memory map; its bytes are a
range of the file, which the HF writer copies with ``copy_file_range`` (or ``sendfile``, or
plain reads where neither works) instead of through Python. Checked: the range found is exactly
the tensor's bytes, and a contiguous piece of it is found at its own bytes, while a copy, a cast
or a transpose never is; the entry goes with the tensor; the copy is the same bytes whichever way
the kernel allows; a conversion writes the same files either way.
"""

from __future__ import annotations

import errno
import gc
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from mapper.checkpoints import convert_checkpoint
from mapper.errors import ConversionError
from mapper.formats import NeoXCheckpoint
from mapper.formats.neox import SMALL
from mapper.formats import file_ranges
from mapper.formats.file_ranges import Placement, mapped_range, mapping_base, storage_records, verified_base
from mapper.formats.output import AtomicFile
from mapper.testing import synthesize_variant, write_neox_checkpoint


def _raw(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A torch.save zip file mixing dtypes, an empty tensor, views sharing one storage and a
    tensor that is not a storage's start."""
    gen = torch.Generator().manual_seed(0)
    whole = torch.randn(64, 32, generator=gen)
    state = {
        "a": torch.randn(128, 64, generator=gen).to(torch.bfloat16),
        "b": torch.randint(0, 255, (1000,), dtype=torch.uint8, generator=gen),
        "empty": torch.empty(0, dtype=torch.uint8),
        "top": whole[:32],
        "bottom": whole[32:],
        "c": torch.randn(7, generator=gen, dtype=torch.float64),
    }
    path = tmp_path / "state.pt"
    torch.save(state, path)
    return path, state


@dataclass
class Mapped:
    """``saved`` loaded the way the NeoX reader loads it, with its map's base address found."""

    path: Path
    tensors: dict[str, torch.Tensor]
    records: list[tuple[int, int]]
    base: int


@pytest.fixture
def mapped(saved: tuple[Path, dict[str, torch.Tensor]]) -> Mapped:
    path, _ = saved
    loaded = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
    records = storage_records(path)
    base = mapping_base(records, loaded.values())
    assert base is not None
    return Mapped(path, loaded, records, base)


def test_every_mapped_tensor_is_found_at_its_bytes_in_the_file(
    saved: tuple[Path, dict[str, torch.Tensor]], mapped: Mapped
) -> None:
    path, state = saved
    loaded = mapped.tensors
    placement = Placement(path, mapped.base, mapped.records)
    raw = path.read_bytes()
    for key, tensor in loaded.items():
        placement.register(tensor)
        found = mapped_range(tensor)
        if tensor.nbytes == 0:
            assert found is None
            continue
        assert found is not None, key
        assert raw[found.offset : found.offset + found.nbytes] == _raw(state[key]), key


def test_pieces_of_a_registered_tensor_are_found_at_their_bytes_and_nothing_made_from_it_is(mapped: Mapped) -> None:
    a = mapped.tensors["a"]
    Placement(mapped.path, mapped.base, mapped.records).register(a)
    whole = mapped_range(a)
    assert whole is not None
    for piece, skip in ((a[1:], a[0].nbytes), (a.view(-1)[64:128], 64 * a.element_size()), (a.view(-1), 0)):
        found = mapped_range(piece)
        assert found is not None and (found.offset, found.nbytes) == (whole.offset + skip, piece.nbytes)
    for other in (a.t(), a[:, 1:], a.clone(), a.float(), torch.zeros_like(a)):
        assert mapped_range(other) is None
    registered = len(file_ranges._maps)
    Placement(mapped.path, mapped.base, mapped.records).register(a.t())  # not contiguous: never a plain byte range
    assert len(file_ranges._maps) == registered


def test_a_range_is_forgotten_with_its_tensor(mapped: Mapped) -> None:
    registered = len(file_ranges._maps)
    a = mapped.tensors.pop("a")
    Placement(mapped.path, mapped.base, mapped.records).register(a)
    assert len(file_ranges._maps) == registered + 1
    del a
    gc.collect()
    assert len(file_ranges._maps) == registered


def test_storages_made_elsewhere_do_not_fool_the_base(mapped: Mapped) -> None:
    records, true_base, loaded = mapped.records, mapped.base, mapped.tensors
    heap = [torch.arange(100, dtype=torch.uint8), torch.ones(5)]  # e.g. _extra_state read from a BytesIO
    assert mapping_base(records, [*loaded.values(), *heap]) == true_base
    assert mapping_base(records, heap[:1]) is None  # it would fit any record equally well
    assert mapping_base(records, heap) is None
    assert mapping_base(records, []) is None


def test_a_base_is_confirmed_against_the_file_bytes(tmp_path: Path, mapped: Mapped) -> None:
    """A file with the same layout but other tensor bytes is not taken for this map."""
    data = bytearray(mapped.path.read_bytes())
    for offset, size in mapped.records:
        data[offset : offset + size] = bytes(b ^ 0xFF for b in data[offset : offset + size])
    twin = tmp_path / "twin.pt"
    twin.write_bytes(bytes(data))
    assert storage_records(twin) == mapped.records
    assert verified_base(mapped.path, mapped.records, mapped.tensors.values()) == mapped.base
    assert verified_base(twin, mapped.records, mapped.tensors.values()) is None


@pytest.mark.parametrize("layout", ["pipeline", "sequential"])
def test_the_reader_hands_out_ranges_for_big_mapped_tensors_only(tmp_path: Path, layout: str) -> None:
    config, tensors = synthesize_variant("te-full", tp=2, num_layers=2, hidden_size=512, num_heads=4, num_kv_heads=4)
    source = NeoXCheckpoint(write_neox_checkpoint(tensors, config, tmp_path / "neox", layout=layout))  # type: ignore[arg-type]
    assert source.layout == layout
    big = [key for key, meta in source.manifest().items() if meta.nbytes > SMALL]
    assert big
    with source:
        for key in source.manifest():
            tensor = source.get(key)
            found = mapped_range(tensor)
            if found is None:
                continue
            assert found.path == source.file_of(key)
            with open(found.path, "rb") as f:
                f.seek(found.offset)
                assert f.read(found.nbytes) == _raw(tensors[key]), key
        handed = [mapped_range(source.get(key)) for key in big]
    assert all(handed)  # every large tensor of a layer or mp_rank file can be copied in the kernel


@pytest.mark.parametrize("kernel", ["copy_file_range", "sendfile", "neither", "sendfile to sockets only"])
def test_copy_range_appends_the_same_bytes_however_the_kernel_copies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kernel: str
) -> None:
    source = tmp_path / "source.bin"
    source.write_bytes(os.urandom(300_000))
    refused: list[str] = []

    def unsupported(name: str, code: int):  # type: ignore[no-untyped-def]
        def call(*args: object) -> int:
            refused.append(name)
            raise OSError(code, os.strerror(code))

        return call

    if kernel != "copy_file_range":
        monkeypatch.setattr(os, "copy_file_range", unsupported("copy_file_range", errno.EXDEV))
    if kernel == "neither":
        monkeypatch.setattr(os, "sendfile", unsupported("sendfile", errno.EINVAL))
    if kernel == "sendfile to sockets only":  # macOS: no copy_file_range, sendfile to sockets
        monkeypatch.setattr(os, "copy_file_range", unsupported("copy_file_range", errno.ENOSYS))
        monkeypatch.setattr(os, "sendfile", unsupported("sendfile", errno.ENOTSOCK))
    target = tmp_path / "out.bin"
    with AtomicFile(target) as f:
        f.write(b"head")
        assert f.copy_range(source, 1000, 200_000) == 200_000
        f.write(b"tail")
    assert target.read_bytes() == b"head" + source.read_bytes()[1000:201_000] + b"tail"
    both = ["copy_file_range", "sendfile"]
    assert refused == {"copy_file_range": [], "sendfile": both[:1], "neither": both, "sendfile to sockets only": both}[kernel]


def test_copy_range_reports_a_full_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "source.bin"
    source.write_bytes(b"x" * 10_000)

    def full(*args: object) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "copy_file_range", full)
    with pytest.raises(ConversionError, match="the disk is full"):
        with AtomicFile(tmp_path / "out.bin", needed=10_000) as f:
            f.copy_range(source, 0, 10_000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source.bin"]


def test_copy_range_refuses_a_source_shorter_than_said(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "source.bin"
    source.write_bytes(b"x" * 100)
    with pytest.raises(ConversionError, match="ended 50 bytes early"):
        with AtomicFile(tmp_path / "out.bin") as f:
            f.copy_range(source, 50, 100)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_conversion_writes_the_same_files_with_and_without_kernel_copies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kernel_copies: list[int]
) -> None:
    config, tensors = synthesize_variant("te-full", tp=2, num_layers=2, hidden_size=256, num_heads=4, num_kv_heads=4)
    neox = write_neox_checkpoint(tensors, config, tmp_path / "neox")
    convert_checkpoint(neox, tmp_path / "kernel", max_shard_size=1 << 20)
    written = sum(p.stat().st_size for p in (tmp_path / "kernel").glob("*.safetensors"))
    assert sum(kernel_copies) > written / 2  # QKV, fc1, both vocabulary matrices: dim-0 shards
    monkeypatch.setattr("mapper.formats.streaming.mapped_range", lambda tensor: None)
    convert_checkpoint(neox, tmp_path / "python", max_shard_size=1 << 20)
    kernel, python = _files(tmp_path / "kernel"), _files(tmp_path / "python")
    assert len([n for n in kernel if n.endswith(".safetensors")]) > 2
    assert kernel.keys() == python.keys()
    differing = [name for name in kernel if kernel[name] != python[name]]
    assert differing == []


def test_hf_to_neox_copies_dim_0_shards_of_hf_weights_file_to_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kernel_copies: list[int]
) -> None:
    """The HF reader maps each tensor on its own; a tensor-parallel shard along dim 0 is a range
    of the HF file, which the NeoX writer copies in the kernel into its .pt file."""
    config, tensors = synthesize_variant(
        "te-full-parallel", tp=2, num_layers=2, hidden_size=256, num_heads=4, num_kv_heads=4
    )
    neox = write_neox_checkpoint(tensors, config, tmp_path / "neox")
    convert_checkpoint(neox, tmp_path / "hf")
    kernel_copies.clear()  # count the way back only
    convert_checkpoint(tmp_path / "hf", tmp_path / "kernel", tp=2)
    layer_files = sum(p.stat().st_size for p in (tmp_path / "kernel").rglob("layer_*.pt"))
    assert sum(kernel_copies) > layer_files / 2
    monkeypatch.setattr("mapper.formats.streaming.mapped_range", lambda tensor: None)
    convert_checkpoint(tmp_path / "hf", tmp_path / "python", tp=2)
    kernel, python = _files(tmp_path / "kernel"), _files(tmp_path / "python")
    assert kernel.keys() == python.keys() and [n for n in kernel if kernel[n] != python[n]] == []
    back = NeoXCheckpoint(tmp_path / "kernel")
    assert all(torch.equal(back.get(k).view(-1).view(torch.uint8), t.contiguous().view(-1).view(torch.uint8))
               for k, t in tensors.items() if t.numel())


def test_a_tensor_of_an_hf_pytorch_model_bin_is_a_range_of_its_file(tmp_path: Path) -> None:
    """The HF reader keeps its .bin files as the NeoX reader keeps its .pt files, and registers
    what it hands out the same way: a writer copies those bytes file to file too."""
    from mapper.formats import HFCheckpoint

    weight = torch.randn(64, 32, generator=torch.Generator().manual_seed(1))
    torch.save({"w": weight, "b": torch.ones(3)}, tmp_path / "pytorch_model.bin")
    with HFCheckpoint(tmp_path) as source:
        handed = source.get("w")
        found = mapped_range(handed[16:])
        assert found is not None and found.path == tmp_path / "pytorch_model.bin"
        with open(found.path, "rb") as f:
            f.seek(found.offset)
            assert f.read(found.nbytes) == _raw(weight[16:])
