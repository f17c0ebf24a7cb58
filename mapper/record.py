"""What mapper writes beside an HF model, so the way back (and ``verify``) can follow the conversion.

Everything lives in a ``mapper/`` subfolder of the HF folder, where no model loader looks for
weights (a loader that takes every top-level ``*.safetensors`` file must not meet the sidecar):

- ``mapper/record.json``: the rule set and version, the parameters the plan was compiled with, the
  gpt-neox code-history settings that are no NeoX key (``gqa_layout``, ``rmsnorm_formula``), the
  approximations HF made, the dtype cast;
- ``mapper/rules.yaml``: the rule set exactly as used (fragments resolved), so HF -> NeoX inverts
  the very same rules;
- ``mapper/neox-config.yaml``: the NeoX model config, so HF -> NeoX restores it;
- ``mapper/sidecar.safetensors``: what lossy rules removed (FP8 metadata, cut vocabulary rows...).

Folders written by mapper 0.1 kept them at the top level (``mapper.json``, ``mapper-rules.yaml``,
``mapper-neox-config.yaml``, ``mapper-sidecar*.safetensors``); they are still read. The record is
read as untrusted input: every field is type-checked and a malformed one is an error naming it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mapper.errors import CheckpointError
from mapper.input_files import read_json

MAPPER_DIR = "mapper"
Kind = Literal["record", "rules", "neox_config", "sidecar"]
_NAMES: dict[str, str] = {"record": "record.json", "rules": "rules.yaml", "neox_config": "neox-config.yaml",
                          "sidecar": "sidecar.safetensors"}
_LEGACY: dict[str, str] = {"record": "mapper.json", "rules": "mapper-rules.yaml",
                           "neox_config": "mapper-neox-config.yaml", "sidecar": "mapper-sidecar.safetensors"}
RECORD_FILE = f"{MAPPER_DIR}/{_NAMES['record']}"
MAX_RECORD_BYTES = 2**20


def output_path(folder: Path, kind: Kind, suffix: str = "") -> Path:
    """Where a conversion writes ``kind`` in the HF folder (``suffix``: a part of a multi-part run)."""
    name = _NAMES[kind]
    if suffix:
        stem, dot, ext = name.partition(".")
        name = f"{stem}{suffix}{dot}{ext}"
    return folder / MAPPER_DIR / name


def existing(folder: Path, kind: Kind) -> Path | None:
    """The file of ``kind`` in an HF folder mapper wrote (current layout first, then 0.1's), if any."""
    for path in (folder / MAPPER_DIR / _NAMES[kind], folder / _LEGACY[kind]):
        if path.is_file():
            return path
    return None


def sidecar_files(folder: Path) -> list[Path]:
    """Every sidecar part of an HF folder (one file, or one per part of a multi-part run)."""
    current = sorted((folder / MAPPER_DIR).glob("sidecar*.safetensors"))
    return current or sorted(folder.glob("mapper-sidecar*.safetensors"))


class ConversionRecord(BaseModel):
    """The content of ``mapper/record.json``."""

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
    origins: dict[str, str] = Field(default_factory=dict, description="Rule id -> where it was written (file:line).")


def read_record(folder: Path) -> ConversionRecord | None:
    """The record of the conversion that wrote ``folder``, or None when mapper did not write it."""
    path = existing(folder, "record")
    if path is None:
        return None
    data = read_json(path, limit=MAX_RECORD_BYTES, what=f"mapper's record ({path.name})")  # regular file, bounded
    if not isinstance(data, dict) or "rules" not in data:
        raise CheckpointError(f"{path.name} (mapper's record) does not name a rule set", where=path,
                              hint="delete it or fix it")
    try:
        return ConversionRecord.model_validate(data)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors()[:5])
        raise CheckpointError(f"{path.name} (mapper's record) is malformed: {problems}", where=path,
                              hint="delete it (then name the rule set with --rules) or convert again") from None
