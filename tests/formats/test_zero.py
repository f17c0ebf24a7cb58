"""MasterWeights: the fp32 masters of DeepSpeed's ZeRO/bf16 optimizer shards, as a NeoX source.

Runs are built by ``mapper.testing.zero.write_zero_run`` from synthetic fp32 weights, laid out as
DeepSpeed lays them out (several DP ranks, TP 1 and 2, pipeline stages, padding at partition
ends, both NeoX layouts); the module weights are the masters' bf16/fp16 rounding.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

import mapper
from mapper.errors import CheckpointError
from mapper.formats import NeoXCheckpoint
from mapper.formats import zero as zero_format
from mapper.formats.file_ranges import FileRange
from mapper.formats.zero import MasterWeights, has_optimizer_shards, open_master_weights, optim_file_name
from mapper.testing import SHIPPED_RULE_SET
from mapper.tensors import TensorMeta
from mapper.testing.zero import ZeroRun, write_zero_run

CASES: dict[str, dict[str, Any]] = {
    "bf16 optimizer, TP 1, pipeline": dict(variant_name="te-full", tp=1, dp=3, optimizer="bf16"),
    "bf16 optimizer, TP 2, sequential, rotary buffers": dict(
        variant_name="te-full", tp=2, dp=5, layout="sequential", optimizer="bf16", rotary_inv_freq=True),
    "ZeRO-1, TP 2, 2 pipeline stages, tied embedding": dict(
        variant_name="neox-new", tp=2, dp=3, pp=2, optimizer="zero1"),
    "ZeRO-2 round robin, fp16, TP 2, GQA": dict(
        variant_name="llama-new", tp=2, dp=7, optimizer="zero2", round_robin=True, precision="fp16"),
    "ZeRO-2, TP 1, sequential, one param group": dict(
        variant_name="neox-legacy", tp=1, dp=4, layout="sequential", optimizer="zero2", weight_decay=False),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ZeroRun]:
    root = tmp_path_factory.mktemp("zero")
    return {name: write_zero_run(root=root / f"run{i}", **case) for i, (name, case) in enumerate(CASES.items())}


def read_all(reader: MasterWeights) -> dict[str, torch.Tensor]:
    return {key: reader.get(key) for key in reader.manifest()}


@pytest.mark.parametrize("case", list(CASES))
def test_every_master_is_read_back_exactly_and_the_rest_as_saved(runs: dict[str, ZeroRun], case: str) -> None:
    run = runs[case]
    with open_master_weights(run.root) as reader:
        manifest = reader.manifest()
        tensors = read_all(reader)
    assert list(manifest) == list(NeoXCheckpoint(run.root).manifest())
    assert {k for k in manifest if reader.is_master(k)} == set(run.masters)
    for key, tensor in tensors.items():
        if key in run.masters:
            assert manifest[key] == TensorMeta(tuple(run.masters[key].shape), torch.float32)
            assert tensor.dtype == torch.float32 and torch.equal(tensor, run.masters[key]), key
        else:  # _extra_state, buffers: no master copy
            assert manifest[key].dtype == run.module[key].dtype and torch.equal(tensor, run.module[key]), key


def test_the_cases_cover_padding_and_parameters_split_across_dp_ranks(runs: dict[str, ZeroRun]) -> None:
    for name, run in runs.items():
        with open_master_weights(run.root) as reader:
            split = [k for k in run.masters if len(reader.master_location(k)) > 1]
            assert split, f"{name}: no parameter spans two DP parts"
    assert sum(padding > 0 for run in runs.values() for padding in run.paddings.values()) >= 8
    padded = [name for name, run in runs.items() if any(run.paddings.values())]
    assert {"bf16 optimizer, TP 2, sequential, rotary buffers", "ZeRO-1, TP 2, 2 pipeline stages, tied embedding",
            "ZeRO-2 round robin, fp16, TP 2, GQA"} <= set(padded)


@pytest.mark.parametrize("case", list(CASES))
def test_the_module_weights_are_the_masters_rounding(runs: dict[str, ZeroRun], case: str) -> None:
    run = runs[case]
    low = torch.bfloat16 if CASES[case].get("precision", "bfloat16") == "bfloat16" else torch.float16
    with open_master_weights(run.root) as reader:
        for key, master in run.masters.items():
            weight = reader.module.get(key)
            assert weight.dtype == low and torch.equal(weight, master.to(low)), key
    rounded_away = sum(int((m.to(low).float() != m).sum()) for m in run.masters.values())
    assert rounded_away > 0.9 * sum(m.numel() for m in run.masters.values())  # the masters carry more


def test_the_tied_embedding_of_the_last_pipeline_stage_is_a_noted_copy(runs: dict[str, ZeroRun]) -> None:
    run = runs["ZeRO-1, TP 2, 2 pipeline stages, tied embedding"]
    with open_master_weights(run.root) as reader:
        assert (reader.pp, reader.tp, reader.dp) == (2, 2, 3)
        assert any("tied_modules.embed.word_embeddings.weight (model-parallel rank 2)" in n for n in reader.notes)
        assert reader.master_location("layer_00.word_embeddings.weight@rank1")[0][0].name == (
            "bf16_zero_pp_rank_0_mp_rank_01_optim_states.pt")


def test_tensors_without_a_master_are_named_in_the_notes(runs: dict[str, ZeroRun]) -> None:
    with open_master_weights(runs["bf16 optimizer, TP 2, sequential, rotary buffers"].root) as reader:
        notes = "\n".join(reader.notes)
    assert "TE FP8 metadata (_extra_state), not a parameter: layer_02.attention" in notes
    assert "buffers, not parameters: layer_02.attention.rotary_embeddings.inv_freq@rank0" in notes
    assert "BF16_Optimizer, DeepSpeed 0.16.5; 5 DP ranks, 2 TP rank(s)" in notes
    assert "ignored" not in notes  # the optimizer files are read, not ignored


@pytest.mark.parametrize("case", ["ZeRO-1, TP 2, 2 pipeline stages, tied embedding", "bf16 optimizer, TP 1, pipeline",
                                  "ZeRO-2 round robin, fp16, TP 2, GQA"])
def test_the_shipped_rule_sets_convert_the_masters_unchanged(runs: dict[str, ZeroRun], case: str) -> None:
    run = runs[case]
    rules = mapper.load_rules(SHIPPED_RULE_SET[CASES[case]["variant_name"]])
    fp32 = {key: run.masters.get(key, tensor) for key, tensor in run.module.items()}
    expected = mapper.convert(rules, fp32, run.config.rule_parameters()).tensors
    with open_master_weights(run.root) as reader:
        found = mapper.convert(rules, reader, run.config.rule_parameters()).tensors
    assert expected is not None and found is not None and found.keys() == expected.keys()
    for key, tensor in expected.items():
        assert found[key].dtype == tensor.dtype and torch.equal(found[key], tensor), key
    assert any(t.dtype == torch.float32 and t.dim() == 2 for t in found.values())


def test_reading_uses_byte_ranges_and_keeps_no_optimizer_pages(tmp_path: Path) -> None:
    run = write_zero_run("te-full", tmp_path / "big", dp=2, num_layers=4, hidden_size=256, num_heads=4,
                         num_kv_heads=4)
    flat_bytes = sum(t.nbytes for t in run.masters.values())
    largest = max(t.nbytes for t in run.masters.values())
    assert flat_bytes > 10 * largest
    resident = []
    with open_master_weights(run.root) as reader:
        for index, key in enumerate(reader.manifest()):
            tensor = reader.get(key)
            if key in run.masters:
                assert torch.equal(tensor, run.masters[key])
            del tensor
            if index % 8 == 0:  # pages touched through a map would stay until it closes
                resident.append(_resident_bytes(run.folder, "_optim_states.pt"))
        resident.append(_resident_bytes(run.folder, "_optim_states.pt"))
    if resident[0] < 0:
        pytest.skip("no /proc/self/smaps on this system")
    assert max(resident) <= largest // 2  # the maps' pages are never touched: reads go by offset


def test_a_file_whose_parts_cannot_be_placed_is_read_through_its_map(
    runs: dict[str, ZeroRun], monkeypatch: pytest.MonkeyPatch
) -> None:
    run = runs["ZeRO-1, TP 2, 2 pipeline stages, tied embedding"]
    monkeypatch.setattr("mapper.formats.file_ranges.verified_base", lambda *args: None)
    with open_master_weights(run.root) as reader:
        for key, master in run.masters.items():
            assert torch.equal(reader.get(key), master), key


def test_after_close_the_files_are_mapped_again_on_demand(runs: dict[str, ZeroRun]) -> None:
    run = runs["bf16 optimizer, TP 1, pipeline"]
    reader = open_master_weights(run.root)
    key = next(iter(run.masters))
    reader.close()
    assert torch.equal(reader.get(key), run.masters[key])


def test_has_optimizer_shards(runs: dict[str, ZeroRun], tmp_path: Path) -> None:
    assert has_optimizer_shards(runs["bf16 optimizer, TP 1, pipeline"].root)
    bare = _copy(runs["bf16 optimizer, TP 1, pipeline"], tmp_path)
    for file in bare.folder.glob("*_optim_states.pt"):
        file.unlink()
    assert not has_optimizer_shards(bare.root)


# ---- refusals ------------------------------------------------------------------------------


def _copy(run: ZeroRun, tmp_path: Path) -> ZeroRun:
    root = tmp_path / "copy"
    shutil.copytree(run.root, root)
    return ZeroRun(root, run.config, run.masters, run.module, run.paddings,
                   [root / f.relative_to(run.root) for f in run.optimizer_files])


def _refused(path: Path, *parts: str) -> CheckpointError:
    with pytest.raises(CheckpointError) as info:
        open_master_weights(path)
    text = str(info.value)
    for part in parts:
        assert part in text, text
    assert info.value.hint
    return info.value


def test_no_optimizer_files_is_refused_with_the_way_out(runs: dict[str, ZeroRun], tmp_path: Path) -> None:
    run = _copy(runs["bf16 optimizer, TP 1, pipeline"], tmp_path)
    for file in run.optimizer_files:
        file.unlink()
    error = _refused(run.root, "no ZeRO optimizer shards", str(run.folder))
    assert "convert the module weights" in (error.hint or "")


def test_a_missing_dp_rank_is_refused_naming_its_file(runs: dict[str, ZeroRun], tmp_path: Path) -> None:
    run = _copy(runs["ZeRO-2 round robin, fp16, TP 2, GQA"], tmp_path)
    (run.folder / optim_file_name(4, 1, bf16=False)).unlink()
    _refused(run.root, "DP ranks [4] have no optimizer file for model-parallel rank 1",
             str(run.folder / "zero_pp_rank_4_mp_rank_01_optim_states.pt"))


def test_a_missing_model_parallel_rank_is_refused(runs: dict[str, ZeroRun], tmp_path: Path) -> None:
    run = _copy(runs["ZeRO-1, TP 2, 2 pipeline stages, tied embedding"], tmp_path)
    for file in run.folder.glob("*_mp_rank_02_optim_states.pt"):
        file.unlink()
    _refused(run.root, "model-parallel ranks [2] have no optimizer files", "zero_pp_rank_0_mp_rank_02")


def test_a_missing_model_state_file_is_refused(runs: dict[str, ZeroRun], tmp_path: Path) -> None:
    run = _copy(runs["ZeRO-1, TP 2, 2 pipeline stages, tied embedding"], tmp_path)
    (run.folder / "mp_rank_03_model_states.pt").unlink()
    _refused(run.root, "mp_rank_03_model_states.pt", "no model-state file")


@pytest.mark.parametrize("name", ["zero_pp_rank_0_mp_rank_00_model_states.pt",
                                  "bf16_zero_pp_rank_1_mp_rank_00_model_states.pt"])
def test_zero_stage_3_model_states_are_refused(runs: dict[str, ZeroRun], tmp_path: Path, name: str) -> None:
    run = _copy(runs["bf16 optimizer, TP 1, pipeline"], tmp_path)
    torch.save({"module": None}, run.folder / name)
    error = _refused(run.root, "ZeRO stage 3", name)
    assert "zero_to_fp32.py" in (error.hint or "")


@pytest.mark.parametrize("edit", [
    lambda state: state.update(zero_stage=3),
    lambda state: state.update(fp32_flat_groups=state["single_partition_of_fp32_groups"]),
], ids=["zero_stage 3", "fp32_flat_groups"])
def test_zero_stage_3_optimizer_states_are_refused(tmp_path: Path, edit: Any) -> None:
    run = write_zero_run("neox-new", tmp_path / "z3", dp=2, optimizer="zero1",
                         edit=lambda mp, dp, state: edit(state))
    _refused(run.root, "ZeRO stage 3", "zero_pp_rank_0_mp_rank_00_optim_states.pt")


@pytest.mark.parametrize("version, message", [
    ("0.6.7", "written by DeepSpeed 0.6.7"),
    ("1.0.0", "written by DeepSpeed 1.0.0"),
    (None, "no DeepSpeed version"),
])
def test_unknown_deepspeed_versions_are_refused(tmp_path: Path, version: str | None, message: str) -> None:
    run = write_zero_run("neox-new", tmp_path / "old", dp=2, ds_version=version)
    error = _refused(run.root, message, "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt")
    assert "0.7.0" in str(error) or "0.7" in (error.hint or "")


def test_a_newer_0x_version_is_read_with_a_note(tmp_path: Path) -> None:
    run = write_zero_run("neox-new", tmp_path / "new", dp=2, ds_version="0.18.1+abc")
    with open_master_weights(run.root) as reader:
        assert any("DeepSpeed 0.18.1+abc, newer than the 0.16.5" in note for note in reader.notes)
        assert all(torch.equal(reader.get(k), m) for k, m in run.masters.items())


@pytest.mark.parametrize("optimizer", ["bf16", "zero1"])
def test_sizes_that_do_not_add_up_are_refused(tmp_path: Path, optimizer: str) -> None:
    def edit(mp: int, dp: int, state: dict[str, Any]) -> None:
        if dp == 1:
            parts = state["single_partition_of_fp32_groups"]
            parts[0] = parts[0][:-2]

    run = write_zero_run("neox-new", tmp_path / optimizer, dp=2, optimizer=optimizer, edit=edit)
    _refused(run.root, "param group 0: sizes do not add up", "mp_rank_00_model_states.pt",
             "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt")


@pytest.mark.parametrize("other, message", [
    (dict(variant_name="te-full", hidden_size=32), "the module weight layer_00.word_embeddings.weight@rank0 is"),
    (dict(variant_name="neox-new"), "lists '2.attention.query_key_value.weight', but the module weights have no"),
], ids=["other shapes", "other names"])
def test_model_states_of_another_model_are_refused(tmp_path: Path, other: dict[str, Any], message: str) -> None:
    run = write_zero_run("te-full", tmp_path / "this", dp=2)
    donor = write_zero_run(root=tmp_path / "other", dp=2, **other)
    for file in run.folder.glob("*_optim_states.pt"):
        file.unlink()
    for file in [*donor.optimizer_files, donor.folder / "mp_rank_00_model_states.pt"]:
        shutil.copy(file, run.folder / file.name)
    _refused(run.root, message, "mp_rank_00_model_states.pt")


def test_moe_groups_over_different_dp_sizes_are_refused(tmp_path: Path) -> None:
    run = write_zero_run("neox-new", tmp_path / "moe", dp=2,
                         edit=lambda mp, dp, state: state.update(partition_count=[2, 4]))
    _refused(run.root, "MoE", "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt")


def test_fp16_masters_are_not_fp32_masters(tmp_path: Path) -> None:
    def edit(mp: int, dp: int, state: dict[str, Any]) -> None:
        state["single_partition_of_fp32_groups"] = [p.detach().half() for p in state["single_partition_of_fp32_groups"]]

    run = write_zero_run("neox-new", tmp_path / "half", dp=2, optimizer="zero1", edit=edit)
    _refused(run.root, "torch.float16", "expected a flat float32 tensor")


def test_optimizer_files_of_another_save_are_refused_by_the_rounding_check(tmp_path: Path) -> None:
    run = write_zero_run("te-full", tmp_path / "this", tp=2, dp=2)
    other = write_zero_run("te-full", tmp_path / "other", tp=2, dp=2, seed=1)
    for file in other.optimizer_files:
        shutil.copy(file, run.folder / file.name)
    with pytest.raises(CheckpointError) as info:  # already when opening: one master per file
        open_master_weights(run.root)
    assert "does not round to the module weight" in str(info.value)
    key = "layer_02.attention.qkv.weight@rank1"
    with open_master_weights(run.root, check_rounding=False) as reader:  # on request: read as is
        assert torch.equal(reader.get(key), other.masters[key])
        reader.check_rounding = True
        with pytest.raises(CheckpointError) as info:  # and by every get
            reader.get(key)
    text = str(info.value)
    assert key in text and "does not round to the module weight" in text
    assert "layer_02-model_01-model_states.pt" in text and "bf16_zero_pp_rank_0_mp_rank_01" in text
    assert "another save" in (info.value.hint or "")


def test_one_swapped_dp_file_is_found_when_opening(tmp_path: Path) -> None:
    run = write_zero_run("neox-new", tmp_path / "this", dp=3)
    other = write_zero_run("neox-new", tmp_path / "other", dp=3, seed=1)
    shutil.copy(other.optimizer_files[2], run.optimizer_files[2])
    _refused(run.root, "does not round to the module weight", run.optimizer_files[2].name)


def test_the_rounding_check_allows_one_step_of_the_module_dtype_not_more() -> None:
    generator = torch.Generator().manual_seed(0)
    master = torch.cat([torch.randn(1000, generator=generator) * 10.0 ** torch.randint(-30, 30, (1000,), generator=generator),
                        torch.tensor([0.0, -0.0, 1e-40, float("inf"), float("-inf"), float("nan")])])
    nearest = master.to(torch.bfloat16)
    assert zero_format._rounding_mismatch(master, nearest) is None
    truncated = (master.view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)  # toward zero
    assert not torch.equal(truncated[:1000], nearest[:1000])
    assert zero_format._rounding_mismatch(master, truncated) is None  # another rounding mode
    two_steps = nearest.clone()
    two_steps.view(torch.int16)[7] += 2
    found = zero_format._rounding_mismatch(master, two_steps)
    assert found is not None and found[0] == 1 and found[2] == master[7].item()
    assert zero_format._rounding_mismatch(master, nearest.float()) is not None  # fp32 weights: exact only


def test_the_rounding_check_runs_block_by_block_and_counts_across_blocks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Large tensors are compared a block at a time (the module weight read from its file into one
    buffer); what is off is counted over all blocks, and the worst element named."""
    monkeypatch.setattr(zero_format, "ROUNDING_BLOCK", 100)
    generator = torch.Generator().manual_seed(0)
    master = torch.randn(64, 16, generator=generator)
    nearest = master.to(torch.bfloat16)
    path = tmp_path / "weight.bin"
    path.write_bytes(b"x" * 10 + nearest.view(torch.uint8).numpy().tobytes())
    monkeypatch.setattr(zero_format, "mapped_range", lambda t: FileRange(path, 10, t.nbytes))
    assert zero_format._blockwise_mismatch(master, nearest) is None
    off = nearest.clone()
    off.view(-1).view(torch.int16)[[3, 150, 999]] += torch.tensor([2, 5, 3], dtype=torch.int16)  # three blocks
    path.write_bytes(b"x" * 10 + off.view(torch.uint8).numpy().tobytes())
    found = zero_format._blockwise_mismatch(master, nearest)
    assert found is not None and found[0] == 3
    assert found == zero_format._rounding_mismatch(master, off)  # the same answer as all at once


