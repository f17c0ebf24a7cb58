"""compile proves a rule set fits a checkpoint from metadata alone, and reports every problem."""

from __future__ import annotations

import pytest
import torch

import mapper
from mapper.errors import CompileError
from mapper.spec import load_rule_text
from mapper.tensors import TensorMeta

RULES = """\
schema_version: 1
name: tp-merge
version: 1.0.0
description: merge two TP ranks of a toy model
source: neox
target: hf
parameters:
  num_layers: {}
  tp: {default: 2}
  gpt_j_residual: {default: 0}
placeholders: {i: num_layers, r: tp, wb: [weight, bias]}
rules:
  - fuse: {from: "layer_{i+2:02d}.qkv.{wb}@rank{r}", over: r, to: "layers.{i}.qkv.{wb}"}
  - fuse: {from: "layer_{i+2:02d}.dense.weight@rank{r}", over: r, dim: 1, to: "layers.{i}.dense.weight"}
  - fuse: {from: "layer_{i+2:02d}.dense.bias@rank{r}", over: r, mode: sum, to: "layers.{i}.dense.bias",
           when: gpt_j_residual}
  - fuse: {from: "layer_{i+2:02d}.dense.bias@rank{r}", over: r, mode: replicated, to: "layers.{i}.dense.bias",
           when: not gpt_j_residual}
  - fuse: {from: "layer_{i+2:02d}.ln.{wb}@rank{r}", over: r, mode: replicated, to: "layers.{i}.ln.{wb}",
           optional: true}
  - drop: {from: "layer_{i+2:02d}.qkv._extra_state@rank{r}", restore: {shape: [0], dtype: uint8},
           note: FP8 metadata}
"""


