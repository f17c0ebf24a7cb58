"""mapper: declarative, verified GPT-NeoX (incl. Transformer Engine) <-> HuggingFace conversion.

The library in five names::

    rules = mapper.load_rules("neox-te-to-hf-gpt-neox")    # or a path to your own YAML
    plan = mapper.compile(rules, state_dict_or_reader, parameters)   # metadata only
    print(plan.explain())
    result = mapper.convert(rules, state_dict_or_reader, parameters)
    back = mapper.convert(rules.invert(), result.tensors, parameters, sidecar=result.sidecar)
    mapper.convert_checkpoint("checkpoints/", "hf-out/")      # folders: detect, convert, write

The names that need torch are imported on first use, so ``import mapper`` (and ``mapper
--version``, ``mapper --help``) does not pay torch's start-up of several seconds.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

from mapper.version import __version__

from mapper.errors import (  # noqa: E402 -- cheap, no torch
    CheckpointError,
    CompileError,
    ConversionError,
    MapperError,
    RuleFileError,
    UnsafeCheckpointError,
    VerificationFailed,
)

_LAZY = {
    "convert_checkpoint": "mapper.checkpoints",
    "Conversion": "mapper.convert",
    "compile": "mapper.convert",
    "convert": "mapper.convert",
    "Plan": "mapper.engine",
    "Sidecar": "mapper.engine",
    "RuleSet": "mapper.spec",
    "load_rules": "mapper.spec",
}

__all__ = [
    "CheckpointError", "CompileError", "Conversion", "ConversionError", "MapperError", "Plan",
    "RuleFileError", "RuleSet", "Sidecar", "UnsafeCheckpointError", "VerificationFailed",
    "compile", "convert", "convert_checkpoint", "load_rules",
]


def __getattr__(name: str) -> object:
    """The library's names on first use; ``mapper.verify`` (the README's
    ``mapper.verify.verify_checkpoints(...)``) likewise."""
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name == "verify":
        return importlib.import_module("mapper.verify")
    raise AttributeError(f"module 'mapper' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY, "verify"})


class _Package(ModuleType):
    """``mapper.convert`` is the function, also once the submodule of that name is imported
    (the import system binds a submodule on its package; here the function keeps the name)."""

    def __setattr__(self, name: str, value: object) -> None:
        if name in _LAZY and isinstance(value, ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
