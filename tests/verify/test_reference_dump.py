"""``verify --reference``: a converted HF folder against a dump of NeoX's activations.

In CI there is no gpt-neox, so the dumps here are written by mapper's built-in reference in the
script's format (``write_builtin_dump``); tests/verify/test_real_gpt_neox.py runs the real script.
A dump is a reference for any variant: nothing here reads NeoX tensors, so a model the built-in
reference would call right (norms stored as γ−1 under the shipped names) is caught against it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import mapper
from mapper.formats.naming import neox_key
from mapper.testing import synthesize_variant, write_neox_checkpoint
from mapper.testing.cli import run_cli
from mapper.verify import (
    LayoutUnknown,
    ReferenceDump,
    reference_script,
    verify_against_reference,
    verify_checkpoints,
    verify_conversion,
    write_builtin_dump,
)
from mapper.verify.dump import config_sha256

IDS = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(5))


def converted(tmp_path: Path, variant: str, tp: int, **overrides) -> tuple[Path, Path, object, dict]:
    """A NeoX checkpoint on disk, the HF folder mapper converts it into, its config and tensors."""
    config, tensors = synthesize_variant(variant, tp=tp, **overrides)
    neox = write_neox_checkpoint(tensors, config, tmp_path / "neox")
    hf = mapper.convert_checkpoint(neox, tmp_path / "hf").output
    return neox, hf, config, tensors


def dump_of(tmp_path: Path, tensors: dict, config, hf: Path, name: str = "reference.safetensors") -> Path:
    saved = yaml.safe_load((hf / "mapper" / "neox-config.yaml").read_text())
    return write_builtin_dump(tensors, config, tmp_path / name, IDS, config_yaml=saved)


def perturbed(dump: Path, point: str, scale: float = 1e-2) -> Path:
    """The same dump with ``point`` moved by ``scale`` of its size (what another model would give)."""
    tensors = load_file(dump)
    metadata = ReferenceDump(dump).metadata
    noise = torch.randn(tensors[point].shape, generator=torch.Generator().manual_seed(1))
    tensors[point] = tensors[point] + scale * tensors[point].abs().max() * noise
    out = dump.with_name(f"perturbed-{point}.safetensors")
    save_file(tensors, out, metadata=metadata)
    return out


@pytest.mark.parametrize(("variant", "tp"), [("te-full", 2), ("llama-new", 2), ("neox-parallel", 1)])
def test_a_correct_conversion_verifies_against_the_dump(tmp_path: Path, variant: str, tp: int) -> None:
    _, hf, config, tensors = converted(tmp_path, variant, tp)
    report = verify_against_reference(dump_of(tmp_path, tensors, config, hf), hf)
    assert report.ok, report.render()
    assert [p.name for p in report.points] == ["embeddings", "blocks.0", "blocks.1", "final_norm", "logits"]
    assert report.end_to_end is not None and report.end_to_end.ok and report.end_to_end.top1 == 1.0
    assert report.settings and all(s.ok for s in report.settings)
    assert "reference.safetensors" in report.reference
    assert any("same NeoX config" in note for note in report.notes), report.notes
    assert report.input_shape == tuple(IDS.shape)


@pytest.mark.parametrize("point", ["blocks.1", "blocks.1.after_attention", "final_norm", "logits"])
def test_a_perturbed_dump_is_detected_and_localised(tmp_path: Path, point: str) -> None:
    """Moving one point of the reference fails that point (not earlier ones) and names its rules;
    moving only the stream between attention and MLP puts the blame on the attention half."""
    _, hf, config, tensors = converted(tmp_path, "neox-sequential", 2)
    report = verify_against_reference(perturbed(dump_of(tmp_path, tensors, config, hf), point), hf)
    assert not report.ok
    first = report.first_divergence
    expected = point.removesuffix(".after_attention")
    assert first is not None and first.name == expected, report.render()
    assert all(p.ok for p in report.points[: report.points.index(first)])
    assert report.blame is not None and report.blame.rules, report.render()
    assert all(re.search(r"\.yaml:\d+", r.origin or "") for r in report.blame.rules)
    if point == "blocks.1.after_attention":
        assert [p.name for p in report.blame.parts if not p.ok] == ["blocks.1.attention", "blocks.1.mlp"]
    if point == "blocks.1":
        assert [p.name for p in report.blame.parts if not p.ok] == ["blocks.1.mlp"]
        assert all(re.search(r"mlp|post-attention|tp-merge", r.rule) for r in report.blame.rules), report.render()
        assert "(sum)" in report.blame.rules[0].why or "(replicated)" in report.blame.rules[0].why


def test_rules_are_named_from_the_hf_folder_alone(tmp_path: Path) -> None:
    """Without the NeoX checkpoint (the dump names a path that is gone), the rules recorded in the
    HF folder are inverted to find which produced the diverging tensors."""
    neox, hf, config, tensors = converted(tmp_path, "te-full", 1)
    dump = perturbed(dump_of(tmp_path, tensors, config, hf), "blocks.0")
    report = verify_against_reference(dump, hf)  # the dump's metadata names no checkpoint
    assert report.first_divergence.name == "blocks.0"
    rules = [r.rule for r in report.blame.rules]
    assert rules and all(r.startswith(("gpt-neox-", "rotary")) for r in rules), rules
    assert report.blame.rules[0].why  # ranked, with the reason


def test_norms_stored_as_gamma_minus_one_are_caught_only_against_the_framework(tmp_path: Path) -> None:
    """The issue's wrong model: a fork stores every norm as γ−1 (TE zero_centered_gamma) under the
    shipped key names. The shipped rules copy γ−1 and mapper's own reading of NeoX makes the same
    assumption, so the built-in verification passes; the training framework's activations do not."""
    config, true = synthesize_variant("te-full", tp=1)
    stored = {k: (v - 1 if re.search(r"(layernorm|layer_norm_weight|\bnorm)\.?weight|layer_norm_weight", k) else v)
              for k, v in true.items()}
    assert not torch.equal(stored[neox_key(2, "input_layernorm.weight", 0)], true[neox_key(2, "input_layernorm.weight", 0)])
    neox = write_neox_checkpoint(stored, config, tmp_path / "neox")
    hf = mapper.convert_checkpoint(neox, tmp_path / "hf").output
    assert verify_checkpoints(neox, hf, continuation=0).ok  # the same wrong assumption on both sides
    framework = write_builtin_dump(true, config, tmp_path / "framework.safetensors", IDS)
    report = verify_against_reference(framework, hf)
    assert not report.ok and report.first_divergence.name == "blocks.0", report.render()


