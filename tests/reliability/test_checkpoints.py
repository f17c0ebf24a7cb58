"""Broken checkpoints, converted with `mapper convert` as a user would.

NeoX checkpoints are synthetic TP=2 saves in the layouts DeepSpeed writes (``layer_XX-model_YY``
files plus ``mp_rank`` training state); HF folders are mapper's own conversions of them. Each
test breaks one thing and checks the refusal: exit code 2, the exact error class, one message
naming the file / key / rule with a fix, no traceback, nothing written, the input untouched.
(Pickles that would run code are in test_processes.py: they are refused in a real process.)
"""

from __future__ import annotations

import datetime
import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from _reliability import (
    Tensors,
    assert_nothing_left,
    assert_refusal,
    edit_safetensors,
    edit_torch_file,
    layer_file,
    load_safetensors,
    neox_checkpoint,
    read_safetensors_header,
    run_cli,
    snapshot,
    tag_folder,
    write_safetensors_raw,
)

from mapper.errors import CheckpointError, CompileError, ConversionError, MapperError, UnsafeCheckpointError
from mapper.formats import NeoXCheckpoint


def refused_without_trace(args: list[object], cls: type[MapperError], out: Path, source: Path, **expect: object) -> None:
    """The refusal contract, plus: no output, no staging, the source unchanged."""
    before = snapshot(source) if source.is_dir() else None
    assert_refusal(args, cls, **expect)  # type: ignore[arg-type]
    assert_nothing_left(out, out.parent)
    if before is not None:
        assert snapshot(source) == before


# --- NeoX: keys, shapes, dtypes --------------------------------------------------------------------
def test_a_tensor_no_rule_consumes_is_refused_and_named(tmp_path: Path, out: Path) -> None:
    def add_mystery(t: Tensors) -> None:
        for r in range(2):
            t[f"layer_02.mlp.mystery.weight@rank{r}"] = torch.zeros(3)

    neox = neox_checkpoint(tmp_path / "neox", tp=2, mutate=add_mystery)
    refused_without_trace(
        ["convert", neox, out, "--rules", "neox-to-hf-gpt-neox"], CompileError, out, neox,
        names=["layer_02.mlp.mystery.weight@rank0", "layer_02.mlp.mystery.weight@rank1"], says=["no rule consumes"],
    )
    # without --rules, detection finds no rule set and says why, naming the same key
    refused_without_trace(
        ["convert", neox, out], MapperError, out, neox,
        names=["layer_02.mlp.mystery.weight@rank0", "neox-to-hf-gpt-neox"], says=["no shipped rule set fits"],
    )


def test_a_missing_tensor_is_refused_naming_the_key_and_the_rule(tmp_path: Path, out: Path) -> None:
    neox = neox_checkpoint(tmp_path / "neox", tp=2, mutate=lambda t: t.pop("layer_03.mlp.linear2.weight@rank1"))
    refused_without_trace(
        ["convert", neox, out, "--rules", "neox-to-hf-gpt-neox"], CompileError, out, neox,
        names=["layer_03.mlp.linear2.weight@rank1", "gpt-neox-names-mlp#1", "names-mlp.yaml"], says=["missing"],
    )


def test_shards_of_different_shapes_are_refused(tmp_path: Path, out: Path) -> None:
    def shorten(t: Tensors) -> None:
        t["layer_03.mlp.linear1.weight@rank1"] = t["layer_03.mlp.linear1.weight@rank1"][:-1]

    neox = neox_checkpoint(tmp_path / "neox", tp=2, mutate=shorten)
    refused_without_trace(
        ["convert", neox, out, "--rules", "neox-to-hf-gpt-neox"], CompileError, out, neox,
        names=["gpt_neox.layers.1.mlp.dense_h_to_4h.weight@rank1", "gpt-neox-tp-merge#0"],
        says=["part sizes [128, 127]"],
    )


def test_a_tensor_of_the_wrong_size_for_the_model_is_refused(tmp_path: Path, out: Path) -> None:
    def widen(t: Tensors) -> None:
        for r in range(2):
            t[f"layer_05.norm.weight@rank{r}"] = torch.ones(65)

    neox = neox_checkpoint(tmp_path / "neox", tp=2, mutate=widen)
    refused_without_trace(
        ["convert", neox, out], CompileError, out, neox,
        names=["gpt_neox.final_layer_norm.weight", "gpt-neox-names-norms#1"], says=["expects [64]"],
    )


