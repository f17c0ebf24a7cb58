"""HF -> NeoX: the tokenizer file for the NeoX output folder and the YAML keys naming it.

Whatever an HF folder's tokenizer files are (tokenizer.json, vocab.json + merges.txt, a
SentencePiece tokenizer.model), transformers loads them into one ``tokenizers.Tokenizer``; its
JSON is what HF encodes with, and NeoX's ``HFTokenizer`` reads exactly that file. So the NeoX
side gets ``tokenizer.json`` and ``tokenizer-type: HFTokenizer``. A character-level model (its
NeoX config says ``CharLevelTokenizer``) needs no file and keeps its type.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mapper.errors import MapperError
from mapper.tokenizer.neox_types import END_OF_TEXT, TokenizerFileError, Unavailable, require
from mapper.tokenizer.to_hf import TokenizerWarning

TOKENIZER_FILE = "tokenizer.json"
_HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


@dataclass
class NeoXTokenizerPlan:
    """The NeoX side's tokenizer: the file to write and the YAML keys (nothing written yet)."""

    kind: str | None  # "HFTokenizer", "CharLevelTokenizer", or None (no tokenizer)
    tokenizer_json: str | None = None
    warnings: list[TokenizerWarning] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def yaml_keys(self, out_folder: str | Path) -> dict[str, Any]:
        """The NeoX YAML keys (hyphenated) naming the tokenizer as written to ``out_folder`` (the
        final folder, not a staging one): an absolute path, as NeoX opens it from its own cwd."""
        if self.kind is None:
            return {}
        vocab = str(Path(out_folder).resolve() / TOKENIZER_FILE) if self.tokenizer_json is not None else None
        return {"tokenizer-type": self.kind, "vocab-file": vocab, "merge-file": None}

    def write(self, folder: str | Path) -> list[Path]:
        """Write the tokenizer file into ``folder`` (the output folder or its staging copy)."""
        if self.tokenizer_json is None:
            return []
        Path(folder).mkdir(parents=True, exist_ok=True)
        path = Path(folder) / TOKENIZER_FILE
        path.write_text(self.tokenizer_json, encoding="utf-8")
        return [path]


def plan_neox_tokenizer(
    hf_folder: str | Path,
    *,
    override: str | Path | None = None,
    neox_yaml: Mapping[str, Any] | None = None,
) -> NeoXTokenizerPlan:
    """The NeoX tokenizer for an HF folder: from ``override`` (``--tokenizer``: a tokenizer
    folder or tokenizer.json) or the HF folder's own tokenizer files. ``neox_yaml`` is the NeoX
    config the HF folder was made from, if known (underscore keys)."""
    if neox_yaml is not None and str(neox_yaml.get("tokenizer_type", "")).lower() == "charleveltokenizer":
        return NeoXTokenizerPlan("CharLevelTokenizer", notes=["CharLevelTokenizer needs no tokenizer file"])
    source = Path(override) if override is not None else Path(hf_folder)
    try:
        backend, eos, splits_special = _load(source, is_override=override is not None)
    except Unavailable as missing:
        return NeoXTokenizerPlan(None, warnings=[TokenizerWarning(missing.message, missing.hint)])
    plan = NeoXTokenizerPlan("HFTokenizer", backend.to_str())
    if backend.token_to_id(END_OF_TEXT) is None:
        plan.warnings.append(TokenizerWarning(
            f"NeoX's HFTokenizer takes {END_OF_TEXT} as the end of document; this tokenizer has none (its eos is "
            f"{eos!r}): NeoX's eod would be None",
            f"add {END_OF_TEXT} to the tokenizer before preprocessing data for NeoX, or preprocess without an "
            "appended end-of-document token",
        ))
    elif eos is not None and eos != END_OF_TEXT:
        plan.notes.append(f"HF's eos is {eos!r}; NeoX's HFTokenizer uses {END_OF_TEXT} as the end of document")
    if splits_special:
        plan.notes.append("HF reads the text of a special token as plain text (split_special_tokens); NeoX's "
                          "HFTokenizer reads it as the token")
    return plan


def neox_tokenizer_from_hf(
    hf_folder: str | Path, out_folder: str | Path, *, override: str | Path | None = None,
    neox_yaml: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the NeoX tokenizer into ``out_folder`` and return the YAML keys naming it."""
    plan = plan_neox_tokenizer(hf_folder, override=override, neox_yaml=neox_yaml)
    plan.write(out_folder)
    return plan.yaml_keys(out_folder)


def _load(source: Path, *, is_override: bool) -> tuple[Any, str | None, bool]:
    """The ``tokenizers.Tokenizer`` HF encodes with, HF's eos token, and whether HF reads special
    tokens' text as plain text (a setting of transformers that tokenizer.json cannot hold)."""
    if source.is_file():
        tokenizers = require("tokenizers", "tokenizers", "reading tokenizer.json")
        try:
            return tokenizers.Tokenizer.from_file(str(source)), None, False
        except Exception as error:  # noqa: BLE001 - reworded with the file
            raise TokenizerFileError(f"not a tokenizers JSON file: {error}", where=source,
                                     hint="pass a tokenizer.json or a tokenizer folder") from None
    if not source.is_dir():
        raise MapperError("--tokenizer: no such file or folder", where=source,
                          hint="pass a tokenizer.json or a tokenizer folder")
    if not any((source / name).is_file() for name in _HF_TOKENIZER_FILES):
        where = "--tokenizer folder" if is_override else "HF folder"
        raise Unavailable(
            f"the {where} {source} has no tokenizer files ({', '.join(_HF_TOKENIZER_FILES)}): the NeoX config "
            "names no tokenizer",
            "pass --tokenizer PATH (a tokenizer folder or tokenizer.json), or set tokenizer-type and vocab-file in "
            "the NeoX YAML yourself",
        )
    transformers = require("transformers", "transformers", "reading the HF tokenizer")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(source), local_files_only=True)
    except Exception as error:  # noqa: BLE001 - reworded with the folder
        raise TokenizerFileError(f"transformers cannot load this folder's tokenizer: {error}", where=source,
                                 hint="pass --tokenizer PATH to a tokenizer.json that goes with the model") from None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TokenizerFileError("transformers loads this tokenizer without a tokenizers backend (a Python-only "
                                 "tokenizer): NeoX's HFTokenizer needs a tokenizer.json", where=source,
                                 hint="pass --tokenizer PATH to a tokenizer.json for this vocabulary")
    return backend, tokenizer.eos_token, bool(getattr(tokenizer, "split_special_tokens", False))
