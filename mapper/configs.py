"""Model configuration: NeoX YAML <-> one normalized description of the model <-> HF config.json.

Everything that decides *what function a checkpoint computes* lives in :class:`NeoXModelConfig`:
sizes, norms and their epsilons, activation, biases, residual wiring, rotary, tying, TP and the
Transformer Engine (TE) switches. The NeoX facts used here were read in EleutherAI/gpt-neox:

- ``megatron/neox_arguments/neox_args.py``: defaults (``norm: layernorm``, ``layernorm_epsilon
  1e-5``, ``rms_norm_epsilon 1e-8``, ``pos_emb: learned``, ``rotary_pct 1.0``, ``rotary_emb_base
  10000``, ``make_vocab_size_divisible_by 128``, ``mlp_multiple_of 1``, ``activation: gelu``,
  biases on, ``gpt_j_residual``/``gpt_j_tied``/``no_weight_tying`` off).
- ``megatron/neox_arguments/arguments.py`` ``NeoXArgs.from_ymls``: several YAML files are merged
  into one dict, ``-`` becomes ``_``, and a key given by two files is an error.
- ``megatron/model/transformer.py`` ``ParallelMLP``: gated sizing ``ffn = int(ffn * 2 / 3)``,
  ``ffn_in = ffn // 2``, rounded up to ``2 * mlp_multiple_of`` / ``mlp_multiple_of``.
- ``megatron/model/transformer_engine.py`` ``TELayerNormMLP`` (after PR #1352): the TE MLP takes
  ``intermediate_size`` (or ``expansion_factor * hidden``, else ``4 * hidden``) as is, its norm eps
  is hard-coded (1e-5 LayerNorm, 1e-8 RMSNorm), and its activation is TE's (GELU = tanh).
- ``TEMultiheadAttention`` and ``TELayerNormMLP`` always build biases (``bias=True``).

The key namespace itself lives in :mod:`mapper.formats.naming`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mapper.errors import MapperError
from mapper.input_files import read_text
from mapper.safe_yaml import load_yaml

Norm = Literal["layernorm", "rmsnorm", "te_layernorm", "te_rmsnorm"]
Activation = Literal["gelu", "relu", "silu", "swiglu", "geglu", "reglu"]
PosEmb = Literal["rotary", "learned", "none"]
Precision = Literal["fp32", "fp16", "bfloat16"]

GATED_ACTIVATIONS = frozenset({"swiglu", "geglu", "reglu"})
# NeoX's TELayerNormMLP passes a fixed eps to TE, whatever layernorm/rms_norm_epsilon say.
TE_LNMLP_EPS = {"layernorm": 1.0e-5, "rmsnorm": 1.0e-8}
_PRECISION_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bfloat16": torch.bfloat16}


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

    model_config = ConfigDict(frozen=True, extra="forbid")

    # sizes
    num_layers: int = Field(gt=0, description="Transformer blocks (`num-layers`).")
    hidden_size: int = Field(gt=0, description="Model width (`hidden-size`).")
    num_heads: int = Field(gt=0, description="Query heads (`num-attention-heads`).")
    num_kv_heads: int = Field(gt=0, description="Key/value heads (`num-kv-heads`; = num_heads without GQA).")
    intermediate_size: int | None = Field(
        default=None, description="`intermediate-size` as written in the NeoX YAML (None = default "
        "4*hidden). NOT the HF intermediate_size for gated MLPs: see `mlp_widths()`.")
    expansion_factor: float | None = Field(
        default=None, description="`expansion-factor`: ffn = int(factor*hidden) when intermediate-size is unset.")
    mlp_multiple_of: int = Field(default=1, gt=0, description="`mlp-multiple-of`: non-TE MLP width rounding.")
    mlp_type: Literal["regular", "llama"] = Field(
        default="regular", description="`llama` = the legacy LLaMAParallelMLP (`mlp.w1/w2/w3`, no biases).")
    vocab_size: int = Field(gt=0, description="Padded vocabulary: rows of word_embeddings over all ranks.")
    orig_vocab_size: int | None = Field(default=None, description="Tokenizer vocabulary before padding, when known.")
    make_vocab_size_divisible_by: int = Field(
        default=128, gt=0,
        description="NeoX pads the vocab to a multiple of this × TP.")
    tp: int = Field(default=1, gt=0, description="Tensor (model) parallel size of the checkpoint.")

    # norms
    norm: Norm = Field(default="layernorm", description="`norm`: layernorm | rmsnorm | te_layernorm | te_rmsnorm.")
    layernorm_epsilon: float = Field(default=1.0e-5, description="eps of layernorm / te_layernorm.")
    rms_norm_epsilon: float = Field(default=1.0e-8, description="eps of rmsnorm / te_rmsnorm.")
    use_bias_in_norms: bool = Field(default=True,
        description="LayerNorm bias (newest NeoX only; older builds always had one).")

    # MLP / attention
    activation: Activation = Field(default="gelu",
        description="NeoX `activation` (`swiglu` also stands for the legacy llama MLP's silu).")
    bias_gelu_fusion: bool = Field(default=False, description="NeoX non-TE gelu uses the tanh approximation when true.")
    use_bias_in_attn_linear: bool = Field(default=True,
        description="QKV/dense biases in NeoX attention (TE attention always has them).")
    use_bias_in_mlp: bool = Field(default=True,
        description="MLP biases (TE LayerNormMLP always has them; legacy llama MLP never).")

    # wiring
    gpt_j_residual: bool = Field(default=False,
        description="Parallel residual x + attn(ln1 x) + mlp(ln2 x) with one all-reduce.")
    gpt_j_tied: bool = Field(default=False, description="Under gpt_j_residual, both branches use input_layernorm.")
    pos_emb: PosEmb = Field(default="learned",
        description="Position embedding; mapper computes rotary, learned and none.")
    rotary_pct: float = Field(default=1.0, gt=0.0, le=1.0,
        description="Fraction of each head's dims that rotary rotates.")
    rotary_emb_base: float = Field(default=10000.0, gt=0.0, description="Rotary base (NeoX default 10000).")
    no_weight_tying: bool = Field(default=False,
        description="True: separate final_linear; False: logits use word_embeddings.")
    seq_length: int | None = Field(default=None, description="`seq-length` (training context).")
    max_position_embeddings: int | None = Field(default=None,
        description="`max-position-embeddings` (NeoX default: seq-length).")

    # Transformer Engine
    te_mha: bool = Field(default=False,
        description="TE MultiheadAttention (`attention.qkv/proj`, per-group QKV); also set by te_fp8_mha.")
    te_layernorm_mlp: bool = Field(default=False,
        description="TE LayerNormMLP: pre-MLP norm lives in `mlp.layer_norm_*`.")
    te_columnparallel: bool = Field(default=False,
        description="TE Linear for column-parallel layers (new names + `_extra_state`).")
    te_rowparallel: bool = Field(default=False,
        description="TE Linear for row-parallel layers (all-reduce inside the module).")

    # gpt-neox code history: layouts and formulas that changed with the same keys and shapes
    gqa_layout: Literal["current", "pre-1315"] = Field(default="current",
        description="Row layout of NeoX's own fused GQA QKV per rank: `current` = [Q | K | V] blocks "
        "(gpt-neox #1315, 2024-11-14, onwards); `pre-1315` = per query head [q_h | K slice | V slice].")
    rmsnorm_formula: Literal["current", "pre-1345"] = Field(default="current",
        description="NeoX's own RMSNorm: `current` = x * rsqrt(mean(x^2) + eps) (gpt-neox #1345, "
        "2025-05-09, onwards, and every TE norm); `pre-1345` = x / (rms(x) + eps).")

    precision: Precision = Field(default="fp32",
        description="Training precision (`precision`, or the fp16/bf16 DeepSpeed blocks).")

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
    def norm_family(self) -> Literal["layernorm", "rmsnorm"]:
        return "rmsnorm" if self.is_rmsnorm else "layernorm"

    @property
    def is_gated(self) -> bool:
        return self.activation in GATED_ACTIVATIONS

    @property
    def is_llama_architecture(self) -> bool:
        """RMSNorm + SwiGLU: what HF `LlamaForCausalLM` computes."""
        return self.is_rmsnorm and self.activation == "swiglu"

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
        return _PRECISION_DTYPES[self.precision]

    @property
    def positions(self) -> int:
        return self.max_position_embeddings or self.seq_length or 2048

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
        """How NeoX's forward counts stored row-parallel weights/biases (see module docstring).

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
        """The integers a rule set may use in its expressions."""
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
            "te_norm": int(self.norm in ("te_layernorm", "te_rmsnorm")),
            "gqa_pre_1315": int(self.gqa_layout == "pre-1315"),
        }

    # ---- NeoX YAML -----------------------------------------------------------------------------

    @classmethod
    def from_neox_yaml(
        cls, raw: Mapping[str, Any], *, tp: int | None = None, padded_vocab_size: int | None = None
    ) -> NeoXModelConfig:
        """Build from a (merged) NeoX YAML dict.

        ``tp`` overrides ``model-parallel-size`` (the checkpoint's file count is the truth).
        The padded vocabulary comes from ``padded_vocab_size`` (argument, or key in ``raw``), else
        from an unpadded ``vocab-size`` padded the NeoX way; without either it is an error
        because the YAML alone does not know the tokenizer.
        """
        args = normalize_keys(raw, where="config")
        _reject_unsupported(args)

        def get(key: str, default: Any = None) -> Any:
            value = args.get(key)
            return default if value is None else value

        num_heads = _int(get("num_attention_heads"), "num_attention_heads")
        tp_value = tp if tp is not None else int(get("model_parallel_size", 1))
        divisible_by = int(get("make_vocab_size_divisible_by", 128))
        orig_vocab = get("orig_vocab_size", get("vocab_size"))
        padded = padded_vocab_size if padded_vocab_size is not None else get("padded_vocab_size")
        if padded is None and orig_vocab is not None:
            padded = pad_vocab_size(int(orig_vocab), divisible_by, tp_value)
        if padded is None:
            raise MapperError(
                "the NeoX config does not say how large the (padded) vocabulary is",
                where="config: padded-vocab-size",
                hint="pass padded_vocab_size (rows of word_embeddings summed over TP ranks) or add "
                "`padded-vocab-size` / `vocab-size` to the YAML",
            )
        activation = str(get("activation", "gelu"))
        mlp_type = str(get("mlp_type", "regular"))
        if mlp_type == "llama":  # legacy LLaMAParallelMLP: act(w1 x) * w3 x, act = silu/swish
            if activation not in ("silu", "swish", "swiglu"):
                raise MapperError(f"legacy mlp-type llama with activation {activation!r} is not supported",
                                  where="config: activation", hint="mapper knows the silu llama MLP only")
            activation = "swiglu"
        elif activation == "swish":
            activation = "silu"
        if activation not in Activation.__args__:
            raise MapperError(
                f"activation {activation!r} is not supported by mapper",
                where="config: activation", hint=f"supported: {', '.join(Activation.__args__)}",
            )
        values = dict(
            num_layers=_int(get("num_layers"), "num_layers"),
            hidden_size=_int(get("hidden_size"), "hidden_size"),
            num_heads=num_heads,
            num_kv_heads=int(get("num_kv_heads", num_heads)),
            intermediate_size=get("intermediate_size"),
            expansion_factor=get("expansion_factor"),
            mlp_multiple_of=int(get("mlp_multiple_of", 1)),
            mlp_type=mlp_type,
            vocab_size=int(padded),
            orig_vocab_size=None if orig_vocab is None else int(orig_vocab),
            make_vocab_size_divisible_by=divisible_by,
            tp=tp_value,
            norm=get("norm", "layernorm"),
            layernorm_epsilon=float(get("layernorm_epsilon", 1.0e-5)),
            rms_norm_epsilon=float(get("rms_norm_epsilon", 1.0e-8)),
            use_bias_in_norms=bool(get("use_bias_in_norms", True)),
            activation=activation,
            bias_gelu_fusion=bool(get("bias_gelu_fusion", False)),
            use_bias_in_attn_linear=bool(get("use_bias_in_attn_linear", True)),
            use_bias_in_mlp=bool(get("use_bias_in_mlp", True)),
            gpt_j_residual=bool(get("gpt_j_residual", False)),
            gpt_j_tied=bool(get("gpt_j_tied", False)),
            pos_emb=get("pos_emb", "learned"),
            rotary_pct=float(get("rotary_pct", 1.0)),
            rotary_emb_base=float(get("rotary_emb_base", 10000)),
            no_weight_tying=bool(get("no_weight_tying", False)),
            seq_length=get("seq_length"),
            max_position_embeddings=get("max_position_embeddings"),
            te_mha=bool(get("te_mha", False)) or bool(get("te_fp8_mha", False)),
            te_layernorm_mlp=bool(get("te_layernorm_mlp", False)),
            te_columnparallel=bool(get("te_columnparallel", False)),
            te_rowparallel=bool(get("te_rowparallel", False)),
            precision=_precision(args),
        )
        return _validated(cls, values, where="config")

    def to_neox_yaml(self) -> dict[str, Any]:
        """The model part of a NeoX YAML, hyphenated keys as NeoX's own configs write them."""
        out: dict[str, Any] = {
            "num-layers": self.num_layers,
            "hidden-size": self.hidden_size,
            "num-attention-heads": self.num_heads,
            "model-parallel-size": self.tp,
            "norm": self.norm,
            "layernorm-epsilon": self.layernorm_epsilon,
            "rms-norm-epsilon": self.rms_norm_epsilon,
            "use-bias-in-norms": self.use_bias_in_norms,
            "activation": "silu" if self.mlp_type == "llama" else self.activation,
            "bias-gelu-fusion": self.bias_gelu_fusion,
            "use-bias-in-attn-linear": self.use_bias_in_attn_linear,
            "use-bias-in-mlp": self.use_bias_in_mlp,
            "mlp-multiple-of": self.mlp_multiple_of,
            "gpt-j-residual": self.gpt_j_residual,
            "gpt-j-tied": self.gpt_j_tied,
            "pos-emb": self.pos_emb,
            "rotary-pct": self.rotary_pct,
            "rotary-emb-base": _plain_number(self.rotary_emb_base),
            "no-weight-tying": self.no_weight_tying,
            "make-vocab-size-divisible-by": self.make_vocab_size_divisible_by,
            "padded-vocab-size": self.vocab_size,
            "te-mha": self.te_mha,
            "te-layernorm-mlp": self.te_layernorm_mlp,
            "te-columnparallel": self.te_columnparallel,
            "te-rowparallel": self.te_rowparallel,
            "precision": self.precision,
        }
        if self.is_gqa:
            out["num-kv-heads"] = self.num_kv_heads
        if self.intermediate_size is not None:
            out["intermediate-size"] = self.intermediate_size
        if self.expansion_factor is not None:
            out["expansion-factor"] = self.expansion_factor
        if self.mlp_type == "llama":
            out["mlp-type"] = "llama"
        if self.orig_vocab_size is not None:
            out["vocab-size"] = self.orig_vocab_size
        if self.seq_length is not None:
            out["seq-length"] = self.seq_length
        if self.max_position_embeddings is not None:
            out["max-position-embeddings"] = self.max_position_embeddings
        if self.precision == "fp16":
            out["fp16"] = {"enabled": True}
        elif self.precision == "bfloat16":
            out["bf16"] = {"enabled": True}
        return out

    # ---- HuggingFace -------------------------------------------------------------------------

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any], *, tp: int = 1) -> NeoXModelConfig:
        """The NeoX model (new names, no TE) that computes what an HF config.json describes."""
        model_type = config.get("model_type")
        if model_type not in ("gpt_neox", "llama"):
            raise MapperError(f"HF model_type {model_type!r} is not supported",
                              where="config.json: model_type", hint="supported: gpt_neox, llama")
        hidden = _int(config.get("hidden_size"), "hidden_size")
        heads = _int(config.get("num_attention_heads"), "num_attention_heads")
        rope = _hf_rope(config)
        vocab = _int(config.get("vocab_size"), "vocab_size")
        divisible_by = 128 if vocab % (128 * tp) == 0 else 1
        values: dict[str, Any] = dict(
            num_layers=_int(config.get("num_hidden_layers"), "num_hidden_layers"),
            hidden_size=hidden,
            num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            vocab_size=pad_vocab_size(vocab, divisible_by, tp),
            orig_vocab_size=vocab,
            make_vocab_size_divisible_by=divisible_by,
            tp=tp,
            pos_emb="rotary",
            rotary_emb_base=rope["rope_theta"],
            rotary_pct=rope["partial_rotary_factor"],
            no_weight_tying=not bool(config.get("tie_word_embeddings", False)),
            max_position_embeddings=config.get("max_position_embeddings"),
            seq_length=config.get("max_position_embeddings"),
            precision=_precision_from_dtype(config.get("dtype") or config.get("torch_dtype")),
            use_bias_in_attn_linear=bool(config.get("attention_bias", model_type == "gpt_neox")),
        )
        act = str(config.get("hidden_act", "gelu" if model_type == "gpt_neox" else "silu"))
        inter = _int(config.get("intermediate_size"), "intermediate_size")
        if model_type == "gpt_neox":
            if config.get("head_dim") not in (None, hidden // heads):
                raise MapperError("GPT-NeoX with head_dim != hidden/heads is not a NeoX model",
                                  where="config.json: head_dim", hint="NeoX derives head_dim from hidden-size / heads")
            gelu_tanh = {"gelu_pytorch_tanh", "gelu_new", "gelu_fast", "gelu_python_tanh"}
            if act in gelu_tanh:
                values.update(activation="gelu", bias_gelu_fusion=True)
            elif act in ("gelu", "relu", "silu"):
                values.update(activation=act)
            else:
                raise MapperError(f"hidden_act {act!r} has no NeoX equivalent", where="config.json: hidden_act",
                                  hint="NeoX GPT models use gelu (exact or tanh), relu or silu")
            values.update(
                norm="layernorm",
                layernorm_epsilon=float(config.get("layer_norm_eps", 1e-5)),
                gpt_j_residual=bool(config.get("use_parallel_residual", True)),
                intermediate_size=inter,
                use_bias_in_mlp=True,
            )
        else:
            head_dim = config.get("head_dim") or hidden // heads
            if head_dim != hidden // heads:
                raise MapperError(f"Llama head_dim {head_dim} != hidden_size/num_attention_heads; NeoX "
                                  "derives head_dim from them", where="config.json: head_dim",
                                  hint="only models with head_dim = hidden_size / heads have a NeoX form")
            if act != "silu":
                raise MapperError(f"Llama hidden_act {act!r}: mapper converts SwiGLU (silu) only",
                                  where="config.json: hidden_act", hint="NeoX's Llama architecture is swiglu")
            values.update(
                norm="rmsnorm",
                rms_norm_epsilon=float(config.get("rms_norm_eps", 1e-6)),
                use_bias_in_norms=False,
                activation="swiglu",
                intermediate_size=3 * inter,  # NeoX: int(3f * 2/3) = 2f rows, f = HF intermediate
                mlp_multiple_of=1,
                use_bias_in_mlp=bool(config.get("mlp_bias", False)),
            )
        return _validated(cls, values, where="config.json")

    def to_hf_config(
        self,
        arch: Literal["gpt_neox", "llama"],
        *,
        intermediate_size: int | None = None,
        vocab_size: int | None = None,
    ) -> dict[str, Any]:
        """A config.json dict for ``arch``; raises :class:`MapperError` for what HF cannot express.

        ``intermediate_size``/``vocab_size`` override the computed values (pass the tensor
        shapes: they are the truth).
        """
        self.check_hf_representable(arch)
        inter = intermediate_size if intermediate_size is not None else self.mlp_widths().out_inputs
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(self.rotary_emb_base)}
        common: dict[str, Any] = {
            "vocab_size": vocab_size if vocab_size is not None else self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "intermediate_size": inter,
            "max_position_embeddings": self.positions,
            "tie_word_embeddings": self.tied,
            "attention_bias": self.attn_has_bias,
            "dtype": {"fp32": "float32", "fp16": "float16", "bfloat16": "bfloat16"}[self.precision],
            "use_cache": True,
        }
        if arch == "gpt_neox":
            rope["partial_rotary_factor"] = float(self.rotary_pct)
            act = {"gelu": "gelu" if self.gelu_approximate == "none" else "gelu_pytorch_tanh",
                   "relu": "relu", "silu": "silu"}[self.activation]
            return {
                "architectures": ["GPTNeoXForCausalLM"],
                "model_type": "gpt_neox",
                **common,
                "hidden_act": act,
                "layer_norm_eps": self.norm_eps,
                "use_parallel_residual": self.gpt_j_residual,
                "rope_parameters": rope,
            }
        act = {"swiglu": "silu", "reglu": "relu",
               "geglu": "gelu" if self.gelu_approximate == "none" else "gelu_pytorch_tanh"}[self.activation]
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            **common,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": act,
            "rms_norm_eps": self.norm_eps,
            "mlp_bias": self.mlp_has_bias,
            "rope_parameters": rope,
        }

    def check_hf_representable(self, arch: Literal["gpt_neox", "llama"]) -> None:
        """Raise one :class:`MapperError` listing every setting ``arch`` cannot represent."""
        if arch not in ("gpt_neox", "llama"):
            raise MapperError(f"unknown HF architecture {arch!r}", hint="use gpt_neox or llama")
        problems: list[str] = []
        other = "llama" if arch == "gpt_neox" else "gpt_neox"
        if self.pos_emb != "rotary":
            problems.append(f"pos-emb {self.pos_emb!r}: HF {arch} only has rotary position embeddings")
        if self.gpt_j_tied:
            problems.append("gpt-j-tied: HF has two norms per layer; a tied NeoX layer shares one "
                            "(representable only by copying input_layernorm into post_attention_layernorm)")
        if self.te_layernorm_mlp and self.mlp_norm_eps != self.norm_eps:
            problems.append(f"TE LayerNormMLP normalizes with eps {self.mlp_norm_eps} (fixed by NeoX) but the "
                            f"other norms use {self.norm_eps}; HF has one eps for all norms")
        if arch == "gpt_neox":
            if self.is_rmsnorm:
                problems.append(f"norm {self.norm!r}: GPTNeoX uses LayerNorm (use arch llama)")
            if self.is_gated:
                problems.append(f"activation {self.activation!r} is a gated MLP: GPTNeoX's MLP is not gated")
            if self.is_gqa:
                problems.append(f"num-kv-heads {self.num_kv_heads} != heads {self.num_heads}: GPTNeoX has no GQA")
            if not self.mlp_has_bias:
                problems.append("use-bias-in-mlp false: GPTNeoX's MLP always has biases")
        else:
            if not self.is_rmsnorm:
                problems.append(f"norm {self.norm!r}: Llama uses RMSNorm (use arch gpt_neox)")
            if not self.is_gated:
                problems.append(f"activation {self.activation!r}: Llama's MLP is gated (swiglu)")
            if self.rotary_pct != 1.0:
                problems.append(f"rotary-pct {self.rotary_pct}: Llama rotates whole heads (partial rotary "
                                "is ignored by its default rope)")
            if self.gpt_j_residual:
                problems.append("gpt-j-residual: Llama layers are sequential (no parallel residual)")
        if problems:
            raise MapperError(
                f"this NeoX model cannot be represented as HF {arch}:\n"
                + "\n".join(f"  - {p}" for p in problems),
                where="config",
                hint=f"nothing was converted; fix the config if it is wrong, or try arch {other} "
                "if the model fits it",
            )


