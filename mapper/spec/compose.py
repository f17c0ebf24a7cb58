"""Composing one rule file with what it includes: shipped parts by reference, overrides, stages.

A rule set holds only what differs from the parts it includes:

- ``include: [builtin:neox-to-hf-gpt-neox]`` (a shipped rule set) or ``builtin:gpt-neox/tp-merge``
  (a shipped fragment) is read from the installed package, so fixes to the shipped files reach it;
- ``exclude: [ID]`` drops an included rule, ``replace: {ID: [rules]}`` puts other rules in its place
  (its position, stage and ``when``); a fragment's name stands for every rule it wrote;
- every rule has a **stage**: ``ranks`` (per TP rank, keys ``...@rank{r}``), ``merge`` (joining the
  ranks) or ``model`` (whole tensors): its own ``stage`` (one its keys contradict is an error), else
  the one its ``@rank`` keys show, else (no ``@rank`` key) its file's ``stage``, else ``model``. A file that includes others runs stage by
  stage: its included rules and its own interleave by stage (each included file's rules in their
  order, then the file's own rules sorted by stage), so a rule set's own per-rank rules run
  before the shipped TP merge wherever they are written. A file that includes nothing runs its
  rules in the order written (and so does a flattened rule set, or an inverted one). A rule set
  converting *to* NeoX composes its stages the other way round: model, merge, ranks.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mapper.errors import FileProblem, RuleFileError
from mapper.ops import Op
from mapper.ops.base import Stage
from mapper.resources import rules_dir
from mapper.spec.models import Override, RuleSet, unwrap, wrap

BUILTIN = "builtin:"
STAGES: tuple[Stage, ...] = ("ranks", "merge", "model")
_BUILTIN_NAME = re.compile(r"[a-z0-9][a-z0-9._-]*(/[a-z0-9][a-z0-9._-]*)*")

Locate = Callable[..., str]  # path in the document -> "file:line:column"


# --- shipped parts by reference ------------------------------------------------------------
def builtin_names() -> list[str]:
    """Every name ``builtin:`` accepts: the shipped rule sets, then the fragments (``gpt-neox/tp-merge``)."""
    root = rules_dir()
    fragments = root / "fragments"
    return [p.stem for p in sorted(root.glob("*.yaml"))] + [
        p.relative_to(fragments).with_suffix("").as_posix() for p in sorted(fragments.rglob("*.yaml"))
    ]


def builtin_path(reference: str, where: str) -> Path:
    """The shipped file ``builtin:NAME`` names: ``rules/NAME.yaml``, else ``rules/fragments/NAME.yaml``."""
    name = reference[len(BUILTIN):].strip().removesuffix(".yaml")
    root = rules_dir().resolve()
    if _BUILTIN_NAME.fullmatch(name):
        for candidate in (root / f"{name}.yaml", root / "fragments" / f"{name}.yaml"):
            if candidate.is_file():
                return candidate
    close = difflib.get_close_matches(name, builtin_names(), n=3, cutoff=0.5)
    raise RuleFileError(
        f"no shipped rule set or fragment named {reference!r}", where=where,
        hint=(f"did you mean {', '.join(BUILTIN + c for c in close)}? " if close else "")
        + "shipped rule sets are `builtin:NAME` (`mapper rules list`), fragments `builtin:FOLDER/NAME` as under "
        "rules/fragments/ (e.g. builtin:gpt-neox/tp-merge)",
    )


def builtin_reference(path: Path) -> str | None:
    """``builtin:...`` for a file of the shipped rules, else None."""
    root = rules_dir().resolve()
    resolved = path.resolve()
    for folder in (root / "fragments", root):
        if resolved.parent == folder or (folder.name == "fragments" and folder in resolved.parents):
            return BUILTIN + resolved.relative_to(folder).with_suffix("").as_posix()
    return None


# --- stages --------------------------------------------------------------------------------
def keys_stage(op: Op) -> Stage:
    """The stage an op's key patterns show: per-rank keys on both sides, on one side, or none."""
    ranked_in = any("@rank" in p for p in op.input_patterns())
    ranked_out = any("@rank" in p for p in op.output_patterns())
    if op.input_patterns() and op.output_patterns() and ranked_in != ranked_out:
        return "merge"
    return "ranks" if ranked_in or ranked_out else "model"


