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

from mapper.errors import FileProblem, RuleFileError
from mapper.ops import OPS_BY_NAME
from mapper.resources import rules_dir
from mapper.safe_yaml import compose as compose_node, limited_loader, shipped_loader
from mapper.spec.checks import check_rule_set, declare_config_parameters
from mapper.spec.compose import BUILTIN, Part, builtin_path, compose
from mapper.spec.models import RuleSet, wrap
from mapper.spec.schema import rule_set_schema

Position = tuple[int, int]
Path_ = tuple[Any, ...]


def load_rule_file(path: str | Path, *, confined: bool = False) -> RuleSet:
    """Load one file and everything it includes into a flat, checked rule set.

    ``confined=True`` is for a rule file found in an input folder (the rules an HF folder carries
    in ``mapper/rules.yaml``): its includes may only name files inside its own folder tree or the
    shipped rules, so a folder from elsewhere cannot make mapper read (and quote in its errors)
    other files of the machine.
    """
    top = _include_path(Path.cwd(), str(path), str(path), top=True)
    within = (top.parent, rules_dir().resolve()) if confined else None
    flat = declare_config_parameters(_resolve(top, stack=(), within=within))
    check_rule_set(flat)
    return flat


def rule_file_header(path: Path) -> RuleSet:
    """One file validated with its includes left unresolved: its own ``name``, ``kind``,
    ``source`` and ``target`` at the cost of parsing that file alone (a catalog filters on these
    before assembling the rule sets it needs)."""
    stat = _stat_rule_file(path, ())
    return _validated_file(path, stat.st_mtime_ns, stat.st_size)[0]


def load_rule_text(text: str, *, name: str = "<text>", base: Path | None = None) -> RuleSet:
    """Load rules from a string (tests, tools); includes resolve relative to ``base``."""
    data, positions = parse_document(text, name)
    flat = declare_config_parameters(_build(data, positions, Path(name), base or Path.cwd(), stack=(), within=None))
    check_rule_set(flat)
    return flat


# --- parsing with positions ------------------------------------------------------------
def parse_document(text: str, where: str, *, shipped: bool = False) -> tuple[Any, dict[Path_, Position]]:
    """YAML/JSON text -> plain data plus (line, column) of every node, keyed by its path.

    Parsed within :mod:`mapper.safe_yaml`'s limits (nesting, alias expansion, size, no key twice);
    ``shipped`` text (mapper's own rule files) by libyaml: ~0.05 s less for every conversion's
    detection."""
    loader: Any = None
    make_loader = shipped_loader if shipped else limited_loader
    try:
        loader = make_loader(text, where=where, error=RuleFileError)  # already reads: may refuse a character
        node = compose_node(loader)
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
        positions[path + ("<key>", key)] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
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
    """``rule 3 (rename): `` for a path inside a rule (also in a ``replace`` entry)."""
    rule, at = _rule_at(path, data)
    if at is None:
        return ""
    op = f" ({', '.join(map(str, rule))})" if isinstance(rule, dict) else ""
    where = f"replace {at[1]!r}, " if at[0] == "replace" else ""
    return f"{where}rule {at[-1]}{op}: "


def _rule_at(path: Path_, data: Any) -> tuple[Any, Path_ | None]:
    """The rule a document path lies in, and the rule's own path."""
    if len(path) >= 2 and path[0] == "rules" and isinstance(path[1], int):
        at: Path_ = tuple(path[:2])
    elif len(path) >= 3 and path[0] == "replace" and isinstance(path[2], int):
        at = tuple(path[:3])
    else:
        return None, None
    node = data
    for part in at:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return None, at
    return node, at


# --- validation stages: every problem of the file at once, in file order --------------------
_FORMAT_HINT = "the format is described in the README (Rule format) and schemas/ruleset.v1.json"


def _rule_lists(data: dict) -> list[tuple[Path_, Any]]:
    """Every list of rules in a document: ``rules`` and each ``replace`` entry."""
    lists: list[tuple[Path_, Any]] = [(("rules",), data.get("rules", []))]
    replace = data.get("replace")
    if isinstance(replace, dict):
        lists += [(("replace", name), rules) for name, rules in replace.items()]
    return lists


