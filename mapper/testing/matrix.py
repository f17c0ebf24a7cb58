"""Every combination of GPT-NeoX's Transformer Engine switches, on both architectures.

The switches are independent NeoX config flags and gpt-neox validates none of their mixes, so
every mix can exist on disk: ``norm`` (NeoX's own or TE's norm modules) x ``te_mha`` x
``te_layernorm_mlp`` x ``te_columnparallel`` x ``te_rowparallel``, on the GPT-NeoX architecture
(LayerNorm, GELU, ``gpt_j_residual`` either way) and the Llama architecture (RMSNorm, SwiGLU,
GQA). :func:`switch_matrix` lists them; :meth:`SwitchCase.config` gives a tiny model of one.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Literal

from mapper.configs import NeoXModelConfig
from mapper.testing.synth import tiny_config

Architecture = Literal["gpt-neox", "llama"]


@dataclass(frozen=True)
class SwitchCase:
    """One mix of switches on one architecture."""

    architecture: Architecture
    te_norm: bool
    te_mha: bool
    te_layernorm_mlp: bool
    te_columnparallel: bool
    te_rowparallel: bool
    gpt_j_residual: bool = False

    @property
    def norm(self) -> str:
        family = "layernorm" if self.architecture == "gpt-neox" else "rmsnorm"
        return f"te_{family}" if self.te_norm else family

    @property
    def name(self) -> str:
        flags = [self.norm] + [flag for flag in ("te_mha", "te_layernorm_mlp", "te_columnparallel", "te_rowparallel",
                                                 "gpt_j_residual") if getattr(self, flag)]
        return f"{self.architecture}:" + "+".join(flags)

    @property
    def rule_set(self) -> str:
        """The shipped rule set that converts it (whatever the switches)."""
        return "neox-to-hf-gpt-neox" if self.architecture == "gpt-neox" else "neox-llama-to-hf-llama"

    def config(self, *, tp: int = 1, **overrides: Any) -> NeoXModelConfig:
        """A tiny model with these switches (GPT-NeoX: the `neox-sequential` variant's sizes; Llama:
        `llama-new`'s, GQA with 4 heads and 2 kv heads and NeoX's stock rms-norm-epsilon 1e-6)."""
        base = "neox-sequential" if self.architecture == "gpt-neox" else "llama-new"
        switches = dict(norm=self.norm, te_mha=self.te_mha, te_layernorm_mlp=self.te_layernorm_mlp,
                        te_columnparallel=self.te_columnparallel, te_rowparallel=self.te_rowparallel,
                        gpt_j_residual=self.gpt_j_residual)
        return tiny_config(base, tp=tp, **{**switches, **overrides})


def switch_matrix() -> list[SwitchCase]:
    """All 96 cases: 2 norms x 2^4 TE module switches x (GPT-NeoX: both residual modes; Llama: sequential)."""
    cases = []
    for architecture in ("gpt-neox", "llama"):
        residuals = (False, True) if architecture == "gpt-neox" else (False,)
        for flags in itertools.product((False, True), repeat=5):
            for residual in residuals:
                cases.append(SwitchCase(architecture, *flags, gpt_j_residual=residual))  # type: ignore[arg-type]
    return cases
