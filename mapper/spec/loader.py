"""Read rule files: YAML or JSON -> JSON Schema check -> pydantic -> includes -> semantic checks.

Every error names the file, the line and column, the rule index and a hint. JSON is read with
the YAML parser (JSON is YAML's flow style), so both formats get positions for free.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from stat import S_ISREG
from typing import Any, Optional

import jsonschema
import yaml
from pydantic import ValidationError

from mapper.errors import RuleFileError
from mapper.ops import OPS_BY_NAME
from mapper.resources import rules_dir
from mapper.safe_yaml import compose, limited_loader
from mapper.spec.checks import check_rule_set
from mapper.spec.models import RuleSet, unwrap, wrap
from mapper.spec.schema import rule_set_schema

Position = tuple[int, int]
Path_ = tuple[Any, ...]


def load_rule_file(path: str | Path, *, confined: bool = False) -> RuleSet:
    """Load one file and everything it includes into a flat, checked rule set.

    ``confined=True`` is for a rule file found in an input folder (the ``mapper-rules.yaml`` an
    HF folder carries): its includes may only name files inside its own folder tree or the
    shipped rules, so a folder from elsewhere cannot make mapper read (and quote in its errors)
    other files of the machine.
    """
    top = _include_path(Path.cwd(), str(path), str(path), top=True)
    within = (top.parent, rules_dir().resolve()) if confined else None
    flat = _resolve(top, stack=(), within=within)
    check_rule_set(flat)
    return flat


def load_rule_text(text: str, *, name: str = "<text>", base: Path | None = None) -> RuleSet:
    """Load rules from a string (tests, tools); includes resolve relative to ``base``."""
    data, positions = parse_document(text, name)
    flat = _build(data, positions, Path(name), base or Path.cwd(), stack=(), within=None)
    check_rule_set(flat)
    return flat


# --- parsing with positions ------------------------------------------------------------
def parse_document(text: str, where: str) -> tuple[Any, dict[Path_, Position]]:
    """YAML/JSON text -> plain data plus (line, column) of every node, keyed by its path.

    Parsed within :mod:`mapper.safe_yaml`'s limits (nesting, alias expansion, size)."""
    loader: Any = None
    try:
        loader = limited_loader(text, where=where, error=RuleFileError)  # already reads: may refuse a character
        node = compose(loader)
        if node is None:
            raise RuleFileError("the file is empty", where=where, hint="start from `mapper rules new`")
        positions: dict[Path_, Position] = {}
        data = _construct(loader, node, (), positions, where)
    except yaml.YAMLError as error:
        raise _yaml_error(error, where) from None
    finally:
        if loader is not None:
            loader.dispose()
    return data, positions


def _yaml_error(error: yaml.YAMLError, where: str) -> RuleFileError:
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    at = f"{where}:{mark.line + 1}:{mark.column + 1}" if mark else where
    problem = getattr(error, "problem", None) or str(error)
    context, context_mark = getattr(error, "context", None), getattr(error, "context_mark", None)
    if context and context_mark is not None:
        problem += f" ({context} that starts at line {context_mark.line + 1}, column {context_mark.column + 1})"
    return RuleFileError(
        f"not valid YAML/JSON: {problem}", where=at,
        hint="check indentation, colons and quotes around patterns containing '{' or ':'",
    )


_SEQ_TAG = "tag:yaml.org,2002:seq"
_MAP_TAG = "tag:yaml.org,2002:map"


