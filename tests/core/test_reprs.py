"""Printing a result in a notebook or a log gives a summary line, not the whole plan.

A real model's plan, configs and sidecar are megabytes; the dataclass reprs dumped all of it
(246 KB for a tiny model)."""

from __future__ import annotations

from pathlib import Path

from mapper.checkpoints import convert_checkpoint
from mapper.testing import synthesize_variant, write_neox_checkpoint


def test_a_conversion_result_prepared_plan_and_sidecar_print_as_one_short_line(tmp_path: Path):
    config, tensors = synthesize_variant("te-full-fp8", tp=2, seed=0)
    neox = write_neox_checkpoint(tensors, config, tmp_path / "neox", tokenizer=True)
    result = convert_checkpoint(neox, tmp_path / "hf", trim_vocab=100)

    text = repr(result)
    assert text.startswith("ConversionResult(wrote ") and str(tmp_path / "hf") in text
    assert f"{result.report.tensors} tensors" in text and "neox-to-hf-gpt-neox" in text
    prepared, plan, sidecar = repr(result.prepared), repr(result.prepared.plan), repr(result.report.sidecar)
    assert prepared.startswith("Prepared(neox-to-hf, ") and f"{len(result.prepared.plan.targets)} tensors to write" in prepared
    assert plan.startswith("Plan('neox-to-hf-gpt-neox'") and f"{len(result.prepared.plan.sources)} source" in plan
    assert sidecar.startswith("Sidecar('neox-to-hf-gpt-neox'") and f"{len(result.report.sidecar)} entries" in sidecar
    for line in (text, prepared, plan, sidecar, repr(result.report)):
        assert "\n" not in line and len(line) < 400, line
        assert "tensor([" not in line  # no tensor values
