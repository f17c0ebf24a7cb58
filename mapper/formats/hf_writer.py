"""Writing HuggingFace folders: sharded safetensors, the index, ``config.json``.

Shards are filled in natural key order (``layers.2`` before ``layers.10``) up to
``max_shard_size`` bytes of tensor data (a larger tensor gets a shard of its own) and named like
``save_pretrained`` names them (:mod:`mapper.formats.hf_files`): ``model.safetensors`` for one
shard, else ``model-00001-of-0000N.safetensors`` plus ``model.safetensors.index.json``. Every shard's ``__metadata__`` holds ``format: pt``
(transformers refuses other formats) and the caller's metadata (rule set name, version...).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from mapper.errors import ConversionError
from mapper.formats.hf_files import SAFETENSORS_INDEX, index_document, shard_names
from mapper.formats.output import AtomicFile, write_json
from mapper.formats.safetensors_io import data_order, file_size, write_safetensors
from mapper.formats.writing import PlannedFile, StagedWriter
from mapper.keyorder import natural_sorted
from mapper.tensors import Manifest

def plan_shards(manifest: Manifest, max_shard_size: int) -> list[PlannedFile]:
    """Fill shards in natural key order; a shard is closed before it would exceed the limit."""
    shards: list[list[str]] = []
    size = 0
    for key in natural_sorted(list(manifest)):
        nbytes = manifest[key].nbytes
        if not shards or (shards[-1] and size + nbytes > max_shard_size):
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return [
        PlannedFile(name, tuple(keys), tuple(manifest[k] for k in keys))
        for name, keys in zip(shard_names(len(shards)), shards)
    ]


class HFWriter(StagedWriter):
    """A Sink writing a HuggingFace model folder (see the module docstring).

    ``inputs`` are the folders being converted (the output may not be inside one of them);
    ``force`` replaces an existing output folder once the new one is complete; ``parts`` and
    :meth:`finalize_parts` split the work across machines (:mod:`mapper.formats.parts`). Tensors
    whose bytes are a range of an input file are copied file to file in the kernel
    (:mod:`mapper.formats.file_ranges`).
    """

    kind = "hf"
    writes_lazy = True  # streams LazyConcat parts into the file (mapper.tensors.LazyConcat)

    def __init__(
        self,
        out_dir: str | Path,
        *,
        config: dict[str, Any] | None,
        max_shard_size: int = 5 * 10**9,
        metadata: dict[str, str] | None = None,
        parts: tuple[int, int] | None = None,
        force: bool = False,
        inputs: Iterable[str | Path] = (),
        background: bool = True,
    ):
        if max_shard_size < 1:
            raise ConversionError(f"max_shard_size={max_shard_size} must be positive", hint="e.g. 5 * 10**9")
        bad = {k: v for k, v in (metadata or {}).items() if not (isinstance(k, str) and isinstance(v, str))}
        if bad:
            raise ConversionError(
                f"safetensors metadata must map strings to strings; got {bad!r}",
                hint="convert the values with str()",
            )
        self.config = dict(config) if config is not None else None
        self.max_shard_size = max_shard_size
        self.metadata = {"format": "pt", **(metadata or {})}
        super().__init__(out_dir, parts=parts, force=force, inputs=inputs, background=background)

    def _options(self) -> dict[str, Any]:
        return {"config": self.config, "metadata": self.metadata, "max_shard_size": self.max_shard_size}

    def _plan(self, manifest: Manifest) -> list[PlannedFile]:
        if not manifest:
            raise ConversionError("nothing to write: the target manifest is empty", hint="check the rule set")
        return plan_shards(manifest, self.max_shard_size)

    def _write_file(
        self, folder: Path, planned: PlannedFile, tensors: Mapping[str, torch.Tensor], stop: threading.Event
    ) -> None:
        metas = planned.meta_of()
        needed = file_size(data_order(planned.keys, metas), metas, self.metadata)
        # The writer's own dict (see StagedWriter._write_file) is consumed as it is written, so
        # the group's memory is freed tensor by tensor; the layout does not depend on dict order.
        owned = isinstance(tensors, dict) and tensors.keys() == set(planned.keys)
        selected = tensors if owned else {k: tensors[k] for k in planned.keys}
        with AtomicFile(folder / planned.name, needed=needed, total=self._total_bytes(), sync=False) as f:
            write_safetensors(f, selected, self.metadata, stop=stop, release=owned)

    @classmethod
    def _write_extras(cls, folder: Path, plan: Sequence[PlannedFile], options: Mapping[str, Any]) -> None:
        if len(plan) > 1:
            write_json(folder / SAFETENSORS_INDEX,
                       index_document(((p.name, p.keys) for p in plan), sum(p.nbytes for p in plan)))
        if options.get("config") is not None:
            write_json(folder / "config.json", options["config"])
