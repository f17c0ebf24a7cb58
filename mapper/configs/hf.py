"""HF ``config.json`` out of a :class:`NeoXModelConfig`, and back; one :class:`HFTarget` per HF architecture.

A target says what its HF model can compute (norm family, gated MLP, GQA, parallel residual,
partial rotary, which biases, a sliding window) and which ``config.json`` fields it has beyond the
ones every target shares (those are declared on the model fields themselves,
:mod:`mapper.configs.settings`). From that:

- :func:`check_representable` refuses, before any tensor is read, what the target cannot express;
- :func:`approximations` lists what it expresses only approximately (a small, measured numerical
  difference: converted, recorded in ``mapper/record.json``, refused with ``--strict``);
- :func:`hf_config` writes ``config.json``; :func:`model_from_hf_config` reads one back.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from mapper.configs.model import NeoXModelConfig
from mapper.configs.neox_yaml import pad_vocab_size, validated
from mapper.configs.settings import nested_get, nested_set, settings
from mapper.dtypes import dtype_name, precision_of
from mapper.errors import MapperError


@dataclass(frozen=True)
class HFTarget:
    """One HF architecture mapper converts to, described declaratively.

    ``fields`` maps the target's own ``config.json`` fields to the :class:`NeoXModelConfig` field
    holding the same value (both directions); ``shapes`` reads fields off the converted tensors
    (``config.json`` field -> (tensor key, dimension)): the tensors are the truth for the MLP width
    and the (possibly trimmed) vocabulary; ``defaults`` are transformers' defaults for fields a
    ``config.json`` may leave out. ``attention_bias`` / ``mlp_bias`` say whether its modules can
    have biases (``"optional"``: a ``config.json`` field says; ``"always"``, ``"never"``: fixed by
    its code). ``sliding_window`` targets (Mistral) attend to a window of the last
    ``sliding_window`` keys -- NeoX's ``sliding_window_width`` + 1, as NeoX's window excludes the
    query's own key -- and represent only models with one; the others attend to every earlier key.
    """

    arch: str  # config.json model_type
    architecture: str  # config.json architectures[0]
    rules_target: str  # the `target` of the rule sets converting to it
    norm: Literal["layernorm", "rmsnorm"]
    gated_mlp: bool
    gqa: bool
    parallel_residual: bool
    partial_rotary: bool
    attention_bias: Literal["optional", "never"] = "optional"
    mlp_bias: Literal["always", "optional", "never"] = "optional"
    sliding_window: bool = False
    fields: Mapping[str, str] = field(default_factory=dict)
    shapes: Mapping[str, tuple[str, int]] = field(default_factory=dict)
    defaults: Mapping[str, Any] = field(default_factory=dict)


TARGETS: dict[str, HFTarget] = {
    "gpt_neox": HFTarget(
        arch="gpt_neox", architecture="GPTNeoXForCausalLM", rules_target="hf-gpt-neox", norm="layernorm",
        gated_mlp=False, gqa=False, parallel_residual=True, partial_rotary=True, mlp_bias="always",
        fields={"layer_norm_eps": "layernorm_epsilon", "use_parallel_residual": "gpt_j_residual",
                "rope_parameters.partial_rotary_factor": "rotary_pct"},
        shapes={"intermediate_size": ("gpt_neox.layers.0.mlp.dense_4h_to_h.weight", 1),
                "vocab_size": ("gpt_neox.embed_in.weight", 0)},
        defaults={"layer_norm_eps": 1e-5, "use_parallel_residual": True, "hidden_act": "gelu",
                  "partial_rotary_factor": 0.25, "tie_word_embeddings": False, "attention_bias": True},
    ),
    "llama": HFTarget(
        arch="llama", architecture="LlamaForCausalLM", rules_target="hf-llama", norm="rmsnorm",
        gated_mlp=True, gqa=True, parallel_residual=False, partial_rotary=False,
        fields={"num_key_value_heads": "num_kv_heads", "rms_norm_eps": "rms_norm_epsilon"},
        shapes={"intermediate_size": ("model.layers.0.mlp.down_proj.weight", 1),
                "vocab_size": ("model.embed_tokens.weight", 0)},
        defaults={"rms_norm_eps": 1e-6, "hidden_act": "silu", "partial_rotary_factor": 1.0,
                  "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False},
    ),
    "mistral": HFTarget(
        arch="mistral", architecture="MistralForCausalLM", rules_target="hf-mistral", norm="rmsnorm",
        gated_mlp=True, gqa=True, parallel_residual=False, partial_rotary=False,
        attention_bias="never", mlp_bias="never", sliding_window=True,
        fields={"num_key_value_heads": "num_kv_heads", "rms_norm_eps": "rms_norm_epsilon"},
        shapes={"intermediate_size": ("model.layers.0.mlp.down_proj.weight", 1),
                "vocab_size": ("model.embed_tokens.weight", 0)},
        defaults={"rms_norm_eps": 1e-6, "hidden_act": "silu", "partial_rotary_factor": 1.0,
                  "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False, "sliding_window": 4096},
    ),
}
TARGET_OF_RULES = {t.rules_target: t for t in TARGETS.values()}


def target(arch: str) -> HFTarget:
    if arch not in TARGETS:
        raise MapperError(f"HF model_type {arch!r} is not supported", where="config.json: model_type",
                          hint=f"supported: {', '.join(TARGETS)}")
    return TARGETS[arch]


class Approximation(BaseModel):
    """A setting HF expresses only approximately: converted with the closest HF value, recorded."""

    model_config = ConfigDict(frozen=True)

    setting: str
    neox: str  # what NeoX computes
    hf: str  # what the HF model computes instead
    effect: str  # expected size of the difference, for people


def approximations(model: NeoXModelConfig, arch: str | None = None) -> list[Approximation]:
    """What HF (``arch``, or any target: every one has a single norm eps and HF's RMSNorm) can only
    approximate in ``model`` (empty: the conversion is exact)."""
    found = []
    if model.te_layernorm_mlp and model.mlp_norm_eps != model.norm_eps:
        found.append(Approximation(
            setting="post_attention_layernorm eps",
            neox=f"TE LayerNormMLP normalizes with eps {model.mlp_norm_eps} (fixed by NeoX's wrapper, "
            f"whatever {'rms-norm-epsilon' if model.is_rmsnorm else 'layernorm-epsilon'} says)",
            hf=f"one eps for every norm: {model.norm_eps}, the config's",
            effect="~1e-5 relative on the logits of a random model; `mapper verify` measures it",
        ))
    width = model.sliding_window_width
    if width is not None and model.effective_sliding_window is None:  # global attention (TE's is refused)
        found.append(Approximation(
            setting="sliding-window-width with global attention",
            neox=f"no window at inference: gpt-neox's global attention ignores sliding-window-width {width} "
            "(only its flash attention applies it); its training mask did apply the window (each token "
            f"attending to the {width + 1} last) wherever the unfused softmax ran: fp32, sequences over 2048 "
            "tokens, or without the upper-triangular fused softmax",
            hf="full causal attention, as gpt-neox's inference",
            effect=f"none on sequences of at most {width + 1} tokens; if the model learned the window, longer "
            "sequences see more than it was trained on (if it was trained with the window, set attention-config "
            "to flash in the config: it then converts with the window)",
        ))
    if model.norm == "rmsnorm" and model.rmsnorm_formula == "pre-1345":
        found.append(Approximation(
            setting="RMSNorm formula",
            neox="x / (rms(x) + eps) (gpt-neox before #1345, 2025-05-09)",
            hf="x * rsqrt(mean(x^2) + eps)",
            effect=f"relative difference about eps/rms(x) (eps {model.norm_eps}); `mapper verify` measures it",
        ))
    return found


def check_representable(model: NeoXModelConfig, arch: str, *, strict: bool = False) -> None:
    """Raise one MapperError listing every setting ``arch`` cannot represent (with ``strict``, also
    every approximation)."""
    problems = representation_problems(model, arch, strict=strict)
    if problems:
        others = [a for a in TARGETS if a != arch]
        raise MapperError(
            f"this NeoX model cannot be represented as HF {arch}:\n" + "\n".join(f"  - {p}" for p in problems),
            where="config",
            hint="nothing was converted; fix the config if it is wrong"
            + (f", or try {' / '.join(others)} if the model fits it" if others else ""),
        )


def representation_problems(model: NeoXModelConfig, arch: str, *, strict: bool = False) -> list[str]:
    """Every setting of ``model`` HF ``arch`` cannot represent (with ``strict``, also every approximation).
    Detection ranks rule sets that fit the same keys but convert to different targets (Llama or
    Mistral) by it."""
    spec = target(arch)
    problems: list[str] = []
    if model.pos_emb != "rotary":
        problems.append(f"pos-emb {model.pos_emb!r}: HF {arch} only has rotary position embeddings")
    if model.gpt_j_tied:
        problems.append("gpt-j-tied: HF has two norms per layer; a tied NeoX layer shares one "
                        "(representable only by copying input_layernorm into post_attention_layernorm)")
    if model.norm_family != spec.norm:
        problems.append(f"norm {model.norm!r}: HF {arch} uses {'LayerNorm' if spec.norm == 'layernorm' else 'RMSNorm'}")
    if model.is_gated and not spec.gated_mlp:
        problems.append(f"activation {model.activation!r} is a gated MLP: HF {arch}'s MLP is not gated")
    if not model.is_gated and spec.gated_mlp:
        problems.append(f"activation {model.activation!r}: HF {arch}'s MLP is gated (swiglu)")
    if spec.gated_mlp and model.is_gated and model.activation != "swiglu":
        problems.append(f"activation {model.activation!r}: HF {arch} computes SwiGLU (silu) only")
    if model.is_gqa and not spec.gqa:
        problems.append(f"num-kv-heads {model.num_kv_heads} != heads {model.num_heads}: HF {arch} has no GQA")
    if spec.mlp_bias == "always" and not model.mlp_has_bias:
        problems.append(f"use-bias-in-mlp false: HF {arch}'s MLP always has biases")
    if spec.mlp_bias == "never" and model.mlp_has_bias:
        why = "TE LayerNormMLP always has them" if model.te_layernorm_mlp else "use-bias-in-mlp true"
        problems.append(f"MLP biases ({why}): HF {arch}'s MLP has none")
    if spec.attention_bias == "never" and model.attn_has_bias:
        why = "TE attention always has them" if model.te_mha else "use-bias-in-attn-linear true"
        problems.append(f"attention biases ({why}): HF {arch}'s attention has none")
    window = model.effective_sliding_window
    if window is not None and not spec.sliding_window:
        windowed = [t.arch for t in TARGETS.values() if t.sliding_window]
        problems.append(f"sliding-window-width {window} with flash attention: HF {arch} attends to every earlier "
                        f"token (HF {' / '.join(windowed)} has a sliding window)")
    if window is None and spec.sliding_window:
        why = ("sliding-window-width unset" if model.sliding_window_width is None
               else "sliding-window-width on global attention, which gpt-neox runs without the window")
        dense = [t.arch for t in TARGETS.values() if not t.sliding_window and t.gated_mlp == spec.gated_mlp]
        problems.append(f"no sliding window ({why}): HF {arch} is for sliding-window attention; without one "
                        f"the model is HF {' / '.join(dense)}")
    if not spec.partial_rotary and model.rotary_pct != 1.0:
        problems.append(f"rotary-pct {model.rotary_pct}: HF {arch} rotates whole heads (partial rotary "
                        "is ignored by its default rope)")
    if model.gpt_j_residual and not spec.parallel_residual:
        problems.append(f"gpt-j-residual: HF {arch} layers are sequential (no parallel residual)")
    if strict:
        problems += [f"{a.setting} (--strict refuses approximations): NeoX computes {a.neox}; HF would compute {a.hf}"
                     for a in approximations(model, arch)]
    return problems


def hf_activation(model: NeoXModelConfig) -> str:
    """HF ``hidden_act``: the exact or tanh GELU as NeoX/TE compute it; SwiGLU's gate is silu."""
    gelu = "gelu" if model.gelu_approximate == "none" else "gelu_pytorch_tanh"
    return {"gelu": gelu, "geglu": gelu, "relu": "relu", "reglu": "relu", "silu": "silu", "swiglu": "silu"}[model.activation]


def hf_config(model: NeoXModelConfig, arch: str, *, shapes: Mapping[str, tuple[int, ...]] | None = None,
              strict: bool = False) -> dict[str, Any]:
    """``config.json`` for ``arch``; raises MapperError for what HF cannot express.

    ``shapes`` (the converted tensors' key -> shape) gives the fields the target reads off them
    (:attr:`HFTarget.shapes`); without, they are computed from the model.
    """
    check_representable(model, arch, strict=strict)
    spec = target(arch)
    config: dict[str, Any] = {"architectures": [spec.architecture], "model_type": spec.arch}
    for name, marker in settings(NeoXModelConfig):
        if marker.hf is not None:
            value = getattr(model, name)
            nested_set(config, marker.hf, (not value) if marker.negate else value)
    for hf_name, name in spec.fields.items():
        nested_set(config, hf_name, getattr(model, name))
    rope = config.setdefault("rope_parameters", {})
    rope["rope_type"] = "default"
    rope["rope_theta"] = float(model.rotary_emb_base)
    if "partial_rotary_factor" in rope:
        rope["partial_rotary_factor"] = float(rope["partial_rotary_factor"])
    config.update(
        vocab_size=model.vocab_size,
        intermediate_size=model.mlp_widths().out_inputs,
        max_position_embeddings=model.positions,
        hidden_act=hf_activation(model),
        dtype=dtype_name(model.dtype),
        use_cache=True,
    )
    if spec.attention_bias == "optional":
        config["attention_bias"] = model.attn_has_bias
    if spec.gated_mlp:
        config["head_dim"] = model.head_dim
    if spec.mlp_bias == "optional":
        config["mlp_bias"] = model.mlp_has_bias
    if spec.sliding_window and model.effective_sliding_window is not None:
        # NeoX's width W excludes the query's own key (flash-attn window_size=(W, -1): keys i-W..i);
        # HF's sliding_window counts every key attended to (masking_utils: kv_idx > q_idx - sliding_window)
        config["sliding_window"] = model.effective_sliding_window + 1
    for name, (key, dim) in spec.shapes.items():
        if shapes is not None and key in shapes:
            config[name] = int(shapes[key][dim])
    return config


# ---- HF config.json -> model ------------------------------------------------------------------


def model_from_hf_config(config: Mapping[str, Any], *, tp: int = 1) -> NeoXModelConfig:
    """The NeoX model (current names, no TE) that computes what an HF ``config.json`` describes."""
    if not isinstance(config, Mapping):
        raise MapperError("config.json is not a JSON object", where="config.json", hint="fix or regenerate it")
    spec = target(str(config.get("model_type")))
    values: dict[str, Any] = {}
    for name, marker in settings(NeoXModelConfig):
        if marker.hf is not None and (found := nested_get(config, marker.hf)) is not None:
            values[name] = (not found) if marker.negate and isinstance(found, bool) else found
    for hf_name, name in spec.fields.items():
        found = nested_get(config, hf_name)
        if found is None:
            found = config.get(hf_name.rsplit(".", 1)[-1])  # older files keep rope fields at the top
        if found is not None:
            values[name] = found
    _required(config, ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size", "intermediate_size"))
    rope = _hf_rope(config, spec)
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    if "tie_word_embeddings" not in config:
        values["no_weight_tying"] = not spec.defaults.get("tie_word_embeddings", False)
    vocab = config["vocab_size"]
    neox_default = NeoXModelConfig.default("make_vocab_size_divisible_by")  # what NeoX would have padded to
    divisible_by = neox_default if isinstance(vocab, int) and vocab % (neox_default * tp) == 0 else 1
    values.update(
        vocab_size=pad_vocab_size(vocab, divisible_by, tp) if isinstance(vocab, int) else vocab,
        orig_vocab_size=vocab,
        make_vocab_size_divisible_by=divisible_by,
        tp=tp,
        pos_emb="rotary",
        rotary_emb_base=rope["rope_theta"],
        rotary_pct=rope["partial_rotary_factor"],
        max_position_embeddings=config.get("max_position_embeddings"),
        seq_length=config.get("max_position_embeddings"),
        precision=_precision_from_dtype(config.get("dtype") or config.get("torch_dtype")),
        use_bias_in_attn_linear=(config.get("attention_bias", spec.defaults.get("attention_bias", False))
                                 if spec.attention_bias == "optional" else False),
    )
    if spec.sliding_window:
        values.update(_hf_sliding_window(config, spec))
    values.setdefault("num_kv_heads", heads)
    act = config.get("hidden_act", spec.defaults.get("hidden_act"))
    inter = config["intermediate_size"]
    head_dim = config.get("head_dim")
    if head_dim is not None and isinstance(hidden, int) and isinstance(heads, int) and heads and head_dim != hidden // heads:
        raise MapperError(f"head_dim {head_dim} != hidden_size / num_attention_heads; NeoX derives head_dim "
                          "from them", where="config.json: head_dim",
                          hint="only models with head_dim = hidden_size / heads have a NeoX form")
    if spec.gated_mlp:
        if act != "silu":
            raise MapperError(f"{spec.arch} hidden_act {act!r}: mapper converts SwiGLU (silu) only",
                              where="config.json: hidden_act", hint="NeoX's Llama architecture is swiglu")
        values.setdefault("rms_norm_epsilon", spec.defaults.get("rms_norm_eps"))
        values.update(
            norm="rmsnorm", use_bias_in_norms=False, activation="swiglu", mlp_multiple_of=1,
            intermediate_size=3 * inter if isinstance(inter, int) else inter,  # NeoX: int(3f*2/3) = 2f rows
            use_bias_in_mlp=(config.get("mlp_bias", spec.defaults.get("mlp_bias", False))
                             if spec.mlp_bias == "optional" else spec.mlp_bias == "always"),
        )
    else:
        gelu_tanh = {"gelu_pytorch_tanh", "gelu_new", "gelu_fast", "gelu_python_tanh"}
        if act in gelu_tanh:
            values.update(activation="gelu", bias_gelu_fusion=True)
        elif act in ("gelu", "relu", "silu"):
            values.update(activation=act)
        else:
            raise MapperError(f"hidden_act {act!r} has no NeoX equivalent", where="config.json: hidden_act",
                              hint="NeoX GPT models use gelu (exact or tanh), relu or silu")
        values.setdefault("layernorm_epsilon", spec.defaults.get("layer_norm_eps"))
        values.setdefault("gpt_j_residual", spec.defaults.get("use_parallel_residual"))
        values.update(norm="layernorm", intermediate_size=inter, use_bias_in_mlp=True)
    return validated(values, where="config.json", names=_hf_names(spec))


def _required(config: Mapping[str, Any], keys: tuple[str, ...]) -> None:
    missing = [k for k in keys if config.get(k) is None]
    if missing:
        raise MapperError(f"config.json lacks {', '.join(missing)}", where="config.json",
                          hint="an HF config.json names the model's sizes; regenerate it with transformers")


def _hf_sliding_window(config: Mapping[str, Any], spec: HFTarget) -> dict[str, Any]:
    """NeoX settings for HF ``sliding_window`` (None: full attention): width = window - 1, on flash
    attention (the NeoX path that applies it)."""
    window = config.get("sliding_window", spec.defaults.get("sliding_window"))
    if window is None:
        return {}
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise MapperError(f"sliding_window must be a positive integer or null, got {window!r}",
                          where="config.json: sliding_window", hint="fix config.json (the keys each token attends to)")
    layers = config.get("num_hidden_layers")
    return {"sliding_window_width": window - 1,
            "attention_config": [[["flash"], layers if isinstance(layers, int) else 1]]}


def _hf_names(spec: HFTarget) -> dict[str, str]:
    """Model field -> the config.json field it came from, for error messages."""
    names = {name: marker.hf for name, marker in settings(NeoXModelConfig) if marker.hf}
    names.update({name: hf for hf, name in spec.fields.items()})
    if spec.sliding_window:
        names.update(sliding_window_width="sliding_window")
    names.update(rotary_emb_base="rope_parameters.rope_theta", rotary_pct="rope_parameters.partial_rotary_factor",
                 intermediate_size="intermediate_size", orig_vocab_size="vocab_size")
    return names


def _precision_from_dtype(value: Any) -> str:
    return precision_of(str(value or "float32")) or "fp32"


def _hf_rope(config: Mapping[str, Any], spec: HFTarget) -> dict[str, Any]:
    """rope_theta and partial_rotary_factor from transformers 5 ``rope_parameters`` or older keys."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if not isinstance(rope, Mapping):
        raise MapperError("rope_parameters must be a JSON object", where="config.json: rope_parameters",
                          hint="regenerate config.json with transformers")
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise MapperError(f"rope_type {kind!r}: NeoX implements plain rotary only",
                          where="config.json: rope_parameters", hint="mapper converts models with default rotary only")
    theta = rope.get("rope_theta", config.get("rope_theta", config.get("rotary_emb_base", NeoXModelConfig.default("rotary_emb_base"))))
    pct = rope.get("partial_rotary_factor", config.get("partial_rotary_factor",
                                                       config.get("rotary_pct", spec.defaults.get("partial_rotary_factor"))))
    return {"rope_theta": float(theta) if isinstance(theta, int) and not isinstance(theta, bool) else theta,
            "partial_rotary_factor": float(pct) if isinstance(pct, int) and not isinstance(pct, bool) else pct}
