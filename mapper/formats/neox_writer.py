"""Writing GPT-NeoX checkpoints in the pipeline or the sequential layout, loadable by NeoX/DeepSpeed.

Output (``tag`` defaults to ``global_step0``)::

    OUT/latest                                   the tag, as DeepSpeed's save_checkpoint writes it
    OUT/<tag>/layer_XX-model_YY-model_states.pt  pipeline layout: torch.save of a plain {key: tensor} dict
    OUT/<tag>/mp_rank_YY_model_states.pt         DeepSpeed's per-TP-rank state (below); in the
                                                 sequential layout its ``module`` holds every tensor
                                                 of the rank as ``sequential.{idx}.{key}``
    OUT/<tag>/configs/<config_name>              the NeoX YAML config, when given

The sequential layout has one file per rank, so writing it holds a whole rank's tensors at once;
the pipeline layout holds one layer file's.

Why the ``mp_rank`` files: ``DeepSpeedEngine._load_checkpoint`` globs ``mp_rank_*_model_states.pt``
in the tag folder and loads the one of its TP rank first (``SDLoaderBase.check_ckpt_list``
asserts there is at least one and, if it has ``mp_world_size``, that the file count equals it);
for a pipeline model ``PipelineEngine.load_module_state_dict`` then sees ``module`` is None and
loads the layer files (``PipelineModule.load_state_dir``). It reads ``dp_world_size``
unconditionally; with ``load_module_only`` (NeoX: ``finetune: true``, or ``no_load_optim: true``)
nothing else. A full resume would need optimizer, scheduler and RNG states that a converted
model does not have, so these files hold only plain data (no class is pickled)::

    module=None, buffer_names=[], optimizer=None, lr_scheduler=None,
    sparse_tensor_module_names=set(), skipped_steps=0, global_steps=N, global_samples=0,
    dp_world_size=1, mp_world_size=tp, iteration=N (NeoX reads it unless finetune),
    mapper={"version": ..., "load_with": ...}

NeoX's ``args`` entry is left out on purpose: ``megatron/checkpointing.py`` asserts every saved
arg equals the running config, and a partial dict would only add ways to fail. Load the result
with ``finetune: true`` (or ``no_load_optim: true`` and ``no_load_rng: true``).

Layer files are written in ``torch.save``'s format with every tensor's bytes streamed in
(:mod:`mapper.formats.torch_zip`): a tensor-parallel shard of an HF weight along dim 0 is copied
file to file in the kernel, a strided shard a block of rows at a time, and a view never drags its
whole storage into the file (which ``torch.save`` of the view itself would write).
"""

from __future__ import annotations

import re
import threading
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from mapper.version import __version__
from mapper.errors import ConversionError, MapperError
from mapper.formats.naming import layer_file_name, mp_rank_file_name, parse_neox_key
from mapper.formats.output import AtomicFile, Cancelled, write_bytes_atomic
from mapper.formats.torch_zip import write_torch_save
from mapper.formats.writing import PlannedFile, StagedWriter
from mapper.keyorder import natural_key
from mapper.tensors import LazyConcat, Manifest, materialize

TAG = re.compile(r"^[A-Za-z0-9_.+-]+$")
LOAD_WITH = "finetune: true (or no_load_optim: true and no_load_rng: true)"


def save(obj: object, f: AtomicFile) -> None:
    """``torch.save`` into ``f``, reporting a failed write (full disk...) rather than the error
    torch raises when it then cannot finish the zip file."""
    try:
        torch.save(obj, f)  # type: ignore[arg-type]  # anything with write() and flush()
    except BaseException:
        f.raise_failure()
        raise


def iteration_of(tag: str) -> int:
    match = re.fullmatch(r"global_step(\d+)", tag)
    return int(match.group(1)) if match else 0


def mp_rank_state(tp: int, iteration: int) -> dict[str, Any]:
    """The plain-data DeepSpeed state of one TP rank (see the module docstring)."""
    return {
        "module": None,
        "buffer_names": [],
        "optimizer": None,
        "lr_scheduler": None,
        "sparse_tensor_module_names": set(),
        "skipped_steps": 0,
        "global_steps": iteration,
        "global_samples": 0,
        "dp_world_size": 1,
        "mp_world_size": tp,
        "iteration": iteration,
        "mapper": {"version": __version__, "load_with": LOAD_WITH},
    }


def plan_layer_files(manifest: Manifest, tp: int, tag: str = "global_step0", layout: str = "pipeline") -> list[PlannedFile]:
    """One pipeline layer file per (layer, rank), every layer on all ``tp`` ranks (sequential
    layout: one ``mp_rank`` file per rank)."""
    if not manifest:
        raise ConversionError("nothing to write: the target manifest is empty", hint="check the rule set")
    files: dict[tuple[int, int], list[str]] = defaultdict(list)
    for key in manifest:
        try:
            name = parse_neox_key(key)
        except MapperError as exc:
            raise ConversionError(exc.message, where=key, hint=exc.hint) from exc
        if name.rank >= tp:
            raise ConversionError(
                f"TP rank {name.rank} but the writer was given tp={tp}",
                where=key,
                hint="pass the number of TP ranks the rules produce as tp",
            )
        files[(name.idx, name.rank)].append(key)
    layers = sorted({idx for idx, _ in files})
    missing = [(idx, r) for idx in layers for r in range(tp) if (idx, r) not in files]
    if missing:
        shown = ", ".join(f"layer {i} rank {r}" for i, r in missing[:10])
        raise ConversionError(
            f"{len(missing)} layer files would be missing a TP rank ({shown})",
            where=f"layer_{missing[0][0]:02d}",
            hint=f"every layer needs tensors for all {tp} TP ranks",
        )
    plan = []
    if layout == "sequential":
        for rank in range(tp):
            keys = sorted((k for (_, r), ks in files.items() if r == rank for k in ks), key=natural_key)
            plan.append(PlannedFile(f"{tag}/{mp_rank_file_name(rank)}", tuple(keys), tuple(manifest[k] for k in keys)))
        return plan
    for idx, rank in sorted(files):
        keys = sorted(files[(idx, rank)], key=natural_key)
        plan.append(PlannedFile(f"{tag}/{layer_file_name(idx, rank)}", tuple(keys), tuple(manifest[k] for k in keys)))
    return plan


