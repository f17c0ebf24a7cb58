"""NeoXCheckpoint: both DeepSpeed layouts, any TP, one key namespace, metadata without data."""

from __future__ import annotations

import io
from pathlib import Path
from types import ModuleType

import pytest
import torch

from mapper.errors import CheckpointError
from mapper.formats import NeoXCheckpoint, safe_pickle
from mapper.formats.naming import layer_file_name, mp_rank_file_name


@pytest.mark.parametrize("tp", [1, 2])
def test_both_layouts_give_the_same_manifest_and_tensors(tmp_path: Path, ck: ModuleType, tp: int) -> None:
    state = ck.neox_state(tp)
    pipeline = NeoXCheckpoint(ck.save_pipeline(tmp_path / "pipe", state))
    sequential = NeoXCheckpoint(ck.save_sequential(tmp_path / "seq", state))

    assert pipeline.layout == "pipeline" and sequential.layout == "sequential"
    assert pipeline.tp == sequential.tp == tp
    assert pipeline.manifest() == sequential.manifest() == ck.neox_manifest(state)
    assert list(pipeline.manifest()) == list(sequential.manifest())
    ck.assert_same_tensors(ck.read_all(pipeline), ck.neox_names(state))
    ck.assert_same_tensors(ck.read_all(sequential), ck.neox_names(state))
    assert pipeline.layer_indices == sequential.layer_indices == [0, 2, 3, 5, 6]


