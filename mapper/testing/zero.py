"""Synthetic bf16/fp16 NeoX runs with ZeRO optimizer shards laid out as DeepSpeed lays them out.

:func:`write_zero_run` saves a synthetic model the way a mixed-precision GPT-NeoX run saves it:
the module weights (layer or ``mp_rank`` files, via :func:`~mapper.testing.write_neox_checkpoint`)
are the fp32 master weights rounded to bf16/fp16; beside them, per model-parallel rank, the
``mp_rank_XX_model_states.pt`` files carry DeepSpeed's ``param_shapes``/``buffer_names``, and
one optimizer file per DP rank carries that rank's part of the flat fp32 masters, as written by:

- ``BF16_Optimizer.state_dict`` (``optimizer="bf16"``): each param group flattened, zero-padded
  to a multiple of 2 x DP (``align_dense_tensors``, ``nccl_start_alignment_factor = 2``), cut
  into DP equal parts; every rank saves its part whole, the last records the padding;
- ``DeepSpeedZeroOptimizer.state_dict`` (``"zero1"``, ``"zero2"``): the same parts, each saved
  without its trailing padding (``_get_groups_without_padding``), optionally in ZeRO-2's
  round-robin parameter order (``_round_robin_reorder``).

Param groups follow NeoX's ``get_params_for_weight_decay_optimization`` (weights of non-norm
modules; norms and biases), parameter names DeepSpeed's ``named_parameters()`` of what it wraps
(``{idx}.{key}`` and ``tied_modules.embed.{key}`` for the pipeline module, ``sequential.{idx}.{key}``
for the sequential wrapper), and model-parallel ranks ``stage * tp + tp_rank``. DeepSpeed's
plain-data classes in these files (``fragment_address``, ``ZeroStageEnum``, ``LossScaler``) are
pickled under their DeepSpeed names from small stand-ins of ours; DeepSpeed itself is not needed.
The Adam moments are written too (random, the size of each part), so readers meet files whose
masters are a fraction of the bytes, as in real runs.
"""

from __future__ import annotations

import math
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import torch

from mapper.configs import NeoXModelConfig
from mapper.errors import MapperError
from mapper.formats.naming import mp_rank_file_name, parse_neox_key
from mapper.formats.zero import optim_file_name
from mapper.testing.disk import Layout, _training_state, write_neox_checkpoint
from mapper.testing.synth import synthesize_neox, tiny_config, variant

Optimizer = Literal["bf16", "zero1", "zero2"]
Edit = Callable[[int, int, dict[str, Any]], None]
DS_VERSION = "0.16.5"
TIED = "embed"  # NeoX's TiedLayerSpec key for the input/output embedding


# ---- DeepSpeed's plain-data classes, under their DeepSpeed names -----------------------------


@dataclass
class fragment_address:  # noqa: N801 -- DeepSpeed's name (deepspeed/utils/tensor_fragment.py)
    numel: int
    start: int


class ZeroStageEnum(int, Enum):  # deepspeed/runtime/zero/config.py
    disabled = 0
    optimizer_states = 1
    gradients = 2
    weights = 3


class LossScaler:  # deepspeed/runtime/fp16/loss_scaler.py: a static scale
    def __init__(self, scale: float = 1.0):
        self.cur_scale = scale
        self.dynamic = False


_STAND_INS = {
    "deepspeed.utils.tensor_fragment": fragment_address,
    "deepspeed.runtime.zero.config": ZeroStageEnum,
    "deepspeed.runtime.fp16.loss_scaler": LossScaler,
}


@contextmanager
def _deepspeed_names() -> Iterator[None]:
    """Make pickle name the stand-ins as DeepSpeed's classes while saving (nothing is imported;
    a real DeepSpeed already loaded in this process is left alone and its classes are not used)."""
    if "deepspeed" in sys.modules:
        raise MapperError("mapper.testing.zero pickles stand-ins under DeepSpeed's class names, which it "
                          "cannot do once deepspeed itself is imported", hint="run it without importing deepspeed")
    added: list[str] = []
    try:
        for module_name, cls in _STAND_INS.items():
            parts = module_name.split(".")
            for depth in range(1, len(parts) + 1):
                name = ".".join(parts[:depth])
                if name not in sys.modules:
                    sys.modules[name] = ModuleType(name)
                    added.append(name)
            cls.__module__ = module_name
            setattr(sys.modules[module_name], cls.__name__, cls)
        yield
    finally:
        for name in reversed(added):
            del sys.modules[name]
        for cls in _STAND_INS.values():
            cls.__module__ = __name__