# ---- YAML loading ------------------------------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key written twice in one mapping (PyYAML keeps the last)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, yaml.Node] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            mark = key_node.start_mark
            raise MapperError(f"key {key!r} is written twice", where=f"{mark.name}:{mark.line + 1}:{mark.column + 1}",
                              hint="keep one of them")
        seen[key] = key_node
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_neox_yaml(paths: Sequence[Path | str]) -> dict[str, Any]:
    """Read and merge NeoX YAML files the way ``NeoXArgs.from_ymls`` does.

    Top-level keys are normalized to ``_`` spelling. A key present in two files (in any
    spelling) is an error, as in NeoX (whose own check only catches repeated ``_`` spellings).
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    merged: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for path in map(Path, paths):
        try:
            text = read_text(path, what="this NeoX config", error=MapperError,  # regular file, bounded size
                             hint="check the path given to --config (the YAML the model was trained with)")
        except OSError as exc:
            raise MapperError(f"cannot read NeoX config: {exc.strerror or exc}", where=path,
                              hint="check the path given to --config (the YAML the model was trained with)") from exc
        try:
            loaded = load_yaml(text, where=str(path), loader=_UniqueKeyLoader)  # aliases, nesting and size bounded
        except MapperError as exc:
            raise MapperError(exc.message, where=f"{path}:{(exc.where or '').split(':', 1)[-1]}",
                              hint=exc.hint) from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
            raise MapperError(f"not valid YAML: {getattr(exc, 'problem', exc)}", where=where,
                              hint="fix the YAML at that line, or pass another file with --config (NeoX configs are plain YAML mappings)") from exc
        if loaded is None:
            continue
        if not isinstance(loaded, dict):
            raise MapperError(f"a NeoX config must be a mapping of keys, not {type(loaded).__name__}", where=path,
                              hint="pass the model YAML (num-layers, hidden-size, ...) with --config")
        for key, value in normalize_keys(loaded, where=str(path)).items():
            if key in merged:
                raise MapperError(
                    f"key {key!r} is set in two config files ({origin[key]} and {path})",
                    where=f"{path}: {key}",
                    hint="NeoX refuses duplicate keys across files; remove one",
                )
            merged[key] = value
            origin[key] = str(path)
    return merged


def normalize_keys(raw: Mapping[str, Any], *, where: str) -> dict[str, Any]:
    """``-`` and ``_`` spell the same NeoX key; two spellings of one key is an error."""
    out: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    for key, value in raw.items():
        if not isinstance(key, str):
            raise MapperError(f"config key {key!r} is not a string", where=where, hint="quote the key or remove it")
        norm = key.replace("-", "_")
        if norm in out:
            raise MapperError(f"key {key!r} and {spelled[norm]!r} are the same NeoX key", where=f"{where}: {key}",
                              hint="keep one spelling")
        out[norm] = value
        spelled[norm] = key
    return out


def pad_vocab_size(orig: int, divisible_by: int, tp: int) -> int:
    """NeoX's ``_vocab_size_with_padding``: round up to a multiple of divisible_by × TP."""
    multiple = divisible_by * tp
    return multiple * math.ceil(orig / multiple)


