"""Findings are said once per pattern of keys, and "nearest" means the same module first."""

from __future__ import annotations

from mapper.engine.nearest import nearest
from mapper.errors import CompileError, Problem
from mapper.keyfold import fold_keys


def keys(*layers: int, parts=("key", "query", "value"), kinds=("bias", "weight"), ranks=(0, 1)) -> list[str]:
    return [f"layer_{layer:02d}.attention.qkv.{part}_{kind}@rank{rank}"
            for layer in layers for part in parts for kind in kinds for rank in ranks]


def test_keys_fold_into_patterns_that_stand_only_for_keys_that_exist():
    assert fold_keys(keys(2, 3)) == [("layer_*.attention.qkv.{key,query,value}_{bias,weight}@rank*", keys(2, 3))]
    assert fold_keys(keys(2)) == [("layer_02.attention.qkv.{key,query,value}_{bias,weight}@rank*", keys(2))]
    # query_bias and key_weight differ in two names: two patterns, not {key,query}_{bias,weight}
    odd = keys(2, parts=("query",), kinds=("bias",)) + keys(2, parts=("key",), kinds=("weight",))
    assert [pattern for pattern, _ in fold_keys(odd)] == [
        "layer_02.attention.qkv.query_bias@rank*", "layer_02.attention.qkv.key_weight@rank*"]


def test_problems_are_grouped_by_what_they_say_and_keep_every_key():
    unconsumed = [Problem("no rule consumes this tensor", key=k, hint="nearest rule: r#0") for k in keys(2, 3)]
    missing = Problem("matched no key (pattern 'x')", rule="f#0", origin="rules/f.yaml:11 (rule 0, rename)")
    error = CompileError([missing, *unconsumed, Problem("no rule consumes this tensor", key="extra@rank0")])
    lines = [line for line in str(error).splitlines() if line.startswith("  - ")]
    assert lines == [
        "  - rules/f.yaml:11 (rule 0, rename) [f#0]: matched no key (pattern 'x')",
        "  - layer_*.attention.qkv.{key,query,value}_{bias,weight}@rank*: no rule consumes this tensor "
        "(24 tensors, e.g. layer_02.attention.qkv.key_bias@rank0)",
        "  - extra@rank0: no rule consumes this tensor",
    ]
    assert "(26 problems of 3 kinds)" in str(error)
    assert [g["count"] for g in error.to_dict()["groups"]] == [0, 24, 1]
    assert error.to_dict()["groups"][1]["keys"] == keys(2, 3)


def test_a_group_of_a_few_keys_names_each():
    error = CompileError([Problem("no rule consumes this tensor", key=f"layer_02.mlp.mystery.weight@rank{r}") for r in (0, 1)])
    assert ("layer_02.mlp.mystery.weight@rank*: no rule consumes this tensor (2 tensors: "
            "layer_02.mlp.mystery.weight@rank0, layer_02.mlp.mystery.weight@rank1)") in str(error)


def test_nearest_compares_the_module_path_first_then_the_leaf():
    in_play = ["layer_*.mlp.layer_norm_bias@rank*", "layer_*.mlp.fc*_weight@rank*"]
    assert nearest("layer_*.input_layernorm.*@rank*", in_play) is None  # shared letters, another module
    assert nearest("layer_*.input_layernorm.*@rank*", [*in_play, "layer_*.input_layernorm.norm.weight@rank*"]) == (
        "layer_*.input_layernorm.norm.weight@rank*")
    rules = ["layer_*.*._extra_state@rank*", "layer_*.mlp.linear*.*@rank*", "layer_*.attention.qkv.*@rank*"]
    assert nearest("layer_*.attention.qkv.key_bias@rank*", rules) == "layer_*.attention.qkv.*@rank*"
    assert nearest("layer_*.mlp.mystery.weight@rank*", rules) == "layer_*.mlp.linear*.*@rank*"