for _cls in _STAND_INS.values():
    _cls.__module__ = __name__


# ---- the run -------------------------------------------------------------------------------


@dataclass
class ZeroRun:
    """What :func:`write_zero_run` wrote, and what a reader must give back."""

    root: Path  # what a user passes to mapper
    config: NeoXModelConfig
    masters: dict[str, torch.Tensor]  # NeoX key -> fp32 master (every trained parameter)
    module: dict[str, torch.Tensor]  # NeoX key -> module weight as saved (masters rounded; the rest)
    paddings: dict[tuple[int, int], int] = field(default_factory=dict)  # (mp rank, group) -> padding
    optimizer_files: list[Path] = field(default_factory=list)

    @property
    def folder(self) -> Path:
        return self.root / "global_step100"


def write_zero_run(
    variant_name: str,
    root: Path,
    *,
    tp: int = 1,
    dp: int = 2,
    pp: int = 1,
    layout: Layout = "pipeline",
    optimizer: Optimizer = "bf16",
    precision: Literal["bfloat16", "fp16"] = "bfloat16",
    round_robin: bool = False,
    weight_decay: bool = True,
    rotary_inv_freq: bool = False,
    seed: int = 0,
    ds_version: str | None = DS_VERSION,
    edit: Edit | None = None,
    **config_overrides: Any,
) -> ZeroRun:
    """Synthesize variant ``variant_name`` in fp32 (the masters) and save it under ``root`` as a
    ``precision`` run with ``dp`` x ``pp`` x ``tp`` ranks would (see the module docstring).

    ``edit(mp, dp, optimizer_state_dict)`` may change each optimizer file's state before it is
    saved (tests of what readers refuse)."""
    if layout == "sequential" and pp != 1:
        raise MapperError("the sequential layout has no pipeline stages (pp must be 1)")
    if optimizer == "bf16" and precision != "bfloat16":
        raise MapperError("BF16_Optimizer exists for bf16 runs only; use zero1/zero2 for fp16")
    if round_robin and optimizer != "zero2":
        raise MapperError("round-robin parameter order is a ZeRO-2 option")
    spec = variant(variant_name)
    config = tiny_config(variant_name, tp=tp, precision=precision, **config_overrides)
    weights = synthesize_neox(config, naming=spec.naming, seed=seed, extra_state=spec.extra_state,
                              rotary_inv_freq=rotary_inv_freq)
    low = config.dtype
    masters = {k: t for k, t in weights.items() if _is_parameter(k, t)}
    module = {k: t.to(low) if t.is_floating_point() else t for k, t in weights.items()}
    write_neox_checkpoint(module, config, root, layout=layout)
    run = ZeroRun(root, config, masters, module)
    folder = run.folder
    stages = _stages(sorted({parse_neox_key(k).idx for k in masters}), pp)
    for stage, layers in enumerate(stages):
        for rank in range(tp):
            mp = stage * tp + rank
            owned = _deepspeed_names_of(masters, config, layout, rank, layers, stage == pp - 1)
            groups = _param_groups(owned, masters, weight_decay)
            if round_robin:
                groups = [_round_robin(group, dp) for group in groups]
            buffers = [name for k, name in _deepspeed_names_of(
                {k: t for k, t in weights.items() if _is_buffer(k)}, config, layout, rank, layers, False)]
            _save_model_states(folder / mp_rank_file_name(mp), module, config, layout, rank, groups,
                               buffers, dp=dp, mp_world=pp * tp, ds_version=ds_version)
            for group_index, group in enumerate(groups):
                run.paddings[(mp, group_index)] = _padded_size(group, dp) - sum(t.numel() for _, _, t in group)
            run.optimizer_files += _save_optimizer_files(folder, mp, groups, dp=dp, optimizer=optimizer,
                                                         bf16=precision == "bfloat16", ds_version=ds_version,
                                                         weight_decay=weight_decay, edit=edit)
    return run