def _shape_problems(data: Any, positions: Mapping[Path_, Position], where: str) -> list[FileProblem]:
    """Before the schema: each rule is one op, and the op exists (did you mean ...?)."""
    if not isinstance(data, dict):
        raise RuleFileError(
            "a rule file must be a mapping with schema_version, name, description, rules, ...",
            where=_locate(where, positions, ()), hint="see `mapper rules show` for a complete example",
        )
    problems = []
    for at, rules in _rule_lists(data):
        if not isinstance(rules, list):
            problems.append(FileProblem(_locate(where, positions, at), f"`{'.'.join(map(str, at))}` must be a list of rules"))
            continue
        for index, rule in enumerate(rules):
            here = _locate(where, positions, at + (index,))
            label = f"replace {at[1]!r}, rule {index}" if at[0] == "replace" else f"rule {index}"
            if not isinstance(rule, dict) or len(rule) != 1:
                problems.append(FileProblem(
                    here, f"{label} must be a mapping with exactly one key, the op name",
                    hint=f"write e.g. `- rename: {{from: a, to: b}}`; ops: {', '.join(OPS_BY_NAME)}",
                ))
                continue
            (op,) = rule
            if op not in OPS_BY_NAME:
                close = difflib.get_close_matches(str(op), OPS_BY_NAME, n=1)
                problems.append(FileProblem(
                    here, f"{label}: unknown op {op!r}",
                    hint=(f"did you mean {close[0]!r}? " if close else "") + f"ops: {', '.join(OPS_BY_NAME)}",
                ))
    return problems


@lru_cache(maxsize=None)
def _validator(definition: str | None = None) -> jsonschema.protocols.Validator:
    """The schema's validator: of a whole rule file, or of one definition (an op's fields)."""
    schema = rule_set_schema()
    if definition is not None:
        schema = {"$schema": schema["$schema"], "$defs": schema["$defs"], "$ref": f"#/$defs/{definition}"}
    return jsonschema.validators.validator_for(schema)(schema)


@lru_cache(maxsize=1)
def _op_definitions() -> dict[str, str]:
    """op name -> the schema definition of its fields."""
    schema = rule_set_schema()
    found = {}
    for wrapper in schema["$defs"].values():
        properties = wrapper.get("properties", {})
        if len(properties) == 1 and wrapper.get("required") == list(properties):
            ((name, spec),) = properties.items()
            if name in OPS_BY_NAME and "$ref" in spec:
                found[name] = spec["$ref"].split("/")[-1]
    return found


def _schema_problems(data: dict, positions: Mapping[Path_, Position], where: str) -> list[FileProblem]:
    """Every schema error. Rules are checked against their own op's fields (a `oneOf` over all ops
    would only say 'not valid under any of the given schemas'); the rest against the schema."""
    header = {**data, "rules": []}
    if isinstance(data.get("replace"), dict):
        header["replace"] = {name: [] for name in data["replace"]}
    found = [(error, ()) for error in _validator().iter_errors(header)]
    for at, rules in _rule_lists(data):
        for index, rule in enumerate(rules if isinstance(rules, list) else []):
            if isinstance(rule, dict) and len(rule) == 1 and next(iter(rule)) in OPS_BY_NAME:
                ((op, fields),) = rule.items()
                found += [(error, at + (index, op)) for error in _validator(_op_definitions()[op]).iter_errors(fields)]
    problems = []
    for error, prefix in found:
        problems.extend(_schema_problem(error, prefix, data, positions, where))
    return problems


def _schema_problem(
    error: jsonschema.ValidationError, prefix: Path_, data: Any, positions: Mapping[Path_, Position], where: str
) -> list[FileProblem]:
    if error.context:  # anyOf / oneOf: the alternative that came closest says what is wrong
        error = jsonschema.exceptions.best_match(error.context)
    path = prefix + tuple(error.absolute_path)
    field = ".".join(map(str, path)) or "(top level)"
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        allowed = list(error.schema.get("properties", {}))
        problems = []
        for key in (k for k in error.instance if k not in allowed):
            close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
            problems.append(FileProblem(
                _locate(where, positions, path + ("<key>", key)),
                f"{_rule_label(path, data)}{field}: unknown key: {key!r} was unexpected here"
                + (f"; did you mean {close[0]!r}?" if close else ""),
                hint=f"{_takes(field, allowed)}; {_FORMAT_HINT}",
            ))
        return problems
    return [FileProblem(_locate(where, positions, path), f"{_rule_label(path, data)}{field}: {error.message}",
                        hint=_FORMAT_HINT)]


