"""Atomic output: the output folder appears complete or not at all, whatever goes wrong."""

from __future__ import annotations

import errno
import gc
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType

import pytest
import torch

from mapper.errors import ConversionError
from mapper.formats import HFWriter, NeoXWriter
from mapper.formats.output import HOST, AtomicFile, check_output_path
from mapper.tensors import TensorMeta
from mapper.testing.sinks import write_groups as write

TENSORS = {f"layer_{i:02d}.w@rank0": torch.full((256,), float(i)) for i in range(2, 8)}


def manifest(tensors: Mapping[str, torch.Tensor]) -> dict[str, TensorMeta]:
    return {key: TensorMeta.of(t) for key, t in tensors.items()}


WRITERS = {
    "hf": lambda out, **kw: HFWriter(out, config={"model_type": "x"}, max_shard_size=1024, **kw),
    "neox": lambda out, **kw: NeoXWriter(out, yaml_config={"num-layers": 6}, tp=1, **kw),
}


def fail_writes_under(
    folder: Path, monkeypatch: pytest.MonkeyPatch, error: BaseException, after: int = 2
) -> None:
    """Make write(2) into files below ``folder`` raise ``error`` from the ``after``-th call on."""
    real_write = os.write
    calls = [0]

    def fake_write(fd: int, data: object) -> int:
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(folder)):
            calls[0] += 1
            if calls[0] >= after:
                raise error
        return real_write(fd, data)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "write", fake_write)


@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_a_full_disk_is_a_conversion_error_saying_the_bytes_needed_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    fail_writes_under(tmp_path, monkeypatch, OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(ConversionError, match="the disk is full") as info:
        write(WRITERS[kind](tmp_path / "out"), TENSORS)
    assert "needs" in info.value.message and "bytes" in info.value.message
    assert str(sum(t.nbytes for t in TENSORS.values())) in info.value.message
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("background", [True, False])
def test_an_interrupt_inside_a_write_leaves_no_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, background: bool
) -> None:
    fail_writes_under(tmp_path, monkeypatch, KeyboardInterrupt(), after=3)
    with pytest.raises(KeyboardInterrupt):
        write(WRITERS["hf"](tmp_path / "out", background=background), TENSORS)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_an_interrupt_between_groups_leaves_no_output(tmp_path: Path, kind: str) -> None:
    def interrupt(i: int) -> None:
        if i == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write(WRITERS[kind](tmp_path / "out"), TENSORS, between=interrupt)
    assert list(tmp_path.iterdir()) == []


def test_the_output_appears_only_when_complete(tmp_path: Path) -> None:
    seen: list[bool] = []
    write(
        WRITERS["hf"](tmp_path / "out"), TENSORS, between=lambda i: seen.append((tmp_path / "out").exists())
    )
    assert seen and not any(seen)
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_an_abandoned_writer_removes_its_staging_folder(tmp_path: Path) -> None:
    writer = WRITERS["hf"](tmp_path / "out")
    groups = writer.groups(manifest(TENSORS))
    writer.write_group(0, {k: TENSORS[k] for k in groups[0]})
    assert len(list(tmp_path.iterdir())) == 1
    del writer  # the background thread may still finish the group it holds, then lets go
    deadline = time.monotonic() + 120  # a guard against a hang (collection is prompt)
    while list(tmp_path.iterdir()) and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.01)
    assert list(tmp_path.iterdir()) == []


def test_stale_staging_folders_of_dead_processes_are_removed(tmp_path: Path, ck: ModuleType) -> None:
    dead = tmp_path / f".out.mapper-staging-{HOST}-{ck.dead_pid()}-abcd1234"
    alive = tmp_path / f".out.mapper-staging-{HOST}-{os.getppid()}-abcd1234"
    other = tmp_path / f".other.mapper-staging-{HOST}-{ck.dead_pid()}-abcd1234"
    for folder in (dead, alive, other):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half")
    write(WRITERS["hf"](tmp_path / "out"), TENSORS)
    assert not dead.exists()
    assert alive.exists() and other.exists()


