"""Synthetic NeoX checkpoints: every naming/TE variant, any TP, from one seed.

:func:`synthesize_neox` returns the flattened sharded state dict (``layer_XX.<name>@rankN``, see
:func:`mapper.formats.naming.neox_key`) exactly as NeoX would have saved it at ``config.tp`` ranks.

All tensors are cut from one set of *logical* (unsharded, HF-like) weights, each drawn from its
own generator seeded by ``(seed, logical name)``; vocabulary-sized matrices are drawn row by row.
So the same seed describes the same function at every TP size (only padded vocabulary rows
differ when the padded size changes). Row-parallel tensors are stored divided by
:meth:`NeoXModelConfig.row_parallel_multipliers`: under ``gpt_j_residual`` real checkpoints hold
the *same* bias on every rank and every rank adds it before the single all-reduce, so the
function's bias is TP × the stored one; a synthetic checkpoint therefore stores ``bias / TP``
(and, for TE row-parallel modules, whose outputs NeoX all-reduces twice, ``weight / TP``).

Weights are well scaled (std 1/sqrt(fan_in)), norm weights are ``1 + N(0, 0.2)`` (never exactly
1), biases ``N(0, 0.1)`` (never 0), so a double norm, a swapped half or a wrong QKV layout moves
the logits far beyond float noise.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from mapper.configs import NeoXModelConfig, pad_vocab_size
from mapper.formats.naming import neox_key
from mapper.errors import MapperError

Naming = Literal["legacy", "new"]
ExtraState = Literal["none", "empty", "fp8"]

_FP8_MAGIC = b"MAPPER-SYNTH-FP8"  # marks fake FP8 metadata; never a pickle


@dataclass(frozen=True)
class Variant:
    """A named tiny model: config overrides plus how its checkpoint is written."""

    description: str
    naming: Naming = "new"
    overrides: dict[str, Any] = field(default_factory=dict)
    extra_state: ExtraState = "empty"


_BASE: dict[str, Any] = dict(
    num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=4, orig_vocab_size=100,
    make_vocab_size_divisible_by=8, pos_emb="rotary", rotary_pct=0.25, rotary_emb_base=10000.0,
    seq_length=32, max_position_embeddings=32, precision="fp32",
)
_LLAMA: dict[str, Any] = dict(
    norm="rmsnorm", activation="swiglu", num_kv_heads=2, rotary_pct=1.0, rms_norm_epsilon=1e-6,
    use_bias_in_attn_linear=False, use_bias_in_mlp=False, use_bias_in_norms=False,
    no_weight_tying=True, intermediate_size=192,  # NeoX gated sizing: 192 -> 128 rows, 64 inputs
)
_TE_FULL = dict(te_mha=True, te_layernorm_mlp=True)
# Sliding window (gpt-neox configs/mistral): NeoX width 4, i.e. 5 keys per query, on flash attention;
# shorter than the test sequences, so the window decides the output.
_MISTRAL = dict(_LLAMA, sliding_window_width=4, attention_config=[[["flash"], 2]])

_VARIANTS: dict[str, Variant] = {
    "neox-legacy": Variant("GPT-NeoX, legacy names (dense_h_to_4h), parallel residual, untied, "
                           "exact GELU, rotary 25%", "legacy",
                           dict(gpt_j_residual=True, no_weight_tying=True)),
    "neox-new": Variant("GPT-NeoX, new names (linear1/2), sequential residual, tied, tanh GELU "
                        "(bias-gelu-fusion), rotary 50%", "new",
                        dict(bias_gelu_fusion=True, rotary_pct=0.5)),
    "neox-parallel": Variant("GPT-NeoX new names with gpt-j-residual (pair of neox-sequential)", "new",
                             dict(gpt_j_residual=True, no_weight_tying=True)),
    "neox-sequential": Variant("GPT-NeoX new names, sequential residual (pair of neox-parallel)", "new",
                               dict(gpt_j_residual=False, no_weight_tying=True)),
    "te-mha": Variant("TE MultiheadAttention (attention.qkv/proj) + NeoX MLP", "new", dict(te_mha=True)),
    "te-lnmlp": Variant("TE LayerNormMLP (mlp.layer_norm_*, fc1/fc2, tanh GELU) with the stale "
                        "post_attention_layernorm of pre-fix checkpoints", "new",
                        dict(te_layernorm_mlp=True)),
    "te-full": Variant("te_mha + te_layernorm_mlp (the configuration of gpt-neox issue #1353)", "new",
                       dict(_TE_FULL)),
    "te-full-parallel": Variant("te-full with gpt-j-residual (TE outputs all-reduced twice at TP>1)",
                                "new", dict(_TE_FULL, gpt_j_residual=True)),
    "te-linear": Variant("te_columnparallel + te_rowparallel: new names plus ._extra_state", "new",
                         dict(te_columnparallel=True, te_rowparallel=True, no_weight_tying=True)),
    "te-layernorm": Variant("te-full with norm te_layernorm (input_layernorm.norm.*)", "new",
                            dict(_TE_FULL, norm="te_layernorm")),
    "te-full-fp8": Variant("te-full with non-empty FP8 _extra_state", "new", dict(_TE_FULL), "fp8"),
    "llama-legacy": Variant("Llama architecture, legacy MLP names mlp.w1/w2/w3, GQA (4 heads, 2 kv) in the "
                            "QKV layout before gpt-neox #1315, RMSNorm as before #1345", "legacy",
                            dict(_LLAMA, mlp_type="llama", intermediate_size=64, gqa_layout="pre-1315",
                                 rmsnorm_formula="pre-1345")),
    "llama-new": Variant("Llama architecture, gated linear1 = [up; gate] per shard, GQA", "new", dict(_LLAMA)),
    "te-rmsnorm": Variant("llama-new with norm te_rmsnorm (input_layernorm.norm.weight)", "new",
                          dict(_LLAMA, norm="te_rmsnorm")),
    "llama-te": Variant("Llama architecture on TE: te_mha (per-group GQA QKV) + RMSNorm LayerNormMLP "
                        "(fc1 = [gate; up] per shard); TE forces biases", "new",
                        dict(_LLAMA, **_TE_FULL, intermediate_size=64, rms_norm_epsilon=1e-8)),
    "mistral": Variant("llama-new with sliding-window-width 4 on flash attention (HF Mistral's window of 5)",
                       "new", dict(_MISTRAL)),
    "mistral-legacy": Variant("the first gpt-neox configs/mistral: sliding window, legacy MLP names mlp.w1/w2/w3, "
                              "GQA QKV before #1315, RMSNorm before #1345", "legacy",
                              dict(_MISTRAL, mlp_type="llama", intermediate_size=64, gqa_layout="pre-1315",
                                   rmsnorm_formula="pre-1345")),
}

VARIANTS: dict[str, str] = {name: v.description for name, v in _VARIANTS.items()}

# The shipped rule set that converts each variant (what `mapper detect` must pick): one per
# architecture (and HF target) and MLP naming, whatever the TE switches.
SHIPPED_RULE_SET: dict[str, str] = {
    name: ("neox-llama-to-hf-mistral" if v.overrides.get("sliding_window_width") is not None
           else "neox-llama-legacy-to-hf-llama" if v.overrides.get("mlp_type") == "llama"
           else "neox-legacy-to-hf-gpt-neox" if v.naming == "legacy"
           else "neox-llama-to-hf-llama" if v.overrides.get("activation") == "swiglu"
           else "neox-to-hf-gpt-neox")
    for name, v in _VARIANTS.items()
}


def variant(name: str) -> Variant:
    if name not in _VARIANTS:
        raise MapperError(f"unknown synthetic variant {name!r}", hint=f"known: {', '.join(_VARIANTS)}")
    return _VARIANTS[name]


def tiny_config(variant_name: str, *, tp: int = 1, **overrides: Any) -> NeoXModelConfig:
    """The tiny config of a variant at ``tp`` ranks (vocab padded the NeoX way)."""
    values = {**_BASE, **variant(variant_name).overrides, **overrides, "tp": tp}
    if "vocab_size" not in overrides:
        values["vocab_size"] = pad_vocab_size(values["orig_vocab_size"], values["make_vocab_size_divisible_by"], tp)
    return NeoXModelConfig(**values)


def synthesize_variant(
    variant_name: str, *, tp: int = 1, seed: int = 0, dtype: torch.dtype = torch.float32,
    **config_overrides: Any,
) -> tuple[NeoXModelConfig, dict[str, torch.Tensor]]:
    """Config and checkpoint of a named variant, with the variant's naming and extra-state kind."""
    spec = variant(variant_name)
    config = tiny_config(variant_name, tp=tp, **config_overrides)
    return config, synthesize_neox(config, naming=spec.naming, seed=seed, dtype=dtype,
                                   extra_state=spec.extra_state)


