"""What a checkpoint's keys say about its model: TE switches, MLP naming and the gpt-neox code history.

The config is the first source of truth (the switches are NeoX config flags); the keys confirm it.
This module reads the keys, so that a checkpoint without a config can still be described, and so
that a config contradicting its checkpoint is reported as exactly that ("the config says te_mha
false, the keys hold TE attention") instead of as an unconsumed tensor.

Key facts (DOMAIN notes, from gpt-neox ``megatron/model/transformer.py`` and ``transformer_engine.py``):

| switch | key it leaves in every block (before ``@rank``) |
|---|---|
| ``norm: te_layernorm`` / ``te_rmsnorm`` | ``input_layernorm.norm.weight`` (TE LayerNorm: also ``.norm.bias``) |
| ``norm: rmsnorm`` (NeoX's own) | ``input_layernorm.scale`` |
| ``te_mha`` | ``attention.qkv.weight`` |
| ``te_layernorm_mlp`` | ``mlp.fc1_weight`` |
| ``te_columnparallel`` | ``._extra_state`` on ``attention.query_key_value``, ``mlp.linear1`` or ``final_linear`` |
| ``te_rowparallel`` | ``._extra_state`` on ``attention.dense`` or ``mlp.linear2`` |

And the code history the keys date (gpt-neox PRs): legacy MLP names (``mlp.dense_h_to_4h``,
``mlp.w1``) ended with #1212 (2024-09-07); NeoX's own GQA QKV layout changed in #1315
(2024-11-14); TE support arrived with #1282 (2024-12-19); NeoX's own RMSNorm formula changed in
#1345 (2025-05-09).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Naming = Literal["legacy", "current"]

_BLOCK_KEY = re.compile(r"^layer_\d+\.(?P<name>.+)@rank\d+$")
# switch -> (keys that show it on, keys that show it off); where neither is present the keys do not tell.
SWITCH_EVIDENCE: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "te_mha": (("attention.qkv.weight",), ("attention.query_key_value.weight",)),
    "te_layernorm_mlp": (("mlp.fc1_weight",), ("mlp.linear1.weight", "mlp.dense_h_to_4h.weight", "mlp.w1.weight")),
    "te_columnparallel": (("attention.query_key_value._extra_state", "mlp.linear1._extra_state",
                           "final_linear._extra_state"), ()),
    "te_rowparallel": (("attention.dense._extra_state", "mlp.linear2._extra_state"), ()),
}
LEGACY_MLP_KEYS = ("mlp.dense_h_to_4h.weight", "mlp.w1.weight")


def key_names(keys: Iterable[str]) -> set[str]:
    """The module-relative names in a flattened NeoX manifest (``layer_02.mlp.fc1_weight@rank0`` ->
    ``mlp.fc1_weight``)."""
    names = set()
    for key in keys:
        match = _BLOCK_KEY.match(key)
        if match:
            names.add(match["name"])
    return names


@dataclass
class KeyEvidence:
    """The switches, naming and norm the keys show, each with the key that shows it."""

    switches: dict[str, bool]  # only the switches the keys tell (on, or provably off)
    norm: str | None
    naming: Naming | None
    examples: dict[str, str] = field(default_factory=dict)  # setting -> a key that shows it

    def as_settings(self) -> dict[str, Any]:
        found: dict[str, Any] = dict(self.switches)
        if self.norm is not None:
            found["norm"] = self.norm
        return found


def evidence_from_keys(keys: Iterable[str]) -> KeyEvidence:
    names = key_names(keys)
    switches: dict[str, bool] = {}
    examples: dict[str, str] = {}
    for switch, (shows_on, shows_off) in SWITCH_EVIDENCE.items():
        for state, shows in ((True, shows_on), (False, shows_off)):
            found = next((n for n in shows if n in names), None)
            if found is not None and switch not in switches:
                switches[switch], examples[switch] = state, found
    norm = None
    if "input_layernorm.norm.weight" in names:
        norm = "te_layernorm" if "input_layernorm.norm.bias" in names else "te_rmsnorm"
        examples["norm"] = "input_layernorm.norm.weight"
    elif "input_layernorm.scale" in names:
        norm, examples["norm"] = "rmsnorm", "input_layernorm.scale"
    elif "input_layernorm.weight" in names:
        norm, examples["norm"] = "layernorm", "input_layernorm.weight"
    naming: Naming | None = None
    legacy = [n for n in LEGACY_MLP_KEYS if n in names]
    if legacy:
        naming, examples["naming"] = "legacy", legacy[0]
    elif "mlp.linear1.weight" in names or switches.get("te_layernorm_mlp"):
        naming = "current"
        examples["naming"] = "mlp.linear1.weight" if "mlp.linear1.weight" in names else "mlp.fc1_weight"
    return KeyEvidence(switches, norm, naming, examples)


def contradictions(config: Mapping[str, Any], evidence: KeyEvidence) -> list[str]:
    """Settings where the config and the keys disagree, worded for people."""
    found = []
    for name, shown in evidence.as_settings().items():
        said = config.get(name)
        if said is None or said == shown:
            continue
        example = evidence.examples.get(name)
        found.append(f"the config says {name}: {said!r}, the checkpoint's keys say {shown!r}"
                     + (f" (e.g. {example})" if example else ""))
    return found


@dataclass(frozen=True)
class HistoryDecision:
    """A code-history setting chosen for a checkpoint, and why."""

    setting: str
    value: str
    reason: str
    warn: bool = False


def history_from_evidence(
    *, naming: Naming | None, te_modules: bool, gqa_own_attention: bool, own_rmsnorm: bool,
) -> list[HistoryDecision]:
    """The gpt-neox code history of a checkpoint, from what its keys and config show.

    ``te_modules``: any of te_mha / te_layernorm_mlp / te_columnparallel / te_rowparallel is on
    (TE arrived after #1315). ``gqa_own_attention``: GQA in NeoX's own fused QKV (the only layout
    #1315 changed). ``own_rmsnorm``: ``norm: rmsnorm`` (NeoX's own; TE norms never changed).
    """
    decisions = []
    if gqa_own_attention:
        if naming == "legacy":
            decisions.append(HistoryDecision("gqa_layout", "pre-1315", "legacy MLP names predate gpt-neox #1212 "
                                             "(2024-09-07), so the GQA QKV layout is the one before #1315"))
        elif te_modules:
            decisions.append(HistoryDecision("gqa_layout", "current", "Transformer Engine modules (gpt-neox #1282, "
                                             "2024-12-19) postdate the GQA layout change #1315"))
        else:
            decisions.append(HistoryDecision(
                "gqa_layout", "current",
                "GQA fused QKV taken in gpt-neox's current layout ([Q | K | V] per rank, #1315 of 2024-11-14 "
                "onwards); nothing in the keys dates this checkpoint. If it was saved with gpt-neox between "
                "2024-09-07 and 2024-11-14, pass --set gqa_layout=pre-1315 (a wrong layout loads and runs "
                "but computes something else: check with `mapper verify --reference`)",
                warn=True))
    if own_rmsnorm:
        if naming == "legacy":
            decisions.append(HistoryDecision("rmsnorm_formula", "pre-1345", "legacy MLP names predate gpt-neox #1345 "
                                             "(2025-05-09): NeoX's RMSNorm computed x / (rms + eps)"))
        else:
            decisions.append(HistoryDecision(
                "rmsnorm_formula", "current",
                "NeoX's own RMSNorm taken as gpt-neox computes it since #1345 (2025-05-09); for checkpoints "
                "saved before, pass --set rmsnorm_formula=pre-1345 (a difference of about eps/rms)"))
    return decisions
