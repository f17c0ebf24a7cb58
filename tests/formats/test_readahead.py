"""Read-ahead: a hint to the kernel that never blocks, never fails a conversion, and stays
within its budget."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mapper.formats import readahead


@pytest.fixture
def advised(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int, int]]:
    """(file name, offset, length) of every posix_fadvise call, made synchronously."""
    calls: list[tuple[str, int, int]] = []

    def fake_fadvise(fd: int, offset: int, length: int, advice: int) -> None:
        assert advice == os.POSIX_FADV_WILLNEED
        calls.append((Path(os.readlink(f"/proc/self/fd/{fd}")).name, offset, length))

    monkeypatch.setattr(os, "posix_fadvise", fake_fadvise)
    monkeypatch.setattr(readahead.threading, "Thread", _Inline)
    return calls


class _Inline:
    def __init__(self, target, args, **_: object) -> None:  # type: ignore[no-untyped-def]
        self.run = lambda: target(*args)

    def start(self) -> None:
        self.run()


pytestmark = pytest.mark.skipif(not hasattr(os, "posix_fadvise") or not Path("/proc/self/fd").exists(),
                                reason="posix_fadvise and /proc are Linux's")


def test_files_are_advised_in_order_until_the_budget_is_spent(tmp_path: Path, advised: list) -> None:
    files = []
    for name in ("a", "b", "c"):
        (tmp_path / name).write_bytes(b"x" * 100)
        files.append(tmp_path / name)
    readahead.read_ahead_files(files, budget=150)
    assert advised == [("a", 0, 100), ("b", 0, 50)]


def test_what_is_not_a_regular_file_is_skipped_without_blocking(tmp_path: Path, advised: list) -> None:
    fifo = tmp_path / "layer_00-model_00-model_states.pt"
    os.mkfifo(fifo)  # opening it for reading without O_NONBLOCK would wait for a writer forever
    (tmp_path / "real").write_bytes(b"x" * 10)
    readahead.read_ahead_files([fifo, tmp_path / "missing", tmp_path / "real"], budget=100)
    assert advised == [("real", 0, 10)]
