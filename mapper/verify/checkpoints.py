"""``mapper verify``: a converted HF folder against its NeoX checkpoint, or against gpt-neox's own dump.

The conversion's plan is rebuilt from the rule set the HF folder records (``mapper/record.json``,
``mapper/rules.yaml``, else detected or given), so a divergence names the rules (file:line) that
produced its tensors, for a user-written rule set as for a shipped one. The cast ``convert
--dtype`` made is read from the record and verification compares in it. Both models are
streamed (:mod:`mapper.verify.walk`): memory follows one layer of each, not the model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from mapper.checkpoints import prepare, recorded_rules
from mapper.configs import NeoXModelConfig
from mapper.dtypes import dtype_from_name
from mapper.errors import CheckpointError, MapperError
from mapper.input_files import read_text
from mapper.record import existing, read_record
from mapper.safe_yaml import load_yaml
from mapper.spec import RuleSet
from mapper.verify.compare import checked_input_ids, default_input_ids
from mapper.verify.dump import ReferenceDump, config_sha256
from mapper.verify.report import VerifyReport
from mapper.verify.settings import check_settings
from mapper.verify.tolerances import Tolerances, coarsest, default_tolerances

Progress = Callable[[int, int], None]


def recorded_cast(hf: Path) -> torch.dtype | None:
    """The dtype ``convert --dtype`` cast the HF weights to, as mapper's record says."""
    record = read_record(hf)
    return dtype_from_name(record.dtype) if record is not None and record.dtype else None


def _recorded_settings(hf: Path) -> dict[str, str]:
    """The conversion's gpt-neox history settings (e.g. ``--set gqa_layout=pre-1315``), not a fresh guess."""
    record = read_record(hf)
    return dict(record.settings) if record is not None else {}


def _tolerances(dtype: torch.dtype, atol: float | None, rtol: float | None) -> Tolerances:
    base = default_tolerances(dtype)
    return Tolerances(atol=base.atol if atol is None else atol, rtol=base.rtol if rtol is None else rtol)


def _cast_note(cast: torch.dtype | None, compared: torch.dtype) -> list[str]:
    if cast is None:
        return []
    return [f"the HF weights were cast to {str(cast).removeprefix('torch.')} by `convert --dtype` (mapper/record.json); "
            f"the reference uses the same rounded weights and points are judged with "
            f"{str(compared).removeprefix('torch.')} tolerances"]


class _Lazy(Mapping[str, torch.Tensor]):
    """A reader's tensors as a mapping, read on access: the reference reads one layer at a time."""

    def __init__(self, source: Any):
        self.source, self.keys_ = source, source.manifest()

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.source.get(key)

    def __contains__(self, key: object) -> bool:
        return key in self.keys_

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys_)

    def __len__(self) -> int:
        return len(self.keys_)