def _takes(field: str, allowed: list[str]) -> str:
    """``rename takes from, to (and id, when, optional, note, stage)``."""
    common = ("id", "when", "optional", "note", "stage")
    own = [name for name in allowed if name not in common]
    rest = [name for name in allowed if name in common]
    if rest and own:
        return f"{field.split('.')[-1]} takes {', '.join(own)} (and {', '.join(rest)})"
    return f"{field.split('.')[-1] if field != '(top level)' else 'a rule file'} takes {', '.join(allowed)}"


def _model_problems(data: Any, positions: Mapping[Path_, Position], where: str) -> tuple[RuleSet | None, list[FileProblem]]:
    """What the models check beyond the schema (expressions parse, a header fits its kind...)."""
    try:
        return RuleSet.model_validate(data), []
    except ValidationError as error:
        problems, seen = [], set()
        for found in error.errors():
            path = _data_path(data, found["loc"])
            message = found["msg"].removeprefix("Value error, ")
            if (path, message) in seen:
                continue
            seen.add((path, message))
            problems.append(FileProblem(
                _locate(where, positions, path),
                f"{_rule_label(path, data)}{'.'.join(map(str, path)) or '(top level)'}: {message}", hint=_FORMAT_HINT,
            ))
        return None, problems


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
    data, positions = parse_document(text, str(path), shipped=rules_dir().resolve() in path.parents)
    return _validate(data, positions, str(path)), positions


def _validate(data: Any, positions: dict, where: str) -> RuleSet:
    problems = _shape_problems(data, positions, where)
    problems += _schema_problems(data, positions, where)
    ruleset = None
    if not problems:  # the models would repeat the schema's findings
        ruleset, problems = _model_problems(data, positions, where)
    if problems or ruleset is None:
        raise RuleFileError.listing(problems, where=where)
    return ruleset


def _include_path(base: Path, name: str, where: str, *, top: bool = False) -> Path:
    if name.startswith(BUILTIN):  # a shipped rule set or fragment, from the installed package
        return builtin_path(name, where)
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
    """Resolve a validated file's includes, then compose it with them (:mod:`mapper.spec.compose`)."""
    where = str(path)
    parts: list[Part] = []
    for index, entry in enumerate(ruleset.include):
        name, when = (entry, None) if isinstance(entry, str) else (entry.path, entry.when)
        at = _locate(where, positions, ("include", index))
        try:
            included = _resolve(_include_path(base, name, at), stack, within)
        except RuleFileError as error:
            if error.where == where:  # about the include itself: say which entry
                error.where = at
            raise
        if when is not None:
            included = _only_when(included, when)
        parts.append(Part(included, name if name.startswith(BUILTIN) else str(base / name), at))
    return compose(
        ruleset, path, lambda *at: _locate(where, positions, at),
        lambda *at: positions.get(at, (0, 0))[0], parts,
    )


def _only_when(fragment: RuleSet, when: str) -> RuleSet:
    """The fragment with ``when`` joined to every rule's own condition (a conditional include)."""
    rules = []
    for op in fragment.ops:
        joined = f"({when}) and ({op.when})" if op.when else when
        rules.append(wrap(op.model_copy(update={"when": joined})))
    return fragment.model_copy(update={"rules": rules}).with_provenance(fragment)


def dump_rule_set(ruleset: RuleSet, *, fmt: str = "yaml") -> str:
    """Serialise a (flattened) rule set; loading the text gives an equal rule set."""
    data = ruleset.to_data()
    if fmt == "json":
        return json.dumps(data, indent=2) + "\n"
    return yaml.safe_dump(data, sort_keys=False, width=110)