# ---- helpers -----------------------------------------------------------------------------------

_UNSUPPORTED: dict[str, tuple[Any, str]] = {
    # key: (value that is fine, why anything else is refused)
    "use_qk_layernorm": (False, "QK layernorm is not modelled by mapper"),
    "use_mup": (False, "muP rescales logits and attention; not modelled by mapper"),
    "sliding_window_width": (None, "sliding-window attention is not modelled by mapper"),
    "opt_pos_emb_offset": (0, "the OPT position offset is not modelled by mapper"),
    "sequence_parallel": (False, None),
}


def _reject_unsupported(args: Mapping[str, Any]) -> None:
    for key, (fine, why) in _UNSUPPORTED.items():
        value = args.get(key)
        if why and value not in (None, fine):
            raise MapperError(f"{key.replace('_', '-')}: {value!r}: {why}", where=f"config: {key}",
                              hint="mapper cannot verify a conversion of this model")
    norm = args.get("norm") or "layernorm"
    if norm not in Norm.__args__:
        raise MapperError(f"norm {norm!r} is not supported", where="config: norm",
                          hint=f"supported: {', '.join(Norm.__args__)}")
    pos = args.get("pos_emb") or "learned"
    if pos not in PosEmb.__args__:
        raise MapperError(f"pos-emb {pos!r} is not supported (mapper computes rotary, learned, none)",
                          where="config: pos_emb", hint="HF GPT-NeoX and Llama models use rotary embeddings")
    experts = args.get("moe_num_experts") or 1
    if int(experts) > 1:
        raise MapperError("mixture-of-experts models are not supported", where="config: moe_num_experts",
                          hint="mapper converts dense GPT-NeoX and Llama-architecture models")
    attention = args.get("attention_config")
    for kind in _attention_types(attention):
        if kind not in ("global", "flash"):
            raise MapperError(f"attention type {kind!r} is not supported (only global/flash attention)",
                              where="config: attention_config",
                              hint="HF GPT-NeoX and Llama compute dense causal attention only")
    if args.get("output_layer_parallelism") not in (None, "column"):
        raise MapperError("output-layer-parallelism must be column", where="config: output_layer_parallelism",
                          hint="mapper merges the output layer as NeoX's default column-parallel layout")


