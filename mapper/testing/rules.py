"""A hand-written rule-set header for tests that build small rule files around it."""

from __future__ import annotations

RULE_SET_HEADER = """\
schema_version: 1
name: demo
version: 1.0.0
description: a small rule set
source: neox
target: hf-gpt-neox
parameters:
  num_layers: {description: transformer layers}
  tp: {default: 1}
placeholders: {i: num_layers, r: tp, wb: [weight, bias]}
"""  # 10 lines: "rules:" goes on line 11, the first rule on line 12
