"""Atomic output: every file, and the output folder itself, appears complete or not at all.

- A file is written under a temporary name beside its final name (:class:`AtomicFile`), fsynced
  and renamed into place; on any error the temporary file is removed.
- The output folder ``OUT`` is built in a hidden sibling staging folder
  ``.OUT.mapper-staging-<host>-<pid>`` (:class:`StagingFolder`) and renamed to ``OUT`` only when
  everything is written, so a reader of ``OUT`` never sees half an output. On an error, a
  KeyboardInterrupt, garbage collection of the writer or interpreter exit, the staging folder is
  removed; if the process was killed outright, the next run removes staging folders of dead
  processes on the same host (:func:`clean_stale_staging`).
- ``OUT`` may not be, lie inside, or contain an input folder (:func:`check_output_path`), and an
  existing ``OUT`` is replaced only with ``force=True`` and only after the new one is complete.
  ``OUT`` itself is never followed as a symbolic link: a link is refused, not its target replaced
  (folders above ``OUT`` may be links).
- Publishing (:meth:`StagingFolder.commit`) moves an existing ``OUT`` aside, renames the staging
  folder to ``OUT`` and only then deletes the old copy; the renames run under an exclusive lock on
  the parent folder (``flock``), so two runs publishing the same ``OUT`` at once take turns (with
  ``force`` the later one replaces the earlier; without, it is refused), and with SIGINT/SIGTERM
  deferred (:func:`mapper.interrupts.critical`), so an interrupt never falls between them.
- SIGINT and SIGTERM remove the staging folder on the way out (:mod:`mapper.interrupts`). What a
  killed run of this host leaves (``.OUT.mapper-staging-*``, ``.OUT.mapper-trash-*``; a
  ``.OUT.mapper-old-*`` copy goes back to ``OUT`` if ``OUT`` is missing) is swept by the next run
  writing ``OUT``. Only that output's: machines sharing a filesystem may share a host name, and a
  "dead" pid there may be another machine's live run.
- Bad output paths are refused before anything is written, as :class:`~mapper.errors.ConversionError`
  (exit code 2): a parent that is a file, a name too long for the filesystem once the staging
  suffix is added, a folder that cannot be created (read-only filesystem, permissions).
- A full disk is a :class:`~mapper.errors.ConversionError` saying how many bytes were needed.

Multi-machine parts share one staging folder, ``.OUT.mapper-parts`` (no host or pid in the name,
so every machine of a job array finds it); see :mod:`mapper.formats.parts`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
import socket
import threading
import weakref
from collections.abc import Iterable, Iterator
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any

from mapper.errors import ConversionError
from mapper.interrupts import critical, note_published

HOST = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname()) or "host"
CHUNK = 1 << 30  # Linux writes at most ~2 GiB per write(2); stay well below.
_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


class Cancelled(Exception):
    """A write stopped on purpose (another thread failed or the run was interrupted)."""


def staging_path(out: Path) -> Path:
    """A private staging folder for ``out`` (host and pid let a later run spot dead ones)."""
    return out.parent / f".{out.name}.mapper-staging-{HOST}-{os.getpid()}-{secrets.token_hex(4)}"


def parts_staging_path(out: Path) -> Path:
    """The staging folder all parts of a multi-machine run share."""
    return out.parent / f".{out.name}.mapper-parts"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_staging(out: Path) -> list[Path]:
    """Remove what dead processes of this host left for ``out``.

    A ``.OUT.mapper-old-*`` folder of a dead process is the previous ``OUT`` moved aside by a
    ``force`` replacement that was killed between its two renames: it is moved back if ``OUT`` is
    missing (else removed). Staging and trash folders are removed. Returns what was touched.
    """
    pattern = re.compile(
        rf"^\.{re.escape(out.name)}\.mapper-(?P<what>staging|old|trash)-{re.escape(HOST)}-(?P<pid>\d+)"
        r"(-[0-9a-f]+)?$"
    )
    touched: list[Path] = []
    try:
        entries = list(out.parent.iterdir()) if out.parent.is_dir() else []
    except OSError:
        return touched
    for entry in entries:
        match = pattern.match(entry.name)
        if not match or int(match["pid"]) == os.getpid() or pid_alive(int(match["pid"])):
            continue
        if entry.is_symlink() or not entry.is_dir():
            continue  # not something mapper made
        try:
            if match["what"] == "old" and not (out.exists() or out.is_symlink()):
                os.rename(entry, out)
            else:
                shutil.rmtree(entry, ignore_errors=True)
        except OSError:
            continue
        touched.append(entry)
    return touched


def _resolved(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


def output_folder(out: str | Path) -> Path:
    """The absolute path of ``out`` with its parent folders resolved but not ``out`` itself:
    an output that is a symbolic link stays one (and is refused), never its target replaced."""
    absolute = Path(os.path.abspath(Path(out).expanduser()))
    if not absolute.name:
        raise ConversionError(f"{absolute} cannot be an output folder", where=absolute,
                              hint="name a new folder, e.g. ./hf-model")
    try:
        return absolute.parent.resolve() / absolute.name
    except (OSError, RuntimeError) as exc:  # a link loop above the output
        raise ConversionError(f"cannot resolve the folders above the output ({exc})", where=absolute,
                              hint="check the output path") from None


# the longest name mapper gives a sibling of OUT (a pid has at most 10 digits)
_SIBLING_SUFFIX = f".mapper-staging-{HOST}-{'9' * 10}-{'f' * 8}"


def _check_parent_and_name(target: Path) -> None:
    """Refuse an output whose parent is a file, or whose name is too long with mapper's suffixes."""
    ancestor = target.parent
    while not (ancestor.exists() or ancestor.is_symlink()) and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConversionError(
            f"the output folder cannot be created: {ancestor} is a file, not a folder",
            where=target, hint="choose an output path whose parent folders are folders",
        )
    try:
        name_max = os.pathconf(ancestor, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        name_max = 255
    longest = len(os.fsencode(f".{target.name}{_SIBLING_SUFFIX}"))
    if longest > name_max:
        room = name_max - (longest - len(os.fsencode(target.name)))
        raise ConversionError(
            f"the output folder's name has {len(os.fsencode(target.name))} bytes: too long for the hidden staging "
            f"folder beside it ('.NAME{_SIBLING_SUFFIX}'), whose name may have at most {name_max} bytes here",
            where=target, hint=f"choose an output folder name of at most {room} bytes",
        )


def check_output_path(out: str | Path, *, inputs: Iterable[str | Path] = (), force: bool = False) -> Path:
    """The absolute output folder (see :func:`output_folder`), after refusing the outputs that
    would lose data or cannot be written."""
    target = output_folder(out)
    try:
        _check_output(target, inputs, force)
    except OSError as exc:  # e.g. a parent folder mapper may not look into
        raise ConversionError(
            f"cannot inspect the output path ({exc.strerror or exc})", where=target,
            hint="check the permissions of the folders above the output, or write elsewhere",
        ) from None
    return target


def _check_output(target: Path, inputs: Iterable[str | Path], force: bool) -> None:
    for given in inputs:
        source = _resolved(given)
        if target == source or source in target.parents:
            raise ConversionError(
                f"the output folder {target} is {'the' if target == source else 'inside the'} "
                f"input folder {source}",
                where=target,
                hint="write the output next to the input, not into it",
            )
        if target in source.parents:
            raise ConversionError(
                f"the output folder {target} contains the input folder {source}; replacing it "
                "would delete the input",
                where=target,
                hint="choose an output folder outside the input's parents",
            )
    if target.exists() or target.is_symlink():
        if not target.is_dir() or target.is_symlink():
            kind = "a symbolic link" if target.is_symlink() else "not a folder"
            raise ConversionError(
                f"{target} exists and is {kind}; mapper only replaces folders (never what a link points to)",
                where=target,
                hint="remove it or choose another output path",
            )
        if not force:
            raise ConversionError(
                f"the output folder {target} already exists",
                where=target,
                hint="choose another output folder, or pass force=True (--force) to replace it "
                "once the new output is complete",
            )
    _check_parent_and_name(target)


def free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


_STAGING_NAME = re.compile(r"^\.(?P<out>.+)\.mapper-(staging-.+|parts)$")


def visible_path(path: Path) -> tuple[Path, str]:
    """(output folder, path inside it) for a file being staged: what the user named, since the
    staging folder is hidden and gone once the run is over. Other paths: (parent, name)."""
    for folder in path.parents:
        match = _STAGING_NAME.match(folder.name)
        if match:
            return folder.parent / match["out"], str(path.relative_to(folder))
    return path.parent, path.name


def disk_full_error(path: Path, *, written: int, needed: int | None, total: int | None) -> ConversionError:
    free = free_bytes(path.parent)
    out, name = visible_path(path)
    parts = [f"the disk is full: writing {name} stopped after {written} bytes"]
    if needed is not None:
        parts.append(f"this file needs {needed} bytes")
    if total is not None:
        parts.append(f"the output's tensors need {total} bytes in all")
    if free is not None:
        parts.append(f"{free} bytes are free there now")
    return ConversionError(
        "; ".join(parts) + ". Nothing was left behind.",
        where=out,
        hint="free disk space or write the output to another filesystem",
    )


def check_free_space(folder: Path, needed: int, *, output: Path | None = None) -> None:
    """Fail before writing anything when the output clearly cannot fit. ``output`` is the folder
    the user named (``folder`` may be its hidden staging folder, gone once the run is over)."""
    free = free_bytes(folder)
    if free is not None and free < needed:
        named = output or visible_path(folder / "_")[0]
        raise ConversionError(
            f"the output {named} needs {needed} bytes but only {free} bytes are free on its filesystem",
            where=named,
            hint="free disk space or write the output to another filesystem",
        )


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_error(
    path: Path, exc: OSError, *, written: int, needed: int | None = None, total: int | None = None
) -> ConversionError:
    """The error for a failed write (or fsync) of ``path``: a full disk says how many bytes."""
    if exc.errno in _DISK_FULL:
        return disk_full_error(path, written=written, needed=needed, total=total)
    out, name = visible_path(path)
    return ConversionError(
        f"cannot write {name}: {exc}",
        where=out,
        hint="check the output filesystem (space, permissions, quota, mount)",
    )


class AtomicFile:
    """A binary file written under a temporary name and renamed into place by :meth:`commit`.

    The file is fsynced before the rename unless ``sync=False``: inside a staging folder, which
    only becomes visible once every file in it is durable, a :class:`Flusher` does it instead.

    ``write`` takes any bytes-like object and hands it to ``write(2)`` without copying it
    (``torch.save`` can write into this object too). ``needed``/``total`` only feed the message
    of a disk-full error.
    """

    def __init__(
        self, path: Path, *, needed: int | None = None, total: int | None = None, sync: bool = True
    ):
        self.path = path
        self.sync = sync  # False: the caller makes the file durable later (see Flusher)
        self.tmp = path.with_name(f".{path.name}.tmp-{HOST}-{os.getpid()}-{secrets.token_hex(4)}")
        self.needed = needed
        self.total = total
        self.written = 0
        self.failure: BaseException | None = None
        self._fd: int | None = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)

    def write(self, data: Any) -> int:
        if self._fd is None:
            raise ValueError(f"{self.path} is closed")
        view = memoryview(data)
        if view.ndim != 1 or view.itemsize != 1 or not view.contiguous:
            view = view.cast("B")
        total = len(view)
        offset = 0
        with self._reporting():
            while offset < total:
                count = os.write(self._fd, view[offset : offset + CHUNK])
                offset += count
                self.written += count
        return total

    def copy_range(self, path: Path, offset: int, nbytes: int) -> int:
        """Append ``nbytes`` bytes of file ``path`` from ``offset``, copied inside the kernel.

        ``copy_file_range(2)`` (what ``cp`` uses), else ``sendfile(2)``, else plain reads: the
        bytes never pass through this process when the first two work.
        """
        if self._fd is None:
            raise ValueError(f"{self.path} is closed")
        end = offset + nbytes
        with open(path, "rb", buffering=0) as source, self._reporting():
            for count in _kernel_copies(source.fileno(), self._fd, offset, nbytes):
                offset += count
                self.written += count
            source.seek(offset)
            while offset < end:  # what the kernel could not copy (another filesystem, an old kernel)
                chunk = source.read(min(CHUNK, end - offset))
                if not chunk:
                    raise OSError(errno.EIO, f"{path} ended {end - offset} bytes early")
                offset += self.write(chunk)
        return nbytes

    @contextlib.contextmanager
    def _reporting(self) -> Iterator[None]:
        """A failed write becomes a ConversionError (kept for :meth:`raise_failure`)."""
        try:
            yield
        except OSError as exc:
            self.failure = write_error(self.path, exc, written=self.written, needed=self.needed, total=self.total)
            raise self.failure from exc
        except BaseException as exc:
            self.failure = exc
            raise

    def raise_failure(self) -> None:
        """Re-raise the error of a failed :meth:`write`, which a caller such as ``torch.save``
        may have replaced by an error of its own while cleaning up."""
        if self.failure is not None:
            raise self.failure

    def flush(self) -> None:
        """Nothing is buffered (writes go straight to the file); here for ``torch.save``."""

    def commit(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            raise ValueError(f"{self.path} is closed")
        try:
            if self.sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
        try:
            os.unlink(self.tmp)
        except FileNotFoundError:
            pass

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if kind is None:
            self.commit()
        else:
            self.discard()


class Flusher:
    """Makes written files durable (``fsync``) in a background thread.

    Why: an fsync waits for the disk. Done by the writer thread after every file, it stops the
    writer while the kernel writes that file back; here the next file is written meanwhile, as
    ``cp`` goes on while the kernel writes back what it copied. :meth:`wait` returns once every
    file given to :meth:`add` is on disk, and raises the first failure (a full disk can surface
    only at fsync, with delayed allocation) as a :class:`ConversionError` naming the file. One
    thread (a :class:`~concurrent.futures.ThreadPoolExecutor` of one), started by the first file.
    """

    def __init__(self, name: str = "mapper-fsync"):
        self._name = name
        self._pool: ThreadPoolExecutor | None = None
        self._pending: list[Future[None]] = []
        self._lock = threading.Lock()  # add() may be called from several writer threads
        self._error: ConversionError | None = None

    def add(self, path: Path) -> None:
        self.raise_error()
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix=self._name)
            self._pending = [f for f in self._pending if not f.done()]
            self._pending.append(self._pool.submit(self._fsync, path))

    def raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def wait(self) -> None:
        """Block until every added file is durable; raise the first failure."""
        with self._lock:
            pending = list(self._pending)
        futures.wait(pending)
        self.raise_error()

    def close(self) -> None:
        """Let the thread end (after what is queued); does not raise."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False)

    def _fsync(self, path: Path) -> None:
        if self._error is not None:
            return
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            self._error = write_error(path, exc, written=path.stat().st_size if path.exists() else 0)


# "the kernel cannot copy these files this way": another filesystem, an old kernel, a platform
# whose sendfile only writes to sockets (macOS)
_NO_KERNEL_COPY = {
    errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EBADF, errno.EPERM,
    errno.ENOTSOCK,
}


def _kernel_copies(source: int, target: int, offset: int, nbytes: int) -> Iterator[int]:
    """Copy bytes ``offset..offset+nbytes`` of ``source`` to ``target`` (at its position) in the
    kernel, yielding each count copied; stops early where the kernel cannot (the caller copies
    the rest). Other errors (a full disk) are raised."""
    done = 0
    for copy in (_copy_file_range, _sendfile):
        try:
            while done < nbytes:
                copied = copy(source, target, offset + done, min(CHUNK, nbytes - done))
                if copied == 0:
                    break
                done += copied
                yield copied
        except OSError as exc:
            if exc.errno not in _NO_KERNEL_COPY or done:
                raise
            continue
        if done:
            return


def _copy_file_range(source: int, target: int, offset: int, count: int) -> int:
    if not hasattr(os, "copy_file_range"):
        raise OSError(errno.ENOSYS, "no copy_file_range")
    return os.copy_file_range(source, target, count, offset)


def _sendfile(source: int, target: int, offset: int, count: int) -> int:
    if not hasattr(os, "sendfile"):
        raise OSError(errno.ENOSYS, "no sendfile")
    return os.sendfile(target, source, offset, count)


@contextlib.contextmanager
def _publishing_lock(folder: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``folder`` (where it is supported): runs publishing outputs into
    the same folder take turns."""
    try:
        import fcntl

        fd = os.open(folder, os.O_RDONLY)
    except (ImportError, OSError):
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # a filesystem without locks: publish all the same
            pass
        yield
    finally:
        os.close(fd)  # releases the lock


