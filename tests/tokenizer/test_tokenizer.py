"""The tokenizer side of a conversion (mapper.tokenizer), for every NeoX tokenizer type that can
be built from local files.

Each test builds its tokenizer files itself (a byte-level BPE trained with ``tokenizers``, GPT-2
vocab.json + merges.txt, SentencePiece models trained here, a tiktoken ranks file, none for the
character level). "NeoX's side" is the tokenizer built the way gpt-neox's
megatron/tokenizer/tokenizer.py builds it; the HF side is what ``AutoTokenizer`` loads from the
written folder. Everything runs offline.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from mapper.errors import MapperError
from mapper.tokenizer import neox_tokenizer_from_hf, plan_neox_tokenizer, plan_tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello   world, tokenizers are fun! 12345 67890",
    "Ünïcode façade naïve café 東京 and emoji 🙂",
    "def main():\n    return [x * 2 for x in range(10)]\n",
] * 20
SAMPLES = [
    "The quick fox jumps",
    "  leading spaces and\nnew lines\n\n",
    "Zebra xylophone 東京 © 🙂",
    "",
    "a<|endoftext|>b and <|endoftext|> alone",
    "tabs\tand  two  spaces ",
]


# --- building tokenizer files, as a training run would have them -----------------------------
def train_byte_level_bpe(special_tokens: list[str], vocab_size: int = 300) -> Tokenizer:
    """A GPT-NeoX-20B-like tokenizer: byte-level BPE, special tokens first."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(CORPUS, trainer)
    return tokenizer


def write_gpt2_files(folder: Path) -> tuple[Path, Path]:
    """GPT-2's vocab.json + merges.txt, with <|endoftext|> as the last id as in GPT-2."""
    folder.mkdir(parents=True, exist_ok=True)
    train_byte_level_bpe([]).model.save(str(folder))
    vocab = json.loads((folder / "vocab.json").read_text())
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    return folder / "vocab.json", folder / "merges.txt"


def train_sentencepiece(path: Path, model_type: str, *, byte_fallback: bool = False,
                        with_end_of_text: bool = True) -> Path:
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=model, model_type=model_type, minloglevel=2,
        vocab_size=400 if byte_fallback else 120, byte_fallback=byte_fallback, hard_vocab_limit=False,
        user_defined_symbols=["<|endoftext|>"] if with_end_of_text else [],
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.getvalue())
    return path