# ---- names, groups and stages ----------------------------------------------------------------


def _is_buffer(key: str) -> bool:
    return key.split("@")[0].endswith(".inv_freq")  # the rotary buffer NeoX may save


def _is_parameter(key: str, tensor: torch.Tensor) -> bool:
    """Trained parameters (those with a master): floats that are not buffers."""
    return tensor.is_floating_point() and not _is_buffer(key)


def _stages(layers: list[int], pp: int) -> list[list[int]]:
    """Contiguous blocks of layer indices, one per pipeline stage."""
    if pp > len(layers):
        raise MapperError(f"{pp} pipeline stages for {len(layers)} layers with parameters")
    size, extra = divmod(len(layers), pp)
    out, at = [], 0
    for stage in range(pp):
        take = size + (stage < extra)
        out.append(layers[at:at + take])
        at += take
    return out


def _deepspeed_names_of(tensors: Mapping[str, torch.Tensor], config: NeoXModelConfig, layout: Layout,
                        rank: int, layers: list[int], last_stage: bool) -> list[tuple[str, str]]:
    """(NeoX key, DeepSpeed parameter name) of one model-parallel rank's tensors, in module order:
    the pipeline module registers ``tied_modules`` before its numbered layers."""
    tied = config.tied and layout == "pipeline"
    first = min(layers) if layers else None
    tied_first: list[tuple[str, str]] = []
    numbered: list[tuple[str, str]] = []
    for key in tensors:
        name = parse_neox_key(key)
        if name.rank != rank:
            continue
        if tied and name.idx == 0 and (first == 0 or last_stage):
            tied_first.append((key, f"tied_modules.{TIED}.{name.key}"))
        elif name.idx in layers:
            prefix = "sequential." if layout == "sequential" else ""
            numbered.append((key, f"{prefix}{name.idx}.{name.key}"))
    return tied_first + numbered


def _no_weight_decay(key: str) -> bool:
    """NeoX puts norms' parameters and every parameter named ``bias`` in the no-decay group."""
    path = parse_neox_key(key).key.split(".")
    return path[-1] == "bias" or any(part.endswith("layernorm") or part == "norm" for part in path[:-1])


def _param_groups(owned: list[tuple[str, str]], masters: Mapping[str, torch.Tensor],
                  weight_decay: bool) -> list[list[tuple[str, str, torch.Tensor]]]:
    """NeoX's groups: [decayed, not decayed] (empty ones dropped), or one when weight decay is 0."""
    if not weight_decay:
        return [[(k, n, masters[k]) for k, n in owned]]
    decayed = [(k, n, masters[k]) for k, n in owned if not _no_weight_decay(k)]
    plain = [(k, n, masters[k]) for k, n in owned if _no_weight_decay(k)]
    return [group for group in (decayed, plain) if group]


def _round_robin(group: list[Any], dp: int) -> list[Any]:
    """ZeRO-2's ``_round_robin_reorder``: every dp-th parameter, starting at 0, then at 1, ..."""
    return [item for start in range(dp) for item in group[start::dp]]


def _padded_size(group: list[tuple[str, str, torch.Tensor]], dp: int) -> int:
    """The flat group's size after ``align_dense_tensors(..., 2 * dp)``."""
    numel = sum(t.numel() for _, _, t in group)
    align = 2 * dp
    return math.ceil(numel / align) * align if numel else 0


# ---- files ---------------------------------------------------------------------------------


def _save_model_states(file: Path, module: Mapping[str, torch.Tensor], config: NeoXModelConfig, layout: Layout,
                       rank: int, groups: list[list[tuple[str, str, torch.Tensor]]], buffers: list[str], *,
                       dp: int, mp_world: int, ds_version: str | None) -> None:
    """``DeepSpeedEngine._save_checkpoint``'s model-state file, with NeoX's client state."""
    weights = None
    if layout == "sequential":
        weights = {}
        for key, tensor in module.items():
            name = parse_neox_key(key)
            if name.rank == rank:
                weights[f"sequential.{name.idx}.{name.key}"] = tensor.contiguous()
    state = _training_state(weights, mp_world, 100)
    state.update(
        buffer_names=buffers,
        param_shapes=[OrderedDict((name, t.shape) for _, name, t in group) for group in groups],
        frozen_param_shapes=None,
        shared_params={},
        frozen_param_fragments=None,
        dp_world_size=dp,
        mp_world_size=mp_world,
        ds_version=ds_version,
    )
    torch.save(state, file)


