"""Reference dumps: the activations gpt-neox itself computed, as ``mapper verify --reference`` reads them.

A dump is a safetensors file written by ``neox_reference_dump.py`` (shipped in this package; ``mapper
reference-script`` prints it): ``input_ids`` [batch, seq], ``embeddings``, ``blocks.{i}``,
``final_norm``, ``logits`` and, with the sequential residual, ``blocks.{i}.after_attention``; its
metadata names the format (:data:`FORMAT`), dtype, TP degree, config hash and gpt-neox's effective
model settings (``neox_settings``, JSON). Points are read one at a time, so a dump of any size is
verified holding two or three activations.

:func:`write_builtin_dump` writes the same format from mapper's built-in reference (for tests, and
to see what a dump holds without a gpt-neox environment).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from mapper.configs import NeoXModelConfig
from mapper.errors import CheckpointError, MapperError
from mapper.formats.output import AtomicFile
from mapper.formats.safetensors_io import map_tensor, read_header, write_safetensors
from mapper.dtypes import dtype_from_name

FORMAT = "mapper-neox-reference/1"
SCRIPT = "neox_reference_dump.py"


def reference_script() -> str:
    """The text of the self-contained dump script (torch + gpt-neox only)."""
    return resources.files("mapper.verify").joinpath(SCRIPT).read_text(encoding="utf-8")


def config_sha256(merged_yaml: Mapping[str, Any]) -> str:
    """The hash the dump script records: sha256 of the merged config (``_`` spelling) as sorted JSON."""
    normalized = {str(k).replace("-", "_"): v for k, v in merged_yaml.items()}
    return hashlib.sha256(json.dumps(normalized, sort_keys=True, default=str).encode()).hexdigest()


class ReferenceDump:
    """An open dump: metadata at once, points on demand."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError("no such reference dump", where=self.path,
                                  hint="pass the .safetensors file neox_reference_dump.py wrote")
        self._header = read_header(self.path)
        self.metadata: dict[str, str] = dict(self._header.metadata)
        if self.metadata.get("format") != FORMAT:
            raise CheckpointError(f"not a reference dump (format {self.metadata.get('format')!r}, expected {FORMAT!r})",
                                  where=self.path, hint="write it with `mapper reference-script`'s script")
        self.keys = set(self._header.entries)
        self.num_layers = sum(1 for k in self.keys if k.startswith("blocks.") and k.count(".") == 1)
        missing = [k for k in ("input_ids", "embeddings", "final_norm", "logits",
                               *(f"blocks.{i}" for i in range(self.num_layers))) if k not in self.keys]
        if missing:
            raise CheckpointError(f"the reference dump lacks {', '.join(missing)}", where=self.path,
                                  hint="the dump was cut short; write it again")

    def get(self, name: str) -> torch.Tensor:
        return map_tensor(self.path, self._header.entries[name]).clone()

    def has(self, name: str) -> bool:
        return name in self.keys

    @property
    def dtype(self) -> torch.dtype:
        return dtype_from_name(self.metadata.get("dtype", "float32"))

    @property
    def settings(self) -> dict[str, Any]:
        """gpt-neox's effective model settings, as the script read them off NeoXArgs."""
        try:
            return {k: v for k, v in json.loads(self.metadata.get("neox_settings", "{}")).items() if v is not None}
        except json.JSONDecodeError:
            return {}

    def model_config(self) -> NeoXModelConfig | None:
        """The NeoX model config gpt-neox ran with (None when the dump does not say)."""
        settings = self.settings
        if not settings:
            return None
        try:
            return NeoXModelConfig.from_neox_yaml(settings, tp=int(self.metadata.get("tp", 1)),
                                                  padded_vocab_size=int(self.get("logits").shape[-1]))
        except MapperError:
            return None

    def describe(self) -> str:
        m = self.metadata
        commit = m.get("gpt_neox_commit", "unknown")
        return (f"gpt-neox's own forward ({'commit ' + commit[:12] if commit != 'unknown' else 'commit unknown'}), "
                f"{m.get('dtype')} on {m.get('device')}, TP {m.get('tp')}, dumped in {self.path.name}")


def write_dump(path: str | Path, points: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> Path:
    """Write a dump (atomically) in the script's format."""
    path = Path(path)
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in points.items()}
    with AtomicFile(path) as f:
        write_safetensors(f, tensors, {"format": FORMAT, **metadata})
    return path


def write_builtin_dump(
    tensors: Mapping[str, torch.Tensor], config: NeoXModelConfig, path: str | Path, input_ids: torch.Tensor, *,
    dtype: torch.dtype = torch.float32, config_yaml: Mapping[str, Any] | None = None,
) -> Path:
    """A dump computed by mapper's built-in reference (what the script writes, same points)."""
    from mapper.verify.reference import NeoXStages, load_norm

    stages = NeoXStages(tensors, config, dtype=dtype)
    points: dict[str, torch.Tensor] = {"input_ids": input_ids.long()}
    x = points["embeddings"] = stages.embeddings(input_ids)
    for block in range(config.num_layers):
        layer = stages.layer(config.block_layer_index(block))
        if not config.gpt_j_residual:
            points[f"blocks.{block}.after_attention"] = _after_attention(x, layer, config, load_norm)
        x = points[f"blocks.{block}"] = stages.block(block, x, layer)
    h = points["final_norm"] = stages.final_norm(x)
    points["logits"] = stages.logits(h)
    settings = {k.replace("-", "_"): v for k, v in config.to_neox_yaml().items()}
    settings["num_attention_heads"] = config.num_heads
    return write_dump(path, points, {
        "tokens": "given", "dtype": str(dtype).removeprefix("torch."), "device": "cpu", "tp": str(config.tp),
        "world_size": str(config.tp), "gpt_neox_commit": "unknown", "producer": "mapper built-in reference",
        "config_sha256": config_sha256(config_yaml) if config_yaml is not None else "",
        "neox_settings": json.dumps(settings, default=str),
    })


def _after_attention(x: torch.Tensor, layer: Any, config: NeoXModelConfig, load_norm: Any) -> torch.Tensor:
    """The residual stream after the attention (sequential residual): x + attention(ln1(x))."""
    from mapper.verify.reference import apply_norm, attention_block, per_rank_outputs

    with torch.no_grad():
        attn = attention_block(apply_norm(x, load_norm(layer, "input_layernorm", config)), layer, config)
        return x + per_rank_outputs(attn, gpt_j_residual=False)[0]
