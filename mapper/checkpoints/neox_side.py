"""The NeoX side of a conversion: what a NeoX checkpoint folder says about its model, which rule set
converts it, and the NeoX YAML a NeoX output carries.

The model config (the checkpoint's ``configs/``, or ``--config``, with ``--set`` on top) is the
first source of truth; the keys confirm it (:mod:`mapper.configs.switches`). Without a config the
parameters are read off the files and the switches off the keys, enough to plan or detect, not to
write an HF ``config.json``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mapper.configs import NeoXModelConfig, load_neox_yaml, unknown_key_warnings
from mapper.configs.neox_yaml import model_from_neox_yaml, normalize_keys
from mapper.configs.settings import settings as model_settings
from mapper.configs.switches import KeyEvidence, evidence_from_keys, history_from_evidence
from mapper.detect import Detection, apply_variant, detect, require_single, variant_conflicts
from mapper.errors import CheckpointError, MapperError
from mapper.formats import NeoXCheckpoint
from mapper.formats.naming import layer_file_name, mp_rank_file_name, neox_key, parse_neox_key
from mapper.spec import RuleSet, load_rules
from mapper.tensors import Manifest

HISTORY_SETTINGS = ("gqa_layout", "rmsnorm_formula")  # mapper-only: recorded in mapper/record.json


@dataclass
class NeoXDescription:
    """What a NeoX checkpoint folder says about its model before any tensor is read."""

    model: NeoXModelConfig | None  # None without a config: parameters come from the files and keys
    raw: dict[str, Any]  # the merged NeoX YAML
    parameters: dict[str, int]
    keys: KeyEvidence
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def describe_neox(source: NeoXCheckpoint, config_files: Sequence[Path], settings: Mapping[str, Any]) -> NeoXDescription:
    """The model config (given, or found under configs/, with ``settings`` on top), its merged YAML,
    and the rule parameters it implies; without a config, what the files and keys show."""
    manifest = source.manifest()
    keys = evidence_from_keys(manifest)
    files = list(config_files) or list(source.config_files)
    parameters = inferred_parameters(manifest, source.tp)
    if not files:
        parameters.update({name: int(on) for name, on in keys.switches.items()})  # unknown: the default, off
        parameters["te_norm"] = int(keys.norm in ("te_layernorm", "te_rmsnorm"))
        return NeoXDescription(None, {}, parameters, keys, notes=[
            "no NeoX config found (configs/ or --config): parameters are read off the checkpoint's files and "
            "the switches off its keys"])
    raw = load_neox_yaml(files)
    warnings = unknown_key_warnings(raw)
    _check_rank_files(source, raw)
    given = normalize_keys(settings, where="--set")
    model = model_from_neox_yaml(raw, tp=source.tp, padded_vocab_size=padded_vocab(manifest, source.tp),
                                 overrides=given)
    _check_layer_count(source, model, manifest)
    notes = []
    history = history_from_evidence(
        naming=keys.naming,
        te_modules=model.te_mha or model.te_layernorm_mlp or model.te_columnparallel or model.te_rowparallel,
        gqa_own_attention=model.is_gqa and not model.te_mha,
        own_rmsnorm=model.norm == "rmsnorm",
    )
    for decision in history:
        if decision.setting in given or decision.setting in raw:
            continue  # the user said which
        model = model.model_copy(update={decision.setting: decision.value})
        (warnings if decision.warn else notes).append(f"{decision.setting} {decision.value}: {decision.reason}")
    return NeoXDescription(model, raw, {**parameters, **model.rule_parameters()}, keys, notes, warnings)


def choose_rules(
    source: NeoXCheckpoint, described: NeoXDescription, rules: str | Path | RuleSet | None,
    parameters: Mapping[str, int], *, force_rules: bool,
) -> tuple[RuleSet, Detection | None]:
    """The NeoX -> HF rule set: given (its ``variant`` must agree with the config unless forced; a
    preset's switches are applied), or detected from the config and the keys."""
    if rules is None:
        detection = detect(source.manifest(), parameters, model=described.model)
        return require_single(detection, f"cannot tell which rule set fits {source.path}"), detection
    chosen = rules if isinstance(rules, RuleSet) else load_rules(rules)
    if chosen.source != "neox":
        raise MapperError(
            f"rule set {chosen.name} converts {chosen.source} -> {chosen.target}, but {source.path} is a NeoX checkpoint",
            hint="pick a rule set whose source is neox (`mapper rules list`)",
        )
    model = described.model
    conflicts = variant_conflicts(chosen.variant, model) if model is not None else []
    if conflicts and not force_rules:
        raise MapperError(
            f"rule set {chosen.name} is for another model than the config describes:\n"
            + "\n".join(f"  - {c}" for c in conflicts),
            where=f"{chosen.name}: variant",
            hint="fix the config, pick a rule set whose variant fits (or none: detection reads the config), "
            "or pass --force-rules to let the rule set's variant replace those settings",
        )
    if model is not None and (conflicts or chosen.kind == "preset"):
        if conflicts:
            described.warnings.append(f"--force-rules: {chosen.name}'s variant replaces the config's settings ("
                                      + "; ".join(conflicts) + ")")
        described.model = apply_variant(model, chosen.variant)
        described.parameters.update(described.model.rule_parameters())
    return chosen, None


def neox_yaml_for(model: NeoXModelConfig, raw: Mapping[str, Any], *, tp: int) -> dict[str, Any]:
    """The NeoX YAML of a NeoX output: the model's settings (at ``tp``) over the source's other keys."""
    written = model.model_copy(update={"tp": tp}).to_neox_yaml()
    model_keys = {k for _, marker in model_settings(NeoXModelConfig) for k in (marker.key, *marker.also)}
    model_keys |= {"precision", "fp16", "bf16", "vocab_size"}  # written by to_neox_yaml, or mapper 0.1's
    others = {key.replace("_", "-"): value for key, value in raw.items() if key.replace("-", "_") not in model_keys}
    if others.get("rotary-save-freqs-buffer"):  # mapper recomputes, never carries, the rotary buffer
        others["rotary-save-freqs-buffer"] = False
    return {**written, **others}


# ---- what the files say --------------------------------------------------------------------------


def padded_vocab(manifest: Manifest, tp: int) -> int | None:
    """Rows of the word embedding over all ranks (NeoX pads the vocabulary to a multiple of TP)."""
    embedding = manifest.get(neox_key(0, "word_embeddings.weight", 0))
    return embedding.shape[0] * tp if embedding is not None else None


def inferred_parameters(manifest: Manifest, tp: int) -> dict[str, int]:
    """What the files say when there is no config: TP degree, layers, vocabulary."""
    indices = {parse_neox_key(k).idx for k in manifest}
    untied = any(".final_linear." in k for k in manifest)
    blocks = len([i for i in indices if i >= 2]) - 1 - int(untied)
    found = {"tp": tp, "num_layers": max(blocks, 0), "gpt_j_residual": 0}
    vocab = padded_vocab(manifest, tp)
    if vocab is not None:
        found["vocab_size"] = vocab
    return found


def _check_rank_files(source: NeoXCheckpoint, raw: Mapping[str, Any]) -> None:
    """Refuse a checkpoint with files of fewer TP ranks than its config was trained with (a
    rank's files not copied): read as is, it would look like a smaller model."""
    declared = raw.get("model_parallel_size")
    if not isinstance(declared, int) or isinstance(declared, bool) or declared <= source.tp:
        return
    if source.layout == "sequential":
        missing = mp_rank_file_name(source.tp)
    else:
        missing = layer_file_name(min(source.layer_indices), source.tp)
    raise CheckpointError(
        f"the model config says model-parallel-size {declared}, but only {source.tp} TP rank(s) "
        f"have files here ({missing} is missing)",
        where=source.path / missing,
        hint="copy the files of every TP rank (each rank saves its own), or pass --config with the "
        "config this checkpoint was saved with",
    )


def _check_layer_count(source: NeoXCheckpoint, model: NeoXModelConfig, manifest: Manifest) -> None:
    """A config whose num-layers disagrees with where the final norm sits (pipeline layer L+3)
    describes another model: say so before anything sizes work by it."""
    final = {parse_neox_key(k).idx for k in manifest if parse_neox_key(k).key.startswith("norm.")}
    if len(final) == 1 and (found := final.pop() - 3) != model.num_layers:
        raise CheckpointError(
            f"the config says num-layers {model.num_layers}, but the checkpoint's final norm is at pipeline layer "
            f"{found + 3}, i.e. after {found} transformer layers",
            where=source.path,
            hint="pass the config this checkpoint was saved with (--config)",
        )
