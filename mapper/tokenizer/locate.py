"""Where a tokenizer file named in a NeoX config is on this machine.

A NeoX config names its tokenizer files as the training run saw them: an absolute path on the
training cluster, a path relative to the directory NeoX was started from (``data/...``), or a
bare file name. The checkpoint usually travels without that tree, so a file is looked for as
written, then beside the checkpoint and under its ``configs/`` folders, by its relative path
and by its base name. Nothing here reads a file; it only says which one exists.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from mapper.keyorder import natural_key


def search_dirs(checkpoint_dir: Path, config_files: Iterable[Path] = ()) -> list[Path]:
    """The folders a tokenizer file may sit in, nearest first, each once.

    ``checkpoint_dir`` may be the save folder (holding ``latest`` and ``global_stepN/``) or a tag
    folder; both the folder and its parent are searched, with their ``configs/`` and the tag
    folders' ``configs/``, then the folders of the config files actually used.
    """
    root = Path(checkpoint_dir)
    found: list[Path] = []
    for base in (root, root.parent):
        found += [base, base / "configs"]
    if root.is_dir():
        steps = (p for p in root.iterdir() if p.is_dir() and p.name.startswith("global_step"))
        for step in sorted(steps, key=lambda p: natural_key(p.name)):
            found += [step, step / "configs"]
    found += [Path(f).parent for f in config_files]
    unique: list[Path] = []
    for folder in found:
        if folder.is_dir() and folder.resolve() not in {u.resolve() for u in unique}:
            unique.append(folder)
    return unique


def locate(named: str | Path, folders: Sequence[Path]) -> Path | None:
    """The existing file a config's ``named`` path means, or None.

    Tried in order: the path as written (absolute, or relative to the current directory), then in
    each folder the relative path and the base name.
    """
    path = Path(named).expanduser()
    candidates = [path]
    for folder in folders:
        candidates += ([] if path.is_absolute() else [folder / path]) + [folder / path.name]
    return next((c.absolute() for c in candidates if c.is_file()), None)


def looked_in(named: str | Path, folders: Sequence[Path]) -> str:
    """Where :func:`locate` looked, for an error message."""
    places = ", ".join(str(f) for f in folders[:4]) + (" ..." if len(folders) > 4 else "")
    return f"{named} (as written, and as {Path(named).name} in {places or 'no folder'})"
