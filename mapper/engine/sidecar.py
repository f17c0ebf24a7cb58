"""The sidecar: what lossy rules removed, so the way back is exact.

A conversion writes it into the HF folder (``mapper/sidecar.safetensors``, see :mod:`mapper.record`). Each entry belongs to one
node of the plan (``<rule id>:<first key>``) and holds the tensors that node's inverse needs:
FP8 ``_extra_state`` bytes, vocabulary rows cut by ``slice``, per-rank biases a ``sum`` cannot
give back... Entries exist only where the inverse alone would not restore the input bit for bit,
so the sidecar is usually tiny or empty.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from mapper.errors import CheckpointError
from mapper.input_files import check_regular
from mapper.tensors import TensorMeta


@dataclass
class Sidecar:
    """Residual tensors by entry name, plus which rule set (and direction) wrote them."""

    entries: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    rules: str | None = None
    version: str | None = None
    # Keys the forward conversion dropped: the way back re-creates exactly these (an optional
    # drop may have matched nothing, and its inverse must not invent the tensor).
    dropped: set[str] | None = None

    def manifest(self) -> dict[str, TensorMeta]:
        """Metadata of every stored tensor, as ``<entry>#<index>``: what compile looks at."""
        return {
            f"{entry}#{i}": TensorMeta.of(t) for entry, tensors in self.entries.items() for i, t in enumerate(tensors)
        }

    def get(self, entry: str | None) -> list[torch.Tensor] | None:
        return self.entries.get(entry) if entry else None

    def __len__(self) -> int:
        return len(self.entries)

    def __repr__(self) -> str:  # a summary: the entries are tensors (cut vocabulary rows, per-layer norms)
        count = sum(len(tensors) for tensors in self.entries.values())
        nbytes = sum(t.numel() * t.element_size() for tensors in self.entries.values() for t in tensors)
        return f"Sidecar({self.rules!r} {self.version or ''}: {len(self.entries)} entries, {count} tensors, {nbytes:,} bytes)"

    def contents(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The tensors and metadata of the sidecar's safetensors file (read back by :meth:`load`);
        a writer in :mod:`mapper.formats` writes them, in this order, so the file is reproducible."""
        tensors = {f"{entry}#{i}": t.detach().contiguous() for entry, ts in self.entries.items() for i, t in enumerate(ts)}
        metadata = {"format": "pt", "mapper_sidecar": "1", "rules": self.rules or "", "version": self.version or "",
                    "entries": json.dumps({e: len(ts) for e, ts in self.entries.items()}),
                    "dropped": json.dumps(sorted(self.dropped) if self.dropped is not None else None)}
        return tensors, metadata

    @classmethod
    def load(cls, path: Path) -> Sidecar:
        check_regular(path, what="the sidecar")  # a FIFO would block the read forever
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                counts: Mapping[str, int] = json.loads(metadata.get("entries", "{}"))
                entries = {e: [handle.get_tensor(f"{e}#{i}") for i in range(n)] for e, n in counts.items()}
                dropped = json.loads(metadata.get("dropped", "null"))
        except Exception as error:  # noqa: BLE001 -- safetensors raises its own error types
            raise CheckpointError(
                f"cannot read the sidecar: {error}", where=path,
                hint="the sidecar is damaged; convert without it (lossy entries fall back to their defaults)",
            ) from None
        if metadata.get("mapper_sidecar") != "1":
            raise CheckpointError("not a mapper sidecar (no 'mapper_sidecar' metadata)", where=path)
        return cls(entries, metadata.get("rules") or None, metadata.get("version") or None,
                   set(dropped) if dropped is not None else None)
