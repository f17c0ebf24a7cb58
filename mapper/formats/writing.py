"""What the HF and NeoX writers share: plan, validate, write in the background, stage, split.

A writer is a :class:`~mapper.tensors.Sink`. ``groups(manifest)`` plans the output files (one
group of target keys per file); the engine then calls ``write_group(i, tensors)`` once per group
and ``finalize()`` at the end (or uses the writer as a context manager: leaving the ``with``
block normally finalizes, leaving it by an exception, KeyboardInterrupt included, aborts).

Overlap. ``write_group`` checks the tensors (keys, shapes, dtypes) at once and hands the file to
one of ``workers`` background threads (:data:`WRITER_THREADS` by default); when all are busy it
waits for one, so at most ``workers + 1`` groups are alive: the files being written and the one
the engine is building. Two threads, because one thread both waits for the disk and copies
through memory; with two, one file's copy overlaps the other's waiting (measured: a 3.6 GB
conversion's streaming went from 7.4-8.4 s to 4.3-5.7 s; a third thread gained nothing). The
writer keeps its own dict of each group's tensors and may drop each tensor once written (the HF
writer does), so a group being written shrinks as its file grows.
``finalize()`` waits for the threads and re-raises the first error; an error in a thread also
surfaces at the next ``write_group``.

Atomicity. Files go into a staging folder (:mod:`mapper.formats.output`) that becomes the output
folder only when complete; on any error it is removed. Each file is fsynced by a separate thread
(:class:`~mapper.formats.output.Flusher`) while the next one is written; ``finalize()`` waits for
every fsync before it commits or writes a part's marker.

Multi-machine parts. With ``parts=(I, N)`` the writer writes only part I's block of the planned
files into a staging folder all parts share, and records its plan and, at ``finalize()``, a
marker instead of publishing; ``finalize_parts(OUT)`` publishes once every part is done. The
protocol is :mod:`mapper.formats.parts`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar

import torch

from mapper.dtypes import dtype_from_name, dtype_name
from mapper.engine.execute import check_part, part_groups
from mapper.errors import ConversionError
from mapper.formats.output import Flusher, StagingFolder, check_free_space, check_output_path
from mapper.formats.parts import Part, finalize
from mapper.tensors import LazyConcat, Manifest, TensorMeta

WRITER_THREADS = 2  # files written at once (see "Overlap" above)


@dataclass(frozen=True)
class PlannedFile:
    """One output file: its path inside the output folder and the tensors it holds, in order."""

    name: str
    keys: tuple[str, ...]
    metas: tuple[TensorMeta, ...]

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for m in self.metas)

    def meta_of(self) -> dict[str, TensorMeta]:
        return dict(zip(self.keys, self.metas))

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "keys": list(self.keys),
            "shapes": [list(m.shape) for m in self.metas],
            "dtypes": [dtype_name(m.dtype) for m in self.metas],
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> PlannedFile:
        metas = tuple(
            TensorMeta(tuple(shape), dtype_from_name(dtype))
            for shape, dtype in zip(raw["shapes"], raw["dtypes"])
        )
        return cls(str(raw["name"]), tuple(raw["keys"]), metas)


class BackgroundWriter:
    """A pool of ``workers`` threads writing groups, each group in one thread, at most ``workers``
    at once (:class:`~concurrent.futures.ThreadPoolExecutor`).

    :meth:`submit` waits for a free thread before handing over the next group, so the caller
    builds group ``i+workers`` while the groups before it are written and never gets further
    ahead: at most ``workers + 1`` groups are alive. The first error of a thread stops the others
    (between tensors, :attr:`stop`) and is raised by the next :meth:`submit` or :meth:`close`.
    """

    def __init__(
        self, write: Callable[[int, Mapping[str, torch.Tensor]], None], *, name: str, workers: int = 1
    ):
        # A weak reference, so an abandoned writer can be collected (and its staging removed).
        self._write = weakref.WeakMethod(write)  # type: ignore[arg-type]
        self._name = name
        self._workers = max(1, workers)
        self._free = threading.Semaphore(self._workers)
        self._pool: ThreadPoolExecutor | None = None
        self.stop = threading.Event()
        self._error: BaseException | None = None

    def _run(self, index: int, tensors: Mapping[str, torch.Tensor]) -> None:
        write = self._write() if not self.stop.is_set() else None
        if write is not None:
            write(index, tensors)

    def _done(self, future: Future[None]) -> None:
        error = None if future.cancelled() else future.exception()
        if error is not None:
            if self._error is None:
                self._error = error
            self.stop.set()
        self._free.release()  # after the error is kept: a waiting submit() raises it

    def raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, index: int, tensors: Mapping[str, torch.Tensor]) -> None:
        self._free.acquire()
        try:
            self.raise_error()
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix=self._name)
            future = self._pool.submit(self._run, index, tensors)
        except BaseException:
            self._free.release()
            raise
        future.add_done_callback(self._done)

    def _end(self, *, wait: bool, cancel: bool) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=wait, cancel_futures=cancel)

    def close(self) -> None:
        """Wait for every submitted group; re-raise the first worker error."""
        self._end(wait=True, cancel=False)
        self.raise_error()

    def shutdown(self) -> None:
        """Let the threads end once idle, without waiting (for an abandoned writer)."""
        self.stop.set()
        self._end(wait=False, cancel=True)

    def cancel(self) -> None:
        """Stop after the tensors being written; drop what is queued."""
        self.stop.set()
        self._end(wait=True, cancel=True)


def _malloc_trim() -> Callable[[], object] | None:
    """glibc's ``malloc_trim(0)``, or None where there is no such function (macOS, musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_size_t]
    function.restype = ctypes.c_int
    return lambda: function(0)


