"""Opening files of an input folder: regular files only, and no more bytes than such a file holds.

Nothing in an input folder is trusted (docs/threat-model.md). A FIFO named like a layer file
makes ``open(2)`` wait for a writer forever; ``/dev/zero`` linked as ``config.json`` never ends;
a ``latest`` of 10 GB would be read whole. So every file mapper reads from an input is checked to
be a regular file (after following links) before it is read, and the small text files (JSON and
YAML configs, ``latest``, indexes) are read only up to a size limit. :func:`read_bytes` opens
without blocking and checks the open file itself, so a file swapped for a FIFO between the check
and the read cannot hang it either.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from mapper.errors import CheckpointError, MapperError

MAX_TEXT_BYTES = 64 * 2**20  # a config.json, index or YAML config (a few kB to a few MB)

_KINDS = {
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFDIR: "a folder",
}


def kind_of(mode: int) -> str:
    """What a non-regular file is, in words."""
    return _KINDS.get(stat.S_IFMT(mode), "not a regular file")


def not_regular(path: Path, mode: int, *, what: str, error: type[MapperError] = CheckpointError) -> MapperError:
    return error(
        f"{what} is {kind_of(mode)}, not a regular file; mapper reads only regular files",
        where=path,
        hint="replace it with the real file (a symbolic link to a regular file is fine)",
    )


def check_regular(path: Path, *, what: str = "this", error: type[MapperError] = CheckpointError) -> os.stat_result:
    """``path``'s stat (links followed), after refusing anything but a regular file."""
    try:
        found = path.stat()
    except OSError as exc:
        raise error(
            f"cannot read {what} ({exc.strerror or exc})", where=path, hint="check that it exists and is readable"
        ) from None
    if not stat.S_ISREG(found.st_mode):
        raise not_regular(path, found.st_mode, what=what, error=error)
    return found


def check_folder(path: Path, *, what: str = "a checkpoint", hint: str = "pass the folder holding the model files") -> Path:
    """``path``, after refusing a path that does not exist or is not a folder (``what`` is)."""
    if not path.exists():
        raise CheckpointError("no such file or folder", where=path, hint="check the path")
    if not path.is_dir():
        raise CheckpointError(f"{what} is a folder, not a file", where=path, hint=hint)
    return path


def read_bytes(
    path: Path, *, limit: int = MAX_TEXT_BYTES, what: str = "this file", error: type[MapperError] = CheckpointError,
    hint: str = "check that it exists and is readable",
) -> bytes:
    """All bytes of the regular file ``path``; refused when it has more than ``limit``. ``hint``
    is for a file that cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise error(f"cannot read {what} ({exc.strerror or exc})", where=path, hint=hint) from None
    with os.fdopen(fd, "rb") as f:
        found = os.fstat(f.fileno())
        if not stat.S_ISREG(found.st_mode):
            raise not_regular(path, found.st_mode, what=what, error=error)
        if found.st_size > limit:
            raise _too_big(path, found.st_size, limit, what, error)
        data = f.read(limit + 1)
    if len(data) > limit:  # grew while being read
        raise _too_big(path, len(data), limit, what, error)
    return data


def read_text(
    path: Path, *, limit: int = MAX_TEXT_BYTES, what: str = "this file", error: type[MapperError] = CheckpointError,
    hint: str = "check that it exists and is readable",
) -> str:
    """The UTF-8 text of the regular file ``path`` (see :func:`read_bytes`)."""
    data = read_bytes(path, limit=limit, what=what, error=error, hint=hint)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(
            f"{what} is not UTF-8 text ({exc.reason} at byte {exc.start})", where=path,
            hint="is this the right file? copy it again if it was damaged",
        ) from None


def read_json(
    path: Path, *, limit: int = MAX_TEXT_BYTES, what: str = "this JSON file", error: type[MapperError] = CheckpointError
) -> Any:
    """The JSON value in ``path`` (regular file, at most ``limit`` bytes, nesting within what
    Python's parser handles: deeper is refused, not a crash)."""
    text = read_text(path, limit=limit, what=what, error=error)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(
            f"cannot read this JSON file ({what}): {exc.msg} at line {exc.lineno}, column {exc.colno}",
            where=path, hint="fix the JSON at that place, or copy the file again",
        ) from None
    except RecursionError:
        raise error(
            f"cannot read this JSON file ({what}): it nests its values too deeply", where=path,
            hint="is this the right file? model configs and indexes nest a few levels",
        ) from None


def _too_big(path: Path, size: int, limit: int, what: str, error: type[MapperError]) -> MapperError:
    return error(
        f"{what} has {size} bytes; mapper reads at most {limit} bytes from such a file",
        where=path, hint="is this the right file? it is expected to be a small text file",
    )
