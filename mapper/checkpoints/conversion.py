"""prepare(src, ...): decide everything a folder conversion needs and prove its plan, reading no tensor.

One path for every direction: open the source, describe its model (:mod:`.neox_side` or
:mod:`.hf_side`), choose the NeoX -> HF rule set (given, recorded or detected), then compile the
rules the output needs -- the rule set itself (NeoX -> HF), its inverse (HF -> NeoX), or both in a
row (NeoX -> NeoX: merge the ranks, then shard them again) -- and describe the output
(``config.json``, or the NeoX YAML at the output's TP).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mapper.version import __version__
from mapper.checkpoints.hf_side import HFDescription, describe_hf, hf_output_config, read_sidecar
from mapper.checkpoints.neox_side import HISTORY_SETTINGS, choose_rules, describe_neox, neox_yaml_for
from mapper.checkpoints.options import ConversionOptions, Direction, options as make_options
from mapper.configs import NeoXModelConfig, pad_vocab_size
from mapper.configs.neox_yaml import validated
from mapper.configs.hf import Approximation
from mapper.detect import Detection
from mapper.engine import Plan, Sidecar, compile_plan
from mapper.engine.chain import chain_plans, identity_plan
from mapper.engine.compile import check_expected
from mapper.engine.execute import target_manifest
from mapper.errors import MapperError
from mapper.formats import HFCheckpoint, NeoXCheckpoint, open_checkpoint
from mapper.formats.hf_writer import plan_shards
from mapper.formats.neox_writer import plan_layer_files
from mapper.formats.writing import WRITER_THREADS
from mapper.hf_models import expected_tensors, transformers_available
from mapper.spec import RuleSet
from mapper.tensors import Source
from mapper.tokenizer import plan_neox_tokenizer, plan_tokenizer


@dataclass
class Prepared:
    """A conversion whose plan is proven: everything decided, nothing read yet."""

    direction: Direction
    source: Source  # NeoXCheckpoint, HFCheckpoint, or the fp32 masters of a NeoX checkpoint
    rules: RuleSet  # as executed (the inverse for HF -> NeoX; the re-sharding half for NeoX -> NeoX)
    forward_rules: RuleSet  # the NeoX -> HF rule set it comes from
    model: NeoXModelConfig  # of the output (its TP for a NeoX output)
    parameters: dict[str, int]  # of the plan that writes the output
    plan: Plan
    options: ConversionOptions
    hf_config: dict[str, Any] | None = None  # an HF output's config.json
    neox_yaml: dict[str, Any] | None = None  # a NeoX output's config (also recorded beside an HF output)
    layout: str = "pipeline"  # of a NeoX output
    sidecar: Sidecar | None = None
    detection: Detection | None = None
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # things a person should check (printed as warnings)
    approximations: list[Approximation] = field(default_factory=list)
    tokenizer: Any = None  # mapper.tokenizer TokenizerPlan (HF output) or NeoXTokenizerPlan (NeoX output)
    hf_key_check: Future[None] | None = None  # still running when prepared with background_checks

    def __repr__(self) -> str:  # a summary, not the plan and the configs (megabytes for a real model)
        where = getattr(self.source, "root", None) or getattr(self.source, "path", None) or type(self.source).__name__
        return (f"Prepared({self.direction}, {where}, rules {self.forward_rules.name!r} {self.forward_rules.version or ''}, "
                f"{'' if self.to_hf else f'TP {self.output_tp}, '}{len(self.plan.targets)} tensors to write, {len(self.notes)} note(s), "
                f"{len(self.warnings)} warning(s))")

    @property
    def to_hf(self) -> bool:
        return self.direction == "neox-to-hf"

    @property
    def output_tp(self) -> int:
        return self.parameters["tp"]

    def raise_if_check_failed(self) -> None:
        """Raise the key check's error if it has already failed (without waiting for it)."""
        if self.hf_key_check is not None and self.hf_key_check.done():
            self.wait_for_checks()

    def wait_for_checks(self) -> None:
        """Wait for the transformers key check started by ``prepare(background_checks=True)``."""
        if self.hf_key_check is not None:
            self.hf_key_check.result()  # raises the check's error
            self.hf_key_check = None

    def target_manifest(self) -> dict[str, Any]:
        """The output's tensors as they will be written (after the ``dtype`` cast)."""
        return target_manifest(self.plan, self.options.dtype)

    def output_groups(self, max_shard_size: int = 5 * 10**9) -> list[list[str]]:
        """The target keys of each output file, as the writer will plan them (no I/O)."""
        manifest = self.target_manifest()
        files = (plan_shards(manifest, max_shard_size) if self.to_hf
                 else plan_layer_files(manifest, self.output_tp, layout=self.layout))
        return [list(f.keys) for f in files]

    def peak_memory_bytes(self, max_shard_size: int = 5 * 10**9) -> int:
        """Most tensor bytes alive at once: the engine building one output file (simulated from
        the plan) plus the earlier files the writer threads may still be writing. An upper
        bound: bytes copied file to file in the kernel (:mod:`mapper.formats.file_ranges`) never
        enter memory, and mapped input pages are shared with the page cache."""
        groups = self.output_groups(max_shard_size)
        manifest = self.target_manifest()
        sizes = sorted((sum(manifest[key].nbytes for key in group) for group in groups), reverse=True)
        being_written = sizes[: min(WRITER_THREADS, len(sizes) - 1)]
        return self.plan.peak_bytes(groups) + sum(being_written)

    def record(self) -> dict[str, Any]:
        """What ``mapper/record.json`` says about this conversion."""
        return {
            "mapper_version": __version__,
            "direction": self.direction,
            "rules": self.forward_rules.name,
            "rules_version": self.forward_rules.version,
            "parameters": self.parameters,
            "source": str(getattr(self.source, "path", "")),
            "settings": {name: getattr(self.model, name) for name in HISTORY_SETTINGS},
            "approximations": [a.model_dump() for a in self.approximations],
            "dtype": None if self.options.dtype is None else str(self.options.dtype).removeprefix("torch."),
            # where each rule was written, so a later `verify` blames the user's file:line, not the copy
            "origins": {op.id: origin for op in self.forward_rules.ops if (origin := self.forward_rules.origin(op.id))},
        }


