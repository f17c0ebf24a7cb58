"""Verification of correct conversions: every variant at TP 1 and 2 is clean, the HF capture lines
up with the reference's points, the statistics mean what they say, the report renders and
serialises, and mistakes outside the rules (a wrong HF config) are caught and explained."""

from __future__ import annotations

import json

import pytest
import torch

from mapper.errors import MapperError, VerificationFailed
from mapper.testing import SHIPPED_RULE_SET, VARIANTS
from mapper.verify import (
    compare,
    default_tolerances,
    hf_activations,
    neox_forward,
    repetition_score,
    verify_conversion,
)
from mapper.verify.blame import keys_for_point
from mapper.verify.compare import compare_tensors, logit_statistics

RULE_SETS = SHIPPED_RULE_SET


def test_every_variant_has_a_rule_set() -> None:
    assert set(RULE_SETS) == set(VARIANTS)


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("variant", sorted(RULE_SETS))
def test_shipped_rules_verify_clean(convert, variant: str, tp: int) -> None:
    c = convert(variant, RULE_SETS[variant], tp=tp)
    report = verify_conversion(c.neox, c.config, c.model, plan=c.conversion.plan)
    assert report.ok, report.render()
    assert report.first_divergence is None and report.blame is None
    assert [p.name for p in report.points] == ["embeddings", "blocks.0", "blocks.1", "final_norm", "logits"]
    logits = report.logits
    assert logits is not None and logits.kl < 1e-9 and logits.top1 == 1.0 and logits.top5 == 1.0
    assert report.continuation is not None and report.continuation.agreement == 1.0
    report.raise_if_failed()


@pytest.mark.parametrize("variant", ["te-full-parallel", "llama-te", "neox-legacy"])
def test_bf16_verifies_clean(convert, variant: str) -> None:
    c = convert(variant, RULE_SETS[variant], tp=2)
    report = verify_conversion(c.neox, c.config, c.model, plan=c.conversion.plan, dtype=torch.bfloat16)
    assert report.ok, report.render()
    assert (report.atol, report.rtol) == (default_tolerances(torch.bfloat16).atol, default_tolerances(torch.bfloat16).rtol)
    assert next(c.model.parameters()).dtype == torch.float32  # compared through a cast copy


def test_hooks_match_output_hidden_states_except_its_last_entry(convert) -> None:
    """In transformers 5.x ``hidden_states`` = (input of layer 0, layer outputs...) but its last entry
    is replaced by the final-normed state: hooks are needed to see the last block's output."""
    c = convert("te-full", RULE_SETS["te-full"])
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(3))
    acts = hf_activations(c.model, ids)
    with torch.no_grad():
        out = c.model(input_ids=ids, output_hidden_states=True)
    hidden = out.hidden_states
    assert len(hidden) == c.config.num_layers + 1
    assert torch.equal(hidden[0], acts.embeddings)
    for i in range(c.config.num_layers - 1):
        assert torch.equal(hidden[i + 1], acts.blocks[i])
    assert torch.equal(hidden[-1], acts.final_norm)
    assert not torch.equal(acts.blocks[-1], acts.final_norm)
    assert torch.equal(out.logits, acts.logits)
    reference = neox_forward(c.neox, c.config, ids)
    assert all(p.ok for p in compare(reference, acts, atol=1e-6, rtol=1e-4))


def test_capture_restores_training_mode(convert) -> None:
    c = convert("llama-new", RULE_SETS["llama-new"])
    c.model.train()
    verify_conversion(c.neox, c.config, c.model, continuation=2)
    assert c.model.training


def test_tolerance_is_relative_to_the_activation_scale() -> None:
    torch.manual_seed(0)
    ref = torch.randn(2, 8, 16)
    noisy = ref * (1 + 1e-6 * torch.randn_like(ref))
    wrong = ref + 0.01 * torch.randn_like(ref)
    for scale in (1e-3, 1.0, 1e3):
        assert compare_tensors("x", ref * scale, noisy * scale, atol=0, rtol=1e-4).ok
        assert not compare_tensors("x", ref * scale, wrong * scale, atol=0, rtol=1e-4).ok
    same = compare_tensors("x", ref, ref.clone(), atol=0, rtol=0)
    assert same.ok and same.max_abs_diff == 0 and same.rel_err == 0 and same.cosine == pytest.approx(1)
    nan = compare_tensors("x", ref, torch.full_like(ref, float("nan")), atol=1, rtol=1)
    assert not nan.ok


def test_logit_statistics() -> None:
    logits = torch.randn(2, 5, 30, generator=torch.Generator().manual_seed(0))
    same = logit_statistics(logits, logits)
    assert same["kl"] == pytest.approx(0, abs=1e-12) and same["top1"] == 1 and same["top5"] == 1
    other = logit_statistics(logits, -logits)
    assert other["kl"] > 1 and other["top1"] == 0 and other["top5"] == 0