def byte_level_ranks() -> dict[bytes, int]:
    """tiktoken ranks of a small byte-level BPE: the 256 bytes, then the merged tokens in order."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    to_byte = {char: byte for byte, char in bytes_to_unicode().items()}
    vocab = train_byte_level_bpe([]).get_vocab()
    ordered = sorted(vocab.items(), key=lambda item: item[1])
    ranks = {bytes([b]): b for b in range(256)}
    for token, _ in ordered:
        ranks.setdefault(bytes(to_byte[c] for c in token), len(ranks))
    return ranks


def write_tiktoken_file(path: Path, ranks: dict[bytes, int]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(base64.b64encode(token) + b" %d\n" % rank for token, rank in ranks.items()))
    return path


# --- one case per NeoX tokenizer type --------------------------------------------------------
@dataclass
class Case:
    """A checkpoint folder whose NeoX config names a tokenizer, and that tokenizer as NeoX has it."""

    checkpoint: Path
    yaml: dict[str, Any]
    neox_encode: Callable[[str], list[int]]
    eod: int
    pad: int | None
    rows: int  # embedding rows of the model (NeoX's padded vocabulary)


def hf_tokenizer_case(tmp: Path) -> Case:
    checkpoint = tmp / "checkpoint"
    (checkpoint / "configs").mkdir(parents=True)
    train_byte_level_bpe(["<|endoftext|>", "<|padding|>"]).save(str(checkpoint / "configs" / "20B_tokenizer.json"))
    neox = Tokenizer.from_file(str(checkpoint / "configs" / "20B_tokenizer.json"))  # NeoX's HFTokenizer
    yaml = {"tokenizer_type": "HFTokenizer", "vocab_file": "/cluster/data/20B_tokenizer.json"}
    return Case(checkpoint, yaml, lambda text: neox.encode(text).ids, 0, 1, 384)


def gpt2_case(tmp: Path) -> Case:
    from transformers import GPT2Tokenizer

    checkpoint = tmp / "checkpoint"
    vocab, merges = write_gpt2_files(checkpoint)
    neox = GPT2Tokenizer(str(vocab), str(merges), errors="replace", special_tokens=[], max_len=None)
    eod = json.loads(vocab.read_text())["<|endoftext|>"]  # NeoX: tokenizer.encoder["<|endoftext|>"]
    yaml = {"tokenizer_type": "GPT2BPETokenizer", "vocab_file": "data/vocab.json",
            "merge_file": "data/merges.txt"}
    return Case(checkpoint, yaml, neox.encode, eod, None, 384)


def hf_gpt2_case(tmp: Path) -> Case:
    from transformers import GPT2TokenizerFast

    checkpoint = tmp / "checkpoint"
    vocab, merges = write_gpt2_files(tmp / "files")
    GPT2TokenizerFast(str(vocab), str(merges)).save_pretrained(str(checkpoint / "gpt2"))
    neox = GPT2TokenizerFast.from_pretrained(str(checkpoint / "gpt2"))  # NeoX's HFGPT2Tokenizer
    neox.add_special_tokens({"pad_token": "<|padding|>"})
    yaml = {"tokenizer_type": "HFGPT2Tokenizer", "vocab_file": "/cluster/gpt2"}
    return Case(checkpoint, yaml, neox.encode, neox.eos_token_id, neox.pad_token_id, 384)


def sentencepiece_case(tmp: Path, model_type: str, byte_fallback: bool) -> Case:
    import sentencepiece as spm

    checkpoint = tmp / "checkpoint"
    model = train_sentencepiece(checkpoint / "tokenizer.model", model_type, byte_fallback=byte_fallback)
    neox = spm.SentencePieceProcessor(model_file=str(model))  # NeoX's SPMTokenizer
    yaml = {"tokenizer_type": "SPMTokenizer", "vocab_file": "tokenizer.model"}
    return Case(checkpoint, yaml, neox.encode, neox.piece_to_id("<|endoftext|>"), None, 512)


def tiktoken_case(tmp: Path) -> Case:
    import tiktoken
    from tiktoken_ext.openai_public import r50k_pat_str

    checkpoint = tmp / "checkpoint"
    ranks = byte_level_ranks()
    write_tiktoken_file(checkpoint / "r50k_base.tiktoken", ranks)
    # NeoX's TiktokenTokenizer is get_encoding("r50k_base"): r50k's regex and <|endoftext|> = 50256,
    # over (here) a small ranks file.
    neox = tiktoken.Encoding("r50k_base-small", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256})
    yaml = {"tokenizer_type": "TiktokenTokenizer", "vocab_file": "r50k_base"}
    return Case(checkpoint, yaml, lambda text: neox.encode(text, allowed_special="all"), 50256, None, 50304)


def char_level_case(tmp: Path) -> Case:
    checkpoint = tmp / "checkpoint"
    checkpoint.mkdir()
    yaml = {"tokenizer_type": "CharLevelTokenizer"}
    return Case(checkpoint, yaml, lambda text: list(text.encode("utf-8")), 0, 1, 512)


CASES: dict[str, Callable[[Path], Case]] = {
    "HFTokenizer": hf_tokenizer_case,
    "GPT2BPETokenizer": gpt2_case,
    "HFGPT2Tokenizer": hf_gpt2_case,
    "SPMTokenizer-unigram": lambda tmp: sentencepiece_case(tmp, "unigram", False),
    "SPMTokenizer-unigram-byte-fallback": lambda tmp: sentencepiece_case(tmp, "unigram", True),
    "SPMTokenizer-bpe": lambda tmp: sentencepiece_case(tmp, "bpe", False),
    "SPMTokenizer-bpe-byte-fallback": lambda tmp: sentencepiece_case(tmp, "bpe", True),
    "TiktokenTokenizer": tiktoken_case,
    "CharLevelTokenizer": char_level_case,
}


def load_hf_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


@pytest.mark.parametrize("name", list(CASES))
def test_the_hf_tokenizer_encodes_as_neox_does_with_neox_special_ids(name: str, tmp_path: Path) -> None:
    case = CASES[name](tmp_path)
    plan = plan_tokenizer(case.yaml, case.checkpoint, embedding_rows=case.rows)
    assert plan.warnings == []
    written = plan.write(tmp_path / "hf")

    assert {p.name for p in written} >= {"tokenizer.json", "tokenizer_config.json", "generation_config.json"}
    hf = load_hf_tokenizer(tmp_path / "hf")
    for text in SAMPLES:
        assert hf(text)["input_ids"] == case.neox_encode(text), text
    assert (hf.eos_token_id, hf.bos_token_id, hf.pad_token_id) == (case.eod, case.eod, case.pad)
    assert plan.config_fields() == {"bos_token_id": case.eod, "eos_token_id": case.eod, "pad_token_id": case.pad}
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (case.eod, case.eod)
    assert generation.get("pad_token_id") == case.pad
    assert json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())["tokenizer_class"] == \
        "PreTrainedTokenizerFast"  # loadable by transformers 4 and 5


@pytest.mark.parametrize("name", ["HFTokenizer", "GPT2BPETokenizer", "SPMTokenizer-unigram", "TiktokenTokenizer",
                                  "CharLevelTokenizer"])
def test_a_model_folder_with_the_tokenizer_files_generates_text_offline(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoModelForCausalLM, GPTNeoXConfig, GPTNeoXForCausalLM, pipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    case = CASES[name](tmp_path)
    folder = tmp_path / "hf"
    plan = plan_tokenizer({**case.yaml, "max_position_embeddings": 64}, case.checkpoint, embedding_rows=case.rows)
    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=case.rows, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=32, max_position_embeddings=64, **plan.config_fields())
    GPTNeoXForCausalLM(config).save_pretrained(str(folder))
    plan.write(folder)

    model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True)
    assert (model.config.bos_token_id, model.config.eos_token_id) == (case.eod, case.eod)
    generate = pipeline("text-generation", model=str(folder))
    prompt = "The quick brown fox"
    generated = generate(prompt, max_new_tokens=4, do_sample=False, return_tensors=True)[0]["generated_token_ids"]
    assert generated[: len(case.neox_encode(prompt))] == case.neox_encode(prompt)
    assert len(generated) > len(case.neox_encode(prompt))
    assert generate(prompt, max_new_tokens=4, do_sample=False)[0]["generated_text"].startswith(prompt)


# --- special tokens the NeoX way -----------------------------------------------------------
def test_a_sentencepiece_model_without_end_of_text_ends_documents_with_the_unknown_piece(tmp_path: Path) -> None:
    """NeoX's SPMTokenizer takes piece_to_id("<|endoftext|>"), which is the unknown piece's id
    when there is no such piece: that is the token its documents ended with."""
    import sentencepiece as spm

    model = train_sentencepiece(tmp_path / "spm.model", "unigram", with_end_of_text=False)
    neox_eod = spm.SentencePieceProcessor(model_file=str(model)).piece_to_id("<|endoftext|>")
    plan = plan_tokenizer({"tokenizer_type": "SPMTokenizer", "vocab_file": str(model)}, tmp_path)
    assert plan.eos_token_id == neox_eod == 0
    assert any("no <|endoftext|> piece" in note for note in plan.notes)


def test_tiktoken_special_tokens_keep_their_ids_across_gaps(tmp_path: Path) -> None:
    """cl100k_base's special tokens are 100257-100260 and 100276, past a gap after the ranks."""
    ranks_file = write_tiktoken_file(tmp_path / "cl100k_base.tiktoken", byte_level_ranks())
    plan = plan_tokenizer({"tokenizer_type": "TiktokenTokenizer", "vocab_file": "cl100k_base"}, tmp_path,
                          override=ranks_file)
    vocab = plan.tokenizer.get_vocab()
    assert (vocab["<|endoftext|>"], vocab["<|fim_prefix|>"], vocab["<|endofprompt|>"]) == (100257, 100258, 100276)
    assert plan.eos_token_id == 100257 and plan.vocab_size == plan.neox_vocab_size == 100277
    assert plan.tokenizer("x<|endoftext|>")["input_ids"][-1] == 100257
    assert any("not tiktoken's cl100k_base file" in note for note in plan.notes)  # a small file, not OpenAI's


