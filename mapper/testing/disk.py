"""Synthetic checkpoints on disk, in the layouts GPT-NeoX/DeepSpeed really write.

Used by the tests, the demo and the benchmark: the readers must meet the same files a user has,
including the training state DeepSpeed stores beside the weights in ``mp_rank_*`` files.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import torch
import yaml

from mapper.configs import NeoXModelConfig
from mapper.formats.naming import layer_file_name, mp_rank_file_name, parse_neox_key
from mapper.testing.tokenizer import write_tiny_tokenizer

Layout = Literal["pipeline", "sequential"]


def write_neox_checkpoint(
    tensors: Mapping[str, torch.Tensor],
    config: NeoXModelConfig,
    root: Path,
    *,
    layout: Layout = "pipeline",
    tag: str = "global_step100",
    tokenizer: bool = False,
) -> Path:
    """Save flattened NeoX ``tensors`` under ``root/<tag>/`` with ``latest`` and ``configs/``.

    Returns ``root`` (what a user passes to mapper). Pipeline layout: one
    ``layer_XX-model_YY-model_states.pt`` per layer and rank, plus ``mp_rank`` files holding only
    training state; sequential layout: one ``mp_rank`` file per rank with ``sequential.N.key``.
    ``tokenizer`` adds the tiny word-level tokenizer (:mod:`mapper.testing.tokenizer`) beside
    ``latest``, named by the config as a training cluster's path would (found by its file name).
    """
    folder = root / tag
    folder.mkdir(parents=True, exist_ok=True)
    by_file: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name = parse_neox_key(key)
        by_file.setdefault((name.idx, name.rank), {})[name.key] = tensor.contiguous()
    ranks = sorted({rank for _, rank in by_file})
    iteration = int(tag.removeprefix("global_step")) if tag.startswith("global_step") else 0
    if layout == "pipeline":
        for (idx, rank), state in sorted(by_file.items()):
            torch.save(state, folder / layer_file_name(idx, rank))
    for rank in ranks:
        module = None
        if layout == "sequential":
            module = {f"sequential.{idx}.{k}": t for (idx, r), s in sorted(by_file.items()) if r == rank for k, t in s.items()}
        torch.save(_training_state(module, len(ranks), iteration), folder / mp_rank_file_name(rank))
    (folder / "configs").mkdir(exist_ok=True)
    neox_yaml = config.to_neox_yaml()
    if tokenizer:
        write_tiny_tokenizer(root, config.orig_vocab_size or 100)
        neox_yaml.update({"tokenizer-type": "HFTokenizer", "vocab-file": "/cluster/data/tokenizer.json"})
    (folder / "configs" / "model.yml").write_text(yaml.safe_dump(neox_yaml, sort_keys=False))
    (root / "latest").write_text(tag)
    return root


def _training_state(module: object, tp: int, iteration: int) -> dict[str, object]:
    """What DeepSpeed + NeoX store beside the weights (plain data only)."""
    return {
        "module": module,
        "buffer_names": [],
        "optimizer": None,
        "lr_scheduler": {"num_iters": iteration},
        "sparse_tensor_module_names": set(),
        "skipped_steps": 0,
        "global_steps": iteration,
        "global_samples": iteration * 8,
        "dp_world_size": 1,
        "mp_world_size": tp,
        "ds_config": {"train_batch_size": 8},
        "ds_version": "0.14.0",
        "iteration": iteration,
    }