def test_shards_of_different_dtypes_are_refused(tmp_path: Path, out: Path) -> None:
    def half(t: Tensors) -> None:
        t["layer_03.mlp.linear1.weight@rank1"] = t["layer_03.mlp.linear1.weight@rank1"].half()

    neox = neox_checkpoint(tmp_path / "neox", tp=2, mutate=half)
    refused_without_trace(
        ["convert", neox, out, "--rules", "neox-to-hf-gpt-neox"], CompileError, out, neox,
        names=["gpt_neox.layers.1.mlp.dense_h_to_4h.weight@rank1"], says=["float32[128, 64] and float16[128, 64]"],
    )


def test_legacy_and_new_names_mixed_in_one_checkpoint_are_refused(tmp_path: Path, out: Path) -> None:
    """Layer 3 saved by an older NeoX (mlp.dense_h_to_4h), the rest with mlp.linear1."""
    def mix(t: Tensors) -> None:
        for key in [k for k in t if k.startswith("layer_03.mlp.linear1.")]:
            t[key.replace("linear1", "dense_h_to_4h")] = t.pop(key)

    neox = neox_checkpoint(tmp_path / "neox", tp=2, mutate=mix)
    refused_without_trace(
        ["convert", neox, out], MapperError, out, neox,
        names=["neox-to-hf-gpt-neox", "neox-legacy-to-hf-gpt-neox", "layer_03.mlp.linear1.bias@rank0",
               "layer_02.mlp.dense_h_to_4h.bias@rank0"],
        says=["no shipped rule set fits"],
    )
    refused_without_trace(
        ["convert", neox, out, "--rules", "neox-to-hf-gpt-neox"], CompileError, out, neox,
        names=["layer_03.mlp.dense_h_to_4h.{bias,weight}@rank*", "gpt-neox-names-mlp#0"], says=["no rule consumes", "missing"],
    )


def test_a_rule_set_for_another_architecture_is_refused(neox: Path, out: Path) -> None:
    refused_without_trace(
        ["convert", neox, out, "--rules", "neox-llama-to-hf-llama"], MapperError, out, neox,
        names=["neox-llama-to-hf-llama"], says=["is for another model", "norm: 'layernorm'", "--force-rules"],
    )


def test_a_rule_set_for_another_architecture_forced_is_still_refused_by_the_keys(neox: Path, out: Path) -> None:
    refused_without_trace(
        ["convert", neox, out, "--rules", "neox-llama-to-hf-llama", "--force-rules"], CompileError, out, neox,
        names=["layer_05.norm.bias@rank0"], says=["no rule consumes"],
    )


# --- NeoX: replicated tensors -------------------------------------------------------------------
def _differing_norm(t: Tensors) -> None:
    t["layer_02.input_layernorm.weight@rank1"] = t["layer_02.input_layernorm.weight@rank1"] + 1e-3


def test_replicated_tensors_that_differ_across_ranks_are_refused(tmp_path: Path, out: Path) -> None:
    neox = neox_checkpoint(tmp_path / "neox", tp=2, mutate=_differing_norm)
    refused_without_trace(
        ["convert", neox, out], ConversionError, out, neox,
        names=["layer_02.input_layernorm.weight@rank1"], says=["differ", "--average-replicas"],
    )


def test_average_replicas_accepts_replicated_tensors_that_differ(tmp_path: Path, out: Path) -> None:
    neox = neox_checkpoint(tmp_path / "neox", tp=2, mutate=_differing_norm)
    outcome = run_cli(["convert", neox, out, "--average-replicas"])
    assert outcome.code == 0, outcome.stderr
    norm = load_safetensors(out / "model.safetensors")["gpt_neox.layers.0.input_layernorm.weight"]
    state = torch.load(layer_file(neox, 2, 0)), torch.load(layer_file(neox, 2, 1))
    expected = (state[0]["input_layernorm.weight"] + state[1]["input_layernorm.weight"]) / 2
    torch.testing.assert_close(norm, expected)


# --- NeoX: files and folders ----------------------------------------------------------------------
def test_a_missing_tp_rank_file_is_refused_naming_it(neox: Path, out: Path) -> None:
    layer_file(neox, 3, 1).unlink()
    refused_without_trace(
        ["convert", neox, out], CheckpointError, out, neox,
        names=["layer_03-model_01-model_states.pt"], says=["no file for TP rank(s) [1]", "copy the missing file"],
    )