def test_a_tiktoken_encoding_that_would_fetch_a_file_is_a_warning_and_fetches_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tiktoken.load
    import tiktoken.registry

    def fetching_encoding() -> dict[str, Any]:  # a tiktoken plugin reading its file its own way
        data = tiktoken.load.read_file_cached("https://example.invalid/fetching.tiktoken")
        raise AssertionError(f"read {len(data)} bytes")

    tiktoken.registry.list_encoding_names()  # loads the plugins' constructors
    monkeypatch.setitem(tiktoken.registry.ENCODING_CONSTRUCTORS, "fetching", fetching_encoding)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "cache"))
    ranks_file = write_tiktoken_file(tmp_path / "fetching.tiktoken", byte_level_ranks())
    plan = plan_tokenizer({"tokenizer_type": "TiktokenTokenizer", "vocab_file": "fetching"}, tmp_path)
    assert plan.tokenizer is None and plan.files == ()
    assert "which mapper does not download" in plan.warnings[0].message
    assert ranks_file.is_file() and not (tmp_path / "cache").exists()


def test_a_tokenizer_json_without_end_of_text_sets_no_eos(tmp_path: Path) -> None:
    train_byte_level_bpe(["<s>", "</s>"]).save(str(tmp_path / "tokenizer.json"))
    plan = plan_tokenizer({"tokenizer_type": "HFTokenizer", "vocab_file": "tokenizer.json"}, tmp_path)
    assert plan.config_fields() == {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    assert plan.generation_config() == {}
    assert any("no <|endoftext|> token" in note for note in plan.notes)


# --- finding the files ---------------------------------------------------------------------
def test_config_paths_are_found_as_written_relative_to_the_cwd_or_by_name_beside_the_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokenizer = train_byte_level_bpe(["<|endoftext|>"])
    checkpoint = tmp_path / "save"
    (checkpoint / "global_step10" / "configs").mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for place in (elsewhere / "absolute.json", tmp_path / "relative.json", checkpoint / "data" / "nested.json",
                  checkpoint / "global_step10" / "configs" / "in-configs.json"):
        place.parent.mkdir(parents=True, exist_ok=True)
        tokenizer.save(str(place))
    monkeypatch.chdir(tmp_path)
    for named, found in [(str(elsewhere / "absolute.json"), elsewhere / "absolute.json"),
                         ("relative.json", tmp_path / "relative.json"),
                         ("data/nested.json", checkpoint / "data" / "nested.json"),
                         ("/cluster/neox/in-configs.json", checkpoint / "global_step10" / "configs" / "in-configs.json")]:
        plan = plan_tokenizer({"tokenizer_type": "HFTokenizer", "vocab_file": named}, checkpoint)
        assert plan.files == (found,), named


@pytest.mark.parametrize(("yaml", "says"), [
    ({"tokenizer_type": "HFTokenizer", "vocab_file": "/cluster/20B_tokenizer.json"},
     "--tokenizer PATH/20B_tokenizer.json"),
    ({"tokenizer_type": "GPT2BPETokenizer", "vocab_file": "gpt2-vocab.json"}, "--tokenizer PATH/gpt2-vocab.json"),
    ({"tokenizer_type": "SPMTokenizer"}, "names no vocab-file"),
    ({"tokenizer_type": "HFGPT2Tokenizer"}, "NeoX downloaded GPT-2's tokenizer"),
    ({"tokenizer_type": "TiktokenTokenizer", "vocab_file": "cl100k_base"}, "--tokenizer PATH/cl100k_base.tiktoken"),
    ({"tokenizer_type": "WordPieceTokenizer", "vocab_file": "x"}, "not one NeoX builds"),
    ({}, "GPT2BPETokenizer: the NeoX config names no vocab-file"),  # NeoX's default type
])
def test_a_tokenizer_that_cannot_be_found_is_a_warning_saying_what_to_pass(
    yaml: dict[str, Any], says: str, tmp_path: Path
) -> None:
    plan = plan_tokenizer(yaml, tmp_path, embedding_rows=512)
    assert plan.tokenizer is None and len(plan.warnings) == 1
    assert says in str(plan.warnings[0]) and "--tokenizer" in plan.warnings[0].hint
    assert plan.config_fields() == {} and plan.write(tmp_path / "hf") == []
    assert not (tmp_path / "hf").exists()


def test_a_gpt2_vocabulary_without_its_merges_file_is_a_warning(tmp_path: Path) -> None:
    write_gpt2_files(tmp_path)
    plan = plan_tokenizer({"tokenizer_type": "GPT2BPETokenizer", "vocab_file": "vocab.json"}, tmp_path)
    assert plan.tokenizer is None
    assert "names no merge-file" in plan.warnings[0].message and "merges.txt" in plan.warnings[0].hint


def test_the_override_replaces_the_config_file_and_says_when_its_type_differs(tmp_path: Path) -> None:
    train_byte_level_bpe(["<|endoftext|>", "<|padding|>"]).save(str(tmp_path / "mine.json"))
    yaml = {"tokenizer_type": "GPT2BPETokenizer", "vocab_file": "missing.json", "merge_file": "missing.txt"}
    plan = plan_tokenizer(yaml, tmp_path, override=tmp_path / "mine.json")
    assert plan.kind == "HFTokenizer" and plan.warnings == [] and plan.eos_token_id == 0
    assert any("the NeoX config says GPT2BPETokenizer" in note for note in plan.notes)

    vocab, _ = write_gpt2_files(tmp_path / "gpt2")
    assert plan_tokenizer(yaml, tmp_path, override=vocab).kind == "GPT2BPETokenizer"  # merges.txt beside it
    model = train_sentencepiece(tmp_path / "sp.model", "bpe")
    assert plan_tokenizer({}, tmp_path, override=model).kind == "SPMTokenizer"
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "tokenizer.json").write_bytes((tmp_path / "mine.json").read_bytes())
    assert plan_tokenizer({}, tmp_path, override=tmp_path / "bare").files == (tmp_path / "bare" / "tokenizer.json",)


