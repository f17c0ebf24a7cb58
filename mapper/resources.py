"""Where the shipped rule sets and the JSON Schema live, in a checkout and in an installed wheel.

A checkout (or an editable install) reads the top-level ``rules/`` and ``schemas/`` folders in
place; a wheel carries copies under ``mapper/_data/`` (see ``setup.py``).
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def data_dir(name: str) -> Path:
    """``rules`` or ``schemas``: the installed copy if there is one, else the checkout's."""
    installed = _PACKAGE / "_data" / name
    if installed.is_dir():
        return installed
    return _PACKAGE.parent / name


def rules_dir() -> Path:
    return data_dir("rules")


def schema_path() -> Path:
    return data_dir("schemas") / "ruleset.v1.json"
