"""``mapper rules new``: start a rule set for a new variant from a shipped one.

The new rule set is a copy of the base file next to a copy of every shipped fragment, in the
same relative layout, so it is complete on its own: swap an include for another fragment, edit a
rule, add one. Nothing in Python changes: a new Transformer Engine variant is a YAML edit away.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from mapper.errors import MapperError
from mapper.resources import rules_dir
from mapper.spec import builtin_rule_files, load_rule_file

_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


def scaffold(name: str, base: str, out_dir: Path, *, force: bool = False) -> list[Path]:
    """Write ``out_dir/<name>.yaml`` and the fragments it needs; returns the files written."""
    if not _NAME.match(name):
        raise MapperError(f"rule set name {name!r} is not lower-case letters, digits, '.', '_' or '-'",
                          hint="e.g. neox-te-myfork-to-hf-gpt-neox")
    shipped = builtin_rule_files()
    if base not in shipped:
        raise MapperError(f"no shipped rule set named {base!r}", hint="`mapper rules list` shows them")
    root = rules_dir().resolve()
    sources = [shipped[base], *sorted((root / "fragments").rglob("*.yaml"))]
    targets = [out_dir / f"{name}.yaml"] + [out_dir / path.relative_to(root) for path in sources[1:]]
    clashes = [t for t in targets if t.exists()]
    if clashes and not force:
        raise MapperError(f"{clashes[0]} exists", hint="choose another --out folder, or --force to overwrite")
    text = sources[0].read_text()
    document = yaml.safe_load(text)
    header = {key: document[key] for key in ("schema_version", "kind", "name", "version", "description", "source",
                                             "target", "variant") if key in document}
    header.update(
        name=name,
        version="0.1.0",
        description=f"TODO: say which variant this converts (started from {base} {document.get('version')}).",
    )
    body = text[text.index("\ninclude:") + 1:] if "\ninclude:" in text else ""  # the include list as written
    for source, target in zip(sources, targets):
        target.parent.mkdir(parents=True, exist_ok=True)
        if source == sources[0]:
            target.write_text(yaml.safe_dump(header, sort_keys=False, width=110) + body)
        else:
            target.write_text(source.read_text())
    load_rule_file(targets[0])  # the scaffold is valid as written
    return targets
