"""Which shipped rule set fits a checkpoint, and why.

A rule set *fits* when it compiles against the checkpoint's manifest: every tensor consumed,
every required rule matched, every shape right. That is the same proof a conversion needs, so
detection cannot pick a rule set that would then fail. Several may fit when optional rules
(FP8 ``_extra_state``, biases, an untied output layer) hide a difference; the one leaving
fewest optional rules unused is the most specific. A tie, or a model config contradicting the
rule set's declared ``variant``, is reported with every candidate instead of guessed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mapper.configs import NeoXModelConfig
from mapper.engine import Plan, compile_plan
from mapper.errors import CompileError, MapperError
from mapper.spec import RuleSet, builtin_rule_files, load_rule_file
from mapper.tensors import Manifest

# NeoXModelConfig fields a rule set's `variant` may pin down (others are descriptive only).
_CONFIG_FIELDS = ("norm", "te_mha", "te_layernorm_mlp", "te_columnparallel", "te_rowparallel")


@dataclass
class Candidate:
    """One rule set tried against the checkpoint."""

    rules: RuleSet
    plan: Plan | None = None
    reasons: list[str] = field(default_factory=list)  # why it does not fit
    unused_optional: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # evidence other than keys (e.g. a record file)

    @property
    def fits(self) -> bool:
        return (self.plan is not None or bool(self.notes)) and not self.reasons

    def evidence(self) -> list[str]:
        """Per fragment: how many source tensors its rules consumed, with an example key."""
        if self.plan is None:
            return list(self.notes)
        seen: dict[str, list[str]] = {}
        for node in self.plan.nodes:
            fragment = (node.op.id or "").split("#")[0]
            sources = [v.key for v in node.inputs if v.producer is None]
            if sources:
                seen.setdefault(fragment, []).extend(sources)
        return self.notes + [f"{fragment}: {len(keys)} tensors, e.g. {keys[0]}" for fragment, keys in seen.items()]


@dataclass
class Detection:
    """The chosen rule set (when one stands out) and every candidate tried."""

    chosen: Candidate | None
    candidates: list[Candidate]

    def summary(self) -> dict[str, Any]:
        return {
            "chosen": self.chosen.rules.name if self.chosen else None,
            "candidates": [
                {
                    "rules": c.rules.name, "fits": c.fits, "reasons": c.reasons[:5],
                    "unused_optional_rules": c.unused_optional, "evidence": c.evidence(),
                }
                for c in self.candidates
            ],
        }


def builtin_rule_sets(source: str | None = None, target: str | None = None) -> list[RuleSet]:
    """The shipped rule sets, optionally only those converting from ``source`` / to ``target``."""
    found = [load_rule_file(path) for path in builtin_rule_files().values()]
    return [r for r in found if (source is None or r.source == source) and (target is None or r.target == target)]


def detect(
    manifest: Manifest,
    parameters: Mapping[str, int],
    *,
    model: NeoXModelConfig | None = None,
    candidates: list[RuleSet] | None = None,
) -> Detection:
    """Try every candidate (default: shipped NeoX rule sets) and pick the one that fits best."""
    tried = [_try(rules, manifest, parameters, model) for rules in (candidates or builtin_rule_sets(source="neox"))]
    fitting = sorted((c for c in tried if c.fits), key=lambda c: len(c.unused_optional))
    chosen = None
    if fitting and (len(fitting) == 1 or len(fitting[0].unused_optional) < len(fitting[1].unused_optional)):
        chosen = fitting[0]
    return Detection(chosen, tried)


def require_single(detection: Detection, what: str) -> RuleSet:
    """The chosen rule set, or an error listing the candidates and why each was not taken."""
    if detection.chosen is not None:
        return detection.chosen.rules
    fitting = [c for c in detection.candidates if c.fits]
    if fitting:
        names = ", ".join(c.rules.name for c in fitting)
        raise MapperError(
            f"{what}: {len(fitting)} rule sets fit and none stands out: {names}",
            hint="name one with --rules (`mapper rules show NAME` describes each)",
        )
    lines = "\n".join(f"  - {c.rules.name}: {c.reasons[0] if c.reasons else 'does not fit'}" for c in detection.candidates)
    raise MapperError(
        f"{what}: no shipped rule set fits this checkpoint\n{lines}",
        hint="`mapper plan SRC --rules NAME` shows every problem for one rule set; a new variant "
        "needs its own rule set (`mapper rules new`)",
    )


def _try(rules: RuleSet, manifest: Manifest, parameters: Mapping[str, int], model: NeoXModelConfig | None) -> Candidate:
    candidate = Candidate(rules)
    if model is not None:
        for name in _CONFIG_FIELDS:
            if name in rules.variant and rules.variant[name] != getattr(model, name):
                candidate.reasons.append(
                    f"the model config has {name}={getattr(model, name)!r}, the rule set is for {rules.variant[name]!r}"
                )
    if candidate.reasons:
        return candidate  # ruled out by the config: no need to compile
    try:
        candidate.plan = compile_plan(rules, manifest, parameters)
    except CompileError as error:
        candidate.reasons.extend(str(p) for p in error.problems)
        return candidate
    except MapperError as error:
        candidate.reasons.append(error.message)
        return candidate
    used = {n.op.id for n in candidate.plan.nodes}
    candidate.unused_optional = [
        op.id for op in rules.ops
        if op.optional and op.id not in used and op.active(candidate.plan.parameters)
    ]
    return candidate

