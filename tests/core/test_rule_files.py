"""Rule files: YAML and JSON mean the same; every error names file, line, column, rule and a fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from mapper.errors import RuleFileError
from mapper.spec import dump_rule_set, load_rule_file, load_rule_text
from mapper.testing.rules import RULE_SET_HEADER as HEADER



def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text)
    return path


def test_yaml_and_json_are_the_same_rule_set(tmp_path):
    text = HEADER + 'rules:\n  - rename: {from: "layer_{i+2:02d}.x.{wb}@rank{r}", to: "x.{i}.{wb}.{r}"}\n'
    from_yaml = load_rule_file(write(tmp_path, "demo.yaml", text))
    from_json = load_rule_file(write(tmp_path, "demo.json", json.dumps(yaml.safe_load(text))))
    assert from_yaml == from_json
    assert load_rule_text(dump_rule_set(from_yaml, fmt="json")) == from_yaml


def test_rules_get_stable_ids_from_the_file_that_wrote_them(tmp_path):
    rules = load_rule_file(write(tmp_path, "demo.yaml", HEADER + "rules:\n  - rename: {from: a, to: b}\n"))
    assert rules.ops[0].id == "demo#0"
    assert rules.origin("demo#0").endswith("demo.yaml:12 (rule 0, rename)")


@pytest.mark.parametrize(
    ("rules_text", "where", "message", "hint"),
    [
        ("  - rename: {from: a, to: b\n", ":13:1", "starts at line 12, column 13", "indentation"),
        ("  - renam: {from: a, to: b}\n", ":12:5", "unknown op 'renam'", "did you mean 'rename'"),
        ("  - rename: {from: a}\n", ":12:", "'to' is a required property", "README"),
        ("  - rename: {from: a, to: b, colour: red}\n", ":12:", "colour", "README"),
        ("  - {rename: {from: a, to: b}, drop: {from: c}}\n", ":12:5", "exactly one key", "ops:"),
        ("  - fuse: {from: a, to: b}\n", ":12:", "`from` needs a list", "README"),
        ("  - rename: {from: a, from: b, to: c}\n", ":12:", "appears twice", "remove the duplicate"),
        ('  - rename: {from: "x.{i}", to: "y"}\n', "demo.yaml:12", "used in `from` but not in `to`", "both sides"),
        ('  - rename: {from: "x", to: "y.{j}"}\n', "demo.yaml:12", "used in `to` but not in `from`", "both sides"),
        ('  - fuse: {from: "x@rank{r}", to: "y", over: q}\n', "demo.yaml:12", "`over: q` needs", "declared"),
        ('  - drop: {from: "x.{n}"}\n', "demo.yaml:12", "need a declared range", "both sides"),
        ('  - rename: {from: a, to: b, when: "undeclared"}\n', "demo.yaml:12", "undeclared", "parameter"),
        ('  - unflatten: {from: a, sizes: [heads, 2]}\n', "demo.yaml:12", "undeclared heads", "parameter"),
    ],
)
def test_each_mistake_is_reported_precisely(tmp_path, rules_text, where, message, hint):
    path = write(tmp_path, "demo.yaml", HEADER + "rules:\n" + rules_text)
    with pytest.raises(RuleFileError) as caught:
        load_rule_file(path)
    text = str(caught.value)
    assert str(path.name) in text and where in text, text
    assert message in text, text
    assert caught.value.hint and hint in text, text


def test_header_mistakes(tmp_path):
    cases = {
        "schema_version: 2\n": "schema_version",
        "": "the file is empty",
    }
    for text, message in cases.items():
        with pytest.raises(RuleFileError, match=message):
            load_rule_file(write(tmp_path, "x.yaml", text + ("name: x\ndescription: d\n" if text else "")))
    no_version = HEADER.replace("version: 1.0.0\n", "") + "rules: []\n"
    with pytest.raises(RuleFileError, match="needs version"):
        load_rule_file(write(tmp_path, "x.yaml", no_version))


def test_fragments_compose_and_their_rules_keep_their_origin(tmp_path):
    (tmp_path / "fragments").mkdir()
    write(tmp_path, "fragments/norm.yaml", "schema_version: 1\nkind: fragment\nname: norm\ndescription: n\n"
          "placeholders: {i: num_layers}\nparameters: {num_layers: {description: transformer layers}}\n"
          'rules:\n  - rename: {from: "ln.{i}", to: "norm.{i}"}\n')
    main = write(tmp_path, "main.yaml", HEADER + "include: [fragments/norm.yaml]\nrules:\n  - rename: {from: a, to: b}\n")
    rules = load_rule_file(main)
    assert [op.id for op in rules.ops] == ["norm#0", "demo#0"]
    assert "fragments/norm.yaml:8 (rule 0, rename)" in rules.origin("norm#0")
    assert rules.include == []


def test_include_cycles_and_conflicting_fragments_are_refused(tmp_path):
    write(tmp_path, "a.yaml", "schema_version: 1\nkind: fragment\nname: a\ndescription: a\ninclude: [b.yaml]\n")
    write(tmp_path, "b.yaml", "schema_version: 1\nkind: fragment\nname: b\ndescription: b\ninclude: [a.yaml]\n")
    with pytest.raises(RuleFileError, match=r"include cycle: a.yaml -> b.yaml -> a.yaml"):
        load_rule_file(tmp_path / "a.yaml")

    write(tmp_path, "one.yaml", "schema_version: 1\nkind: fragment\nname: one\ndescription: d\nparameters: {tp: {default: 1}}\n")
    write(tmp_path, "two.yaml", "schema_version: 1\nkind: fragment\nname: two\ndescription: d\nparameters: {tp: {default: 2}}\n")
    both = HEADER.replace("  tp: {default: 1}\n", "") + "include: [one.yaml, two.yaml]\nrules: []\n"
    with pytest.raises(RuleFileError, match="fragments disagree on parameter 'tp'"):
        load_rule_file(write(tmp_path, "both.yaml", both))

    twice = HEADER + "include: [one.yaml]\nrules: []\n"
    write(tmp_path, "r.yaml", "schema_version: 1\nkind: fragment\nname: r\ndescription: d\nrules:\n  - rename: {from: a, to: b}\n")
    with pytest.raises(RuleFileError, match="occurs twice"):
        load_rule_file(write(tmp_path, "twice.yaml", HEADER + "include: [r.yaml, r.yaml]\nrules: []\n"))
    assert load_rule_file(write(tmp_path, "ok.yaml", twice)).parameters["tp"].default == 1

    with pytest.raises(RuleFileError, match="rule file not found"):
        load_rule_file(write(tmp_path, "missing.yaml", HEADER + "include: [nope.yaml]\nrules: []\n"))


def test_parameters_resolve_from_values_defaults_and_derivations():
    rules = load_rule_text(
        HEADER.replace("  tp: {default: 1}\n", "  tp: {default: 1}\n  hidden_size: {}\n  num_heads: {}\n"
                       "  head_dim: {expr: hidden_size // num_heads}\n") + "rules: []\n"
    )
    values = rules.resolve_parameters({"num_layers": 2, "hidden_size": 64, "num_heads": 4, "unused": 9})
    assert values == {"num_layers": 2, "tp": 1, "hidden_size": 64, "num_heads": 4, "head_dim": 16}
    with pytest.raises(RuleFileError, match="needs parameter") as caught:
        rules.resolve_parameters({})
    assert "num_layers (transformer layers)" in str(caught.value) and "--config" in str(caught.value)
