"""mapper: declarative, verified GPT-NeoX (incl. Transformer Engine) <-> HuggingFace conversion.

The library in five names::

    rules = mapper.load_rules("neox-te-to-hf-gpt-neox")    # or a path to your own YAML
    plan = mapper.compile(rules, state_dict_or_reader, parameters)   # metadata only
    print(plan.explain())
    result = mapper.convert(rules, state_dict_or_reader, parameters)
    back = mapper.convert(rules.invert(), result.tensors, parameters, sidecar=result.sidecar)
    mapper.convert_checkpoint("checkpoints/", "hf-out/")      # folders: detect, convert, write
"""

from mapper.version import __version__

from mapper.checkpoints import convert_checkpoint
from mapper.convert import Conversion, compile, convert
from mapper.engine import Plan, Sidecar
from mapper.errors import (
    CheckpointError,
    CompileError,
    ConversionError,
    MapperError,
    RuleFileError,
    UnsafeCheckpointError,
    VerificationFailed,
)
from mapper.spec import RuleSet, load_rules


__all__ = [
    "CheckpointError", "CompileError", "Conversion", "ConversionError", "MapperError", "Plan",
    "RuleFileError", "RuleSet", "Sidecar", "UnsafeCheckpointError", "VerificationFailed",
    "compile", "convert", "convert_checkpoint", "load_rules",
]


def __getattr__(name: str) -> object:
    """``mapper.verify`` on first use (the README's ``mapper.verify.verify_checkpoints(...)``)."""
    if name == "verify":
        import importlib

        return importlib.import_module("mapper.verify")
    raise AttributeError(f"module 'mapper' has no attribute {name!r}")
