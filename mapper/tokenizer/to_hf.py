"""NeoX -> HF: the tokenizer files, ``generation_config.json`` and the special-token ids.

:func:`plan_tokenizer` reads the tokenizer the NeoX config names (or ``--tokenizer PATH``),
rebuilds it as an HF tokenizer in memory (:mod:`mapper.tokenizer.neox_types`), checks that its
ids fit the embedding, and returns a :class:`TokenizerPlan`: what will be written, the ids for
``config.json``, warnings and notes. :meth:`TokenizerPlan.write` writes the files. A tokenizer
that cannot be found or built is a :class:`TokenizerWarning` saying what to pass, never a
silent gap; a tokenizer with more ids than the embedding has rows is refused.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mapper.configs.model import NeoXModelConfig
from mapper.errors import MapperError
from mapper.tokenizer import neox_types
from mapper.tokenizer.locate import locate, looked_in, search_dirs
from mapper.tokenizer.neox_types import Built, TokenizerFileError, Unavailable, require

NEOX_TYPES = ("HFTokenizer", "GPT2BPETokenizer", "HFGPT2Tokenizer", "SPMTokenizer", "TiktokenTokenizer",
              "CharLevelTokenizer")
DEFAULT_TYPE = "GPT2BPETokenizer"  # NeoX's default tokenizer_type
HF_FOLDER = "HF tokenizer folder"  # kind of a --tokenizer DIR that transformers loads as is
PORTABLE_CLASS = "PreTrainedTokenizerFast"  # a tokenizer_class transformers 4 and 5 both load


@dataclass(frozen=True)
class TokenizerWarning:
    """Something the output lacks or may get wrong, and what to pass or do about it."""

    message: str
    hint: str

    def __str__(self) -> str:
        return f"{self.message}\n  hint: {self.hint}"


@dataclass
class TokenizerPlan:
    """The HF tokenizer of a conversion, built in memory; nothing written yet.

    ``vocab_size`` is the number of embedding rows the tokenizer's ids need (highest id + 1).
    The ids are NeoX's end of document as ``eos`` and ``bos`` (gpt-neox's own converter does the
    same) and its padding token; None where the tokenizer has none.
    """

    kind: str | None
    tokenizer: Any | None = None  # a transformers tokenizer
    files: tuple[Path, ...] = ()
    vocab_size: int | None = None
    neox_vocab_size: int | None = None  # what NeoX's tokenizer counts (and pads); None for an HF folder
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    warnings: list[TokenizerWarning] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def config_fields(self) -> dict[str, int | None]:
        """The special-token ids for ``config.json``. All three once a tokenizer is known (None
        stated, so transformers' class defaults such as eos 2 do not stand in); nothing otherwise."""
        if self.tokenizer is None:
            return {}
        return {"bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id,
                "pad_token_id": self.pad_token_id}

    def generation_config(self) -> dict[str, int]:
        """The contents of ``generation_config.json`` (the ids that are set)."""
        return {key: value for key, value in self.config_fields().items() if value is not None}

    def write(self, folder: str | Path) -> list[Path]:
        """Write the tokenizer files and ``generation_config.json`` into ``folder`` (as
        transformers' ``save_pretrained`` writes them); nothing when there is no tokenizer."""
        if self.tokenizer is None:
            return []
        from transformers import GenerationConfig

        folder = Path(folder)
        written = [Path(p) for p in self.tokenizer.save_pretrained(str(folder))]
        if self.kind != HF_FOLDER:
            _name_portable_class(folder / "tokenizer_config.json")
        GenerationConfig(**self.generation_config()).save_pretrained(str(folder))
        return [*written, folder / "generation_config.json"]

    def summary(self) -> list[str]:
        """One line per fact, for the command line."""
        if self.tokenizer is None:
            return [f"tokenizer: none written ({len(self.warnings)} warning(s))"]
        source = ", ".join(p.name for p in self.files) or "built in"
        return [f"tokenizer: {self.kind} from {source}; {self.vocab_size} ids, bos {self.bos_token_id}, "
                f"eos {self.eos_token_id}, pad {self.pad_token_id}", *self.notes]


def plan_tokenizer(
    neox_yaml: Mapping[str, Any],
    checkpoint_dir: str | Path,
    *,
    override: str | Path | None = None,
    embedding_rows: int | None = None,
    config_files: Iterable[str | Path] = (),
) -> TokenizerPlan:
    """The HF tokenizer for a NeoX checkpoint.

    ``neox_yaml`` is the merged config with underscore keys (``tokenizer_type``, ``vocab_file``,
    ``merge_file``); its paths are looked for as written, then beside the checkpoint and under
    ``configs/`` (:mod:`mapper.tokenizer.locate`). ``override`` (``--tokenizer PATH``) is a
    tokenizer.json, vocab.json (merges.txt beside it), .model, .tiktoken file or an HF
    tokenizer folder, and replaces the config's file. ``embedding_rows`` is the vocabulary size
    of the HF model written (after any ``--trim-vocab``): a tokenizer with more ids is refused
    (:class:`~mapper.errors.MapperError`); fewer are padding, explained in a note.
    """
    folders = search_dirs(Path(checkpoint_dir), [Path(f) for f in config_files])
    kind = _canonical_type(neox_yaml.get("tokenizer_type"))
    notes: list[str] = []
    if neox_yaml.get("tokenizer_type") is None and override is None:
        notes.append(f"the NeoX config names no tokenizer-type: NeoX's default, {DEFAULT_TYPE}")
    try:
        if override is not None:
            built = _from_override(Path(override), kind, neox_yaml, folders, notes)
        elif kind is None:
            raise Unavailable(
                f"the NeoX config's tokenizer-type {neox_yaml.get('tokenizer_type')!r} is not one NeoX builds "
                f"({', '.join(NEOX_TYPES)}): the HF folder has no tokenizer",
                "pass --tokenizer PATH (a tokenizer.json, vocab.json, .model, .tiktoken file or a tokenizer folder)",
            )
        else:
            built = _from_config(kind, neox_yaml, folders)
        plan = _planned(built, neox_yaml)
    except Unavailable as missing:
        plan = TokenizerPlan(kind, warnings=[TokenizerWarning(missing.message, missing.hint)])
    plan.notes[:0] = notes
    if embedding_rows is not None and plan.vocab_size is not None:
        _check_rows(plan, embedding_rows, neox_yaml)
    return plan


# --- which tokenizer -----------------------------------------------------------------------
def _canonical_type(value: Any) -> str | None:
    """NeoX matches tokenizer_type case-insensitively; None for a type it does not build."""
    name = DEFAULT_TYPE if value is None else str(value)
    return next((t for t in NEOX_TYPES if t.lower() == name.lower()), None)


def _from_config(kind: str, yaml: Mapping[str, Any], folders: Sequence[Path]) -> Built | Any:
    if kind == "CharLevelTokenizer":
        return neox_types.char_level()
    vocab = yaml.get("vocab_file")
    if kind == "HFGPT2Tokenizer":
        folder = _existing_folder(vocab, folders) if vocab else None
        if folder is None:
            raise Unavailable(
                "HFGPT2Tokenizer: " + (f"vocab-file {vocab} is not a local folder" if vocab else "the config names "
                "no vocab-file, so NeoX downloaded GPT-2's tokenizer") + ": the HF folder has no tokenizer",
                "pass --tokenizer DIR with GPT-2's tokenizer files (vocab.json + merges.txt, or tokenizer.json)",
            )
        return neox_types.hf_gpt2(folder)
    if not vocab:
        raise Unavailable(f"{kind}: the NeoX config names no vocab-file: the HF folder has no tokenizer",
                          f"pass --tokenizer PATH to the file {kind} was built from")
    if kind == "TiktokenTokenizer":
        name = str(vocab)
        found = locate(f"{name}.tiktoken", folders)
        if found is None:
            raise Unavailable(
                f"TiktokenTokenizer: encoding {name}'s BPE file ({name}.tiktoken) is not beside the checkpoint or "
                "under configs/ (NeoX downloads it; mapper does not): the HF folder has no tokenizer",
                f"pass --tokenizer PATH/{name}.tiktoken (tiktoken keeps downloaded files in $TIKTOKEN_CACHE_DIR, "
                "by default <tmp>/data-gym-cache, under a hashed name)",
            )
        return neox_types.tiktoken_encoding(name, found)
    vocab_path = _required(vocab, folders, kind, "vocab-file")
    if kind == "HFTokenizer":
        return neox_types.hf_tokenizer(vocab_path)
    if kind == "SPMTokenizer":
        return neox_types.sentencepiece(vocab_path)
    merges = yaml.get("merge_file")
    if not merges:
        raise Unavailable("GPT2BPETokenizer: the NeoX config names no merge-file: the HF folder has no tokenizer",
                          "pass --tokenizer PATH/vocab.json with its merges.txt beside it")
    return neox_types.gpt2_bpe(vocab_path, _required(merges, folders, kind, "merge-file"))


def _required(named: Any, folders: Sequence[Path], kind: str, key: str) -> Path:
    found = locate(str(named), folders)
    if found is None:
        raise Unavailable(
            f"{kind}: the NeoX config's {key} was not found: {looked_in(named, folders)}; the HF folder has no tokenizer",
            f"pass --tokenizer PATH/{Path(str(named)).name} (or copy it beside the checkpoint)",
        )
    return found


def _existing_folder(named: Any, folders: Sequence[Path]) -> Path | None:
    path = Path(str(named)).expanduser()
    candidates = [path] + [f / path for f in folders if not path.is_absolute()] + [f / path.name for f in folders]
    return next((c for c in candidates if c.is_dir()), None)


def _from_override(
    path: Path, kind: str | None, yaml: Mapping[str, Any], folders: Sequence[Path], notes: list[str]
) -> Built | Any:
    """``--tokenizer PATH``: what the file is decides how it is read."""
    if not path.exists():
        raise MapperError("--tokenizer: no such file or folder", where=path,
                          hint="pass a tokenizer.json, vocab.json, .model, .tiktoken file or a tokenizer folder")
    if path.is_dir():
        if kind == "HFGPT2Tokenizer":
            return neox_types.hf_gpt2(path)
        if (path / "tokenizer_config.json").is_file():  # written by save_pretrained: kept as transformers loads it
            return _hf_folder(path)
        if (path / "tokenizer.json").is_file():
            built = neox_types.hf_tokenizer(path / "tokenizer.json")
        elif (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            built = neox_types.gpt2_bpe(path / "vocab.json", path / "merges.txt")
        else:
            raise MapperError("--tokenizer: this folder holds no tokenizer (tokenizer_config.json, tokenizer.json, "
                              "or vocab.json + merges.txt)", where=path, hint="pass the tokenizer file itself")
    elif path.suffix == ".model":
        built = neox_types.sentencepiece(path)
    elif path.suffix == ".tiktoken":
        name = str(yaml.get("vocab_file") or "") if kind == "TiktokenTokenizer" else path.stem
        built = neox_types.tiktoken_encoding(name or path.stem, path)
    elif _is_tokenizer_json(path):
        built = neox_types.hf_tokenizer(path)
    else:
        merges = path.parent / "merges.txt"
        if yaml.get("merge_file") and kind == "GPT2BPETokenizer":
            merges = locate(str(yaml["merge_file"]), [path.parent, *folders]) or merges
        if not merges.is_file():
            raise MapperError("--tokenizer: a GPT-2 vocab.json needs its merges.txt beside it", where=path,
                              hint="put merges.txt beside vocab.json, or pass a tokenizer.json")
        built = neox_types.gpt2_bpe(path, merges)
    if kind is not None and built.kind != kind:
        notes.append(f"--tokenizer is a {built.kind} file; the NeoX config says {kind}: using the file passed")
    return built


def _is_tokenizer_json(path: Path) -> bool:
    """A tokenizers JSON file has a ``model`` object; a GPT-2 vocab.json maps tokens to ids."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise TokenizerFileError(f"--tokenizer: not a JSON file: {error}", where=path,
                                 hint="pass a tokenizer.json, vocab.json, .model or .tiktoken file") from None
    return isinstance(data, dict) and isinstance(data.get("model"), dict)


def _hf_folder(path: Path) -> Any:
    transformers = require("transformers", "transformers", "reading a tokenizer folder")
    try:
        return transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as error:  # noqa: BLE001 - reworded with the folder
        raise TokenizerFileError(f"--tokenizer: transformers cannot load this tokenizer folder: {error}", where=path,
                                 hint="pass a folder written by a tokenizer's save_pretrained") from None


# --- the plan ------------------------------------------------------------------------------
def _planned(built: Built | Any, yaml: Mapping[str, Any]) -> TokenizerPlan:
    if not isinstance(built, Built):  # an HF tokenizer folder, kept as transformers loaded it
        vocab = built.get_vocab()
        eos = built.eos_token_id if built.eos_token_id is not None else vocab.get(neox_types.END_OF_TEXT)
        bos = built.bos_token_id if built.bos_token_id is not None else eos
        return TokenizerPlan(HF_FOLDER, built, (Path(built.name_or_path),), _rows(vocab), None, bos, eos,
                             built.pad_token_id)
    transformers = require("transformers", "transformers", "writing the HF tokenizer files")
    roles = {"bos_token": built.eod, "eos_token": built.eod, "pad_token": built.pad, "unk_token": built.unk}
    length = yaml.get("max_position_embeddings") or yaml.get("seq_length")
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=built.backend, split_special_tokens=built.split_special_tokens,
        **({"model_max_length": int(length)} if length else {}),
        **{role: token for role, token in roles.items() if token is not None},
    )
    eod = tokenizer.convert_tokens_to_ids(built.eod) if built.eod else None
    pad = tokenizer.convert_tokens_to_ids(built.pad) if built.pad else None
    return TokenizerPlan(built.kind, tokenizer, built.files, _rows(tokenizer.get_vocab()), built.neox_vocab_size,
                         eod, eod, pad, notes=list(built.notes))


def _rows(vocab: Mapping[str, int]) -> int:
    return max(vocab.values(), default=-1) + 1


def _check_rows(plan: TokenizerPlan, rows: int, yaml: Mapping[str, Any]) -> None:
    """Refuse ids past the embedding; explain rows past the tokenizer (NeoX's padding)."""
    needed = plan.vocab_size or 0
    if needed > rows:
        raise MapperError(
            f"the tokenizer ({plan.kind}, {', '.join(str(p) for p in plan.files) or 'built in'}) has ids up to "
            f"{needed - 1}, but the model's embedding has {rows} rows: those ids would index past it",
            hint=f"pass the tokenizer the model was trained with (--tokenizer PATH); with --trim-vocab, keep at "
            f"least {needed} rows",
        )
    if needed < rows:
        multiple = (int(yaml.get("make_vocab_size_divisible_by") or NeoXModelConfig.default("make_vocab_size_divisible_by"))
                    * int(yaml.get("model_parallel_size") or 1))
        counted = min(max(plan.neox_vocab_size or needed, needed), rows)
        parts = []
        if counted > needed:
            parts.append(f"rows {needed}-{counted - 1} are ids NeoX's {plan.kind} counts but never produces")
        if rows > counted:
            parts.append(f"the last {rows - counted} are NeoX's vocabulary padding (up to a multiple of "
                         f"make-vocab-size-divisible-by x TP = {multiple})")
        plan.notes.append(
            f"the embedding has {rows} rows, the tokenizer's ids use {needed}: {'; '.join(parts)}. No token decodes "
            f"from them, yet generation can pick them: --trim-vocab {needed} drops them (the sidecar keeps them "
            "for the way back)"
        )


def _name_portable_class(config_file: Path) -> None:
    """transformers 5 names the generic class TokenizersBackend, which transformers 4 cannot
    load; PreTrainedTokenizerFast is the same class to both."""
    config = json.loads(config_file.read_text(encoding="utf-8"))
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = PORTABLE_CLASS
        config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
