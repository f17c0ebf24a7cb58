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