def prepare(src: str | Path, *, background_checks: bool = False, **given: Any) -> Prepared:
    """Open ``src``, decide everything, and compile the plan (metadata only).

    Keywords are the fields of :class:`~mapper.checkpoints.options.ConversionOptions` (``rules``,
    ``config_files``, ``to``, ``tp``, ``layout``, ``dtype``, ``trim_vocab``, ``settings``,
    ``parameters``, ``strict``, ``force_rules``, ``weights``, ``tokenizer``); they are validated once,
    here, and one that does not apply to the direction is an error.

    An HF output is also checked against the tensors transformers expects for its ``config.json``.
    That check imports transformers (1-3 s, more than all the rest); with ``background_checks``
    it runs in a thread while the caller goes on, and :func:`convert_checkpoint` waits for it
    before committing the output (a failed check leaves nothing behind).
    """
    opts = make_options(**given)
    source = open_checkpoint(src)
    if isinstance(source, NeoXCheckpoint):
        ready = _from_neox(source, opts)
    else:
        ready = _from_hf(source, opts)
    if not background_checks:
        ready.wait_for_checks()
    return ready


def _from_neox(source: NeoXCheckpoint, opts: ConversionOptions) -> Prepared:
    direction: Direction = "neox-to-neox" if opts.to == "neox" else "neox-to-hf"
    opts.check_direction(direction)
    described = describe_neox(source, opts.config_files, opts.settings)
    if opts.trim_vocab:
        padded = described.parameters.get("vocab_size")
        if padded is not None and opts.trim_vocab > padded:
            raise MapperError(
                f"--trim-vocab {opts.trim_vocab} is more than the {padded} vocabulary rows of the checkpoint",
                where=source.path,
                hint=f"pass at most {padded}: the tokenizer's vocabulary size (NeoX pads it up to a multiple "
                "of make-vocab-size-divisible-by x TP)",
            )
        described.parameters["trim_vocab"] = opts.trim_vocab
    forward, detection = choose_rules(source, described, opts.rules, {**described.parameters, **opts.parameters},
                                      force_rules=opts.force_rules)
    model = described.model
    if model is None:
        raise MapperError(
            f"converting {source.path} needs the NeoX model config (hidden size, heads, norm, activation, "
            "rotary...)", where=source.path, hint="pass --config path/to/model.yml (the YAML the model was trained with)",
        )
    reader: Source = source
    if opts.weights == "master":
        from mapper.formats.zero import open_master_weights

        reader = open_master_weights(source.path)
        described.notes.extend(getattr(reader, "notes", []))
    parameters = {**described.parameters, **opts.parameters}
    notes, warnings = described.notes, described.warnings
    if direction == "neox-to-neox":
        return _reshard(reader, forward, model, described.raw, parameters, opts, detection, notes, warnings,
                        opts.layout or source.layout)
    detected = detection.chosen.plan if detection is not None and detection.chosen is not None else None
    plan = detected if detected is not None and reader is source else compile_plan(forward, reader.manifest(), parameters)

    hf_config, approximate = hf_output_config(model, forward, {key: meta.shape for key, meta in plan.target_manifest.items()}, strict=opts.strict)
    warnings.extend(f"approximation: {a.setting}: NeoX computes {a.neox}; HF computes {a.hf} ({a.effect}; "
                    "--strict refuses this)" for a in approximate)
    if opts.dtype is not None:
        hf_config["dtype"] = str(opts.dtype).removeprefix("torch.")
    elif opts.weights == "master":
        hf_config["dtype"] = "float32"
    tokenizer = plan_tokenizer(described.raw, source.root, override=opts.tokenizer,
                               embedding_rows=hf_config["vocab_size"], config_files=opts.config_files or source.config_files)
    hf_config.update(tokenizer.config_fields())
    notes.extend(tokenizer.notes)
    warnings.extend(str(w) for w in tokenizer.warnings)
    key_check = None
    if transformers_available():
        key_check = _in_background(lambda: check_expected(plan, expected_tensors(hf_config)), "mapper-hf-key-check")
    else:
        notes.append("transformers is not installed: the output was not checked against the HF model's keys")
    notes.extend(_dropped_notes(plan))
    return Prepared(
        direction, reader, forward, forward, model, plan.parameters, plan, opts, hf_config=hf_config,
        neox_yaml=neox_yaml_for(model, described.raw, tp=model.tp), detection=detection, notes=notes, warnings=warnings,
        approximations=approximate, tokenizer=tokenizer, hf_key_check=key_check,
    )


