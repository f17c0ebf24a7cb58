"""HF Mistral: NeoX's Llama architecture with sliding-window attention, both ways.

NeoX's window (``sliding-window-width`` W, applied on its flash-attention path) lets the query at
position i attend to keys i-W .. i, W + 1 of them; HF Mistral's ``sliding_window`` counts the keys,
so it is W + 1. The synthetic ``mistral`` variants have W = 4 and are run on longer sequences, so
the window -- and the off-by-one -- decides the output.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from _conversions import assert_converts_computes_the_same_and_round_trips, same_tensors
from transformers import AutoConfig, MistralConfig, MistralForCausalLM

from mapper.checkpoints import convert_checkpoint, detect_checkpoint, prepare
from mapper.configs import NeoXModelConfig, load_neox_yaml
from mapper.configs.hf import approximations
from mapper.errors import MapperError
from mapper.formats import HFCheckpoint, NeoXCheckpoint
from mapper.hf_models import load_model
from mapper.testing import SHIPPED_RULE_SET, synthesize_neox, synthesize_variant, tiny_config, write_neox_checkpoint
from mapper.verify import neox_forward, verify_checkpoints

MISTRAL = "neox-llama-to-hf-mistral"
IDS = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(5))  # 12 tokens > the window of 5


def logits_of(model, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


# ---- detection: the target that represents the model ----------------------------------------------


def test_the_synthetic_mistral_variants_are_detected_as_the_mistral_rule_set() -> None:
    assert SHIPPED_RULE_SET["mistral"] == SHIPPED_RULE_SET["mistral-legacy"] == MISTRAL


@pytest.mark.parametrize(("window", "attention", "rules"), [
    (4, "flash", MISTRAL),  # the window applies: only HF Mistral computes it
    (None, "flash", "neox-llama-to-hf-llama"),  # no window: HF Llama, not a Mistral without one
    (4, "global", "neox-llama-to-hf-llama"),  # gpt-neox's global attention runs without the window
])
def test_a_window_on_flash_attention_decides_mistral_over_llama(tmp_path: Path, window, attention, rules) -> None:
    config, tensors = synthesize_variant("llama-new", tp=2, sliding_window_width=window,
                                         attention_config=[[[attention], 2]])
    detection = detect_checkpoint(write_neox_checkpoint(tensors, config, tmp_path / "neox"))
    assert detection.chosen is not None and detection.chosen.rules.name == rules
    other = next(c for c in detection.candidates if c.fits and c is not detection.chosen)  # both fit the keys
    assert other.unrepresentable and not detection.chosen.unrepresentable


def test_global_attention_with_a_width_converts_as_llama_with_the_approximation_recorded(tmp_path: Path) -> None:
    config, tensors = synthesize_variant("mistral", attention_config=[[["global"], 2]])
    neox = write_neox_checkpoint(tensors, config, tmp_path / "neox")
    hf = convert_checkpoint(neox, tmp_path / "hf")
    assert hf.prepared.forward_rules.name == "neox-llama-to-hf-llama"
    [approximation] = hf.prepared.approximations
    assert approximation.setting == "sliding-window-width with global attention"
    assert "ignores sliding-window-width 4" in approximation.neox and "full causal attention" in approximation.hf
    # what the built-in reference computes for it, and the HF model too: full attention
    assert (logits_of(load_model(hf.output)) - neox_forward(tensors, config, IDS).logits).abs().max() <= 1e-4
    with pytest.raises(MapperError, match="--strict refuses approximations"):
        convert_checkpoint(neox, tmp_path / "strict", strict=True)


# ---- NeoX -> HF -> NeoX ------------------------------------------------------------------------------


@pytest.mark.parametrize(("variant", "tp"), [("mistral", 1), ("mistral", 2), ("mistral-legacy", 1), ("mistral-legacy", 2)])
def test_mistral_converts_computes_the_same_and_round_trips(variant: str, tp: int, tmp_path: Path) -> None:
    config, tensors = synthesize_variant(variant, tp=tp, seed=tp)
    neox = write_neox_checkpoint(tensors, config, tmp_path / "neox", layout="sequential" if tp == 2 else "pipeline")
    hf = assert_converts_computes_the_same_and_round_trips(neox, tensors, config, tmp_path, rules=MISTRAL)
    written = json.loads((hf.output / "config.json").read_text())
    assert written["architectures"] == ["MistralForCausalLM"] and written["sliding_window"] == 4 + 1
    assert "attention_bias" not in written and "mlp_bias" not in written  # HF Mistral has neither

    again = convert_checkpoint(tmp_path / "neox-back", tmp_path / "hf-again", rules=MISTRAL)
    with HFCheckpoint(hf.output) as first, HFCheckpoint(again.output) as second:
        assert same_tensors(first, second)


def test_the_window_counts_the_query_itself_w_keys_instead_of_w_plus_one_differ(tmp_path: Path) -> None:
    config, tensors = synthesize_variant("mistral")
    hf = convert_checkpoint(write_neox_checkpoint(tensors, config, tmp_path / "neox"), tmp_path / "hf")
    reference = neox_forward(tensors, config, IDS).logits
    model = load_model(hf.output)
    assert model.config.sliding_window == 5
    assert (logits_of(model) - reference).abs().max() <= 1e-4
    model.config.sliding_window = 4  # NeoX's width copied as is: one key short
    assert (logits_of(model) - reference).abs().max() > 1e-2
    model.config.sliding_window = None  # no window at all
    assert (logits_of(model) - reference).abs().max() > 1e-2
    assert (logits_of(model, IDS[:, :5]) - reference[:, :5]).abs().max() <= 1e-4  # within the window: the same


# ---- a TE switch mix that HF Mistral can hold ---------------------------------------------------------

TE_SWITCHES = [dict(norm=norm, te_columnparallel=column, te_rowparallel=row)
               for norm in ("rmsnorm", "te_rmsnorm") for column in (False, True) for row in (False, True)]
TE_CASES = [(switches, tp) for switches in TE_SWITCHES for tp in (1, 2)]


@pytest.mark.parametrize(("switches", "tp"), TE_CASES,
                         ids=[f"{'+'.join(k if v is True else str(v) for k, v in s.items() if v)}-tp{tp}" for s, tp in TE_CASES])
def test_mistral_with_te_norms_and_linear_layers_converts_and_round_trips(switches: dict, tp: int, tmp_path: Path) -> None:
    index = TE_SWITCHES.index(switches)
    config = tiny_config("mistral", tp=tp, no_weight_tying=bool((index + tp) % 2), **switches)
    tensors = synthesize_neox(config, seed=index, extra_state="fp8" if index % 3 == 0 else "empty")
    neox = write_neox_checkpoint(tensors, config, tmp_path / "neox")
    assert_converts_computes_the_same_and_round_trips(neox, tensors, config, tmp_path, rules=MISTRAL, seed=index)


@pytest.mark.parametrize(("switches", "says"), [
    (dict(te_mha=True), "sliding-window-width with te-mha"),  # TE attention's window: not modelled
    (dict(attention_config=[[["flash", "global"], 1]]), "mixing flash and global"),
])
def test_a_window_mapper_cannot_compute_is_refused_when_the_config_is_read(switches: dict, says: str) -> None:
    raw = {**tiny_config("mistral").to_neox_yaml(), **{k.replace("_", "-"): v for k, v in switches.items()}}
    with pytest.raises(MapperError, match=says):
        NeoXModelConfig.from_neox_yaml(raw)


@pytest.mark.parametrize(("overrides", "says"), [
    (dict(te_layernorm_mlp=True, intermediate_size=64), "MLP biases (TE LayerNormMLP always has them)"),
    (dict(use_bias_in_attn_linear=True), "attention biases"),
    (dict(use_bias_in_mlp=True), "MLP biases"),
    (dict(sliding_window_width=None), "no sliding window"),
])
def test_what_hf_mistral_cannot_hold_is_refused_before_any_tensor_is_read(overrides: dict, says: str) -> None:
    with pytest.raises(MapperError, match=re.escape(says)):
        tiny_config("mistral", **overrides).to_hf_config("mistral")


def test_te_layernorm_mlp_with_a_window_is_refused_by_both_targets(tmp_path: Path) -> None:
    """TE LayerNormMLP always has biases (HF Mistral has none); HF Llama has no window: nothing converts."""
    config, tensors = synthesize_variant("mistral", te_layernorm_mlp=True, intermediate_size=64)
    neox = write_neox_checkpoint(tensors, config, tmp_path / "neox")
    with pytest.raises(MapperError, match="cannot be represented as HF llama:\n  - sliding-window-width 4"):
        convert_checkpoint(neox, tmp_path / "hf")
    with pytest.raises(MapperError, match="te_layernorm_mlp: True, the rule set is for False"):
        convert_checkpoint(neox, tmp_path / "hf", rules=MISTRAL)
    assert not (tmp_path / "hf").exists()


def test_hf_llama_refuses_an_effective_window_naming_mistral() -> None:
    with pytest.raises(MapperError, match=r"sliding-window-width 4 with flash attention: HF llama .*HF mistral"):
        tiny_config("mistral").to_hf_config("llama")


# ---- config translation ------------------------------------------------------------------------------


def test_config_translates_both_ways(tmp_path: Path) -> None:
    config = tiny_config("mistral", tp=2)
    path = tmp_path / "model.yml"
    path.write_text(yaml.safe_dump(config.to_neox_yaml()))
    assert "sliding-window-width: 4" in path.read_text() and "attention-config" in path.read_text()
    from_yaml = NeoXModelConfig.from_neox_yaml(load_neox_yaml([path]))
    assert from_yaml == config.model_copy(update={"orig_vocab_size": None})

    hf = from_yaml.to_hf_config("mistral")
    back = NeoXModelConfig.from_hf_config(hf, tp=2)
    assert back.to_hf_config("mistral") == hf
    assert (back.sliding_window_width, back.effective_sliding_window, back.attention_kinds) == (4, 4, ["flash"])
    same = ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "norm_eps", "activation", "rotary_pct",
            "rotary_emb_base", "tied", "attn_has_bias", "mlp_has_bias")
    assert {k: getattr(back, k) for k in same} == {k: getattr(config, k) for k in same}

    (tmp_path / "config.json").write_text(json.dumps(hf))
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert type(loaded) is MistralConfig and loaded.sliding_window == 5 and loaded.num_key_value_heads == 2


@pytest.mark.parametrize(("window", "width"), [(4096, 4095), (None, None)])
def test_hf_sliding_window_reads_back_as_the_neox_width(window, width) -> None:
    hf = {**tiny_config("mistral").to_hf_config("mistral"), "sliding_window": window}
    model = NeoXModelConfig.from_hf_config(hf)
    assert model.sliding_window_width == width and model.effective_sliding_window == width


def test_a_missing_sliding_window_is_transformers_default_and_a_bad_one_is_refused() -> None:
    hf = tiny_config("mistral").to_hf_config("mistral")
    del hf["sliding_window"]
    assert NeoXModelConfig.from_hf_config(hf).sliding_window_width == MistralConfig().sliding_window - 1
    with pytest.raises(MapperError, match="sliding_window must be a positive integer"):
        NeoXModelConfig.from_hf_config({**hf, "sliding_window": 0})


# ---- an HF Mistral mapper did not write --------------------------------------------------------------


def test_a_transformers_mistral_converts_to_neox_computes_the_same_and_comes_back(tmp_path: Path) -> None:
    torch.manual_seed(0)
    hf_config = MistralConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, sliding_window=6,
                              max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False)
    model = MistralForCausalLM(hf_config).eval()
    with torch.no_grad():  # norms away from their initial ones, so a mapping mistake shows
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.add_(0.2 * torch.randn_like(parameter))
    model.save_pretrained(tmp_path / "hf")

    neox = convert_checkpoint(tmp_path / "hf", tmp_path / "neox", rules=MISTRAL, tp=2)
    prepared = prepare(neox.output)
    assert prepared.forward_rules.name == MISTRAL  # the NeoX config it carries says flash + the window
    assert (prepared.model.sliding_window_width, prepared.model.attention_kinds) == (5, ["flash"])
    with NeoXCheckpoint(neox.output) as out:
        state = {key: out.get(key) for key in out.manifest()}
    assert (neox_forward(state, prepared.model, IDS).logits[..., :96] - logits_of(model)).abs().max() <= 1e-4

    back = convert_checkpoint(neox.output, tmp_path / "hf-back")
    with HFCheckpoint(tmp_path / "hf") as original, HFCheckpoint(back.output) as returned:
        assert same_tensors(original, returned)
    assert json.loads((back.output / "config.json").read_text())["sliding_window"] == 6


# ---- verify ----------------------------------------------------------------------------------------


def test_verify_passes_and_catches_a_wrong_sliding_window_in_config_json(tmp_path: Path) -> None:
    config, tensors = synthesize_variant("mistral", tp=2)
    neox = write_neox_checkpoint(tensors, config, tmp_path / "neox")
    hf = convert_checkpoint(neox, tmp_path / "hf").output
    report = verify_checkpoints(neox, hf)
    assert report.ok, report.render()
    assert [s for s in report.settings if s.field == "sliding_window"][0].hf == 5

    path = hf / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "sliding_window": 4}))  # NeoX's width as is
    wrong = verify_checkpoints(neox, hf)
    assert not wrong.ok
    assert [(s.field, s.hf, s.expected) for s in wrong.wrong_settings] == [("sliding_window", 4, 5)]
    assert wrong.first_divergence is not None and wrong.first_divergence.name == "blocks.0"


def test_approximations_name_no_window_problem_for_a_model_without_width() -> None:
    assert approximations(tiny_config("mistral"), "mistral") == []
    assert approximations(tiny_config("llama-new"), "llama") == []
