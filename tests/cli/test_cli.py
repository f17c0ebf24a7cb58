"""The command line as a user meets it: help for every command, results, exit codes, no tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import click
import pytest
import typer
from safetensors.torch import load_file, save_file

from mapper.cli import app
from mapper.formats import NeoXCheckpoint, open_checkpoint
from mapper.keyfold import fold_keys
from mapper.resources import rules_dir
from mapper.testing import synthesize_variant, write_neox_checkpoint
from mapper.testing.cli import run_cli

COMMANDS = [
    [], ["convert"], ["finalize"], ["plan"], ["detect"], ["verify"], ["roundtrip"], ["diff"], ["demo"],
    ["rules"], ["rules", "list"], ["rules", "show"], ["rules", "validate"], ["rules", "schema"], ["rules", "new"],
    ["rules", "params"],
]



def tensor_count(folder: Path) -> int:
    with open_checkpoint(folder) as reader:
        return len(reader.manifest())


@pytest.fixture(scope="module")
def te_checkpoint(tmp_path_factory) -> Path:
    config, tensors = synthesize_variant("te-full", tp=2)
    return write_neox_checkpoint(tensors, config, tmp_path_factory.mktemp("ckpt") / "neox")


def click_command(path: list[str]) -> click.Command:
    command = typer.main.get_command(app)
    for name in path:
        command = command.get_command(click.Context(command), name)  # type: ignore[attr-defined]
    return command


@pytest.mark.parametrize("command", COMMANDS, ids=[" ".join(c) or "mapper" for c in COMMANDS])
def test_every_command_has_help(command):
    """``--help`` shows the command's own description and every option it takes (a group: its commands)."""
    code, out, _ = run_cli([*command, "--help"])
    ours = click_command(command)
    flat = " ".join(out.replace("│", " ").split())
    assert code == 0 and " ".join((ours.help or "").split()[:6]) in flat
    options = [name for param in ours.params for name in param.opts if name.startswith("--")]
    subcommands = [c[-1] for c in COMMANDS if len(c) == len(command) + 1 and c[: len(command)] == command]
    assert [name for name in options + subcommands if name not in out] == []


def test_the_console_script_runs(te_checkpoint):
    done = subprocess.run([sys.executable, "-m", "mapper.cli", "detect", str(te_checkpoint)], capture_output=True, text=True)
    assert done.returncode == 0 and "neox-to-hf-gpt-neox" in done.stdout
    assert "switches: te_norm=off, te_mha=on, te_layernorm_mlp=on" in done.stdout
    applies, off = done.stdout.split("parts that apply:")[1].split("parts switched off:")
    assert "fragments/gpt-neox/names-mlp-te.yaml" in applies and "fragments/gpt-neox/names-mlp.yaml" in off
    assert subprocess.run([sys.executable, "-m", "mapper.cli", "--version"], capture_output=True, text=True).stdout.startswith("mapper ")


def test_convert_plan_verify_roundtrip_and_json(te_checkpoint, tmp_path):
    code, out, _ = run_cli(["plan", str(te_checkpoint), "--json"])
    plan = json.loads(out)
    assert code == 0 and plan["rules"] == "neox-to-hf-gpt-neox" and plan["peak_memory_bytes"] > 0
    assert any(row["target"].startswith("(dropped: stale pre-fix") for row in plan["tensors"])

    code, out, err = run_cli(["convert", str(te_checkpoint), str(tmp_path / "hf"), "--json", "--max-shard-size", "100KB"])
    summary = json.loads(out)
    assert code == 0 and summary["files"] > 1 and summary["direction"] == "neox-to-hf"
    assert "converting" in err  # the progress bar goes to stderr
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()

    code, out, _ = run_cli(["verify", str(te_checkpoint), str(tmp_path / "hf"), "--json"])
    assert code == 0 and json.loads(out)["ok"] is True

    code, out, _ = run_cli(["roundtrip", str(te_checkpoint), "--json"])
    assert code == 0 and json.loads(out)["ok"] is True

    code, out, _ = run_cli(["convert", str(tmp_path / "hf"), str(tmp_path / "neox"), "--quiet"])
    assert code == 0 and out.startswith("wrote")
    code, out, _ = run_cli(["diff", str(te_checkpoint), str(tmp_path / "neox"), "--json"])
    assert code == 0 and json.loads(out)["counts"] == {"equal": tensor_count(te_checkpoint)}  # every tensor back


