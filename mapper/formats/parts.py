"""The multi-machine part protocol: N runs write one output through a shared staging folder.

Parts are numbered 1..N like ``mapper.engine.execute(part=(I, N))``, which converts only part
I's groups; the writer gets the same ``parts=(I, N)``. The writer still plans all F files (the
engine checks they cover the target), and part I owns the contiguous block of file indices
``F*(I-1)//N`` up to ``F*I//N`` (exclusive) (:func:`mapper.engine.execute.part_groups`, which the
engine uses too). Every part writes into one staging folder shared through the filesystem,
``.OUT.mapper-parts`` beside ``OUT`` (:func:`mapper.formats.output.parts_staging_path`).

A part records the plan it used in ``.mapper/plan.json`` (:meth:`Part.start`: a part planned
differently, from another input, rule set or options, is refused) and, once its files are on
disk, a marker ``.mapper/part-IIIII-of-NNNNN.json`` with their sizes (:meth:`Part.finish`); it
renames nothing. A failed part removes its own files and marker (:meth:`Part.abort`): run it
again. When all parts are done, one separate call, :func:`finalize` (``HFWriter.finalize_parts(OUT)``
or ``NeoXWriter.finalize_parts(OUT)``), checks that all N markers exist, agree on the plan and
that every planned file has its recorded size, has the writer write the files that need the whole
plan (HF index and ``config.json``; NeoX ``mp_rank`` files, ``latest``, ``configs/``) and renames
the staging folder to ``OUT``. With Slurm, run the parts as a job array (``sbatch --array=1-N``),
part ``(int($SLURM_ARRAY_TASK_ID), N)`` on each task, and the finalize step as a job that depends
on the array (``sbatch --dependency=afterok:<array job id>``). To start over, delete
``.OUT.mapper-parts``.

The protocol knows a writer's plan only as a list of files that have a ``name`` and a JSON form
(:class:`Planned`); the writer gives :func:`finalize` the way back from JSON and its own extras.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

from mapper.engine.execute import part_groups
from mapper.errors import ConversionError, MapperError
from mapper.formats.output import StagingFolder, check_output_path, parts_staging_path, write_json
from mapper.input_files import read_json as read_checked

META_DIR = ".mapper"
PLAN_NAME = "plan.json"


class Planned(Protocol):
    """One planned output file, as the protocol sees it."""

    @property
    def name(self) -> str: ...

    def to_json(self) -> dict[str, Any]: ...


File = TypeVar("File", bound=Planned)


def marker_name(index: int, total: int) -> str:
    return f"part-{index:05d}-of-{total:05d}.json"


def plan_digest(document: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()


def read_json(path: Path) -> Any:
    """A JSON file of the shared staging folder (``plan.json``, a part's marker): another machine
    may have left it damaged, which is an error naming it, not a crash."""
    return read_checked(path, what=f"{path.name} of the parts' staging folder", error=ConversionError)


class Part:
    """Part ``I`` of ``N`` of a ``kind`` (``"hf"``, ``"neox"``) writer, in the shared ``staging`` folder."""

    def __init__(self, staging: Path, part: tuple[int, int], kind: str):
        self.staging = staging
        self.index, self.total = part
        self.kind = kind
        self._digest = ""

    @property
    def marker(self) -> Path:
        return self.staging / META_DIR / marker_name(self.index, self.total)

    def start(self, plan: Sequence[Planned], options: Mapping[str, Any]) -> None:
        """Record ``plan`` (all parts' files) and the writer's ``options``, or check that the
        plan already recorded by another part is this one; forget this part's earlier marker."""
        document = {"kind": self.kind, "parts": self.total, "files": [p.to_json() for p in plan], "options": dict(options)}
        digest = plan_digest(document)
        meta = self.staging / META_DIR
        meta.mkdir(exist_ok=True)
        self.marker.unlink(missing_ok=True)
        plan_path = meta / PLAN_NAME
        if plan_path.exists():
            recorded = read_json(plan_path)
            if (recorded.get("sha256") if isinstance(recorded, dict) else None) != digest:
                raise ConversionError(
                    f"the shared staging folder {self.staging} holds parts of a different plan "
                    "(other input, rules or options)",
                    where=plan_path,
                    hint=f"run every part with the same input and options, or delete {self.staging} to start over",
                )
        else:
            write_json(plan_path, {"sha256": digest, **document})
        self._digest = digest

    def finish(self, mine: Iterable[Planned]) -> None:
        """Mark this part done: its files (``mine``, all on disk) and their sizes."""
        files = {p.name: (self.staging / p.name).stat().st_size for p in mine}
        write_json(self.marker, {"sha256": self._digest, "part": self.index, "parts": self.total, "files": files})

    def abort(self, written: Iterable[Path]) -> None:
        """Remove what this part wrote (``written``) and its marker; other parts' files stay."""
        for path in written:
            path.unlink(missing_ok=True)
        self.marker.unlink(missing_ok=True)


def recorded_kind(out: Path) -> str:
    """``"hf"`` or ``"neox"``: which writer the parts of ``out`` were written with (``"hf"``
    when no part has recorded its plan yet)."""
    plan_path = parts_staging_path(out) / META_DIR / PLAN_NAME
    if not plan_path.exists():
        return "hf"
    document = read_json(plan_path)
    kind = document.get("kind") if isinstance(document, dict) else None
    if kind not in ("hf", "neox"):
        raise _corrupt_plan(plan_path, f"its kind is {kind!r}, not 'hf' or 'neox'")
    return str(kind)


def finalize(
    out_dir: str | Path,
    *,
    kind: str,
    decode: Callable[[Mapping[str, Any]], File],
    write_extras: Callable[[Path, Sequence[File], Mapping[str, Any]], None],
    force: bool = False,
) -> Path:
    """Check that every part of a multi-machine run is complete, have the writer add the files
    that need the whole plan (``write_extras(folder, plan, options)``), then publish ``out_dir``.
    ``decode`` reads one planned file back from its JSON form."""
    out = check_output_path(out_dir, force=force)
    staging = StagingFolder(out, force=force, shared=True)
    meta = staging.path / META_DIR
    plan_path = meta / PLAN_NAME
    if not plan_path.is_file():
        raise ConversionError(
            f"no parts were written for {out}: {plan_path} is missing",
            where=parts_staging_path(out),
            hint="run every part first (`mapper convert SRC OUT --part I/N`, or parts=(I, N)) into the same output folder",
        )
    document = read_json(plan_path)
    if not isinstance(document, dict):
        raise _corrupt_plan(plan_path, f"it holds a JSON {type(document).__name__}, not an object")
    digest = document.pop("sha256", None)
    if document.get("kind") != kind or plan_digest(document) != digest:
        raise ConversionError(
            f"{plan_path} is not a {kind} plan or was modified",
            where=plan_path,
            hint=f"finalize with the writer that wrote the parts, or delete {staging.path}",
        )
    try:
        total = int(document["parts"])
        plan = [decode(raw) for raw in document["files"]]
        options = dict(document["options"])
    except (KeyError, TypeError, ValueError, AttributeError, MapperError) as exc:
        raise _corrupt_plan(plan_path, f"{type(exc).__name__}: {exc}") from None
    markers = {i: meta / marker_name(i, total) for i in range(1, total + 1)}
    missing = [i for i, m in markers.items() if not m.is_file()]
    if missing:
        raise ConversionError(
            f"{len(missing)} of {total} parts are not finished: parts {missing[:20]}",
            where=staging.path,
            hint="run the missing parts again with the same options, then finalize",
        )
    for i, marker in markers.items():
        _check_marker(staging.path, marker, i, digest, [plan[index].name for index in part_groups(len(plan), (i, total))])
    write_extras(staging.path, plan, options)
    shutil.rmtree(meta)
    for leftover in staging.path.rglob(".*.tmp-*"):
        leftover.unlink(missing_ok=True)
    return staging.commit()


def _check_marker(folder: Path, marker: Path, part: int, digest: object, names: Sequence[str]) -> None:
    """Part ``part``'s marker agrees with the plan, and each of its files has the recorded size."""
    recorded = read_json(marker)
    if not isinstance(recorded, dict) or not isinstance(recorded.get("files"), dict):
        raise ConversionError(f"the marker of part {part} is damaged", where=marker, hint=f"rerun part {part}")
    if recorded.get("sha256") != digest:
        raise ConversionError(
            f"part {part} was written from a different plan",
            where=marker,
            hint=f"rerun part {part} with the same input and options",
        )
    for name in names:
        path = folder / name
        size = recorded["files"].get(name)
        if size is None or not path.is_file() or path.stat().st_size != size:
            raise ConversionError(
                f"{name} of part {part} is missing or has the wrong size", where=path, hint=f"rerun part {part}"
            )


def _corrupt_plan(plan_path: Path, problem: str) -> ConversionError:
    return ConversionError(
        f"the parts' plan is damaged: {problem}", where=plan_path,
        hint=f"delete {plan_path.parent.parent} and run every part again",
    )
