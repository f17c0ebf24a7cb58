"""Every NeoX variant converts to an HF model that computes the same function, and back exactly.

For each variant: synthesise a tiny NeoX checkpoint in the real on-disk layout, let mapper detect
the rule set, convert, load with transformers (no missing or unexpected keys), compare logits with
NeoX's own forward pass, convert back to NeoX (bit-exact with the sidecar) and back to HF again
(bit-exact).
"""

from __future__ import annotations

import shutil

from pathlib import Path

import pytest
import torch
from _conversions import assert_converts_computes_the_same_and_round_trips, same_tensors

from mapper.checkpoints import convert_checkpoint, detect_checkpoint
from mapper.formats import HFCheckpoint, NeoXCheckpoint
from mapper.hf_models import load_model
from mapper.testing import SHIPPED_RULE_SET, synthesize_variant, write_neox_checkpoint
from mapper.verify import neox_forward

EXPECTED_RULES = SHIPPED_RULE_SET
# Every TE switch mix is in tests/rulesets/test_switch_matrix.py; here the variants it does not cover
# (legacy names, tanh GELU with partial rotary and tied embeddings), and one TE variant through a
# second HF -> NeoX -> HF round.
NOT_IN_MATRIX = ["neox-legacy", "neox-new", "llama-legacy", "te-full-fp8"]
CASES = [(variant, tp) for variant in NOT_IN_MATRIX for tp in (1, 2)]


def test_every_synthetic_variant_is_detected_as_its_rule_set(tmp_path: Path):
    from mapper.testing import VARIANTS

    assert set(VARIANTS) == set(EXPECTED_RULES)
    for variant in VARIANTS:
        config, tensors = synthesize_variant(variant, tp=2)
        detection = detect_checkpoint(write_neox_checkpoint(tensors, config, tmp_path / variant))
        assert detection.chosen is not None and detection.chosen.rules.name == EXPECTED_RULES[variant], variant


@pytest.mark.parametrize(("variant", "tp"), CASES, ids=[f"{v}-tp{tp}" for v, tp in CASES])
def test_variant_converts_verifies_and_round_trips(variant: str, tp: int, tmp_path: Path):
    config, tensors = synthesize_variant(variant, tp=tp, seed=tp)
    layout = "sequential" if (tp + len(variant)) % 3 == 0 else "pipeline"
    neox = write_neox_checkpoint(tensors, config, tmp_path / "neox", layout=layout)
    hf = assert_converts_computes_the_same_and_round_trips(neox, tensors, config, tmp_path, rules=EXPECTED_RULES[variant])

    again = convert_checkpoint(tmp_path / "neox-back", tmp_path / "hf-again", rules=EXPECTED_RULES[variant])
    with HFCheckpoint(hf.output) as first, HFCheckpoint(again.output) as second:
        assert same_tensors(first, second)


def test_stale_norm_is_dropped_and_reported_never_mapped(tmp_path: Path):
    config, tensors = synthesize_variant("te-full", tp=2)
    neox = write_neox_checkpoint(tensors, config, tmp_path / "neox")
    result = convert_checkpoint(neox, tmp_path / "hf")
    stale = [n for n in result.prepared.plan.dropped if "post_attention_layernorm" in n.inputs[0].key]
    assert len(stale) == 2 * 2 * config.num_layers  # weight and bias, per rank, per layer
    assert any("stale pre-fix post_attention_layernorm" in note for note in result.prepared.notes)
    with HFCheckpoint(result.output) as hf:
        for i in range(config.num_layers):
            mapped = hf.get(f"gpt_neox.layers.{i}.post_attention_layernorm.weight")
            assert torch.equal(mapped, tensors[f"layer_{i + 2:02d}.mlp.layer_norm_weight@rank0"])


