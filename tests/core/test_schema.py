"""The JSON Schema is generated from the pydantic models and validates every shipped rule file."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import pytest
import yaml

from mapper.resources import rules_dir, schema_path
from mapper.spec.schema import rule_set_schema, rule_set_schema_text

RULE_FILES = sorted(rules_dir().rglob("*.yaml"))


def test_the_committed_schema_is_current():
    assert schema_path().read_text() == rule_set_schema_text(), "regenerate: mapper rules schema > schemas/ruleset.v1.json"


@pytest.mark.parametrize("path", RULE_FILES, ids=[str(p.relative_to(rules_dir())) for p in RULE_FILES])
def test_every_shipped_rule_file_is_valid_outside_python(path: Path):
    jsonschema.validate(yaml.safe_load(path.read_text()), rule_set_schema())


def test_shipped_rule_sets_are_named_after_their_files():
    from mapper.spec import builtin_rule_files, load_rules

    for name, path in builtin_rule_files().items():
        ruleset = load_rules(path)
        assert ruleset.name == name and ruleset.kind in ("ruleset", "preset") and ruleset.version
        assert ruleset.invert().invert() == ruleset
