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


def rule_format_reference() -> str:
    """Markdown reference of the rule format, generated from the schema (the README embeds it)."""
    schema = rule_set_schema()
    defs = schema["$defs"]
    lines = ["#### Rule set header", "", *_fields_table(schema), ""]
    for name in ("Parameter", "Restore"):
        lines += [f"#### {name}", "", _description(defs[name]), "", *_fields_table(defs[name]), ""]
    common = {"id", "when", "optional", "note", "stage"}
    ops = []
    for ref in _rule_refs(schema):
        ((op_name, spec),) = defs[ref["$ref"].split("/")[-1]]["properties"].items()
        ops.append((op_name, defs[spec["$ref"].split("/")[-1]]))
    lines += ["#### Fields every rule has", "", *_fields_table(ops[0][1], only=common), ""]
    for op_name, op in ops:
        lines += [f"#### `{op_name}`", "", _description(op), "", *_fields_table(op, skip=common), ""]
    return "\n".join(lines).rstrip() + "\n"


def _rule_refs(schema: dict[str, Any]) -> list[dict[str, Any]]:
    items = schema["properties"]["rules"]["items"]
    return items.get("oneOf") or items.get("anyOf") or []


def _description(definition: dict[str, Any]) -> str:
    return " ".join((definition.get("description") or "").replace("``", "`").split())


def _type_of(spec: dict[str, Any]) -> str:
    if "$ref" in spec:
        return spec["$ref"].split("/")[-1]
    if "oneOf" in spec:
        return "rule"
    if "prefixItems" in spec:
        return f"list of {len(spec['prefixItems'])} {_type_of(spec['prefixItems'][0])}"
    if "anyOf" in spec:
        return " or ".join(_type_of(s) for s in spec["anyOf"] if s.get("type") != "null")
    if "const" in spec:
        return repr(spec["const"])
    if "enum" in spec:
        return " / ".join(map(str, spec["enum"]))
    kind = spec.get("type", "any")
    if kind == "array":
        return f"list of {_type_of(spec.get('items', {}))}"
    if kind == "object":
        extra = spec.get("additionalProperties")
        return f"mapping to {_type_of(extra)}" if isinstance(extra, dict) else "mapping"
    return {"integer": "int", "number": "number", "string": "string", "boolean": "bool"}.get(kind, kind)


def _fields_table(definition: dict[str, Any], *, only: set[str] | None = None, skip: set[str] = frozenset()) -> list[str]:
    required = set(definition.get("required", []))
    rows = ["| field | type | required | default | meaning |", "|---|---|---|---|---|"]
    for name, spec in definition.get("properties", {}).items():
        if (only is not None and name not in only) or name in skip:
            continue
        default = spec.get("default", "")
        default = "" if default is None else f"`{json.dumps(default)}`" if default != "" else ""
        meaning = _description(spec).replace("|", "\\|")
        rows.append(f"| `{name}` | {_type_of(spec)} | {'yes' if name in required else ''} | {default} | {meaning} |")
    return rows
