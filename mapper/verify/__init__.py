"""Verification: a converted model against NeoX's forward (mapper's reading of it, or gpt-neox's own
activations dumped by ``neox_reference_dump.py``), point by point, streamed block by block."""

from __future__ import annotations

from mapper.verify.checkpoints import verify_against_reference, verify_checkpoints
from mapper.verify.compare import (
    Activations,
    Tolerances,
    compare,
    default_tolerances,
    hf_activations,
    repetition_score,
    verify_conversion,
)
from mapper.verify.dump import ReferenceDump, reference_script, write_builtin_dump
from mapper.verify.reference import (
    LayerTensors,
    LayoutUnknown,
    NeoXActivations,
    NeoXStages,
    NormParams,
    apply_norm,
    neox_forward,
)
from mapper.verify.report import Blame, Continuation, PointComparison, RuleRef, VerifyReport
from mapper.verify.settings import SettingCheck, check_settings

__all__ = [
    "Activations", "Blame", "Continuation", "LayerTensors", "LayoutUnknown", "NeoXActivations", "NeoXStages",
    "NormParams", "PointComparison", "ReferenceDump", "RuleRef", "SettingCheck", "Tolerances", "VerifyReport",
    "apply_norm", "check_settings", "compare", "default_tolerances", "hf_activations", "neox_forward",
    "reference_script", "repetition_score", "verify_against_reference", "verify_checkpoints", "verify_conversion",
    "write_builtin_dump",
]
