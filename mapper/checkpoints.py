"""Converting checkpoint folders: NeoX -> HF and HF -> NeoX, on top of the engine.

This module gathers what a conversion needs before any tensor byte is read -- the reader, the
model config (NeoX YAML or config.json), the rule set (given or detected; inverted for HF ->
NeoX), its parameters, the expected HF tensors -- into a :class:`Prepared` conversion whose plan
is already proven. :func:`convert_checkpoint` then streams it into a writer.

Beside the HF model, a conversion writes ``mapper.json`` (which rule set, version, parameters,
source), ``mapper-rules.yaml`` (the rule set exactly as used, fragments resolved, so the way back
inverts the very same rules), ``mapper-neox-config.yaml`` (the NeoX model config, so the way back restores it) and
``mapper-sidecar.safetensors`` (what lossy rules removed: FP8 metadata, cut vocabulary rows...).
An HF -> NeoX conversion reads them back when present, which makes NeoX -> HF -> NeoX exact.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from mapper import __version__
from mapper.configs import NeoXModelConfig, load_neox_yaml, pad_vocab_size, unknown_key_warnings
from mapper.configs.hf import TARGET_OF_RULES, TARGETS, Approximation, approximations
from mapper.configs.neox_yaml import model_from_neox_yaml, normalize_keys, validated
from mapper.configs.switches import KeyEvidence, evidence_from_keys, history_from_evidence
from mapper.detect import Candidate, Detection, apply_variant, detect, require_single, variant_conflicts
from mapper.spec.catalog import builtin_rule_sets
from mapper.engine import SIDECAR_FILE, ExecutionReport, Plan, Sidecar, compile_plan, execute
from mapper.engine.compile import check_expected
from mapper.engine.execute import target_manifest
from mapper.errors import CheckpointError, MapperError
from mapper.formats import HFCheckpoint, NeoXCheckpoint, open_checkpoint
from mapper.formats.hf_writer import HFWriter, plan_shards
from mapper.formats.naming import layer_file_name, mp_rank_file_name, parse_neox_key
from mapper.formats.neox_writer import NeoXWriter, plan_layer_files
from mapper.formats.output import AtomicFile, parts_staging_path, write_bytes_atomic
from mapper.formats.safetensors_io import write_safetensors
from mapper.formats.writing import META_DIR, WRITER_THREADS
from mapper.hf_models import expected_tensors, transformers_available
from mapper.record import RECORD_FILE, ConversionRecord, read_record
from mapper.spec import RuleSet, dump_rule_set, load_rules

RULES_FILE = "mapper-rules.yaml"
NEOX_CONFIG_FILE = "mapper-neox-config.yaml"
HF_TARGETS = {arch: spec.rules_target for arch, spec in TARGETS.items()}
ARCH_OF_TARGET = {target: arch for arch, target in HF_TARGETS.items()}
HISTORY_SETTINGS = ("gqa_layout", "rmsnorm_formula")  # mapper-only: recorded in mapper.json

Direction = Literal["neox-to-hf", "hf-to-neox"]


@dataclass
class Prepared:
    """A conversion whose plan is proven: everything decided, nothing read yet."""

    direction: Direction
    source: NeoXCheckpoint | HFCheckpoint
    rules: RuleSet  # as executed (already inverted for HF -> NeoX)
    forward_rules: RuleSet  # the NeoX -> HF rule set it comes from
    model: NeoXModelConfig
    parameters: dict[str, int]
    plan: Plan
    hf_config: dict[str, Any]
    neox_yaml: dict[str, Any]
    sidecar: Sidecar | None = None
    detection: Detection | None = None
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # things a person should check (printed as warnings)
    approximations: list[Approximation] = field(default_factory=list)
    hf_key_check: Future[None] | None = None  # still running when prepared with background_checks

    def raise_if_check_failed(self) -> None:
        """Raise the key check's error if it has already failed (without waiting for it)."""
        if self.hf_key_check is not None and self.hf_key_check.done():
            self.wait_for_checks()

    def wait_for_checks(self) -> None:
        """Wait for the transformers key check started by ``prepare(background_checks=True)``."""
        if self.hf_key_check is not None:
            self.hf_key_check.result()  # raises the check's error
            self.hf_key_check = None

    @property
    def output_tp(self) -> int:
        return self.parameters["tp"]

    def output_groups(self, max_shard_size: int = 5 * 10**9) -> list[list[str]]:
        """The target keys of each output file, as the writer will plan them (no I/O)."""
        if self.direction == "neox-to-hf":
            files = plan_shards(self.plan.target_manifest, max_shard_size)
        else:
            files = plan_layer_files(self.plan.target_manifest, self.output_tp)
        return [list(f.keys) for f in files]

    def peak_memory_bytes(self, max_shard_size: int = 5 * 10**9) -> int:
        """Most tensor bytes alive at once: the engine building one output file (simulated from
        the plan) plus the earlier files the writer threads may still be writing. An upper
        bound: bytes copied file to file in the kernel (:mod:`mapper.formats.file_ranges`) never
        enter memory, and mapped input pages are shared with the page cache."""
        groups = self.output_groups(max_shard_size)
        sizes = sorted((sum(self.plan.targets[key].meta.nbytes for key in group) for group in groups), reverse=True)
        being_written = sizes[: min(WRITER_THREADS, len(sizes) - 1)]
        return self.plan.peak_bytes(groups) + sum(being_written)

    def record(self) -> dict[str, Any]:
        """What ``mapper.json`` says about this conversion."""
        return {
            "mapper_version": __version__,
            "direction": self.direction,
            "rules": self.forward_rules.name,
            "rules_version": self.forward_rules.version,
            "parameters": self.parameters,
            "source": str(self.source.path),
            "settings": {name: getattr(self.model, name) for name in HISTORY_SETTINGS},
            "approximations": [a.model_dump() for a in self.approximations],
        }


