"""Against the real gpt-neox (opt-in): its own model code, run by the shipped dump script.

Skipped unless ``MAPPER_GPT_NEOX`` names a gpt-neox checkout (its ``megatron/``) whose Python
(``MAPPER_GPT_NEOX_PYTHON``, default this one) has gpt-neox's requirements: torch, DeepSpeed
installed with ``DS_BUILD_OPS=0``, ``setuptools<81``, transformers 4.38 (docs/verification.md says
how, and records the run). ``MAPPER_GPT_NEOX_LEGACY`` may name a checkout from before gpt-neox
#1212 (legacy ``dense_h_to_4h`` and ``w1/w2/w3`` names), which is also before #1315 and #1345.

For each non-TE variant at TP 1 and 2 (TP 2 as two gloo processes on CPU), both checkpoint
layouts: a synthetic checkpoint is written with a config gpt-neox accepts, mapper converts it, the
script dumps gpt-neox's activations, and ``verify --reference`` must pass; a broken conversion must
not. Against the legacy code, mapper's built-in reference with ``gqa_layout: pre-1315`` and
``rmsnorm_formula: pre-1345`` must reproduce gpt-neox's own activations.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import mapper
from mapper.configs import NeoXModelConfig
from mapper.testing import synthesize_variant, write_neox_checkpoint
from mapper.verify import ReferenceDump, reference_script, verify_against_reference, write_builtin_dump
from mapper.verify.compare import judge

CURRENT = os.environ.get("MAPPER_GPT_NEOX")
LEGACY = os.environ.get("MAPPER_GPT_NEOX_LEGACY")
PYTHON = os.environ.get("MAPPER_GPT_NEOX_PYTHON", sys.executable)
needs_current = pytest.mark.skipif(not CURRENT, reason="set MAPPER_GPT_NEOX to a gpt-neox checkout to run")
needs_legacy = pytest.mark.skipif(not LEGACY, reason="set MAPPER_GPT_NEOX_LEGACY to a pre-#1212 gpt-neox checkout")


def neox_checkpoint(tmp_path: Path, variant: str, tp: int, layout: str = "pipeline") -> tuple[Path, NeoXModelConfig, dict]:
    """A synthetic checkpoint whose configs/ gpt-neox itself accepts (with an HFTokenizer of the
    checkpoint's vocabulary: gpt-neox sizes the padded vocabulary from its tokenizer)."""
    from tokenizers import Tokenizer, models

    config, tensors = synthesize_variant(variant, tp=tp)
    root = write_neox_checkpoint(tensors, config, tmp_path / "neox", layout=layout)  # type: ignore[arg-type]
    vocab = {f"t{i}": i for i in range(config.orig_vocab_size - 1)}
    vocab["<|endoftext|>"] = config.orig_vocab_size - 1
    Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>")).save(str(tmp_path / "tokenizer.json"))
    settings = config.to_neox_yaml()
    for key in ("vocab-size", "padded-vocab-size"):  # not gpt-neox arguments: it derives them
        settings.pop(key, None)
    settings.update({"tokenizer-type": "HFTokenizer", "vocab-file": str(tmp_path / "tokenizer.json")})
    (root / "global_step100" / "configs" / "model.yml").write_text(yaml.safe_dump(settings, sort_keys=False))
    return root, config, tensors


def gpt_neox_dump(tmp_path: Path, checkpoint: Path, source: str, *extra: str) -> Path:
    """Run the script as ``mapper reference-script`` prints it, with gpt-neox's Python."""
    script = tmp_path / "neox_reference_dump.py"
    script.write_text(reference_script())
    out = tmp_path / "reference.safetensors"
    done = subprocess.run([PYTHON, str(script), "--checkpoint", str(checkpoint), "--out", str(out), "--device", "cpu",
                           *extra], cwd=source, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


@needs_current
@pytest.mark.parametrize(("variant", "tp", "layout"), [
    ("neox-new", 1, "pipeline"),  # sequential residual, tied, tanh GELU, rotary 50%
    ("neox-new", 2, "sequential"),  # mp_rank files
    ("neox-parallel", 2, "pipeline"),  # gpt-j residual (row-parallel biases per rank), untied
    ("llama-new", 1, "pipeline"),  # RMSNorm, SwiGLU [up; gate], GQA
    ("llama-new", 2, "pipeline"),
    ("mistral", 1, "pipeline"),  # sliding window (flash in the config; on CPU the script's global path masks it)
    ("mistral", 2, "sequential"),
])
def test_mapper_conversion_verifies_against_gpt_neox(tmp_path: Path, variant: str, tp: int, layout: str) -> None:
    neox, config, _ = neox_checkpoint(tmp_path, variant, tp, layout)
    hf = mapper.convert_checkpoint(neox, tmp_path / "hf").output
    dump = gpt_neox_dump(tmp_path, neox, CURRENT)
    assert ReferenceDump(dump).metadata["tp"] == str(tp)
    report = verify_against_reference(dump, hf)
    assert report.ok, report.render()
    assert report.settings and all(s.ok for s in report.settings)


@needs_current
def test_a_broken_conversion_fails_against_gpt_neox(tmp_path: Path) -> None:
    """The HF model's gate and up halves swapped: loads and runs, and gpt-neox says no at block 0."""
    from safetensors.torch import load_file, save_file

    neox, _, _ = neox_checkpoint(tmp_path, "llama-new", 2)
    hf = mapper.convert_checkpoint(neox, tmp_path / "hf").output
    shard = next(hf.glob("model*.safetensors"))
    tensors = load_file(shard)
    gate, up = "model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight"
    tensors[gate], tensors[up] = tensors[up].clone(), tensors[gate].clone()
    save_file(tensors, shard, metadata={"format": "pt"})
    report = verify_against_reference(gpt_neox_dump(tmp_path, neox, CURRENT), hf)
    assert report.first_divergence is not None and report.first_divergence.name == "blocks.0", report.render()
    assert [p.name for p in report.blame.parts if not p.ok] == ["blocks.0.mlp"]


@needs_legacy
@pytest.mark.parametrize(("variant", "tp"), [("neox-legacy", 2), ("llama-legacy", 1)])
def test_legacy_gpt_neox_matches_the_builtin_reference_with_its_history(tmp_path: Path, variant: str, tp: int) -> None:
    """Code from before #1212 is also from before #1315 (GQA rows per query head) and #1345
    (RMSNorm x / (rms + eps)): with those settings mapper's reading of NeoX is gpt-neox's."""
    neox, config, tensors = neox_checkpoint(tmp_path, variant, tp)
    real = ReferenceDump(gpt_neox_dump(tmp_path, neox, LEGACY))
    history = config.model_copy(update={"gqa_layout": "pre-1315", "rmsnorm_formula": "pre-1345"})
    ours = ReferenceDump(write_builtin_dump(tensors, history, tmp_path / "ours.safetensors", real.get("input_ids")))
    for name in ["embeddings", *(f"blocks.{i}" for i in range(config.num_layers)), "final_norm", "logits"]:
        point = judge(name, real.get(name), ours.get(name), atol=1e-6, rtol=1e-5)
        assert point.ok, (name, point.why())
    if config.is_gqa:  # and the current layout is not what that code computed
        now = config.model_copy(update={"gqa_layout": "current", "rmsnorm_formula": "current"})
        current = ReferenceDump(write_builtin_dump(tensors, now, tmp_path / "now.safetensors", real.get("input_ids")))
        assert not judge("blocks.0", real.get("blocks.0"), current.get("blocks.0"), atol=1e-6, rtol=1e-5).ok


@needs_current
def test_the_sliding_window_of_gpt_neox_is_the_width_plus_the_token_itself(tmp_path: Path) -> None:
    """gpt-neox's window (mask ``triu(diagonal=-W)``, flash-attn ``window_size=(W, -1)``): W + 1 keys.
    mapper's reading with width W agrees with it; W + 1, or no window, does not."""
    neox, config, tensors = neox_checkpoint(tmp_path, "mistral", 1)
    real = ReferenceDump(gpt_neox_dump(tmp_path, neox, CURRENT))
    assert real.get("input_ids").shape[1] > config.sliding_window_width + 1
    for width, agrees in ((config.sliding_window_width, True), (config.sliding_window_width + 1, False), (None, False)):
        ours = ReferenceDump(write_builtin_dump(tensors, config.model_copy(update={"sliding_window_width": width}),
                                                tmp_path / f"ours-{width}.safetensors", real.get("input_ids")))
        assert judge("logits", real.get("logits"), ours.get("logits"), atol=1e-6, rtol=1e-5).ok is agrees, width


@needs_legacy
@pytest.mark.parametrize(("variant", "tp"), [("neox-legacy", 1), ("llama-legacy", 2), ("mistral-legacy", 2)])
def test_legacy_names_convert_and_verify_against_gpt_neox(tmp_path: Path, variant: str, tp: int) -> None:
    """Legacy names date a checkpoint before #1315 and #1345: mapper picks both layouts from the keys
    alone, and the conversion computes what that gpt-neox computed (the RMSNorm formula within the
    approximation it records)."""
    neox, _, _ = neox_checkpoint(tmp_path, variant, tp)
    hf = mapper.convert_checkpoint(neox, tmp_path / "hf").output
    report = verify_against_reference(gpt_neox_dump(tmp_path, neox, LEGACY), hf)
    assert report.ok, report.render()


@needs_current
@pytest.mark.parametrize(("variant", "to_tp", "layout"), [("neox-parallel", 1, "pipeline"), ("llama-new", 1, "sequential"),
                                                         ("neox-new", 4, "pipeline")])
def test_a_resharded_checkpoint_loads_in_gpt_neox_and_computes_the_same(
    tmp_path: Path, variant: str, to_tp: int, layout: str
) -> None:
    """`mapper convert --to neox --tp N`: gpt-neox itself loads the output (its configs, its TP degree,
    its layout; finetune-style, no optimizer state) and computes what the source computed."""
    source, config, _ = neox_checkpoint(tmp_path / "source", variant, 2)
    heads = config.num_heads
    if heads % to_tp:
        pytest.skip(f"{heads} heads do not split over {to_tp} ranks")
    out = mapper.convert_checkpoint(source, tmp_path / "resharded", to="neox", tp=to_tp, layout=layout).output
    before = ReferenceDump(gpt_neox_dump(tmp_path / "source", source, CURRENT))
    after = ReferenceDump(gpt_neox_dump(tmp_path / "resharded", out, CURRENT))
    assert after.metadata["tp"] == str(to_tp)
    for name in ["embeddings", *(f"blocks.{i}" for i in range(config.num_layers)), "final_norm", "logits"]:
        point = judge(name, before.get(name), after.get(name), atol=1e-5, rtol=1e-4)
        assert point.ok, (name, point.why())
