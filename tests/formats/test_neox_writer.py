"""NeoXWriter: a pipeline-layout checkpoint that NeoXCheckpoint and DeepSpeed read back."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest
import torch
import yaml

from mapper.errors import ConversionError
from mapper.formats import NeoXCheckpoint, NeoXWriter
from mapper.formats.naming import mp_rank_file_name
from mapper.tensors import TensorMeta
from mapper.testing.sinks import write_groups as write


@pytest.mark.parametrize("tp", [1, 2])
def test_round_trip_gives_an_identical_manifest_and_tensors(tmp_path: Path, ck: ModuleType, tp: int) -> None:
    source = NeoXCheckpoint(ck.save_neox_root(tmp_path / "in", ck.neox_state(tp)))
    tensors = {key: source.get(key) for key in source.manifest()}
    config = yaml.safe_load(source.config_files[0].read_text())

    groups = write(NeoXWriter(tmp_path / "out", yaml_config=config, tp=tp, inputs=[tmp_path / "in"]), tensors)
    assert len(groups) == 5 * tp  # one file per (layer, rank)

    back = NeoXCheckpoint(tmp_path / "out")
    assert (back.layout, back.tp, back.tag) == ("pipeline", tp, "global_step0")
    assert back.manifest() == source.manifest()
    assert list(back.manifest()) == list(source.manifest())
    ck.assert_same_tensors(ck.read_all(back), tensors)
    assert yaml.safe_load(back.config_files[0].read_text()) == config
    assert (tmp_path / "out" / "latest").read_text() == "global_step0"


def test_the_mp_rank_files_hold_plain_deepspeed_state_only(tmp_path: Path, ck: ModuleType) -> None:
    tensors = ck.neox_names(ck.neox_state(2))
    write(NeoXWriter(tmp_path / "out", yaml_config=None, tp=2, tag="global_step42"), tensors)
    for rank in range(2):
        path = tmp_path / "out" / "global_step42" / mp_rank_file_name(rank)
        assert torch.serialization.get_unsafe_globals_in_checkpoint(str(path)) == []
        state = torch.load(path, weights_only=True)
        assert state["module"] is None
        assert state["dp_world_size"] == 1 and state["mp_world_size"] == 2
        assert state["iteration"] == state["global_steps"] == 42
        assert "args" not in state
        assert "finetune" in state["mapper"]["load_with"]


def test_layer_files_are_plain_tensor_dicts_without_view_bloat(tmp_path: Path) -> None:
    big = torch.arange(2**20, dtype=torch.float32)
    tensors = {"layer_02.w@rank0": big[:8], "layer_02.v@rank0": big.reshape(1024, 1024)[:4, :2]}
    write(NeoXWriter(tmp_path / "out", yaml_config=None, tp=1), tensors)
    path = tmp_path / "out" / "global_step0" / "layer_02-model_00-model_states.pt"
    assert path.stat().st_size < 10_000
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(path)) == []
    loaded = torch.load(path, weights_only=True)
    assert loaded["w"].equal(big[:8]) and loaded["v"].equal(big.reshape(1024, 1024)[:4, :2])


def test_a_layer_missing_a_tp_rank_is_refused(tmp_path: Path) -> None:
    writer = NeoXWriter(tmp_path / "out", yaml_config=None, tp=2)
    manifest = {
        "layer_02.w@rank0": TensorMeta((2,), torch.float32),
        "layer_02.w@rank1": TensorMeta((2,), torch.float32),
        "layer_03.w@rank0": TensorMeta((2,), torch.float32),
    }
    with pytest.raises(ConversionError, match="layer 3 rank 1"):
        writer.groups(manifest)


def test_keys_outside_the_namespace_or_the_tp_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match="not a NeoX key"):
        NeoXWriter(tmp_path / "a", yaml_config=None, tp=1).groups(
            {"gpt_neox.w": TensorMeta((1,), torch.float32)}
        )
    with pytest.raises(ConversionError, match="TP rank 1 but the writer was given tp=1"):
        NeoXWriter(tmp_path / "b", yaml_config=None, tp=1).groups(
            {"layer_02.w@rank1": TensorMeta((1,), torch.float32)}
        )


@pytest.mark.parametrize("tag", ["../x", "a/b", ""])
def test_the_tag_must_be_a_plain_name(tmp_path: Path, tag: str) -> None:
    with pytest.raises(ConversionError, match="plain file name"):
        NeoXWriter(tmp_path / "out", yaml_config=None, tp=1, tag=tag)