class NeoXWriter(StagedWriter):
    """A Sink writing a NeoX pipeline-layout checkpoint from ``layer_XX.K@rankR`` keys."""

    kind = "neox"
    writes_lazy = True  # streams LazyConcat parts into the file (mapper.tensors.LazyConcat)

    def __init__(
        self,
        out_dir: str | Path,
        *,
        yaml_config: dict[str, Any] | None,
        tp: int,
        tag: str = "global_step0",
        config_name: str = "config.yml",
        layout: str = "pipeline",
        parts: tuple[int, int] | None = None,
        force: bool = False,
        inputs: Iterable[str | Path] = (),
        background: bool = True,
    ):
        if not isinstance(tp, int) or tp < 1:
            raise ConversionError(f"tp={tp!r} must be a positive integer", hint="the number of TP ranks")
        for name, value in (("tag", tag), ("config_name", config_name)):
            if not TAG.match(value) or value in (".", ".."):
                raise ConversionError(
                    f"{name}={value!r} is not a plain file name",
                    hint="use letters, digits and _ . + - only, e.g. global_step0",
                )
        if layout not in ("pipeline", "sequential"):
            raise ConversionError(f"layout {layout!r} is not pipeline or sequential", hint="--layout pipeline|sequential")
        self.yaml_config = dict(yaml_config) if yaml_config is not None else None
        self.layout = layout
        self.tp = tp
        self.tag = tag
        self.config_name = config_name
        super().__init__(out_dir, parts=parts, force=force, inputs=inputs, background=background)

    def _options(self) -> dict[str, Any]:
        return {
            "yaml_config": self.yaml_config,
            "tp": self.tp,
            "tag": self.tag,
            "config_name": self.config_name,
            "layout": self.layout,
        }

    def _plan(self, manifest: Manifest) -> list[PlannedFile]:
        return plan_layer_files(manifest, self.tp, self.tag, self.layout)

    def _write_file(
        self, folder: Path, planned: PlannedFile, tensors: Mapping[str, torch.Tensor], stop: threading.Event
    ) -> None:
        if stop.is_set():
            raise Cancelled(f"writing was cancelled before {planned.name}")
        if self.layout == "sequential":  # DeepSpeed's rank state with the module inside: a nested pickle,
            module = {}                     # written by torch.save (one file per rank holds the rank anyway)
            for key in planned.keys:
                name = parse_neox_key(key)
                module[f"sequential.{name.idx}.{name.key}"] = materialize(tensors[key]).clone(memory_format=torch.contiguous_format)
            path = folder / planned.name
            path.parent.mkdir(parents=True, exist_ok=True)
            with AtomicFile(path, needed=planned.nbytes, total=self._total_bytes(), sync=False) as f:
                save({**mp_rank_state(self.tp, iteration_of(self.tag)), "module": module}, f)
            return
        state: dict[str, torch.Tensor | LazyConcat] = {parse_neox_key(key).key: tensors[key] for key in planned.keys}
        # The writer's own dict (StagedWriter._write_file): emptied, so each tensor's memory goes
        # once it is written, as `state` lets go of it.
        owned = isinstance(tensors, dict) and tensors.keys() == set(planned.keys)
        if owned:
            tensors.clear()  # type: ignore[attr-defined]
        path = folder / planned.name
        path.parent.mkdir(parents=True, exist_ok=True)
        with AtomicFile(path, needed=planned.nbytes, total=self._total_bytes(), sync=False) as f:
            write_torch_save(f, state, stop=stop, release=True)

    @classmethod
    def _write_extras(cls, folder: Path, plan: Sequence[PlannedFile], options: Mapping[str, Any]) -> None:
        tag, tp = str(options["tag"]), int(options["tp"])
        tag_dir = folder / tag
        tag_dir.mkdir(parents=True, exist_ok=True)
        if options.get("layout", "pipeline") == "pipeline":  # the sequential layout's rank files hold the module
            for rank in range(tp):
                with AtomicFile(tag_dir / mp_rank_file_name(rank)) as f:
                    save(mp_rank_state(tp, iteration_of(tag)), f)
        if options.get("yaml_config") is not None:
            (tag_dir / "configs").mkdir(exist_ok=True)
            text = yaml.safe_dump(options["yaml_config"], sort_keys=False)
            write_bytes_atomic(tag_dir / "configs" / str(options["config_name"]), text.encode("utf-8"))
        write_bytes_atomic(folder / "latest", tag.encode("utf-8"))