def test_an_hf_tokenizer_folder_as_override_is_written_as_transformers_loaded_it(tmp_path: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    backend = train_byte_level_bpe(["<|endoftext|>", "<|padding|>"])
    original = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|padding|>")
    original.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    original.save_pretrained(str(tmp_path / "given"))
    plan = plan_tokenizer({"tokenizer_type": "HFTokenizer"}, tmp_path, override=tmp_path / "given")
    assert (plan.bos_token_id, plan.eos_token_id, plan.pad_token_id) == (0, 0, 1)
    plan.write(tmp_path / "hf")
    assert load_hf_tokenizer(tmp_path / "hf").chat_template == original.chat_template


def test_a_missing_override_is_an_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(MapperError, match="no such file") as error:
        plan_tokenizer({}, tmp_path, override=tmp_path / "nope.json")
    assert "nope.json" in str(error.value)


def test_a_file_of_the_wrong_kind_is_an_error_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(MapperError, match="not a SentencePiece model") as error:
        plan_tokenizer({"tokenizer_type": "SPMTokenizer", "vocab_file": "tokenizer.model"}, tmp_path)
    assert str(tmp_path / "tokenizer.model") in str(error.value)


# --- vocabulary size against the embedding ---------------------------------------------------
def test_more_tokenizer_ids_than_embedding_rows_is_refused(tmp_path: Path) -> None:
    case = hf_tokenizer_case(tmp_path)
    with pytest.raises(MapperError, match=r"ids up to 299, but the model's embedding has 256 rows") as error:
        plan_tokenizer(case.yaml, case.checkpoint, embedding_rows=256)
    assert "--trim-vocab, keep at least 300" in str(error.value)


def test_padding_rows_are_explained_with_the_trim_that_drops_them(tmp_path: Path) -> None:
    case = hf_tokenizer_case(tmp_path)
    yaml = {**case.yaml, "make_vocab_size_divisible_by": 64, "model_parallel_size": 2}
    plan = plan_tokenizer(yaml, case.checkpoint, embedding_rows=384)
    padding = [note for note in plan.notes if "padding" in note]
    assert len(padding) == 1
    assert "the last 84 are NeoX's vocabulary padding" in padding[0] and "x TP = 128" in padding[0]
    assert "--trim-vocab 300" in padding[0]
    assert not [n for n in plan_tokenizer(yaml, case.checkpoint, embedding_rows=300).notes if "padding" in n]


def test_character_level_rows_neox_counts_but_never_produces_are_told_apart_from_padding(tmp_path: Path) -> None:
    plan = plan_tokenizer({"tokenizer_type": "CharLevelTokenizer"}, tmp_path, embedding_rows=1024)
    [note] = [n for n in plan.notes if "--trim-vocab" in n]
    assert "rows 256-511 are ids NeoX's CharLevelTokenizer counts but never produces" in note
    assert "the last 512 are NeoX's vocabulary padding" in note and "--trim-vocab 256" in note


# --- HF -> NeoX ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["HFTokenizer", "GPT2BPETokenizer", "SPMTokenizer-bpe", "TiktokenTokenizer"])
def test_the_neox_side_reads_the_hf_tokenizer_as_neox_s_hftokenizer(name: str, tmp_path: Path) -> None:
    case = CASES[name](tmp_path)
    plan_tokenizer(case.yaml, case.checkpoint).write(tmp_path / "hf")
    keys = neox_tokenizer_from_hf(tmp_path / "hf", tmp_path / "neox")

    assert keys == {"tokenizer-type": "HFTokenizer", "vocab-file": str((tmp_path / "neox" / "tokenizer.json").resolve()),
                    "merge-file": None}
    neox = Tokenizer.from_file(keys["vocab-file"])  # as NeoX's HFTokenizer reads it
    hf = load_hf_tokenizer(tmp_path / "hf")
    for text in SAMPLES:
        if "<|endoftext|>" not in text:  # HF may split special-token text (see split_special_tokens)
            assert neox.encode(text).ids == hf(text)["input_ids"], text
    assert neox.token_to_id("<|endoftext|>") == hf.eos_token_id == case.eod
    told = any("split_special_tokens" in note for note in plan_neox_tokenizer(tmp_path / "hf").notes)
    assert told == name.startswith("SPMTokenizer")


def test_hf_gpt2_files_without_tokenizer_json_become_a_tokenizer_json(tmp_path: Path) -> None:
    from transformers import GPT2Tokenizer

    vocab, merges = write_gpt2_files(tmp_path / "hf")
    GPT2Tokenizer(str(vocab), str(merges)).save_pretrained(str(tmp_path / "saved"))
    (tmp_path / "saved" / "tokenizer.json").unlink()
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / "saved" / name).write_bytes((tmp_path / "hf" / name).read_bytes())
    plan = plan_neox_tokenizer(tmp_path / "saved")
    plan.write(tmp_path / "neox")
    neox = Tokenizer.from_file(str(tmp_path / "neox" / "tokenizer.json"))
    reference = GPT2Tokenizer(str(vocab), str(merges))
    assert all(neox.encode(text).ids == reference.encode(text) for text in SAMPLES)


