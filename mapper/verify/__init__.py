"""Verification: the reference NeoX forward (and, later, comparisons against converted models)."""

from __future__ import annotations

from mapper.verify.reference import (
    LayerTensors,
    NeoXActivations,
    NormParams,
    apply_norm,
    neox_forward,
)

__all__ = ["LayerTensors", "NeoXActivations", "NormParams", "apply_norm", "neox_forward"]
