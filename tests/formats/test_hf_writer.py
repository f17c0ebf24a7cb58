"""HFWriter: streamed safetensors that the reference library and transformers read back."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import pytest
import torch
from safetensors import safe_open

from mapper.errors import ConversionError
from mapper.formats import HFCheckpoint, HFWriter
from mapper.tensors import TensorMeta
from mapper.testing.sinks import write_groups as write


def every_dtype() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {
        "bf16": torch.randn(3, 5, generator=gen).to(torch.bfloat16),
        "fp16": torch.randn(7, generator=gen).to(torch.float16),
        "fp32": torch.randn(2, 3, 4, generator=gen),
        "int64": torch.randint(-(2**40), 2**40, (5,), generator=gen),
        "uint8": torch.randint(0, 256, (9,), generator=gen, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "empty_bf16": torch.empty(0, 4, dtype=torch.bfloat16),
        "empty_u8": torch.empty(0, dtype=torch.uint8),
        "scalar": torch.tensor(3.5, dtype=torch.bfloat16),
        "view": torch.arange(40, dtype=torch.float32).reshape(8, 5)[2:6, 1:4],
    }


@pytest.mark.parametrize("background", [True, False])
def test_round_trip_is_bit_exact_for_every_dtype(tmp_path: Path, ck: ModuleType, background: bool) -> None:
    tensors = every_dtype()
    write(HFWriter(tmp_path / "out", config=None, background=background), tensors)
    ck.assert_same_tensors(ck.read_all(HFCheckpoint(tmp_path / "out")), tensors)
    with safe_open(str(tmp_path / "out" / "model.safetensors"), framework="pt") as f:
        ck.assert_same_tensors({k: f.get_tensor(k) for k in f.keys()}, tensors)


def test_shards_are_filled_by_size_in_natural_key_order(tmp_path: Path, ck: ModuleType) -> None:
    tensors = {f"layers.{i}.w": torch.full((64,), float(i)) for i in range(12)}  # 256 bytes each
    groups = write(HFWriter(tmp_path / "out", config=ck.HF_CONFIG, max_shard_size=600), tensors)
    assert groups[0] == ["layers.0.w", "layers.1.w"]
    assert [k for g in groups for k in g] == [f"layers.{i}.w" for i in range(12)]
    assert len(groups) == 6
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == sorted(
        ["config.json", "model.safetensors.index.json"]
        + [f"model-{i:05d}-of-00006.safetensors" for i in range(1, 7)]
    )


def test_a_tensor_larger_than_a_shard_gets_a_shard_of_its_own(tmp_path: Path) -> None:
    tensors = {"a": torch.ones(4), "big": torch.ones(100), "c": torch.ones(4)}
    groups = write(HFWriter(tmp_path / "out", config=None, max_shard_size=64), tensors)
    assert groups == [["a"], ["big"], ["c"]]


def test_the_index_maps_every_key_to_its_shard_and_sums_the_sizes(tmp_path: Path, ck: ModuleType) -> None:
    tensors = ck.hf_state()
    write(HFWriter(tmp_path / "out", config=ck.HF_CONFIG, max_shard_size=700), tensors)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
    assert sorted(index["weight_map"]) == sorted(tensors)
    for key, shard in index["weight_map"].items():
        with safe_open(str(tmp_path / "out" / shard), framework="pt") as f:
            assert key in f.keys()
    ck.assert_same_tensors(ck.read_all(HFCheckpoint(tmp_path / "out")), tensors)


def test_metadata_and_config_are_written(tmp_path: Path, ck: ModuleType) -> None:
    write(
        HFWriter(tmp_path / "out", config=ck.HF_CONFIG, metadata={"rules": "neox-te", "rules_version": "3"}),
        {"w": torch.ones(2)},
    )
    with safe_open(str(tmp_path / "out" / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "rules": "neox-te", "rules_version": "3"}
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == ck.HF_CONFIG
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()


def test_tensor_data_is_aligned_to_the_element_size(tmp_path: Path) -> None:
    write(
        HFWriter(tmp_path / "out", config=None),
        {"u8": torch.ones(3, dtype=torch.uint8), "f64": torch.ones(3, dtype=torch.float64)},
    )
    header = HFCheckpoint(tmp_path / "out")._entries  # noqa: SLF001 - checking the layout itself
    assert header["f64"].start % 8 == 0


def test_transformers_loads_a_written_gpt_neox_model(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPTNeoXConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = transformers.GPTNeoXForCausalLM(config).eval()
    model.save_pretrained(tmp_path / "reference")
    reference = HFCheckpoint(tmp_path / "reference")
    tensors = {key: reference.get(key) for key in reference.manifest()}

    write(
        HFWriter(
            tmp_path / "out", config=reference.config, max_shard_size=20_000, inputs=[tmp_path / "reference"]
        ),
        tensors,
    )
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids = torch.tensor([[1, 5, 7, 9, 2]])
    with torch.no_grad():
        assert torch.equal(loaded.eval()(ids).logits, model(ids).logits)


def test_wrong_tensors_for_a_group_are_refused_and_nothing_is_left(tmp_path: Path) -> None:
    writer = HFWriter(tmp_path / "out", config=None)
    groups = writer.groups({"a": TensorMeta((2,), torch.float32), "b": TensorMeta((3,), torch.float32)})
    with pytest.raises(ConversionError, match=r"missing \['b'\], unexpected \['c'\]"):
        writer.write_group(0, {"a": torch.ones(2), "c": torch.ones(3)})
    assert groups == [["a", "b"]]
    assert list(tmp_path.iterdir()) == []

    writer = HFWriter(tmp_path / "out", config=None)
    writer.groups({"a": TensorMeta((2,), torch.float32)})
    with pytest.raises(
        ConversionError, match=r"got float32\[3\], but the manifest given to groups\(\) said float32\[2\]"
    ):
        writer.write_group(0, {"a": torch.ones(3)})
    assert list(tmp_path.iterdir()) == []


def test_finalize_refuses_when_a_group_was_never_written(tmp_path: Path) -> None:
    writer = HFWriter(tmp_path / "out", config=None, max_shard_size=8)
    writer.groups({"a": TensorMeta((2,), torch.float32), "b": TensorMeta((2,), torch.float32)})
    writer.write_group(0, {"a": torch.ones(2)})
    with pytest.raises(ConversionError, match="1 of 2 groups were never written"):
        writer.finalize()
    assert list(tmp_path.iterdir()) == []


def test_metadata_must_be_strings(tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match="strings to strings"):
        HFWriter(tmp_path / "out", config=None, metadata={"version": 3})  # type: ignore[dict-item]
