"""Reading HuggingFace model folders: safetensors (single or sharded) or pytorch_model.bin.

Which files hold the weights, in ``from_pretrained``'s order, is :mod:`mapper.formats.hf_files`'s
answer (an index naming files outside the folder is refused there). The manifest
comes from the safetensors headers (validated: offsets that lie, overlap or point past the end
of a truncated file are errors naming the file and tensor) or from memory-mapped, weights-only
loads of the ``.bin`` files (:mod:`mapper.formats.safe_pickle`). ``get`` returns views of memory maps:
for safetensors, a map of that tensor's bytes alone, so the pages read go away with the tensor
(memory follows the tensors in use, not the 5 GB shards they come from).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import torch

from mapper.errors import CheckpointError
from mapper.formats import safe_pickle
from mapper.formats.readahead import will_need
from mapper.formats.hf_files import LOOKED_FOR, present, read_index, weight_files
from mapper.formats.mapped_files import MappedFiles
from mapper.formats.safetensors_io import Entry, map_tensor, read_header
from mapper.input_files import check_folder, read_json
from mapper.keyorder import natural_key
from mapper.tensors import ClosingReader, TensorMeta


class HFCheckpoint(ClosingReader):
    """A HuggingFace model folder as a :class:`~mapper.tensors.Source`.

    Attributes: ``path``, ``format`` (``"safetensors"`` or ``"bin"``), ``files`` (the weight
    files), ``config`` (the ``config.json`` dict, or None), ``metadata`` (safetensors
    ``__metadata__`` of the first shard).
    """

    def __init__(self, path: str | Path):
        self.path = check_folder(Path(path), what="a HuggingFace model",
                                 hint="pass the HuggingFace model folder (the one with config.json)")
        config_path = self.path / "config.json"
        self.config: dict[str, Any] | None = read_json(config_path, what=config_path.name) if present(config_path) else None
        self._files: MappedFiles[dict[str, torch.Tensor]] = MappedFiles()  # the .bin files
        self._bin_metas: dict[str, TensorMeta] = {}
        self._entries: dict[str, Entry] = {}
        self._file_of: dict[str, Path] = {}
        self.metadata: dict[str, str] = {}
        self.notes: list[str] = []
        found = weight_files(self.path)
        if found is None:
            raise CheckpointError(
                "no model weights in this folder", where=self.path, hint=f"mapper looked for {LOOKED_FOR}"
            )
        self.format = found.format
        mapped = read_index(found.index) if found.index is not None else None
        files = sorted(set(mapped.values()), key=lambda p: natural_key(p.name)) if mapped else [found.single]
        if self.format == "safetensors":
            self._open_safetensors(files)  # type: ignore[arg-type]
        else:
            self._open_bin(files)  # type: ignore[arg-type]
        self._check_index(mapped, self._file_of, found.index)
        self.files = sorted(set(self._file_of.values()), key=lambda p: natural_key(p.name))

    def _check_index(
        self, mapped: dict[str, Path] | None, found: dict[str, Path], index: Path | None
    ) -> None:
        if mapped is None or index is None:
            return
        for key, path in mapped.items():
            if key not in found:
                raise CheckpointError(
                    f"the index puts {key!r} in {path.name}, which does not hold it",
                    where=index,
                    hint="the index and the shards are from different saves; copy them again",
                )
            if found[key] != path:
                raise CheckpointError(
                    f"the index puts {key!r} in {path.name} but it is in {found[key].name}",
                    where=index,
                    hint="the index and the shards are from different saves; copy them again",
                )
        for key in found.keys() - mapped.keys():
            self.notes.append(f"{found[key]}:{key}: not in the index (read anyway)")

    def _open_safetensors(self, shards: list[Path]) -> None:
        for shard in shards:
            header = read_header(shard)
            if not self.metadata:
                self.metadata = header.metadata
            for key, entry in header.entries.items():
                if key in self._file_of:
                    raise CheckpointError(
                        f"tensor {key!r} is in both {self._file_of[key].name} and {shard.name}",
                        where=shard,
                        hint="remove the stale shard",
                    )
                self._entries[key] = entry
                self._file_of[key] = shard

    def _open_bin(self, files: list[Path]) -> None:
        for file in files:
            for key, tensor in self._load_bin(file).items():
                self._bin_metas[key] = TensorMeta.of(tensor)
                if key in self._file_of:
                    raise CheckpointError(
                        f"tensor {key!r} is in both {self._file_of[key].name} and {file.name}",
                        where=file,
                        hint="remove the stale file",
                    )
                self._file_of[key] = file

    def _load_bin(self, file: Path) -> dict[str, torch.Tensor]:
        """One .bin file's tensors: memory-mapped ones are kept, a legacy one only until the next."""
        return self._files.load(file, self._read_bin)

    def _read_bin(self, file: Path) -> dict[str, torch.Tensor]:
        notes: list[str] = []
        state = safe_pickle.load(file)
        tensors = safe_pickle.tensors_from_state(state, file=file, what="this weights file", notes=notes)
        self.notes.extend(n for n in notes if n not in self.notes)
        return tensors

    def manifest(self) -> dict[str, TensorMeta]:
        """Every tensor's shape and dtype, in natural key order, without reading tensor data."""
        keys = sorted(self._file_of, key=natural_key)
        if self.format == "safetensors":
            return {key: self._entries[key].meta for key in keys}
        return {key: self._bin_metas[key] for key in keys}

    def file_of(self, key: str) -> Path:
        if key not in self._file_of:
            close = difflib.get_close_matches(key, list(self._file_of), n=3)
            raise CheckpointError(
                "no such tensor in this checkpoint",
                where=f"{self.path}:{key}",
                hint=f"did you mean {', '.join(close)}?" if close else "see manifest() for the keys",
            )
        return self._file_of[key]

    def get(self, key: str) -> torch.Tensor:
        """The tensor ``key``, a view of a memory map (do not write to it)."""
        file = self.file_of(key)
        if self.format == "safetensors":
            return will_need(map_tensor(file, self._entries[key]))
        tensors = self._load_bin(file)
        tensor = tensors[key]
        placement = self._files.placement(file, tensors.values())
        if placement is not None:  # a writer copies its bytes file to file (mapper.formats.file_ranges)
            placement.register(tensor)
        return tensor

    def close(self) -> None:
        self._files.clear()

    def __repr__(self) -> str:
        return f"HFCheckpoint({str(self.path)!r}, format={self.format}, files={len(self.files)})"
