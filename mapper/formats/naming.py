"""The NeoX key namespace, shared by readers and writers.

A NeoX tensor ``K`` of pipeline layer ``idx`` on tensor-parallel rank ``rank`` is named
``layer_{idx:02d}.{K}@rank{rank}`` whichever layout it was stored in, so one rule set serves the
pipeline layout (``layer_XX-model_YY-model_states.pt``) and the sequential layout
(``mp_rank_YY_model_states.pt`` holding ``sequential.{idx}.{K}``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mapper.errors import CheckpointError

NEOX_KEY = re.compile(r"^layer_(?P<idx>\d{2,})\.(?P<key>[^@]+)@rank(?P<rank>\d+)$")
LAYER_FILE = re.compile(r"^layer_(?P<idx>\d{2,})-model_(?P<rank>\d{2,})-model_states\.pt$")
MP_RANK_FILE = re.compile(r"^mp_rank_(?P<rank>\d{2,})_model_states\.pt$")
SEQUENTIAL_KEY = re.compile(r"^sequential\.(?P<idx>\d+)\.(?P<key>.+)$")


@dataclass(frozen=True, order=True)
class NeoXName:
    """One parsed NeoX key: pipeline layer index, TP rank and the key inside the layer."""

    idx: int
    rank: int
    key: str

    def __str__(self) -> str:
        return neox_key(self.idx, self.key, self.rank)


def neox_key(idx: int, key: str, rank: int) -> str:
    """``(2, "attention.qkv.weight", 1)`` -> ``"layer_02.attention.qkv.weight@rank1"``."""
    return f"layer_{idx:02d}.{key}@rank{rank}"


def parse_neox_key(name: str) -> NeoXName:
    """The inverse of :func:`neox_key`; a CheckpointError for anything else."""
    match = NEOX_KEY.match(name)
    if not match:
        raise CheckpointError(
            f"{name!r} is not a NeoX key",
            where=name,
            hint="NeoX keys look like 'layer_02.attention.qkv.weight@rank1' (layer index, key, TP rank)",
        )
    return NeoXName(int(match["idx"]), int(match["rank"]), match["key"])


def layer_file_name(idx: int, rank: int) -> str:
    """The pipeline-layout file DeepSpeed's ``PipelineModule.ckpt_layer_path`` names."""
    return f"layer_{idx:02d}-model_{rank:02d}-model_states.pt"


def mp_rank_file_name(rank: int) -> str:
    """The per-TP-rank file DeepSpeed's ``DeepSpeedEngine._get_ckpt_name`` names."""
    return f"mp_rank_{rank:02d}_model_states.pt"
