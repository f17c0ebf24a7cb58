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


@dataclass(frozen=True)
class Problem:
    """One finding of the compiler: what is wrong, for which key, and the nearest rule."""

    message: str
    key: str | None = None
    rule: str | None = None
    hint: str | None = None

    def __str__(self) -> str:
        text = f"{printable(self.key)}: {self.message}" if self.key else self.message
        if self.rule:
            text += f" [{self.rule}]"
        if self.hint:
            text += f"\n      hint: {self.hint}"
        return text


class CompileError(MapperError):
    """A rule set does not fit a checkpoint. Holds *all* problems found, not just the first."""

    def __init__(self, problems: list[Problem], *, where: str | None = None):
        self.problems = list(problems)
        shown = "\n".join(f"  - {p}" for p in self.problems[:50])
        more = f"\n  ... and {len(self.problems) - 50} more" if len(self.problems) > 50 else ""
        noun = "problem" if len(self.problems) == 1 else "problems"
        super().__init__(
            f"the rule set does not fit this checkpoint ({len(self.problems)} {noun}):\n{shown}{more}",
            where=where,
            hint="fix the rules or pick the right rule set (`mapper detect`, `mapper plan` show the evidence)",
        )


class CheckpointError(MapperError):
    """A checkpoint file or folder that is missing, malformed, inconsistent or unsafe."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle that would import or call something not on the allow-list. It was not run."""


class ConversionError(MapperError):
    """A conversion that cannot proceed: tensor values break a rule's contract, output exists..."""


class VerificationFailed(MapperError):
    """A verification ran to the end and found the converted model differs. Exit code 1."""

    exit_code = 1
