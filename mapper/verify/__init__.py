"""Verification: the reference NeoX forward and its point-by-point comparison with converted models."""

from __future__ import annotations

from mapper.verify.compare import (
    Activations,
    Tolerances,
    compare,
    default_tolerances,
    hf_activations,
    repetition_score,
    verify_conversion,
)
from mapper.verify.reference import (
    LayerTensors,
    NeoXActivations,
    NormParams,
    apply_norm,
    neox_forward,
)
from mapper.verify.report import Blame, Continuation, PointComparison, RuleRef, VerifyReport

__all__ = [
    "Activations", "Blame", "Continuation", "LayerTensors", "NeoXActivations", "NormParams", "PointComparison",
    "RuleRef", "Tolerances", "VerifyReport", "apply_norm", "compare", "default_tolerances", "hf_activations",
    "neox_forward", "repetition_score", "verify_conversion",
]
