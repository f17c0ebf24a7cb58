"""Errors for people: every error says where (file, key, rule), what was expected, and a fix.

All of mapper's errors derive from :class:`MapperError`. The command line prints ``str(error)``
without a traceback (unless ``--debug``) and exits with :attr:`MapperError.exit_code`:
2 for bad input of any kind, 1 for a verification that ran and failed.

Messages quote what they found (keys, file names), and those come from files anyone may have
written: ``str(error)`` shows control characters escaped (:func:`printable`), so a tensor key
holding ANSI escape sequences cannot recolour, move or clear the user's terminal, nor forge a
line of output.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# C0 and C1 controls, DEL, and the Unicode line separators and bidirectional overrides
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_CONTROL_BUT_NEWLINE = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def printable(text: str, *, newlines: bool = False) -> str:
    """``text`` with control characters written as escapes (``\\x1b``, ``\\u202e``); with
    ``newlines``, line breaks are kept."""
    pattern = _CONTROL_BUT_NEWLINE if newlines else _CONTROL
    return pattern.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


class MapperError(Exception):
    """A problem with the input that a person can fix.

    ``where`` is a short location ("rules/x.yaml:12:5", "layer_02.mlp.fc1_weight@rank1", ...)
    printed before the message; ``hint`` says how to fix it.
    """

    exit_code: int = 2

    def __init__(self, message: str, *, where: str | Path | None = None, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.where = str(where) if where is not None else None
        self.hint = hint

    def __str__(self) -> str:
        message = printable(self.message, newlines=True)
        text = f"{printable(self.where)}: {message}" if self.where else message
        if self.hint:
            text += f"\n  hint: {printable(self.hint, newlines=True)}"
        return text


class RuleFileError(MapperError):
    """A rule file that cannot be read, fails the schema, or makes no sense (bad op, cycle...)."""

    @classmethod
    def listing(cls, problems: Sequence[FileProblem], *, where: str | Path | None = None) -> RuleFileError:
        """One error naming every problem, in file order (one problem: just that one)."""
        ordered = sorted(problems, key=lambda p: file_order(p.where))
        hints = "; ".join(dict.fromkeys(p.hint for p in ordered if p.hint)) or None
        if len(ordered) == 1:
            return cls(ordered[0].message, where=ordered[0].where, hint=hints)
        shown = "\n".join(f"  - {p.where}: {p.message}" for p in ordered)
        return cls(f"{len(ordered)} problems:\n{shown}", where=where or file_order(ordered[0].where)[0], hint=hints)


@dataclass(frozen=True)
class FileProblem:
    """One problem of a rule file: ``file:line:column``, what is wrong, how to fix it."""

    where: str
    message: str
    hint: str | None = None


_LOCATION = re.compile(r"^(.*?)(?::(\d+))?(?::(\d+))?$")


def file_order(where: str) -> tuple[str, int, int]:
    """(file, line, column) of a `file:line:column` location, for sorting problems in file order."""
    found = _LOCATION.match(where)
    assert found is not None  # the pattern matches any text
    return found.group(1), int(found.group(2) or 0), int(found.group(3) or 0)


@dataclass(frozen=True)
class Problem:
    """One finding of the compiler: what is wrong, for which key, and the rule (id and where it
    was written) it concerns or that comes nearest."""

    message: str
    key: str | None = None
    rule: str | None = None  # a rule id
    hint: str | None = None
    origin: str | None = None  # where the rule was written: "file:line (rule n, op)"

    def __str__(self) -> str:
        return _finding(self.origin, self.rule, self.key, self.message, self.hint)

    def to_dict(self) -> dict[str, str | None]:
        return {"key": self.key, "message": self.message, "rule": self.rule, "origin": self.origin, "hint": self.hint}


def _finding(origin: str | None, rule: str | None, subject: str | None, message: str, hint: str | None) -> str:
    """``file:line (rule n, op) [rule id]: key: message`` -- the place to edit comes first."""
    text = ""
    if origin:
        text = f"{origin} [{rule}]: " if rule else f"{origin}: "
    elif rule:
        text = f"rule {rule}: "
    text += f"{printable(subject)}: {message}" if subject else message
    if hint:
        text += f"\n      hint: {hint}"
    return text


@dataclass(frozen=True)
class ProblemGroup:
    """Problems that say the same thing (same message and rule) about keys of one shape:
    ``layer_*.attention.qkv.{key,query,value}_{bias,weight}@rank*`` stands for 24 keys."""

    message: str
    pattern: str | None
    keys: tuple[str, ...]
    rule: str | None = None
    origin: str | None = None
    hint: str | None = None

    SHOWN_KEYS = 3  # a group of at most this many keys names each of them

    def __str__(self) -> str:
        if len(self.keys) <= 1:
            subject, message = (self.keys[0] if self.keys else None), self.message
        else:
            listed = (f": {', '.join(self.keys)}" if len(self.keys) <= self.SHOWN_KEYS else f", e.g. {self.keys[0]}")
            subject, message = self.pattern, f"{self.message} ({len(self.keys)} tensors{listed})"
        return _finding(self.origin, self.rule, subject, message, self.hint)

    def to_dict(self) -> dict[str, object]:
        return {"pattern": self.pattern, "message": self.message, "count": len(self.keys), "keys": list(self.keys),
                "rule": self.rule, "origin": self.origin, "hint": self.hint}


def group_problems(problems: Sequence[Problem]) -> list[ProblemGroup]:
    """One group per thing said (message, rule, hint) and pattern of keys
    (:func:`mapper.keyfold.fold_keys`), in the order the first problem of each was found."""
    from mapper.keyfold import fold_keys

    families: dict[tuple, list[tuple[int, Problem]]] = {}
    for index, problem in enumerate(problems):
        families.setdefault((problem.message, problem.rule, problem.origin, problem.hint), []).append((index, problem))
    groups: list[tuple[int, ProblemGroup]] = []
    for (message, rule, origin, hint), found in families.items():
        first = {}
        for index, problem in found:
            if problem.key is None:
                groups.append((index, ProblemGroup(message, None, (), rule, origin, hint)))
            else:
                first.setdefault(problem.key, index)
        for pattern, keys in fold_keys(list(first)):
            groups.append((min(first[k] for k in keys), ProblemGroup(message, pattern, tuple(keys), rule, origin, hint)))
    return [group for _, group in sorted(groups, key=lambda item: item[0])]


class CompileError(MapperError):
    """A rule set does not fit a checkpoint. Holds *all* problems found, not just the first;
    says them grouped (one line per pattern, with a count and an example key)."""

    SHOWN = 50

    def __init__(self, problems: list[Problem], *, where: str | None = None):
        self.problems = list(problems)
        self.groups = group_problems(self.problems)
        shown = "\n".join(f"  - {g}" for g in self.groups[: self.SHOWN])
        more = f"\n  ... and {len(self.groups) - self.SHOWN} more" if len(self.groups) > self.SHOWN else ""
        noun = "problem" if len(self.problems) == 1 else "problems"
        kinds = "" if len(self.groups) == len(self.problems) else f" of {len(self.groups)} kind{'s' * (len(self.groups) > 1)}"
        super().__init__(
            f"the rule set does not fit this checkpoint ({len(self.problems)} {noun}{kinds}):\n{shown}{more}",
            where=where,
            hint="fix the rules or pick the right rule set (`mapper detect`, `mapper plan` show the evidence)",
        )

    def to_dict(self) -> dict[str, object]:
        """Every problem, grouped, each group with every key (``--json``)."""
        return {"where": self.where, "problems": len(self.problems), "groups": [g.to_dict() for g in self.groups]}


class CheckpointError(MapperError):
    """A checkpoint file or folder that is missing, malformed, inconsistent or unsafe."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle that would import or call something not on the allow-list. It was not run."""


class ConversionError(MapperError):
    """A conversion that cannot proceed: tensor values break a rule's contract, output exists..."""


class VerificationFailed(MapperError):
    """A verification ran to the end and found the converted model differs. Exit code 1."""

    exit_code = 1
