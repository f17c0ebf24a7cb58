"""Model configuration: NeoX YAML files <-> NeoXModelConfig <-> HF config.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM

from mapper.configs import NeoXModelConfig, load_neox_yaml, pad_vocab_size, unknown_key_warnings
from mapper.errors import MapperError
from mapper.testing import tiny_config

PYTHIA_LIKE = """
# a Pythia-style model, written the way NeoX's own configs are
num-layers: 2
hidden-size: 64
num-attention-heads: 4
seq-length: 32
max-position-embeddings: 32
pos-emb: rotary
rotary-pct: 0.25
gpt-j-residual: true
no-weight-tying: true
norm: layernorm
activation: gelu
make_vocab_size_divisible_by: 8
fp16:
  enabled: true
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ---- YAML files --------------------------------------------------------------------------------


def test_several_files_merge_into_one_dict_with_underscore_keys(tmp_path: Path) -> None:
    model = write(tmp_path, "model.yml", PYTHIA_LIKE)
    parallel = write(tmp_path, "parallel.yml", "model-parallel-size: 2\npipe_parallel_size: 1\n")
    raw = load_neox_yaml([model, parallel])
    assert raw["num_layers"] == 2 and raw["model_parallel_size"] == 2 and raw["pipe_parallel_size"] == 1
    assert raw["make_vocab_size_divisible_by"] == 8 and "num-layers" not in raw


def test_a_key_in_two_files_is_an_error_naming_both(tmp_path: Path) -> None:
    a = write(tmp_path, "a.yml", "num-layers: 2\n")
    b = write(tmp_path, "b.yml", "num_layers: 3\n")  # other spelling, same key
    with pytest.raises(MapperError) as err:
        load_neox_yaml([a, b])
    assert "num_layers" in str(err.value) and "a.yml" in str(err.value) and "b.yml" in str(err.value)


def test_two_spellings_in_one_file_are_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "c.yml", "hidden-size: 64\nhidden_size: 128\n")
    with pytest.raises(MapperError, match="same NeoX key"):
        load_neox_yaml([path])


def test_a_key_written_twice_is_an_error_with_its_line(tmp_path: Path) -> None:
    path = write(tmp_path, "d.yml", "norm: layernorm\nnum-layers: 2\nnorm: rmsnorm\n")
    with pytest.raises(MapperError) as err:
        load_neox_yaml([path])
    assert "d.yml:3" in str(err.value) and "norm" in str(err.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [("num-layers: [2\n", "not valid YAML"), ("- 1\n- 2\n", "mapping")],
)
def test_bad_files_are_errors_with_the_file_name(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, "bad.yml", text)
    with pytest.raises(MapperError, match=message) as err:
        load_neox_yaml([path])
    assert "bad.yml" in str(err.value)


def test_a_missing_file_is_an_error_with_its_path(tmp_path: Path) -> None:
    with pytest.raises(MapperError) as err:
        load_neox_yaml([tmp_path / "nope.yml"])
    assert "nope.yml" in str(err.value)


# ---- NeoX YAML -> config -----------------------------------------------------------------------


def test_neox_defaults_apply(tmp_path: Path) -> None:
    raw = load_neox_yaml([write(tmp_path, "m.yml", "num-layers: 2\nhidden-size: 64\nnum-attention-heads: 4\n")])
    config = NeoXModelConfig.from_neox_yaml(raw, padded_vocab_size=128)
    assert config.rotary_emb_base == 10000  # not the 1000 the official converter once used
    assert (config.norm, config.pos_emb, config.activation, config.rotary_pct) == ("layernorm", "learned", "gelu", 1.0)
    assert (config.layernorm_epsilon, config.rms_norm_epsilon) == (1e-5, 1e-8)
    assert config.tied and not config.gpt_j_residual and config.num_kv_heads == 4 and config.tp == 1
    assert config.precision == "fp32" and config.mlp_widths().out_inputs == 256


def test_pythia_like_yaml(tmp_path: Path) -> None:
    raw = load_neox_yaml([write(tmp_path, "m.yml", PYTHIA_LIKE)])
    config = NeoXModelConfig.from_neox_yaml(raw, tp=2, padded_vocab_size=112)
    assert config.tp == 2 and config.gpt_j_residual and not config.tied and config.rotary_ndims == 4
    assert config.precision == "fp16" and config.dtype == torch.float16


