"""The tokenizer side of a conversion: HF tokenizer files and special-token ids from a NeoX
config (:mod:`mapper.tokenizer.to_hf`), and the NeoX tokenizer file and YAML keys from an HF
folder (:mod:`mapper.tokenizer.to_neox`). How each NeoX tokenizer type is rebuilt is in
:mod:`mapper.tokenizer.neox_types`."""

from mapper.tokenizer.neox_types import TokenizerFileError
from mapper.tokenizer.to_hf import TokenizerPlan, TokenizerWarning, plan_tokenizer
from mapper.tokenizer.to_neox import NeoXTokenizerPlan, neox_tokenizer_from_hf, plan_neox_tokenizer

__all__ = [
    "NeoXTokenizerPlan",
    "TokenizerFileError",
    "TokenizerPlan",
    "TokenizerWarning",
    "neox_tokenizer_from_hf",
    "plan_neox_tokenizer",
    "plan_tokenizer",
]
