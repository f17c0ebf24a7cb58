"""The HuggingFace side, from transformers itself: which tensors a config's model expects.

Compile checks a conversion's output against the key set and shapes that transformers would save
for the target config (built on the meta device: no memory, no download), so a missing bias or a
wrong MLP width is an error before a byte is written, not a warning from ``from_pretrained``.
transformers is optional for converting; without it this check is skipped (and said so).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mapper.errors import CheckpointError, MapperError


def transformers_available() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def config_object(config: Mapping[str, Any]) -> Any:
    """A transformers config object from a ``config.json`` dict."""
    from transformers import AutoConfig

    data = dict(config)
    model_type = data.pop("model_type", None)
    if model_type is None:
        raise CheckpointError("config.json has no model_type", hint="add model_type (gpt_neox or llama)")
    for key in ("architectures", "transformers_version"):
        data.pop(key, None)
    try:
        return AutoConfig.for_model(model_type, **data)
    except (ValueError, KeyError) as error:
        raise CheckpointError(f"transformers cannot build a {model_type!r} config: {error}") from None


def expected_tensors(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Key -> shape of every tensor ``save_pretrained`` writes for this config (tied ones excluded)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config_object(config))
    state = model.state_dict()
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    for key in tied:
        state.pop(key, None)
    try:  # transformers renames some keys when saving (GPT-NeoX: lm_head -> embed_out)
        from transformers.core_model_loading import revert_weight_conversion

        state = revert_weight_conversion(model, state)
    except ImportError:  # older transformers 5.x: names are saved as they are
        pass
    return {key: tuple(tensor.shape) for key, tensor in dict(state).items()}


def load_model(folder: Path, *, dtype: torch.dtype = torch.float32) -> Any:
    """``from_pretrained`` on a local folder, refusing missing or unexpected keys."""
    if not transformers_available():
        raise MapperError(
            "verification needs transformers", hint="pip install 'mapper[verify]' (or transformers>=5)"
        )
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            str(folder), dtype=dtype, output_loading_info=True, local_files_only=True
        )
    except (OSError, ValueError) as error:
        raise CheckpointError(f"transformers cannot load this folder: {error}", where=folder) from None
    problems = {k: sorted(v) for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if problems:
        raise CheckpointError(
            f"transformers loaded the model with {problems}", where=folder,
            hint="the folder does not hold what its config.json describes; convert it again",
        )
    return model.eval()