def test_vocab_is_padded_from_the_unpadded_size_or_required() -> None:
    raw = {"num-layers": 1, "hidden-size": 64, "num-attention-heads": 4, "vocab-size": 50277,
           "model-parallel-size": 2}
    config = NeoXModelConfig.from_neox_yaml(raw)
    assert config.vocab_size == pad_vocab_size(50277, 128, 2) == 50432 and config.orig_vocab_size == 50277
    del raw["vocab-size"]
    with pytest.raises(MapperError, match="vocabulary"):
        NeoXModelConfig.from_neox_yaml(raw)


def test_te_fp8_mha_means_te_attention_and_bf16_block_means_bfloat16() -> None:
    raw = {"num_layers": 1, "hidden_size": 64, "num_attention_heads": 4, "padded_vocab_size": 128,
           "te_fp8_mha": True, "bf16": {"enabled": True}}
    config = NeoXModelConfig.from_neox_yaml(raw)
    assert config.te_mha and config.precision == "bfloat16"


def test_legacy_llama_mlp_type_is_a_silu_gated_mlp() -> None:
    raw = {"num_layers": 1, "hidden_size": 64, "num_attention_heads": 4, "padded_vocab_size": 128,
           "norm": "rmsnorm", "mlp_type": "llama", "activation": "silu"}
    config = NeoXModelConfig.from_neox_yaml(raw)
    assert config.activation == "swiglu" and config.mlp_type == "llama" and not config.mlp_has_bias
    assert config.mlp_widths().out_inputs == 256  # int(8*64/3) = 170 -> multiple of 256


@pytest.mark.parametrize(
    ("override", "message"),
    [({"pos_emb": "alibi"}, "alibi"), ({"norm": "scalenorm"}, "scalenorm"),
     ({"use_qk_layernorm": True}, "QK"), ({"activation": "mish"}, "mish"),
     ({"attention_config": [[["local"], 2]]}, "local"), ({"num_attention_heads": 5}, "divisible")],
)
def test_models_mapper_cannot_compute_are_refused(override: dict, message: str) -> None:
    raw = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "padded_vocab_size": 128, **override}
    with pytest.raises(MapperError, match=message):
        NeoXModelConfig.from_neox_yaml(raw)


# ---- MLP widths --------------------------------------------------------------------------------


def test_mlp_widths_follow_each_neox_module() -> None:
    base = dict(num_layers=1, hidden_size=64, num_heads=4, num_kv_heads=4, vocab_size=128)
    assert NeoXModelConfig(**base).mlp_widths().model_dump() == {"in_rows": 256, "out_inputs": 256}
    gated = dict(base, activation="swiglu", norm="rmsnorm", intermediate_size=192)
    assert NeoXModelConfig(**gated).mlp_widths().model_dump() == {"in_rows": 128, "out_inputs": 64}
    # ParallelMLP rounding: ffn=int(200*2/3)=133 -> 160 (2*16), ffn_in=66 -> 80 (16)
    rounded = dict(gated, intermediate_size=200, mlp_multiple_of=16)
    assert NeoXModelConfig(**rounded).mlp_widths().model_dump() == {"in_rows": 160, "out_inputs": 80}
    # TE LayerNormMLP takes intermediate-size as is and doubles fc1 when gated
    te = dict(gated, te_layernorm_mlp=True)
    assert NeoXModelConfig(**te).mlp_widths().model_dump() == {"in_rows": 384, "out_inputs": 192}


# ---- config -> NeoX YAML -> config ---------------------------------------------------------------


@pytest.mark.parametrize("variant", ["neox-legacy", "te-full", "llama-te", "llama-legacy", "te-rmsnorm"])
def test_neox_yaml_round_trip(tmp_path: Path, variant: str) -> None:
    config = tiny_config(variant, tp=2, precision="bfloat16")
    path = write(tmp_path, "out.yml", yaml.safe_dump(config.to_neox_yaml()))
    text = path.read_text()
    assert "num-attention-heads" in text and "num_attention_heads" not in text
    again = NeoXModelConfig.from_neox_yaml(load_neox_yaml([path]))
    # the tokenizer knows the vocabulary, mapper.json the code history: not NeoX keys
    assert again == config.model_copy(update={"orig_vocab_size": None, "gqa_layout": "current",
                                              "rmsnorm_formula": "current"})
    assert not unknown_key_warnings(load_neox_yaml([path]))  # NeoX refuses keys it does not know


# ---- config <-> HF config.json -----------------------------------------------------------------


@pytest.mark.parametrize(("variant", "arch"), [("neox-legacy", "gpt_neox"), ("neox-new", "gpt_neox"),
                                               ("llama-new", "llama"), ("llama-legacy", "llama")])