def verify_checkpoints(
    neox: str | Path,
    hf: str | Path,
    *,
    rules: str | Path | RuleSet | None = None,
    config_files: Sequence[str | Path] = (),
    dtype: torch.dtype | None = None,
    device: str = "cpu",
    text: str | None = None,
    tokenizer: str | Path | None = None,
    seed: int = 0,
    batch: int = 2,
    seq_len: int = 16,
    continuation: int = 8,
    atol: float | None = None,
    rtol: float | None = None,
    on_progress: Progress | None = None,
) -> VerifyReport:
    """Compare a NeoX checkpoint with the HF folder converted from it, point by point, streamed.

    ``dtype`` (compute precision) defaults to the cast recorded in ``mapper/record.json``, else float32.
    """
    from mapper.verify.hf_side import StreamedHF
    from mapper.verify.reference import NeoXStages
    from mapper.verify.walk import BuiltinReference, walk

    hf = Path(hf)
    if rules is None and read_record(hf) is not None:
        rules = recorded_rules(hf)
    prepared = prepare(neox, rules=rules, config_files=config_files, settings=_recorded_settings(hf))
    if prepared.direction != "neox-to-hf":
        raise MapperError(f"{neox} is not a NeoX checkpoint",
                          hint="usage: mapper verify NEOX_CHECKPOINT HF_FOLDER, or mapper verify --reference DUMP HF_FOLDER")
    cast = recorded_cast(hf)
    compute = dtype or cast or torch.float32
    compared = coarsest(compute, cast)
    model = StreamedHF(hf, dtype=compute, device=device)
    try:
        stages = NeoXStages(_Lazy(prepared.source), prepared.model, dtype=compute, device=device, weights_dtype=cast)
        if text is not None:
            ids, used_seed = _tokenize(text, tokenizer), None
        else:
            ids, used_seed = default_input_ids(prepared.model, model.vocab, seed=seed, batch=batch, seq_len=seq_len), seed
        ids = checked_input_ids(ids, prepared.model.positions, continuation)
        return walk(BuiltinReference(stages), model, ids, tolerances=_tolerances(compared, atol, rtol),
                    compare_dtype=compared, plan=prepared.plan, keys=list(prepared.plan.targets),
                    settings=check_settings(dict(model.reader.config or {}), prepared.model),
                    continuation=continuation, seed=used_seed, notes=_cast_note(cast, compared),
                    on_progress=on_progress)
    finally:
        model.close()


def verify_against_reference(
    dump: str | Path,
    hf: str | Path,
    *,
    neox: str | Path | None = None,
    rules: str | Path | RuleSet | None = None,
    config_files: Sequence[str | Path] = (),
    dtype: torch.dtype | None = None,
    device: str = "cpu",
    atol: float | None = None,
    rtol: float | None = None,
    on_progress: Progress | None = None,
) -> VerifyReport:
    """Compare an HF folder with the activations gpt-neox itself computed (``neox_reference_dump.py``).

    Works for any variant, including user-written rule sets: nothing here reads NeoX tensors.
    Rules are named from the conversion's plan: rebuilt from the NeoX checkpoint (``neox``, or the
    one the dump names when it is on this machine), else from the HF folder and its recorded
    rule set (inverted). ``dtype`` defaults to the dump's.
    """
    from mapper.verify.hf_side import StreamedHF
    from mapper.verify.walk import DumpReference, walk

    hf = Path(hf)
    reference = ReferenceDump(dump)
    cast = recorded_cast(hf)
    compute = dtype or reference.dtype
    compared = coarsest(compute, cast, reference.dtype)
    plan, keys, notes = _plan_for_blame(reference, hf, neox, rules, config_files)
    notes += _cast_note(cast, compared)
    model = StreamedHF(hf, dtype=compute, device=device)
    try:
        neox_model, where = _neox_model(reference, hf)
        settings = check_settings(dict(model.reader.config or {}), neox_model) if neox_model is not None else []
        if neox_model is None:
            notes.append("no NeoX config in the dump or the HF folder: config.json was not checked field by field")
        else:
            notes.append(f"config.json checked against {where}")
        notes += _hash_note(reference, hf)
        ids = reference.get("input_ids").long()
        if int(ids.max()) >= model.vocab:
            raise MapperError(f"the dump's token ids reach {int(ids.max())}, the HF model has {model.vocab} rows",
                              hint="dump with ids below the tokenizer's vocabulary (the script's default)")
        return walk(DumpReference(reference), model, ids, tolerances=_tolerances(compared, atol, rtol),
                    compare_dtype=compared, plan=plan, keys=keys or list(model.manifest), settings=settings,
                    notes=notes, on_progress=on_progress)
    finally:
        model.close()


def _neox_model(reference: ReferenceDump, hf: Path) -> tuple[NeoXModelConfig | None, str]:
    """gpt-neox's own settings from the dump, else the NeoX config the conversion recorded."""
    model = reference.model_config()
    if model is not None:
        return model, "gpt-neox's settings recorded in the dump"
    saved = existing(hf, "neox_config")
    if saved is not None:
        raw = _saved_yaml(saved)
        try:
            return NeoXModelConfig.from_neox_yaml(raw, tp=int(reference.metadata.get("tp", 1)),
                                                  padded_vocab_size=int(reference.get("logits").shape[-1])), saved.name
        except MapperError:
            return None, ""
    return None, ""


