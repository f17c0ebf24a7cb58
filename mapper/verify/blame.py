"""Who to blame for the first diverging point: the HF tensors it reads, the rules that produced them
(``file:line``), ranked most likely first, and the config.json fields that disagree.

Ranking. A rule is more likely at fault the more it decides about the numbers: an op that reorders
or combines values (``split``/``unflatten``/``flatten``/``transpose``, a ``fuse`` that sums or
picks one replica, ``affine``, ``slice``/``pad``) above one that concatenates shards, above a plain
``rename``; a rule with a ``when`` condition (its choice depends on a setting) above one without;
rules that produced weights above those that produced only biases; ties keep the rule set's order.
Rules of the branch that was found to differ (attention or MLP) come before the others, and among
them a user's own rules (written outside mapper's shipped rules, which every test runs) first. Wrong
config.json fields come before every rule.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from mapper.engine.plan import fold_ranks
from mapper.resources import rules_dir
from mapper.verify.report import Blame, PointComparison, RuleRef
from mapper.verify.settings import SettingCheck

BLOCK = re.compile(r"^blocks\.(\d+)(?:\.(attention|mlp))?$")
HINTS = {
    "embeddings": "check the embedding rules (vocab-parallel rows concatenated in rank order)",
    "attention": "check the QKV layout (per-head interleaved / GQA blocks / TE per-group), the attention "
                 "norm and the output projection and its bias; or the HF config's heads, rope_theta and "
                 "partial_rotary_factor",
    "mlp": "check the pre-MLP norm (TE mlp.layer_norm_* is the real one, post_attention_layernorm may be "
           "stale), gate/up order, the MLP-out bias merge; or the HF config's hidden_act and eps",
    "block": "the attention and MLP branches agree on their inputs, so the block's wiring differs: check "
             "use_parallel_residual (NeoX gpt-j-residual) in the HF config",
    "final_norm": "check the final norm rules and the HF config's layer_norm_eps / rms_norm_eps",
    "logits": "check the output layer rules (final_linear, or tie_word_embeddings) and the vocabulary size",
}
_DECISIVE = {"split": 3, "unflatten": 3, "flatten": 3, "transpose": 3, "affine": 3, "slice": 3, "pad": 3,
             "create": 2, "fuse": 2, "rename": 1, "drop": 0}


def keys_for_point(point: str, keys: Sequence[str]) -> list[str]:
    """The HF tensors a point reads directly (its own weights, not the upstream ones)."""
    embedding = [k for k in keys if re.search(r"(^|\.)(embed_in|embed_tokens)\.weight$", k)]
    if point == "embeddings":
        return embedding
    if point == "final_norm":
        return [k for k in keys if re.search(r"(^|\.)final_layer_norm\.|^model\.norm\.", k)]
    if point == "logits":
        out = [k for k in keys if re.fullmatch(r"(embed_out|lm_head)\.weight", k)]
        return out or embedding  # tied: the logits read the embedding
    match = BLOCK.match(point)
    if not match:
        return []
    index, part = match.group(1), match.group(2)
    modules = {"attention": r"(input_layernorm|attention|self_attn)",
               "mlp": r"(post_attention_layernorm|mlp)"}.get(part or "", r"[^.]+")
    return [k for k in keys if re.search(rf"(^|\.)layers\.{index}\.{modules}\.", k)]


def _op_kind(op: Any) -> str:
    kind = type(op).__name__.lower()
    if kind == "fuse" and getattr(op, "mode", "concat") != "concat":
        return "split"  # a sum or a replica pick decides values like a layout op does
    return kind


def rank_rules(plan: Any, keys: Sequence[str], first: Sequence[str] = ()) -> list[RuleRef]:
    """The rules that produced ``keys``, most likely first (module doc); ``first``: keys of the
    branch found to differ, whose rules lead."""
    known = [k for k in keys if k in plan.targets]
    ops = {op.id: (index, op) for index, op in enumerate(plan.ruleset.ops)}
    leading = set(plan.rules_for([k for k in first if k in plan.targets]))
    weights = set(plan.rules_for([k for k in known if not k.endswith(".bias")]))

    shipped = str(rules_dir().resolve())

    def score(rule: str) -> tuple[int, int, int, int, int, int]:
        index, op = ops.get(rule, (len(ops), None))
        kind = _op_kind(op) if op is not None else "rename"
        conditional = int(bool(getattr(op, "when", None)))
        own = int(not (plan.ruleset.origin(rule) or "").startswith(shipped))  # a user's rule: newer, less tried
        return (-int(rule in leading), -own, -_DECISIVE.get(kind, 1), -conditional, -int(rule in weights), index)

    ranked = sorted(plan.rules_for(known), key=score)
    refs = []
    for rule in ranked:
        op = ops.get(rule, (0, None))[1]
        mode = getattr(op, "mode", "concat")
        reasons = [type(op).__name__.lower() + (f" ({mode})" if mode != "concat" else "") if op is not None else "rule"]
        if getattr(op, "when", None):
            reasons.append(f"when {op.when}")
        if rule in leading:
            reasons.insert(0, "in the differing branch")
        refs.append(RuleRef(rule, plan.ruleset.origin(rule), ", ".join(reasons)))
    return refs


def dropped_weights(plan: Any, source_prefix: str) -> list[str]:
    """Tensors under ``source_prefix`` (one NeoX layer) that the plan drops, FP8 metadata and rotary
    buffers aside: a real weight dropped in place of a stale one is the #1353 mistake."""
    by_rule: dict[str, list[str]] = {}
    for node in plan.dropped:
        by_rule.setdefault(node.rule_id, []).extend(
            v.key for v in node.inputs
            if v.key.startswith(source_prefix) and not v.key.split("@")[0].endswith(("_extra_state", "inv_freq")))
    return [f"{fold_ranks(sorted(keys))}  [{rule}]" for rule, keys in by_rule.items() if keys]