def write_bytes_atomic(path: Path, data: bytes) -> None:
    with AtomicFile(path, needed=len(data)) as f:
        f.write(data)


def write_json(path: Path, data: Any) -> None:
    """``data`` as indented JSON with sorted keys, written atomically."""
    write_bytes_atomic(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def _remove_tree(path: Path, empty_parents: Iterable[Path] = ()) -> None:
    """Remove ``path``, then each of ``empty_parents`` (deepest first) that is empty."""
    shutil.rmtree(path, ignore_errors=True)
    for parent in empty_parents:
        try:
            parent.rmdir()
        except OSError:  # not empty (someone else wrote there), or already gone
            break


class StagingFolder:
    """A hidden sibling of ``out`` that becomes ``out`` on :meth:`commit` and vanishes otherwise.

    ``shared=True`` is the staging folder of a multi-machine run: it is not tied to this process,
    so it is neither removed on garbage collection nor by :meth:`abort` (each part removes only
    its own files; see :mod:`mapper.formats.parts`).
    """

    def __init__(self, out: Path, *, force: bool = False, shared: bool = False):
        self.out = out
        self.force = force
        self.shared = shared
        self.path = parts_staging_path(out) if shared else staging_path(out)
        self._cleanup: weakref.finalize | None = None

    def create(self) -> Path:
        created = [p for p in (self.out.parent, *self.out.parent.parents) if not p.exists()]
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            clean_stale_staging(self.out)
            if self.shared:
                self.path.mkdir(exist_ok=True)
            else:
                self.path.mkdir()
                # folders made for OUT's parent go too (if still empty): an aborted run leaves nothing
                self._cleanup = weakref.finalize(self, _remove_tree, self.path, created)
        except OSError as exc:
            if not self.shared:
                _remove_tree(self.path, created)
            raise ConversionError(
                f"cannot create the output folder here: {exc.strerror or exc}", where=self.out,
                hint="check the output filesystem (read-only mount, permissions, quota) or write elsewhere",
            ) from None
        return self.path

    def commit(self) -> Path:
        """Rename the staging folder to ``out``; an existing ``out`` is replaced only now (see the
        module docstring: under a lock on the parent folder, with interrupts deferred)."""
        check_output_path(self.out, force=self.force)
        fsync_dir(self.path)
        trash = None
        try:
            with critical(), _publishing_lock(self.out.parent):
                check_output_path(self.out, force=self.force)  # another run may have published meanwhile
                old = self._swap_in()
                if self._cleanup is not None:
                    self._cleanup.detach()
                note_published(self.out)
                if old is not None:  # renamed first, so a half-deleted copy is never taken for the output
                    trash = old.with_name(f".{self.out.name}.mapper-trash-{HOST}-{os.getpid()}-{secrets.token_hex(4)}")
                    try:
                        os.rename(old, trash)
                    except OSError:
                        trash = old
            fsync_dir(self.out.parent)
        finally:  # an interrupt deferred by critical() is raised above: the old copy goes all the same
            if trash is not None:
                shutil.rmtree(trash, ignore_errors=True)
        return self.out

    def _swap_in(self) -> Path | None:
        """Move an existing ``out`` aside and the staging folder to ``out``; the old copy's path."""
        old = None
        try:
            if self.out.exists():
                old = self.out.parent / f".{self.out.name}.mapper-old-{HOST}-{os.getpid()}-{secrets.token_hex(4)}"
                os.rename(self.out, old)
            try:
                os.rename(self.path, self.out)
            except OSError:
                if old is not None:
                    os.rename(old, self.out)
                    old = None
                raise
        except OSError as exc:
            raise ConversionError(
                f"cannot publish the output: {exc.strerror or exc}"
                + (f"; the previous output was kept as {old}" if old is not None else ""),
                where=self.out, hint="check the output folder's filesystem and permissions, then run again",
            ) from None
        return old

    def abort(self) -> None:
        if self.shared:
            return
        if self._cleanup is not None:
            self._cleanup()
        else:
            _remove_tree(self.path)
