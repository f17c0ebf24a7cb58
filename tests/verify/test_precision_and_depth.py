"""No false alarms from depth or casts, and small settings seen at the right block.

A deep model (24 blocks, width 512: the #1353 TE setup at TP 2 with the parallel residual) verifies
clean in fp32 and bf16, and a fault in one block is found at that block in either precision:
each point is judged on the reference's own input, blocks by their update
(mapper/verify/tolerances.py). A ``convert --dtype bfloat16`` folder verifies clean by default.
config.json settings that move a model only a little (eps, GELU approximation) are named, and
show at the first block.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch import nn

import mapper
from mapper.testing import synthesize_variant, write_neox_checkpoint
from mapper.verify import verify_checkpoints, verify_conversion
from mapper.verify.tolerances import Tolerances, coarsest, end_to_end

DEEP = dict(num_layers=24, hidden_size=512, num_heads=8, num_kv_heads=8, intermediate_size=2048)


@pytest.fixture(scope="module")
def deep():
    from tests.verify.conftest import convert_variant

    return convert_variant("te-full-parallel", "neox-te-to-hf-gpt-neox", tp=2, **DEEP)


@contextmanager
def changed(parameter: nn.Parameter, value: torch.Tensor) -> Iterator[None]:
    """Put a wrong value into one HF tensor for the duration of a test (the fixture is shared)."""
    original = parameter.data.clone()
    parameter.data.copy_(value)
    try:
        yield
    finally:
        parameter.data.copy_(original)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_deep_correct_conversion_verifies_clean(deep, dtype: torch.dtype) -> None:
    report = verify_conversion(deep.neox, deep.config, deep.model, plan=deep.conversion.plan, dtype=dtype,
                               continuation=0)
    assert report.ok, report.render()
    assert len(report.points) == 24 + 3 and report.end_to_end.ok and report.end_to_end.top1 > 0.9


@pytest.mark.parametrize(("fault", "dtype"), [("stale pre-MLP norm", torch.bfloat16),
                                             ("doubled MLP-out bias", torch.float32)])
def test_a_fault_deep_inside_is_found_at_its_block(deep, dtype: torch.dtype, fault: str) -> None:
    layer = deep.model.gpt_neox.layers[17]
    if fault == "stale pre-MLP norm":  # gpt-neox#1353 in one layer: the never-used ones
        parameter, value = layer.post_attention_layernorm.weight, torch.ones_like(layer.post_attention_layernorm.weight)
    else:  # a row-parallel bias summed where it should not be
        parameter, value = layer.mlp.dense_4h_to_h.bias, 2 * layer.mlp.dense_4h_to_h.bias.detach()
    with changed(parameter, value):
        report = verify_conversion(deep.neox, deep.config, deep.model, plan=deep.conversion.plan, dtype=dtype,
                                   continuation=0)
    first = report.first_divergence
    assert first is not None and first.name == "blocks.17", report.render()
    assert [p.name for p in report.points if not p.ok] == ["blocks.17"]  # later blocks: judged on their own input
    assert [p.name for p in report.blame.parts if not p.ok] == ["blocks.17.mlp"]
    assert report.blame.rules and report.blame.rules[0].origin


def test_depth_widens_only_the_end_to_end_bounds() -> None:
    base = Tolerances(atol=1e-6, rtol=1e-4)
    assert end_to_end(base, 2).rtol == pytest.approx(2e-4) and end_to_end(base, 79).rtol == pytest.approx(9e-4)
    assert coarsest(torch.float32, None, torch.bfloat16) == torch.bfloat16 and coarsest(None) == torch.float32


@pytest.fixture(scope="module")
def bf16_folder(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("cast")
    config, tensors = synthesize_variant("te-full-parallel", tp=2)
    neox = write_neox_checkpoint(tensors, config, root / "neox")
    hf = mapper.convert_checkpoint(neox, root / "hf", dtype=torch.bfloat16).output
    return neox, hf


def test_a_bf16_cast_is_recorded_and_verified_in_it(bf16_folder) -> None:
    """The false alarm of the issue: `convert --dtype bfloat16`, then `verify` compared in fp32 and
    blamed the embedding rules for the cast's own rounding."""
    neox, hf = bf16_folder
    assert json.loads((hf / "mapper" / "record.json").read_text())["dtype"] == "bfloat16"
    report = verify_checkpoints(neox, hf, continuation=2)
    assert report.ok and report.dtype == "bfloat16", report.render()
    assert any("cast to bfloat16" in note for note in report.notes)


def test_a_bf16_cast_computed_in_fp32_uses_the_same_rounded_weights(bf16_folder) -> None:
    neox, hf = bf16_folder
    report = verify_checkpoints(neox, hf, dtype=torch.float32, continuation=0)
    assert report.ok, report.render()
    assert report.points[0].max_abs_diff == 0  # embeddings: the same bf16 rows on both sides
    assert report.dtype == "bfloat16"  # judged with the tolerances of the weights' precision


@pytest.mark.parametrize(("variant", "rules", "field", "value"), [
    ("neox-sequential", "neox-to-hf-gpt-neox", "layer_norm_eps", 1e-6),
    ("llama-new", "neox-llama-to-hf-llama", "rms_norm_eps", 1e-5),
    ("neox-new", "neox-to-hf-gpt-neox", "hidden_act", "gelu"),  # NeoX bias-gelu-fusion: the tanh GELU
])
def test_small_settings_are_named_and_seen_at_the_first_block(convert, variant: str, rules: str, field: str,
                                                              value: object) -> None:
    c = convert(variant, rules, hf_overrides={field: value})
    report = verify_conversion(c.neox, c.config, c.model, plan=c.conversion.plan, continuation=0)
    assert [s.field for s in report.wrong_settings] == [field], report.render()
    assert report.first_divergence is not None and report.first_divergence.name == "blocks.0", report.render()
    assert field in (report.blame.hint or "")
    assert field in str(report.error())


def test_the_small_scale_probe_is_what_sees_an_eps(convert) -> None:
    c = convert("neox-sequential", "neox-to-hf-gpt-neox", hf_overrides={"layer_norm_eps": 1e-6})
    report = verify_conversion(c.neox, c.config, c.model, continuation=0)
    block = report.points[1]
    assert not block.ok and block.probe is not None and not block.probe.ok
    assert block.rel_err <= 1e-4  # on the model's own activations the eps hides
    assert "small-scale" in block.why()