def _from_hf(source: HFCheckpoint, opts: ConversionOptions) -> Prepared:
    opts.check_direction("hf-to-neox")
    if opts.to == "hf":
        raise MapperError(f"{source.path} is already an HF folder", hint="--to hf converts a NeoX checkpoint")
    described: HFDescription = describe_hf(source, opts.rules, opts.config_files, opts.settings, tp=opts.tp)
    parameters = {**described.parameters, **opts.parameters}
    sidecar = read_sidecar(source.path, described.forward, described.record, parameters["tp"], described.notes)
    inverse = described.forward.invert()
    plan = compile_plan(inverse, source.manifest(), parameters, sidecar=sidecar)
    tokenizer = plan_neox_tokenizer(source.path, override=opts.tokenizer, neox_yaml=described.raw or None)
    return Prepared(
        "hf-to-neox", source, inverse, described.forward, described.model, plan.parameters, plan, opts,
        neox_yaml=neox_yaml_for(described.model, described.raw, tp=plan.parameters["tp"]), layout=opts.layout or "pipeline",
        sidecar=sidecar,
        notes=described.notes + plan.notes + tokenizer.notes,
        warnings=described.warnings + [str(w) for w in tokenizer.warnings], tokenizer=tokenizer,
    )


def _reshard(reader: Source, forward: RuleSet, model: NeoXModelConfig, raw: Mapping[str, Any],
             parameters: dict[str, int], opts: ConversionOptions, detection: Detection | None, notes: list[str],
             warnings: list[str], layout: str) -> Prepared:
    """NeoX -> NeoX: the rule set merges the ranks, its inverse shards them again at ``--tp``."""
    out_tp = opts.tp or model.tp
    if out_tp == model.tp:  # a layout change: every tensor passes through as it is
        plan = identity_plan(reader.manifest(), forward, model.rule_parameters())
        return Prepared(
            "neox-to-neox", reader, forward, forward, model, plan.parameters, plan, opts,
            neox_yaml=neox_yaml_for(model, raw, tp=out_tp), layout=layout, detection=detection,
            notes=notes + ["same TP degree: every tensor is written as it is (layout change only)"], warnings=warnings,
        )
    try:
        out_model, trim = _vocabulary_at(model, out_tp, reader, raw, opts, notes, warnings)
    except MapperError as error:
        raise MapperError(f"cannot re-shard to TP {out_tp}: {error.message}", where="--tp",
                          hint="choose a TP degree that divides the attention heads and key/value heads") from None
    merged = compile_plan(forward, reader.manifest(), {**parameters, "trim_vocab": trim})
    inverse = forward.invert()
    sharded = compile_plan(inverse, merged.target_manifest,
                           {**merged.parameters, **out_model.rule_parameters(), "trim_vocab": trim, **opts.parameters})
    plan = chain_plans(merged, sharded)
    notes.extend(sharded.notes)
    if any(not node.inputs for node in sharded.nodes):
        notes.append("TE FP8 metadata (_extra_state) is written empty: its per-rank scaling history cannot follow a "
                     "new TP degree (TE starts a new one when training resumes)")
    return Prepared(
        "neox-to-neox", reader, inverse, forward, out_model, plan.parameters, plan, opts,
        neox_yaml=neox_yaml_for(out_model, raw, tp=out_tp), layout=layout, detection=detection, notes=notes,
        warnings=warnings,
    )


