"""Which shipped rule set converts a checkpoint, and why.

One rule set per source -> target architecture pair (plus one for the legacy MLP names) covers
every mix of NeoX's independent Transformer Engine switches: its fragments are switched on by
the switch parameters, which come from the model config. So detection reads the config and lets
the keys confirm it: the candidates are the rule sets whose ``variant`` the config allows (the
architecture), and one *fits* when it compiles against the manifest with the config's parameters
(every tensor consumed, every required rule matched, every shape right) -- the same proof a
conversion needs. Rule sets that fit the same keys but convert to different HF targets (Llama and
Mistral) are told apart by what each target can represent (:func:`mapper.configs.hf.representation_problems`).
When none fits, the keys are read for what the config may have wrong
(:mod:`mapper.configs.switches`) and that is what the error says. Without a config, the switches
are taken from the keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mapper.configs import NeoXModelConfig
from mapper.configs.hf import TARGET_OF_RULES, representation_problems
from mapper.configs.switches import KeyEvidence, contradictions, evidence_from_keys
from mapper.engine import Plan, compile_plan
from mapper.errors import CompileError, MapperError
from mapper.spec import RuleSet
from mapper.spec.catalog import builtin_rule_sets
from mapper.tensors import Manifest


@dataclass
class Candidate:
    """One rule set tried against the checkpoint."""

    rules: RuleSet
    plan: Plan | None = None
    reasons: list[str] = field(default_factory=list)  # why it does not fit
    unused_optional: list[str] = field(default_factory=list)
    unrepresentable: list[str] = field(default_factory=list)  # what its HF target cannot represent
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
    """The chosen rule set (when one stands out), every candidate tried, and what the keys show."""

    chosen: Candidate | None
    candidates: list[Candidate]
    keys: KeyEvidence | None = None
    conflicts: list[str] = field(default_factory=list)  # config vs keys

    def summary(self) -> dict[str, Any]:
        chosen = self.chosen
        return {
            "chosen": chosen.rules.name if chosen else None,
            "switches": self.switches(),
            "parts": None if chosen is None or chosen.plan is None else [
                {"fragment": name, "applies": on} for name, on in rule_set_parts(chosen.rules, chosen.plan.parameters)
            ],
            "config_vs_keys": self.conflicts,
            "candidates": [
                {
                    "rules": c.rules.name, "fits": c.fits, "reasons": c.reasons[:5],
                    "unused_optional_rules": c.unused_optional, "unrepresentable": c.unrepresentable,
                    "evidence": c.evidence(),
                }
                for c in self.candidates
            ],
        }

    def switches(self) -> dict[str, Any]:
        """The TE switches the conversion uses (from the config, else from the keys)."""
        plan = self.chosen.plan if self.chosen is not None else None
        if plan is not None:
            p = plan.parameters
            return {name: bool(p[name]) for name in ("te_norm", "te_mha", "te_layernorm_mlp", "te_columnparallel",
                                                     "te_rowparallel") if name in p}
        return dict(self.keys.switches) if self.keys is not None else {}


def variant_conflicts(variant: Mapping[str, Any], model: NeoXModelConfig) -> list[str]:
    """Where a model contradicts a rule set's ``variant`` (keys that are no model setting are descriptive)."""
    found = []
    for name, wanted in variant.items():
        if name not in NeoXModelConfig.model_fields:
            continue
        allowed = wanted if isinstance(wanted, list) else [wanted]
        have = getattr(model, name)
        if have not in allowed:
            found.append(f"the model config has {name}: {have!r}, the rule set is for "
                         + " or ".join(repr(a) for a in allowed))
    return found


def apply_variant(model: NeoXModelConfig, variant: Mapping[str, Any]) -> NeoXModelConfig:
    """The model with the settings a rule set's ``variant`` fixes (single values only)."""
    fixed = {k: v for k, v in variant.items() if k in NeoXModelConfig.model_fields and not isinstance(v, list)}
    return NeoXModelConfig(**{**model.model_dump(), **fixed}) if fixed else model