def manifest(layers: int = 2, tp: int = 2, hidden: int = 4) -> dict[str, TensorMeta]:
    m = {}
    for i in range(layers):
        for r in range(tp):
            p = f"layer_{i + 2:02d}"
            m[f"{p}.qkv.weight@rank{r}"] = TensorMeta((3 * hidden // tp, hidden), torch.bfloat16)
            m[f"{p}.qkv.bias@rank{r}"] = TensorMeta((3 * hidden // tp,), torch.bfloat16)
            m[f"{p}.dense.weight@rank{r}"] = TensorMeta((hidden, hidden // tp), torch.bfloat16)
            m[f"{p}.dense.bias@rank{r}"] = TensorMeta((hidden,), torch.bfloat16)
            m[f"{p}.qkv._extra_state@rank{r}"] = TensorMeta((0,), torch.uint8)
    return m


@pytest.fixture
def rules():
    return load_rule_text(RULES, name="tp-merge.yaml")


def test_plan_is_built_from_metadata_and_explains_every_tensor(rules):
    plan = mapper.compile(rules, manifest(), {"num_layers": 2})
    assert sorted(plan.targets) == sorted(
        f"layers.{i}.{k}" for i in range(2) for k in ["qkv.weight", "qkv.bias", "dense.weight", "dense.bias"]
    )
    assert plan.targets["layers.1.dense.weight"].meta == TensorMeta((4, 4), torch.bfloat16)
    text = plan.explain()
    assert "layer_03.dense.weight@rank{0..1} -> fuse(dim=1, over=r) -> layers.1.dense.weight  bfloat16[4, 4]" in text
    assert "layer_02.qkv._extra_state@rank{0..1}" not in text  # each drop is listed on its own
    assert "-> (dropped: FP8 metadata)" in text
    assert plan.rules_for(["layers.0.dense.bias"]) == ["tp-merge#3"]


def test_when_conditions_pick_the_row_parallel_bias_rule(rules):
    summed = mapper.compile(rules, manifest(), {"num_layers": 2, "gpt_j_residual": 1})
    assert summed.rules_for(["layers.0.dense.bias"]) == ["tp-merge#2"]


def test_all_problems_are_reported_together_with_the_nearest_rule(rules):
    m = manifest()
    del m["layer_03.qkv.weight@rank1"]  # a missing TP shard
    m["layer_02.mlp.fc1_weight@rank0"] = TensorMeta((8, 4), torch.bfloat16)  # no rule for it
    m["layer_02.dense.weight@rank1"] = TensorMeta((5, 2), torch.bfloat16)  # shape mismatch
    with pytest.raises(CompileError) as caught:
        mapper.compile(rules, m, {"num_layers": 2})
    problems = caught.value.problems
    text = str(caught.value)
    assert len(problems) == 3, text
    assert "missing layer_03.qkv.weight@rank1" in text
    assert "layer_02.mlp.fc1_weight@rank0: no rule consumes this tensor" in text
    assert "nearest rule" in text
    assert "cannot concatenate bfloat16[4, 2] and bfloat16[5, 2]" in text
    assert "tp-merge.yaml:14 (rule 1, fuse) [tp-merge#1]: layers.0.dense.weight: fuse: cannot" in text  # the place to edit first


def test_a_whole_missing_layer_is_found(rules):
    with pytest.raises(CompileError, match=r"key\(s\) missing for i in 0..2, e.g. layer_04.qkv.weight@rank0"):
        mapper.compile(rules, manifest(layers=2), {"num_layers": 3})


def test_keys_beyond_a_placeholder_range_are_not_consumed(rules):
    with pytest.raises(CompileError) as caught:
        mapper.compile(rules, manifest(layers=3), {"num_layers": 2})
    unconsumed = [p.key for p in caught.value.problems if p.message == "no rule consumes this tensor"]
    assert len(unconsumed) == 10 and all(key.startswith("layer_04.") for key in unconsumed)
    text = str(caught.value)  # said once per pattern, not once per key
    assert "layer_04.qkv.{bias,weight}@rank*: no rule consumes this tensor (4 tensors, e.g. layer_04.qkv.weight@rank0)" in text
    assert "nearest rule: tp-merge#0 fuse 'layer_{i+2:02d}.qkv.{wb}@rank{r}' (it matches, but a placeholder is out of its range)" in text


def test_a_rule_that_matches_nothing_is_an_error_unless_optional(rules):
    m = {k: v for k, v in manifest().items() if "_extra_state" not in k}
    with pytest.raises(CompileError, match=r"matched no key \(pattern 'layer_\{i\+2:02d\}.qkv._extra_state"):
        mapper.compile(rules, m, {"num_layers": 2})


def test_expected_targets_and_shapes_are_checked(rules):
    plan = mapper.compile(rules, manifest(), {"num_layers": 2})
    expected = {k: v.meta.shape for k, v in plan.targets.items()}
    mapper.compile(rules, manifest(), {"num_layers": 2}, expected=expected)
    wrong = dict(expected)
    wrong.pop("layers.0.qkv.bias")
    wrong["layers.0.missing"] = (1,)
    wrong["layers.1.qkv.weight"] = (4, 12)
    with pytest.raises(CompileError) as caught:
        mapper.compile(rules, manifest(), {"num_layers": 2}, expected=wrong)
    text = str(caught.value)
    assert "layers.0.missing: expected in the target but no rule produces it" in text
    assert "layers.0.qkv.bias: produced but not expected" in text
    assert "layers.1.qkv.weight: shape [12, 4] but the target model expects [4, 12]" in text


def test_a_key_produced_twice_is_an_error(rules):
    text = RULES + '  - rename: {from: "extra.{i}", to: "layers.{i}.qkv.weight"}\n'
    m = {**manifest(), "extra.0": TensorMeta((1,), torch.float32), "extra.1": TensorMeta((1,), torch.float32)}
    with pytest.raises(CompileError, match=r"\[tp-merge#6\]: layers.\*.qkv.weight: produced twice") as caught:
        mapper.compile(load_rule_text(text), m, {"num_layers": 2})
    assert [p.key for p in caught.value.problems] == ["layers.0.qkv.weight", "layers.1.qkv.weight"]


def test_the_inverse_of_a_lossy_op_without_sidecar_or_default_is_refused_before_reading():
    text = RULES.replace("restore: {shape: [0], dtype: uint8},", "")
    rules = load_rule_text(text)
    plan = mapper.compile(rules, manifest(), {"num_layers": 2})
    with pytest.raises(CompileError, match="needs the sidecar") as caught:
        mapper.compile(rules.invert(), plan.target_manifest, {"num_layers": 2})
    assert "mapper/sidecar.safetensors" in str(caught.value)


def test_the_plan_knows_its_peak_memory(rules):
    plan = mapper.compile(rules, manifest(hidden=64), {"num_layers": 2})
    layer = [k for k in plan.targets if k.startswith("layers.0.")]
    other = [k for k in plan.targets if k.startswith("layers.1.")]
    one_layer = sum(plan.targets[k].meta.nbytes for k in layer)
    assert plan.peak_bytes([layer, other]) <= 2 * one_layer + 64
    assert plan.peak_bytes([layer + other]) > plan.peak_bytes([layer, other])