def test_an_old_output_moved_aside_by_a_killed_force_run_is_restored(tmp_path: Path, ck: ModuleType) -> None:
    """A --force run killed between its two renames left OUT moved aside: the next run puts it
    back, and (without force) then refuses to replace it."""
    moved = tmp_path / f".out.mapper-old-{HOST}-{ck.dead_pid()}-abcd1234"
    moved.mkdir()
    (moved / "config.json").write_text("{}")
    with pytest.raises(ConversionError, match="already exists"):
        write(WRITERS["hf"](tmp_path / "out"), TENSORS)
    assert (tmp_path / "out" / "config.json").read_text() == "{}"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("relation", ["same", "inside", "contains"])
def test_an_output_overlapping_the_input_is_refused(tmp_path: Path, relation: str) -> None:
    source = tmp_path / "model" / "ckpt"
    source.mkdir(parents=True)
    out = {"same": source, "inside": source / "hf", "contains": tmp_path / "model"}[relation]
    with pytest.raises(ConversionError, match="input folder") as info:
        HFWriter(out, config=None, inputs=[source], force=True)
    assert info.value.hint


def test_an_existing_output_is_refused_without_force(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    with pytest.raises(ConversionError, match="already exists") as info:
        WRITERS["hf"](tmp_path / "out")
    assert "force" in str(info.value)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConversionError, match="not a folder"):
        check_output_path(tmp_path / "file", force=True)


def test_force_replaces_the_old_output_only_once_the_new_one_is_complete(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    seen: list[bool] = []
    write(WRITERS["hf"](out, force=True), TENSORS, between=lambda i: seen.append((out / "old.txt").exists()))
    assert all(seen)
    assert not (out / "old.txt").exists() and (out / "config.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_an_atomic_file_is_complete_or_absent(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    with pytest.raises(RuntimeError):
        with AtomicFile(path) as f:
            f.write(b"half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with AtomicFile(path) as f:
        f.write(memoryview(b"whole"))
        f.write(torch.arange(3, dtype=torch.int16).numpy())
    assert path.read_bytes() == b"whole" + bytes([0, 0, 1, 0, 2, 0])


def test_the_background_writer_writes_two_files_at_once_and_no_more() -> None:
    """Two threads: one file's copy overlaps the other's wait for the disk; the caller is held
    back while both are busy, so at most three groups are alive."""
    from mapper.formats.writing import BackgroundWriter

    class Files:
        def __init__(self) -> None:
            self.release = threading.Event()
            self.running: set[int] = set()
            self.most = 0
            self.done: list[int] = []
            self.lock = threading.Lock()

        def write(self, index: int, tensors: Mapping[str, torch.Tensor]) -> None:
            with self.lock:
                self.running.add(index)
                self.most = max(self.most, len(self.running))
            assert self.release.wait(timeout=120)
            with self.lock:
                self.running.discard(index)
                self.done.append(index)

    files = Files()
    worker = BackgroundWriter(files.write, name="test-writer", workers=2)
    worker.submit(0, {})
    worker.submit(1, {})
    third = threading.Thread(target=worker.submit, args=(2, {}))
    third.start()
    deadline = time.monotonic() + 120  # a guard against a hang (the threads start at once)
    while files.running != {0, 1} and time.monotonic() < deadline:
        time.sleep(0.01)
    assert files.running == {0, 1}  # both files are being written at once
    third.join(timeout=0.2)
    assert third.is_alive()  # and the caller is held back until one is done
    files.release.set()
    third.join(timeout=120)
    worker.close()
    assert sorted(files.done) == [0, 1, 2] and files.most == 2


def test_the_first_error_of_either_writer_thread_is_raised() -> None:
    from mapper.formats.writing import BackgroundWriter

    class Files:
        def write(self, index: int, tensors: Mapping[str, torch.Tensor]) -> None:
            if index == 1:
                raise ConversionError("cannot write file 1")

    files = Files()
    worker = BackgroundWriter(files.write, name="test-writer", workers=2)
    worker.submit(0, {})
    worker.submit(1, {})
    with pytest.raises(ConversionError, match="cannot write file 1"):
        for index in range(2, 10):  # a later submit, or close, raises it
            worker.submit(index, {})
        worker.close()
    worker.cancel()