def test_a_missing_mp_rank_file_of_a_sequential_checkpoint_is_refused_naming_it(tmp_path: Path, out: Path) -> None:
    """Sequential layout: rank 1's only file is gone. Read as is, the checkpoint looks like a TP=1
    model of half the width; the saved config (model-parallel-size 2) gives it away."""
    neox = neox_checkpoint(tmp_path / "neox", tp=2, layout="sequential")
    (tag_folder(neox) / "mp_rank_01_model_states.pt").unlink()
    refused_without_trace(
        ["convert", neox, out], CheckpointError, out, neox,
        names=["mp_rank_01_model_states.pt"], says=["model-parallel-size 2", "copy the files of every TP rank"],
    )


def test_a_checkpoint_without_any_config_asks_for_config_and_then_converts(
    tmp_path: Path, neox: Path, out: Path
) -> None:
    config = tmp_path / "model.yml"
    shutil.move(tag_folder(neox) / "configs" / "model.yml", config)
    refused_without_trace(
        ["convert", neox, out], MapperError, out, neox,
        names=[tag_folder(neox)], says=["needs the NeoX model config", "--config"],
    )
    outcome = run_cli(["convert", neox, out, "--config", config])
    assert outcome.code == 0, outcome.stderr
    assert (out / "config.json").is_file()


def test_a_latest_file_naming_a_missing_tag_is_refused(neox: Path, out: Path) -> None:
    (neox / "latest").write_text("global_step999")
    refused_without_trace(
        ["convert", neox, out], CheckpointError, out, neox,
        names=[neox / "latest", "global_step999"], says=["no folder", "pass the tag folder"],
    )


def test_a_latest_file_pointing_outside_the_checkpoint_is_refused(neox: Path, out: Path) -> None:
    (neox / "latest").write_text("../../etc")
    refused_without_trace(
        ["convert", neox, out], CheckpointError, out, neox,
        names=[neox / "latest", "'../../etc'"], says=["not a folder name beside it"],
    )


def test_several_tag_folders_without_latest_are_refused(neox: Path, out: Path) -> None:
    shutil.copytree(tag_folder(neox), neox / "global_step200")
    (neox / "latest").unlink()
    refused_without_trace(
        ["convert", neox, out], CheckpointError, out, neox,
        names=[neox, "global_step100", "global_step200"], says=["no 'latest' file", "pass the tag folder"],
    )


def test_a_folder_that_is_neither_format_is_refused_saying_what_was_looked_for(tmp_path: Path, out: Path) -> None:
    folder = tmp_path / "downloads"
    folder.mkdir()
    (folder / "README.md").write_text("weights are on the other disk\n")
    (folder / "tokenizer.json").write_text("{}")
    refused_without_trace(
        ["convert", folder, out], CheckpointError, out, folder,
        names=[folder], says=["neither a HuggingFace nor a NeoX checkpoint", "model.safetensors", "mp_rank_YY_model_states.pt"],
    )


def test_a_source_that_does_not_exist_is_refused(tmp_path: Path, out: Path) -> None:
    refused_without_trace(
        ["convert", tmp_path / "chekpoint", out], CheckpointError, out, tmp_path / "chekpoint",
        names=[tmp_path / "chekpoint"], says=["no such file or folder"],
    )


def test_a_file_given_as_the_checkpoint_is_refused(neox: Path, out: Path) -> None:
    file = layer_file(neox, 2)
    refused_without_trace(
        ["convert", file, out], CheckpointError, out, neox,
        names=[file], says=["not a file", "folder"],
    )


def test_an_unknown_weights_file_in_the_tag_folder_is_refused(neox: Path, out: Path) -> None:
    stray = tag_folder(neox) / "extra_embeddings.pt"
    torch.save({"weight": torch.zeros(2)}, stray)
    refused_without_trace(
        ["convert", neox, out], CheckpointError, out, neox,
        names=[stray], says=["unknown file", "may hold weights"],
    )


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_a_truncated_layer_file_is_refused_naming_it(neox: Path, out: Path, legacy: bool) -> None:
    file = layer_file(neox, 3, 1)
    if legacy:
        edit_torch_file(file, lambda state: None, legacy=True)
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    refused_without_trace(
        ["convert", neox, out], CheckpointError, out, neox,
        names=[file], says=["truncated or corrupt", "copy it again"],
    )


# --- NeoX: pickled content -----------------------------------------------------------------------
OLD_TE_FP8_META = b"\x80\x02}q\x00(X\x05\x00\x00\x00scaleq\x01K\x01u."  # a nested pickle: kept as bytes, never run


