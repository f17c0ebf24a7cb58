"""open_checkpoint: the right reader for a folder, or an error saying what it looked for."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest
import torch

from mapper.errors import CheckpointError
from mapper.formats import HFCheckpoint, NeoXCheckpoint, detect_format, open_checkpoint


def test_neox_folders_open_as_neox(tmp_path: Path, ck: ModuleType) -> None:
    root = ck.save_neox_root(tmp_path / "run", ck.neox_state(2), layout="sequential")
    for path in (root, root / "global_step10"):
        checkpoint = open_checkpoint(path)
        assert isinstance(checkpoint, NeoXCheckpoint)
        assert (checkpoint.layout, checkpoint.tp) == ("sequential", 2)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_hf_folders_open_as_hf(tmp_path: Path, ck: ModuleType, fmt: str) -> None:
    checkpoint = open_checkpoint(ck.save_hf(tmp_path / "hf", {"w": torch.ones(1)}, fmt=fmt))
    assert isinstance(checkpoint, HFCheckpoint) and checkpoint.format == fmt


def test_a_broken_neox_folder_gets_the_neox_error(tmp_path: Path, ck: ModuleType) -> None:
    root = ck.save_neox_root(tmp_path / "run", ck.neox_state(1))
    (root / "latest").write_text("global_step99")
    assert detect_format(root) == "neox"
    with pytest.raises(CheckpointError, match="global_step99"):
        open_checkpoint(root)


def test_anything_else_is_an_error_listing_what_was_looked_for(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="neither a HuggingFace nor a NeoX checkpoint") as info:
        open_checkpoint(tmp_path)
    assert "model.safetensors" in str(info.value) and "mp_rank_YY_model_states.pt" in str(info.value)
    with pytest.raises(CheckpointError, match="not a file"):
        open_checkpoint(tmp_path / "notes.txt")
    with pytest.raises(CheckpointError, match="no such"):
        open_checkpoint(tmp_path / "missing")