# ---- logical weights ---------------------------------------------------------------------------


class _Draw:
    """Independent deterministic draws per logical tensor name."""

    def __init__(self, seed: int):
        self.seed = seed

    def generator(self, name: str) -> torch.Generator:
        return torch.Generator().manual_seed((self.seed * 1_000_003 + zlib.crc32(name.encode())) % (2**62))

    def matrix(self, name: str, rows: int, cols: int) -> torch.Tensor:
        return torch.randn(rows, cols, generator=self.generator(name)) / math.sqrt(cols)

    def vocab_rows(self, name: str, rows: int, cols: int, std: float) -> torch.Tensor:
        """Row by row, so row i is the same whatever the padded vocabulary size."""
        g = self.generator(name)
        return torch.stack([torch.randn(cols, generator=g) for _ in range(rows)]) * std

    def norm_weight(self, name: str, n: int) -> torch.Tensor:
        return 1.0 + 0.2 * torch.randn(n, generator=self.generator(name))

    def bias(self, name: str, n: int) -> torch.Tensor:
        return 0.1 * torch.randn(n, generator=self.generator(name))

    def extra_state(self, kind: ExtraState, key: str) -> torch.Tensor:
        if kind == "empty":
            return torch.empty(0, dtype=torch.uint8)
        noise = torch.randint(0, 256, (48,), generator=self.generator("extra:" + key), dtype=torch.uint8)
        return torch.cat([torch.frombuffer(bytearray(_FP8_MAGIC), dtype=torch.uint8), noise])


