"""``mapper verify NEOX HF``: the reference forward from the NeoX files against the HF folder.

The conversion's plan is rebuilt (from the rule set named in the HF folder's record (``mapper/record.json``),
or detected, or given) so that a divergence can name the rules that produced its tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from mapper.checkpoints import prepare, recorded_rules
from mapper.record import read_record
from mapper.errors import CheckpointError, MapperError
from mapper.hf_models import load_model
from mapper.spec import RuleSet
from mapper.verify.compare import verify_conversion
from mapper.verify.report import VerifyReport


def verify_checkpoints(
    neox: str | Path,
    hf: str | Path,
    *,
    rules: str | Path | RuleSet | None = None,
    config_files: Sequence[str | Path] = (),
    dtype: torch.dtype = torch.float32,
    text: str | None = None,
    tokenizer: str | Path | None = None,
    seed: int = 0,
    batch: int = 2,
    seq_len: int = 16,
    continuation: int = 8,
    atol: float | None = None,
    rtol: float | None = None,
) -> VerifyReport:
    """Compare a NeoX checkpoint with the HF folder converted from it, layer by layer."""
    record = read_record(Path(hf))
    if rules is None and record is not None:
        rules = recorded_rules(Path(hf))
    # the conversion's own gpt-neox history settings (e.g. --set gqa_layout=pre-1315), not a fresh guess
    settings = dict(record.settings) if record is not None else {}
    prepared = prepare(neox, rules=rules, config_files=config_files, settings=settings)
    if prepared.direction != "neox-to-hf":
        raise MapperError(
            f"{neox} is not a NeoX checkpoint", hint="usage: mapper verify NEOX_CHECKPOINT HF_FOLDER"
        )
    source = prepared.source
    tensors = {key: source.get(key) for key in source.manifest()}
    model = load_model(Path(hf), dtype=dtype)
    input_ids = _tokenize(text, tokenizer) if text is not None else None
    return verify_conversion(
        tensors, prepared.model, model, plan=prepared.plan, input_ids=input_ids, seed=seed, batch=batch,
        seq_len=seq_len, continuation=continuation, dtype=dtype, atol=atol, rtol=rtol,
    )


def _tokenize(text: str, tokenizer: str | Path | None) -> torch.Tensor:
    if tokenizer is None:
        raise MapperError("--text needs --tokenizer DIR (a local tokenizer folder)",
                          hint="or leave out --text to verify on generated token ids")
    from transformers import AutoTokenizer

    try:
        encoded = AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True)(text, return_tensors="pt")
    except (OSError, ValueError) as error:
        raise CheckpointError(f"cannot load the tokenizer: {error}", where=tokenizer) from None
    return encoded["input_ids"]