def test_a_tampered_hf_model_fails_verification_with_exit_1(te_checkpoint, tmp_path):
    run_cli(["convert", str(te_checkpoint), str(tmp_path / "hf"), "-q"])
    weights = tmp_path / "hf" / "model.safetensors"
    tensors = load_file(weights)
    tensors["gpt_neox.layers.1.post_attention_layernorm.weight"] += 0.5
    save_file(tensors, weights, metadata={"format": "pt"})
    code, out, err = run_cli(["verify", str(te_checkpoint), str(tmp_path / "hf")])
    assert code == 1
    assert "first divergence at blocks.1" in out
    assert "failed:" in err and "Traceback" not in err
    code, _, _ = run_cli(["diff", str(tmp_path / "hf"), str(tmp_path / "hf")])
    assert code == 0


def test_bad_input_exits_2_with_one_clear_message_and_no_traceback(tmp_path):
    code, _, err = run_cli(["convert", str(tmp_path / "missing"), str(tmp_path / "out")])
    assert code == 2 and "no such file or folder" in err and "hint:" in err and "Traceback" not in err
    code, _, err = run_cli(["convert", "--bogus", "a", "b"])
    assert code == 2 and "--bogus" in err and "Traceback" not in err
    code, _, err = run_cli(["convert", str(tmp_path), str(tmp_path / "o"), "--part", "3/2"])
    assert code == 2
    assert not (tmp_path / "o").exists()


def test_debug_shows_the_traceback_and_keeps_the_exit_code(tmp_path):
    code, _, err = run_cli(["convert", str(tmp_path / "missing"), str(tmp_path / "out"), "--debug"])
    assert code == 2 and "Traceback" in err and "CheckpointError" in err and "no such file" in err


def test_rules_commands(tmp_path):
    code, out, _ = run_cli(["rules", "list", "--json"])
    names = {r["name"] for r in json.loads(out)}
    assert code == 0 and "neox-te-to-hf-gpt-neox" in names and names == {f.stem for f in rules_dir().glob("*.yaml")}
    code, out, _ = run_cli(["rules", "show", "neox-te-to-hf-gpt-neox"])
    assert code == 0 and "gpt-neox-names-mlp-te#1" in out.replace("\n", "").replace("│", "").replace(" ", "")
    assert "stale pre-fix" in out
    code, out, _ = run_cli(["rules", "show", "neox-te-to-hf-gpt-neox", "--inverse", "--yaml"])
    assert code == 0 and "inverted: true" in out
    code, out, _ = run_cli(["rules", "schema"])
    assert code == 0 and json.loads(out)["title"].startswith("mapper rule set")
    bad = tmp_path / "bad.yaml"
    bad.write_text("schema_version: 1\nname: bad\nversion: 1.0.0\ndescription: d\nsource: a\ntarget: b\nrules:\n  - renam: {from: a, to: b}\n")
    code, _, err = run_cli(["rules", "validate", str(bad)])
    assert code == 2 and "bad.yaml:8:5" in err and "did you mean 'rename'" in err
    code, out, _ = run_cli(["rules", "new", "mine", "--from", "neox-to-hf-gpt-neox", "--out", str(tmp_path / "r")])
    assert code == 0 and (tmp_path / "r" / "mine.yaml").is_file()
    code, _, err = run_cli(["rules", "new", "mine", "--from", "neox-to-hf-gpt-neox", "--out", str(tmp_path / "r")])
    assert code == 2 and "--force" in err


def test_demo_runs_end_to_end(tmp_path):
    code, out, _ = run_cli(["demo", "--out", str(tmp_path / "demo")])
    assert code == 0
    assert "verdict: OK" in out and "bit-exact" in out and "stale pre-fix post_attention_layernorm" in out
    code, _, _ = run_cli(["demo", "--out", str(tmp_path / "demo")])  # reruns over its own output
    assert code == 0
    (tmp_path / "other").mkdir()
    code, _, err = run_cli(["demo", "--out", str(tmp_path / "other")])
    assert code == 2 and "not made by the demo" in err