def _save_optimizer_files(folder: Path, mp: int, groups: list[list[tuple[str, str, torch.Tensor]]], *, dp: int,
                          optimizer: Optimizer, bf16: bool, ds_version: str | None, weight_decay: bool,
                          edit: Edit | None) -> list[Path]:
    flats = []
    for group in groups:
        flat = torch.cat([t.reshape(-1) for _, _, t in group]) if group else torch.empty(0)
        flats.append(torch.cat([flat, torch.zeros(_padded_size(group, dp) - flat.numel())]))
    files = []
    for dp_rank in range(dp):
        parts, paddings, mappings = [], [], []
        for group, flat in zip(groups, flats):
            size = flat.numel() // dp
            start = dp_rank * size
            numel = sum(t.numel() for _, _, t in group)
            part = flat[start:start + size].clone().requires_grad_(True)
            if optimizer == "bf16":  # BF16_Optimizer: the last rank records the whole padding
                padding = flat.numel() - numel if dp_rank == dp - 1 else 0
            else:  # DeepSpeedZeroOptimizer: each rank's own trailing padding
                padding = size if numel <= start else max(0, start + size - numel)
            parts.append(part if optimizer == "bf16" else part[: size - padding])
            paddings.append(padding)
            mappings.append(_slice_mappings(group, start, size))
        state = {
            "clip_grad": 1.0,
            "base_optimizer_state": _adam_state(parts, weight_decay, seed=mp * 1000 + dp_rank),
            "single_partition_of_fp32_groups": parts,
            "group_paddings": paddings,
            "partition_count": [dp] * len(groups),
            "ds_version": ds_version,
            "param_slice_mappings": mappings,
        }
        if optimizer != "bf16":
            stage = ZeroStageEnum.gradients if optimizer == "zero2" else ZeroStageEnum.optimizer_states
            state = {"loss_scaler": LossScaler(1.0), "dynamic_loss_scale": False, "overflow": False,
                     **state, "zero_stage": stage}
        if edit is not None:
            edit(mp, dp_rank, state)
        file = folder / optim_file_name(dp_rank, mp, bf16=bf16)
        with _deepspeed_names():
            torch.save({"optimizer_state_dict": state, "ds_config": {"train_batch_size": 8 * dp},
                        "ds_version": ds_version}, file)
        files.append(file)
    return files


def _slice_mappings(group: list[tuple[str, str, torch.Tensor]], start: int, size: int) -> OrderedDict[str, Any]:
    """``param_slice_mappings``: each parameter's fragment in this rank's part (in group order)."""
    found: OrderedDict[str, Any] = OrderedDict()
    offset = 0
    for _, name, tensor in group:
        lo, hi = max(offset, start), min(offset + tensor.numel(), start + size)
        if lo < hi:
            found[name] = fragment_address(numel=hi - lo, start=lo - start)
        offset += tensor.numel()
    return found


def _adam_state(parts: list[torch.Tensor], weight_decay: bool, seed: int) -> dict[str, Any]:
    """The wrapped Adam's ``state_dict``: moments the size of each part, NeoX's param groups."""
    generator = torch.Generator().manual_seed(seed)
    names = ["weight_decay_params", "no_weight_decay_params"] if weight_decay and len(parts) == 2 else [
        "no_weight_decay_params"] * len(parts)
    return {
        "state": {i: {"step": torch.tensor(100.0),
                      "exp_avg": torch.randn(p.numel(), generator=generator) * 1e-3,
                      "exp_avg_sq": torch.rand(p.numel(), generator=generator) * 1e-6}
                  for i, p in enumerate(parts)},
        "param_groups": [{"lr": 6e-4, "betas": (0.9, 0.95), "eps": 1e-8,
                          "weight_decay": 0.01 if name == "weight_decay_params" else 0.0,
                          "name": name, "params": [i]} for i, name in enumerate(names)],
    }
