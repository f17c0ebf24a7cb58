"""The rule format: models (single source of truth), loading with precise errors, the schema."""

from __future__ import annotations

import os
from pathlib import Path

from mapper.errors import RuleFileError
from mapper.resources import rules_dir
from mapper.spec.compose import BUILTIN
from mapper.spec.loader import dump_rule_set, load_rule_file, load_rule_text
from mapper.spec.models import RuleSet


def builtin_rule_files() -> dict[str, Path]:
    """Shipped rule sets by name (``rules/<name>.yaml``; fragments live in subfolders)."""
    return {path.stem: path for path in sorted(rules_dir().glob("*.yaml"))}


def looks_like_a_path(name: str | Path) -> bool:
    """A slash or a rule-file suffix: ``name`` means a file, never a shipped rule set."""
    text = str(name)
    return isinstance(name, Path) or "/" in text or os.sep in text or Path(text).suffix in {".yaml", ".yml", ".json"}


def load_rules(name_or_path: str | Path) -> RuleSet:
    """A shipped rule set by name, or a rule file by path; includes resolved, checked.

    A shipped rule set's name wins over a file or folder of that name in the current folder
    (which could change what a conversion does without the user knowing); to load such a file,
    write it as a path (``./NAME``). ``builtin:NAME`` names a shipped rule set or fragment as an
    `include` does.
    """
    if str(name_or_path).startswith(BUILTIN):
        return load_rule_file(str(name_or_path))
    builtin = builtin_rule_files()
    if not looks_like_a_path(name_or_path) and str(name_or_path) in builtin:
        return load_rule_file(builtin[str(name_or_path)])
    path = Path(name_or_path)
    if looks_like_a_path(name_or_path) or path.exists():
        return load_rule_file(path)
    import difflib

    close = difflib.get_close_matches(str(name_or_path), builtin, n=3)
    raise RuleFileError(
        f"no rule set named {str(name_or_path)!r} and no such file",
        hint=(f"did you mean {', '.join(close)}? " if close else "")
        + "`mapper rules list` shows the shipped rule sets",
    )


__all__ = ["RuleSet", "builtin_rule_files", "dump_rule_set", "load_rule_file", "load_rule_text", "load_rules"]
