"""Settings a probe cannot see well: the HF ``config.json`` field by field against the NeoX config.

An eps of 1e-5 instead of 1e-6, a GELU approximation, a rotary base: each changes the converted
model by less than a mapping mistake does, some only on inputs of a particular scale. What the HF
model should say is known exactly -- :meth:`NeoXModelConfig.to_hf_config` translates the NeoX
config -- so each such field is compared with it, and a difference is a failure naming the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from mapper.configs import TARGETS, NeoXModelConfig
from mapper.errors import MapperError


@dataclass(frozen=True)
class SettingCheck:
    """One config.json field: what it says, what the NeoX config translates to."""

    field: str
    hf: Any
    expected: Any
    ok: bool
    meaning: str


# field -> what it decides; a field is checked where the target's translation writes it
# (mapper.configs.hf: the shared fields, the target's own, rope_parameters)
FIELDS: dict[str, str] = {
    "hidden_size": "model width",
    "num_hidden_layers": "number of blocks",
    "num_attention_heads": "query heads",
    "num_key_value_heads": "key/value heads (GQA)",
    "hidden_act": "MLP activation (gelu exact vs gelu_pytorch_tanh)",
    "layer_norm_eps": "norm epsilon (NeoX layernorm-epsilon)",
    "rms_norm_eps": "norm epsilon (NeoX rms-norm-epsilon)",
    "rope_theta": "rotary base (NeoX rotary-emb-base)",
    "partial_rotary_factor": "rotated fraction of each head (NeoX rotary-pct)",
    "use_parallel_residual": "residual wiring (NeoX gpt-j-residual)",
    "tie_word_embeddings": "output layer = word embeddings (NeoX no-weight-tying)",
    "attention_bias": "attention biases",
    "mlp_bias": "MLP biases",
    "sliding_window": "keys each token attends to (NeoX sliding-window-width + 1, on flash attention)",
}
_ROPE = ("rope_theta", "partial_rotary_factor")


def hf_rope(config: dict[str, Any]) -> dict[str, float]:
    """``rope_theta`` and ``partial_rotary_factor`` from ``rope_parameters`` (transformers 5) or the
    older top-level keys, with transformers' defaults."""
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    theta = rope.get("rope_theta", config.get("rope_theta", config.get("rotary_emb_base", 10000.0)))
    default_pct = _defaults(config).get("partial_rotary_factor", 1.0)
    pct = rope.get("partial_rotary_factor", config.get("partial_rotary_factor", config.get("rotary_pct", default_pct)))
    return {"rope_theta": float(theta), "partial_rotary_factor": float(pct)}


def _defaults(config: dict[str, Any]) -> dict[str, Any]:
    """transformers' defaults for the fields a ``config.json`` of this model_type may leave out."""
    spec = TARGETS.get(str(config.get("model_type")))
    return dict(spec.defaults) if spec is not None else {}


def _value(config: dict[str, Any], field: str) -> Any:
    if field in _ROPE:
        return hf_rope(config)[field]
    if field == "num_key_value_heads":
        return config.get(field) or config.get("num_attention_heads")
    return config.get(field, _defaults(config).get(field))


def _checked(expected: dict[str, Any], field: str) -> bool:
    """Whether the target has the field: its translation of the NeoX config writes it."""
    return field in expected or field in (expected.get("rope_parameters") or {})


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
    return a == b


def check_settings(hf_config: dict[str, Any], model: NeoXModelConfig) -> list[SettingCheck]:
    """Every semantic field of ``hf_config`` against the translation of ``model``; also the
    vocabulary (between the tokenizer's and the padded size) and whether HF can express the model."""
    arch = str(hf_config.get("model_type"))
    checks: list[SettingCheck] = []
    try:
        expected = model.to_hf_config(arch)
        # the tensors decide these two; they are checked below against the model's bounds
        expected.update(intermediate_size=hf_config.get("intermediate_size"), vocab_size=hf_config.get("vocab_size"))
    except MapperError as error:
        return [SettingCheck("model", arch, None, False, f"HF {arch} cannot express this NeoX model: {error.message}")]
    for field, meaning in FIELDS.items():
        if not _checked(expected, field):
            continue
        hf, want = _value(hf_config, field), _value(expected, field)
        checks.append(SettingCheck(field, hf, want, _same(hf, want), meaning))
    vocab = hf_config.get("vocab_size")
    low = model.orig_vocab_size or 1
    fits = isinstance(vocab, int) and min(low, model.vocab_size) <= vocab <= model.vocab_size
    checks.append(SettingCheck("vocab_size", vocab, f"{min(low, model.vocab_size)}..{model.vocab_size}", fits,
                               "vocabulary rows (NeoX's padded size, or trimmed to the tokenizer's)"))
    return checks
