"""The converted HF model, one stage at a time: its embedding, each decoder layer, the final norm
and the output layer, each callable on any input (the reference's, for judging a point on the
same input; its own, for the end-to-end run).

Two sources: a model in memory (:class:`LoadedHF`, what the library's ``verify_conversion`` is
given) and an HF folder streamed from disk (:class:`StreamedHF`): transformers builds the model on
the meta device and each stage is materialised from the safetensors files only while it runs, so
verifying holds one decoder layer (plus the embedding or output layer at the ends), not the model.

A decoder layer needs what the model's own forward passes it (causal mask, rotary tables,
position ids...), which differs between transformers versions. Rather than rebuilding it, the
model's forward is run up to its first layer and the arguments it passes there are kept
(:func:`layer_arguments`); every layer of these models is called with the same ones.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mapper.configs import TARGETS
from mapper.errors import CheckpointError, MapperError

Tensor = torch.Tensor


@dataclass(frozen=True)
class HFParts:
    """Where the stages live in a transformers causal LM (GPTNeoX, or Llama's layout)."""

    base: nn.Module
    embedding: nn.Module
    layers: list[nn.Module]
    final_norm: nn.Module
    head: nn.Module


def hf_parts(model: nn.Module) -> HFParts:
    """``gpt_neox.embed_in/layers/final_layer_norm`` + ``embed_out``, or ``model.embed_tokens/layers/norm``
    + ``lm_head``."""
    base = getattr(model, "base_model", model)
    layers = getattr(base, "layers", None)
    norm = getattr(base, "final_layer_norm", None)
    norm = getattr(base, "norm", None) if norm is None else norm
    embedding = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if layers is None or norm is None or embedding is None or head is None:
        raise MapperError(f"cannot find the embedding, decoder layers, final norm and output layer in "
                          f"{type(model).__name__}",
                          hint=f"mapper verifies {', '.join(t.architecture for t in TARGETS.values())} models")
    return HFParts(base, embedding, list(layers), norm, head)


def first_tensor(output: Any) -> Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


class _Reached(Exception):
    """Raised by the hook on the first layer once its arguments are kept."""


def layer_arguments(model: nn.Module, parts: HFParts, input_ids: Tensor) -> tuple[Tensor, dict[str, Any]]:
    """The first layer's input (the embeddings) and the keyword arguments the model's forward
    passes to every layer, from a forward that stops at the first layer."""
    kept: dict[str, Any] = {}

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        kept["x"] = args[0] if args else kwargs.pop("hidden_states")
        kept["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _Reached

    handle = parts.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(input_ids=input_ids, use_cache=False)
    except _Reached:
        pass
    finally:
        handle.remove()
    if "x" not in kept:
        raise MapperError("the HF model's forward never reached its first decoder layer")
    return kept["x"].detach(), kept["kwargs"]


class HFStages:
    """The common part: call a stage, given the model skeleton and where stages come from."""

    def __init__(self, model: nn.Module, dtype: torch.dtype, device: torch.device | str):
        self.model, self.dtype, self.device = model, dtype, torch.device(device)
        self.parts = hf_parts(model)
        self.kwargs: dict[str, Any] = {}
        self.was_training = model.training
        model.eval()

    @property
    def num_layers(self) -> int:
        return len(self.parts.layers)

    @property
    def vocab(self) -> int:
        return int(self.model.config.vocab_size)

    def stage(self, module: nn.Module) -> Any:  # a context manager giving the ready module
        raise NotImplementedError

    def start(self, input_ids: Tensor) -> Tensor:
        """The embeddings of ``input_ids`` (layer 0's input); keeps the layer arguments for this batch."""
        with self.stage(self.parts.embedding):
            x, self.kwargs = layer_arguments(self.model, self.parts, input_ids.to(self.device))
        return x.to(self.dtype)

    @contextmanager
    def layer(self, index: int) -> Iterator[Callable[[Tensor], Tensor]]:
        """Decoder layer ``index`` ready to run (``run(x)``); ``module`` attribute for hooks."""
        with self.stage(self.parts.layers[index]) as module:
            def run(x: Tensor) -> Tensor:
                with torch.no_grad():
                    return first_tensor(module(x.to(self.device, self.dtype), **self.kwargs))
            run.module = module  # type: ignore[attr-defined]
            yield run

    @contextmanager
    def norm(self) -> Iterator[Callable[[Tensor], Tensor]]:
        with self.stage(self.parts.final_norm) as norm:
            yield lambda x: first_tensor(norm(x.to(self.device, self.dtype)))

    @contextmanager
    def head(self) -> Iterator[Callable[[Tensor], Tensor]]:
        with self.stage(self.parts.head) as head:
            yield lambda h: head(h.to(self.device, self.dtype))

    def close(self) -> None:
        self.model.train(self.was_training)


class LoadedHF(HFStages):
    """A model already in memory; a stage held in another dtype or device runs as a cast copy
    (one stage at a time, never the whole model)."""

    def __init__(self, model: nn.Module, *, dtype: torch.dtype, device: torch.device | str = "cpu"):
        super().__init__(model, dtype, device)

    @contextmanager
    def stage(self, module: nn.Module) -> Iterator[nn.Module]:
        params = list(module.parameters())
        same = all(p.dtype == self.dtype and p.device == self.device for p in params if p.is_floating_point())
        if same:
            yield module
            return
        if module is self.parts.embedding:  # run inside the model's forward: cast in place, then back
            originals = {name: p.data for name, p in module.named_parameters()}
            for p in module.parameters():
                p.data = p.data.to(self.device, self.dtype)
            try:
                yield module
            finally:
                for name, p in module.named_parameters():
                    p.data = originals[name]
            return
        yield copy.deepcopy(module).to(self.device, self.dtype)


class StreamedHF(HFStages):
    """An HF folder: the model built on the meta device, each stage loaded only while it runs."""

    def __init__(self, folder: Path, *, dtype: torch.dtype, device: torch.device | str = "cpu"):
        from mapper.formats import open_checkpoint
        from mapper.formats.hf import HFCheckpoint
        from mapper.hf_models import config_object

        reader = open_checkpoint(folder)
        if not isinstance(reader, HFCheckpoint) or reader.config is None:
            raise CheckpointError(f"{folder} is not an HF model folder with config.json", where=folder,
                                  hint="pass the folder `mapper convert` wrote")
        self.reader = reader
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config_object(reader.config), attn_implementation="sdpa",
                                                     dtype=dtype)
        super().__init__(model, dtype, device)
        self.manifest = reader.manifest()
        self.names = {id(m): name for name, m in model.named_modules()}
        rotary = getattr(self.parts.base, "rotary_emb", None)
        if rotary is not None:  # its tables are computed at construction: build it for real
            with torch.device(self.device):
                self.parts.base.rotary_emb = type(rotary)(config=model.config)

    def _file_key(self, name: str) -> str:
        if name in self.manifest:
            return name
        for alias in _ALIASES.get(name, ()):
            if alias in self.manifest:
                return alias
        if name.endswith(("lm_head.weight", "embed_out.weight")) and getattr(self.model.config, "tie_word_embeddings", False):
            for key in ("gpt_neox.embed_in.weight", "model.embed_tokens.weight"):
                if key in self.manifest:
                    return key
        raise CheckpointError(f"the HF folder has no tensor {name!r}", where=self.reader.path,
                              hint="the folder does not hold the model its config.json describes")

    @contextmanager
    def stage(self, module: nn.Module) -> Iterator[nn.Module]:
        """``module`` with its weights from the files: the mapped tensors themselves when they are
        already in the compute dtype (no copy; their pages leave with the module), else cast
        copies. Back on the meta device afterwards."""
        prefix = self.names[id(module)]
        state = {}
        for name in module.state_dict():
            full = f"{prefix}.{name}" if prefix else name
            state[name] = self.reader.get(self._file_key(full)).to(self.device, self.dtype)
        module.load_state_dict(state, strict=True, assign=True)
        del state
        try:
            yield module
        finally:
            module.to("meta")

    def close(self) -> None:
        super().close()
        self.reader.close()


_ALIASES = {"lm_head.weight": ("embed_out.weight",), "embed_out.weight": ("lm_head.weight",)}