def test_neox_yaml_to_hf_to_config_round_trip(variant: str, arch: str) -> None:
    original = NeoXModelConfig.from_neox_yaml(tiny_config(variant).to_neox_yaml())
    hf = original.to_hf_config(arch)
    back = NeoXModelConfig.from_hf_config(hf)
    assert back.to_hf_config(arch) == hf
    same = ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "vocab_size", "norm", "activation",
            "gpt_j_residual", "rotary_pct", "rotary_emb_base", "tied", "norm_eps", "attn_has_bias", "mlp_has_bias")
    assert {k: getattr(back, k) for k in same} == {k: getattr(original, k) for k in same}
    assert back.mlp_widths().out_inputs == original.mlp_widths().out_inputs
    assert back.gelu_approximate == original.gelu_approximate


def test_transformers_loads_gpt_neox_config_with_rope_parameters_in_effect(tmp_path: Path) -> None:
    config = tiny_config("neox-legacy", rotary_emb_base=10000.0, rotary_pct=0.25)
    (tmp_path / "config.json").write_text(json.dumps(config.to_hf_config("gpt_neox")))
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert loaded.model_type == "gpt_neox"
    assert loaded.rope_parameters["rope_theta"] == 10000.0 and loaded.rope_parameters["partial_rotary_factor"] == 0.25
    assert loaded.use_parallel_residual is True and loaded.hidden_act == "gelu" and loaded.tie_word_embeddings is False
    assert loaded.layer_norm_eps == 1e-5 and loaded.attention_bias is True and loaded.dtype == torch.float32
    model = AutoModelForCausalLM.from_config(loaded)
    rot = int(config.head_dim * 0.25)
    expected = 1.0 / (10000.0 ** (torch.arange(0, rot, 2).float() / rot))
    assert torch.allclose(model.gpt_neox.rotary_emb.inv_freq, expected)
    assert model.gpt_neox.layers[0].attention.rotary_ndims == rot


def test_transformers_loads_llama_config_with_gqa_and_biases(tmp_path: Path) -> None:
    config = tiny_config("llama-te")
    hf = config.to_hf_config("llama")
    (tmp_path / "config.json").write_text(json.dumps(hf))
    loaded = AutoConfig.from_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_config(loaded)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert attn.k_proj.out_features == config.num_kv_heads * config.head_dim
    assert attn.q_proj.bias is not None and mlp.gate_proj.bias is not None  # TE forces biases
    assert mlp.down_proj.in_features == 64 and loaded.rms_norm_eps == 1e-8 and loaded.hidden_act == "silu"
    assert torch.allclose(model.model.rotary_emb.inv_freq,
                          1.0 / (10000.0 ** (torch.arange(0, 16, 2).float() / 16)))


@pytest.mark.parametrize(
    ("variant", "overrides", "act"),
    [("neox-sequential", {}, "gelu"), ("neox-sequential", {"bias_gelu_fusion": True}, "gelu_pytorch_tanh"),
     ("te-lnmlp", {}, "gelu_pytorch_tanh"), ("neox-sequential", {"activation": "relu"}, "relu")],
)
def test_hidden_act_exact_or_tanh(variant: str, overrides: dict, act: str) -> None:
    assert tiny_config(variant, **overrides).to_hf_config("gpt_neox")["hidden_act"] == act


@pytest.mark.parametrize(
    ("variant", "arch", "overrides", "says"),
    [
        ("neox-parallel", "gpt_neox", {"gpt_j_tied": True}, "gpt-j-tied"),
        ("neox-new", "gpt_neox", {"pos_emb": "learned"}, "pos-emb"),
        ("neox-new", "gpt_neox", {"norm": "rmsnorm"}, "LayerNorm"),
        ("llama-new", "gpt_neox", {}, "gated"),
        ("neox-new", "gpt_neox", {"num_kv_heads": 2}, "GQA"),
        ("neox-new", "gpt_neox", {"use_bias_in_mlp": False}, "use-bias-in-mlp"),
        ("llama-new", "llama", {"rotary_pct": 0.5}, "rotary-pct"),
        ("llama-new", "llama", {"gpt_j_residual": True}, "gpt-j-residual"),
        ("neox-new", "llama", {}, "RMSNorm"),
    ],
)
def test_unrepresentable_settings_raise_before_any_tensor_is_read(
    variant: str, arch: str, overrides: dict, says: str
) -> None:
    config = tiny_config(variant, **overrides)
    with pytest.raises(MapperError) as err:
        config.to_hf_config(arch)
    text = str(err.value)
    assert says in text and "cannot be represented" in text and "hint:" in text


