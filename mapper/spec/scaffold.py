"""``mapper rules new``: start a rule set for a new variant from a shipped one (or any rule file).

It writes one file that *includes* the base by reference (``builtin:NAME`` for a shipped rule
set, a relative path for a file of the user's), so the new rule set holds only what differs and
picks up fixes to the shipped parts; comments say how to exclude, replace and add rules. Nothing
else is written, so any number of rule sets can share a folder.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path

from mapper.errors import MapperError
from mapper.spec import builtin_rule_files, load_rule_file
from mapper.spec.compose import BUILTIN, builtin_path, builtin_reference

_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")

_GUIDE = """\
# Only what differs from {base} goes below (README: "Walk-through: a rule set for a new key layout").
#   exclude: [RULE_ID]            drop an included rule; `mapper rules show {shown}` lists the ids
#   replace: {{RULE_ID: [rules]}}   rules that run in an included rule's place (its stage and `when`)
#   rules: [...]                  your own rules; each runs in its stage: ranks (per TP rank, `...@rank{{r}}`),
#                                 then merge (the TP merge), then model, whatever the order you write them in
# The config supplies num_layers, tp, hidden_size, num_heads, head_dim, ... without declarations:
# `mapper rules params CHECKPOINT` lists them with their values.
"""


def scaffold(name: str, base: str, out_dir: Path, *, force: bool = False) -> Path:
    """Write ``out_dir/<name>.yaml`` including ``base`` (a shipped name or a rule file); returns its path."""
    if not _NAME.match(name):
        raise MapperError(f"rule set name {name!r} is not lower-case letters, digits, '.', '_' or '-'",
                          hint="e.g. neox-te-myfork-to-hf-gpt-neox")
    target = out_dir / f"{name}.yaml"
    source = _base_file(base)
    if source.resolve() == target.resolve():
        raise MapperError(f"--from {base} is the file `rules new` would write", hint="choose another NAME or --out")
    if target.exists() and not force:
        raise MapperError(f"{target} exists", hint="choose another NAME or --out folder, or --force to overwrite it")
    based_on = load_rule_file(source)
    if based_on.kind == "fragment":
        raise MapperError(f"--from {base} is a fragment, not a rule set",
                          hint="start from a rule set (`mapper rules list`) and include the fragment in it")
    reference = builtin_reference(source) or Path(os.path.relpath(source.resolve(), out_dir.resolve())).as_posix()
    text = (
        f"schema_version: 1\nname: {name}\nversion: 0.1.0\n"
        f"description: TODO say which variant this converts (from {based_on.name} {based_on.version}).\n"
        f"include: [{reference}]\n"
        + _GUIDE.format(base=based_on.name, shown=reference if reference.startswith(BUILTIN) else source)
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    load_rule_file(target)  # the scaffold is valid as written
    return target


def _base_file(base: str) -> Path:
    """The rule file ``--from`` names: a shipped rule set (``NAME`` or ``builtin:NAME``) or a path."""
    shipped = builtin_rule_files()
    name = base.removeprefix(BUILTIN)
    if name in shipped:
        return shipped[name]
    if base.startswith(BUILTIN):  # a shipped fragment (refused as a base), or a did-you-mean
        return builtin_path(base, "--from")
    path = Path(base)
    if path.is_file():
        return path
    close = difflib.get_close_matches(name, shipped, n=3)
    raise MapperError(
        f"--from {base}: no shipped rule set of that name and no such file",
        hint=(f"did you mean {', '.join(close)}? " if close else "") + "`mapper rules list` shows the shipped rule sets",
    )