def _old_te_extra_state(state: dict[str, object]) -> None:
    state["attention.qkv._extra_state"] = io.BytesIO(OLD_TE_FP8_META)


def test_an_old_style_bytesio_extra_state_is_allowed_and_converts_exactly(tmp_path: Path, out: Path) -> None:
    neox = neox_checkpoint(tmp_path / "neox", "te-mha", tp=1)
    edit_torch_file(layer_file(neox, 2), _old_te_extra_state)
    outcome = run_cli(["convert", neox, out])
    assert outcome.code == 0, outcome.stderr
    assert (out / "mapper" / "sidecar.safetensors").is_file()  # the non-empty FP8 metadata is kept there
    back = tmp_path / "back"
    assert run_cli(["convert", out, back]).code == 0
    restored = NeoXCheckpoint(back).get("layer_02.attention.qkv._extra_state@rank0")
    assert bytes(restored.numpy().tobytes()) == OLD_TE_FP8_META


def test_a_bytesio_next_to_a_disallowed_global_is_refused_and_names_the_global(tmp_path: Path, out: Path) -> None:
    neox = neox_checkpoint(tmp_path / "neox", "te-mha", tp=1)

    def edit(state: dict[str, object]) -> None:
        _old_te_extra_state(state)
        state["attention.proj._extra_state"] = datetime.datetime(2024, 5, 1)  # noqa: DTZ001

    edit_torch_file(layer_file(neox, 2), edit)
    refused_without_trace(
        ["convert", neox, out], UnsafeCheckpointError, out, neox,
        names=[layer_file(neox, 2), "datetime.datetime"], says=["refusing to load", "Nothing from the file was run"],
    )


def test_a_bytesio_outside_extra_state_is_refused(tmp_path: Path, out: Path) -> None:
    neox = neox_checkpoint(tmp_path / "neox", tp=1)
    edit_torch_file(layer_file(neox, 2), lambda s: s.__setitem__("attention.dense.weight", io.BytesIO(b"x")))
    refused_without_trace(
        ["convert", neox, out], UnsafeCheckpointError, out, neox,
        names=[layer_file(neox, 2), "'attention.dense.weight'"], says=["only accepted as the value of a '._extra_state' key"],
    )


# --- HF: safetensors, index, config -----------------------------------------------------------
def test_a_truncated_safetensors_file_is_refused_naming_the_file_and_tensor(hf: Path, out: Path) -> None:
    shard = hf / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])
    refused_without_trace(
        ["convert", hf, out], CheckpointError, out, hf,
        names=[shard, "gpt_neox.layers.1.mlp.dense_h_to_4h.weight"], says=["point past the end of the file", "truncated"],
    )


@pytest.mark.parametrize(
    ("lie", "says"),
    [
        (lambda o: [o[0], o[1] + 4], "span 260 bytes but a float32[64] tensor has 256"),
        (lambda o: [o[0] + 4, o[1] + 4], "leave a hole"),
        (lambda o: [o[0] - 4, o[1] - 4], "overlap tensor"),
    ],
    ids=["wrong-length", "hole", "overlap"],
)
def test_a_safetensors_header_whose_offsets_lie_is_refused(hf: Path, out: Path, lie: object, says: str) -> None:
    shard = hf / "model.safetensors"
    header, data = read_safetensors_header(shard)
    key = "gpt_neox.layers.0.attention.dense.bias"
    header[key]["data_offsets"] = lie(header[key]["data_offsets"])  # type: ignore[index, operator]
    write_safetensors_raw(shard, header, data)
    refused_without_trace(["convert", hf, out], CheckpointError, out, hf, names=[shard, key], says=[says])


def test_a_safetensors_length_prefix_beyond_the_file_is_refused(hf: Path, out: Path) -> None:
    shard = hf / "model.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[5] = 0x7F  # header length of ~2**46 bytes
    shard.write_bytes(bytes(raw))
    refused_without_trace(["convert", hf, out], CheckpointError, out, hf, names=[shard], says=["header length"])


def test_an_unknown_dtype_in_a_safetensors_header_is_refused(hf: Path, out: Path) -> None:
    shard = hf / "model.safetensors"
    header, data = read_safetensors_header(shard)
    header["gpt_neox.embed_in.weight"]["dtype"] = "F12"  # type: ignore[index]
    write_safetensors_raw(shard, header, data)
    refused_without_trace(
        ["convert", hf, out], CheckpointError, out, hf,
        names=[shard, "gpt_neox.embed_in.weight"], says=["unknown dtype 'F12'"],
    )


