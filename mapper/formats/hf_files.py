"""The weight files of a HuggingFace model folder: what ``save_pretrained`` writes and
``from_pretrained`` looks for, in one place for the HF reader and writer.

Looked for in this order, like ``from_pretrained``: ``model.safetensors.index.json``,
``model.safetensors``, ``pytorch_model.bin.index.json``, ``pytorch_model.bin``. A sharded save is
``model-00001-of-0000N.safetensors`` ... with the index (``metadata.total_size``, ``weight_map``:
key -> shard file); an index naming files outside the folder (``../x``, absolute paths) is refused.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Literal

from mapper.errors import CheckpointError
from mapper.input_files import check_regular, read_json

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
LOOKED_FOR = f"{SAFETENSORS_INDEX}, {SAFETENSORS_SINGLE}, {BIN_INDEX} or {BIN_SINGLE}"


@dataclass(frozen=True)
class WeightFiles:
    """How a folder stores its weights: the format, and its index or its single file."""

    format: Literal["safetensors", "bin"]
    index: Path | None  # the index naming the shards, or None for one file
    single: Path | None  # that one file


def present(path: Path) -> bool:
    """Something by this name that is not a folder (a FIFO too: it is refused when read, by name,
    rather than silently passed over)."""
    return path.exists() and not path.is_dir()


def weight_files(folder: Path) -> WeightFiles | None:
    """The first of :data:`LOOKED_FOR` that ``folder`` has, or None."""
    for name, fmt, indexed in (
        (SAFETENSORS_INDEX, "safetensors", True), (SAFETENSORS_SINGLE, "safetensors", False),
        (BIN_INDEX, "bin", True), (BIN_SINGLE, "bin", False),
    ):
        if present(folder / name):
            return WeightFiles(fmt, folder / name, None) if indexed else WeightFiles(fmt, None, folder / name)  # type: ignore[arg-type]
    return None


def is_hf_folder(folder: Path) -> bool:
    return weight_files(folder) is not None


def shard_names(count: int) -> list[str]:
    """The names ``save_pretrained`` gives ``count`` safetensors shards."""
    if count == 1:
        return [SAFETENSORS_SINGLE]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def index_document(shards: Iterable[tuple[str, Sequence[str]]], total_size: int) -> dict[str, Any]:
    """The index of shards given as (file name, keys), as ``save_pretrained`` writes it."""
    return {"metadata": {"total_size": total_size}, "weight_map": {key: name for name, keys in shards for key in keys}}


def read_index(index: Path) -> dict[str, Path]:
    """key -> shard file from an index, after checking every name stays inside its folder and
    every shard is a regular file."""
    raw = read_json(index, what=index.name)
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError("no 'weight_map' object in the index", where=index, hint="is this a HF index file?")
    files = {str(key): _inside(index.parent, name, index) for key, name in weight_map.items()}
    for path in sorted(set(files.values())):
        if path.exists():
            check_regular(path, what="this shard")
        else:
            raise CheckpointError(f"the index names {path.name}, which does not exist", where=index,
                                  hint="copy the missing shard")
    return files


def _inside(folder: Path, name: Any, index: Path) -> Path:
    """``folder / name`` for a relative name that stays inside ``folder``; refuse the rest."""
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"file name {name!r} is not a string", where=index, hint="fix the index")
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or ".." in posix.parts or ".." in windows.parts:
        raise CheckpointError(
            f"the index names the file {name!r}, outside the model folder; refusing to read it",
            where=index,
            hint="index file names must be plain names of files in the same folder",
        )
    return folder / name
