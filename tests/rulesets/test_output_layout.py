"""An HF output is a model folder first: mapper's own files stay out of the loaders' way."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors import safe_open

from mapper.checkpoints import convert_checkpoint
from mapper.formats import NeoXCheckpoint
from mapper.ops import bitwise_equal
from mapper.testing import synthesize_variant, write_neox_checkpoint


def test_top_level_safetensors_hold_exactly_the_model(tmp_path: Path) -> None:
    config, tensors = synthesize_variant("te-full-fp8", tp=2)  # non-empty FP8 metadata: a sidecar is written
    hf = convert_checkpoint(write_neox_checkpoint(tensors, config, tmp_path / "neox"), tmp_path / "hf").output
    assert (hf / "mapper" / "sidecar.safetensors").is_file() and (hf / "mapper" / "record.json").is_file()
    found = {}
    for path in hf.glob("*.safetensors"):  # what a loader without an index takes
        with safe_open(str(path), "pt") as f:
            found.update({key: path.name for key in f.keys()})
    from mapper.hf_models import expected_tensors

    assert set(found) == set(expected_tensors(json.loads((hf / "config.json").read_text())))
    index = hf / "model.safetensors.index.json"
    if index.exists():
        assert json.loads(index.read_text())["weight_map"] == found


def test_a_folder_written_by_mapper_0_1_still_converts_back_exactly(tmp_path: Path) -> None:
    config, tensors = synthesize_variant("te-full-fp8", tp=2)
    neox = write_neox_checkpoint(tensors, config, tmp_path / "neox")
    hf = convert_checkpoint(neox, tmp_path / "hf").output
    for new, old in (("record.json", "mapper.json"), ("rules.yaml", "mapper-rules.yaml"),
                     ("neox-config.yaml", "mapper-neox-config.yaml"), ("sidecar.safetensors", "mapper-sidecar.safetensors")):
        (hf / "mapper" / new).rename(hf / old)
    shutil.rmtree(hf / "mapper")
    back = convert_checkpoint(hf, tmp_path / "back").output
    with NeoXCheckpoint(back) as returned, NeoXCheckpoint(neox) as original:
        assert all(bitwise_equal(returned.get(k), original.get(k)) for k in original.manifest())


def test_the_hf_folder_generates_text_with_the_checkpoint_s_tokenizer_offline(tmp_path: Path, monkeypatch) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config, tensors = synthesize_variant("te-full", tp=2)
    neox = write_neox_checkpoint(tensors, config, tmp_path / "neox", tokenizer=True)
    hf = convert_checkpoint(neox, tmp_path / "hf").output
    hf_config = json.loads((hf / "config.json").read_text())
    assert (hf_config["bos_token_id"], hf_config["eos_token_id"], hf_config["pad_token_id"]) == (0, 0, 1)
    assert json.loads((hf / "generation_config.json").read_text())["eos_token_id"] == 0
    tokenizer = AutoTokenizer.from_pretrained(hf, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(hf, local_files_only=True)
    generated = pipeline("text-generation", model=model, tokenizer=tokenizer)("the water was", max_new_tokens=5,
                                                                                 do_sample=False)
    assert generated[0]["generated_text"].startswith("the water was") and len(generated[0]["generated_text"]) > 13

    back = convert_checkpoint(hf, tmp_path / "back").output  # the tokenizer comes back, named in the YAML
    yaml_text = next((back / "global_step0" / "configs").glob("*.yml")).read_text()
    assert "tokenizer-type: HFTokenizer" in yaml_text and str((back / "tokenizer.json").resolve()) in yaml_text
    from tokenizers import Tokenizer

    returned, original = (Tokenizer.from_file(str(p)) for p in (back / "tokenizer.json", neox / "tokenizer.json"))
    text = "the water was very long <|endoftext|> good"
    assert returned.encode(text).ids == original.encode(text).ids and returned.get_vocab() == original.get_vocab()


def test_a_checkpoint_without_its_tokenizer_converts_with_a_warning_saying_what_to_pass(tmp_path: Path) -> None:
    config, tensors = synthesize_variant("neox-new")
    hf = convert_checkpoint(write_neox_checkpoint(tensors, config, tmp_path / "neox"), tmp_path / "hf")
    assert any("--tokenizer" in warning for warning in hf.prepared.warnings)
    assert not (hf.output / "tokenizer.json").exists()
