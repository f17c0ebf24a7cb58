"""Each of GPT-NeoX's tokenizer types, rebuilt as a ``tokenizers.Tokenizer`` that encodes alike.

GPT-NeoX builds its tokenizer from ``tokenizer_type`` (megatron/tokenizer/tokenizer.py); what
matters for an HF model is that the HF tokenizer turns text into the same ids, and which token
NeoX appended to every training document (its *end of document*, ``eod``): HF's ``eos`` and,
as in gpt-neox's own converter, ``bos``. Per type:

======================  ==========================================  ===============================
type                    NeoX builds                                 eod / pad
======================  ==========================================  ===============================
HFTokenizer             ``tokenizers.Tokenizer.from_file(vocab)``   ``<|endoftext|>`` / ``<|padding|>``
GPT2BPETokenizer        transformers ``GPT2Tokenizer(vocab, merges)``  ``<|endoftext|>`` / none
HFGPT2Tokenizer         ``GPT2TokenizerFast.from_pretrained`` + pad  its eos / added ``<|padding|>``
SPMTokenizer            ``SentencePieceProcessor(vocab)``           ``piece_to_id("<|endoftext|>")``
                                                                    (the unknown piece's id when absent)
TiktokenTokenizer       ``tiktoken.get_encoding(vocab)`` (a name)    ``<|endoftext|>`` / none
CharLevelTokenizer      UTF-8 bytes as ids, vocabulary 512          byte 0 / byte 1
======================  ==========================================  ===============================

Each builder reads only local files (nothing is downloaded) and returns a :class:`Built`; the
libraries a type needs are imported when that type is built, and one that is missing is a
:class:`Unavailable` (the caller turns it into a warning naming the package to install).
"""

from __future__ import annotations

import base64
import contextlib
import copy
import hashlib
import json
import sys
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mapper.errors import MapperError

END_OF_TEXT = "<|endoftext|>"
PADDING = "<|padding|>"
CHAR_LEVEL_VOCAB = 512  # what NeoX's CharLevelTokenizer reports (and pads); bytes use 0-255


class TokenizerFileError(MapperError):
    """A tokenizer file that exists but cannot be read as the type the config names."""


class Unavailable(Exception):
    """A tokenizer cannot be built here: a library is missing or no file was found."""

    def __init__(self, message: str, hint: str):
        super().__init__(message)
        self.message = message
        self.hint = hint


@dataclass(frozen=True)
class Built:
    """A NeoX tokenizer as a ``tokenizers.Tokenizer``, with the tokens NeoX gives roles to.

    ``neox_vocab_size`` is what NeoX's tokenizer reports as its vocabulary size (the number NeoX
    pads to get the embedding rows). ``split_special_tokens`` says the NeoX side never treats the
    text of a special token as that token (SentencePiece, bytes), so HF must not either.
    """

    kind: str
    backend: Any  # tokenizers.Tokenizer
    eod: str | None
    neox_vocab_size: int
    pad: str | None = None
    unk: str | None = None
    split_special_tokens: bool = False
    files: tuple[Path, ...] = ()
    notes: tuple[str, ...] = field(default=())


def require(module: str, package: str, why: str) -> Any:
    """Import ``module`` or raise :class:`Unavailable` naming the pip package."""
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise Unavailable(f"{why} needs the Python package {package}, which is not installed",
                          f"pip install {package}") from None


def _token_or_none(backend: Any, token: str) -> str | None:
    return token if backend.token_to_id(token) is not None else None


