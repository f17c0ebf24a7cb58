"""``mapper.json``: what a conversion did, so the way back (and ``verify``) can follow it.

An HF folder mapper wrote carries the record beside the model: the rule set and its version, the
parameters the plan was compiled with, the gpt-neox code-history settings that are no NeoX key
(``gqa_layout``, ``rmsnorm_formula``), the approximations HF made, and the dtype cast. The file is
read back as untrusted input: every field is type-checked and a malformed one is an error naming it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mapper.errors import CheckpointError

RECORD_FILE = "mapper.json"
MAX_RECORD_BYTES = 2**20


class ConversionRecord(BaseModel):
    """The content of ``mapper.json``."""

    model_config = ConfigDict(extra="allow", strict=True)

    mapper_version: str | None = None
    direction: str | None = None
    rules: str = Field(description="Name of the NeoX -> HF rule set used.")
    rules_version: str | None = None
    parameters: dict[str, int] = Field(default_factory=dict)
    source: str | None = None
    settings: dict[str, str] = Field(default_factory=dict, description="gpt-neox code-history settings.")
    approximations: list[dict[str, Any]] = Field(default_factory=list)
    dtype: str | None = Field(None, description="The dtype the weights were cast to (--dtype), if any.")


def read_record(folder: Path) -> ConversionRecord | None:
    """The record of the conversion that wrote ``folder``, or None when mapper did not write it."""
    path = folder / RECORD_FILE
    if not path.is_file():
        return None
    try:
        if path.stat().st_size > MAX_RECORD_BYTES:
            raise CheckpointError(f"{RECORD_FILE} has {path.stat().st_size} bytes; a record is a few KB", where=path,
                                  hint="delete it or convert again")
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise CheckpointError(f"cannot read {RECORD_FILE}: {error}", where=path, hint="delete it or fix it") from None
    if not isinstance(data, dict) or "rules" not in data:
        raise CheckpointError(f"{RECORD_FILE} does not name a rule set", where=path, hint="delete it or fix it")
    try:
        return ConversionRecord.model_validate(data)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors()[:5])
        raise CheckpointError(f"{RECORD_FILE} is malformed: {problems}", where=path,
                              hint="delete it (then name the rule set with --rules) or convert again") from None
