"""Config values are checked before anything is sized by them: bad values are refused naming the key."""

from __future__ import annotations

import shutil

import json
import math
from pathlib import Path

import pytest

from mapper.checkpoints import convert_checkpoint, prepare
from mapper.configs import NeoXModelConfig, load_neox_yaml
from mapper.errors import CheckpointError, MapperError
from mapper.testing import synthesize_variant, tiny_config, write_neox_checkpoint
from mapper.testing.cli import run_cli

BASE = {"num-layers": 2, "hidden-size": 64, "num-attention-heads": 4, "padded-vocab-size": 128}


@pytest.mark.parametrize(
    ("key", "value", "says"),
    [
        ("layernorm-epsilon", math.nan, "finite"),
        ("layernorm-epsilon", -1e-5, "greater than 0"),
        ("rms-norm-epsilon", 2.0, "less than 1"),
        ("rotary-emb-base", math.inf, "finite"),
        ("hidden-size", 64.9, "valid integer"),
        ("num-layers", math.inf, "valid integer"),
        ("num-layers", "2", "valid integer"),
        ("num-attention-heads", True, "valid integer"),
        ("num-layers", 2**40, "less than or equal"),
        ("gpt-j-residual", "yes", "valid boolean"),
        ("rotary-pct", 1.5, "less than or equal to 1"),
    ],
)
def test_bad_neox_values_are_refused_naming_the_key(key: str, value: object, says: str) -> None:
    with pytest.raises(MapperError) as caught:
        NeoXModelConfig.from_neox_yaml({**BASE, key: value})
    assert key in str(caught.value) and says in str(caught.value)


def test_a_yaml_nan_never_reaches_config_json(tmp_path: Path) -> None:
    (tmp_path / "m.yml").write_text("num-layers: 2\nhidden-size: 64\nnum-attention-heads: 4\n"
                                    "padded-vocab-size: 128\nlayernorm-epsilon: .nan\n")
    with pytest.raises(MapperError, match="layernorm-epsilon"):
        NeoXModelConfig.from_neox_yaml(load_neox_yaml([tmp_path / "m.yml"]))


def test_config_layers_must_match_the_checkpoint_before_anything_else(tmp_path: Path) -> None:
    config, tensors = synthesize_variant("neox-sequential")
    neox = write_neox_checkpoint(tensors, config, tmp_path / "neox")
    model_yml = next((neox / "global_step100" / "configs").glob("*.yml"))
    model_yml.write_text(model_yml.read_text().replace("num-layers: 2", "num-layers: 1000000"))
    code, _, err = run_cli(["convert", neox, tmp_path / "out"])
    assert code == 2
    assert "num-layers 1000000" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("edit", "says"),
    [({"num_hidden_layers": 1000000}, "1000000 layers (num_hidden_layers)"), ({"hidden_size": "64"}, "hidden_size"),
     ({"layer_norm_eps": None}, None), ({"rope_parameters": [1, 2]}, "rope_parameters"),
     ({"vocab_size": -3}, "vocab_size")],
)
def test_bad_hf_config_values_are_refused(tmp_path: Path, edit: dict, says: str | None) -> None:
    config, tensors = synthesize_variant("neox-sequential")
    hf = convert_checkpoint(write_neox_checkpoint(tensors, config, tmp_path / "neox"), tmp_path / "hf").output
    shutil.rmtree(hf / "mapper")  # a plain HF folder: config.json is all there is
    data = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**data, **edit}))
    code, _, err = run_cli(["convert", hf, tmp_path / "back", "--rules", "neox-to-hf-gpt-neox"])
    if says is None:  # a missing optional field takes transformers' default
        assert code == 0
        return
    assert code == 2 and says in err
    assert not (tmp_path / "back").exists()


@pytest.mark.parametrize(("edit", "says"), [({"parameters": {"tp": "2"}}, "parameters.tp"),
                                            ({"settings": {"gqa_layout": 1}}, "settings.gqa_layout"),
                                            ({"rules": 5}, "rules")])
def test_a_malformed_mapper_json_is_refused_naming_the_field(tmp_path: Path, edit: dict, says: str) -> None:
    config, tensors = synthesize_variant("neox-sequential")
    hf = convert_checkpoint(write_neox_checkpoint(tensors, config, tmp_path / "neox"), tmp_path / "hf").output
    record = json.loads((hf / "mapper" / "record.json").read_text())
    (hf / "mapper" / "record.json").write_text(json.dumps({**record, **edit}))
    code, _, err = run_cli(["convert", hf, tmp_path / "back"])
    assert code == 2
    assert "record.json" in err and says in err


def test_every_written_config_json_is_strict_json(tmp_path: Path) -> None:
    config, tensors = synthesize_variant("te-full", tp=2)
    hf = convert_checkpoint(write_neox_checkpoint(tensors, config, tmp_path / "neox"), tmp_path / "hf").output
    json.loads((hf / "config.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in config.json"))


def test_tiny_config_rejects_values_pydantic_would_coerce() -> None:
    with pytest.raises(ValueError):
        tiny_config("neox-new", hidden_size=64.0)
    with pytest.raises(MapperError):
        prepare(Path("/nonexistent-checkpoint"))
