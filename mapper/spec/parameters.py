"""The parameters the model config supplies to every rule set, with what each means.

Their values come from ``NeoXModelConfig.rule_parameters()`` (``mapper/configs/model.py``; a test
keeps the two lists equal) plus ``trim_vocab`` from ``--trim-vocab``. A rule file may use them
without declaring them: the loader declares each one it uses with the description below. The
README, the JSON Schema's description of ``parameters`` and ``mapper rules params`` list them.
"""

from __future__ import annotations

CONFIG_PARAMETERS: dict[str, str] = {
    "num_layers": "transformer layers (NeoX num-layers)",
    "hidden_size": "model width (NeoX hidden-size)",
    "num_heads": "attention heads (NeoX num-attention-heads)",
    "num_kv_heads": "key/value heads (NeoX num-kv-heads; equal to num_heads without GQA)",
    "head_dim": "size of one head: hidden_size // num_heads",
    "tp": "tensor-parallel degree of the NeoX side (model-parallel-size)",
    "vocab_size": "padded vocabulary size: rows of the word embedding",
    "gpt_j_residual": "1 when NeoX gpt-j-residual is on (each rank adds its row-parallel bias before one all-reduce)",
    "tied": "1 when the output layer shares the word embedding (NeoX no-weight-tying false)",
    "te_columnparallel": "1 when NeoX te-columnparallel is on",
    "te_rowparallel": "1 when NeoX te-rowparallel is on",
    "te_mha": "1 when NeoX te-mha (or te-fp8-mha) is on: TE MultiheadAttention",
    "te_layernorm_mlp": "1 when NeoX te-layernorm-mlp is on: TE LayerNormMLP carries the pre-MLP norm",
    "te_norm": "1 when NeoX norm is te_layernorm or te_rmsnorm",
    "gqa_pre_1315": "1 for NeoX's own GQA QKV layout before gpt-neox #1315 (--set gqa_layout=pre-1315)",
    "legacy_mlp": "1 for the legacy LLaMAParallelMLP names mlp.w1/w2/w3 (NeoX mlp-type llama, before gpt-neox #1212)",
    "trim_vocab": "vocabulary rows kept on the HF side (--trim-vocab; 0: all)",
}


def parameters_sentence() -> str:
    """One line naming them (the JSON Schema's description of ``parameters``)."""
    return ", ".join(f"`{name}`" for name in CONFIG_PARAMETERS)


def parameters_markdown() -> str:
    """The README's table of the parameters the config supplies."""
    rows = ["| parameter | meaning |", "|---|---|"]
    rows += [f"| `{name}` | {meaning} |" for name, meaning in CONFIG_PARAMETERS.items()]
    return "\n".join(rows) + "\n"
