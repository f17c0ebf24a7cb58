"""One YAML reader for what mapper did not write: a key written twice is refused wherever it sits."""

from __future__ import annotations

from pathlib import Path

import pytest

from mapper.configs import load_neox_yaml
from mapper.errors import MapperError, RuleFileError
from mapper.safe_yaml import load_yaml
from mapper.spec.loader import parse_document


@pytest.mark.parametrize(
    ("text", "line", "key"),
    [
        ("a: 1\nb: 2\na: 3\n", 3, "'a'"),
        ("list:\n  - {x: 1, y: 2}\n  - x: 1\n    x: 2\n", 4, "'x'"),
        ("1: one\n1.0: also one\n", 2, "1.0"),
    ],
    ids=["top-level", "inside-a-list", "equal-values"],
)
def test_a_key_written_twice_is_refused_naming_the_second(text: str, line: int, key: str) -> None:
    with pytest.raises(MapperError, match="appears twice in the same mapping") as caught:
        load_yaml(text, where="c.yml")
    assert caught.value.where is not None and caught.value.where.startswith(f"c.yml:{line}:")
    assert key in caught.value.message
    with pytest.raises(RuleFileError, match="appears twice"):  # rule files: the same check, their error class
        parse_document(text, "rules.yaml")


def test_merge_keys_and_one_anchor_used_twice_are_not_duplicates(tmp_path: Path) -> None:
    path = tmp_path / "model.yml"
    path.write_text("base: &base {hidden-size: 64}\nfirst: *base\nsecond: *base\n"
                    "merged:\n  <<: *base\n  hidden-size: 128\n")
    loaded = load_neox_yaml(path)
    assert loaded["merged"] == {"hidden-size": 128} and loaded["second"] == {"hidden-size": 64}


def test_shipped_rule_files_read_the_same_with_libyaml_as_within_the_limits() -> None:
    """mapper's own rule files are parsed by libyaml (fast); the data and every position must be
    what the limited loader gives, or errors would point elsewhere."""
    from mapper.resources import rules_dir

    files = sorted(rules_dir().rglob("*.yaml"))
    assert len(files) > 20
    for path in files:
        text = path.read_text()
        assert parse_document(text, str(path), shipped=True) == parse_document(text, str(path)), path


def test_text_from_elsewhere_never_reaches_libyaml(tmp_path: Path) -> None:
    """A rule file outside the shipped rules goes through the depth-limited loader."""
    from mapper.spec import load_rule_file

    deep = tmp_path / "deep.yaml"
    deep.write_text("rules: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(RuleFileError, match="nests deeper than"):
        load_rule_file(deep)
