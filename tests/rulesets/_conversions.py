"""What every conversion of a NeoX checkpoint must satisfy (shared by the variant and switch-matrix tests)."""

from __future__ import annotations

from pathlib import Path

import torch

from mapper.checkpoints import ConversionResult, convert_checkpoint
from mapper.configs import NeoXModelConfig
from mapper.formats import NeoXCheckpoint
from mapper.hf_models import load_model
from mapper.ops import bitwise_equal
from mapper.verify import neox_forward


def same_tensors(a, b) -> bool:
    """Same keys, every tensor bit for bit (two open checkpoints of any format)."""
    keys_a, keys_b = sorted(a.manifest()), sorted(b.manifest())
    return keys_a == keys_b and all(bitwise_equal(a.get(k), b.get(k)) for k in keys_a)


def assert_converts_computes_the_same_and_round_trips(
    neox: Path, tensors: dict[str, torch.Tensor], config: NeoXModelConfig, out: Path, *, rules: str, seed: int = 7,
) -> ConversionResult:
    """NeoX -> HF with the rule set detection picks (``rules``); transformers loads it with no missing
    or unexpected key; its logits match NeoX's forward pass (1e-4, fp32); HF -> NeoX gives every
    original tensor back bit for bit at the same TP."""
    hf = convert_checkpoint(neox, out / "hf")
    assert hf.prepared.forward_rules.name == rules
    model = load_model(hf.output)  # refuses missing, unexpected or mismatched keys
    ids = torch.randint(0, config.orig_vocab_size or config.vocab_size, (2, 9),
                        generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        logits = model(ids).logits
    assert (logits - neox_forward(tensors, config, ids).logits).abs().max().item() <= 1e-4

    back = convert_checkpoint(hf.output, out / "neox-back")
    with NeoXCheckpoint(back.output) as returned, NeoXCheckpoint(neox) as original:
        assert returned.tp == config.tp
        assert same_tensors(original, returned)
    return hf