def test_keys_are_named_layer_idx_key_at_rank(tmp_path: Path, ck: ModuleType) -> None:
    checkpoint = NeoXCheckpoint(ck.save_pipeline(tmp_path / "ckpt", ck.neox_state(2)))
    manifest = checkpoint.manifest()
    assert "layer_02.attention.qkv.weight@rank1" in manifest
    assert manifest["layer_02.attention.qkv.weight@rank1"].shape == (3 * ck.HIDDEN // 2, ck.HIDDEN)
    assert (
        checkpoint.file_of("layer_02.attention.qkv.weight@rank1").name == "layer_02-model_01-model_states.pt"
    )


def test_layer_indices_of_100_and_more_keep_all_digits(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    torch.save({"w": torch.ones(2)}, folder / layer_file_name(100, 0))
    torch.save({"w": torch.zeros(2)}, folder / layer_file_name(7, 0))
    checkpoint = NeoXCheckpoint(folder)
    assert list(checkpoint.manifest()) == ["layer_07.w@rank0", "layer_100.w@rank0"]
    assert checkpoint.layer_indices == [7, 100]


def test_the_latest_file_names_the_tag_folder(tmp_path: Path, ck: ModuleType) -> None:
    root = ck.save_neox_root(tmp_path / "run", ck.neox_state(1), tag="global_step10")
    (root / "global_step5").mkdir()
    checkpoint = NeoXCheckpoint(root)
    assert checkpoint.path == root / "global_step10"
    assert checkpoint.tag == "global_step10"


def test_a_parent_with_one_tag_folder_and_no_latest_file_is_accepted(tmp_path: Path, ck: ModuleType) -> None:
    root = ck.save_neox_root(tmp_path / "run", ck.neox_state(1), tag="global_step7")
    (root / "latest").unlink()
    assert NeoXCheckpoint(root).tag == "global_step7"


def test_several_tag_folders_without_latest_is_an_error_listing_them(tmp_path: Path, ck: ModuleType) -> None:
    root = ck.save_neox_root(tmp_path / "run", ck.neox_state(1), tag="global_step7")
    (root / "latest").unlink()
    ck.save_pipeline(root / "global_step8", ck.neox_state(1))
    with pytest.raises(CheckpointError, match="global_step7, global_step8") as info:
        NeoXCheckpoint(root)
    assert info.value.hint


@pytest.mark.parametrize("tag", ["../elsewhere", "/etc", ""])
def test_a_latest_file_pointing_outside_is_refused(tmp_path: Path, ck: ModuleType, tag: str) -> None:
    root = ck.save_neox_root(tmp_path / "run", ck.neox_state(1))
    (root / "latest").write_text(tag)
    with pytest.raises(CheckpointError, match="latest"):
        NeoXCheckpoint(root)


def test_a_latest_file_naming_a_missing_folder_is_an_error(tmp_path: Path, ck: ModuleType) -> None:
    root = ck.save_neox_root(tmp_path / "run", ck.neox_state(1))
    (root / "latest").write_text("global_step99")
    with pytest.raises(CheckpointError, match="global_step99"):
        NeoXCheckpoint(root)


@pytest.mark.parametrize("layout", ["pipeline", "sequential"])
def test_saved_configs_are_found(tmp_path: Path, ck: ModuleType, layout: str) -> None:
    root = ck.save_neox_root(tmp_path / "run", ck.neox_state(1), layout=layout)
    (root / "global_step10" / "configs" / "local_setup.yml").write_text("data-path: x\n")
    checkpoint = NeoXCheckpoint(root)
    assert [p.name for p in checkpoint.config_files] == ["local_setup.yml", "model.yml"]
    assert checkpoint.config_files[1].read_text() == ck.CONFIG_YAML


def test_no_config_is_a_note_not_an_error(tmp_path: Path, ck: ModuleType) -> None:
    checkpoint = NeoXCheckpoint(ck.save_pipeline(tmp_path / "ckpt", ck.neox_state(1)))
    assert checkpoint.config_files == []
    assert any("no saved config" in note for note in checkpoint.notes)


@pytest.mark.parametrize("layout", ["pipeline", "sequential"])
def test_building_the_manifest_reads_no_tensor_data(tmp_path: Path, ck: ModuleType, layout: str) -> None:
    state = ck.neox_state(1)
    state[(2, 0)]["big"] = torch.ones(4 * 2**20)  # 16 MiB of data that must not be read
    folder = tmp_path / "ckpt"
    (ck.save_pipeline if layout == "pipeline" else ck.save_sequential)(folder, state)

    before = ck.bytes_read()
    manifest = NeoXCheckpoint(folder).manifest()
    assert ck.bytes_read() - before < 2**20
    assert manifest["layer_02.big@rank0"].nbytes == 16 * 2**20


def test_get_neither_unpickles_again_nor_reads_other_tensors(
    tmp_path: Path, ck: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = ck.neox_state(1)
    state[(3, 0)]["big"] = torch.ones(4 * 2**20)
    checkpoint = NeoXCheckpoint(ck.save_pipeline(tmp_path / "ckpt", state))
    checkpoint.manifest()
    loads: list[Path] = []
    real_load = safe_pickle.load
    monkeypatch.setattr(safe_pickle, "load", lambda path, **kw: loads.append(path) or real_load(path, **kw))

    before = ck.bytes_read()
    small = checkpoint.get("layer_02.input_layernorm.weight@rank0").clone()
    assert ck.bytes_read() - before < 2**20
    assert loads == []
    assert small.equal(state[(2, 0)]["input_layernorm.weight"])


def test_a_missing_rank_file_is_an_error_naming_it(tmp_path: Path, ck: ModuleType) -> None:
    folder = ck.save_pipeline(tmp_path / "ckpt", ck.neox_state(2))
    (folder / layer_file_name(3, 1)).unlink()
    with pytest.raises(CheckpointError, match=r"layer 3 has no file for TP rank\(s\) \[1\]") as info:
        NeoXCheckpoint(folder)
    assert "layer_03-model_01-model_states.pt" in str(info.value)


def test_a_missing_sequential_rank_file_is_an_error(tmp_path: Path, ck: ModuleType) -> None:
    state = ck.neox_state(2)
    folder = ck.save_sequential(tmp_path / "ckpt", state)
    (folder / mp_rank_file_name(0)).unlink()
    with pytest.raises(CheckpointError, match=r"TP ranks \[0\] have no mp_rank file"):
        NeoXCheckpoint(folder)


def test_mixed_layouts_are_an_error(tmp_path: Path, ck: ModuleType) -> None:
    state = ck.neox_state(1)
    folder = ck.save_sequential(tmp_path / "ckpt", state)
    torch.save(state[(2, 0)], folder / layer_file_name(2, 0))
    with pytest.raises(CheckpointError, match="mixed layouts"):
        NeoXCheckpoint(folder)


def test_an_unknown_weights_file_is_an_error_other_files_are_notes(tmp_path: Path, ck: ModuleType) -> None:
    folder = ck.save_pipeline(tmp_path / "ckpt", ck.neox_state(1))
    (folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"ignored")
    (folder / "README.txt").write_text("hello")
    checkpoint = NeoXCheckpoint(folder)
    assert any("README.txt" in note for note in checkpoint.notes)
    assert any("optim_states" in note for note in checkpoint.notes)

    torch.save({"w": torch.ones(1)}, folder / "layer_2-model_0-model_states.pt")
    with pytest.raises(CheckpointError, match="unknown file") as info:
        NeoXCheckpoint(folder)
    assert "layer_2-model_0-model_states.pt" in str(info.value)


def test_non_tensor_values_are_skipped_with_a_note(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    torch.save({"w": torch.ones(2), "version": 3, "nothing": None}, folder / layer_file_name(2, 0))
    checkpoint = NeoXCheckpoint(folder)
    assert list(checkpoint.manifest()) == ["layer_02.w@rank0"]
    assert any("version" in note and "int" in note for note in checkpoint.notes)


def test_a_nested_dict_where_a_tensor_belongs_is_an_error(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    torch.save({"w": torch.ones(2), "sub": {"x": torch.ones(1)}}, folder / layer_file_name(2, 0))
    with pytest.raises(CheckpointError, match="dict under 'sub'"):
        NeoXCheckpoint(folder).manifest()


@pytest.mark.parametrize("layout", ["pipeline", "sequential"])
def test_old_te_bytesio_extra_state_becomes_a_uint8_tensor_of_its_bytes(
    tmp_path: Path, ck: ModuleType, layout: str
) -> None:
    state = ck.neox_state(1)
    fp8_meta = b"\x80\x02}q\x00."  # a pickle: must be passed on as bytes, never unpickled
    state[(2, 0)]["mlp._extra_state"] = io.BytesIO(fp8_meta)
    state[(3, 0)]["mlp._extra_state"] = io.BytesIO(b"")
    folder = tmp_path / "ckpt"
    (ck.save_pipeline if layout == "pipeline" else ck.save_sequential)(folder, state)

    checkpoint = NeoXCheckpoint(folder)
    got = checkpoint.get("layer_02.mlp._extra_state@rank0")
    assert got.dtype == torch.uint8 and bytes(got.tolist()) == fp8_meta
    assert checkpoint.manifest()["layer_03.mlp._extra_state@rank0"].shape == (0,)


@pytest.mark.parametrize("layout", ["pipeline", "sequential"])
def test_legacy_non_zip_files_are_read_without_mmap(tmp_path: Path, ck: ModuleType, layout: str) -> None:
    state = ck.neox_state(2)
    folder = tmp_path / "ckpt"
    if layout == "pipeline":
        ck.save_pipeline(folder, state, legacy=True)
    else:
        ck.save_sequential(folder, state, legacy=True)
    assert not safe_pickle.is_zip_file(next(folder.glob("*.pt")))
    checkpoint = NeoXCheckpoint(folder)
    assert checkpoint.manifest() == ck.neox_manifest(state)
    ck.assert_same_tensors(ck.read_all(checkpoint), ck.neox_names(state))


def test_an_unknown_key_error_suggests_close_keys(tmp_path: Path, ck: ModuleType) -> None:
    checkpoint = NeoXCheckpoint(ck.save_pipeline(tmp_path / "ckpt", ck.neox_state(1)))
    with pytest.raises(CheckpointError, match="no such tensor") as info:
        checkpoint.get("layer_02.attention.qkv.weigth@rank0")
    assert "layer_02.attention.qkv.weight@rank0" in str(info.value)


def test_a_sequential_key_outside_the_sequential_prefix_is_an_error(tmp_path: Path, ck: ModuleType) -> None:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    torch.save(
        ck.training_state(1, {"sequential.0.w": torch.ones(1), "stray.w": torch.ones(1)}),
        folder / mp_rank_file_name(0),
    )
    with pytest.raises(CheckpointError, match=r"not sequential\.\{idx\}\.\{key\}") as info:
        NeoXCheckpoint(folder).manifest()
    assert "stray.w" in str(info.value)


def test_a_file_or_an_empty_folder_is_not_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such"):
        NeoXCheckpoint(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a NeoX checkpoint") as info:
        NeoXCheckpoint(tmp_path / "empty")
    assert "layer_XX-model_YY-model_states.pt" in str(info.value)


def test_module_state_dicts_with_their_metadata_load_as_saved_by_deepspeed(tmp_path: Path) -> None:
    """``nn.Module.state_dict()`` is an OrderedDict carrying ``_metadata``; it must load as is."""
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.LayerNorm(4), torch.nn.Linear(4, 6)).to(torch.bfloat16)
    state = layer.state_dict()
    assert hasattr(state, "_metadata")
    folder = tmp_path / "ckpt"
    folder.mkdir()
    torch.save(state, folder / layer_file_name(2, 0))
    checkpoint = NeoXCheckpoint(folder)
    assert list(checkpoint.manifest()) == [f"layer_02.{k}@rank0" for k in ("0.bias", "0.weight", "1.bias", "1.weight")]
    assert checkpoint.get("layer_02.1.weight@rank0").equal(layer[1].weight.detach())