def test_a_layout_the_builtin_reference_does_not_know_points_to_the_dump(convert) -> None:
    config, tensors = synthesize_variant("te-full", tp=1)
    unfused = {k.replace("attention.qkv.weight", "attention.qkv.query_weight"): v for k, v in tensors.items()}
    c = convert("te-full", "neox-te-to-hf-gpt-neox")
    with pytest.raises(LayoutUnknown, match="does not know this layout") as caught:
        verify_conversion(unfused, config, c.model, continuation=0)
    assert "--reference" in (caught.value.hint or "")


def test_the_dump_is_the_scripts_format(tmp_path: Path) -> None:
    _, hf, config, tensors = converted(tmp_path, "neox-new", 1)
    dump = ReferenceDump(dump_of(tmp_path, tensors, config, hf))
    assert dump.num_layers == 2 and dump.dtype == torch.float32
    assert dump.metadata["format"] == "mapper-neox-reference/1"
    saved = yaml.safe_load((hf / "mapper" / "neox-config.yaml").read_text())
    assert dump.metadata["config_sha256"] == config_sha256(saved)
    assert dump.model_config().hidden_size == config.hidden_size
    script = reference_script()
    assert "mapper-neox-reference/1" in script and "import mapper" not in script and "from mapper" not in script
    compile(script, "neox_reference_dump.py", "exec")



def test_cli_reference_report_and_script(tmp_path: Path) -> None:
    _, hf, config, tensors = converted(tmp_path, "llama-te", 1)
    dump = dump_of(tmp_path, tensors, config, hf)
    code, out, _ = run_cli(["verify", "--reference", str(dump), str(hf), "--report", str(tmp_path / "r.html")])
    assert code == 0 and "verdict: OK" in out and "gpt-neox's own forward" in out
    page = (tmp_path / "r.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and page.count("<svg") == 3 and "http" not in page.replace(
        'xmlns="http://www.w3.org/2000/svg"', "")
    code, out, err = run_cli(["verify", "--reference", str(perturbed(dump, "blocks.1")), str(hf), "--json"])
    assert code == 1 and json.loads(out)["first_divergence"] == "blocks.1"
    code, _, err = run_cli(["verify", "--reference", str(dump), str(tmp_path), str(hf)])
    assert code == 2 and "usage: mapper verify --reference DUMP HF_FOLDER" in err
    code, out, err = run_cli(["reference-script", "--ids", str(tmp_path / "ids.json"), "--for", str(hf)])
    assert code == 0 and out == reference_script() and "mapper verify --reference" in err
    ids = json.loads((tmp_path / "ids.json").read_text())
    assert len(ids) == 2 and len(ids[0]) == 16 and max(max(r) for r in ids) < 104


def test_the_neox_config_an_hf_folder_carries_is_read_within_the_yaml_limits(tmp_path: Path) -> None:
    """It comes from outside, so it is read like every YAML input (mapper.safe_yaml): a key
    written twice is refused, naming the file, instead of silently taking the last value."""
    _, hf, config, tensors = converted(tmp_path, "te-full", 2)
    dump = dump_of(tmp_path, tensors, config, hf)
    carried = hf / "mapper" / "neox-config.yaml"
    carried.write_text(carried.read_text() + "num-layers: 99\n")
    with pytest.raises(mapper.MapperError, match="appears twice") as caught:
        verify_against_reference(dump, hf)
    assert str(carried) in str(caught.value)