def test_an_unknown_optimizer_file_name_is_refused(runs: dict[str, ZeroRun], tmp_path: Path) -> None:
    run = _copy(runs["bf16 optimizer, TP 1, pipeline"], tmp_path)
    torch.save({}, run.folder / "expp_rank_0_mp_rank_00_optim_states.pt")
    _refused(run.root, "an optimizer file mapper does not know", "expp_rank_0_mp_rank_00_optim_states.pt")


def test_legacy_non_zip_optimizer_files_are_refused(runs: dict[str, ZeroRun], tmp_path: Path) -> None:
    run = _copy(runs["bf16 optimizer, TP 1, pipeline"], tmp_path)
    torch.save({"optimizer_state_dict": {}}, run.optimizer_files[1], _use_new_zipfile_serialization=False)
    _refused(run.root, "legacy (pre-1.6, non-zip) format", run.optimizer_files[1].name)


def _resident_bytes(folder: Path, suffix: str) -> int:
    """Bytes of ``folder``'s files ending in ``suffix`` resident in this process's maps (-1: unknown)."""
    try:
        lines = Path("/proc/self/smaps").read_text().splitlines()
    except OSError:
        return -1
    total, inside = 0, False
    for line in lines:
        first = line.split(None, 1)[0]
        if "-" in first and not first.endswith(":"):
            inside = str(folder) in line and line.rstrip().endswith(suffix)
        elif inside and first == "Rss:":
            total += int(line.split()[1]) * 1024
    return total


def test_the_readme_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    found = re.search(r"### fp32 master weights from the optimizer shards\n.*?```python\n(.*?)```", readme, re.S)
    assert found is not None
    monkeypatch.chdir(tmp_path)
    exec(compile(found.group(1), "README.md", "exec"), {})  # noqa: S102 -- our own documentation