def _attention_types(attention: Any) -> list[str]:
    """``[[["global"], 12]]`` -> ``["global"]``; an expanded list of strings passes through."""
    if not attention:
        return []
    kinds: list[str] = []
    for item in attention:
        if isinstance(item, str):
            kinds.append(item)
        elif isinstance(item, (list, tuple)) and item and isinstance(item[0], (list, tuple)):
            kinds.extend(str(k) for k in item[0])
    return kinds


def _precision(args: Mapping[str, Any]) -> Precision:
    """NeoX ``precision``, else the DeepSpeed ``fp16``/``bf16`` blocks' ``enabled``."""
    value = args.get("precision")
    if value is not None:
        aliases = {"fp32": "fp32", "float32": "fp32", "fp16": "fp16", "float16": "fp16",
                   "bfloat16": "bfloat16", "bf16": "bfloat16"}
        if str(value) not in aliases:
            raise MapperError(f"precision {value!r} is not one of fp16, bfloat16, fp32", where="config: precision",
                          hint="set precision to fp16, bfloat16 or fp32")
        return aliases[str(value)]  # type: ignore[return-value]
    for key, name in (("fp16", "fp16"), ("bf16", "bfloat16")):
        block = args.get(key)
        if isinstance(block, Mapping) and block.get("enabled", False):
            return name  # type: ignore[return-value]
    return "fp32"


