"""Small inputs that would cost without bound, and rule files that would read what they should not.

Every limit is an error that names it (the number), with exit code 2: expressions (values within
2**63), placeholder ranges (65,536 values, 2**20 combinations), YAML and JSON (64 levels of
nesting, 200,000 values once aliases are expanded), include chains (32 files). The rule file an
HF folder carries may include only files beside or below it, or shipped fragments; its
``mapper/record.json`` may name only a shipped rule set. And ``--rules NAME`` means the shipped rule set
even when a file or folder of that name sits in the current folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _reliability import (
    assert_nothing_left,
    assert_refusal,
    copy_rules,
    run_cli,
    snapshot,
    tag_folder,
)

from mapper.errors import CheckpointError, MapperError, RuleFileError
from mapper.testing.rules import RULE_SET_HEADER as HEADER

TOWER = "(((2**64)**64)**64)**64"  # 2**16777216, a number of five million digits


def refused(args: list[object], cls: type[MapperError], out: Path, source: Path, **expect: object) -> str:
    before = snapshot(source)
    outcome = assert_refusal(args, cls, **expect)  # type: ignore[arg-type]
    assert_nothing_left(out, out.parent)
    assert snapshot(source) == before
    return outcome.stdout + outcome.stderr


# --- expressions and placeholders -----------------------------------------------------------------
def test_an_expression_computing_a_tower_of_powers_is_refused_at_the_limit(tmp_path: Path, neox: Path, out: Path) -> None:
    rules = copy_rules(tmp_path) / "neox-to-hf-gpt-neox.yaml"
    rules.write_text(rules.read_text() + f'parameters:\n  tower: {{expr: "{TOWER}"}}\n')
    refused(["convert", neox, out, "--rules", rules], RuleFileError, out, neox, names=[TOWER], says=["2**63"])


def test_an_expression_in_the_rule_file_an_hf_folder_carries_is_bounded_too(hf: Path, out: Path) -> None:
    carried = hf / "mapper" / "rules.yaml"
    carried.write_text(carried.read_text().replace("parameters:\n", f"parameters:\n  tower:\n    expr: '{TOWER}'\n", 1))
    refused(["convert", hf, out], RuleFileError, out, hf, names=[TOWER], says=["2**63"])


@pytest.mark.parametrize("text", ["1" * 600, "-" * 600 + "1"], ids=["long-constant", "deep-unary"])
def test_an_overlong_expression_is_refused_naming_the_limit(tmp_path: Path, text: str) -> None:
    path = tmp_path / "long.yaml"
    path.write_text(HEADER.replace("  tp: {default: 1}\n", f'  tp: {{default: 1}}\n  big: {{expr: "{text}"}}\n') + "rules: []\n")
    assert_refusal(["rules", "validate", path], RuleFileError, says=["has 601 characters" if text[0] == "-" else "has 600 characters", "the limit is 500"])


def test_a_placeholder_ranging_to_ten_to_the_eight_is_refused_naming_the_limit(neox: Path, out: Path) -> None:
    refused(
        ["convert", neox, out, "--rules", "neox-to-hf-gpt-neox", "--param", "num_layers=100000000"],
        RuleFileError, out, neox, names=["'i'"], says=["ranges over 100000000 values", "the limit is 0 to 65536"],
    )


def test_placeholders_spanning_too_many_combinations_are_refused(neox: Path, out: Path) -> None:
    refused(
        ["convert", neox, out, "--rules", "neox-to-hf-gpt-neox", "--param", "num_layers=60000", "--param", "tp=60000"],
        RuleFileError, out, neox, says=["3600000000 combinations", "the limit is 1048576"],
    )


# --- YAML and JSON ------------------------------------------------------------------------------
def alias_bomb(levels: int = 9) -> str:
    """Each anchor lists the previous one ten times: 10**levels values in a few hundred bytes."""
    lines = ["lol-0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"lol-{n}: &l{n} [" + ", ".join([f"*l{n - 1}"] * 10) + "]" for n in range(1, levels)]
    return "\n".join(lines) + "\n"


def test_a_model_yml_of_nested_aliases_is_refused_naming_the_limit(neox: Path, out: Path) -> None:
    """A billion values in well under a kilobyte: PyYAML shares them, everything after copies."""
    config = tag_folder(neox) / "configs" / "model.yml"
    config.write_text(config.read_text() + alias_bomb())
    assert len(alias_bomb()) < 1024
    refused(["convert", neox, out], MapperError, out, neox, names=[config], says=["more than 200000 values"])


def test_a_model_yml_with_a_recursive_alias_is_refused(neox: Path, out: Path) -> None:
    config = tag_folder(neox) / "configs" / "model.yml"
    config.write_text(config.read_text() + "loop: &loop [*loop]\n")
    refused(["convert", neox, out], MapperError, out, neox, names=[config], says=["recursive"])


@pytest.mark.parametrize("bracket", ["[", "{"])
def test_a_deeply_nested_model_yml_is_refused_naming_the_limit(neox: Path, out: Path, bracket: str) -> None:
    config = tag_folder(neox) / "configs" / "model.yml"
    config.write_text(config.read_text() + "deep: " + bracket * 5000 + "\n")
    refused(["convert", neox, out], MapperError, out, neox, names=[config], says=["deeper than 64 levels"])


def test_a_deeply_nested_config_json_is_refused(hf: Path, out: Path) -> None:
    config = hf / "config.json"
    text = config.read_text().rstrip().removesuffix("}") + ', "deep": ' + "[" * 100_000 + "]" * 100_000 + "}\n"
    config.write_text(text)
    refused(["convert", hf, out], CheckpointError, out, hf, names=[config], says=["nests its values too deeply"])


def test_a_rule_file_of_4kb_of_brackets_is_refused_where_the_limit_is_crossed(tmp_path: Path) -> None:
    """Refused at the 65th bracket (line 1, column 65), without scanning the rest: PyYAML rescans
    every open bracket for each token, seconds for 2000 of them."""
    path = tmp_path / "brackets.yaml"
    path.write_text("[" * 4096)
    outcome = assert_refusal(["rules", "validate", path], RuleFileError, names=[f"{path}:1:65"], says=["deeper than 64 levels"])
    assert "unbalanced" in outcome.stderr  # the hint says what usually causes it


def test_an_alias_bomb_in_a_rule_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(HEADER + "rules: []\n" + alias_bomb())
    assert_refusal(["rules", "validate", path], RuleFileError, names=[path], says=["more than 200000 values"])


# --- includes ----------------------------------------------------------------------------------------
def fragment(name: str, body: str = "") -> str:
    return f"schema_version: 1\nkind: fragment\nname: {name}\ndescription: a fragment\n{body}"


def test_a_deep_include_chain_is_refused_as_such_not_blamed_on_brackets(tmp_path: Path) -> None:
    for n in range(40):
        (tmp_path / f"f{n}.yaml").write_text(fragment(f"f{n}", f"include: [f{n + 1}.yaml]\n" if n < 39 else ""))
    top = tmp_path / "top.yaml"
    top.write_text(HEADER + "include: [f0.yaml]\nrules: []\n")
    outcome = assert_refusal(["rules", "validate", top], RuleFileError, says=["includes nest deeper than 32 files", "top.yaml -> f0.yaml"])
    assert "bracket" not in outcome.stderr


SECRET = "hunter2-do-not-print"


@pytest.mark.parametrize("how", ["relative", "absolute"])
def test_the_rule_file_an_hf_folder_carries_cannot_include_files_outside_it(
    hf: Path, out: Path, tmp_path: Path, how: str
) -> None:
    secret = tmp_path / "secret.yaml"
    secret.write_text(f"password: {SECRET}\n")
    name = "../../secret.yaml" if how == "relative" else str(secret)
    carried = hf / "mapper" / "rules.yaml"
    carried.write_text(carried.read_text().replace("parameters:\n", f"include: ['{name}']\nparameters:\n", 1))
    shown = refused(["convert", hf, out], RuleFileError, out, hf, names=[carried, "secret.yaml"],
                    says=["outside the rule file's folder and the shipped rules"])
    assert SECRET not in shown


def test_the_rule_file_an_hf_folder_carries_may_include_its_own_files_and_shipped_fragments(hf: Path, tmp_path: Path) -> None:
    carried = hf / "mapper" / "rules.yaml"
    (hf / "mapper" / "extra").mkdir()
    (hf / "mapper" / "extra" / "nothing.yaml").write_text(fragment("nothing"))
    carried.write_text(carried.read_text().replace("parameters:\n", "include: [extra/nothing.yaml]\nparameters:\n", 1))
    outcome = run_cli(["plan", hf])
    assert outcome.code == 0, outcome.stderr

    from mapper.resources import rules_dir
    from mapper.spec import load_rule_file

    shipped = rules_dir() / "fragments" / "neox-common.yaml"
    elsewhere = tmp_path / "elsewhere" / "mapper-rules.yaml"
    elsewhere.parent.mkdir()
    elsewhere.write_text(fragment("uses-shipped", f"include: ['{shipped}']\n"))
    assert "i" in load_rule_file(elsewhere, confined=True).placeholders


def test_an_hf_folder_whose_mapper_json_names_a_path_is_refused_unread(hf: Path, out: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.yaml"
    secret.write_text(f"password: {SECRET}\n")
    (hf / "mapper" / "rules.yaml").unlink()
    record = json.loads((hf / "mapper" / "record.json").read_text())
    (hf / "mapper" / "record.json").write_text(json.dumps({**record, "rules": str(secret)}))
    shown = refused(["convert", hf, out], CheckpointError, out, hf, names=[hf], says=["not a shipped rule set"])
    assert SECRET not in shown


# --- --rules NAME -------------------------------------------------------------------------------------
@pytest.mark.parametrize("squatter", ["file", "folder"])
def test_a_file_or_folder_named_like_a_shipped_rule_set_does_not_hijack_rules_name(
    neox: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, squatter: str
) -> None:
    here = tmp_path / "cwd"
    here.mkdir()
    squat = here / "neox-to-hf-gpt-neox"
    if squatter == "file":
        squat.write_text("not: a rule file\n")
    else:
        squat.mkdir()
    monkeypatch.chdir(here)
    outcome = run_cli(["plan", neox, "--rules", "neox-to-hf-gpt-neox", "--json"])
    assert outcome.code == 0, outcome.stderr
    assert json.loads(outcome.stdout)["target_tensors"] > 0
    # written as a path, it is the file
    assert_refusal(["plan", neox, "--rules", "./neox-to-hf-gpt-neox"], RuleFileError, names=[squat])