def test_hf_to_neox_at_another_tp_degree_computes_the_same_function(tmp_path: Path):
    config, tensors = synthesize_variant("llama-te", tp=2, num_heads=8, num_kv_heads=4)
    neox = write_neox_checkpoint(tensors, config, tmp_path / "neox")
    hf = convert_checkpoint(neox, tmp_path / "hf")
    for tp in (1, 4):
        out = convert_checkpoint(hf.output, tmp_path / f"neox-tp{tp}", tp=tp)
        with NeoXCheckpoint(out.output) as resharded:
            assert resharded.tp == tp
            state = {k: resharded.get(k) for k in resharded.manifest()}
        ids = torch.randint(0, config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(3))
        padded = state["layer_00.word_embeddings.weight@rank0"].shape[0] * tp  # NeoX pads to a multiple of TP
        ours = neox_forward(state, config.model_copy(update={"tp": tp, "vocab_size": padded}), ids).logits
        theirs = neox_forward(tensors, config, ids).logits
        assert (ours[..., : config.vocab_size] - theirs).abs().max().item() <= 1e-4


def test_trimmed_vocabulary_comes_back_from_the_sidecar(tmp_path: Path):
    config, tensors = synthesize_variant("neox-legacy", tp=2)
    neox = write_neox_checkpoint(tensors, config, tmp_path / "neox")
    real_vocab = config.vocab_size - 5
    hf = convert_checkpoint(neox, tmp_path / "hf", trim_vocab=real_vocab)
    with HFCheckpoint(hf.output) as out:
        assert out.config["vocab_size"] == real_vocab
        assert out.manifest()["gpt_neox.embed_in.weight"].shape[0] == real_vocab
        assert out.manifest()["embed_out.weight"].shape[0] == real_vocab
    load_model(hf.output)
    back = convert_checkpoint(hf.output, tmp_path / "neox-back")
    with NeoXCheckpoint(back.output) as returned, NeoXCheckpoint(neox) as original:
        assert same_tensors(original, returned)


def test_hf_folder_without_a_record_needs_the_variant_named(tmp_path: Path):
    config, tensors = synthesize_variant("neox-new", tp=1)
    hf = convert_checkpoint(write_neox_checkpoint(tensors, config, tmp_path / "neox"), tmp_path / "hf")
    shutil.rmtree(hf.output / "mapper")  # no record: a plain HF folder
    from mapper.errors import MapperError

    with pytest.raises(MapperError, match="several NeoX layouts can hold it") as caught:
        convert_checkpoint(hf.output, tmp_path / "neox-back")
    assert "--rules" in str(caught.value)
    detection = detect_checkpoint(hf.output)
    assert detection.chosen is None and sum(c.fits for c in detection.candidates) > 1
    out = convert_checkpoint(hf.output, tmp_path / "neox-back", rules="neox-to-hf-gpt-neox", tp=2)
    with NeoXCheckpoint(out.output) as returned:
        assert returned.tp == 2


def test_tensor_parallel_degree_8(tmp_path: Path):
    config, tensors = synthesize_variant("te-full-parallel", tp=8, num_heads=8, num_kv_heads=8, seed=8)
    neox = write_neox_checkpoint(tensors, config, tmp_path / "neox")
    hf = convert_checkpoint(neox, tmp_path / "hf")
    ids = torch.randint(0, config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        logits = load_model(hf.output)(ids).logits
    assert (logits - neox_forward(tensors, config, ids).logits).abs().max().item() <= 1e-4
    back = convert_checkpoint(hf.output, tmp_path / "neox-back")
    with NeoXCheckpoint(back.output) as returned, NeoXCheckpoint(neox) as original:
        assert returned.tp == 8 and same_tensors(original, returned)


def test_detection_refuses_to_guess_between_rule_sets_that_fit_equally(tmp_path: Path):
    from mapper.detect import detect, require_single
    from mapper.errors import MapperError
    from mapper.spec import load_rules

    config, tensors = synthesize_variant("neox-new", tp=1)
    manifest = {k: v for k, v in NeoXCheckpoint(write_neox_checkpoint(tensors, config, tmp_path / "n")).manifest().items()}
    original = load_rules("neox-to-hf-gpt-neox")
    twin = original.model_copy(update={"name": "neox-twin-to-hf-gpt-neox"})
    detection = detect(manifest, config.rule_parameters(), model=config, candidates=[original, twin])
    assert detection.chosen is None
    with pytest.raises(MapperError, match="2 rule sets fit and none stands out: neox-to-hf-gpt-neox, neox-twin"):
        require_single(detection, "which")
