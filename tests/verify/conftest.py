"""Convert synthetic NeoX checkpoints in memory and load them into stock transformers models.

Everything is built here from seeded random tensors (no downloads): ``convert_variant`` runs a rule
set over a synthetic variant and loads the result into an HF model made from
``config.to_hf_config``, the way a user's converted folder would be loaded.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import mapper
from mapper.configs import NeoXModelConfig
from mapper.configs.hf import TARGET_OF_RULES
from mapper.resources import rules_dir
from mapper.testing import synthesize_variant

@dataclass
class Converted:
    """A synthetic checkpoint, its conversion and the HF model holding the converted tensors."""

    config: NeoXModelConfig
    neox: dict[str, torch.Tensor]
    conversion: mapper.Conversion
    model: torch.nn.Module


def hf_model_for(config: NeoXModelConfig, tensors: dict[str, torch.Tensor], arch: str,
                 customize: Callable[[torch.nn.Module], None] | None = None,
                 hf_overrides: dict[str, Any] | None = None) -> torch.nn.Module:
    """A stock transformers model from ``config.to_hf_config`` with ``tensors`` loaded strictly.

    ``customize`` may change modules before loading (e.g. the custom MLP of a bug being modelled);
    ``hf_overrides`` changes config.json values (a wrong config is a mistake too).
    """
    hf = config.to_hf_config(arch, shapes={k: tuple(v.shape) for k, v in tensors.items()})  # type: ignore[arg-type]
    values = {k: v for k, v in {**hf, **(hf_overrides or {})}.items() if k not in ("model_type", "architectures")}
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **values)).eval()
    if customize is not None:
        customize(model)
    state = {("lm_head.weight" if k == "embed_out.weight" else k): v for k, v in tensors.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tied)]
    assert not missing and not unexpected, (missing, unexpected)
    if config.tied:
        model.tie_weights()
    return model


def convert_variant(variant: str, rules: str | Path | mapper.RuleSet, *, tp: int = 1, seed: int = 0,
                    customize: Callable[[torch.nn.Module], None] | None = None,
                    hf_overrides: dict[str, Any] | None = None, parameters: dict[str, int] | None = None,
                    **overrides: Any) -> Converted:
    """Synthesize ``variant``, convert it with ``rules`` (a shipped name, a path or a RuleSet), load it."""
    config, neox = synthesize_variant(variant, tp=tp, seed=seed, **overrides)
    ruleset = rules if isinstance(rules, mapper.RuleSet) else mapper.load_rules(rules)
    result = mapper.convert(ruleset, neox, {**config.rule_parameters(), **(parameters or {})})
    assert result.tensors is not None
    arch = TARGET_OF_RULES[ruleset.target or ""].arch
    return Converted(config, neox, result, hf_model_for(config, result.tensors, arch, customize, hf_overrides))


@dataclass
class RuleCopy:
    """A private copy of the shipped ``rules/`` tree that a test may break."""

    root: Path

    def edit(self, fragment: str, old: str, new: str) -> Path:
        """Replace ``old`` (which must occur exactly once) by ``new`` in a copied rule file."""
        path = self.root / fragment
        text = path.read_text(encoding="utf-8")
        assert text.count(old) == 1, f"{fragment}: expected exactly one {old!r}"
        path.write_text(text.replace(old, new), encoding="utf-8")
        return path

    def path(self, rule_set: str) -> Path:
        return self.root / f"{rule_set}.yaml"


@pytest.fixture
def rule_copy(tmp_path: Path) -> RuleCopy:
    root = tmp_path / "rules"
    shutil.copytree(rules_dir(), root)
    return RuleCopy(root)


@pytest.fixture
def convert() -> Callable[..., Converted]:
    return convert_variant