def stage_problem(op: Op, stage: Stage) -> str | None:
    """Why ``op`` cannot run in ``stage``, when its keys say so."""
    shown = keys_stage(op)
    if stage == "model" and shown != "model":
        return ("is in stage model but its keys are per TP rank (`@rank`), which exist only before the TP "
                f"merge: it belongs in stage {shown}")
    if stage == "ranks" and shown == "merge":
        return "is in stage ranks but joins or splits TP ranks (`@rank` on one side only): it belongs in stage merge"
    return None


def stage_order(source: str | None, target: str | None) -> tuple[Stage, ...]:
    """ranks, merge, model; the other way round for a rule set converting to NeoX."""
    return STAGES[::-1] if target == "neox" and source != "neox" else STAGES


def merge_by_stage(sequences: Sequence[Sequence[Op]], order: Sequence[Stage]) -> list[Op]:
    """Interleave rule sequences by stage, each keeping its own order: the next rule is the head
    with the earliest stage, from the earliest sequence on a tie (included files before own rules)."""
    rank = {stage: index for index, stage in enumerate(order)}
    heads = [0] * len(sequences)
    merged: list[Op] = []
    while True:
        best: tuple[int, int] | None = None
        for k, sequence in enumerate(sequences):
            if heads[k] < len(sequence):
                op = sequence[heads[k]]
                stage = rank[op.stage or keys_stage(op)]
                if best is None or stage < best[0]:
                    best = (stage, k)
        if best is None:
            return merged
        merged.append(sequences[best[1]][heads[best[1]]])
        heads[best[1]] += 1


# --- one file with its includes ------------------------------------------------------------
@dataclass
class Part:
    """An included file, already flattened (its ``when`` joined to its rules)."""

    rules: RuleSet
    label: str  # the include as written, resolved against the including file's folder
    where: str  # file:line of the include entry


def compose(ruleset: RuleSet, path: Path, locate: Locate, line_of: Callable[..., int], parts: list[Part]) -> RuleSet:
    """The flat rule set of one validated file: its parts' rules with its overrides applied and
    its own rules, in stage order, with ids, stages, origins and the overrides recorded."""
    where = str(path)
    problems: list[FileProblem] = []
    own, origins, authors = _own_rules(ruleset, where, locate, line_of, problems)
    overrides: list[Override] = []
    for part in parts:
        for rule_id in sorted(set(part.rules._origins) & own.ids):
            problems.append(FileProblem(
                origins[rule_id].split(" (")[0], f"rule id {rule_id!r} is already the id of an included rule",
                hint="give the rule another `id` (to put a rule in an included rule's place, use `replace`)",
            ))
        origins.update(part.rules._origins)
        authors.update(part.rules._authors)
        overrides.extend(part.rules.overrides)

    sequences = _overridden(ruleset, parts, own, origins, authors, locate, overrides, problems)
    sequences.append(own.rules)
    parameters, placeholders, header = _definitions(ruleset, parts, where, locate, problems)
    if problems:
        raise RuleFileError.listing(problems, where=where)

    order = stage_order(header["source"], header["target"])
    if parts:  # composed: each rule in its stage (own rules too); alone, a file runs as written
        rank = {stage: index for index, stage in enumerate(order)}
        sequences[-1].sort(key=lambda op: rank[op.stage or keys_stage(op)])
    rules = merge_by_stage(sequences, order)
    seen: dict[str, str] = {}
    for op in rules:
        assert op.id is not None
        if op.id in seen:
            raise RuleFileError(
                f"rule id {op.id!r} occurs twice ({seen[op.id]} and {origins.get(op.id)})",
                where=where, hint="a fragment was included twice, or two rules share an explicit `id`",
            )
        seen[op.id] = origins.get(op.id, "")
    flat = ruleset.model_copy(update={
        "include": [], "exclude": [], "replace": {}, "stage": None, "rules": [wrap(op) for op in rules],
        "parameters": parameters, "placeholders": placeholders, **header,
    })
    flat._origins, flat._authors, flat._overrides = origins, authors, overrides
    return flat