def _shard_with_index(hf: Path, weight_map: dict[str, str]) -> Path:
    (hf / "model.safetensors").rename(hf / "model-00001-of-00001.safetensors")
    index = hf / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


@pytest.mark.parametrize("outside", ["../secret.safetensors", "/etc/passwd", "sub/../../x.safetensors"])
def test_an_index_pointing_outside_its_folder_is_refused(hf: Path, out: Path, outside: str) -> None:
    keys = list(read_safetensors_header(hf / "model.safetensors")[0])
    shutil.copy(hf / "model.safetensors", hf.parent / "secret.safetensors")
    index = _shard_with_index(hf, {key: outside for key in keys if key != "__metadata__"})
    refused_without_trace(
        ["convert", hf, out], CheckpointError, out, hf,
        names=[index, repr(outside)], says=["outside the model folder", "plain names of files in the same folder"],
    )


def test_an_index_naming_a_missing_shard_is_refused(hf: Path, out: Path) -> None:
    keys = [k for k in read_safetensors_header(hf / "model.safetensors")[0] if k != "__metadata__"]
    index = _shard_with_index(
        hf, {**{k: "model-00001-of-00001.safetensors" for k in keys}, "embed_out.weight": "model-00002-of-00002.safetensors"}
    )
    refused_without_trace(
        ["convert", hf, out], CheckpointError, out, hf,
        names=[index, "model-00002-of-00002.safetensors"], says=["does not exist", "copy the missing shard"],
    )


def test_a_malformed_config_json_is_refused(hf: Path, out: Path) -> None:
    (hf / "config.json").write_text('{"model_type": "gpt_neox", "hidden_size": 64,}')
    refused_without_trace(["convert", hf, out], CheckpointError, out, hf, names=[hf / "config.json"], says=["cannot read this JSON"])


def test_an_unsupported_model_type_is_refused(hf: Path, out: Path) -> None:
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    refused_without_trace(
        ["convert", hf, out], CheckpointError, out, hf,
        names=[hf / "config.json", "'bert'"], says=["not supported", "gpt_neox and llama"],
    )


def test_an_hf_folder_without_config_json_is_refused(hf: Path, out: Path) -> None:
    (hf / "config.json").unlink()
    refused_without_trace(["convert", hf, out], CheckpointError, out, hf, names=[hf], says=["no config.json"])


def _foreign(hf: Path) -> Path:
    """The folder as another tool would have written it: no record of mapper's conversion."""
    for name in ("mapper/record.json", "mapper/rules.yaml", "mapper/neox-config.yaml", "mapper/sidecar.safetensors"):
        (hf / name).unlink(missing_ok=True)
    return hf


def test_a_foreign_hf_folder_needs_the_neox_variant_named(hf: Path, out: Path) -> None:
    _foreign(hf)
    refused_without_trace(
        ["convert", hf, out], MapperError, out, hf,
        names=[hf, "neox-to-hf-gpt-neox", "neox-te-to-hf-gpt-neox"], says=["several NeoX layouts", "--rules"],
    )
    assert run_cli(["convert", hf, out, "--rules", "neox-to-hf-gpt-neox"]).code == 0


def test_an_hf_tensor_no_rule_consumes_is_refused(hf: Path, out: Path) -> None:
    edit_safetensors(hf / "model.safetensors", lambda t: t.__setitem__("gpt_neox.layers.0.attention.bias", torch.ones(2)))
    refused_without_trace(
        ["convert", hf, out], CompileError, out, hf,
        names=["gpt_neox.layers.0.attention.bias"], says=["no rule consumes"],
    )


def test_a_missing_hf_tensor_is_refused(hf: Path, out: Path) -> None:
    edit_safetensors(hf / "model.safetensors", lambda t: t.pop("gpt_neox.layers.1.mlp.dense_4h_to_h.bias"))
    refused_without_trace(
        ["convert", hf, out], CompileError, out, hf,
        names=["gpt_neox.layers.1.mlp.dense_4h_to_h.bias", "gpt-neox-tp-merge#3"], says=["missing"],
    )


def test_an_hf_tensor_of_the_wrong_shape_is_refused(hf: Path, out: Path) -> None:
    key = "gpt_neox.layers.1.attention.query_key_value.weight"
    edit_safetensors(hf / "model.safetensors", lambda t: t.__setitem__(key, t[key][:-3]))
    refused_without_trace(["convert", hf, out], CompileError, out, hf, names=[key], says=["189"])
