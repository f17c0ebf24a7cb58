"""HFCheckpoint: safetensors (single, sharded) and .bin, validated headers, safe indexes."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from types import ModuleType

import pytest
import torch

from mapper.errors import CheckpointError
from mapper.formats import HFCheckpoint


@pytest.mark.parametrize(
    ("fmt", "shards", "legacy"),
    [
        ("safetensors", 1, False),
        ("safetensors", 3, False),
        ("bin", 1, False),
        ("bin", 2, False),
        ("bin", 1, True),
    ],
    ids=["safetensors", "safetensors-sharded", "bin", "bin-sharded", "bin-legacy"],
)
def test_reads_every_layout_bit_exact(
    tmp_path: Path, ck: ModuleType, fmt: str, shards: int, legacy: bool
) -> None:
    tensors = ck.hf_state()
    checkpoint = HFCheckpoint(ck.save_hf(tmp_path / "hf", tensors, shards=shards, fmt=fmt, legacy=legacy))
    assert checkpoint.format == fmt
    assert len(checkpoint.files) == shards
    assert checkpoint.config == ck.HF_CONFIG
    ck.assert_same_tensors(ck.read_all(checkpoint), tensors)


def test_the_manifest_is_in_natural_key_order(tmp_path: Path, ck: ModuleType) -> None:
    checkpoint = HFCheckpoint(ck.save_hf(tmp_path / "hf", ck.hf_state()))
    keys = list(checkpoint.manifest())
    assert keys.index("gpt_neox.layers.2.mlp.dense_h_to_4h.weight") < keys.index(
        "gpt_neox.layers.10.mlp.dense_h_to_4h.weight"
    )


def test_safetensors_are_preferred_over_bin(tmp_path: Path, ck: ModuleType) -> None:
    folder = ck.save_hf(tmp_path / "hf", {"a": torch.ones(2)}, fmt="bin")
    ck.save_hf(folder, {"b": torch.ones(2)})
    assert list(HFCheckpoint(folder).manifest()) == ["b"]


def test_no_config_json_gives_none(tmp_path: Path, ck: ModuleType) -> None:
    folder = ck.save_hf(tmp_path / "hf", {"a": torch.ones(2)})
    (folder / "config.json").unlink()
    assert HFCheckpoint(folder).config is None


def test_get_returns_views_of_the_file_not_copies(tmp_path: Path, ck: ModuleType) -> None:
    checkpoint = HFCheckpoint(ck.save_hf(tmp_path / "hf", {"big": torch.ones(4 * 2**20)}))
    before = ck.bytes_read()
    assert checkpoint.manifest()["big"].nbytes == 16 * 2**20
    assert checkpoint.get("big")[:4].tolist() == [1.0] * 4
    assert ck.bytes_read() - before < 2**20


def _single(tmp_path: Path, ck: ModuleType) -> Path:
    return (
        ck.save_hf(tmp_path / "hf", {"a": torch.ones(4), "b": torch.zeros(2, 2, dtype=torch.bfloat16)})
        / "model.safetensors"
    )


def _rewrite_header(path: Path, edit: object) -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)  # type: ignore[operator]
    new = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])


def test_a_truncated_file_names_the_file_and_the_tensor(tmp_path: Path, ck: ModuleType) -> None:
    path = _single(tmp_path, ck)
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(CheckpointError, match="past the end of the file") as info:
        HFCheckpoint(path.parent)
    assert "model.safetensors:b" in str(info.value) and info.value.hint  # b is stored last


def test_offsets_that_lie_about_the_size_are_an_error(tmp_path: Path, ck: ModuleType) -> None:
    path = _single(tmp_path, ck)
    _rewrite_header(path, lambda h: h["a"].update(shape=[5]))
    with pytest.raises(CheckpointError, match="span 16 bytes but a float32\\[5\\] tensor has 20"):
        HFCheckpoint(path.parent)


def test_overlapping_offsets_are_an_error(tmp_path: Path, ck: ModuleType) -> None:
    path = _single(tmp_path, ck)

    def overlap(header: dict) -> None:
        header["a"]["data_offsets"] = [4, 20]
        header["b"]["data_offsets"] = [0, 8]

    _rewrite_header(path, overlap)
    with pytest.raises(CheckpointError, match="overlap tensor 'b'"):
        HFCheckpoint(path.parent)


def test_a_header_length_beyond_the_file_is_an_error(tmp_path: Path, ck: ModuleType) -> None:
    path = _single(tmp_path, ck)
    raw = path.read_bytes()
    path.write_bytes(struct.pack("<Q", len(raw) * 2) + raw[8:])
    with pytest.raises(CheckpointError, match="header length"):
        HFCheckpoint(path.parent)


@pytest.mark.parametrize("garbage", [b"", b"\x01\x00", struct.pack("<Q", 4) + b"nope"])
def test_garbage_is_an_error_not_a_crash(tmp_path: Path, ck: ModuleType, garbage: bytes) -> None:
    path = _single(tmp_path, ck)
    path.write_bytes(garbage)
    with pytest.raises(CheckpointError):
        HFCheckpoint(path.parent)


def test_trailing_bytes_not_described_by_the_header_are_an_error(tmp_path: Path, ck: ModuleType) -> None:
    path = _single(tmp_path, ck)
    path.write_bytes(path.read_bytes() + b"junk")
    with pytest.raises(CheckpointError, match="4 bytes after the last tensor"):
        HFCheckpoint(path.parent)


@pytest.mark.parametrize(
    "name", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors", "C:\\x.safetensors"]
)
def test_an_index_pointing_outside_the_folder_is_refused(tmp_path: Path, ck: ModuleType, name: str) -> None:
    folder = ck.save_hf(tmp_path / "hf", ck.hf_state(), shards=2)
    ck.save_hf(tmp_path / "outside", {"x": torch.ones(1)})
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["gpt_neox.embed_in.weight"] = name
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="outside the model folder"):
        HFCheckpoint(folder)


def test_an_index_naming_a_missing_shard_or_the_wrong_one_is_an_error(tmp_path: Path, ck: ModuleType) -> None:
    folder = ck.save_hf(tmp_path / "hf", ck.hf_state(), shards=2)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = "model-00001-of-00002.safetensors"
    second = "model-00002-of-00002.safetensors"
    key = next(k for k, v in index["weight_map"].items() if v == first)

    index["weight_map"][key] = second
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"puts '{key}' in {second} but it is in {first}"):
        HFCheckpoint(folder)

    index["weight_map"][key] = "model-00009-of-00009.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="does not exist"):
        HFCheckpoint(folder)


def test_an_empty_folder_says_what_was_looked_for(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="model.safetensors.index.json, model.safetensors"):
        HFCheckpoint(tmp_path)


def test_an_unknown_key_error_suggests_close_keys(tmp_path: Path, ck: ModuleType) -> None:
    checkpoint = HFCheckpoint(ck.save_hf(tmp_path / "hf", ck.hf_state()))
    with pytest.raises(CheckpointError, match="embed_out.weight"):
        checkpoint.get("embed_out.weigth")