@dataclass
class ConversionResult:
    prepared: Prepared
    report: ExecutionReport
    output: Path | None  # None for one part of a multi-part run


def prepare(
    src: str | Path,
    *,
    rules: str | Path | RuleSet | None = None,
    config_files: Sequence[str | Path] = (),
    tp: int | None = None,
    trim_vocab: int | None = None,
    parameters: Mapping[str, int] | None = None,
    settings: Mapping[str, Any] | None = None,
    strict: bool = False,
    force_rules: bool = False,
    background_checks: bool = False,
) -> Prepared:
    """Open ``src``, decide everything, and compile the plan (metadata only).

    For NeoX -> HF the plan's output is also checked against the tensors transformers expects
    for the target config. That check imports transformers (1-3 s, more than all the rest); with
    ``background_checks`` it runs in a thread while the caller goes on, and
    :func:`convert_checkpoint` waits for it before committing the output (a failed check leaves
    nothing behind). Without, the returned plan is already checked.

    ``settings`` override NeoX config values (``{"te_mha": True}``, ``{"gqa_layout": "pre-1315"}``);
    ``strict`` refuses settings HF can only approximate; ``force_rules`` lets a ``rules`` file whose
    ``variant`` contradicts the config win (its settings replace the config's).
    """
    source = open_checkpoint(src)
    if isinstance(source, NeoXCheckpoint):
        ready = _prepare_neox_to_hf(source, rules, config_files, trim_vocab, parameters or {}, settings or {},
                                    strict=strict, force_rules=force_rules)
    else:
        ready = _prepare_hf_to_neox(source, rules, config_files, tp, parameters or {}, settings or {})
    if not background_checks:
        ready.wait_for_checks()
    return ready


def convert_checkpoint(
    src: str | Path,
    out: str | Path,
    *,
    rules: str | Path | RuleSet | None = None,
    config_files: Sequence[str | Path] = (),
    tp: int | None = None,
    dtype: torch.dtype | None = None,
    trim_vocab: int | None = None,
    settings: Mapping[str, Any] | None = None,
    strict: bool = False,
    force_rules: bool = False,
    max_shard_size: int = 5 * 10**9,
    force: bool = False,
    part: tuple[int, int] | None = None,
    average_replicas: bool = False,
    parameters: Mapping[str, int] | None = None,
    on_start: Callable[[int], None] | None = None,
    on_group: Callable[[int, int], None] | None = None,
    prepared: Prepared | None = None,
) -> ConversionResult:
    """Convert a checkpoint folder into ``out`` (complete, or not at all).

    A check still running in ``prepared`` (``prepare(background_checks=True)``) overlaps the
    streaming; the conversion stops at the first group after it fails, and never commits before
    it passed.
    """
    ready = prepared or prepare(
        src, rules=rules, config_files=config_files, tp=tp, trim_vocab=trim_vocab, parameters=parameters,
        settings=settings, strict=strict, force_rules=force_rules, background_checks=True,
    )

    def group_done(index: int, nbytes: int) -> None:
        ready.raise_if_check_failed()
        if on_group is not None:
            on_group(index, nbytes)

    writer = _writer(ready, Path(out), max_shard_size=max_shard_size, force=force, part=part, dtype=dtype)
    with writer:
        if on_start is not None:
            on_start(sum(m.nbytes for m in target_manifest(ready.plan, dtype).values()))
        report = execute(
            ready.plan, ready.source, writer, sidecar=ready.sidecar, average_replicas=average_replicas,
            cast=dtype, part=part, on_group=group_done,
        )
        ready.wait_for_checks()
        _write_extras(ready, writer.staging, report, part)
    return ConversionResult(ready, report, writer.finalize() if part is None else None)


