"""The JSON Schema of the rule format, generated from the pydantic models.

``schemas/ruleset.v1.json`` is this function's output, committed so the format can be checked
outside Python; ``tests/test_schema.py`` fails when it is stale (regenerate with
``mapper rules schema > schemas/ruleset.v1.json``).
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

SCHEMA_ID = "https://github.com/mapper-project/mapper/schemas/ruleset.v1.json"


@lru_cache(maxsize=1)
def _generated() -> str:
    from mapper.spec.models import RuleSet

    schema: dict[str, Any] = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        **RuleSet.model_json_schema(by_alias=True, mode="validation"),
    }
    schema["title"] = "mapper rule set, format version 1"
    return json.dumps(schema, indent=2, sort_keys=False) + "\n"


def rule_set_schema() -> dict[str, Any]:
    """The schema as a dict (a fresh copy)."""
    return json.loads(_generated())


def rule_set_schema_text() -> str:
    """The schema exactly as ``schemas/ruleset.v1.json`` must hold it."""
    return _generated()
