"""Key patterns bind placeholders by matching, solve arithmetic, and format back."""

from __future__ import annotations

import pytest

from mapper.errors import RuleFileError
from mapper.expressions import evaluate, parse
from mapper.patterns import Pattern

PARAMS = {"num_layers", "tp"}
CHOICES = {"wb": ("weight", "bias")}


def bound(text: str, **values: int):
    return Pattern(text, PARAMS, CHOICES).bind({"num_layers": 4, "tp": 2, **values})


def test_pipeline_layer_index_is_solved_from_the_key():
    p = bound("layer_{i+2:02d}.attention.qkv.{wb}@rank{r}")
    assert p.match("layer_05.attention.qkv.bias@rank1") == {"i": 3, "wb": "bias", "r": 1}
    assert p.format({"i": 3, "wb": "bias", "r": 1}) == "layer_05.attention.qkv.bias@rank1"


def test_zero_padding_must_be_exact_and_three_digit_indices_work():
    p = bound("layer_{i+2:02d}.x")
    assert p.match("layer_5.x") is None
    assert p.match("layer_005.x") is None
    assert p.match("layer_101.x") == {"i": 99}
    assert p.match("layer_01.x") is None  # i would be -1


def test_parameter_only_fields_are_literals():
    p = bound("layer_{num_layers+3:02d}.norm.{wb}@rank{r}")
    assert p.match("layer_07.norm.weight@rank0") == {"wb": "weight", "r": 0}
    assert p.match("layer_08.norm.weight@rank0") is None


def test_string_placeholders_take_only_their_choices():
    p = bound("mlp.fc1_{wb}")
    assert p.match("mlp.fc1_weight") == {"wb": "weight"}
    assert p.match("mlp.fc1_extra") is None


def test_a_placeholder_used_twice_must_agree():
    p = bound("a{i}.b{i}")
    assert p.match("a1.b1") == {"i": 1}
    assert p.match("a1.b2") is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a{i}{j}", "two fields in a row"),
        ("a{i+j}", "at most one placeholder"),
        ("a{2*i}", "placeholder arithmetic"),
        ("a{wb+1}", "must stand alone"),
        ("a{i:x}", "format"),
        ("a{i", "unbalanced"),
        ("a{}", "empty field"),
    ],
)
def test_bad_patterns_are_explained(text, message):
    with pytest.raises(RuleFileError, match=message):
        Pattern(text, PARAMS, CHOICES)


def test_expressions_are_integer_arithmetic_and_nothing_else():
    assert evaluate("num_heads // tp * head_dim", {"num_heads": 8, "tp": 2, "head_dim": 4}) == 16
    assert evaluate("tied and not gpt_j_residual", {"tied": 1, "gpt_j_residual": 0}) == 1
    assert evaluate("a if a > b else b", {"a": 2, "b": 5}) == 5
    for hostile in ["__import__('os')", "x.attr", "[1, 2]", "1.5", "'s'", "lambda: 1"]:
        with pytest.raises(RuleFileError):
            parse(hostile)
    with pytest.raises(RuleFileError, match="undefined"):
        evaluate("missing + 1", {})
    with pytest.raises(RuleFileError, match="divides by zero"):
        evaluate("1 // tp", {"tp": 0})