def checkpoint_parameters(
    src: str | Path, *, config_files: Sequence[str | Path] = (), settings: Mapping[str, Any] | None = None,
) -> tuple[dict[str, int], list[str]]:
    """The rule parameters a checkpoint's config supplies (``mapper rules params``), and notes on
    where they came from: a NeoX config (or, without one, the files and keys), an HF config.json."""
    source = open_checkpoint(src)
    if isinstance(source, NeoXCheckpoint):
        described = _neox_model(source, config_files, settings or {})
        return described.parameters, described.notes + described.warnings
    return NeoXModelConfig.from_hf_config(source.config or {}, tp=1).rule_parameters(), []


def detect_checkpoint(
    src: str | Path, *, config_files: Sequence[str | Path] = (), settings: Mapping[str, Any] | None = None,
) -> Detection:
    """Which shipped rule set fits ``src`` (see :mod:`mapper.detect`), with the evidence.

    An HF folder written by mapper names its rule set in ``mapper.json``; any other HF folder
    fits every rule set of its architecture (the NeoX layout is a choice), which is reported.
    """
    source = open_checkpoint(src)
    if isinstance(source, NeoXCheckpoint):
        described = _neox_model(source, config_files, settings or {})
        return detect(source.manifest(), described.parameters, model=described.model)
    record = read_record(source.path)
    target = _hf_target(source)
    if record is not None:
        named = Candidate(recorded_rules(source.path), notes=[f"{RECORD_FILE} names it (written by the conversion that made {source.path.name})"])
        return Detection(named, [named])
    model = NeoXModelConfig.from_hf_config(source.config or {}, tp=1)
    candidates = []
    for forward in builtin_rule_sets(source="neox", target=target):
        parameters = apply_variant(model, forward.variant).rule_parameters()  # a preset's switches
        (candidate,) = detect(source.manifest(), parameters, candidates=[forward.invert()]).candidates
        candidate.rules = forward  # report the NeoX -> HF rule sets by name
        candidates.append(candidate)
    return Detection(None, candidates)


def finalize_parts(out: str | Path, *, force: bool = False) -> Path:
    """The last step of a multi-machine conversion: check every part, then publish ``out``."""
    staging_plan = parts_staging_path(Path(out)) / META_DIR / "plan.json"
    kind = json.loads(staging_plan.read_text()).get("kind") if staging_plan.is_file() else "hf"
    writer = HFWriter if kind == "hf" else NeoXWriter
    return writer.finalize_parts(out, force=force)