def _overridden(
    ruleset: RuleSet, parts: list[Part], own: _OwnRules, origins: Mapping[str, str], authors: Mapping[str, str],
    locate: Locate, overrides: list[Override], problems: list[FileProblem],
) -> list[list[Op]]:
    """Each part's rules with this file's `exclude` and `replace` applied (recorded in ``overrides``)."""
    included = [op for part in parts for op in part.rules.ops]
    by_id = {op.id: op for op in included}
    removed: dict[str, str] = {}  # included rule id -> the entry (file:line) that removed it
    spliced: dict[str, list[Op]] = {}  # included rule id -> the rules that run in its place
    for index, name in enumerate(ruleset.exclude):
        entry = locate("exclude", index)
        for rule_id in _targets(name, included, authors, entry, problems, removed):
            removed[rule_id] = entry
            overrides.append(Override(rule_id, origins.get(rule_id, ""), entry))
    for name in ruleset.replace:
        entry = locate("replace", name)
        targets = _targets(name, included, authors, entry, problems, removed)
        if not targets:
            continue
        first = by_id[targets[0]]
        its_stage = first.stage or keys_stage(first)
        replacements = []
        for op in own.replacing.get(name, []):
            if op.stage is not None and op.stage != its_stage:
                problems.append(FileProblem(
                    origins[op.id or ""].split(" (")[0],
                    f"rule {op.id} says stage {op.stage}, but it replaces {first.id}, which runs in stage {its_stage}",
                    hint="a replacement runs where the rule it replaces ran; drop its `stage`, or `exclude` the "
                    "rule and add yours under `rules`",
                ))
            when = f"({first.when}) and ({op.when})" if first.when and op.when else first.when or op.when
            replacements.append(op.model_copy(update={"stage": its_stage, "when": when}))
        removed.update((rule_id, entry) for rule_id in targets)
        spliced[targets[0]] = replacements
        overrides.append(Override(targets[0], origins.get(targets[0], ""), entry, tuple(op.id or "" for op in replacements)))
        overrides.extend(Override(t, origins.get(t, ""), entry) for t in targets[1:])

    sequences = []
    for part in parts:
        sequence: list[Op] = []
        for op in part.rules.ops:
            sequence.extend(spliced.get(op.id or "", []))
            if op.id not in removed:
                sequence.append(op)
        sequences.append(sequence)
    return sequences


