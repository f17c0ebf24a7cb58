"""The HF side of a conversion: what an HF folder says (and what mapper recorded in it), and the
``config.json`` an HF output gets.

An HF folder mapper wrote carries its record (:mod:`mapper.record`): the rule set as used, the NeoX
config, the history settings and the sidecar, so HF -> NeoX inverts the very same rules and gives
the original checkpoint back bit for bit. Any other HF folder fits several NeoX layouts: the user
names one (a rule set, or a preset fixing its switches, or ``--set``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mapper.configs import NeoXModelConfig, load_neox_yaml, pad_vocab_size
from mapper.configs.hf import TARGET_OF_RULES, TARGETS, Approximation, HFTarget, approximations
from mapper.configs.neox_yaml import normalize_keys, validated
from mapper.detect import apply_variant
from mapper.engine import Sidecar
from mapper.errors import CheckpointError, MapperError
from mapper.formats import HFCheckpoint
from mapper.record import RECORD_FILE, ConversionRecord, existing, read_record, sidecar_files
from mapper.spec import RuleSet, builtin_rule_files, load_rule_file, load_rules
from mapper.spec.catalog import builtin_rule_sets

from mapper.checkpoints.neox_side import HISTORY_SETTINGS

_HF_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass
class HFDescription:
    """What an HF folder says about the NeoX model it holds, and the rule set that maps them."""

    target: HFTarget
    forward: RuleSet  # the NeoX -> HF rule set (inverted to convert this folder)
    model: NeoXModelConfig  # at the output TP
    raw: dict[str, Any]  # the NeoX YAML recorded with the folder (or given), if any
    record: ConversionRecord | None
    parameters: dict[str, int]
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def hf_target_of(source: HFCheckpoint) -> HFTarget:
    model_type = (source.config or {}).get("model_type")
    if source.config is None or model_type not in TARGETS:
        raise CheckpointError(
            f"HF model_type {model_type!r} is not supported" if source.config else "the HF folder has no config.json",
            where=source.path / "config.json",
            hint=f"mapper converts {' and '.join(TARGETS)} models (config.json names model_type)",
        )
    return TARGETS[str(model_type)]


def recorded_rules(folder: Path) -> RuleSet:
    """The rule set a mapper conversion used to write ``folder``: its saved copy, else by name."""
    saved = existing(folder, "rules")
    record = read_record(folder)
    if saved is not None:
        rules = load_rule_file(saved, confined=True)  # from an input folder: includes stay inside it
        return rules.with_origins(record.origins) if record is not None else rules  # the files it came from
    if record is None:
        raise CheckpointError(f"{folder} was not written by mapper (no {RECORD_FILE})", where=folder,
                              hint="name the rule set with --rules")
    if record.rules not in builtin_rule_files():  # a name, never a path
        raise CheckpointError(f"{RECORD_FILE} names {record.rules!r}, which is not a shipped rule set, and there is "
                              "no recorded rule file beside it", where=folder, hint="name the rule set with --rules")
    return load_rules(record.rules)


def describe_hf(
    source: HFCheckpoint, rules: str | Path | RuleSet | None, config_files: Sequence[Path], settings: Mapping[str, Any],
    *, tp: int | None,
) -> HFDescription:
    """The NeoX model an HF folder holds, at the output TP (``tp``, else the recorded one, else 1)."""
    target = hf_target_of(source)
    config = source.config or {}
    notes: list[str] = []
    record = read_record(source.path)
    if rules is not None:
        forward = rules if isinstance(rules, RuleSet) else load_rules(rules)
        if forward.source in TARGET_OF_RULES:
            forward = forward.invert()
    elif record is not None:
        forward = recorded_rules(source.path)
        notes.append(f"rule set {forward.name} {forward.version} as recorded by the conversion that made this folder")
    else:
        candidates = [r.name for r in builtin_rule_sets(source="neox", target=target.rules_target)]
        raise MapperError(
            f"{source.path} is an HF {target.arch} model; several NeoX layouts can hold it: {', '.join(candidates)}",
            hint=f"name the NeoX variant you want with --rules (e.g. --rules {candidates[0]} for NeoX's own modules, "
            "a preset such as neox-te-to-hf-gpt-neox, or --set te_mha=true ...; its inverse is used)",
        )
    if forward.target != target.rules_target:
        raise MapperError(f"rule set {forward.name} converts to {forward.target}, but {source.path} holds {target.arch}",
                          hint="pick a rule set for this architecture (`mapper rules list`)")

    out_tp = tp or (record.parameters.get("tp") if record else None) or 1
    _check_tp(source, out_tp)
    hf_vocab = config.get("vocab_size")
    if not isinstance(hf_vocab, int) or isinstance(hf_vocab, bool) or hf_vocab <= 0:
        raise CheckpointError(f"config.json: vocab_size must be a positive integer, got {hf_vocab!r}",
                              where=source.path / "config.json", hint="fix config.json (the rows of the embedding)")
    saved_yaml = existing(source.path, "neox_config")
    files = list(config_files) or ([saved_yaml] if saved_yaml is not None else [])
    raw = dict(load_neox_yaml(files)) if files else {}
    if raw:
        divisible_by = raw.get("make_vocab_size_divisible_by")
        if not isinstance(divisible_by, int) or isinstance(divisible_by, bool) or divisible_by < 1:
            divisible_by = NeoXModelConfig.default("make_vocab_size_divisible_by")
        raw = {**raw, "model_parallel_size": out_tp}
        model = NeoXModelConfig.from_neox_yaml(raw, tp=out_tp, padded_vocab_size=pad_vocab_size(hf_vocab, divisible_by, out_tp))
    else:
        model = NeoXModelConfig.from_hf_config(config, tp=out_tp)
    _check_layer_count(source, model)
    given = {**{k: v for k, v in (record.settings if record else {}).items() if k in HISTORY_SETTINGS},
             **normalize_keys(settings, where="--set")}
    model = apply_variant(model, forward.variant)
    if given:
        model = validated({**model.model_dump(), **given}, where="--set")
    parameters = model.rule_parameters()
    if hf_vocab != model.vocab_size:
        parameters["trim_vocab"] = hf_vocab
    return HFDescription(target, forward, model, raw, record, parameters, notes)


def read_sidecar(folder: Path, forward: RuleSet, record: ConversionRecord | None, out_tp: int,
                 notes: list[str]) -> Sidecar | None:
    """The sidecar the forward conversion wrote, when it belongs to these rules and this TP."""
    paths = sidecar_files(folder)
    if not paths:
        return None
    sidecar = Sidecar()
    for path in paths:
        part = Sidecar.load(path)
        if part.rules != forward.name:
            notes.append(f"{path.name} was written by rule set {part.rules}, not {forward.name}: not used")
            return None
        sidecar.rules, sidecar.version = part.rules, part.version
        sidecar.entries.update(part.entries)
        if part.dropped is not None:
            sidecar.dropped = (sidecar.dropped or set()) | part.dropped
    source_tp = record.parameters.get("tp") if record else None
    if source_tp is not None and source_tp != out_tp:
        notes.append(f"sidecar not used: it holds rank-level tensors of TP={source_tp}, the output has TP={out_tp}")
        return None
    notes.append(f"sidecar {paths[0].name}: {len(sidecar)} entries restore what the forward conversion removed")
    return sidecar


def hf_output_config(model: NeoXModelConfig, forward: RuleSet, shapes: Mapping[str, tuple[int, ...]], *,
                     strict: bool) -> tuple[dict[str, Any], list[Approximation]]:
    """``config.json`` of an HF output and the approximations it makes (refused with ``strict``)."""
    target = TARGET_OF_RULES[forward.target or ""]
    return model.to_hf_config(target.arch, shapes=shapes, strict=strict), approximations(model, target.arch)


def _check_tp(source: HFCheckpoint, tp: int) -> None:
    """Refuse a TP degree the attention heads cannot be split over, naming the degrees that work."""
    config = source.config or {}
    heads = config.get("num_attention_heads")
    kv_heads = config.get("num_key_value_heads") or heads
    if not (isinstance(heads, int) and isinstance(kv_heads, int) and heads > 0 and kv_heads > 0):
        return  # the config translation reports a malformed config
    if heads % tp or kv_heads % tp:
        fits = [d for d in range(1, kv_heads + 1) if heads % d == 0 and kv_heads % d == 0]
        raise MapperError(
            f"--tp {tp}: the model's {heads} attention heads ({kv_heads} key/value heads) cannot be split "
            f"evenly over {tp} tensor-parallel ranks",
            where=source.path / "config.json",
            hint=f"choose a --tp that divides the heads: {', '.join(map(str, fits))}",
        )


def _check_layer_count(source: HFCheckpoint, model: NeoXModelConfig) -> None:
    """The model's layers must match the layers the weights hold (checked before anything sizes work
    by it: a hostile or stale config may say a million)."""
    found = {int(m.group(1)) for key in source.manifest() if (m := _HF_LAYER.search(key))}
    if found and max(found) + 1 != model.num_layers:
        raise CheckpointError(
            f"the config says {model.num_layers} layers (num_hidden_layers), but the weights hold {max(found) + 1}",
            where=source.path / "config.json", hint="fix config.json (or pass the model's own) and convert again",
        )