# --- NeoX -> HF ----------------------------------------------------------------------------
def _prepare_neox_to_hf(
    source: NeoXCheckpoint,
    rules: str | Path | RuleSet | None,
    config_files: Sequence[str | Path],
    trim_vocab: int | None,
    overrides: Mapping[str, int],
    settings: Mapping[str, Any],
    *,
    strict: bool,
    force_rules: bool,
) -> Prepared:
    manifest = source.manifest()
    described = _neox_model(source, config_files, settings)
    model, parameters, notes, warnings = described.model, described.parameters, described.notes, described.warnings
    if trim_vocab:
        padded = parameters.get("vocab_size")
        if padded is not None and trim_vocab > padded:
            raise MapperError(
                f"--trim-vocab {trim_vocab} is more than the {padded} vocabulary rows of the checkpoint",
                where=source.path,
                hint=f"pass at most {padded}: the tokenizer's vocabulary size (NeoX pads it up to a multiple "
                "of make-vocab-size-divisible-by x TP)",
            )
        parameters["trim_vocab"] = trim_vocab

    detection = None
    if rules is None:
        detection = detect(manifest, {**parameters, **overrides}, model=model)
        chosen = require_single(detection, f"cannot tell which rule set fits {source.path}")
    else:
        chosen = _load(rules)
        if chosen.source != "neox":
            raise MapperError(
                f"rule set {chosen.name} converts {chosen.source} -> {chosen.target}, but {source.path} is a NeoX "
                "checkpoint", hint="pick a rule set whose source is neox (`mapper rules list`)",
            )
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
                warnings.append(f"--force-rules: {chosen.name}'s variant replaces the config's settings ("
                                + "; ".join(conflicts) + ")")
            model = apply_variant(model, chosen.variant)
            parameters.update(model.rule_parameters())
    if model is None:
        raise MapperError(
            f"converting {source.path} to HF needs the NeoX model config (hidden size, heads, norm, "
            "activation, rotary...) to write config.json",
            where=source.path, hint="pass --config path/to/model.yml (the YAML the model was trained with)",
        )
    parameters.update(overrides)
    detected = detection.chosen.plan if detection is not None and detection.chosen is not None else None
    plan = detected or compile_plan(chosen, manifest, parameters)
    arch = ARCH_OF_TARGET[chosen.target or ""]
    hf_config = model.to_hf_config(arch, intermediate_size=_mlp_width(plan), vocab_size=trim_vocab or None,
                                   strict=strict)
    approximate = approximations(model, arch)
    warnings.extend(f"approximation: {a.setting}: NeoX computes {a.neox}; HF computes {a.hf} ({a.effect}; "
                    "--strict refuses this)" for a in approximate)
    key_check = None
    if transformers_available():
        key_check = _in_background(lambda: check_expected(plan, expected_tensors(hf_config)), "mapper-hf-key-check")
    else:
        notes.append("transformers is not installed: the output was not checked against the HF model's keys")
    notes.extend(_dropped_notes(plan))
    return Prepared(
        "neox-to-hf", source, chosen, chosen, model, plan.parameters, plan, hf_config,
        described.raw, detection=detection, notes=notes, warnings=warnings, approximations=approximate,
        hf_key_check=key_check,
    )


def _in_background(work: Callable[[], None], name: str) -> Future[None]:
    """Run ``work`` in a daemon thread; its outcome (or error) is the future's."""
    outcome: Future[None] = Future()

    def run() -> None:
        try:
            work()
        except BaseException as error:  # noqa: BLE001 - handed to whoever waits
            outcome.set_exception(error)
        else:
            outcome.set_result(None)

    threading.Thread(target=run, name=name, daemon=True).start()
    return outcome