@dataclass
class _Norm:
    weight: torch.Tensor
    bias: torch.Tensor | None


def _norm(draw: _Draw, config: NeoXModelConfig, name: str) -> _Norm:
    n = config.hidden_size
    return _Norm(draw.norm_weight(name + ".weight", n), draw.bias(name + ".bias", n) if config.norm_has_bias else None)


def _stale_norm(config: NeoXModelConfig) -> _Norm:
    """A norm NeoX built but never used: still at its initial ones/zeros."""
    n = config.hidden_size
    return _Norm(torch.ones(n), torch.zeros(n) if config.norm_has_bias else None)


# ---- the checkpoint ----------------------------------------------------------------------------


def synthesize_neox(
    config: NeoXModelConfig,
    *,
    naming: Naming = "new",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    extra_state: ExtraState = "empty",
    stale_post_attention_norm: bool | None = None,
    rotary_inv_freq: bool = False,
) -> dict[str, torch.Tensor]:
    """The flattened sharded NeoX state dict of a random model described by ``config``.

    ``naming`` picks legacy (``dense_h_to_4h``, llama ``w1/w2/w3``) or new (``linear1/2``) MLP names
    for non-TE MLPs. ``extra_state``: no ``_extra_state`` keys, empty uint8 tensors (FP8 off), or
    non-empty fake FP8 bytes. ``stale_post_attention_norm`` (default: on for TE LayerNormMLP)
    adds the unused ones/zeros ``post_attention_layernorm`` of pre-fix TE checkpoints.
    ``rotary_inv_freq`` saves the rotary buffer (``rotary_save_freqs_buffer``).
    """
    _check_naming(config, naming)
    if stale_post_attention_norm is None:
        stale_post_attention_norm = config.te_layernorm_mlp
    draw = _Draw(seed)
    out: dict[str, torch.Tensor] = {}
    tp = config.tp

    def put(layer: int, name: str, per_rank: list[torch.Tensor] | torch.Tensor) -> None:
        for rank in range(tp):
            t = per_rank[rank] if isinstance(per_rank, list) else per_rank
            t = t if t.dtype == torch.uint8 else t.to(dtype)
            out[neox_key(layer, name, rank)] = t.clone().contiguous()

    def put_extra(layer: int, module: str) -> None:
        if extra_state == "none":
            return
        name = f"{module}._extra_state"
        put(layer, name, [draw.extra_state(extra_state, neox_key(layer, name, r)) for r in range(tp)])

    def put_norm(layer: int, prefix: str, norm: _Norm) -> None:
        if config.norm == "layernorm":
            put(layer, f"{prefix}.weight", norm.weight)
            if norm.bias is not None:
                put(layer, f"{prefix}.bias", norm.bias)
        elif config.norm == "rmsnorm":
            put(layer, f"{prefix}.scale", norm.weight)
        else:  # NeoX's TELayerNorm / TERMSNorm wrap te.pytorch.* as `.norm`
            put(layer, f"{prefix}.norm.weight", norm.weight)
            if norm.bias is not None:
                put(layer, f"{prefix}.norm.bias", norm.bias)
            put_extra(layer, f"{prefix}.norm")

    h, hd = config.hidden_size, config.head_dim
    # embeddings (layer 0)
    put(0, "word_embeddings.weight", _cols(draw.vocab_rows("embed", config.vocab_size, h, 0.3), tp))
    if config.pos_emb == "learned":
        put(0, "position_embeddings.weight", draw.vocab_rows("pos_embed", config.positions, h, 0.3))

    widths = config.mlp_widths()
    ffn = widths.out_inputs
    expected_rows = 2 * ffn if config.is_gated else ffn
    if widths.in_rows != expected_rows:
        raise MapperError(f"MLP widths {widths} do not split into halves; pick another intermediate_size")
    attn_mult = config.row_parallel_multipliers("attention")
    mlp_mult = config.row_parallel_multipliers("mlp")

    for block in range(config.num_layers):
        layer = config.block_layer_index(block)
        p = f"block{block}."
        ln1 = _norm(draw, config, p + "ln1")
        ln2 = _norm(draw, config, p + "ln2")
        put_norm(layer, "input_layernorm", ln1)

        # attention
        q = draw.matrix(p + "q", config.num_heads * hd, h)
        k = draw.matrix(p + "k", config.num_kv_heads * hd, h)
        v = draw.matrix(p + "v", config.num_kv_heads * hd, h)
        o = draw.matrix(p + "o", h, config.num_heads * hd)
        layout = "te" if config.te_mha else "neox"
        qkv_name, out_name = ("attention.qkv", "attention.proj") if config.te_mha else (
            "attention.query_key_value", "attention.dense")
        put(layer, f"{qkv_name}.weight", [_qkv_rank(config, q, k, v, r, layout) for r in range(tp)])
        if config.attn_has_bias:
            qb, kb, vb = (draw.bias(p + n, t.shape[0]) for n, t in (("qb", q), ("kb", k), ("vb", v)))
            put(layer, f"{qkv_name}.bias", [_qkv_rank(config, qb, kb, vb, r, layout) for r in range(tp)])
        put(layer, f"{out_name}.weight", [w / attn_mult.weight for w in _rows_split(o, tp)])
        if config.attn_has_bias:
            put(layer, f"{out_name}.bias", draw.bias(p + "ob", h) / attn_mult.bias)
        if config.te_mha:
            for module in ("attention.qkv", "attention.core_attention", "attention.proj"):
                put_extra(layer, module)
        else:
            if config.te_columnparallel:
                put_extra(layer, "attention.query_key_value")
            if config.te_rowparallel:
                put_extra(layer, "attention.dense")
        if rotary_inv_freq and config.pos_emb == "rotary":
            name = "attention.rotary_embeddings.inv_freq" if config.te_mha else "attention.rotary_emb.inv_freq"
            put(layer, name, rotary_inv_freq_of(config))

        # pre-MLP norm
        if config.te_layernorm_mlp:
            if stale_post_attention_norm:
                put_norm(layer, "post_attention_layernorm", _stale_norm(config))
        elif config.gpt_j_residual and config.gpt_j_tied:
            put_norm(layer, "post_attention_layernorm", _stale_norm(config))  # built, never used
        else:
            put_norm(layer, "post_attention_layernorm", ln2)

        # MLP
        bias = config.mlp_has_bias
        down = draw.matrix(p + "down", h, ffn)
        down_b = draw.bias(p + "down_b", h) if bias else None
        if config.is_gated:
            gate, up = draw.matrix(p + "gate", ffn, h), draw.matrix(p + "up", ffn, h)
            gate_b = draw.bias(p + "gate_b", ffn) if bias else None
            up_b = draw.bias(p + "up_b", ffn) if bias else None
        else:
            gate = gate_b = None
            up, up_b = draw.matrix(p + "up", ffn, h), (draw.bias(p + "up_b", ffn) if bias else None)
        down_shards = [w / mlp_mult.weight for w in _rows_split(down, tp)]
        down_bias = None if down_b is None else down_b / mlp_mult.bias

        if config.te_layernorm_mlp:
            put(layer, "mlp.layer_norm_weight", ln2.weight)
            if config.norm_family == "layernorm":
                put(layer, "mlp.layer_norm_bias", ln2.bias if ln2.bias is not None else _norm_bias(draw, config, p))
            # TE: silu/gelu(first half) * second half, per shard -> [gate; up]
            put(layer, "mlp.fc1_weight", _fc1(gate, up, tp, gate_first=True))
            put(layer, "mlp.fc1_bias", _fc1(gate_b, up_b, tp, gate_first=True))
            put(layer, "mlp.fc2_weight", down_shards)
            put(layer, "mlp.fc2_bias", down_bias)
            put_extra(layer, "mlp")
        elif config.mlp_type == "llama":  # legacy LLaMAParallelMLP: w2(act(w1 x) * w3 x), no biases
            put(layer, "mlp.w1.weight", _cols(gate, tp))
            put(layer, "mlp.w3.weight", _cols(up, tp))
            put(layer, "mlp.w2.weight", down_shards)
        else:
            in_name, out_name = ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h") if naming == "legacy" else (
                "mlp.linear1", "mlp.linear2")
            # NeoX Gated_Activation: x, gate = chunk(2) -> [up; gate] per shard
            put(layer, f"{in_name}.weight", _fc1(gate, up, tp, gate_first=False))
            if bias:
                put(layer, f"{in_name}.bias", _fc1(gate_b, up_b, tp, gate_first=False))
            put(layer, f"{out_name}.weight", down_shards)
            if bias:
                put(layer, f"{out_name}.bias", down_bias)
            if config.te_columnparallel:
                put_extra(layer, "mlp.linear1")
            if config.te_rowparallel:
                put_extra(layer, "mlp.linear2")

    put_norm(config.final_norm_layer_index, "norm", _norm(draw, config, "final_norm"))
    if not config.tied:
        layer = config.final_linear_layer_index
        put(layer, "final_linear.weight", _cols(draw.vocab_rows("lm_head", config.vocab_size, h, h**-0.5), tp))
        if config.te_columnparallel:
            put_extra(layer, "final_linear")
    return out


