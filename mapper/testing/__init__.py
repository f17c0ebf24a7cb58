"""Test support: deterministic synthetic NeoX checkpoints of every variant (see :mod:`.synth`)."""

from __future__ import annotations

from mapper.testing.synth import (
    SHIPPED_RULE_SET,
    VARIANTS,
    ExtraState,
    Naming,
    Variant,
    fp8_extra_state_is_synthetic,
    rotary_inv_freq_of,
    synthesize_neox,
    synthesize_variant,
    tiny_config,
    variant,
)

__all__ = [
    "SHIPPED_RULE_SET",
    "VARIANTS",
    "ExtraState",
    "Naming",
    "Variant",
    "fp8_extra_state_is_synthetic",
    "rotary_inv_freq_of",
    "synthesize_neox",
    "synthesize_variant",
    "tiny_config",
    "variant",
]

from mapper.testing.disk import write_neox_checkpoint  # noqa: E402

__all__ += ["write_neox_checkpoint"]
