"""A tiny word-level tokenizer for synthetic checkpoints, so their HF folders can generate text.

NeoX's ``HFTokenizer`` type reads any ``tokenizer.json``; this one has 100 ids: the NeoX special
tokens (``<|endoftext|>`` 0, ``<|padding|>`` 1) and 98 common English words, split on whitespace.
Built from a fixed list: the same file every time, no training, no download.
"""

from __future__ import annotations

from pathlib import Path

WORDS = (
    "the of and to a in is that it was for on are as with his they at be this from have or by one had not but "
    "what all were when we there can an your which their said if do will each about how up out them then she "
    "many some so these would other into has more her two like him see time could no make than first been its "
    "who now people my made over did down only way find use may water long little very after words called just "
    "where most know good"
).split()
SPECIAL = ("<|endoftext|>", "<|padding|>")


def tiny_tokenizer_json(vocab_size: int = 100) -> str:
    """``tokenizer.json`` text of a word-level tokenizer with ``vocab_size`` ids (at most 100)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, decoders

    words = list(SPECIAL) + WORDS[: vocab_size - len(SPECIAL)]
    if len(words) != vocab_size:
        raise ValueError(f"the tiny tokenizer has at most {len(SPECIAL) + len(WORDS)} ids")
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<|padding|>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in SPECIAL])
    return tokenizer.to_str()


def write_tiny_tokenizer(folder: Path, vocab_size: int = 100) -> Path:
    """Write ``tokenizer.json`` into ``folder``; returns its path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tokenizer.json"
    path.write_text(tiny_tokenizer_json(vocab_size), encoding="utf-8")
    return path