def rotary_inv_freq_of(config: NeoXModelConfig) -> torch.Tensor:
    """NeoX RotaryEmbedding's buffer: 1 / base^(arange(0, dim, 2) / dim), dim = rotary_ndims."""
    dim = config.rotary_ndims
    return 1.0 / (config.rotary_emb_base ** (torch.arange(0, dim, 2).float() / dim))


def fp8_extra_state_is_synthetic(tensor: torch.Tensor) -> bool:
    """True for the fake FP8 metadata this module writes (so tests can tell it from real pickles)."""
    return bytes(tensor[: len(_FP8_MAGIC)].tolist()) == _FP8_MAGIC


# ---- sharding helpers --------------------------------------------------------------------------


def _check_naming(config: NeoXModelConfig, naming: Naming) -> None:
    if naming not in ("legacy", "new"):
        raise MapperError(f"naming must be 'legacy' or 'new', not {naming!r}")
    if naming == "legacy" and (config.te_columnparallel or config.te_rowparallel):
        raise MapperError("te_columnparallel/te_rowparallel exist only with the new (linear1/2) names")
    if naming == "legacy" and config.is_gated and config.mlp_type != "llama" and not config.te_layernorm_mlp:
        raise MapperError("legacy names had no gated MLP except mlp-type llama (w1/w2/w3); use naming 'new'")
    if naming == "new" and config.mlp_type == "llama":
        raise MapperError("mlp-type llama (w1/w2/w3) is the legacy naming; use naming 'legacy'")