def _vocabulary_at(model: NeoXModelConfig, out_tp: int, reader: Source, raw: Mapping[str, Any],
                   opts: ConversionOptions, notes: list[str], warnings: list[str]) -> tuple[NeoXModelConfig, int]:
    """The model at ``out_tp`` and the rows both degrees keep (0: all).

    NeoX pads the vocabulary to a multiple of make-vocab-size-divisible-by x TP. Keeping that product
    keeps every row: TP 2 with 8 becomes TP 1 with 16 (same padded size, so m -> n -> m is exact
    and NeoX loads it). Where the product does not divide by the new degree, the rows are cut to
    what both degrees share and padded with zeros to what NeoX computes from its tokenizer's count.
    """
    product = model.make_vocab_size_divisible_by * model.tp
    if product % out_tp == 0:
        divisible_by = product // out_tp
        if divisible_by != model.make_vocab_size_divisible_by:
            notes.append(f"make-vocab-size-divisible-by {model.make_vocab_size_divisible_by} -> {divisible_by}: NeoX "
                         f"pads the vocabulary to a multiple of it x TP, so the {model.vocab_size} rows stay as they are")
        out = validated({**model.model_dump(), "tp": out_tp, "make_vocab_size_divisible_by": divisible_by}, where="--tp")
        return out, 0
    tokens = model.orig_vocab_size
    if tokens is None:  # NeoX pads what its tokenizer counts: ask the tokenizer the config names
        root = getattr(reader, "root", None)
        if root is not None:
            tokens = plan_tokenizer(raw, root, override=opts.tokenizer, config_files=opts.config_files).neox_vocab_size
    if tokens is None:
        tokens = model.vocab_size
        warnings.append(f"the tokenizer's vocabulary size is unknown: NeoX at TP {out_tp} pads its own count to a "
                        f"multiple of {model.make_vocab_size_divisible_by * out_tp}; "
                        "give the tokenizer (--tokenizer) or --set vocab-size=N if NeoX disagrees when it loads")
    out_vocab = pad_vocab_size(tokens, model.make_vocab_size_divisible_by, out_tp)
    out = validated({**model.model_dump(), "tp": out_tp, "vocab_size": out_vocab}, where="--tp")
    if out_vocab < model.vocab_size:
        warnings.append(f"the vocabulary is padded to {out_vocab} rows at TP {out_tp} (was {model.vocab_size}): rows "
                        f"{out_vocab}..{model.vocab_size - 1} are padding NeoX never feeds or predicts, and are cut")
    return out, min(model.vocab_size, out_vocab) if out_vocab != model.vocab_size else 0


def _dropped_notes(plan: Plan) -> list[str]:
    """Dropped tensors, summarised by rule and reason (a stale norm must never go unnoticed)."""
    by_rule: dict[str, list[str]] = {}
    for node in plan.dropped:
        by_rule.setdefault(f"{node.op.note or 'dropped'} [{node.rule_id}]", []).append(node.inputs[0].key)
    return [f"dropped {len(keys)} tensor(s): {why}, e.g. {keys[0]}" for why, keys in by_rule.items()]


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

