"""Checkpoint readers and writers: NeoX (both DeepSpeed layouts) and HuggingFace.

Readers implement :class:`~mapper.tensors.Source`, writers :class:`~mapper.tensors.Sink`.
Loading pickles follows :mod:`mapper.formats.safe_pickle`; output is atomic
(:mod:`mapper.formats.output`) and can be split across machines (:mod:`mapper.formats.parts`).
"""

from __future__ import annotations

from pathlib import Path

from mapper.errors import CheckpointError
from mapper.formats.hf import HFCheckpoint
from mapper.formats.hf_files import LOOKED_FOR as HF_LOOKED_FOR
from mapper.formats.hf_files import is_hf_folder
from mapper.formats.hf_writer import HFWriter
from mapper.formats.naming import neox_key, parse_neox_key
from mapper.formats.neox import LOOKED_FOR as NEOX_LOOKED_FOR
from mapper.formats.neox import NeoXCheckpoint, looks_like_neox
from mapper.formats.neox_writer import NeoXWriter
from mapper.formats.output import check_output_path
from mapper.input_files import check_folder

__all__ = [
    "HFCheckpoint",
    "HFWriter",
    "NeoXCheckpoint",
    "NeoXWriter",
    "check_output_path",
    "detect_format",
    "neox_key",
    "open_checkpoint",
    "parse_neox_key",
]


def detect_format(path: str | Path) -> str:
    """``"hf"`` or ``"neox"`` for a checkpoint folder; a CheckpointError saying what was looked for."""
    folder = check_folder(Path(path))
    if is_hf_folder(folder):
        return "hf"
    if looks_like_neox(folder):
        return "neox"
    raise CheckpointError(
        "neither a HuggingFace nor a NeoX checkpoint",
        where=folder,
        hint=f"for HuggingFace mapper looked for {HF_LOOKED_FOR}; for NeoX for {NEOX_LOOKED_FOR}",
    )


def open_checkpoint(path: str | Path) -> NeoXCheckpoint | HFCheckpoint:
    """The reader for the checkpoint folder at ``path``, whichever format it is."""
    if detect_format(path) == "hf":
        return HFCheckpoint(path)
    return NeoXCheckpoint(path)
