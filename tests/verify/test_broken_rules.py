"""Deliberately wrong rule sets must be caught, at the right point, with the broken rule blamed.

Each test copies the shipped ``rules/`` tree, changes one thing the way a person could get it
wrong, converts a synthetic checkpoint with it, loads the result into a transformers model and
verifies. Every one of these conversions loads without a complaint: shapes are right, only the
function is wrong, which is the failure this project exists for (gpt-neox#1353).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

import mapper
from mapper.errors import VerificationFailed
from mapper.verify import VerifyReport, verify_conversion

GPT_NEOX_MLP_TE = "fragments/gpt-neox/names-mlp-te.yaml"
TE_NORM_RENAME = '''  - rename:
      from: "layer_{i+2:02d}.mlp.layer_norm_{wb}@rank{r}"
      to: "gpt_neox.layers.{i}.post_attention_layernorm.{wb}@rank{r}"
'''


def rule_at(ruleset: mapper.RuleSet, path: Path, line: int) -> str:
    """The id of the rule written in ``path`` that spans ``line`` (the last one starting at or before it)."""
    starts = []
    for op in ruleset.ops:
        found = re.match(r"^(.*):(\d+) \(", ruleset.origin(op.id) or "")
        if found and Path(found.group(1)).resolve() == path.resolve() and int(found.group(2)) <= line:
            starts.append((int(found.group(2)), op.id or ""))
    assert starts, f"no rule of {path} at line {line}"
    return max(starts)[1]


def line_of(path: Path, snippet: str) -> int:
    text = path.read_text(encoding="utf-8")
    return text[: text.index(snippet)].count("\n") + 1


def assert_caught(report: VerifyReport, broken_rule: str, *, point: str = "blocks.0", part: str | None = None) -> None:
    """Verification failed, first at ``point``, the blamed rules include ``broken_rule``."""
    assert not report.ok
    first = report.first_divergence
    assert first is not None and first.name == point, report.render()
    assert all(p.ok for p in report.points[: report.points.index(first)])
    assert report.blame is not None
    blamed = [r.rule for r in report.blame.rules]
    assert broken_rule in blamed, report.render()
    if part is not None:
        differing = [p.name for p in report.blame.parts if not p.ok]
        assert differing == [f"{point}.{part}"], report.render()
    with pytest.raises(VerificationFailed) as caught:
        report.raise_if_failed()
    assert point in str(caught.value) and broken_rule in str(caught.value)
    assert caught.value.exit_code == 1


class MLPWithOwnNorm(nn.Module):
    """The custom HF MLP of the first #1353 workaround: a TE-LayerNormMLP look-alike with its own
    LayerNorm (``mlp.layer_norm.*``) in front of the stock dense layers."""

    def __init__(self, mlp: nn.Module, hidden: int, eps: float):
        super().__init__()
        self.layer_norm = nn.LayerNorm(hidden, eps=eps)
        self.dense_h_to_4h, self.act, self.dense_4h_to_h = mlp.dense_h_to_4h, mlp.act, mlp.dense_4h_to_h

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(self.layer_norm(hidden_states))))


def own_norm_mlps(model: nn.Module) -> None:
    for layer in model.gpt_neox.layers:
        layer.mlp = MLPWithOwnNorm(layer.mlp, model.config.hidden_size, model.config.layer_norm_eps)


@pytest.mark.parametrize("tp", [1, 2])
def test_double_layernorm_of_issue_1353(rule_copy, convert, tp: int) -> None:
    """TE's pre-MLP LayerNorm applied twice.

    Models the first workaround for gpt-neox#1353: the converter gave the HF model a custom MLP
    that, like TE's LayerNormMLP, carries its own LayerNorm, filled it with TE's
    ``mlp.layer_norm_*`` *and* still mapped the same norm to ``post_attention_layernorm``, so the
    HF layer computes ``mlp(LN(LN(h)))``. The broken rule copies the norm to both places (a
    ``split`` in replicated mode); the model is stock GPT-NeoX with that custom MLP swapped in.
    """
    path = rule_copy.edit(GPT_NEOX_MLP_TE, TE_NORM_RENAME, '''  - split:
      from: "layer_{i+2:02d}.mlp.layer_norm_{wb}@rank{r}"
      to: ["gpt_neox.layers.{i}.post_attention_layernorm.{wb}@rank{r}", "gpt_neox.layers.{i}.mlp.layer_norm.{wb}@rank{r}"]
      mode: replicated
      note: BROKEN - the norm also goes into the custom MLP
  - fuse:
      from: "gpt_neox.layers.{i}.mlp.layer_norm.{wb}@rank{r}"
      over: r
      mode: replicated
      to: "gpt_neox.layers.{i}.mlp.layer_norm.{wb}"
''')
    rules = mapper.load_rules(rule_copy.path("neox-te-to-hf-gpt-neox"))
    broken = rule_at(rules, path, line_of(path, "mode: replicated\n      note: BROKEN"))
    c = convert("te-full", rules, tp=tp, customize=own_norm_mlps)
    report = verify_conversion(c.neox, c.config, c.model, plan=c.conversion.plan)
    assert_caught(report, broken, part="mlp")


def stale_norm_mapped(rule_copy) -> tuple[mapper.RuleSet, str]:  # type: ignore[no-untyped-def]
    """The TE rule set with the stale ``post_attention_layernorm`` mapped instead of TE's
    ``mlp.layer_norm_*`` (which is dropped instead), and the id of the broken rule."""
    path = rule_copy.edit(GPT_NEOX_MLP_TE, TE_NORM_RENAME, TE_NORM_RENAME.replace(
        "mlp.layer_norm_{wb}@rank{r}", "post_attention_layernorm.{wb}@rank{r}"))
    rule_copy.edit(GPT_NEOX_MLP_TE, "stale_norm: [post_attention_layernorm.weight, post_attention_layernorm.bias,",
                   "stale_norm: [mlp.layer_norm_weight, mlp.layer_norm_bias,")
    rules = mapper.load_rules(rule_copy.path("neox-te-to-hf-gpt-neox"))
    return rules, rule_at(rules, path, line_of(path, 'from: "layer_{i+2:02d}.post_attention_layernorm.{wb}'))


def test_stale_post_attention_norm_mapped(rule_copy, convert) -> None:
    """The pre-fix official converter: the stale ``post_attention_layernorm`` (ones/zeros, never used
    by TE LayerNormMLP) becomes HF's pre-MLP norm and TE's real ``mlp.layer_norm_*`` is dropped."""
    rules, broken = stale_norm_mapped(rule_copy)
    c = convert("te-full", rules, tp=2)
    stale = c.neox["layer_02.post_attention_layernorm.weight@rank0"]
    assert torch.equal(stale, torch.ones_like(stale))  # as pre-fix checkpoints hold it
    report = verify_conversion(c.neox, c.config, c.model, plan=c.conversion.plan)
    assert_caught(report, broken, part="mlp")
    assert any("layer_02.mlp.layer_norm_weight@rank{0..1}" in d for d in report.blame.dropped)  # the real norm


@pytest.mark.parametrize(("variant", "rule_set", "fragment", "order", "tp"), [
    ("llama-new", "neox-llama-to-hf-llama", "fragments/llama/names-mlp.yaml", ("up_proj", "gate_proj"), 2),
    ("llama-te", "neox-llama-te-to-hf-llama", "fragments/llama/names-mlp-te.yaml", ("gate_proj", "up_proj"), 1),
])
def test_swapped_gate_and_up(rule_copy, convert, variant: str, rule_set: str, fragment: str,
                             order: tuple[str, str], tp: int) -> None:
    """Gate and up halves swapped: NeoX's ``linear1`` is [up; gate] per shard, TE's ``fc1`` is
    [gate; up]; reading one as the other is the easiest mistake in a gated MLP."""
    first, second = order
    old = f'to: ["model.layers.{{i}}.mlp.{first}.{{wb}}@rank{{r}}", "model.layers.{{i}}.mlp.{second}.{{wb}}@rank{{r}}"]'
    new = f'to: ["model.layers.{{i}}.mlp.{second}.{{wb}}@rank{{r}}", "model.layers.{{i}}.mlp.{first}.{{wb}}@rank{{r}}"]'
    path = rule_copy.edit(fragment, old, new)
    rules = mapper.load_rules(rule_copy.path(rule_set))
    broken = rule_at(rules, path, line_of(path, new))
    c = convert(variant, rules, tp=tp)
    report = verify_conversion(c.neox, c.config, c.model, plan=c.conversion.plan)
    assert_caught(report, broken, part="mlp")


def test_te_per_group_qkv_read_as_neox_blocks(rule_copy, convert) -> None:
    """TE's fused GQA QKV (per kv group: its query heads, then k, then v) read as NeoX's
    [Q | K | V] blocks: same shapes, heads scrambled. TP=1, so each rank holds two kv groups: with
    one group per rank (TP=2 here) the two layouts coincide and the same rules are right."""
    fragment = "fragments/llama/names-attention-te.yaml"
    text = (rule_copy.root / fragment).read_text(encoding="utf-8")
    start = text.index("  - unflatten:")
    old = text[start:text.index("  - rename:", start)]
    new = '''  - split:
      from: "layer_{i+2:02d}.attention.qkv.{wb}@rank{r}"
      to: ["model.layers.{i}.self_attn.q_proj.{wb}@rank{r}", "model.layers.{i}.self_attn.k_proj.{wb}@rank{r}", "model.layers.{i}.self_attn.v_proj.{wb}@rank{r}"]
      sizes: ["num_heads // tp * head_dim", "num_kv_heads // tp * head_dim", "num_kv_heads // tp * head_dim"]
      note: BROKEN - NeoX GQA blocks instead of TE groups
'''
    path = rule_copy.edit(fragment, old, new)
    rules = mapper.load_rules(rule_copy.path("neox-llama-te-to-hf-llama"))
    broken = rule_at(rules, path, line_of(path, "note: BROKEN"))
    c = convert("llama-te", rules, tp=1)
    report = verify_conversion(c.neox, c.config, c.model, plan=c.conversion.plan)
    assert_caught(report, broken, part="attention")


def test_neox_gqa_blocks_read_as_te_groups(rule_copy, convert) -> None:
    """The opposite mistake: a non-TE GQA checkpoint ([Q | K | V] blocks per rank) converted with
    the TE attention rules, i.e. its rows taken as per-group interleaved."""
    fragment = "fragments/llama/names-attention-te.yaml"
    path = rule_copy.edit(fragment, '"layer_{i+2:02d}.attention.qkv.{wb}@rank{r}"',
                          '"layer_{i+2:02d}.attention.query_key_value.{wb}@rank{r}"')
    rule_copy.edit(fragment, '"layer_{i+2:02d}.attention.proj.{wb}@rank{r}"', '"layer_{i+2:02d}.attention.dense.{wb}@rank{r}"')
    rule_copy.edit("neox-llama-to-hf-llama.yaml", "  - {path: fragments/llama/names-attention-te.yaml, when: te_mha}\n", "")
    rule_copy.edit("neox-llama-to-hf-llama.yaml", "fragments/llama/names-attention.yaml",
                   "fragments/llama/names-attention-te.yaml")
    rules = mapper.load_rules(rule_copy.path("neox-llama-to-hf-llama"))
    broken = rule_at(rules, path, line_of(path, "attention.query_key_value.{wb}"))
    c = convert("llama-new", rules, tp=1)
    assert c.config.is_gqa
    report = verify_conversion(c.neox, c.config, c.model, plan=c.conversion.plan)
    assert_caught(report, broken, part="attention")


def test_row_parallel_bias_summed_without_gpt_j_residual(rule_copy, convert) -> None:
    """The official converter sums row-parallel biases across ranks; that is right only under
    gpt-j-residual. Forced here on a sequential-residual TP=2 model: attention-out and MLP-out
    biases come out doubled."""
    fragment = "fragments/gpt-neox/tp-merge.yaml"
    path = rule_copy.edit(fragment, "      when: gpt_j_residual\n", "      when: tp > 0\n")
    rule_copy.edit(fragment, "      when: not gpt_j_residual\n", "      when: tp < 0\n")
    rules = mapper.load_rules(rule_copy.path("neox-to-hf-gpt-neox"))
    broken = rule_at(rules, path, line_of(path, "when: tp > 0"))
    c = convert("neox-sequential", rules, tp=2)
    assert not c.config.gpt_j_residual
    report = verify_conversion(c.neox, c.config, c.model, plan=c.conversion.plan)
    assert_caught(report, broken)
    assert {p.name for p in report.blame.parts if not p.ok} == {"blocks.0.attention", "blocks.0.mlp"}


def test_caught_in_bf16_too(rule_copy, convert) -> None:
    """Comparing in the training precision (looser tolerance) still catches the #1353 mistake."""
    rules, broken = stale_norm_mapped(rule_copy)
    c = convert("te-full", rules, tp=1)
    report = verify_conversion(c.neox, c.config, c.model, plan=c.conversion.plan, dtype=torch.bfloat16)
    assert report.dtype == "bfloat16"
    assert_caught(report, broken, part="mlp")


def test_without_plan_names_the_tensors(rule_copy, convert) -> None:
    """No plan: no rules to name, but the report still says which HF tensors feed the divergence."""
    rule_copy.edit("fragments/llama/names-mlp.yaml",
                   'to: ["model.layers.{i}.mlp.up_proj.{wb}@rank{r}", "model.layers.{i}.mlp.gate_proj.{wb}@rank{r}"]',
                   'to: ["model.layers.{i}.mlp.gate_proj.{wb}@rank{r}", "model.layers.{i}.mlp.up_proj.{wb}@rank{r}"]')
    c = convert("llama-new", mapper.load_rules(rule_copy.path("neox-llama-to-hf-llama")))
    report = verify_conversion(c.neox, c.config, c.model)
    assert not report.ok and report.blame is not None and not report.blame.rules
    assert "model.layers.0.mlp.gate_proj.weight" in report.blame.keys
    assert "model.layers.0.self_attn.q_proj.weight" not in report.blame.keys
    with pytest.raises(VerificationFailed, match="blocks.0"):
        report.raise_if_failed()

