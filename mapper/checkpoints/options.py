"""The options of a folder conversion, validated once, where they enter.

Each option says which directions it applies to; one given for a direction it does not apply to is
an error naming it (``--trim-vocab`` converting HF -> NeoX, ``--tp`` converting NeoX -> HF).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from mapper.errors import MapperError
from mapper.spec import RuleSet

Direction = Literal["neox-to-hf", "hf-to-neox", "neox-to-neox"]
Layout = Literal["pipeline", "sequential"]
Weights = Literal["module", "master"]


class ConversionOptions(BaseModel):
    """What a caller asks of a conversion (library keywords; the CLI options map one to one)."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    rules: str | Path | RuleSet | None = Field(None, description="Rule set name or path; detected when None.")
    config_files: tuple[Path, ...] = Field((), description="NeoX YAML files, merged as NeoX merges them.")
    to: Literal["hf", "neox"] | None = Field(None, description="Output format; default: the other one.")
    tp: int | None = Field(None, ge=1, le=4096, description="TP degree of a NeoX output.")
    layout: Layout | None = Field(None, description="Layout of a NeoX output (default: pipeline).")
    dtype: torch.dtype | None = Field(None, description="Cast floating tensors of the output.")
    trim_vocab: int | None = Field(None, ge=1, description="Keep the first N vocabulary rows (NeoX -> HF).")
    settings: Mapping[str, Any] = Field(default_factory=dict, description="NeoX config overrides (--set).")
    parameters: Mapping[str, int] = Field(default_factory=dict, description="Rule parameters (--param).")
    strict: bool = Field(False, description="Refuse settings HF can only approximate.")
    force_rules: bool = Field(False, description="A rules file whose variant contradicts the config wins.")
    weights: Weights = Field("module", description="NeoX source weights: module, or fp32 masters of ZeRO shards.")
    tokenizer: Path | None = Field(None, description="Tokenizer file or folder overriding the config's.")

    def check_direction(self, direction: Direction) -> None:
        """Refuse options that do not apply to ``direction``, naming them."""
        misplaced = []
        if direction == "neox-to-hf":
            misplaced += [name for name, value in (("--tp", self.tp), ("--layout", self.layout)) if value is not None]
        else:
            if self.trim_vocab is not None:
                misplaced.append("--trim-vocab")
            if self.strict:
                misplaced.append("--strict")
        if direction == "hf-to-neox" and self.weights != "module":
            misplaced.append("--weights")
        if misplaced:
            shown = ", ".join(misplaced)
            raise MapperError(
                f"{shown} {'does' if len(misplaced) == 1 else 'do'} not apply to a {direction.replace('-to-', ' -> ')} "
                "conversion",
                hint="--tp and --layout shape a NeoX output (HF -> NeoX, or NeoX -> NeoX with --to neox); "
                "--trim-vocab and --strict shape an HF output; --weights master reads a NeoX source",
            )


def options(**given: Any) -> ConversionOptions:
    """``ConversionOptions`` from keyword arguments, with their errors worded for people."""
    from pydantic import ValidationError

    values = {k: v for k, v in given.items() if v is not None}
    if "config_files" in values:
        values["config_files"] = tuple(Path(p) for p in values["config_files"])
    try:
        return ConversionOptions(**values)
    except ValidationError as error:
        details = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        raise MapperError(f"invalid option: {details}", hint="see `mapper convert --help`") from None