def test_verify_on_real_text_with_a_local_tokenizer(te_checkpoint, tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "the", "model", "computes", "what", "it", "was", "trained", "to"]
    tokenizer = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]").save_pretrained(tmp_path / "tok")
    run_cli(["convert", str(te_checkpoint), str(tmp_path / "hf"), "-q"])
    code, out, _ = run_cli(["verify", str(te_checkpoint), str(tmp_path / "hf"), "--text",
                       "the model computes what it was trained to", "--tokenizer", str(tmp_path / "tok"), "--json"])
    report = json.loads(out)
    assert code == 0 and report["ok"] and report["input_shape"] == [1, 8]
    code, _, err = run_cli(["verify", str(te_checkpoint), str(tmp_path / "hf"), "--text", "hello"])
    assert code == 2 and "--tokenizer" in err


def test_diff_maps_a_checkpoint_through_a_rule_set(te_checkpoint, tmp_path):
    run_cli(["convert", str(te_checkpoint), str(tmp_path / "hf"), "-q"])
    code, out, _ = run_cli(["diff", str(te_checkpoint), str(tmp_path / "hf"), "--rules", "neox-te-to-hf-gpt-neox", "--json"])
    report = json.loads(out)
    assert code == 0 and report["counts"] == {"equal": tensor_count(tmp_path / "hf")}  # every HF tensor
    code, out, _ = run_cli(["diff", str(te_checkpoint), str(tmp_path / "hf"), "--rules", "neox-te-mha-to-hf-gpt-neox"])
    assert code == 2  # that rule set does not fit the checkpoint: bad input, not a difference


def test_rules_new_writes_one_file_that_includes_its_base_by_reference(tmp_path):
    folder = tmp_path / "my-rules"
    code, _, _ = run_cli(["rules", "new", "first", "--from", "neox-to-hf-gpt-neox", "--out", str(folder)])
    assert code == 0 and [p.name for p in folder.iterdir()] == ["first.yaml"]
    assert "include: [builtin:neox-to-hf-gpt-neox]" in (folder / "first.yaml").read_text()
    # a second rule set in the same folder, from the first one's file
    code, _, _ = run_cli(["rules", "new", "second", "--from", str(folder / "first.yaml"), "--out", str(folder)])
    assert code == 0 and sorted(p.name for p in folder.iterdir()) == ["first.yaml", "second.yaml"]
    assert "include: [first.yaml]" in (folder / "second.yaml").read_text()
    code, out, _ = run_cli(["rules", "show", str(folder / "second.yaml")])
    assert code == 0 and "gpt-neox-tp-merge#0" in out and "stage merge" in out
    code, _, err = run_cli(["rules", "new", "third", "--from", "neox-to-hf-gpt-neo", "--out", str(folder)])
    assert code == 2 and "did you mean neox-to-hf-gpt-neox" in err
    code, _, err = run_cli(["rules", "new", "third", "--from", "builtin:gpt-neox/tp-merge", "--out", str(folder)])
    assert code == 2 and "is a fragment" in err


def test_rules_params_lists_what_the_config_supplies_with_values_for_a_checkpoint(te_checkpoint):
    code, out, _ = run_cli(["rules", "params", "--json"])
    listed = {row["name"]: row for row in json.loads(out)}
    assert code == 0 and {"num_layers", "hidden_size", "head_dim", "te_mha", "trim_vocab"} <= set(listed)
    assert all(row["value"] is None and row["meaning"] for row in listed.values())
    code, out, _ = run_cli(["rules", "params", str(te_checkpoint), "--json"])
    values = {row["name"]: row["value"] for row in json.loads(out)}
    config, _ = synthesize_variant("te-full", tp=2)  # what te_checkpoint was written from
    assert code == 0 and values["head_dim"] == config.head_dim and values["tp"] == 2 and values["te_mha"] == 1


def test_plan_says_each_problem_once_per_pattern_and_json_keeps_every_key(tmp_path):
    config, tensors = synthesize_variant("te-full", tp=2)
    renamed = [k for k in tensors if ".attention.qkv.weight" in k]
    for key in renamed:  # an unknown layout of Q, K, V
        tensors[key.replace("qkv.weight", "qkv.query_weight")] = tensors.pop(key)
    neox = write_neox_checkpoint(tensors, config, tmp_path / "neox")
    code, out, err = run_cli(["plan", str(neox), "--rules", "neox-to-hf-gpt-neox"])
    assert code == 2 and out == ""
    assert err.count("layer_*.attention.qkv.query_weight@rank*") == 1 and "no rule consumes this tensor" in err
    assert err.count("the rule set does not fit") == 1 and "listed above" in err  # said once, not twice
    code, out, _ = run_cli(["plan", str(neox), "--rules", "neox-to-hf-gpt-neox", "--json"])
    report = json.loads(out)
    assert code == 2 and report["ok"] is False and report["problems"] == len(renamed)  # one per key
    (unconsumed,) = [g for g in report["groups"] if g["message"] == "no rule consumes this tensor"]
    assert unconsumed["count"] == 4 and len(unconsumed["keys"]) == 4