def _construct(loader: yaml.SafeLoader, node: yaml.Node, path: Path_, positions: dict, where: str) -> Any:
    """Plain data from a checked node graph (an alias becomes a copy; the expansion is bounded)."""
    positions[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
    if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
        if node.tag not in (_SEQ_TAG, _MAP_TAG):  # e.g. !!python/object/apply: never constructed
            raise RuleFileError(
                f"the YAML tag {node.tag!r} is not allowed", where=_at(where, node.start_mark),
                hint="rule files hold plain values only: strings, numbers, booleans, lists and mappings",
            )
        return _construct_collection(loader, node, path, positions, where)
    try:
        return loader.construct_object(node, deep=True)
    except yaml.YAMLError as error:
        raise RuleFileError(
            f"bad value: {error}", where=_at(where, node.start_mark),
            hint="rule files hold plain values only: strings, numbers, booleans, lists and mappings",
        ) from None


def _construct_collection(loader: yaml.SafeLoader, node: yaml.Node, path: Path_, positions: dict, where: str) -> Any:
    if isinstance(node, yaml.SequenceNode):
        return [_construct(loader, item, path + (i,), positions, where) for i, item in enumerate(node.value)]
    result: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = _construct(loader, key_node, path + ("<key>",), {}, where)
        if not isinstance(key, (str, int, float, bool)) or key is None:
            raise RuleFileError(
                "mapping keys must be plain scalars", where=_at(where, key_node.start_mark),
                hint="write keys as plain words (field names, op names); quote a key containing '{' or '['",
            )
        if key in result:
            raise RuleFileError(
                f"key {key!r} appears twice in the same mapping", where=_at(where, key_node.start_mark),
                hint="YAML would silently keep the last one; remove the duplicate",
            )
        result[key] = _construct(loader, value_node, path + (key,), positions, where)
    return result


def _at(where: str, mark: Any) -> str:
    return f"{where}:{mark.line + 1}:{mark.column + 1}"


def _locate(where: str, positions: Mapping[Path_, Position], path: Path_) -> str:
    """``file:line:col`` of the deepest known node on ``path``."""
    for cut in range(len(path), -1, -1):
        found = positions.get(tuple(path[:cut]))
        if found:
            return f"{where}:{found[0]}:{found[1]}"
    return where


def _rule_label(path: Path_, data: Any) -> str:
    if len(path) >= 2 and path[0] == "rules" and isinstance(path[1], int):
        rules = data.get("rules") if isinstance(data, dict) else None
        op = ""
        if isinstance(rules, list) and path[1] < len(rules) and isinstance(rules[path[1]], dict):
            op = " (" + ", ".join(map(str, rules[path[1]])) + ")"
        return f"rule {path[1]}{op}: "
    return ""


# --- validation stages -----------------------------------------------------------------
def _check_rule_shapes(data: Any, positions: Mapping[Path_, Position], where: str) -> None:
    """Before the schema: give each rule a precise message (did you mean ...?)."""
    if not isinstance(data, dict):
        raise RuleFileError(
            "a rule file must be a mapping with schema_version, name, description, rules, ...",
            where=_locate(where, positions, ()), hint="see `mapper rules show` for a complete example",
        )
    rules = data.get("rules", [])
    if not isinstance(rules, list):
        raise RuleFileError("`rules` must be a list", where=_locate(where, positions, ("rules",)))
    for index, rule in enumerate(rules):
        at = _locate(where, positions, ("rules", index))
        if not isinstance(rule, dict) or len(rule) != 1:
            raise RuleFileError(
                f"rule {index} must be a mapping with exactly one key, the op name", where=at,
                hint=f"write e.g. `- rename: {{from: a, to: b}}`; ops: {', '.join(OPS_BY_NAME)}",
            )
        (op,) = rule
        if op not in OPS_BY_NAME:
            close = difflib.get_close_matches(str(op), OPS_BY_NAME, n=1)
            raise RuleFileError(
                f"rule {index}: unknown op {op!r}", where=at,
                hint=(f"did you mean {close[0]!r}? " if close else "") + f"ops: {', '.join(OPS_BY_NAME)}",
            )


@lru_cache(maxsize=1)
def _validator() -> jsonschema.protocols.Validator:
    schema = rule_set_schema()
    cls = jsonschema.validators.validator_for(schema)
    return cls(schema)


def _check_schema(data: Any, positions: Mapping[Path_, Position], where: str) -> None:
    errors = sorted(_validator().iter_errors(data), key=lambda e: (len(e.absolute_path), list(map(str, e.absolute_path))))
    if not errors:
        return
    # The deepest error is the most specific; oneOf errors get their best sub-error.
    error = jsonschema.exceptions.best_match(errors)
    path = tuple(error.absolute_path)
    field = ".".join(map(str, path)) or "(top level)"
    raise RuleFileError(
        f"{_rule_label(path, data)}{field}: {error.message}",
        where=_locate(where, positions, path),
        hint="the format is described in the README (Rule format) and schemas/ruleset.v1.json",
    )


def _check_model(data: Any, positions: Mapping[Path_, Position], where: str) -> RuleSet:
    try:
        return RuleSet.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        path = _data_path(data, first["loc"])
        message = first["msg"].removeprefix("Value error, ")
        raise RuleFileError(
            f"{_rule_label(path, data)}{'.'.join(map(str, path)) or '(top level)'}: {message}",
            where=_locate(where, positions, path),
            hint="the format is described in the README (Rule format) and schemas/ruleset.v1.json",
        ) from None


def _data_path(data: Any, loc: tuple) -> Path_:
    """The part of a pydantic error location that exists in the data (drops union tags)."""
    path, node = [], data
    for part in loc:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        else:
            continue
        path.append(part)
    return tuple(path)


# --- includes --------------------------------------------------------------------------
MAX_RULE_FILE_BYTES = 10 * 2**20  # rule files are small; anything bigger is a wrong path


MAX_INCLUDE_DEPTH = 32  # files in one chain of includes (the shipped rule sets need 3)

Within = Optional[tuple[Path, ...]]  # the folders includes must stay in (None: anywhere)


def _resolve(path: Path, stack: tuple[Path, ...], within: Within) -> RuleSet:
    if path in stack:
        cycle = " -> ".join(p.name for p in stack + (path,))
        raise RuleFileError(f"include cycle: {cycle}", where=stack[-1], hint="remove one of the includes")
    if len(stack) >= MAX_INCLUDE_DEPTH:
        chain = " -> ".join(p.name for p in stack[:3]) + " -> ... -> " + " -> ".join(p.name for p in stack[-2:])
        raise RuleFileError(
            f"includes nest deeper than {MAX_INCLUDE_DEPTH} files (mapper's limit): {chain} -> {path.name}",
            where=stack[-1], hint="include the fragments from fewer levels (a rule set lists its fragments)",
        )
    if within is not None and stack and not any(path == root or root in path.parents for root in within):
        raise RuleFileError(
            f"include {path.name!r} lies outside the rule file's folder and the shipped rules; refusing to read it",
            where=stack[-1],
            hint="a rule file found in a model folder may only include files beside it or below it, "
            "or shipped fragments",
        )
    stat = _stat_rule_file(path, stack)
    ruleset, positions = _validated_file(path, stat.st_mtime_ns, stat.st_size)
    return _assemble(ruleset, positions, path, path.parent, stack + (path,), within)


def _stat_rule_file(path: Path, stack: tuple[Path, ...]) -> os.stat_result:
    """A rule file's stat, after refusing what cannot be one (errors on an include point at the
    including file)."""
    including = stack[-1] if stack else None
    where = including or path
    fix_path = (
        f"paths in `include` are relative to the including file ({including.name})"
        if including else "check the path; `mapper rules list` shows the shipped rule sets by name"
    )
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise RuleFileError(f"rule file not found: {path}", where=where, hint=fix_path) from None
    except (OSError, ValueError) as error:
        raise RuleFileError(f"cannot read rule file {path}: {error}", where=where, hint=fix_path) from None
    if not S_ISREG(stat.st_mode):
        raise RuleFileError(f"{path} is not a file", where=where, hint=f"name a YAML or JSON rule file; {fix_path}")
    if stat.st_size > MAX_RULE_FILE_BYTES:
        raise RuleFileError(
            f"{path} has {stat.st_size} bytes; rule files have at most {MAX_RULE_FILE_BYTES}", where=where,
            hint=f"is this really a rule file? {fix_path}",
        )
    return stat


@lru_cache(maxsize=256)
def _validated_file(path: Path, mtime_ns: int, size: int) -> tuple[RuleSet, dict[Path_, Position]]:
    """One file read and validated (cached by path, modification time and size)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise RuleFileError(
            f"not UTF-8 text ({error.reason} at byte {error.start})", where=path,
            hint="rule files are YAML or JSON text; save the file as UTF-8",
        ) from None
    except OSError as error:
        raise RuleFileError(f"cannot read rule file: {error}", where=path, hint="check the file's permissions") from None
    data, positions = parse_document(text, str(path))
    return _validate(data, positions, str(path)), positions


def _validate(data: Any, positions: dict, where: str) -> RuleSet:
    _check_rule_shapes(data, positions, where)
    _check_schema(data, positions, where)
    return _check_model(data, positions, where)


def _include_path(base: Path, name: str, where: str, *, top: bool = False) -> Path:
    try:
        return (base / name).resolve()
    except (OSError, ValueError) as error:  # a NUL byte, a path too long, a symlink loop...
        raise RuleFileError(
            f"{'' if top else 'include '}{name!r} is not a usable path ({error})", where=where,
            hint="check the path" if top else "paths in `include` are relative to the including file",
        ) from None


def _build(data: Any, positions: dict, path: Path, base: Path, stack: tuple[Path, ...], within: Within) -> RuleSet:
    return _assemble(_validate(data, positions, str(path)), positions, path, base, stack, within)


def _assemble(
    ruleset: RuleSet, positions: dict, path: Path, base: Path, stack: tuple[Path, ...], within: Within
) -> RuleSet:
    """Resolve a validated file's includes and give its rules their ids and origins."""
    where = str(path)

    parts: list[tuple[RuleSet, str]] = []
    for entry in ruleset.include:
        name, when = (entry, None) if isinstance(entry, str) else (entry.path, entry.when)
        fragment = _resolve(_include_path(base, name, str(path)), stack, within)
        if when is not None:
            fragment = _only_when(fragment, when)
        parts.append((fragment, str(base / name)))
    own_ids = {}
    own_rules = []
    for index, op in enumerate(ruleset.ops):
        rule_id = op.id or f"{ruleset.name}#{index}"
        line = positions.get(("rules", index), (0, 0))[0]
        if rule_id in own_ids:
            raise RuleFileError(
                f"rule id {rule_id!r} occurs twice ({own_ids[rule_id]} and {where}:{line} (rule {index}, {op.name}))",
                where=f"{where}:{line}", hint="give each rule its own `id` (or none: the default is unique)",
            )
        own_ids[rule_id] = f"{where}:{line} (rule {index}, {op.name})"
        own_rules.append(wrap(op.model_copy(update={"id": rule_id})))

    parameters = dict(ruleset.parameters)
    placeholders = dict(ruleset.placeholders)
    rules, origins = [], {}
    defined: dict[tuple[str, str], str] = {}
    for fragment, fragment_path in parts:
        _merge(parameters, fragment.parameters, "parameter", fragment_path, where, defined)
        _merge(placeholders, fragment.placeholders, "placeholder", fragment_path, where, defined)
        rules.extend(fragment.rules)
        origins.update(fragment._origins)
    rules.extend(own_rules)
    origins.update(own_ids)

    seen: dict[str, str] = {}
    for op in (unwrap(rule) for rule in rules):
        assert op.id is not None
        if op.id in seen:
            raise RuleFileError(
                f"rule id {op.id!r} occurs twice ({seen[op.id]} and {origins.get(op.id)})",
                where=where, hint="a fragment was included twice, or two rules share an explicit `id`",
            )
        seen[op.id] = origins.get(op.id, "")
    flat = ruleset.model_copy(
        update={"include": [], "rules": rules, "parameters": parameters, "placeholders": placeholders}
    )
    return flat.with_origins(origins)


def _only_when(fragment: RuleSet, when: str) -> RuleSet:
    """The fragment with ``when`` joined to every rule's own condition (a conditional include)."""
    rules = []
    for op in fragment.ops:
        joined = f"({when}) and ({op.when})" if op.when else when
        rules.append(wrap(op.model_copy(update={"when": joined})))
    return fragment.model_copy(update={"rules": rules}).with_origins(fragment._origins)


def _merge(into: dict, new: Mapping, what: str, source: str, where: str, defined: dict[tuple[str, str], str]) -> None:
    """Add a fragment's parameters or placeholders; ``defined`` records who defined each first."""
    for name, value in new.items():
        first = defined.get((what, name), where)
        if name in into and into[name] != value:
            raise RuleFileError(
                f"fragments disagree on {what} {name!r}: {first} defines it as {_plain(into[name])}, "
                f"{source} as {_plain(value)}",
                where=where, hint=f"define {what} {name!r} the same way everywhere, or in one place",
            )
        into[name] = value
        defined.setdefault((what, name), source)


def _plain(value: Any) -> str:
    """A parameter or placeholder as the rule file writes it."""
    if hasattr(value, "model_dump"):
        value = value.model_dump(exclude_none=True, by_alias=True)
    return json.dumps(value)


def dump_rule_set(ruleset: RuleSet, *, fmt: str = "yaml") -> str:
    """Serialise a (flattened) rule set; loading the text gives an equal rule set."""
    data = ruleset.to_data()
    if fmt == "json":
        return json.dumps(data, indent=2) + "\n"
    return yaml.safe_dump(data, sort_keys=False, width=110)
