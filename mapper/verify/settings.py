"""Settings a probe cannot see well: the HF ``config.json`` field by field against the NeoX config.

An eps of 1e-5 instead of 1e-6, a GELU approximation, a rotary base: each changes the converted
model by less than a mapping mistake does, some only on inputs of a particular scale. What the HF
model should say is known exactly -- :meth:`NeoXModelConfig.to_hf_config` translates the NeoX
config -- so each such field is compared with it, and a difference is a failure naming the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from mapper.configs import NeoXModelConfig
from mapper.errors import MapperError

Arch = Literal["gpt_neox", "llama"]


@dataclass(frozen=True)
class SettingCheck:
    """One config.json field: what it says, what the NeoX config translates to."""

    field: str
    hf: Any
    expected: Any
    ok: bool
    meaning: str


# field -> (architectures it exists in, what it decides)
FIELDS: dict[str, tuple[tuple[str, ...], str]] = {
    "hidden_size": (("gpt_neox", "llama"), "model width"),
    "num_hidden_layers": (("gpt_neox", "llama"), "number of blocks"),
    "num_attention_heads": (("gpt_neox", "llama"), "query heads"),
    "num_key_value_heads": (("llama",), "key/value heads (GQA)"),
    "hidden_act": (("gpt_neox", "llama"), "MLP activation (gelu exact vs gelu_pytorch_tanh)"),
    "layer_norm_eps": (("gpt_neox",), "norm epsilon (NeoX layernorm-epsilon)"),
    "rms_norm_eps": (("llama",), "norm epsilon (NeoX rms-norm-epsilon)"),
    "rope_theta": (("gpt_neox", "llama"), "rotary base (NeoX rotary-emb-base)"),
    "partial_rotary_factor": (("gpt_neox",), "rotated fraction of each head (NeoX rotary-pct)"),
    "use_parallel_residual": (("gpt_neox",), "residual wiring (NeoX gpt-j-residual)"),
    "tie_word_embeddings": (("gpt_neox", "llama"), "output layer = word embeddings (NeoX no-weight-tying)"),
    "attention_bias": (("gpt_neox", "llama"), "attention biases"),
    "mlp_bias": (("llama",), "MLP biases"),
}


def hf_rope(config: dict[str, Any]) -> dict[str, float]:
    """``rope_theta`` and ``partial_rotary_factor`` from ``rope_parameters`` (transformers 5) or the
    older top-level keys, with transformers' defaults."""
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    theta = rope.get("rope_theta", config.get("rope_theta", config.get("rotary_emb_base", 10000.0)))
    default_pct = 0.25 if config.get("model_type") == "gpt_neox" else 1.0
    pct = rope.get("partial_rotary_factor", config.get("partial_rotary_factor", config.get("rotary_pct", default_pct)))
    return {"rope_theta": float(theta), "partial_rotary_factor": float(pct)}


def _value(config: dict[str, Any], field: str) -> Any:
    if field in ("rope_theta", "partial_rotary_factor"):
        return hf_rope(config)[field]
    if field == "num_key_value_heads":
        return config.get(field) or config.get("num_attention_heads")
    if field == "attention_bias" and config.get("model_type") == "gpt_neox":
        return config.get(field, True)
    return config.get(field)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
    return a == b


def check_settings(hf_config: dict[str, Any], model: NeoXModelConfig) -> list[SettingCheck]:
    """Every semantic field of ``hf_config`` against the translation of ``model``; also the
    vocabulary (between the tokenizer's and the padded size) and whether HF can express the model."""
    arch: Arch = "llama" if hf_config.get("model_type") == "llama" else "gpt_neox"
    checks: list[SettingCheck] = []
    try:
        expected = model.to_hf_config(arch)
        # the tensors decide these two; they are checked below against the model's bounds
        expected.update(intermediate_size=hf_config.get("intermediate_size"), vocab_size=hf_config.get("vocab_size"))
    except MapperError as error:
        return [SettingCheck("model", arch, None, False, f"HF {arch} cannot express this NeoX model: {error.message}")]
    for field, (archs, meaning) in FIELDS.items():
        if arch not in archs:
            continue
        hf, want = _value(hf_config, field), _value(expected, field)
        checks.append(SettingCheck(field, hf, want, _same(hf, want), meaning))
    vocab = hf_config.get("vocab_size")
    low = model.orig_vocab_size or 1
    fits = isinstance(vocab, int) and min(low, model.vocab_size) <= vocab <= model.vocab_size
    checks.append(SettingCheck("vocab_size", vocab, f"{min(low, model.vocab_size)}..{model.vocab_size}", fits,
                               "vocabulary rows (NeoX's padded size, or trimmed to the tokenizer's)"))
    return checks