def test_repetition_score() -> None:
    assert repetition_score(torch.tensor([[1, 2, 3, 4, 5]])) == 0
    assert repetition_score(torch.tensor([[7, 7, 7, 7, 7]])) == pytest.approx(3 / 4)
    assert repetition_score(torch.tensor([[1, 2, 1, 2, 1, 2], [1, 2, 3, 4, 5, 6]])) == pytest.approx((1 - 2 / 5) / 2)


def test_clean_report_renders_and_serialises(convert) -> None:
    c = convert("te-full", RULE_SETS["te-full"], tp=2)
    report = verify_conversion(c.neox, c.config, c.model, plan=c.conversion.plan, seq_len=12, continuation=4)
    text = report.render()
    assert "verdict: OK" in text and "blocks.1" in text and "KL" in text and "continuation" in text
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert data["ok"] is True and data["first_divergence"] is None and data["blame"] is None
    assert data["input_shape"] == [2, 12] and data["seed"] == 0 and data["dtype"] == "float32"
    assert [p["name"] for p in data["points"]][-1] == "logits"
    assert len(data["continuation"]["reference_tokens"][0]) == 4


def test_given_input_ids_and_trimmed_vocabulary(convert) -> None:
    """``--trim-vocab``: the HF model holds fewer rows; logits are compared over those."""
    c = convert("neox-legacy", RULE_SETS["neox-legacy"], tp=2, parameters={"trim_vocab": 100})
    assert c.model.get_output_embeddings().weight.shape[0] == 100 < c.config.vocab_size
    ids = torch.arange(30).reshape(2, 15) * 3
    report = verify_conversion(c.neox, c.config, c.model, input_ids=ids, continuation=3)
    assert report.ok, report.render()
    assert report.seed is None and report.logits is not None and report.logits.compared_vocab == 100
    assert all(t < 100 for row in report.continuation.candidate_tokens for t in row)


def test_too_long_for_the_model_is_refused(convert) -> None:
    c = convert("neox-new", RULE_SETS["neox-new"])
    with pytest.raises(MapperError, match="positions"):
        verify_conversion(c.neox, c.config, c.model, seq_len=30, continuation=8)


def test_rotary_base_of_the_old_converter_is_caught(convert) -> None:
    """The converter bug PR #1355 also fixed: rotary base 1000 instead of 10000 in config.json.
    The rules are right, so the blame points at the attention branch and the hint at the config."""
    c = convert("te-full", RULE_SETS["te-full"],
                hf_overrides={"rope_parameters": {"rope_type": "default", "rope_theta": 1000.0,
                                                  "partial_rotary_factor": 0.25}})
    report = verify_conversion(c.neox, c.config, c.model, plan=c.conversion.plan)
    assert report.first_divergence is not None and report.first_divergence.name == "blocks.0"
    assert [p.name for p in report.blame.parts if not p.ok] == ["blocks.0.attention"]
    assert "rope_theta" in (report.blame.hint or "")


def test_wrong_residual_wiring_is_blamed_on_the_config(convert) -> None:
    """``use_parallel_residual`` flipped: each branch still computes the right thing on its inputs,
    so the report says the block's wiring, not a rule, differs."""
    c = convert("neox-sequential", RULE_SETS["neox-sequential"], hf_overrides={"use_parallel_residual": True})
    report = verify_conversion(c.neox, c.config, c.model, plan=c.conversion.plan)
    assert report.first_divergence is not None and report.first_divergence.name == "blocks.0"
    assert report.blame is not None and all(p.ok for p in report.blame.parts)
    assert "use_parallel_residual" in (report.blame.hint or "")
    with pytest.raises(VerificationFailed, match="use_parallel_residual"):
        report.raise_if_failed()


def test_point_keys() -> None:
    keys = ["gpt_neox.embed_in.weight", "gpt_neox.layers.1.input_layernorm.weight",
            "gpt_neox.layers.1.attention.dense.bias", "gpt_neox.layers.1.mlp.dense_h_to_4h.weight",
            "gpt_neox.layers.11.mlp.dense_h_to_4h.weight", "gpt_neox.final_layer_norm.weight"]
    assert keys_for_point("blocks.1", keys) == keys[1:4]
    assert keys_for_point("blocks.1.attention", keys) == keys[1:3]
    assert keys_for_point("blocks.1.mlp", keys) == keys[3:4]
    assert keys_for_point("final_norm", keys) == keys[5:]
    assert keys_for_point("logits", keys) == keys[:1]  # tied: the embedding
    assert keys_for_point("logits", [*keys, "embed_out.weight"]) == ["embed_out.weight"]
    assert keys_for_point("final_norm", ["model.norm.weight", "model.layers.0.input_layernorm.weight"]) == ["model.norm.weight"]
