"""Every mix of NeoX's Transformer Engine switches converts, computes the same function, and comes back.

For each of the 96 switch combinations (:func:`mapper.testing.matrix.switch_matrix`) at TP 1 and 2
(and a sample at TP 4): a tiny checkpoint in the real on-disk layout (pipeline or sequential,
FP8 ``_extra_state`` empty or not, tied or untied output), converted with the rule set the config
selects (some with the rotary buffer saved), must load in transformers with no missing or unexpected key, match NeoX's forward pass
(1e-4 on the logits, fp32), and come back from HF to NeoX at the same TP bit for bit, file by file.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from _conversions import assert_converts_computes_the_same_and_round_trips

from mapper.testing import synthesize_neox, write_neox_checkpoint
from mapper.testing.matrix import SwitchCase, switch_matrix

MATRIX = switch_matrix()
CASES = [(case, tp) for case in MATRIX for tp in (1, 2)] + [(case, 4) for case in MATRIX[5::12]]


def test_the_matrix_is_every_combination() -> None:
    names = {case.name for case in MATRIX}
    assert len(MATRIX) == len(names) == 2 * 2**4 * 2 + 2 * 2**4  # GPT-NeoX: both residual modes


@pytest.mark.parametrize(("case", "tp"), CASES, ids=[f"{case.name}-tp{tp}" for case, tp in CASES])
def test_switch_mix_converts_computes_the_same_and_round_trips(case: SwitchCase, tp: int, tmp_path: Path) -> None:
    index = MATRIX.index(case)
    config = case.config(tp=tp, no_weight_tying=bool((index + tp) % 2), num_heads=4 if tp < 4 else 8,
                         num_kv_heads=(2 if case.architecture == "llama" else 4) if tp < 4 else (8 if case.architecture == "gpt-neox" else 4))
    tensors = synthesize_neox(config, seed=index, extra_state="fp8" if index % 3 == 0 else "empty",
                              rotary_inv_freq=(index + tp) % 5 == 0)
    layout = "sequential" if (index + tp) % 4 == 0 else "pipeline"
    neox = write_neox_checkpoint(tensors, config, tmp_path / "neox", layout=layout)

    assert_converts_computes_the_same_and_round_trips(neox, tensors, config, tmp_path, rules=case.rule_set, seed=index)