# --- HFTokenizer ----------------------------------------------------------------------------
def hf_tokenizer(path: Path) -> Built:
    """A ``tokenizer.json`` as NeoX's HFTokenizer reads it."""
    tokenizers = require("tokenizers", "tokenizers", "reading tokenizer.json")
    try:
        backend = tokenizers.Tokenizer.from_file(str(path))
    except Exception as error:  # noqa: BLE001 - the library's parse error, reworded
        raise TokenizerFileError(f"not a tokenizers JSON file (HFTokenizer): {error}", where=path,
                                 hint="vocab-file of an HFTokenizer is a tokenizer.json; pass --tokenizer PATH") from None
    eod = _token_or_none(backend, END_OF_TEXT)
    notes = () if eod else (f"{path.name} has no {END_OF_TEXT} token: NeoX's HFTokenizer had no end-of-document "
                            "token (eod None), so no eos_token_id is set",)
    return Built("HFTokenizer", backend, eod, backend.get_vocab_size(with_added_tokens=True),
                 pad=_token_or_none(backend, PADDING), files=(path,), notes=notes)


# --- GPT2BPETokenizer / HFGPT2Tokenizer --------------------------------------------------------
def gpt2_bpe(vocab: Path, merges: Path) -> Built:
    """GPT-2's ``vocab.json`` + ``merges.txt``, through transformers' GPT2Tokenizer as NeoX does."""
    transformers = require("transformers", "transformers", "a GPT2BPETokenizer")
    try:
        encoder = json.loads(vocab.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise TokenizerFileError(f"not a GPT-2 vocab.json: {error}", where=vocab,
                                 hint="vocab-file of a GPT2BPETokenizer is the vocab.json beside merges.txt") from None
    if not isinstance(encoder, dict):
        raise TokenizerFileError("not a GPT-2 vocab.json (expected a token -> id object)", where=vocab,
                                 hint="vocab-file of a GPT2BPETokenizer is the vocab.json beside merges.txt")
    try:
        # positional: transformers 5 names them vocab/merges (and ignores vocab_file=), 4 vocab_file/merges_file
        slow = transformers.GPT2Tokenizer(str(vocab), str(merges), errors="replace")
    except Exception as error:  # noqa: BLE001 - reworded with the files
        raise TokenizerFileError(f"cannot build a GPT-2 tokenizer from {vocab.name} + {merges.name}: {error}",
                                 where=merges, hint="merge-file is the merges.txt that goes with vocab-file") from None
    eod = END_OF_TEXT if END_OF_TEXT in encoder else None
    notes = () if eod else (f"{vocab.name} has no {END_OF_TEXT}: NeoX's GPT2BPETokenizer could not have been built "
                            "from it; no eos_token_id is set",)
    backend = copy.deepcopy(slow.backend_tokenizer)
    if backend.get_vocab_size(with_added_tokens=False) < len(encoder) - 1:
        raise TokenizerFileError(f"transformers read {backend.get_vocab_size()} of the {len(encoder)} tokens of "
                                 f"{vocab.name}", where=vocab, hint="pass --tokenizer PATH to a tokenizer.json instead")
    return Built("GPT2BPETokenizer", backend, eod, len(encoder), files=(vocab, merges), notes=notes)


def hf_gpt2(folder: Path) -> Built:
    """A local GPT-2 tokenizer folder with the ``<|padding|>`` token NeoX adds."""
    transformers = require("transformers", "transformers", "an HFGPT2Tokenizer")
    try:
        tokenizer = transformers.GPT2TokenizerFast.from_pretrained(str(folder), local_files_only=True)
    except Exception as error:  # noqa: BLE001 - reworded with the folder
        raise TokenizerFileError(f"cannot load a GPT-2 tokenizer from this folder: {error}", where=folder,
                                 hint="pass --tokenizer DIR holding vocab.json + merges.txt or tokenizer.json") from None
    tokenizer.add_special_tokens({"pad_token": PADDING})
    backend = copy.deepcopy(tokenizer.backend_tokenizer)
    return Built("HFGPT2Tokenizer", backend, tokenizer.eos_token, len(tokenizer), pad=PADDING, files=(folder,))


# --- SPMTokenizer ---------------------------------------------------------------------------
def sentencepiece(path: Path) -> Built:
    """A SentencePiece ``.model``, following its own normalizer and pieces (transformers' reading).

    SentencePiece never reads a control piece or a special token's text as that token, so the
    HF tokenizer splits special tokens' text too (``split_special_tokens``).
    """
    require("google.protobuf", "protobuf", "reading a SentencePiece model")
    require("transformers", "transformers", "an SPMTokenizer")
    from transformers.convert_slow_tokenizer import SentencePieceExtractor, SpmConverter

    try:
        proto = SentencePieceExtractor(str(path)).proto
    except Exception as error:  # noqa: BLE001 - protobuf's decode error, reworded
        raise TokenizerFileError(f"not a SentencePiece model: {error}", where=path,
                                 hint="vocab-file of an SPMTokenizer is the .model file sentencepiece trained") from None
    pieces = [piece.piece for piece in proto.pieces]
    if proto.trainer_spec.model_type == 1:  # unigram: pieces with their scores
        vocab: Any = [(piece.piece, piece.score) for piece in proto.pieces]
    elif proto.trainer_spec.model_type == 2:  # BPE: merges come from the scores
        vocab = {piece: index for index, piece in enumerate(pieces)}
    else:
        raise TokenizerFileError("a SentencePiece model of type word/char is not supported (only unigram and BPE)",
                                 where=path, hint="convert the tokenizer yourself and pass --tokenizer DIR")
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, legacy=True)
    unk_id = proto.trainer_spec.unk_id
    unk = pieces[unk_id] if 0 <= unk_id < len(pieces) else None
    notes: tuple[str, ...] = ()
    if END_OF_TEXT in pieces:
        eod = END_OF_TEXT
    else:
        eod = unk
        notes = (f"{path.name} has no {END_OF_TEXT} piece: NeoX's SPMTokenizer took piece_to_id's answer for it, "
                 f"the unknown piece {unk!r} (id {unk_id}), as end of document; eos_token_id is that id",)
    return Built("SPMTokenizer", backend, eod, len(pieces), unk=unk, split_special_tokens=True,
                 files=(path,), notes=notes)