def _cols(t: torch.Tensor, tp: int) -> list[torch.Tensor]:
    """Column-parallel: split rows (output features) over ranks."""
    return list(t.chunk(tp, dim=0))


def _rows_split(t: torch.Tensor, tp: int) -> list[torch.Tensor]:
    """Row-parallel weight: split input features (dim 1) over ranks."""
    return list(t.chunk(tp, dim=1))


def _fc1(gate: torch.Tensor | None, up: torch.Tensor | None, tp: int, *, gate_first: bool) -> list[torch.Tensor]:
    """MLP-in shards: the plain matrix, or per shard [gate_r; up_r] (TE) / [up_r; gate_r] (NeoX)."""
    assert up is not None
    if gate is None:
        return _cols(up, tp)
    pairs = zip(_cols(gate, tp), _cols(up, tp))
    return [torch.cat([g, u] if gate_first else [u, g]) for g, u in pairs]


def _qkv_rank(config: NeoXModelConfig, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rank: int,
              layout: Literal["neox", "te"]) -> torch.Tensor:
    """Rank ``rank``'s fused QKV rows (weight or bias) in NeoX's or TE's layout.

    NeoX MHA: ``[heads_r, 3, hd]``; NeoX GQA: ``[Q_r | K_r | V_r]`` blocks (transformer.py
    gqa_project), before gpt-neox #1315 per query head ``[q_h | K rows h*f.. | V rows h*f..]``
    (``f = hd * kv / heads``); TE: per kv group ``[its q heads, k, v]`` (multi_head_attention.py,
    qkv_weight_interleaved=True), which for MHA is again ``[heads_r, 3, hd]``.
    """
    tp, hd = config.tp, config.head_dim
    nq, nkv = config.num_heads // tp, config.num_kv_heads // tp
    rest = q.shape[1:]
    qr = q.reshape(config.num_heads, hd, *rest)[rank * nq:(rank + 1) * nq]
    kr = k.reshape(config.num_kv_heads, hd, *rest)[rank * nkv:(rank + 1) * nkv]
    vr = v.reshape(config.num_kv_heads, hd, *rest)[rank * nkv:(rank + 1) * nkv]
    if layout == "te":
        per = nq // nkv
        groups = [torch.cat([qr[g * per:(g + 1) * per], kr[g:g + 1], vr[g:g + 1]]) for g in range(nkv)]
        return torch.cat(groups).reshape(-1, *rest)
    if not config.is_gqa:
        return torch.stack([qr, kr, vr], dim=1).reshape(-1, *rest)
    if config.gqa_layout == "pre-1315":
        f = hd * config.num_kv_heads // config.num_heads
        ks, vs = kr.reshape(nq, f, *rest), vr.reshape(nq, f, *rest)
        return torch.cat([qr, ks, vs], dim=1).reshape(-1, *rest)
    return torch.cat([qr.reshape(-1, *rest), kr.reshape(-1, *rest), vr.reshape(-1, *rest)])


def _norm_bias(draw: _Draw, config: NeoXModelConfig, prefix: str) -> torch.Tensor:
    return draw.bias(prefix + "ln2.bias", config.hidden_size)
