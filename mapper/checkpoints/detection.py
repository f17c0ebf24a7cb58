"""``mapper detect``: which shipped rule set fits a checkpoint folder, with the evidence."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mapper.checkpoints.hf_side import hf_target_of, recorded_rules
from mapper.checkpoints.neox_side import describe_neox
from mapper.configs import NeoXModelConfig
from mapper.detect import Candidate, Detection, apply_variant, detect
from mapper.formats import NeoXCheckpoint, open_checkpoint
from mapper.record import RECORD_FILE, read_record
from mapper.spec.catalog import builtin_rule_sets


def detect_checkpoint(
    src: str | Path, *, config_files: Sequence[str | Path] = (), settings: Mapping[str, Any] | None = None,
) -> Detection:
    """Which shipped rule set fits ``src`` (see :mod:`mapper.detect`), with the evidence.

    An HF folder written by mapper names its rule set in its record; any other HF folder fits
    every rule set of its architecture (the NeoX layout is a choice), which is reported.
    """
    source = open_checkpoint(src)
    if isinstance(source, NeoXCheckpoint):
        described = describe_neox(source, [Path(p) for p in config_files], settings or {})
        return detect(source.manifest(), described.parameters, model=described.model)
    target = hf_target_of(source)
    if read_record(source.path) is not None:
        named = Candidate(recorded_rules(source.path),
                          notes=[f"{RECORD_FILE} names it (written by the conversion that made {source.path.name})"])
        return Detection(named, [named])
    model = NeoXModelConfig.from_hf_config(source.config or {}, tp=1)
    candidates = []
    for forward in builtin_rule_sets(source="neox", target=target.rules_target):
        parameters = apply_variant(model, forward.variant).rule_parameters()  # a preset's switches
        (candidate,) = detect(source.manifest(), parameters, candidates=[forward.invert()]).candidates
        candidate.rules = forward  # report the NeoX -> HF rule sets by name
        candidates.append(candidate)
    return Detection(None, candidates)


def checkpoint_parameters(
    src: str | Path, *, config_files: Sequence[str | Path] = (), settings: Mapping[str, Any] | None = None,
) -> tuple[dict[str, int], list[str]]:
    """The rule parameters a checkpoint's config supplies (``mapper rules params``), and notes on
    where they came from: a NeoX config (or, without one, the files and keys), an HF config.json."""
    source = open_checkpoint(src)
    if isinstance(source, NeoXCheckpoint):
        described = describe_neox(source, [Path(p) for p in config_files], settings or {})
        return described.parameters, described.notes + described.warnings
    return NeoXModelConfig.from_hf_config(source.config or {}, tp=1).rule_parameters(), []