# --- TiktokenTokenizer ----------------------------------------------------------------------
def read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """A ``.tiktoken`` file: one ``base64(token) rank`` per line (read here: tiktoken's own
    loader keeps a cached copy keyed by the path, which goes stale when the file changes)."""
    ranks: dict[bytes, int] = {}
    try:
        lines = path.read_bytes().splitlines()
    except OSError as error:
        raise TokenizerFileError(f"cannot read: {error}", where=path, hint="check the file's permissions") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            raise TokenizerFileError("expected 'base64-token rank' (a tiktoken BPE file)", where=f"{path}:{number}",
                                     hint="pass --tokenizer PATH to the encoding's .tiktoken file") from None
    return ranks


_SWAP_LOCK = threading.RLock()


@contextlib.contextmanager
def _swapped(module: Any, replacements: Mapping[str, Any]) -> Iterator[None]:
    """Replace ``module``'s attributes for the duration (only those it has)."""
    with _SWAP_LOCK:
        saved = {name: getattr(module, name) for name in replacements if hasattr(module, name)}
        try:
            for name in saved:
                setattr(module, name, replacements[name])
            yield
        finally:
            for name, value in saved.items():
                setattr(module, name, value)


def tiktoken_definition(name: str, ranks: dict[bytes, int], ranks_file: Path) -> tuple[dict[str, Any], bool | None]:
    """tiktoken's definition of encoding ``name`` (regex, special tokens) over local ``ranks``.

    tiktoken's encoding constructors fetch the ranks from the network; they are run here with
    their rank loaders answering from the local file instead, which also hands over the hash
    tiktoken expects, and with tiktoken's file reader refusing, so nothing is ever downloaded.
    Returns the definition and whether the file has that hash (None: no hash).
    """
    require("tiktoken", "tiktoken", "a TiktokenTokenizer")
    import tiktoken.load
    import tiktoken.registry

    if name not in tiktoken.registry.list_encoding_names():
        raise TokenizerFileError(
            f"tiktoken knows no encoding {name!r}", where="vocab-file",
            hint=f"NeoX's TiktokenTokenizer takes an encoding name: {', '.join(tiktoken.registry.list_encoding_names())}",
        )
    constructor = tiktoken.registry.ENCODING_CONSTRUCTORS[name]  # filled by list_encoding_names()
    expected: list[str | None] = []

    def local_ranks(*_args: Any, expected_hash: str | None = None, **_kwargs: Any) -> dict[bytes, int]:
        expected.append(expected_hash)
        return dict(ranks)

    def no_download(blobpath: str) -> bytes:
        raise Unavailable(f"tiktoken's {name} constructor reads {blobpath}, which mapper does not download",
                          f"pass --tokenizer PATH to a tokenizer.json for {name} instead")

    loaders = {"load_tiktoken_bpe": local_ranks, "data_gym_to_mergeable_bpe_ranks": local_ranks}
    with _swapped(sys.modules[constructor.__module__], loaders), _swapped(tiktoken.load, {"read_file": no_download}):
        definition = constructor()
    hashes = [h for h in expected if h]
    matches = hashlib.sha256(ranks_file.read_bytes()).hexdigest() in hashes if hashes else None
    return definition, matches