_TRIM = _malloc_trim()


def give_back_freed_memory() -> None:
    """Return the C heap's free memory to the system (see "Overlap" above); a no-op elsewhere."""
    if _TRIM is not None:
        _TRIM()


class StagedWriter:
    """Base of the HF and NeoX writers (see the module docstring for the life cycle)."""

    kind: ClassVar[str] = ""

    def __init__(
        self,
        out_dir: str | Path,
        *,
        parts: tuple[int, int] | None = None,
        force: bool = False,
        inputs: Iterable[str | Path] = (),
        background: bool = True,
        workers: int = WRITER_THREADS,
    ):
        self.parts = check_part(parts)
        self.workers = workers
        self.force = force
        self.out = check_output_path(out_dir, inputs=inputs, force=force)
        self.background = background
        self._staging = StagingFolder(self.out, force=force, shared=self.parts is not None)
        self._part = Part(self._staging.path, self.parts, self.kind) if self.parts is not None else None
        self._plan_all: list[PlannedFile] = []
        self._mine: range = range(0)
        self._written: set[int] = set()
        self._files_done: list[Path] = []
        self._worker: BackgroundWriter | None = None
        self._flusher = Flusher(name=f"mapper-{self.kind}-fsync")
        self._state = "new"
        self._result: Path | None = None

    # -- hooks for subclasses -------------------------------------------------------------
    def _plan(self, manifest: Manifest) -> list[PlannedFile]:
        raise NotImplementedError

    def _options(self) -> dict[str, Any]:
        raise NotImplementedError

    def _write_file(
        self, folder: Path, planned: PlannedFile, tensors: Mapping[str, torch.Tensor], stop: threading.Event
    ) -> None:
        """Write one planned file. ``tensors`` is a dict this writer owns (a copy of what was
        given to :meth:`write_group`): entries may be removed once written, to free memory early.
        Write it with ``AtomicFile(..., sync=False)``: the writer fsyncs it in the background."""
        raise NotImplementedError

    @classmethod
    def _write_extras(cls, folder: Path, plan: Sequence[PlannedFile], options: Mapping[str, Any]) -> None:
        raise NotImplementedError

    # -- Sink -----------------------------------------------------------------------------
    @property
    def staging(self) -> Path:
        """Where files are written before they appear in the output folder."""
        return self._staging.path

    def groups(self, manifest: Manifest) -> list[list[str]]:
        """Plan all output files and return every file's keys (a part writes only its block)."""
        if self._state != "new":
            raise ConversionError(
                "groups() was already called on this writer", where=self.out, hint="use one writer per output"
            )
        plan = self._plan(manifest)
        self._plan_all = plan
        self._mine = part_groups(len(plan), self.parts)
        self._state = "planned"
        try:
            self._staging.create()
            check_free_space(self.staging, self._total_bytes())
            if self._part is not None:
                self._part.start(plan, self._options())
        except BaseException:
            self.abort()
            raise
        return [list(p.keys) for p in plan]

    def write_group(self, index: int, tensors: Mapping[str, torch.Tensor]) -> None:
        """Check group ``index``'s tensors against the plan, then write (or queue) its file."""
        if self._state != "planned":
            raise ConversionError(
                f"write_group({index}) on a writer that is {self._state}",
                where=self.out,
                hint="call groups(manifest) first, and write each group once before finalize()",
            )
        try:
            self._check_group(index, tensors)
            self._written.add(index)
            owned = dict(tensors)  # ours to consume (see _write_file); the caller's stays intact
            if self.background:
                if self._worker is None:
                    self._worker = BackgroundWriter(
                        self._write_one, name=f"mapper-{self.kind}-writer", workers=self.workers
                    )
                    weakref.finalize(self, self._worker.shutdown)
                self._worker.submit(index, owned)
            else:
                self._write_one(index, owned)
            del owned
        except BaseException:
            self.abort()
            raise

    def finalize(self) -> Path | None:
        """Wait for the writes; then commit the output folder (or, for a part, its marker).

        Returns the output folder, or None for a part (see :meth:`finalize_parts`).
        """
        if self._state == "done":
            return self._result
        if self._state != "planned":
            raise ConversionError(
                f"finalize() on a writer that is {self._state}", where=self.out, hint="call groups() first"
            )
        try:
            if self._worker is not None:
                self._worker.close()
            self._flusher.wait()
            self._flusher.close()
            missing = [i for i in self._mine if i not in self._written]
            if missing:
                raise ConversionError(
                    f"{len(missing)} of {len(self._mine)} groups were never written "
                    f"(first: {self._plan_all[missing[0]].name})",
                    where=self.out,
                    hint="call write_group for every group returned by groups()",
                )
            if self._part is not None:
                self._part.finish(self._plan_all[i] for i in self._mine)
                self._result = None
            else:
                self._write_extras(self.staging, self._plan_all, self._options())
                self._result = self._staging.commit()
        except BaseException:
            self.abort()
            raise
        self._state = "done"
        return self._result

    def abort(self) -> None:
        """Stop writing and remove what this writer wrote; the output folder is untouched."""
        if self._state in ("done", "aborted"):
            return
        self._state = "aborted"
        if self._worker is not None:
            self._worker.cancel()
        self._flusher.close()
        if self._part is not None:
            self._part.abort(self._files_done)
        else:
            self._staging.abort()

    def __enter__(self) -> StagedWriter:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if kind is not None:
            self.abort()
        elif self._state == "planned":
            self.finalize()

    # -- internals ------------------------------------------------------------------------
    def _check_group(self, index: int, tensors: Mapping[str, torch.Tensor]) -> None:
        if index not in self._mine:
            owner = "" if not 0 <= index < len(self._plan_all) else " (it belongs to another part)"
            raise ConversionError(
                f"group index {index} is not one this writer writes{owner}; it writes {self._mine}",
                where=self.out,
                hint="use the indices of the list groups() returned, and the same parts=(I, N) "
                "for the engine and the writer",
            )
        if index in self._written:
            raise ConversionError(
                f"group {index} was already written", where=self.out, hint="write each group once"
            )
        planned = self._plan_all[index]
        expected = planned.meta_of()
        missing = [k for k in planned.keys if k not in tensors]
        unexpected = [k for k in tensors if k not in expected]
        if missing or unexpected:
            raise ConversionError(
                f"group {index} ({planned.name}) got the wrong keys: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}",
                where=planned.name,
                hint="pass exactly the keys groups() listed for this index",
            )
        for key, meta in expected.items():
            tensor = tensors[key]
            if not isinstance(tensor, (torch.Tensor, LazyConcat)):
                raise ConversionError(
                    f"got a {type(tensor).__name__}, expected a tensor", where=key, hint="pass torch tensors"
                )
            got = TensorMeta.of(tensor)
            if got != meta:
                raise ConversionError(
                    f"got {got}, but the manifest given to groups() said {meta}",
                    where=key,
                    hint="the tensors must match the planned manifest exactly",
                )

    def _write_one(self, index: int, tensors: Mapping[str, torch.Tensor]) -> None:
        planned = self._plan_all[index]
        stop = self._worker.stop if self._worker is not None else threading.Event()
        self._write_file(self.staging, planned, tensors, stop)
        self._files_done.append(self.staging / planned.name)
        self._flusher.add(self.staging / planned.name)  # fsynced while the next file is written
        give_back_freed_memory()

    def _total_bytes(self) -> int:
        """The tensor bytes this writer (or part) writes."""
        return sum(self._plan_all[i].nbytes for i in self._mine)

    @classmethod
    def finalize_parts(cls, out_dir: str | Path, *, force: bool = False) -> Path:
        """Check that every part of a multi-machine run is complete, then commit the output
        (:func:`mapper.formats.parts.finalize`)."""
        return finalize(out_dir, kind=cls.kind, decode=PlannedFile.from_json, write_extras=cls._write_extras, force=force)
