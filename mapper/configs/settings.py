"""Where each model setting lives outside mapper: its NeoX key and its HF ``config.json`` field.

A :class:`NeoX` marker is attached to every field of :class:`~mapper.configs.model.NeoXModelConfig`
(``Annotated[int, NeoX("num_attention_heads", hf="num_attention_heads")]``), so the model
description is the one table both directions read: :mod:`mapper.configs.neox_yaml` builds a model
from NeoX YAML and writes it back, :mod:`mapper.configs.hf` copies the plain HF fields. Settings
that need a computation (the HF activation name, the MLP width...) are functions in those modules.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel


@dataclass(frozen=True)
class NeoX:
    """The NeoX side of a model setting.

    ``key`` is the NeoX key in its underscore spelling; ``also`` are other keys NeoX reads for the
    same setting (older spellings, or a switch that implies it: ``te_fp8_mha`` turns on
    ``te_mha``); ``write=False`` keeps a value out of the NeoX YAML mapper writes (NeoX refuses
    keys it does not know). ``hf`` names the HF ``config.json`` field holding the same value in every
    HF architecture (fields only some architectures have are declared by the architecture:
    :class:`mapper.configs.hf.HFTarget`); a dotted name is a nested field
    (``rope_parameters.rope_theta``); ``negate`` says the HF boolean is the opposite one
    (``no_weight_tying`` / ``tie_word_embeddings``). ``mapper_only`` marks what only mapper knows
    (the code history of a checkpoint): it can be set with ``--set`` but is no NeoX key.
    """

    key: str
    also: tuple[str, ...] = ()
    write: bool = True
    hf: str | None = None
    negate: bool = False
    mapper_only: bool = False


def neox(key: str, *, also: tuple[str, ...] = (), write: bool = True, hf: str | None = None,
         negate: bool = False, mapper_only: bool = False) -> NeoX:
    """Shorthand for a :class:`NeoX` marker."""
    return NeoX(key, also, write, hf, negate, mapper_only)


def settings(model: type[BaseModel]) -> Iterator[tuple[str, NeoX]]:
    """(field name, marker) of every field of ``model`` that carries a :class:`NeoX` marker."""
    for name, info in model.model_fields.items():
        for item in info.metadata:
            if isinstance(item, NeoX):
                yield name, item
                break


def nested_get(data: Mapping[str, Any], dotted: str) -> Any:
    """``data["a"]["b"]`` for ``"a.b"``; None when any level is missing."""
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def nested_set(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        data = data.setdefault(part, {})
    data[leaf] = value