def _precision_from_dtype(value: Any) -> Precision:
    name = str(value or "float32").removeprefix("torch.")
    return {"float16": "fp16", "bfloat16": "bfloat16"}.get(name, "fp32")  # type: ignore[return-value]


def _hf_rope(config: Mapping[str, Any]) -> dict[str, float]:
    """rope_theta and partial_rotary_factor from transformers 5 ``rope_parameters`` or older keys."""
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise MapperError(f"rope_type {kind!r}: NeoX implements plain rotary only",
                          where="config.json: rope_parameters")
    theta = rope.get("rope_theta", config.get("rope_theta", config.get("rotary_emb_base", 10000.0)))
    default_pct = 0.25 if config.get("model_type") == "gpt_neox" else 1.0  # transformers' defaults
    pct = rope.get("partial_rotary_factor",
                   config.get("partial_rotary_factor", config.get("rotary_pct", default_pct)))
    return {"rope_theta": float(theta), "partial_rotary_factor": float(pct)}


def _int(value: Any, key: str) -> int:
    if value is None:
        raise MapperError(f"required key {key!r} is missing", where=f"config: {key}",
                      hint="pass the complete model YAML with --config (several files are merged)")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise MapperError(f"{key} must be an integer, got {value!r}", where=f"config: {key}",
                          hint="write a whole number") from None


def _plain_number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def _validated(cls: type[NeoXModelConfig], values: dict[str, Any], *, where: str) -> NeoXModelConfig:
    try:
        return cls(**values)
    except ValidationError as exc:
        details = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'model'}: {e['msg']}" for e in exc.errors()
        )
        raise MapperError(f"invalid model configuration: {details}", where=where,
                          hint="fix the config (or --config / --tp) so these values agree") from None