def rule_set_parts(rules: RuleSet, parameters: Mapping[str, int]) -> list[tuple[str, bool]]:
    """Each file the rule set's rules come from, and whether any of its rules applies with these parameters."""
    parts: dict[str, bool] = {}
    for op in rules.ops:
        origin = rules.origin(op.id) or (op.id or "").split("#")[0]
        name = origin.split(" (")[0].rsplit(":", 1)[0]
        name = name.split("/rules/", 1)[-1]
        try:
            active = op.active(parameters)
        except MapperError:
            active = False
        parts[name] = parts.get(name, False) or active
    return list(parts.items())


def detect(
    manifest: Manifest,
    parameters: Mapping[str, int],
    *,
    model: NeoXModelConfig | None = None,
    candidates: list[RuleSet] | None = None,
) -> Detection:
    """Try every candidate (default: the shipped NeoX rule sets, presets aside) and pick the one that fits."""
    keys = evidence_from_keys(manifest)
    tried = [_try(rules, manifest, parameters, model)
             for rules in (candidates or builtin_rule_sets(source="neox", presets=False))]
    fitting = sorted((c for c in tried if c.fits), key=_rank)
    chosen = None
    if fitting and (len(fitting) == 1 or _rank(fitting[0]) < _rank(fitting[1])):
        chosen = fitting[0]
    conflicts = contradictions(model.model_dump(), keys) if model is not None else []
    return Detection(chosen, tried, keys, conflicts)


def _rank(candidate: Candidate) -> tuple[int, int]:
    """Best first: the HF target that represents the model (fewest problems), then the most specific
    rule set (fewest unused optional rules)."""
    return len(candidate.unrepresentable), len(candidate.unused_optional)


def require_single(detection: Detection, what: str) -> RuleSet:
    """The chosen rule set, or an error saying why none (or several) fit."""
    if detection.chosen is not None:
        return detection.chosen.rules
    fitting = [c for c in detection.candidates if c.fits]
    if fitting:
        names = ", ".join(c.rules.name for c in fitting)
        raise MapperError(
            f"{what}: {len(fitting)} rule sets fit and none stands out: {names}",
            hint="name one with --rules (`mapper rules show NAME` describes each)",
        )
    if detection.conflicts:
        raise MapperError(
            f"{what}: the model config contradicts the checkpoint's keys:\n"
            + "\n".join(f"  - {c}" for c in detection.conflicts),
            hint="fix the config (the checkpoint's configs/ or --config), or override one setting with "
            "--set KEY=VALUE (e.g. --set te_mha=true)",
        )
    considered = [c for c in detection.candidates if not c.reasons or not c.reasons[0].startswith("the model config")]
    lines = "\n".join(f"  - {c.rules.name}: {_first_reasons(c)}" for c in considered or detection.candidates)
    raise MapperError(
        f"{what}: no shipped rule set fits this checkpoint\n{lines}",
        hint="`mapper plan SRC --rules NAME` shows every problem for one rule set; a new variant "
        "needs its own rule set (`mapper rules new`)",
    )


def _first_reasons(candidate: Candidate, count: int = 3) -> str:
    shown = "; ".join(candidate.reasons[:count]) or "does not fit"
    more = len(candidate.reasons) - count
    return shown + (f" (and {more} more)" if more > 0 else "")


def _try(rules: RuleSet, manifest: Manifest, parameters: Mapping[str, int], model: NeoXModelConfig | None) -> Candidate:
    candidate = Candidate(rules)
    if model is not None:
        candidate.reasons.extend(variant_conflicts(rules.variant, model))
    if candidate.reasons:
        return candidate  # ruled out by the config: no need to compile
    try:
        candidate.plan = compile_plan(rules, manifest, parameters)
    except CompileError as error:
        candidate.reasons.extend(str(group) for group in error.groups)  # one per pattern, not per key
        return candidate
    except MapperError as error:
        candidate.reasons.append(error.message)
        return candidate
    target = TARGET_OF_RULES.get(rules.target or "")
    if target is not None and model is not None:
        candidate.unrepresentable = representation_problems(model, target.arch)
    used = {n.op.id for n in candidate.plan.nodes}
    candidate.unused_optional = [
        op.id for op in rules.ops
        if op.optional and op.id not in used and op.active(candidate.plan.parameters)
    ]
    return candidate
