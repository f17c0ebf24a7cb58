"""Broken rule files, as a user meets them: `mapper rules validate FILE` and `mapper convert --rules FILE`.

Each is refused with exit code 2 and one message that names the file (with line and column where
there is one) or the rule, and says how to fix it; `convert` refuses before writing anything.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from _reliability import (
    assert_nothing_left,
    assert_refusal,
    copy_rules,
    neox_checkpoint,
    run_cli,
    snapshot,
)

from mapper.errors import CompileError, RuleFileError
from mapper.testing.rules import RULE_SET_HEADER as HEADER  # the first rule is on line 12



def fragment(name: str, body: str = "") -> str:
    return f"schema_version: 1\nkind: fragment\nname: {name}\ndescription: a fragment\n{body}"


@dataclass(frozen=True)
class BrokenRules:
    """Files to write (the first is the one the user passes) and what the message must contain."""

    id: str
    files: dict[str, str | bytes]
    names: tuple[str, ...]  # file[:line[:column]], rule ids: the places the message must name
    says: tuple[str, ...] = ()
    extra: dict[str, str] = field(default_factory=dict)

    def write(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        for name, content in self.files.items():
            path = folder / name
            if isinstance(content, bytes):
                path.write_bytes(content)
            else:
                path.write_text(content, encoding="utf-8")
        return folder / next(iter(self.files))


CASES = [
    BrokenRules("malformed-yaml", {"bad.yaml": HEADER + "rules:\n  - rename: {from: a, to: b\n"},
                ("bad.yaml:13:1",), ("not valid YAML", "starts at line 12")),
    BrokenRules("malformed-json", {"bad.json": '{"schema_version": 1, "name": "demo",\n "rules": [}\n'},
                ("bad.json:2:",), ("not valid YAML/JSON",)),
    BrokenRules("schema-missing-field", {"bad.yaml": HEADER + "rules:\n  - rename: {from: a}\n"},
                ("bad.yaml:12",), ("'to' is a required property",)),
    BrokenRules("schema-wrong-type",
                {"bad.yaml": HEADER + 'rules:\n  - fuse: {from: ["a@rank{r}"], to: b, over: r, dim: zero}\n'},
                ("bad.yaml:12",), ("'zero' is not of type 'integer'",)),
    BrokenRules("schema-extra-field", {"bad.yaml": HEADER + "rules:\n  - rename: {from: a, to: b, colour: red}\n"},
                ("bad.yaml:12",), ("'colour' was unexpected",)),
    BrokenRules("schema-version-from-the-future",
                {"bad.yaml": HEADER.replace("schema_version: 1", "schema_version: 2") + "rules: []\n"},
                ("bad.yaml:1",), ("schema_version",)),
    BrokenRules("a-list-instead-of-a-rule-set", {"bad.yaml": "- rename: {from: a, to: b}\n"},
                ("bad.yaml:1:1",), ("must be a mapping",)),
    BrokenRules("unknown-op", {"bad.yaml": HEADER + "rules:\n  - renam: {from: a, to: b}\n"},
                ("bad.yaml:12:5",), ("unknown op 'renam'", "did you mean 'rename'")),
    BrokenRules("placeholder-on-one-side-only", {"bad.yaml": HEADER + 'rules:\n  - rename: {from: "x.{i}", to: "y"}\n'},
                ("bad.yaml:12", "demo#0"), ("used in `from` but not in `to`",)),
    BrokenRules("undeclared-name-in-an-expression",
                {"bad.yaml": HEADER + 'rules:\n  - rename: {from: a, to: b, when: "heads > 2"}\n'},
                ("bad.yaml:12", "demo#0"), ("undeclared heads", "declared parameter")),
    BrokenRules("expression-that-is-not-allowed",
                {"bad.yaml": HEADER + "rules:\n  - rename: {from: a, to: b, when: \"__import__('os').getcwd()\"}\n"},
                ("bad.yaml:12", "demo#0"), ("is not allowed", "min, max")),
    BrokenRules("include-cycle",
                {"bad.yaml": HEADER + "include: [cycle-a.yaml]\nrules: []\n",
                 "cycle-a.yaml": fragment("cycle-a", "include: [cycle-b.yaml]\n"),
                 "cycle-b.yaml": fragment("cycle-b", "include: [cycle-a.yaml]\n")},
                ("cycle-a.yaml", "cycle-b.yaml"), ("include cycle",)),
    BrokenRules("fragments-that-disagree",
                {"bad.yaml": HEADER.replace("  tp: {default: 1}\n", "") + "include: [tp-one.yaml, tp-two.yaml]\nrules: []\n",
                 "tp-one.yaml": fragment("tp-one", "parameters:\n  tp: {default: 1}\n"),
                 "tp-two.yaml": fragment("tp-two", "parameters:\n  tp: {default: 2}\n")},
                ("tp-one.yaml", "tp-two.yaml", "bad.yaml"), ("disagree on parameter 'tp'",)),
    BrokenRules("include-that-does-not-exist", {"bad.yaml": HEADER + "include: [fragments/nope.yaml]\nrules: []\n"},
                ("bad.yaml", "fragments/nope.yaml"), ("not found", "relative to the including file")),
    BrokenRules("rule-id-used-twice",
                {"bad.yaml": HEADER + "rules:\n  - rename: {from: a, to: b, id: embed}\n  - rename: {from: c, to: d, id: embed}\n"},
                ("bad.yaml:12", "bad.yaml:13", "'embed'"), ("occurs twice",)),
    BrokenRules("fragment-included-twice",
                {"bad.yaml": HEADER + "include: [norms.yaml, more.yaml]\nrules: []\n",
                 "norms.yaml": fragment("norms", "rules:\n  - rename: {from: a, to: b}\n"),
                 "more.yaml": fragment("more", "include: [norms.yaml]\n")},
                ("norms#0", "norms.yaml"), ("occurs twice", "included twice")),
    BrokenRules("duplicate-key", {"bad.yaml": HEADER + "rules:\n  - rename: {from: a, from: b, to: c}\n"},
                ("bad.yaml:12",), ("'from' appears twice",)),
    BrokenRules("empty-file", {"bad.yaml": ""}, ("bad.yaml",), ("empty",)),
    BrokenRules("only-comments", {"bad.yaml": "# TODO: write the rules\n\n"}, ("bad.yaml",), ("empty",)),
    BrokenRules("not-utf8", {"bad.yaml": (HEADER + "rules: []\n").replace("small", "caf\u00e9").encode("latin-1")},
                ("bad.yaml",), ("not UTF-8",)),
    BrokenRules("recursive-alias", {"bad.yaml": HEADER + "rules: &loop [*loop]\n"},
                ("bad.yaml:11",), ("recursive",)),
    BrokenRules("yaml-tag-that-would-run-code",
                {"bad.yaml": HEADER + "rules:\n  - rename: {from: !!python/object/apply:os.system [\"touch PWNED\"], to: b}\n"},
                ("bad.yaml:12",), ("not allowed", "plain values only")),
    BrokenRules("yaml-tag-on-a-value",
                {"bad.yaml": HEADER + "rules:\n  - rename: {from: !!python/name:os.system '', to: b}\n"},
                ("bad.yaml:12",), ("bad value", "plain values only")),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_validate_refuses_a_broken_rule_file_naming_the_place_and_the_fix(
    case: BrokenRules, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # a tag that ran code would leave PWNED here
    bad = case.write(tmp_path / "rules")
    assert_refusal(["rules", "validate", bad], RuleFileError, names=case.names, says=case.says)
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_convert_refuses_a_broken_rule_file_before_writing_anything(
    case: BrokenRules, tmp_path: Path, neox: Path, out: Path
) -> None:
    bad = case.write(tmp_path / "rules")
    before = snapshot(neox)
    assert_refusal(["convert", neox, out, "--rules", bad], RuleFileError, names=case.names, says=case.says)
    assert_nothing_left(out, tmp_path)
    assert snapshot(neox) == before


def test_a_rule_file_path_that_does_not_exist_is_refused(tmp_path: Path, neox: Path, out: Path) -> None:
    missing = tmp_path / "rules" / "neox-te-to-hf.yaml"
    for args in (["rules", "validate", missing], ["convert", neox, out, "--rules", missing]):
        assert_refusal(args, RuleFileError, names=[missing], says=["not found"])
    assert_nothing_left(out)


def test_a_folder_given_as_rule_file_is_refused(tmp_path: Path) -> None:
    assert_refusal(["rules", "validate", tmp_path], RuleFileError, names=[tmp_path], says=["is not a file"])


def test_a_misspelt_rule_set_name_gets_a_did_you_mean(neox: Path, out: Path) -> None:
    assert_refusal(
        ["convert", neox, out, "--rules", "neox-to-hf-gpt-neo"], RuleFileError,
        names=["'neox-to-hf-gpt-neo'"], says=["did you mean neox-to-hf-gpt-neox", "mapper rules list"],
    )
    assert_nothing_left(out)


# --- lossy rules whose inverse has nothing to restore from --------------------------------------
def _break_rules(tmp_path: Path, fragment: str, old: str, new: str = "") -> Path:
    rules = copy_rules(tmp_path)
    path = rules / fragment
    text = path.read_text()
    assert text.count(old) == 1, old
    path.write_text(text.replace(old, new))
    return rules


def test_inverting_a_drop_without_restore_and_without_sidecar_is_refused(tmp_path: Path, out: Path) -> None:
    """NeoX -> HF drops TE's _extra_state; without a `restore` default only the sidecar can give it
    back. A user who copied the model files but not the sidecar is told so, and nothing is written."""
    rules = _break_rules(
        tmp_path, "fragments/extra-state-te-mha.yaml",
        "      restore: {shape: [0], dtype: uint8}\n      optional: true\n",
    )
    forward = rules / "neox-te-mha-to-hf-gpt-neox.yaml"
    assert run_cli(["rules", "validate", forward]).code == 0  # a valid rule set: the problem is the missing sidecar
    neox = neox_checkpoint(tmp_path / "te", "te-mha", tp=1)
    hf = tmp_path / "hf"
    assert run_cli(["convert", neox, hf, "--rules", forward]).code == 0
    (hf / "mapper" / "sidecar.safetensors").unlink()

    assert_refusal(
        ["convert", hf, out, "--rules", forward], CompileError,
        names=["extra-state-te-mha#0", "extra-state-te-mha.yaml", "layer_02.attention.qkv._extra_state@rank0"],
        says=["needs the sidecar", "mapper/sidecar.safetensors"],
    )
    assert_nothing_left(out, tmp_path)


def test_inverting_a_slice_without_fill_and_without_sidecar_is_refused(tmp_path: Path, out: Path) -> None:
    """--trim-vocab cuts padded vocabulary rows; a `slice` without `fill` cannot pad them back
    without the sidecar that holds them."""
    rules = _break_rules(
        tmp_path, "fragments/gpt-neox/vocab.yaml",
        "  - slice: {from: gpt_neox.embed_in.weight, keep: trim_vocab, total: vocab_size, fill: 0.0,",
        "  - slice: {from: gpt_neox.embed_in.weight, keep: trim_vocab, total: vocab_size,",
    )
    forward = rules / "neox-to-hf-gpt-neox.yaml"
    neox = neox_checkpoint(tmp_path / "neox", "neox-new", tp=1)
    hf = tmp_path / "hf"
    assert run_cli(["convert", neox, hf, "--rules", forward, "--trim-vocab", "100"]).code == 0
    (hf / "mapper" / "sidecar.safetensors").unlink()

    assert_refusal(
        ["convert", hf, out, "--rules", forward], CompileError,
        names=["gpt-neox-vocab#0", "vocab.yaml", "gpt_neox.embed_in.weight"],
        says=["needs the sidecar", "declare a default"],
    )
    assert_nothing_left(out, tmp_path)
    shutil.rmtree(hf)