@dataclass
class NeoXDescription:
    """What a NeoX checkpoint folder says about its model before any tensor is read."""

    model: NeoXModelConfig | None  # None without a config: parameters come from the files and keys
    raw: dict[str, Any]  # the merged NeoX YAML
    parameters: dict[str, int]
    keys: KeyEvidence
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _neox_model(
    source: NeoXCheckpoint, config_files: Sequence[str | Path], settings: Mapping[str, Any]
) -> NeoXDescription:
    """The model config (given, or found under configs/, with ``settings`` on top), its merged YAML,
    and the rule parameters it implies; without a config, what the files and keys show."""
    manifest = source.manifest()
    keys = evidence_from_keys(manifest)
    files = [Path(p) for p in config_files] or list(source.config_files)
    parameters = _inferred_parameters(manifest, source.tp)
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
    model = model_from_neox_yaml(raw, tp=source.tp, padded_vocab_size=_padded_vocab(manifest, source.tp),
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


def _check_layer_count(source: NeoXCheckpoint, model: NeoXModelConfig, manifest: Mapping[str, Any]) -> None:
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


def _padded_vocab(manifest: Mapping[str, Any], tp: int) -> int | None:
    embedding = manifest.get("layer_00.word_embeddings.weight@rank0")
    return embedding.shape[0] * tp if embedding is not None else None


def _inferred_parameters(manifest: Mapping[str, Any], tp: int) -> dict[str, int]:
    """What the keys say when there is no config: TP degree, layers, vocabulary."""
    indices = {parse_neox_key(k).idx for k in manifest}
    untied = any(".final_linear." in k for k in manifest)
    blocks = len([i for i in indices if i >= 2]) - 1 - int(untied)
    found = {"tp": tp, "num_layers": max(blocks, 0), "gpt_j_residual": 0}
    vocab = _padded_vocab(manifest, tp)
    if vocab is not None:
        found["vocab_size"] = vocab
    return found


def _mlp_width(plan: Plan) -> int | None:
    for key, value in plan.targets.items():
        if key.endswith(("mlp.dense_4h_to_h.weight", "mlp.down_proj.weight")):
            return value.meta.shape[1]
    return None


def _dropped_notes(plan: Plan) -> list[str]:
    """Dropped tensors, summarised by rule and reason (a stale norm must never go unnoticed)."""
    by_rule: dict[str, list[str]] = {}
    for node in plan.dropped:
        by_rule.setdefault(f"{node.op.note or 'dropped'} [{node.rule_id}]", []).append(node.inputs[0].key)
    return [f"dropped {len(keys)} tensor(s): {why}, e.g. {keys[0]}" for why, keys in by_rule.items()]


# --- HF -> NeoX ----------------------------------------------------------------------------
def _prepare_hf_to_neox(
    source: HFCheckpoint,
    rules: str | Path | RuleSet | None,
    config_files: Sequence[str | Path],
    tp: int | None,
    overrides: Mapping[str, int],
    settings: Mapping[str, Any],
) -> Prepared:
    if source.config is None:
        raise CheckpointError(
            "the HF folder has no config.json", where=source.path,
            hint="converting to NeoX needs the model's config.json",
        )
    notes: list[str] = []
    record = read_record(source.path)
    target = _hf_target(source)
    if rules is not None:
        forward = _load(rules)
        if forward.source == "hf-gpt-neox" or forward.source == "hf-llama":
            forward = forward.invert()
    elif record is not None:
        forward = recorded_rules(source.path)
        notes.append(f"rule set {forward.name} {forward.version} as recorded by the conversion that made this folder")
    else:
        candidates = [r.name for r in builtin_rule_sets(source="neox", target=target)]
        raise MapperError(
            f"{source.path} is an HF {source.config.get('model_type')} model; several NeoX layouts can "
            f"hold it: {', '.join(candidates)}",
            hint="name the NeoX variant you want with --rules (e.g. --rules "
            f"{'neox-to-hf-gpt-neox' if target == 'hf-gpt-neox' else 'neox-llama-to-hf-llama'} for NeoX's "
            "own modules, or a TE rule set to continue training with Transformer Engine; its inverse is used)",
        )
    if forward.target != target:
        raise MapperError(
            f"rule set {forward.name} converts to {forward.target}, but {source.path} holds {target}",
            hint="pick a rule set for this architecture (`mapper rules list`)",
        )

    out_tp = tp or (record.parameters.get("tp") if record else None) or 1
    _check_tp(source, out_tp)
    saved_yaml = source.path / NEOX_CONFIG_FILE
    files = [Path(p) for p in config_files] or ([saved_yaml] if saved_yaml.is_file() else [])
    raw = load_neox_yaml(files) if files else {}
    hf_vocab = source.config.get("vocab_size")
    if not isinstance(hf_vocab, int) or isinstance(hf_vocab, bool) or hf_vocab <= 0:
        raise CheckpointError(f"config.json: vocab_size must be a positive integer, got {hf_vocab!r}",
                              where=source.path / "config.json", hint="fix config.json (the rows of the embedding)")
    if raw:
        raw = {**raw, "model_parallel_size": out_tp}
        model = NeoXModelConfig.from_neox_yaml(raw, tp=out_tp, padded_vocab_size=_repadded(raw, hf_vocab, out_tp))
    else:
        model = NeoXModelConfig.from_hf_config(source.config, tp=out_tp)
    _check_hf_layer_count(source, model)
    recorded = record.settings if record else {}
    given = {**{k: v for k, v in recorded.items() if k in HISTORY_SETTINGS}, **normalize_keys(settings, where="--set")}
    model = apply_variant(model, forward.variant)
    if given:
        model = validated({**model.model_dump(), **given}, where="--set")
    parameters = {**model.rule_parameters(), "tp": out_tp}
    if hf_vocab != model.vocab_size:
        parameters["trim_vocab"] = hf_vocab
    parameters.update(overrides)

    sidecar = _read_sidecar(source.path, forward, record, out_tp, notes)
    inverse = forward.invert()
    plan = compile_plan(inverse, source.manifest(), parameters, sidecar=sidecar)
    notes.extend(plan.notes)
    return Prepared(
        "hf-to-neox", source, inverse, forward, model, plan.parameters, plan, dict(source.config),
        {**model.to_neox_yaml(), **_hyphenated(raw)} if raw else model.to_neox_yaml(),
        sidecar=sidecar, notes=notes,
    )


def _check_hf_layer_count(source: HFCheckpoint, model: NeoXModelConfig) -> None:
    """config.json's num_hidden_layers must match the layers the weights hold (checked before
    anything sizes work by it: a hostile or stale config may say a million)."""
    found = {int(m.group(1)) for key in source.manifest() if (m := _HF_LAYER.search(key))}
    if found and max(found) + 1 != model.num_layers:
        raise CheckpointError(
            f"config.json says num_hidden_layers {model.num_layers}, but the weights hold {max(found) + 1} layers",
            where=source.path / "config.json", hint="fix config.json (or pass the model's own) and convert again",
        )


_HF_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _hf_target(source: HFCheckpoint) -> str:
    model_type = (source.config or {}).get("model_type")
    if source.config is None or model_type not in HF_TARGETS:
        raise CheckpointError(
            f"HF model_type {model_type!r} is not supported" if source.config else "the HF folder has no config.json",
            where=source.path / "config.json", hint="mapper converts gpt_neox and llama models (config.json names model_type)",
        )
    return HF_TARGETS[str(model_type)]


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


def _repadded(raw: Mapping[str, Any], hf_vocab: int, tp: int) -> int:
    divisible_by = int(raw.get("make_vocab_size_divisible_by", 128))
    return pad_vocab_size(hf_vocab, divisible_by, tp)


def _hyphenated(raw: Mapping[str, Any]) -> dict[str, Any]:
    return {key.replace("_", "-"): value for key, value in raw.items()}


def recorded_rules(folder: Path) -> RuleSet:
    """The rule set a mapper conversion used to write ``folder``: its saved copy, else by name."""
    saved = folder / RULES_FILE
    if saved.is_file():
        return load_rules(saved)
    record = read_record(folder)
    if record is None:
        raise CheckpointError(f"{folder} was not written by mapper (no {RECORD_FILE})", where=folder,
                              hint="name the rule set with --rules")
    return load_rules(record.rules)


def _read_sidecar(
    folder: Path, forward: RuleSet, record: ConversionRecord | None, out_tp: int, notes: list[str]
) -> Sidecar | None:
    paths = sorted(folder.glob("mapper-sidecar*.safetensors"))
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


# --- writing -------------------------------------------------------------------------------
def _writer(
    ready: Prepared, out: Path, *, max_shard_size: int, force: bool, part: tuple[int, int] | None,
    dtype: torch.dtype | None,
) -> HFWriter | NeoXWriter:
    inputs = [ready.source.path, getattr(ready.source, "root", ready.source.path)]
    if ready.direction == "neox-to-hf":
        config = dict(ready.hf_config)
        if dtype is not None:
            config["dtype"] = str(dtype).removeprefix("torch.")
        metadata = {"mapper_rules": ready.forward_rules.name, "mapper_rules_version": str(ready.forward_rules.version),
                    "mapper_version": __version__}
        locate = ready.source.file_range if isinstance(ready.source, NeoXCheckpoint) else None
        return HFWriter(out, config=config, max_shard_size=max_shard_size, metadata=metadata, parts=part,
                        force=force, inputs=inputs, locate=locate)
    return NeoXWriter(out, yaml_config=ready.neox_yaml, tp=ready.output_tp, parts=part, force=force, inputs=inputs)


def _write_extras(ready: Prepared, staging: Path, report: ExecutionReport, part: tuple[int, int] | None) -> None:
    """The conversion record, the NeoX config and the sidecar, beside the model files."""
    if ready.direction != "neox-to-hf":
        return
    suffix = f".part-{part[0]:05d}-of-{part[1]:05d}" if part else ""
    if part is None or part[0] == part[1]:
        write_bytes_atomic(staging / RECORD_FILE, (json.dumps(ready.record(), indent=2) + "\n").encode())
        write_bytes_atomic(staging / RULES_FILE, dump_rule_set(ready.forward_rules).encode())
        write_bytes_atomic(staging / NEOX_CONFIG_FILE, yaml.safe_dump(_plain(ready.neox_yaml), sort_keys=False).encode())
    if report.sidecar.entries or report.sidecar.dropped:
        name = SIDECAR_FILE.replace(".safetensors", f"{suffix}.safetensors")
        tensors, metadata = report.sidecar.contents()
        with AtomicFile(staging / name) as f:
            write_safetensors(f, tensors, metadata)


def _plain(data: Any) -> Any:
    """YAML-safe copy of a config dict (tuples and numpy-ish scalars become plain types)."""
    return json.loads(json.dumps(data, default=str))


def _load(rules: str | Path | RuleSet) -> RuleSet:
    return rules if isinstance(rules, RuleSet) else load_rules(rules)