def test_an_hf_tokenizer_without_end_of_text_warns_that_neox_has_no_end_of_document(tmp_path: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    backend = train_byte_level_bpe(["<s>", "</s>"])
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>").save_pretrained(str(tmp_path / "hf"))
    plan = plan_neox_tokenizer(tmp_path / "hf")
    assert plan.kind == "HFTokenizer" and len(plan.warnings) == 1
    assert "eod would be None" in plan.warnings[0].message and "'</s>'" in plan.warnings[0].message


def test_an_hf_folder_without_tokenizer_files_is_a_warning_and_no_yaml_keys(tmp_path: Path) -> None:
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    plan = plan_neox_tokenizer(tmp_path / "hf")
    assert plan.kind is None and plan.yaml_keys(tmp_path / "neox") == {} and plan.write(tmp_path / "neox") == []
    assert "--tokenizer" in plan.warnings[0].hint


def test_a_character_level_model_keeps_its_tokenizer_type_and_needs_no_file(tmp_path: Path) -> None:
    plan_tokenizer({"tokenizer_type": "CharLevelTokenizer"}, tmp_path).write(tmp_path / "hf")
    plan = plan_neox_tokenizer(tmp_path / "hf", neox_yaml={"tokenizer_type": "CharLevelTokenizer"})
    assert plan.yaml_keys(tmp_path / "neox") == {"tokenizer-type": "CharLevelTokenizer", "vocab-file": None,
                                                 "merge-file": None}
    assert plan.write(tmp_path / "neox") == []
