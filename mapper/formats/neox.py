"""Reading GPT-NeoX (DeepSpeed) checkpoints: both layouts, every TP rank, one key namespace.

Accepted folders: a tag folder (``global_stepN/``) holding the model files; or its parent, with a
``latest`` file naming the tag (as DeepSpeed's ``save_checkpoint`` writes it) or exactly one
``global_step*`` folder. Layouts (see ``DeepSpeedEngine._get_ckpt_name`` and
``PipelineModule.ckpt_layer_path``):

- pipeline: ``layer_{idx:02d}-model_{rank:02d}-model_states.pt``, plain state dicts; the
  ``mp_rank_XX_model_states.pt`` beside them hold DeepSpeed's training state with
  ``module=None`` (read only to make sure they hold no weights);
- sequential: ``mp_rank_{rank:02d}_model_states.pt`` only, weights under ``"module"`` as
  ``sequential.{idx}.{key}``.

Both give the keys ``layer_{idx:02d}.{key}@rank{rank}`` (:mod:`mapper.formats.naming`).

The manifest is built from memory-mapped loads (``torch.load(mmap=True, weights_only=True)``
through :mod:`mapper.formats.safe_pickle`), which read the pickles but no tensor data; the
loaded dict of each file is kept, so ``get`` does not unpickle again and touches only the bytes
of the tensor asked for. Once ``get`` has handed out every tensor of a file, the reader lets go
of that file's dict: its memory map closes as soon as the caller drops those tensors, so the
pages read from it leave the process (a converter's RSS follows what it holds, not the
checkpoint). Small tensors (norms, biases, ``_extra_state``: at most :data:`SMALL` bytes and
1/16 of their file) are handed out as copies, so that one passed through unchanged to a writer
does not keep its whole file's map alive; and when only such small tensors of a file are still
to be asked for (typically those a conversion drops at its very end), they are copied out and the
map is let go of all the same. A later ``get`` of a released tensor simply loads its file again.
A tensor handed out as a view of its file's map is registered as a range of its file, so a
writer can copy its bytes file to file in the kernel (:mod:`mapper.formats.file_ranges`).
Legacy non-zip files cannot be memory-mapped: they are read whole, and only the most recently
used one is kept, so memory stays bounded by the largest file (:mod:`mapper.formats.mapped_files`).

Optimizer files (``*optim_states.pt``), ``zero_to_fp32.py`` and ``latest`` are ignored; any other
unknown ``.pt``/``.bin`` file is an error (it may hold weights that would silently be dropped);
other unknown files and non-tensor values in state dicts are recorded in :attr:`notes`.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mapper.errors import CheckpointError
from mapper.formats import safe_pickle
from mapper.formats.mapped_files import MappedFiles
from mapper.formats.naming import (
    LAYER_FILE,
    MP_RANK_FILE,
    SEQUENTIAL_KEY,
    neox_key,
)
from mapper.keyorder import natural_key
from mapper.formats.readahead import will_need
from mapper.input_files import check_folder, check_regular, read_bytes
from mapper.tensors import ClosingReader, TensorMeta

PIPELINE = "pipeline"
SEQUENTIAL = "sequential"
IGNORED_FILES = re.compile(r"^(.*optim_states\.pt|zero_to_fp32\.py|latest|latest_universal)$")
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
CONFIG_SUFFIXES = (".yml", ".yaml", ".json")
SMALL = 1 << 20  # bytes: tensors handed out as copies, not as views of their file's map
LOOKED_FOR = (
    "layer_XX-model_YY-model_states.pt (pipeline layout), mp_rank_YY_model_states.pt "
    "(sequential layout), a 'latest' file naming the tag folder, or one global_step* folder"
)


def _has_model_files(folder: Path) -> bool:
    return any(LAYER_FILE.match(p.name) or MP_RANK_FILE.match(p.name) for p in folder.iterdir())


def looks_like_neox(folder: Path) -> bool:
    """Model files, a ``latest`` file or ``global_step*`` folders: NeoX (maybe a broken one)."""
    return (
        _has_model_files(folder)
        or (folder / "latest").is_file()
        or any(p.is_dir() and p.name.startswith("global_step") for p in folder.iterdir())
    )


MAX_LATEST_BYTES = 4096  # 'latest' holds one folder name
_NOT_IN_A_TAG = re.compile(r"[/\\\x00-\x1f\x7f]")  # a tag is one folder name: no path, no control character


def _is_folder_name(tag: str) -> bool:
    return bool(tag) and tag not in (".", "..") and len(tag.encode()) <= 255 and not _NOT_IN_A_TAG.search(tag)


def _checked_tag(latest: Path) -> str:
    """The tag folder's name in ``latest``. What the file holds is quoted in an error only when
    ``latest`` is no link: a link to another file (say, a key file) must not get that file's
    contents printed."""
    raw = read_bytes(latest, limit=MAX_LATEST_BYTES, what="'latest'")
    tag = raw.decode("utf-8", errors="replace").strip()
    if not _is_folder_name(tag):
        message = (
            "'latest' is a link to another file, which holds no folder name (its contents are not shown)"
            if latest.is_symlink() else f"'latest' names {tag[:255]!r}, which is not a folder name beside it"
        )
        raise CheckpointError(
            message, where=latest,
            hint="write the tag folder's name (e.g. global_step1000) into 'latest', or pass that folder",
        )
    return tag


def resolve_tag_folder(path: Path) -> tuple[Path, str, list[str]]:
    """The folder holding the model files, its tag, and notes on how it was found."""
    check_folder(path, what="a NeoX checkpoint", hint="pass the global_stepN folder or its parent")
    if _has_model_files(path):
        return path, path.name, []
    latest = path / "latest"
    if latest.exists() and not latest.is_dir():
        tag = _checked_tag(latest)
        folder = path / tag
        if not folder.is_dir():
            message = (
                f"'latest' is a link to another file, which names no folder in {path} (its contents are not shown)"
                if latest.is_symlink() else f"'latest' names the tag {tag!r} but there is no folder {folder}"
            )
            raise CheckpointError(
                message,
                where=latest,
                hint="fix 'latest' or pass the tag folder itself",
            )
        return folder, tag, [f"{path}: tag {tag!r} from the 'latest' file"]
    steps = sorted(
        (p for p in path.iterdir() if p.is_dir() and p.name.startswith("global_step")),
        key=lambda p: natural_key(p.name),
    )
    if len(steps) == 1:
        return steps[0], steps[0].name, [f"{path}: using the only tag folder, {steps[0].name}"]
    if steps:
        raise CheckpointError(
            f"{len(steps)} tag folders ({', '.join(p.name for p in steps[:8])}) and no 'latest' file",
            where=path,
            hint="pass the tag folder you want (e.g. " + str(steps[-1]) + ")",
        )
    raise CheckpointError("not a NeoX checkpoint folder", where=path, hint=f"mapper looked for {LOOKED_FOR}")


def find_config_files(folder: Path, root: Path) -> list[Path]:
    """YAML/JSON configs NeoX saved under ``configs/`` in the tag folder (else beside it)."""
    for base in (folder, root, folder.parent):
        configs = base / "configs"
        if configs.is_dir():
            found = [p for p in configs.iterdir() if p.suffix.lower() in CONFIG_SUFFIXES and not p.is_dir()]
            for path in found:
                check_regular(path, what="this config file")
            if found:
                return sorted(found, key=lambda p: natural_key(p.name))
    return []


@dataclass(frozen=True)
class _Located:
    """Where a NeoX key lives: file, key inside the file, and the parts of its name."""

    file: Path
    inner: str
    idx: int
    rank: int
    key: str


class NeoXCheckpoint(ClosingReader):
    """A NeoX checkpoint as a :class:`~mapper.tensors.Source` (see the module docstring).

    Attributes: ``path`` (the tag folder), ``tag``, ``layout`` (``"pipeline"`` or
    ``"sequential"``), ``tp``, ``layer_indices``, ``config_files``, ``notes``.
    """

    def __init__(self, path: str | Path):
        self.root = Path(path)
        self.path, self.tag, self.notes = resolve_tag_folder(self.root)
        self.config_files = find_config_files(self.path, self.root)
        if not self.config_files:
            self.notes.append(f"{self.path}: no saved config under configs/")
        self._files: MappedFiles[dict[str, torch.Tensor]] = MappedFiles()
        # per loaded file: the in-file keys ``get`` has not handed out since it was loaded, their
        # bytes, and the bytes of the whole file's tensors
        self._pending: dict[Path, set[str]] = {}
        self._pending_bytes: dict[Path, int] = {}
        self._file_bytes: dict[Path, int] = {}
        self._index: dict[str, _Located] | None = None
        self._manifest: dict[str, TensorMeta] | None = None
        self.layer_files, self.mp_rank_files = self._scan()
        self.layout, self.tp = self._structure()

    # -- structure ---------------------------------------------------------------------------
    def _scan(self) -> tuple[dict[tuple[int, int], Path], dict[int, Path]]:
        layer_files: dict[tuple[int, int], Path] = {}
        mp_files: dict[int, Path] = {}
        for entry in sorted(self.path.iterdir(), key=lambda p: natural_key(p.name)):
            if entry.is_dir():
                if entry.name != "configs":
                    self.notes.append(f"{entry}: ignored folder")
                continue
            if match := LAYER_FILE.match(entry.name):
                check_regular(entry, what="this layer file")  # a FIFO would block the read forever
                layer_files[(int(match["idx"]), int(match["rank"]))] = entry
            elif match := MP_RANK_FILE.match(entry.name):
                check_regular(entry, what="this mp_rank file")
                mp_files[int(match["rank"])] = entry
            elif IGNORED_FILES.match(entry.name):
                self.notes.append(f"{entry}: ignored (not model weights)")
            elif entry.suffix.lower() in WEIGHT_SUFFIXES:
                check_regular(entry, what="this file")
                raise CheckpointError(
                    "unknown file in a NeoX checkpoint folder; it may hold weights mapper would drop",
                    where=entry,
                    hint=f"mapper reads {LOOKED_FOR}; move the file out of the folder if it holds no weights",
                )
            else:
                self.notes.append(f"{entry}: ignored unknown file")
        return layer_files, mp_files

    def _structure(self) -> tuple[str, int]:
        if self.layer_files:
            for file in self.mp_rank_files.values():
                module = self._training_state(file).get("module")
                if module is not None and not (isinstance(module, Mapping) and not module):
                    raise CheckpointError(
                        "mixed layouts: layer_* files (pipeline layout) and weights under 'module' "
                        "in this mp_rank file (sequential layout)",
                        where=file,
                        hint="keep the files of one save only (one layout) in the tag folder",
                    )
            return PIPELINE, self._pipeline_tp()
        if self.mp_rank_files:
            ranks = sorted(self.mp_rank_files)
            if ranks != list(range(len(ranks))):
                missing = sorted(set(range(ranks[-1] + 1)) - set(ranks))
                raise CheckpointError(
                    f"TP ranks {missing} have no mp_rank file (found ranks {ranks})",
                    where=self.path / f"mp_rank_{missing[0]:02d}_model_states.pt",
                    hint="copy the missing rank files; every TP rank saves its own file",
                )
            return SEQUENTIAL, len(ranks)
        raise CheckpointError(
            "no model files in this folder", where=self.path, hint=f"mapper looked for {LOOKED_FOR}"
        )

    def _pipeline_tp(self) -> int:
        ranks_by_layer: dict[int, set[int]] = {}
        for idx, rank in self.layer_files:
            ranks_by_layer.setdefault(idx, set()).add(rank)
        tp = max(max(r) for r in ranks_by_layer.values()) + 1
        for idx in sorted(ranks_by_layer):
            missing = sorted(set(range(tp)) - ranks_by_layer[idx])
            if missing:
                raise CheckpointError(
                    f"layer {idx} has no file for TP rank(s) {missing}, while other layers have {tp} ranks",
                    where=self.path / f"layer_{idx:02d}-model_{missing[0]:02d}-model_states.pt",
                    hint="copy the missing file; every layer has one file per TP rank",
                )
        if self.mp_rank_files and len(self.mp_rank_files) != tp:
            self.notes.append(
                f"{self.path}: {len(self.mp_rank_files)} mp_rank files but the layer files have {tp} TP ranks"
            )
        return tp

    def _training_state(self, file: Path) -> dict[Any, Any]:
        state = safe_pickle.load(file, training_state=True)
        if not isinstance(state, dict):
            raise CheckpointError(
                f"expected a dict of DeepSpeed state, got a {type(state).__name__}",
                where=file,
                hint="this does not look like a DeepSpeed mp_rank file",
            )
        safe_pickle.check_bytesio_placement(state, file=file)
        return state

    @property
    def layer_indices(self) -> list[int]:
        if self.layout == PIPELINE:
            return sorted({idx for idx, _ in self.layer_files})
        return sorted({located.idx for located in self._build_index().values()})

    # -- loading -----------------------------------------------------------------------------
    def _load_file(self, file: Path, need: str | None = None) -> dict[str, torch.Tensor]:
        """The tensors of one file under their in-file keys (cached, see the module docstring).

        With ``need``, the result may be the cached copies of the pending tensors only, provided
        ``need`` is one of them; without, it is always every tensor of the file.
        """
        with self._files.lock:
            cached = self._files.get(file)
            if cached is not None and (not self._files.is_copied(file) or (need is not None and need in cached)):
                return cached
            notes: list[str] = []
            if self.layout == PIPELINE:
                state: Any = safe_pickle.load(file)
                tensors = safe_pickle.tensors_from_state(
                    state, file=file, what="this layer file", notes=notes
                )
            else:
                full = self._training_state(file)
                if "module" not in full:
                    raise CheckpointError(
                        "no 'module' entry: this mp_rank file holds no model weights",
                        where=file,
                        hint="DeepSpeed saves the weights under 'module'; is this a complete checkpoint?",
                    )
                tensors = safe_pickle.tensors_from_state(
                    full["module"], file=file, what="'module'", notes=notes
                )
            self.notes.extend(n for n in notes if n not in self.notes)
            self._pending[file] = set(tensors)
            self._file_bytes[file] = self._pending_bytes[file] = sum(t.nbytes for t in tensors.values())
            self._files.keep(file, tensors)
            return tensors

    def _names_in(
        self, file: Path, tensors: dict[str, torch.Tensor], rank: int, idx: int | None
    ) -> list[tuple[str, _Located]]:
        """(NeoX key, location) of every tensor of one file; ``idx`` None for sequential files."""
        found: list[tuple[str, _Located]] = []
        for inner in tensors:
            if "@" in inner:
                raise CheckpointError(
                    "a key containing '@' cannot be named in mapper's key namespace",
                    where=f"{file}:{inner}",
                    hint="rename the key in the checkpoint",
                )
            layer, key = idx, inner
            if layer is None:
                match = SEQUENTIAL_KEY.match(inner)
                if not match:
                    raise CheckpointError(
                        "a key under 'module' that is not sequential.{idx}.{key}",
                        where=f"{file}:{inner}",
                        hint="this is not a NeoX sequential-layout checkpoint",
                    )
                layer, key = int(match["idx"]), match["key"]
            found.append((neox_key(layer, key, rank), _Located(file, inner, layer, rank, key)))
        return found

    def _build_index(self) -> dict[str, _Located]:
        if self._index is not None:
            return self._index
        files: list[tuple[Path, int, int | None]]
        if self.layout == PIPELINE:
            files = [(file, rank, idx) for (idx, rank), file in sorted(self.layer_files.items())]
        else:
            files = [(file, rank, None) for rank, file in sorted(self.mp_rank_files.items())]
        found: list[tuple[str, _Located]] = []
        metas: dict[str, TensorMeta] = {}
        for file, rank, idx in files:
            tensors = self._load_file(file)
            for name, located in self._names_in(file, tensors, rank, idx):
                found.append((name, located))
                metas[name] = TensorMeta.of(tensors[located.inner])
        found.sort(key=lambda item: (item[1].idx, item[1].rank, natural_key(item[1].key)))
        self._manifest = {name: metas[name] for name, _ in found}
        self._index = dict(found)
        return self._index

    # -- Source ------------------------------------------------------------------------------
    def manifest(self) -> dict[str, TensorMeta]:
        """Every tensor's shape and dtype, from the pickles only (no tensor data is read)."""
        self._build_index()
        assert self._manifest is not None
        return dict(self._manifest)

    def _locate(self, key: str) -> _Located:
        index = self._build_index()
        if key not in index:
            close = difflib.get_close_matches(key, list(index), n=3)
            raise CheckpointError(
                "no such tensor in this checkpoint",
                where=f"{self.path}:{key}",
                hint=f"did you mean {', '.join(close)}?" if close else "see manifest() for the keys",
            )
        return index[key]

    def file_of(self, key: str) -> Path:
        """The file holding ``key``."""
        return self._locate(key).file

    def get(self, key: str) -> torch.Tensor:
        """The tensor ``key``: a view of a memory map for zip files (do not write to it), a copy
        for a small tensor (see the module docstring)."""
        located = self._locate(key)
        tensors = self._load_file(located.file, located.inner)
        tensor = tensors[located.inner]
        mapped = self._files.is_mapped(located.file)
        if mapped and self._small(tensor.nbytes, located.file):
            tensor = tensor.clone()  # see the module docstring
        elif mapped:
            will_need(tensor)  # read ahead now, not when the writer thread touches it
            placement = self._files.placement(located.file, tensors.values())
            if placement is not None:
                placement.register(tensor)
        self._handed_out(located.file, located.inner, tensor.nbytes)
        return tensor

    def _small(self, nbytes: int, file: Path) -> bool:
        return nbytes <= min(SMALL, self._file_bytes.get(file, 0) // 16)

    def _handed_out(self, file: Path, inner: str, nbytes: int) -> None:
        """Let go of ``file``'s map once its tensors were handed out (see the module docstring)."""
        with self._files.lock:
            pending = self._pending.get(file)
            if pending is None or inner not in pending:
                return
            pending.discard(inner)
            self._pending_bytes[file] -= nbytes
            if not pending:
                del self._pending[file]
                self._files.release(file)
                return
            if self._files.is_mapped(file) and self._small(self._pending_bytes[file], file):
                cached = self._files.get(file)
                assert cached is not None
                self._files.replace(file, {k: cached[k].clone() for k in pending})

    def close(self) -> None:
        """Drop the cached file maps (the manifest stays)."""
        with self._files.lock:
            self._files.clear()
            self._pending.clear()
            self._pending_bytes.clear()

    def __repr__(self) -> str:
        return f"NeoXCheckpoint({str(self.path)!r}, layout={self.layout}, tp={self.tp})"