def _saved_yaml(saved: Path) -> Any:
    """The NeoX config an HF folder carries, read as any YAML from outside (:mod:`mapper.safe_yaml`)."""
    text = read_text(saved, what="the NeoX config the conversion recorded", error=MapperError)
    try:
        return load_yaml(text, where=str(saved)) or {}
    except yaml.YAMLError as error:
        raise MapperError(f"not valid YAML: {error}", where=saved, hint="convert the model again to rewrite it") from None


def _hash_note(reference: ReferenceDump, hf: Path) -> list[str]:
    saved = existing(hf, "neox_config")
    dumped = reference.metadata.get("config_sha256")
    if not dumped or saved is None:
        return []
    ours = config_sha256(_saved_yaml(saved))
    if ours == dumped:
        return [f"the dump was made from the same NeoX config as the conversion (sha256 {ours[:12]})"]
    return [f"the dump's NeoX config (sha256 {dumped[:12]}) is not the one the conversion recorded in "
            f"{saved.name} ({ours[:12]}): make sure both come from the same checkpoint"]


def _plan_for_blame(
    reference: ReferenceDump, hf: Path, neox: str | Path | None, rules: str | Path | RuleSet | None,
    config_files: Sequence[str | Path],
) -> tuple[Any | None, list[str], list[str]]:
    if rules is None and read_record(hf) is not None:
        rules = recorded_rules(hf)
    source = neox or reference.metadata.get("checkpoint")
    if source is not None and Path(source).exists():
        try:
            prepared = prepare(source, rules=rules, config_files=config_files, settings=_recorded_settings(hf))
            return prepared.plan, list(prepared.plan.targets), []
        except MapperError as error:
            if neox is not None:
                raise
            note = f"the checkpoint the dump names could not be read ({error.message}); "
    else:
        note = ""
    if rules is None:
        return None, [], [note + "no rule set recorded in the HF folder: a divergence names tensors, not rules"]
    try:
        inverse = prepare(hf, rules=rules, config_files=config_files)
    except MapperError as error:
        return None, [], [note + f"the rules could not be matched to the HF folder ({error.message}): "
                          "a divergence names tensors, not rules"]
    return _ForwardView(inverse.plan, inverse.forward_rules), list(inverse.plan.sources), ([note] if note else [])


class _ForwardView:
    """The parts of a forward plan blame needs, read off the inverse (HF -> NeoX) plan: rule ids
    and origins are the forward rule set's (inverting keeps them)."""

    def __init__(self, inverse: Any, forward: RuleSet):
        self.inverse, self.ruleset = inverse, forward
        self.targets = inverse.sources

    def rules_for(self, keys: Sequence[str]) -> list[str]:
        reached, ids = set(keys), {}
        for node in self.inverse.nodes:
            if any(value.key in reached for value in node.inputs):
                ids.setdefault(node.rule_id)
                reached.update(value.key for value in node.outputs)
        return list(ids)

    @property
    def dropped(self) -> list[Any]:
        return [_Dropped(node.rule_id, node.outputs) for node in self.inverse.created]


class _Dropped:
    def __init__(self, rule_id: str, inputs: list[Any]):
        self.rule_id, self.inputs = rule_id, inputs


def _tokenize(text: str, tokenizer: str | Path | None) -> torch.Tensor:
    if tokenizer is None:
        raise MapperError("--text needs --tokenizer DIR (a local tokenizer folder)",
                          hint="or leave out --text to verify on generated token ids")
    from transformers import AutoTokenizer

    from mapper.hf_models import require_local_folder

    require_local_folder(tokenizer, "--tokenizer folder")
    try:
        encoded = AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True)(text, return_tensors="pt")
    except (OSError, ValueError) as error:
        raise CheckpointError(f"cannot load the tokenizer: {error}", where=tokenizer) from None
    return encoded["input_ids"]