def test_plan_rows_name_the_rule_of_each_step_and_what_it_replaces(te_checkpoint, tmp_path):
    mine = tmp_path / "mine.yaml"
    mine.write_text("schema_version: 1\nname: mine\nversion: 0.1.0\ndescription: d\n"
                    "include: [builtin:neox-to-hf-gpt-neox]\nreplace:\n  gpt-neox-names-attention-te#1:\n"
                    '    - rename: {from: "layer_{i+2:02d}.attention.proj.{wb}@rank{r}", '
                    'to: "gpt_neox.layers.{i}.attention.dense.{wb}@rank{r}"}\n')
    code, out, _ = run_cli(["plan", str(te_checkpoint), "--rules", str(mine), "--json"])
    rows = {row["target"]: row for row in json.loads(out)["tensors"]}
    steps = rows["gpt_neox.layers.0.attention.dense.weight"]["steps"]
    assert code == 0 and [s["rule"] for s in steps] == ["mine#0", "gpt-neox-tp-merge#1"]
    assert steps[0]["replaces"] == "gpt-neox-names-attention-te#1" and steps[0]["stage"] == "ranks"
    code, out, _ = run_cli(["plan", str(te_checkpoint), "--rules", str(mine)])
    flat = " ".join(out.replace("│", " ").split())
    assert code == 0 and "replaces gpt-neox-names-attention-te#1" in flat and "override: gpt-neox-names-attention-te#1" in flat
    code, out, _ = run_cli(["plan", str(te_checkpoint), "--rules", str(mine), "-q"])
    assert code == 0 and len(out.splitlines()) == 1 and "peak memory" in out


def test_roundtrip_and_diff_print_one_row_per_pattern_and_quiet_prints_the_verdict(te_checkpoint, tmp_path):
    code, out, _ = run_cli(["roundtrip", str(te_checkpoint)])
    with NeoXCheckpoint(te_checkpoint) as source:
        keys = list(source.manifest())
    folded = [(pattern, members) for pattern, members in fold_keys(keys) if len(members) > 1]
    assert code == 0 and folded and all(pattern in out for pattern, _ in folded)
    assert [key for _, members in folded for key in members if key in out] == []  # patterns, not keys
    code, out, _ = run_cli(["roundtrip", str(te_checkpoint), "-q"])
    assert code == 0 and out.strip() == f"exact: {len(keys)} equal"
    run_cli(["convert", str(te_checkpoint), str(tmp_path / "hf"), "-q"])
    code, out, err = run_cli(["diff", str(te_checkpoint), str(tmp_path / "hf")])
    assert code == 1 and "only in A" in out and out.count("\n") < 40
    assert "--rules" in err and "mapper detect" in err  # the key spaces differ: compare through the rule set
    code, out, _ = run_cli(["diff", str(te_checkpoint), str(tmp_path / "hf"), "--json"])
    report = json.loads(out)
    assert len(report["tensors"]) == tensor_count(te_checkpoint) + tensor_count(tmp_path / "hf")  # no key in common
    assert "--rules" in report["suggestion"]


def test_plan_sizes_the_cast_and_plans_a_reshard(te_checkpoint):
    code, out, _ = run_cli(["plan", str(te_checkpoint), "--json"])
    full = json.loads(out)
    code, out, _ = run_cli(["plan", str(te_checkpoint), "--json", "--dtype", "bfloat16"])
    half = json.loads(out)
    assert code == 0 and half["target_bytes"] * 2 == full["target_bytes"]  # fp32 -> bf16
    code, out, _ = run_cli(["plan", str(te_checkpoint), "--json", "--to", "neox", "--tp", "4"])
    resharded = json.loads(out)
    assert code == 0 and resharded["direction"] == "neox-to-neox" and resharded["parameters"]["tp"] == 4
    code, _, err = run_cli(["plan", str(te_checkpoint), "--tp", "4"])
    assert code == 2 and "--tp does not apply to a neox -> hf conversion" in err