def tiktoken_encoding(name: str, ranks_file: Path) -> Built:
    """tiktoken encoding ``name`` with its ranks from ``ranks_file`` (e.g. cl100k_base.tiktoken).

    Special tokens keep tiktoken's ids, gaps included (cl100k_base: 100257-100260 and 100276).
    """
    require("transformers", "transformers", "a TiktokenTokenizer")
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = read_tiktoken_ranks(ranks_file)
    definition, matches = tiktoken_definition(name, ranks, ranks_file)
    specials: dict[str, int] = dict(definition["special_tokens"])

    class _LocalRanks(TikTokenConverter):
        """transformers' tiktoken converter, over ranks already read, with specials at their ids."""

        def load_tiktoken_bpe(self, _source: str) -> dict[bytes, int]:  # type: ignore[override]
            return ranks

        def extract_vocab_merges_from_model(self, source: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
            vocab, merges = super().extract_vocab_merges_from_model(source)
            return {**vocab, **specials}, merges

    backend = _LocalRanks(vocab_file=str(ranks_file), pattern=definition["pat_str"],
                          extra_special_tokens=list(specials)).converted()
    notes: list[str] = []
    if matches is False:
        notes.append(f"{ranks_file.name} is not tiktoken's {name} file (its hash differs): the HF tokenizer "
                     f"follows your file, with {name}'s regex and special tokens")
    eod = END_OF_TEXT if END_OF_TEXT in specials else None
    if eod is None:
        notes.append(f"tiktoken's {name} has no {END_OF_TEXT}: no eos_token_id is set")
    n_vocab = max([*ranks.values(), *specials.values()]) + 1
    return Built("TiktokenTokenizer", backend, eod, n_vocab, files=(ranks_file,), notes=tuple(notes))


# --- CharLevelTokenizer ---------------------------------------------------------------------
def char_level() -> Built:
    """NeoX's CharLevelTokenizer: the UTF-8 bytes of the text are the ids (0-255).

    As a byte-fallback BPE with one token per byte (``<0x41>``) and no merges, every character
    falls back to its bytes. NeoX reports 512 tokens; ids 256-511 never occur. NeoX decodes each
    id as ``chr(max(32, id))``; the HF tokenizer decodes the bytes as UTF-8 instead.
    """
    tokenizers = require("tokenizers", "tokenizers", "a CharLevelTokenizer")
    vocab = {f"<0x{byte:02X}>": byte for byte in range(256)}
    backend = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[], byte_fallback=True))
    backend.decoder = tokenizers.decoders.Sequence([tokenizers.decoders.ByteFallback(), tokenizers.decoders.Fuse()])
    return Built("CharLevelTokenizer", backend, "<0x00>", CHAR_LEVEL_VOCAB, pad="<0x01>", split_special_tokens=True,
                 notes=(f"CharLevelTokenizer: ids are UTF-8 bytes (0-255); NeoX counts {CHAR_LEVEL_VOCAB} tokens, "
                        "the HF tokenizer has the 256 that occur",))
