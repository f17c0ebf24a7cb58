"""The pickled files a reader has loaded, kept the one way every reader keeps them.

``torch.load(mmap=True)`` of a zip file (``torch.save``'s format since torch 1.6) reads its pickle
and maps its bytes: keeping the loaded dict costs no memory until a tensor is touched, and a
later ``get`` neither unpickles again nor reads more than the tensor asked for. A legacy non-zip
file cannot be mapped: it is read whole, so only the most recently used one is kept, and memory
stays bounded by the largest file. A reader releases a file once it has handed out what it needs
(its map closes when the last tensor viewing it goes) and clears everything on ``close()``.

Where a mapped file lies in memory (:class:`~mapper.formats.file_ranges.Placement`) is worked
out once per loaded file, when a tensor of it is first handed out: the tensors handed out are
registered as byte ranges of the file (:mod:`mapper.formats.file_ranges`), so writers copy them
file to file. The NeoX reader, the HF reader's ``.bin`` files and the ZeRO reader's optimizer
files all use one :class:`MappedFiles` each.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Generic, TypeVar

import torch

from mapper.formats import safe_pickle
from mapper.formats.file_ranges import Placement, place

Loaded = TypeVar("Loaded")


class MappedFiles(Generic[Loaded]):
    """One reader's loaded files, by path (see the module docstring). ``lock`` guards loading;
    it is re-entrant, so a reader may hold it around its own bookkeeping."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._mapped: dict[Path, Loaded] = {}
        self._legacy: tuple[Path, Loaded] | None = None
        self._placements: dict[Path, Placement | None] = {}
        self._copies: set[Path] = set()  # mapped files whose contents were replaced by copies

    def get(self, file: Path) -> Loaded | None:
        """What is kept of ``file``, or None."""
        with self.lock:
            if file in self._mapped:
                return self._mapped[file]
            if self._legacy is not None and self._legacy[0] == file:
                return self._legacy[1]
            return None

    def load(self, file: Path, read: Callable[[Path], Loaded]) -> Loaded:
        """What is kept of ``file``, else ``read(file)``, kept (see :meth:`keep`)."""
        with self.lock:
            found = self.get(file)
            if found is None:
                found = read(file)
                self.keep(file, found)
            return found

    def keep(self, file: Path, loaded: Loaded) -> None:
        """Keep ``loaded`` as ``file``'s contents: until released if the file is mapped, else
        until another legacy file is kept."""
        with self.lock:
            self._placements.pop(file, None)  # a new map: where it lies is worked out again
            self._copies.discard(file)
            if safe_pickle.is_zip_file(file):
                self._mapped[file] = loaded
            else:
                self._legacy = (file, loaded)

    def is_mapped(self, file: Path) -> bool:
        """True when the kept contents of ``file`` are views of its memory map."""
        with self.lock:
            return file in self._mapped and file not in self._copies

    def is_copied(self, file: Path) -> bool:
        """True when the kept contents of ``file`` are copies given to :meth:`replace`."""
        with self.lock:
            return file in self._copies

    def replace(self, file: Path, copies: Loaded) -> None:
        """Keep ``copies`` (say, of what is still to be handed out) instead of the mapped
        contents of ``file``, so its map can close."""
        with self.lock:
            self._mapped[file] = copies
            self._copies.add(file)
            self._placements[file] = None

    def placement(self, file: Path, tensors: Iterable[torch.Tensor]) -> Placement | None:
        """Where the mapped ``file`` lies in memory, from ``tensors`` loaded out of it (worked out
        once per load, not while a manifest is built: a dry run never copies)."""
        with self.lock:
            if file not in self._placements:
                self._placements[file] = place(file, tensors) if self.is_mapped(file) else None
            return self._placements[file]

    def release(self, file: Path) -> None:
        """Let go of ``file`` (its map closes once no tensor handed out views it)."""
        with self.lock:
            self._mapped.pop(file, None)
            self._placements.pop(file, None)
            self._copies.discard(file)
            if self._legacy is not None and self._legacy[0] == file:
                self._legacy = None

    def clear(self) -> None:
        with self.lock:
            self._mapped.clear()
            self._placements.clear()
            self._copies.clear()
            self._legacy = None
