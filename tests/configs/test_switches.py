"""The config says which switches a checkpoint has; the keys confirm it; history settings come from evidence."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from mapper.checkpoints import convert_checkpoint, detect_checkpoint, prepare
from mapper.configs.switches import evidence_from_keys
from mapper.errors import MapperError
from mapper.formats import NeoXCheckpoint
from mapper.hf_models import load_model
from mapper.ops import bitwise_equal
from mapper.testing import synthesize_neox, synthesize_variant, tiny_config, write_neox_checkpoint
from mapper.verify import neox_forward
from mapper.verify.checkpoints import verify_checkpoints


def edit_config(neox: Path, edit) -> None:
    path = next((neox / "global_step100" / "configs").glob("*.yml"))
    path.write_text(edit(path.read_text()))


def logits_agree(hf: Path, tensors: dict, config) -> bool:
    ids = torch.randint(0, config.orig_vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = load_model(hf)(ids).logits
    return bool((ours - neox_forward(tensors, config, ids).logits).abs().max() <= 1e-4)


def test_the_keys_show_each_switch_and_say_nothing_when_they_cannot_tell() -> None:
    config, tensors = synthesize_variant("te-full", tp=2, norm="te_layernorm", te_rowparallel=True)
    shown = evidence_from_keys(tensors)
    assert shown.switches == {"te_mha": True, "te_layernorm_mlp": True}  # no NeoX linear left to show te_row*
    assert shown.norm == "te_layernorm" and shown.naming == "current"
    plain = evidence_from_keys(synthesize_variant("llama-legacy")[1])
    assert plain.switches == {"te_mha": False, "te_layernorm_mlp": False} and plain.naming == "legacy"
    assert plain.norm == "rmsnorm"


def test_a_config_contradicting_the_keys_is_refused_with_that_sentence(tmp_path: Path) -> None:
    config, tensors = synthesize_variant("te-full", tp=2, layernorm_epsilon=1e-6)
    neox = write_neox_checkpoint(tensors, config, tmp_path / "neox")
    edit_config(neox, lambda text: text.replace("te-mha: true", "te-mha: false"))
    with pytest.raises(MapperError) as caught:
        prepare(neox)
    text = str(caught.value)
    assert "the config says te_mha: False, the checkpoint's keys say True (e.g. attention.qkv.weight)" in text
    assert "eps" not in text.split("hint:")[0]  # the TE flag, not the eps, is what is wrong
    assert "--set" in text
    fixed = prepare(neox, settings={"te-mha": True})  # --set te-mha=true
    assert fixed.model.te_mha and fixed.forward_rules.name == "neox-to-hf-gpt-neox"


def test_a_misspelt_switch_is_a_warning_never_a_silent_off(tmp_path: Path) -> None:
    config, tensors = synthesize_variant("te-lnmlp", tp=1)
    neox = write_neox_checkpoint(tensors, config, tmp_path / "neox")
    edit_config(neox, lambda text: text.replace("te-layernorm-mlp: true", "te-layernorm_mlp_: true"))
    with pytest.raises(MapperError, match="te_layernorm_mlp: False, the checkpoint's keys say True"):
        prepare(neox)
    edit_config(neox, lambda text: text + "te-layernorm-mlp: true\n")
    ready = prepare(neox)
    (warning,) = [w for w in ready.warnings if "te_layernorm_mlp_" in w]
    assert "did you mean 'te_layernorm_mlp'" in warning


def test_detection_reports_the_switches_and_the_parts_that_apply(tmp_path: Path) -> None:
    config, tensors = synthesize_variant("te-mha", tp=2, te_rowparallel=True, te_columnparallel=True,
                                         no_weight_tying=True)
    detection = detect_checkpoint(write_neox_checkpoint(tensors, config, tmp_path / "neox"))
    summary = detection.summary()
    assert summary["chosen"] == "neox-to-hf-gpt-neox"
    assert summary["switches"] == {"te_norm": False, "te_mha": True, "te_layernorm_mlp": False,
                                   "te_columnparallel": True, "te_rowparallel": True}
    parts = {p["fragment"]: p["applies"] for p in summary["parts"]}
    assert parts["fragments/gpt-neox/names-attention-te.yaml"] and not parts["fragments/gpt-neox/names-attention.yaml"]
    assert parts["fragments/extra-state-te-linear.yaml"] and not parts["fragments/gpt-neox/names-mlp-te.yaml"]


def test_a_rules_file_whose_variant_contradicts_the_config_needs_force(tmp_path: Path) -> None:
    config, tensors = synthesize_variant("te-mha", tp=1)
    neox = write_neox_checkpoint(tensors, config, tmp_path / "neox")
    with pytest.raises(MapperError, match="te_layernorm_mlp: False, the rule set is for True"):
        prepare(neox, rules="neox-te-to-hf-gpt-neox")
    assert prepare(neox, rules="neox-te-mha-to-hf-gpt-neox").model.te_mha  # the matching preset is fine


# ---- approximations -----------------------------------------------------------------------------


def test_stock_te_llama_config_converts_with_the_eps_approximation_recorded(tmp_path: Path) -> None:
    config, tensors = synthesize_variant("llama-te", tp=2, rms_norm_epsilon=1e-6)  # NeoX's stock Llama eps
    neox = write_neox_checkpoint(tensors, config, tmp_path / "neox")
    result = convert_checkpoint(neox, tmp_path / "hf")
    assert any("approximation: post_attention_layernorm eps" in w for w in result.prepared.warnings)
    record = json.loads((result.output / "mapper" / "record.json").read_text())
    assert [a["setting"] for a in record["approximations"]] == ["post_attention_layernorm eps"]
    assert json.loads((result.output / "config.json").read_text())["rms_norm_eps"] == 1e-6
    assert logits_agree(result.output, tensors, config)  # the effect is below verification's noise
    with pytest.raises(MapperError, match="--strict refuses approximations"):
        convert_checkpoint(neox, tmp_path / "strict", strict=True)
    assert not (tmp_path / "strict").exists()


# ---- gpt-neox layout history --------------------------------------------------------------------


def gqa_checkpoint(tmp_path: Path, layout: str, name: str = "neox"):
    config = tiny_config("llama-new", tp=2, gqa_layout=layout)
    tensors = synthesize_neox(config)
    return config, tensors, write_neox_checkpoint(tensors, config, tmp_path / name)


def test_legacy_names_mean_the_gqa_layout_before_1315(tmp_path: Path) -> None:
    config, tensors = synthesize_variant("llama-legacy", tp=2)
    ready = prepare(write_neox_checkpoint(tensors, config, tmp_path / "neox"))
    assert ready.model.gqa_layout == "pre-1315" and ready.parameters["gqa_pre_1315"] == 1
    assert any(note.startswith("gqa_layout pre-1315: legacy MLP names") for note in ready.notes)
    assert not [w for w in ready.warnings if "gqa_layout" in w]


def test_te_modules_mean_the_current_gqa_layout(tmp_path: Path) -> None:
    config, tensors = synthesize_variant("llama-new", tp=2, te_layernorm_mlp=True, rms_norm_epsilon=1e-8)
    ready = prepare(write_neox_checkpoint(tensors, config, tmp_path / "neox"))
    assert ready.model.gqa_layout == "current" and not [w for w in ready.warnings if "gqa_layout" in w]


def test_both_gqa_layouts_convert_exactly_when_named_and_the_default_warns(tmp_path: Path) -> None:
    config, tensors, neox = gqa_checkpoint(tmp_path, "pre-1315")
    # nothing in the keys dates a linear1 GQA checkpoint: the current layout, with a warning naming the option
    guessed = convert_checkpoint(neox, tmp_path / "guessed")
    (warning,) = [w for w in guessed.prepared.warnings if "gqa_layout" in w]
    assert "--set gqa_layout=pre-1315" in warning
    assert not logits_agree(guessed.output, tensors, config)  # the #1353 pattern: loads, runs, wrong

    named = convert_checkpoint(neox, tmp_path / "named", settings={"gqa_layout": "pre-1315"})
    assert not [w for w in named.prepared.warnings if "gqa_layout" in w]
    assert logits_agree(named.output, tensors, config)
    assert json.loads((named.output / "mapper" / "record.json").read_text())["settings"]["gqa_layout"] == "pre-1315"
    assert verify_checkpoints(neox, named.output, continuation=0).ok  # verify follows the recorded layout
    back = convert_checkpoint(named.output, tmp_path / "back")  # the recorded layout is followed
    with NeoXCheckpoint(back.output) as returned, NeoXCheckpoint(neox) as original:
        assert all(bitwise_equal(returned.get(k), original.get(k)) for k in original.manifest())

    config, tensors, current = gqa_checkpoint(tmp_path, "current", "neox-current")
    assert logits_agree(convert_checkpoint(current, tmp_path / "current-hf").output, tensors, config)


def test_history_settings_given_in_a_config_file_are_taken_as_said(tmp_path: Path) -> None:
    config, tensors, neox = gqa_checkpoint(tmp_path, "pre-1315")
    extra = neox / "global_step100" / "configs" / "history.yml"
    extra.write_text(yaml.safe_dump({"gqa_layout": "pre-1315"}))
    ready = prepare(neox)
    assert ready.model.gqa_layout == "pre-1315" and not [w for w in ready.warnings if "gqa_layout" in w]
