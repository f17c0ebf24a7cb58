"""A rule set holds only what differs: shipped parts by reference, overrides by id, stages that
keep the order right, and the parameters the config supplies without declarations."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import mapper
from mapper.errors import CompileError, RuleFileError
from mapper.spec import load_rule_file, load_rules
from mapper.testing import synthesize_variant

HEADER = "schema_version: 1\nname: mine\nversion: 0.1.0\ndescription: my variant\n"


def write(folder: Path, text: str, name: str = "mine.yaml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def te_full():
    config, tensors = synthesize_variant("te-full", tp=2)
    return config.rule_parameters(), tensors


def test_a_shipped_rule_set_is_included_by_reference_with_its_header(tmp_path, te_full):
    parameters, tensors = te_full
    mine = load_rule_file(write(tmp_path, HEADER + "include: [builtin:neox-to-hf-gpt-neox]\n"))
    shipped = load_rules("neox-to-hf-gpt-neox")
    assert (mine.source, mine.target, mine.variant) == (shipped.source, shipped.target, shipped.variant)
    assert [op.id for op in mine.ops] == [op.id for op in shipped.ops]
    assert "rules/fragments/gpt-neox/tp-merge.yaml" in mine.origin("gpt-neox-tp-merge#0")
    assert set(mapper.compile(mine, tensors, parameters).targets) == set(mapper.compile(shipped, tensors, parameters).targets)


def test_a_shipped_fragment_is_included_by_reference(tmp_path):
    text = HEADER + "source: neox\ntarget: hf-gpt-neox\ninclude: [builtin:gpt-neox/tp-merge, builtin:gpt-neox/vocab.yaml]\n"
    rules = load_rule_file(write(tmp_path, text))
    assert {op.id.split("#")[0] for op in rules.ops} == {"gpt-neox-tp-merge", "gpt-neox-vocab"}
    assert load_rules("builtin:gpt-neox/tp-merge").kind == "fragment"  # `rules show` takes the same names


def test_user_rule_sets_pick_up_fixes_to_the_shipped_parts(tmp_path, monkeypatch):
    shipped = tmp_path / "installed-rules"
    shutil.copytree(Path(mapper.__file__).parent.parent / "rules", shipped)
    monkeypatch.setattr("mapper.spec.compose.rules_dir", lambda: shipped)
    path = write(tmp_path, HEADER + "include: [builtin:neox-to-hf-gpt-neox]\n")
    before = load_rule_file(path)
    vocab = shipped / "fragments" / "gpt-neox" / "vocab.yaml"
    vocab.write_text(vocab.read_text().replace("fill: 0.0, when: trim_vocab > 0}", "fill: 0.5, when: trim_vocab > 0}", 1))
    after = load_rule_file(path)  # the same user file, a newer shipped fragment
    fills = [(b.fill, a.fill) for b, a in zip(before.ops, after.ops) if b.id == "gpt-neox-vocab#0"]
    assert fills == [(0.0, 0.5)]


def test_an_unknown_builtin_name_is_refused_with_the_nearest_names(tmp_path):
    with pytest.raises(RuleFileError) as caught:
        load_rule_file(write(tmp_path, HEADER + "include:\n  - builtin:gpt-neox/tp-merg\n"))
    text = str(caught.value)
    assert "mine.yaml:6:5" in text and "no shipped rule set or fragment named 'builtin:gpt-neox/tp-merg'" in text
    assert "did you mean builtin:gpt-neox/tp-merge" in text
    with pytest.raises(RuleFileError, match="no shipped rule set or fragment"):
        load_rule_file(write(tmp_path, HEADER + "include: ['builtin:../../etc/passwd']\n"))


def test_an_included_rule_is_excluded_by_id_or_by_its_fragment(tmp_path):
    base = HEADER + "include: [builtin:neox-to-hf-gpt-neox]\n"
    one = load_rule_file(write(tmp_path, base + "exclude: [gpt-neox-names-attention-te#0]\n"))
    ids = [op.id for op in one.ops]
    assert "gpt-neox-names-attention-te#0" not in ids and "gpt-neox-names-attention-te#1" in ids
    (override,) = one.overrides
    assert override.rule == "gpt-neox-names-attention-te#0" and override.replacements == ()
    assert "names-attention-te.yaml:11" in override.origin and override.by.endswith("mine.yaml:6:11")
    whole = load_rule_file(write(tmp_path, base + "exclude: [gpt-neox-names-attention-te]\n"))
    assert not [op for op in whole.ops if op.id.startswith("gpt-neox-names-attention-te#")]
    assert any(op.id == "extra-state-te-mha#0" for op in whole.ops)  # what the fragment includes stays


def test_an_unknown_id_is_refused_naming_the_nearest_ids(tmp_path):
    text = HEADER + "include: [builtin:neox-to-hf-gpt-neox]\nexclude: [gpt-neox-names-attention-te#7]\n"
    with pytest.raises(RuleFileError) as caught:
        load_rule_file(write(tmp_path, text))
    text = str(caught.value)
    assert "mine.yaml:6:11" in text and "no included rule (or fragment) is named 'gpt-neox-names-attention-te#7'" in text
    assert "did you mean gpt-neox-names-attention-te#0, gpt-neox-names-attention-te#1" in text


def test_a_replacement_runs_in_the_replaced_rules_place_stage_and_condition(tmp_path):
    text = HEADER + (
        "include: [builtin:neox-to-hf-gpt-neox]\n"
        "replace:\n"
        "  gpt-neox-names-attention-te#1:\n"
        '    - rename: {from: "layer_{i+2:02d}.attention.proj.{wb}@rank{r}", to: "proj.{i}.{wb}@rank{r}"}\n'
        '    - rename: {from: "proj.{i}.{wb}@rank{r}", to: "gpt_neox.layers.{i}.attention.dense.{wb}@rank{r}"}\n'
    )
    rules = load_rule_file(write(tmp_path, text))
    ids = [op.id for op in rules.ops]
    at = ids.index("gpt-neox-names-attention-te#0")
    assert ids[at + 1: at + 3] == ["mine#0", "mine#1"]
    first = rules.ops[at + 1]
    assert first.stage == "ranks" and first.when == "te_mha"
    assert rules.replaced_by("mine#1").rule == "gpt-neox-names-attention-te#1"
    assert "mine.yaml:8" in rules.origin("mine#0")


def test_own_per_rank_rules_run_before_the_tp_merge_wherever_they_are_written(tmp_path, te_full):
    parameters, tensors = te_full
    text = HEADER + (
        "include: [builtin:neox-to-hf-gpt-neox]\n"
        "exclude: [gpt-neox-names-norms#1]\n"
        "rules:\n"  # written after the includes, i.e. after the TP merge in file order
        '  - rename: {from: "layer_{num_layers+3:02d}.norm.{wb}@rank{r}", to: "gpt_neox.final_layer_norm.{wb}@rank{r}"}\n'
    )
    rules = load_rule_file(write(tmp_path, text))
    ids = [op.id for op in rules.ops]
    assert rules.ops[ids.index("mine#0")].stage == "ranks"
    assert ids.index("mine#0") < ids.index("gpt-neox-tp-merge#0")
    plan = mapper.compile(rules, tensors, parameters)
    assert plan.rules_for(["gpt_neox.final_layer_norm.weight"]) == ["mine#0", "gpt-neox-tp-merge#5"]


def test_a_stated_stage_the_keys_contradict_is_an_error_at_its_line(tmp_path):
    text = HEADER + (
        "source: neox\ntarget: hf-gpt-neox\n"
        "parameters: {num_layers: {}, tp: {}}\nplaceholders: {i: num_layers, r: tp}\n"
        "rules:\n"
        '  - rename: {from: "a.{i}@rank{r}", to: "b.{i}@rank{r}", stage: model}\n'
        '  - fuse: {from: "b.{i}@rank{r}", over: r, to: "c.{i}", stage: ranks}\n'
    )
    with pytest.raises(RuleFileError) as caught:
        load_rule_file(write(tmp_path, text))
    message = str(caught.value)
    assert "2 problems" in message
    assert message.index("mine.yaml:10:5: rule mine#0 (rename) is in stage model") < message.index("mine.yaml:11:5")
    assert "it belongs in stage merge" in message


def test_stages_compose_the_other_way_round_for_a_rule_set_converting_to_neox(tmp_path):
    fragment = "schema_version: 1\nkind: fragment\nname: {name}\ndescription: d\nrules:\n  - {rule}\n"
    write(tmp_path, fragment.format(name="names", rule='rename: {from: "x@rank{r}", to: "layer_00.x@rank{r}"}'), "names.yaml")
    write(tmp_path, fragment.format(name="shards", rule='split: {from: "x", over: r, to: "x@rank{r}"}'), "shards.yaml")
    text = (
        "schema_version: 1\nname: back\nversion: 0.1.0\ndescription: d\nsource: hf-gpt-neox\ntarget: neox\n"
        "parameters: {tp: {}}\nplaceholders: {r: tp}\ninclude: [names.yaml, shards.yaml]\n"
    )
    rules = load_rule_file(write(tmp_path, text, "back.yaml"))
    assert [(op.name, op.stage) for op in rules.ops] == [("split", "merge"), ("rename", "ranks")]
    forward = load_rules("neox-to-hf-gpt-neox")
    assert forward.invert().invert() == forward


def test_a_file_that_includes_nothing_runs_in_the_order_written(tmp_path):
    text = HEADER + (  # back and forth over the ranks: no one order of stages fits it, the file's order does
        "source: a\ntarget: b\nparameters: {tp: {}}\nplaceholders: {r: tp}\nrules:\n"
        '  - fuse: {from: "x@rank{r}", over: r, to: "x"}\n'
        '  - split: {from: "x", over: r, to: "y@rank{r}"}\n'
        '  - rename: {from: "y@rank{r}", to: "z@rank{r}"}\n'
    )
    rules = load_rule_file(write(tmp_path, text))
    assert [op.name for op in rules.ops] == ["fuse", "split", "rename"]
    assert sorted(mapper.compile(rules, {f"x@rank{r}": torch.zeros(2) for r in range(2)}, {"tp": 2}).targets) == [
        "z@rank0", "z@rank1"]


def test_parameters_the_config_supplies_need_no_declaration(tmp_path, te_full):
    parameters, tensors = te_full
    text = HEADER + (
        "include: [builtin:neox-to-hf-gpt-neox]\n"
        "parameters:\n  q_rows: {expr: 'hidden_size // num_heads * num_heads'}\n"
        "rules:\n"
        '  - affine: {from: "embed_out.weight", scale: 1, when: "not tied and q_rows > 0", optional: true}\n'
    )
    rules = load_rule_file(write(tmp_path, text))
    assert rules.parameters["hidden_size"].description.startswith("model width")
    assert rules.resolve_parameters(parameters)["q_rows"] == parameters["hidden_size"]
    mapper.compile(rules, tensors, parameters)
    with pytest.raises(RuleFileError, match=r"mine.yaml:\d+ .*uses undeclared heads_per_group") as caught:
        load_rule_file(write(tmp_path, text.replace("q_rows > 0", "heads_per_group > 0")))
    assert "mapper rules params" in str(caught.value)


def test_every_mistake_of_a_rule_file_is_reported_at_once_in_file_order(tmp_path):
    text = HEADER + (
        "source: neox\ntarget: hf-gpt-neox\n"
        "descripton: typo\n"
        "rules:\n"
        "  - rename: {from: a, too: b}\n"
        "  - renam: {from: a, to: b}\n"
        "  - fuse: {from: [a, b], to: c, dimm: 1}\n"
    )
    with pytest.raises(RuleFileError) as caught:
        load_rule_file(write(tmp_path, text))
    message = str(caught.value)
    lines = [line for line in message.splitlines() if line.startswith("  - ")]
    assert [line.split(": ")[0].rsplit("/", 1)[-1] for line in lines] == [
        "mine.yaml:7:1", "mine.yaml:9:13", "mine.yaml:9:23", "mine.yaml:10:5", "mine.yaml:11:33"]
    assert "unknown key: 'descripton' was unexpected here; did you mean 'description'?" in lines[0]
    assert "'to' is a required property" in lines[1]
    assert "unknown key: 'too' was unexpected here; did you mean 'to'?" in lines[2]
    assert "unknown op 'renam'" in lines[3]
    assert "'dimm' was unexpected here; did you mean 'dim'?" in lines[4]
    assert "did you mean 'rename'" in caught.value.hint


def test_fragments_may_describe_a_parameter_in_their_own_words(tmp_path):
    write(tmp_path, "schema_version: 1\nkind: fragment\nname: f\ndescription: d\n"
          "parameters: {head_dim: {description: one head}}\n", "f.yaml")
    text = HEADER + "source: neox\ntarget: hf-llama\ninclude: [f.yaml, builtin:llama-common]\n"
    assert "head_dim" in load_rule_file(write(tmp_path, text)).parameters


def test_a_rule_that_needs_keys_a_later_rule_makes_says_so_and_replace_is_the_fix(tmp_path):
    config, tensors = synthesize_variant("te-full-parallel", tp=2)  # TE's proj output counted TP times
    parameters = config.rule_parameters()
    proj = '  - rename: {from: "layer_{i+2:02d}.attention.proj.{wb}@rank{r}", to: "gpt_neox.layers.{i}.attention.dense.{wb}@rank{r}"}\n'
    late = HEADER + "include: [builtin:neox-to-hf-gpt-neox]\nexclude: [gpt-neox-names-attention-te#1]\nrules:\n" + proj
    with pytest.raises(CompileError) as caught:
        mapper.compile(load_rule_file(write(tmp_path, late)), tensors, parameters)
    (problem,) = caught.value.problems  # the TP scaling of the projection ran before the rename made its key
    assert problem.rule == "gpt-neox-te-row-parallel-outputs#0" and "te-row-parallel-outputs.yaml:13" in problem.origin
    assert "rules run in order, and rule mine#0 at" in problem.message and "mine.yaml:8" in problem.message
    assert "produces such keys later" in problem.message
    assert "both run in stage ranks, where rules run in file order (includes first)" in problem.hint and "replace" in problem.hint
    in_place = HEADER + "include: [builtin:neox-to-hf-gpt-neox]\nreplace:\n  gpt-neox-names-attention-te#1:\n" + "  " + proj
    plan = mapper.compile(load_rule_file(write(tmp_path, in_place)), tensors, parameters)
    assert plan.rules_for(["gpt_neox.layers.0.attention.dense.weight"])[:2] == ["mine#0", "gpt-neox-te-row-parallel-outputs#0"]


def test_the_catalog_of_config_parameters_is_what_the_config_supplies():
    from mapper.spec.parameters import CONFIG_PARAMETERS
    from mapper.testing import tiny_config

    assert set(CONFIG_PARAMETERS) == set(tiny_config("te-full").rule_parameters()) | {"trim_vocab"}


def test_a_replacement_in_another_stage_or_an_id_taken_by_an_included_rule_is_refused(tmp_path):
    text = HEADER + (
        "include: [builtin:neox-to-hf-gpt-neox]\n"
        "replace:\n"
        "  gpt-neox-vocab#0:\n"
        '    - slice: {from: gpt_neox.embed_in.weight, keep: trim_vocab, total: vocab_size, stage: merge}\n'
        "rules:\n"
        '  - rename: {from: "a@rank{r}", to: "b@rank{r}", id: gpt-neox-tp-merge#0}\n'
    )
    with pytest.raises(RuleFileError) as caught:
        load_rule_file(write(tmp_path, text))
    message = str(caught.value)
    assert "2 problems" in message
    assert "mine.yaml:8: rule mine#0 says stage merge, but it replaces gpt-neox-vocab#0, which runs in stage model" in message
    assert "mine.yaml:10: rule id 'gpt-neox-tp-merge#0' is already the id of an included rule" in message