def _definitions(
    ruleset: RuleSet, parts: list[Part], where: str, locate: Locate, problems: list[FileProblem],
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Parameters and placeholders of the file and its parts; the header it takes from an included rule set."""
    parameters = dict(ruleset.parameters)
    placeholders = dict(ruleset.placeholders)
    defined: dict[tuple[str, str], str] = {}
    header = {"source": ruleset.source, "target": ruleset.target, "variant": ruleset.variant}
    for part in parts:
        _merge(parameters, part.rules.parameters, "parameter", part.label, where, defined, problems)
        _merge(placeholders, part.rules.placeholders, "placeholder", part.label, where, defined, problems)
        if part.rules.kind != "fragment":
            _inherit(header, part, problems)
    if ruleset.kind != "fragment":
        missing = [name for name in ("source", "target") if not header[name]]
        if missing:
            problems.append(FileProblem(
                locate(), f"a rule set needs {', '.join(missing)}",
                hint="say it in the header, include a rule set that says it (e.g. builtin:neox-to-hf-gpt-neox), "
                "or set kind: fragment",
            ))
        if ruleset.version is None:
            problems.append(FileProblem(locate(), "a rule set needs version (e.g. version: 0.1.0)",
                                        hint="or set kind: fragment"))
    return parameters, placeholders, header


@dataclass
class _OwnRules:
    """A file's own rules, with ids and stages: under ``rules``, and under ``replace`` by entry."""

    rules: list[Op] = field(default_factory=list)
    replacing: dict[str, list[Op]] = field(default_factory=dict)

    @property
    def ids(self) -> set[str | None]:
        return {op.id for op in self.rules} | {op.id for ops in self.replacing.values() for op in ops}


def _own_rules(
    ruleset: RuleSet, where: str, locate: Locate, line_of: Callable[..., int], problems: list[FileProblem],
) -> tuple[_OwnRules, dict[str, str], dict[str, str]]:
    """Ids (default: ``<name>#<n>``, n counting the file's rules top to bottom), stages, origins."""
    written: list[tuple[int, tuple[Any, ...], Op]] = [
        (line_of("rules", index), ("rules", index), op) for index, op in enumerate(ruleset.ops)
    ]
    for name, rules in ruleset.replace.items():
        written += [(line_of("replace", name, index), ("replace", name, index), unwrap(rule))
                    for index, rule in enumerate(rules)]
    written.sort(key=lambda item: item[0])
    own = _OwnRules()
    origins: dict[str, str] = {}
    authors: dict[str, str] = {}
    for number, (line, at, op) in enumerate(written):
        rule_id = op.id or f"{ruleset.name}#{number}"
        place = f"{where}:{line}"
        if rule_id in origins:
            problems.append(FileProblem(
                place, f"rule id {rule_id!r} occurs twice ({origins[rule_id]} and {place} (rule {number}, {op.name}))",
                hint="give each rule its own `id` (or none: the default is unique)",
            ))
            continue
        origins[rule_id] = f"{place} (rule {number}, {op.name})"
        authors[rule_id] = ruleset.name
        if at[0] == "replace":
            own.replacing.setdefault(at[1], []).append(op.model_copy(update={"id": rule_id}))
            continue
        shown = keys_stage(op)
        stage = op.stage or (shown if shown != "model" else ruleset.stage or shown)
        problem = stage_problem(op, stage) if op.stage else None
        if problem:
            problems.append(FileProblem(
                locate(*at), f"rule {rule_id} ({op.name}) {problem}",
                hint="fix its `stage`, or leave it out: a rule's `@rank` keys show where it runs",
            ))
        own.rules.append(op.model_copy(update={"id": rule_id, "stage": stage}))
    return own, origins, authors


def _targets(
    name: str, included: list[Op], authors: Mapping[str, str], entry: str, problems: list[FileProblem],
    removed: Mapping[str, str],
) -> list[str]:
    """The included rules an `exclude` / `replace` entry names: one id, or a fragment's rules."""
    ids = [op.id for op in included if op.id == name] or [op.id for op in included if authors.get(op.id or "") == name]
    if not ids:
        known = [op.id or "" for op in included] + sorted({authors.get(op.id or "", "") for op in included} - {""})
        close = _nearest_ids(name, known)
        problems.append(FileProblem(
            entry, f"no included rule (or fragment) is named {name!r}",
            hint=(f"did you mean {', '.join(close)}? " if close else "")
            + "`mapper rules show` on the included rule set lists its rule ids",
        ))
        return []
    twice = [i for i in ids if i in removed]
    if twice:
        problems.append(FileProblem(
            entry, f"{', '.join(twice)} is already replaced or excluded at {removed[twice[0]]}",
            hint="name each included rule in one `exclude` or `replace` entry only",
        ))
        return []
    return [i for i in ids if i is not None]


def _nearest_ids(name: str, known: list[str]) -> list[str]:
    """Ids like ``name``: same fragment first (``frag#3`` for ``frag#9``), then by spelling."""
    fragment = name.split("#")[0]
    same = [k for k in known if k.split("#")[0] == fragment and k != fragment]
    return same[:4] or difflib.get_close_matches(name, known, n=3, cutoff=0.5)


def _inherit(header: dict[str, Any], part: Part, problems: list[FileProblem]) -> None:
    """Take an included rule set's source, target and variant where this file gives none."""
    for name in ("source", "target"):
        theirs = getattr(part.rules, name)
        if header[name] is None:
            header[name] = theirs
        elif theirs is not None and header[name] != theirs:
            problems.append(FileProblem(
                part.where, f"includes rule set {part.rules.name}, which converts {part.rules.source} -> "
                f"{part.rules.target}, but this file says {name}: {header[name]}",
                hint=f"leave `{name}` out to take the included rule set's, or include a fragment instead",
            ))
    if not header["variant"]:
        header["variant"] = dict(part.rules.variant)


def _merge(
    into: dict, new: Mapping, what: str, source: str, where: str, defined: dict[tuple[str, str], str],
    problems: list[FileProblem],
) -> None:
    """Add a part's parameters or placeholders; ``defined`` records who defined each first."""
    for name, value in new.items():
        first = defined.get((what, name), where)
        if name in into and _meaning(into[name]) != _meaning(value):
            problems.append(FileProblem(
                where, f"fragments disagree on {what} {name!r}: {first} defines it as {_plain(into[name])}, "
                f"{source} as {_plain(value)}",
                hint=f"define {what} {name!r} the same way everywhere, or in one place",
            ))
            continue
        into[name] = value
        defined.setdefault((what, name), source)


def _meaning(value: Any) -> Any:
    """What a definition means: a parameter's description is not part of it."""
    return value.model_copy(update={"description": None}) if hasattr(value, "description") else value


def _plain(value: Any) -> str:
    """A parameter or placeholder as the rule file writes it."""
    if hasattr(value, "model_dump"):
        value = value.model_dump(exclude_none=True, by_alias=True)
    return json.dumps(value)
