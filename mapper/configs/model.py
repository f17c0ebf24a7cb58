"""The normalized description of a GPT-NeoX model: everything that decides what its checkpoint computes.

Sizes, norms and their epsilons, activation, biases, residual wiring, rotary, tying, the TP degree,
the Transformer Engine (TE) switches and the gpt-neox code history a checkpoint comes from. Each
field carries its NeoX key and HF field (:mod:`mapper.configs.settings`), so this class is the one
table the YAML and HF translations read. The NeoX facts were read in EleutherAI/gpt-neox:

- ``megatron/neox_arguments/neox_args.py``: defaults (``norm: layernorm``, ``layernorm_epsilon
  1e-5``, ``rms_norm_epsilon 1e-8``, ``pos_emb: learned``, ``rotary_pct 1.0``, ``rotary_emb_base
  10000``, ``make_vocab_size_divisible_by 128``, ``mlp_multiple_of 1``, ``activation: gelu``,
  biases on, ``gpt_j_residual``/``gpt_j_tied``/``no_weight_tying`` off).
- ``megatron/model/transformer.py`` ``ParallelMLP``: gated sizing ``ffn = int(ffn * 2 / 3)``,
  ``ffn_in = ffn // 2``, rounded up to ``2 * mlp_multiple_of`` / ``mlp_multiple_of``.
- ``megatron/model/transformer_engine.py`` ``TELayerNormMLP``: the TE MLP takes
  ``intermediate_size`` (or ``expansion_factor * hidden``, else ``4 * hidden``) as is, its norm eps
  is hard-coded (1e-5 LayerNorm, 1e-8 RMSNorm), its activation is TE's (GELU = tanh);
  ``TEMultiheadAttention`` and ``TELayerNormMLP`` always build biases.
- sliding-window attention (``sliding_window_width`` W, gpt-neox #1131): the flash-attention path
  passes ``window_size=(W, -1)`` to flash-attn, so the query at position i attends to keys
  i-W .. i, W + 1 of them (``megatron/model/transformer.py`` ``flash_attention``; the training
  mask of ``megatron/utils.py`` ``get_attn_mask``, ``triu(diagonal=-W)``, keeps the same keys).
  NeoX's global attention gets no window at inference (``text_generation_utils.py`` builds the mask
  without it); TE attention gets ``window_size=W`` in a form not modelled here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from mapper.configs.settings import neox
from mapper.dtypes import PRECISION_DTYPES

Norm = Literal["layernorm", "rmsnorm", "te_layernorm", "te_rmsnorm"]
Activation = Literal["gelu", "relu", "silu", "swiglu", "geglu", "reglu"]
PosEmb = Literal["rotary", "learned", "none"]
Precision = Literal["fp32", "fp16", "bfloat16"]

GATED_ACTIVATIONS = frozenset({"swiglu", "geglu", "reglu"})
# NeoX's TELayerNormMLP passes a fixed eps to TE, whatever layernorm/rms_norm_epsilon say.
TE_LNMLP_EPS = {"layernorm": 1.0e-5, "rmsnorm": 1.0e-8}
MAX_INT = 2**31 - 1  # no model setting is larger; bigger values are typos or hostile files

Count = Annotated[int, Field(gt=0, le=MAX_INT)]
Epsilon = Annotated[float, Field(gt=0.0, lt=1.0)]


def attention_types(attention: Any) -> list[str]:
    """``[[["global", "flash"], 6]]`` -> ``["global", "flash"]``; an expanded list of strings passes through."""
    if not isinstance(attention, list):
        return []
    kinds: list[str] = []
    for item in attention:
        if isinstance(item, str):
            kinds.append(item)
        elif isinstance(item, (list, tuple)) and item and isinstance(item[0], (list, tuple)):
            kinds.extend(str(k) for k in item[0])
    return kinds


class MLPWidths(BaseModel):
    """Actual MLP tensor widths (whole model, all TP ranks together)."""

    model_config = ConfigDict(frozen=True)

    in_rows: int = Field(description="Rows of the MLP-in weight (both halves when gated; TE fc1 rows).")
    out_inputs: int = Field(description="Input width of the MLP-out weight = HF `intermediate_size`.")


class RowParallelMultipliers(BaseModel):
    """How many times NeoX's forward counts a stored row-parallel weight and bias.

    HF's (TP-free) weight is ``weight × merged shards`` and HF's bias is ``bias × stored bias``.
    """

    model_config = ConfigDict(frozen=True)

    weight: int = Field(description="Factor on the merged row-parallel weight (TP only for a TE "
                        "module under gpt_j_residual, whose output is all-reduced twice).")
    bias: int = Field(description="Factor on the stored (replicated) bias: TP under gpt_j_residual "
                      "(every rank adds it before the single all-reduce), else 1.")


class NeoXModelConfig(BaseModel):
    """The normalized description of a GPT-NeoX model: what its checkpoint computes."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)

    # sizes
    num_layers: Annotated[Count, neox("num_layers", hf="num_hidden_layers")] = Field(
        description="Transformer blocks (`num-layers`).")
    hidden_size: Annotated[Count, neox("hidden_size", hf="hidden_size")] = Field(
        description="Model width (`hidden-size`).")
    num_heads: Annotated[Count, neox("num_attention_heads", hf="num_attention_heads")] = Field(
        description="Query heads (`num-attention-heads`).")
    num_kv_heads: Annotated[Count, neox("num_kv_heads")] = Field(
        description="Key/value heads (`num-kv-heads`; = num_heads without GQA).")
    intermediate_size: Annotated[Count | None, neox("intermediate_size")] = Field(
        default=None, description="`intermediate-size` as written in the NeoX YAML (None = default "
        "4*hidden). NOT the HF intermediate_size for gated MLPs: see `mlp_widths()`.")
    expansion_factor: Annotated[float | None, Field(gt=0), neox("expansion_factor")] = Field(
        default=None, description="`expansion-factor`: ffn = int(factor*hidden) when intermediate-size is unset.")
    mlp_multiple_of: Annotated[Count, neox("mlp_multiple_of")] = Field(
        default=1, description="`mlp-multiple-of`: non-TE MLP width rounding.")
    mlp_type: Annotated[Literal["regular", "llama"], neox("mlp_type")] = Field(
        default="regular", description="`llama` = the legacy LLaMAParallelMLP (`mlp.w1/w2/w3`, no biases).")
    vocab_size: Annotated[Count, neox("padded_vocab_size", hf="vocab_size")] = Field(
        description="Padded vocabulary: rows of word_embeddings over all ranks.")
    orig_vocab_size: Annotated[Count | None, neox("orig_vocab_size", write=False, mapper_only=True)] = Field(
        default=None, description="Tokenizer vocabulary before padding, when known.")
    make_vocab_size_divisible_by: Annotated[Count, neox("make_vocab_size_divisible_by")] = Field(
        default=128, description="NeoX pads the vocab to a multiple of this × TP.")
    tp: Annotated[Count, neox("model_parallel_size")] = Field(
        default=1, description="Tensor (model) parallel size of the checkpoint.")

    # norms
    norm: Annotated[Norm, neox("norm")] = Field(
        default="layernorm", description="`norm`: layernorm | rmsnorm | te_layernorm | te_rmsnorm.")
    layernorm_epsilon: Annotated[Epsilon, neox("layernorm_epsilon")] = Field(
        default=1.0e-5, description="eps of layernorm / te_layernorm.")
    rms_norm_epsilon: Annotated[Epsilon, neox("rms_norm_epsilon")] = Field(
        default=1.0e-8, description="eps of rmsnorm / te_rmsnorm.")
    use_bias_in_norms: Annotated[bool, neox("use_bias_in_norms")] = Field(
        default=True, description="LayerNorm bias (newest NeoX only; older builds always had one).")

    # MLP / attention
    activation: Annotated[Activation, neox("activation")] = Field(
        default="gelu", description="NeoX `activation` (`swiglu` also stands for the legacy llama MLP's silu).")
    bias_gelu_fusion: Annotated[bool, neox("bias_gelu_fusion")] = Field(
        default=False, description="NeoX non-TE gelu uses the tanh approximation when true.")
    use_bias_in_attn_linear: Annotated[bool, neox("use_bias_in_attn_linear")] = Field(
        default=True, description="QKV/dense biases in NeoX attention (TE attention always has them).")
    use_bias_in_mlp: Annotated[bool, neox("use_bias_in_mlp")] = Field(
        default=True, description="MLP biases (TE LayerNormMLP always has them; legacy llama MLP never).")

    # wiring
    gpt_j_residual: Annotated[bool, neox("gpt_j_residual", also=("gptj_residual",))] = Field(
        default=False, description="Parallel residual x + attn(ln1 x) + mlp(ln2 x) with one all-reduce.")
    gpt_j_tied: Annotated[bool, neox("gpt_j_tied")] = Field(
        default=False, description="Under gpt_j_residual, both branches use input_layernorm.")
    pos_emb: Annotated[PosEmb, neox("pos_emb")] = Field(
        default="learned", description="Position embedding; mapper computes rotary, learned and none.")
    rotary_pct: Annotated[float, Field(gt=0.0, le=1.0),
                          neox("rotary_pct")] = Field(
        default=1.0, description="Fraction of each head's dims that rotary rotates.")
    rotary_emb_base: Annotated[float, Field(gt=0.0, le=1e12), neox("rotary_emb_base", hf="rope_parameters.rope_theta")] = Field(
        default=10000.0, description="Rotary base (NeoX default 10000).")
    no_weight_tying: Annotated[bool, neox("no_weight_tying", hf="tie_word_embeddings", negate=True)] = Field(
        default=False, description="True: separate final_linear; False: logits use word_embeddings.")
    seq_length: Annotated[Count | None, neox("seq_length")] = Field(
        default=None, description="`seq-length` (training context).")
    max_position_embeddings: Annotated[Count | None, neox("max_position_embeddings")] = Field(
        default=None, description="`max-position-embeddings` (NeoX default: seq-length).")
    attention_config: Annotated[list[Any] | None, neox("attention_config")] = Field(
        default=None, description="`attention-config` as written (`[[[\"flash\"], 32]]`; None = global "
        "everywhere); mapper computes global and flash attention, which differ only in the sliding window.")
    sliding_window_width: Annotated[int | None, Field(ge=0, le=MAX_INT), neox("sliding_window_width")] = Field(
        default=None, description="`sliding-window-width` W: with flash attention each query attends to "
        "itself and the W keys before it (W + 1 keys; HF `sliding_window` counts them: W + 1).")

    # Transformer Engine switches (independent flags: any mix can exist on disk)
    te_mha: Annotated[bool, neox("te_mha", also=("te_fp8_mha",))] = Field(
        default=False, description="TE MultiheadAttention (`attention.qkv/proj`, per-group QKV); also set by te_fp8_mha.")
    te_layernorm_mlp: Annotated[bool, neox("te_layernorm_mlp")] = Field(
        default=False, description="TE LayerNormMLP: pre-MLP norm lives in `mlp.layer_norm_*`.")
    te_columnparallel: Annotated[bool, neox("te_columnparallel")] = Field(
        default=False, description="TE Linear for column-parallel layers (new names + `_extra_state`).")
    te_rowparallel: Annotated[bool, neox("te_rowparallel")] = Field(
        default=False, description="TE Linear for row-parallel layers (all-reduce inside the module).")

    precision: Annotated[Precision, neox("precision")] = Field(
        default="fp32", description="Training precision (`precision`, or the fp16/bf16 DeepSpeed blocks).")

    # gpt-neox code history: layouts and formulas that changed with the same keys and shapes
    gqa_layout: Annotated[Literal["current", "pre-1315"], neox("gqa_layout", write=False, mapper_only=True)] = Field(
        default="current",
        description="Row layout of NeoX's own fused GQA QKV per rank: `current` = [Q | K | V] blocks "
        "(gpt-neox #1315, 2024-11-14, onwards); `pre-1315` = per query head [q_h | K slice | V slice].")
    rmsnorm_formula: Annotated[Literal["current", "pre-1345"],
                               neox("rmsnorm_formula", write=False, mapper_only=True)] = Field(
        default="current",
        description="NeoX's own RMSNorm: `current` = x * rsqrt(mean(x^2) + eps) (gpt-neox #1345, "
        "2025-05-09, onwards, and every TE norm); `pre-1345` = x / (rms(x) + eps).")

    @classmethod
    def default(cls, name: str) -> Any:
        """NeoX's default for a setting (one home for every default: the field itself)."""
        return cls.model_fields[name].default

    @model_validator(mode="after")
    def _check(self) -> NeoXModelConfig:
        problems = []
        if self.hidden_size % self.num_heads:
            problems.append(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            problems.append(f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}")
        if self.num_heads % self.tp or self.num_kv_heads % self.tp:
            problems.append(f"heads ({self.num_heads}) and kv heads ({self.num_kv_heads}) must divide by tp {self.tp}")
        if self.vocab_size % self.tp:
            problems.append(f"vocab_size {self.vocab_size} is not divisible by tp {self.tp}")
        if self.mlp_type == "llama" and not self.is_gated:
            problems.append("mlp_type llama is a gated (silu) MLP: activation must be swiglu")
        if self.sliding_window_width is not None and self.te_mha:
            problems.append("sliding-window-width with te-mha: NeoX passes the width to TE's attention in a form "
                            "mapper does not model (use NeoX's own attention with flash)")
        if self.sliding_window_width is not None and len(set(self.attention_kinds)) > 1:
            problems.append(f"sliding-window-width with attention-config mixing {' and '.join(sorted(set(self.attention_kinds)))}: "
                            "the window applies to the flash layers only (HF has one window for every layer)")
        if self.gqa_layout == "pre-1315" and self.is_gqa and (self.head_dim * self.num_kv_heads) % self.num_heads:
            problems.append(f"the pre-1315 GQA layout needs head_dim * num_kv_heads ({self.head_dim} * "
                            f"{self.num_kv_heads}) divisible by num_heads ({self.num_heads})")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    # ---- derived -----------------------------------------------------------------------------

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def is_gqa(self) -> bool:
        return self.num_kv_heads != self.num_heads

    @property
    def is_rmsnorm(self) -> bool:
        return self.norm in ("rmsnorm", "te_rmsnorm")

    @property
    def is_te_norm(self) -> bool:
        return self.norm in ("te_layernorm", "te_rmsnorm")

    @property
    def norm_family(self) -> Literal["layernorm", "rmsnorm"]:
        return "rmsnorm" if self.is_rmsnorm else "layernorm"

    @property
    def is_gated(self) -> bool:
        return self.activation in GATED_ACTIVATIONS

    @property
    def attention_kinds(self) -> list[str]:
        """The attention types of ``attention_config`` (``[[["flash"], 2]]`` -> ``["flash"]``), as
        NeoX's ``expand_attention_types`` reads them; ``["global"]`` without one."""
        return attention_types(self.attention_config) or ["global"]

    @property
    def effective_sliding_window(self) -> int | None:
        """NeoX's ``sliding_window_width`` where NeoX applies it, else None (full causal attention).

        gpt-neox applies the width on its flash-attention path only; global attention gets no window
        at inference (and in training only where the unfused softmax ran: see
        :func:`mapper.configs.hf.approximations`).
        """
        if self.sliding_window_width is None or set(self.attention_kinds) != {"flash"}:
            return None
        return self.sliding_window_width

    @property
    def tied(self) -> bool:
        """The output layer reuses the word embeddings (no `final_linear` in the checkpoint)."""
        return not self.no_weight_tying

    @property
    def norm_eps(self) -> float:
        """eps of input_layernorm, post_attention_layernorm and the final norm."""
        return self.rms_norm_epsilon if self.is_rmsnorm else self.layernorm_epsilon

    @property
    def mlp_norm_eps(self) -> float:
        """eps of the pre-MLP norm: TE LayerNormMLP's is fixed by NeoX's wrapper."""
        return TE_LNMLP_EPS[self.norm_family] if self.te_layernorm_mlp else self.norm_eps

    @property
    def rotary_ndims(self) -> int:
        """Rotated dims per head: NeoX and HF both use int(head_dim * rotary_pct)."""
        return int(self.head_dim * self.rotary_pct) if self.pos_emb == "rotary" else 0

    @property
    def norm_has_bias(self) -> bool:
        """torch LayerNorm honours use_bias_in_norms; TE's LayerNorm always has a bias; RMSNorms none."""
        return self.norm == "te_layernorm" or (self.norm == "layernorm" and self.use_bias_in_norms)

    @property
    def attn_has_bias(self) -> bool:
        return self.te_mha or self.use_bias_in_attn_linear

    @property
    def mlp_has_bias(self) -> bool:
        if self.te_layernorm_mlp:
            return True
        return self.use_bias_in_mlp and self.mlp_type != "llama"

    @property
    def gelu_approximate(self) -> Literal["none", "tanh"]:
        """TE's LayerNormMLP GELU is always tanh; NeoX's own gelu is tanh only with
        bias_gelu_fusion (``activations.py`` bias_gelu), its geglu always exact (F.gelu)."""
        if self.te_layernorm_mlp or (self.activation == "gelu" and self.bias_gelu_fusion):
            return "tanh"
        return "none"

    @property
    def dtype(self) -> torch.dtype:
        return PRECISION_DTYPES[self.precision]

    @property
    def positions(self) -> int:
        return self.max_position_embeddings or self.seq_length or 2048

    @property
    def switches(self) -> dict[str, Any]:
        """The Transformer Engine switches of this model, as NeoX's config names them."""
        return {"norm": self.norm, "te_mha": self.te_mha, "te_layernorm_mlp": self.te_layernorm_mlp,
                "te_columnparallel": self.te_columnparallel, "te_rowparallel": self.te_rowparallel}

    def ffn_base(self) -> int:
        """The width NeoX starts from: intermediate-size, else expansion-factor*hidden, else 4*hidden."""
        if self.intermediate_size:
            return self.intermediate_size
        if self.expansion_factor:
            return int(self.expansion_factor * self.hidden_size)
        return 4 * self.hidden_size

    def mlp_widths(self) -> MLPWidths:
        """Actual MLP widths, computed the way the NeoX module that holds them computes them."""
        base = self.ffn_base()
        if self.te_layernorm_mlp:  # TE LayerNormMLP: as is, fc1 doubled for gated activations
            return MLPWidths(in_rows=(2 if self.is_gated else 1) * base, out_inputs=base)
        if self.mlp_type == "llama":  # legacy LLaMAParallelMLP: w1/w3 have ff rows each
            if self.intermediate_size:
                ff = self.intermediate_size
            else:
                ff = 256 * math.ceil(int(2 * self.hidden_size * 4 / 3) / 256)
            return MLPWidths(in_rows=2 * ff, out_inputs=ff)
        m = self.mlp_multiple_of
        ffn, ffn_in = base, base
        if self.is_gated:
            ffn = int(base * 2 / 3)
            ffn_in = ffn // 2
        ffn = 2 * m * math.ceil(ffn / (2 * m))
        ffn_in = m * math.ceil(ffn_in / m)
        return MLPWidths(in_rows=ffn, out_inputs=ffn_in)

    def row_parallel_multipliers(self, module: Literal["attention", "mlp"]) -> RowParallelMultipliers:
        """How NeoX's forward counts stored row-parallel weights/biases.

        ``transformer.py`` (ParallelTransformerLayer.forward): under ``gpt_j_residual`` the
        attention and MLP are built with ``parallel_output=True`` (no all-reduce inside), each rank
        adds its bias, and one all-reduce sums ``attn + mlp`` over ranks: the bias counts TP
        times. NeoX's TE wrappers ignore ``parallel_output`` and TE's row-parallel modules
        all-reduce inside (``transformer_engine/pytorch/module/linear.py``, ``layernorm_mlp.py``),
        so under ``gpt_j_residual`` a TE module's output is summed twice: TP × the merged weight.
        """
        te = (self.te_mha or self.te_rowparallel) if module == "attention" else (
            self.te_layernorm_mlp or self.te_rowparallel)
        if not self.gpt_j_residual:
            return RowParallelMultipliers(weight=1, bias=1)
        return RowParallelMultipliers(weight=self.tp if te else 1, bias=self.tp)

    # ---- checkpoint layout ---------------------------------------------------------------------

    def block_layer_index(self, block: int) -> int:
        """Pipeline layer index of transformer block ``block`` (0-based): block + 2."""
        return block + 2

    @property
    def final_norm_layer_index(self) -> int:
        return self.num_layers + 3

    @property
    def final_linear_layer_index(self) -> int:
        return self.num_layers + 4

    def rule_parameters(self) -> dict[str, int]:
        """The integers a rule set may use in its expressions (README: "Parameters the config supplies")."""
        return {
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "tp": self.tp,
            "vocab_size": self.vocab_size,
            "gpt_j_residual": int(self.gpt_j_residual),
            "tied": int(self.tied),
            "te_columnparallel": int(self.te_columnparallel),
            "te_rowparallel": int(self.te_rowparallel),
            "te_mha": int(self.te_mha),
            "te_layernorm_mlp": int(self.te_layernorm_mlp),
            "te_norm": int(self.is_te_norm),
            "gqa_pre_1315": int(self.gqa_layout == "pre-1315"),
            "legacy_mlp": int(self.mlp_type == "llama"),
        }

    # ---- translations (see mapper.configs.neox_yaml and mapper.configs.hf) -----------------------

    @classmethod
    def from_neox_yaml(
        cls, raw: Mapping[str, Any], *, tp: int | None = None, padded_vocab_size: int | None = None
    ) -> NeoXModelConfig:
        """Build from a (merged) NeoX YAML dict; see :func:`mapper.configs.neox_yaml.model_from_neox_yaml`."""
        from mapper.configs.neox_yaml import model_from_neox_yaml

        return model_from_neox_yaml(raw, tp=tp, padded_vocab_size=padded_vocab_size)

    def to_neox_yaml(self) -> dict[str, Any]:
        """The model part of a NeoX YAML, hyphenated keys as NeoX's own configs write them."""
        from mapper.configs.neox_yaml import model_to_neox_yaml

        return model_to_neox_yaml(self)

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any], *, tp: int = 1) -> NeoXModelConfig:
        """The NeoX model (new names, no TE) that computes what an HF config.json describes."""
        from mapper.configs.hf import model_from_hf_config

        return model_from_hf_config(config, tp=tp)

    def to_hf_config(self, arch: str, *, shapes: Mapping[str, tuple[int, ...]] | None = None,
                     strict: bool = False) -> dict[str, Any]:
        """A config.json dict for HF architecture ``arch``; see :func:`mapper.configs.hf.hf_config`."""
        from mapper.configs.hf import hf_config

        return hf_config(self, arch, shapes=shapes, strict=strict)
