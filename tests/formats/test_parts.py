"""Multi-machine parts: N independent writers into one shared staging folder, then finalize."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from types import ModuleType

import pytest
import torch

from mapper.errors import ConversionError
from mapper.formats import HFCheckpoint, HFWriter, NeoXCheckpoint, NeoXWriter
from mapper.engine.execute import part_groups
from mapper.formats.writing import StagedWriter
from mapper.tensors import TensorMeta

TENSORS = {f"gpt_neox.layers.{i}.w": torch.full((64,), float(i), dtype=torch.bfloat16) for i in range(10)}


def run_part(writer: StagedWriter, tensors: Mapping[str, torch.Tensor]) -> list[list[str]]:
    """What the engine does for ``execute(part=writer.parts)``: only this part's groups."""
    manifest = {key: TensorMeta.of(t) for key, t in tensors.items()}
    with writer:
        groups = writer.groups(manifest)
        mine = part_groups(len(groups), writer.parts)
        for i in mine:
            writer.write_group(i, {key: tensors[key] for key in groups[i]})
    return [groups[i] for i in mine]


def hf(out: Path, parts: tuple[int, int] | None = None, **kw: object) -> HFWriter:
    return HFWriter(out, config={"model_type": "gpt_neox"}, max_shard_size=300, parts=parts, **kw)  # type: ignore[arg-type]


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_parts_are_contiguous_and_cover_every_file_once() -> None:
    for count in (0, 1, 5, 10, 11):
        for total in (1, 3, 4, 12):
            ranges = [part_groups(count, (i, total)) for i in range(1, total + 1)]
            assert [i for r in ranges for i in r] == list(range(count))


def test_a_part_refuses_groups_of_other_parts(tmp_path: Path) -> None:
    writer = hf(tmp_path / "out", (1, 2))
    groups = writer.groups({key: TensorMeta.of(t) for key, t in TENSORS.items()})
    assert len(groups) == 5
    with pytest.raises(ConversionError, match="belongs to another part"):
        writer.write_group(4, {key: TENSORS[key] for key in groups[4]})


def test_three_parts_then_finalize_equal_a_single_run(tmp_path: Path) -> None:
    run_part(hf(tmp_path / "single"), TENSORS)
    seen = [run_part(hf(tmp_path / "out", (i, 3)), TENSORS) for i in (1, 2, 3)]
    assert [len(groups) for groups in seen] == [1, 2, 2]  # 5 shards of 2 tensors split 1/2/2
    assert not (tmp_path / "out").exists()

    assert HFWriter.finalize_parts(tmp_path / "out") == tmp_path / "out"
    assert files(tmp_path / "out") == files(tmp_path / "single")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "single"]
    assert list(HFCheckpoint(tmp_path / "out").manifest()) == list(TENSORS)


def test_finalize_names_the_parts_still_missing(tmp_path: Path) -> None:
    run_part(hf(tmp_path / "out", (1, 3)), TENSORS)
    run_part(hf(tmp_path / "out", (3, 3)), TENSORS)
    with pytest.raises(ConversionError, match=r"1 of 3 parts are not finished: parts \[2\]"):
        HFWriter.finalize_parts(tmp_path / "out")
    run_part(hf(tmp_path / "out", (2, 3)), TENSORS)
    HFWriter.finalize_parts(tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()


@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32, torch.uint64, torch.float8_e4m3fn, torch.bool])
def test_every_dtype_safetensors_stores_survives_the_recorded_plan(tmp_path: Path, dtype: torch.dtype) -> None:
    """finalize reads the plan back from JSON, dtype names included (mapper.dtypes)."""
    tensors = {"a": torch.zeros(4, dtype=dtype), "b": torch.ones(4, dtype=dtype)}
    for i in (1, 2):
        run_part(HFWriter(tmp_path / "out", config=None, max_shard_size=1, parts=(i, 2)), tensors)
    with HFCheckpoint(HFWriter.finalize_parts(tmp_path / "out")) as written:
        assert {key: meta.dtype for key, meta in written.manifest().items()} == {"a": dtype, "b": dtype}


def test_a_part_planned_differently_is_refused(tmp_path: Path) -> None:
    run_part(hf(tmp_path / "out", (1, 2)), TENSORS)
    other = {**TENSORS, "extra": torch.ones(1)}
    with pytest.raises(ConversionError, match="different plan"):
        run_part(hf(tmp_path / "out", (2, 2)), other)


def test_a_failed_part_removes_only_its_own_files(tmp_path: Path) -> None:
    run_part(hf(tmp_path / "out", (1, 2)), TENSORS)
    staging = tmp_path / ".out.mapper-parts"
    before = files(staging)

    writer = hf(tmp_path / "out", (2, 2))
    with pytest.raises(KeyboardInterrupt):
        with writer:
            groups = writer.groups({key: TensorMeta.of(t) for key, t in TENSORS.items()})
            writer.write_group(2, {key: TENSORS[key] for key in groups[2]})
            raise KeyboardInterrupt
    assert files(staging) == before
    with pytest.raises(ConversionError, match="parts \\[2\\]"):
        HFWriter.finalize_parts(tmp_path / "out")


def test_a_modified_part_file_is_detected(tmp_path: Path) -> None:
    for i in (1, 2):
        run_part(hf(tmp_path / "out", (i, 2)), TENSORS)
    shard = tmp_path / ".out.mapper-parts" / "model-00001-of-00005.safetensors"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(ConversionError, match="model-00001-of-00005.safetensors of part 1"):
        HFWriter.finalize_parts(tmp_path / "out")


def test_finalize_without_parts_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match="no parts were written"):
        HFWriter.finalize_parts(tmp_path / "out")


def test_a_part_number_must_be_in_range(tmp_path: Path) -> None:
    for bad in ((0, 3), (4, 3)):
        with pytest.raises(ConversionError, match="1 <= I <= N"):
            hf(tmp_path / "out", bad)


def test_more_parts_than_files_leaves_some_parts_idle(tmp_path: Path) -> None:
    tensors = {"a": torch.ones(2), "b": torch.ones(2)}
    for i in range(1, 5):
        run_part(HFWriter(tmp_path / "out", config=None, max_shard_size=8, parts=(i, 4)), tensors)
    HFWriter.finalize_parts(tmp_path / "out")
    assert list(HFCheckpoint(tmp_path / "out").manifest()) == ["a", "b"]


def test_neox_parts_round_trip(tmp_path: Path, ck: ModuleType) -> None:
    tensors = ck.neox_names(ck.neox_state(2))
    for i in (1, 2, 3):
        run_part(NeoXWriter(tmp_path / "out", yaml_config={"num-layers": 2}, tp=2, parts=(i, 3)), tensors)
    with pytest.raises(ConversionError, match="not a hf plan"):
        HFWriter.finalize_parts(tmp_path / "out")
    NeoXWriter.finalize_parts(tmp_path / "out")
    back = NeoXCheckpoint(tmp_path / "out")
    assert back.tp == 2 and back.config_files
    ck.assert_same_tensors(ck.read_all(back), tensors)


def test_finalize_refuses_an_existing_output_unless_forced(tmp_path: Path) -> None:
    for i in (1, 2):
        run_part(hf(tmp_path / "out", (i, 2)), TENSORS)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old").write_text("x")
    with pytest.raises(ConversionError, match="already exists"):
        HFWriter.finalize_parts(tmp_path / "out")
    HFWriter.finalize_parts(tmp_path / "out", force=True)
    assert not (tmp_path / "out" / "old").exists()