def blame(
    point: PointComparison, *, plan: Any | None, keys: Sequence[str], parts: list[PointComparison],
    source_prefix: str | None = None, settings: Sequence[SettingCheck] = (),
) -> Blame:
    """Name the tensors, and with a plan the rules, behind the first diverging point.

    ``parts`` are the block's attention and MLP branches judged on the same inputs (when they could
    be); ``source_prefix`` (``layer_XX.`` for a block) also lists what the rules drop from that layer.
    """
    keys = list(keys)
    is_block = BLOCK.match(point.name) is not None
    differing = [p for p in parts if not p.ok]
    branch_keys: list[str] = []
    if is_block and differing:
        branch_keys = sorted({k for p in differing for k in keys_for_point(p.name, keys)}, key=keys.index)
        names = " and ".join(p.name.rsplit(".", 1)[1] for p in differing)
        verb = "computes" if len(differing) == 1 else "compute"
        detail = f"inside {point.name}, judged on the same inputs: {names} {verb} something else"
        hint = "; ".join(HINTS[p.name.rsplit(".", 1)[1]] for p in differing)
    elif is_block and parts:
        detail = f"{point.name} differs although its attention and MLP branches agree on their inputs"
        hint = HINTS["block"]
    else:
        detail = f"{point.name} is the first point beyond tolerance; every earlier point agrees"
        hint = (f"{HINTS['attention']}; {HINTS['mlp']}" if is_block else HINTS.get(point.name))
    blamed = branch_keys or keys_for_point(point.name, keys)
    rules = rank_rules(plan, blamed) if plan is not None else []
    wrong = [s for s in settings if not s.ok]
    if wrong:
        fields = ", ".join(f"{s.field} ({s.hf!r}, expected {s.expected!r})" for s in wrong)
        hint = f"first check config.json: {fields}; then {hint}" if hint else f"check config.json: {fields}"
    dropped = dropped_weights(plan, source_prefix) if plan is not None and source_prefix else []
    return Blame(point.name, detail, parts, blamed, rules, hint, dropped)
