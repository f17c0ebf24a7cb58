"""mapper: declarative, verified GPT-NeoX (incl. Transformer Engine) <-> HuggingFace conversion.

The library in five names::

    rules = mapper.load_rules("neox-te-to-hf-gpt-neox")    # or a path to your own YAML
    plan = mapper.compile(rules, state_dict_or_reader, parameters)   # metadata only
    print(plan.explain())
    result = mapper.convert(rules, state_dict_or_reader, parameters)
    back = mapper.convert(rules.invert(), result.tensors, parameters, sidecar=result.sidecar)
"""

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

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "CompileError", "Conversion", "ConversionError", "MapperError", "Plan",
    "RuleFileError", "RuleSet", "Sidecar", "UnsafeCheckpointError", "VerificationFailed",
    "compile", "convert", "load_rules",
]
