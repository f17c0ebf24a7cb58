"""Driving a writer the way the engine does, for tests of writers (shipped or a user's own)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from mapper.formats.writing import StagedWriter
from mapper.tensors import TensorMeta


def write_groups(
    writer: StagedWriter,
    tensors: Mapping[str, torch.Tensor],
    between: Callable[[int], None] = lambda index: None,
) -> list[list[str]]:
    """Plan ``writer``'s files from the tensors' metadata, write every group, and finalize on
    leaving the ``with`` block (abort on an error); ``between(i)`` runs after group ``i``."""
    manifest = {key: TensorMeta.of(t) for key, t in tensors.items()}
    with writer:
        groups = writer.groups(manifest)
        for index, keys in enumerate(groups):
            writer.write_group(index, {key: tensors[key] for key in keys})
            between(index)
    return groups