@pytest.mark.parametrize(
    ("variant", "arch", "overrides", "setting", "hf_eps"),
    [("te-lnmlp", "gpt_neox", {"layernorm_epsilon": 1e-6}, "post_attention_layernorm eps", 1e-6),
     ("llama-te", "llama", {"rms_norm_epsilon": 1e-6}, "post_attention_layernorm eps", 1e-6),
     ("llama-new", "llama", {"rmsnorm_formula": "pre-1345"}, "RMSNorm formula", 1e-6)],
)
def test_approximations_convert_with_the_closest_setting_and_strict_refuses_them(
    variant: str, arch: str, overrides: dict, setting: str, hf_eps: float
) -> None:
    from mapper.configs import approximations

    config = tiny_config(variant, **overrides)
    (found,) = approximations(config, arch)
    assert found.setting == setting and found.neox and found.hf and "verify" in found.effect
    hf = config.to_hf_config(arch)
    assert hf["layer_norm_eps" if arch == "gpt_neox" else "rms_norm_eps"] == hf_eps
    with pytest.raises(MapperError, match="--strict refuses approximations"):
        config.to_hf_config(arch, strict=True)


def test_te_layernorm_mlp_with_the_default_eps_is_exact() -> None:
    from mapper.configs import approximations

    assert approximations(tiny_config("te-full"), "gpt_neox") == []
    assert approximations(tiny_config("llama-te"), "llama") == []  # rms_norm_epsilon 1e-8 = TE's fixed eps


def test_all_problems_are_listed_at_once() -> None:
    config = tiny_config("llama-new", rotary_pct=0.5, gpt_j_residual=True, pos_emb="learned")
    with pytest.raises(MapperError) as err:
        config.to_hf_config("llama")
    assert all(s in str(err.value) for s in ("rotary-pct", "gpt-j-residual", "pos-emb"))


def test_from_hf_config_refuses_other_models() -> None:
    with pytest.raises(MapperError, match="model_type"):
        NeoXModelConfig.from_hf_config({"model_type": "bert"})


def test_legacy_hf_gpt_neox_keys_are_understood() -> None:
    hf = {"model_type": "gpt_neox", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
          "intermediate_size": 256, "vocab_size": 128, "rotary_pct": 0.5, "rotary_emb_base": 1000,
          "use_parallel_residual": False, "hidden_act": "gelu_new"}
    config = NeoXModelConfig.from_hf_config(hf)
    assert (config.rotary_pct, config.rotary_emb_base, config.gpt_j_residual) == (0.5, 1000.0, False)
    assert config.bias_gelu_fusion and config.gelu_approximate == "tanh"


# ---- parameters for rule sets and the TP semantics they need -----------------------------------


def test_rule_parameters() -> None:
    config = tiny_config("llama-te", tp=2)
    assert config.rule_parameters() == {
        "num_layers": 2, "hidden_size": 64, "num_heads": 4, "num_kv_heads": 2, "head_dim": 16, "tp": 2,
        "vocab_size": 112, "gpt_j_residual": 0, "tied": 0, "te_columnparallel": 0, "te_rowparallel": 0,
        "te_mha": 1, "te_layernorm_mlp": 1, "te_norm": 0, "gqa_pre_1315": 0, "legacy_mlp": 0,
    }
    assert tiny_config("llama-legacy").rule_parameters()["legacy_mlp"] == 1
    assert tiny_config("te-linear").rule_parameters()["te_rowparallel"] == 1
    assert tiny_config("neox-parallel").rule_parameters()["gpt_j_residual"] == 1
    assert tiny_config("neox-new").rule_parameters()["tied"] == 1


def test_row_parallel_multipliers() -> None:
    plain = tiny_config("neox-parallel", tp=2)
    assert plain.row_parallel_multipliers("attention").model_dump() == {"weight": 1, "bias": 2}
    te = tiny_config("te-full-parallel", tp=2)
    assert te.row_parallel_multipliers("mlp").model_dump() == {"weight": 2, "bias": 2}
    sequential = tiny_config("te-full", tp=2)
    assert sequential.row_parallel_multipliers("mlp").model_dump() == {"weight": 1, "bias": 1}


def test_config_is_frozen_and_documented() -> None:
    config = tiny_config("neox-new")
    with pytest.raises(Exception):
        config.num_layers = 3  # type: ignore[misc]
    assert all(field.description for field in NeoXModelConfig.model_fields.values())
