"""The fp32 master weights of a bf16/fp16 NeoX run, read from DeepSpeed's ZeRO optimizer shards.

A mixed-precision run keeps two copies of every trained parameter: the bf16 (or fp16) module
weights the model computes with, saved in the layer or ``mp_rank`` files, and fp32 *master*
weights the optimizer updates, saved in one optimizer file per data-parallel (DP) rank beside them.
:class:`MasterWeights` exposes the masters under the NeoX reader's key namespace
(``layer_XX.<key>@rankN``, :mod:`mapper.formats.naming`) and :class:`~mapper.tensors.Source`
protocol, so every rule set converts them unchanged. The format, as DeepSpeed 0.7-0.16.5 writes
it (``docs/zero-checkpoints.md`` has the details and sources):

- Files: ``{bf16_}zero_pp_rank_{dp}_mp_rank_{mp:02d}_optim_states.pt`` (``bf16_`` when bf16 is on;
  ``DeepSpeedEngine._get_zero_ckpt_name``), a dict whose ``optimizer_state_dict`` is the state of
  ``BF16_Optimizer`` (bf16 with ZeRO stage 0/1: no ``zero_stage`` key) or of
  ``DeepSpeedZeroOptimizer`` (``zero_stage`` 1 or 2). ``mp`` is the model-parallel rank: the TP
  rank, or under pipeline parallelism ``stage * tp + tp_rank`` (``PipelineParallelGrid``).
- Per param group, the trainable parameters are flattened in order and zero-padded at the end
  to a multiple of 2 x DP; DP rank ``r`` owns the ``r``-th of DP equal parts and saves it as fp32 in
  ``single_partition_of_fp32_groups``. ``BF16_Optimizer`` saves the parts whole (the padding sits at
  the end of the last ones, ``group_paddings``); ZeRO 1/2 cut the padding off each part first.
  Either way the parts of a group, concatenated in DP order, start with the parameters.
- The order and shapes come from ``param_shapes`` in the model-state file
  ``mp_rank_{mp:02d}_model_states.pt`` (``DeepSpeedEngine._get_zero_param_shapes``): per group, an
  ordered ``{name: shape}``, names from ``named_parameters()`` of what DeepSpeed wrapped:
  ``{idx}.{key}`` or ``tied_modules.{tie}.{key}`` for a pipeline module, ``sequential.{idx}.{key}``
  for NeoX's sequential wrapper.

Reading is by byte ranges: the optimizer files are loaded memory-mapped (weights-only loads
through :mod:`mapper.formats.safe_pickle`, which read the pickles only) just to learn where each
flat part lies in its file (:mod:`mapper.formats.file_ranges`); ``get`` then reads the
parameter's bytes from the one or two DP parts holding them straight into a new tensor
(``readinto`` at the file offset), never touching the maps. The flat parts span every layer, so
touching them through the maps would leave the pages of every layer read resident until the end;
this way resident memory follows the tensors in use. (A file whose parts cannot be placed in it
is read through its map instead.) The module weight each master is checked against is read the
same way when it is a registered range of its file (:func:`~mapper.formats.file_ranges.mapped_range`).
The optimizer files are kept like every reader's (:mod:`mapper.formats.mapped_files`).

Tensors without a master copy (TE ``_extra_state``, saved buffers such as rotary ``inv_freq``,
frozen parameters) come from the module weights as saved; :attr:`MasterWeights.notes` says which.
Every master is checked against its module weight: it must round to it (to within one step of the
module's dtype), else the optimizer files belong to another save and the read is refused (the
smallest master of each optimizer file already when the reader opens).

Refused, with the file and a fix: ZeRO-3 checkpoints, DeepSpeed versions outside 0.7-1.0 or with no
version, missing DP ranks or model-state files, MoE (param groups of different DP sizes), sizes
that do not add up, non-fp32 masters, and masters that do not round to the module weights.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mapper.errors import CheckpointError
from mapper.formats import safe_pickle
from mapper.formats.file_ranges import mapped_range, place
from mapper.formats.mapped_files import MappedFiles
from mapper.formats.naming import SEQUENTIAL_KEY, mp_rank_file_name, neox_key
from mapper.keyorder import natural_key
from mapper.formats.neox import PIPELINE, NeoXCheckpoint, resolve_tag_folder
from mapper.tensors import ClosingReader, TensorMeta, bitwise_equal

OPTIM_FILE = re.compile(r"^(?P<prefix>bf16_|fp16_)?zero_pp_rank_(?P<dp>\d+)_mp_rank_(?P<mp>\d+)_optim_states\.pt$")
ZERO3_MODEL_FILE = re.compile(r"^(bf16_|fp16_)?zero_pp_rank_\d+_mp_rank_\d+_model_states\.pt$")
OPTIM_SUFFIX = "_optim_states.pt"

# deepspeed/checkpoint/constants.py
OPTIMIZER_STATE_DICT = "optimizer_state_dict"
SINGLE_PARTITION_OF_FP32_GROUPS = "single_partition_of_fp32_groups"
FP32_FLAT_GROUPS = "fp32_flat_groups"  # ZeRO-3
GROUP_PADDINGS = "group_paddings"
PARTITION_COUNT = "partition_count"
ZERO_STAGE = "zero_stage"
DS_VERSION = "ds_version"
PARAM_SHAPES = "param_shapes"
BUFFER_NAMES = "buffer_names"
SHARED_PARAMS = "shared_params"

OLDEST_VERSION = (0, 7, 0)  # group_paddings and today's file layout since DeepSpeed 0.7.0
NEWEST_READ = (0, 16, 5)  # the DeepSpeed (and DeeperSpeed) source this reader was written from
PIPELINE_NAME = re.compile(r"^(?P<idx>\d+)\.(?P<key>.+)$")
TIED_NAME = re.compile(r"^tied_modules\.(?P<tie>[^.]+)\.(?P<key>.+)$")
NO_OPTIMIZER_HINT = "convert the module weights instead (without reading the optimizer shards)"


def optim_file_name(dp: int, mp: int, *, bf16: bool) -> str:
    """The optimizer file of DP rank ``dp`` and model-parallel rank ``mp``
    (``DeepSpeedEngine._get_rank_zero_ckpt_name``)."""
    return f"{'bf16_' if bf16 else ''}zero_pp_rank_{dp}_mp_rank_{mp:02d}{OPTIM_SUFFIX}"


def has_optimizer_shards(path: str | Path) -> bool:
    """True when the checkpoint's tag folder holds ZeRO optimizer files (masters may be read)."""
    folder, _, _ = resolve_tag_folder(Path(path))
    return any(OPTIM_FILE.match(p.name) for p in folder.iterdir())


def open_master_weights(path: str | Path, *, check_rounding: bool = True) -> MasterWeights:
    """The fp32 master weights of the NeoX checkpoint at ``path`` (a tag folder or its parent)."""
    return MasterWeights(path, check_rounding=check_rounding)


@dataclass(frozen=True)
class _Shard:
    """What one optimizer file says about its flat fp32 parts (their data stays on disk)."""

    file: Path
    dp: int
    mp: int
    stage: int | None  # None: BF16_Optimizer (keeps the padding); 1, 2: ZeRO (cuts it off)
    lengths: tuple[int, ...]  # saved elements per param group
    paddings: tuple[int, ...]
    partition_counts: tuple[int, ...]
    version: str


@dataclass(frozen=True)
class _Piece:
    """``numel`` elements of a parameter at ``start`` in ``group`` of one optimizer file."""

    file: Path
    group: int
    start: int
    numel: int


@dataclass(frozen=True)
class _Master:
    """Where a parameter's fp32 master lies: its DeepSpeed name, shape and pieces in DP order."""

    name: str
    shape: tuple[int, ...]
    pieces: tuple[_Piece, ...]
    model_states: Path


class MasterWeights(ClosingReader):
    """A NeoX checkpoint's fp32 master weights as a :class:`~mapper.tensors.Source` (module doc).

    Attributes as :class:`~mapper.formats.neox.NeoXCheckpoint` (``path``, ``root``, ``tag``,
    ``layout``, ``tp``, ``layer_indices``, ``config_files``; ``module`` is that reader, for the
    module weights), plus ``dp``, ``pp``, ``optimizer`` (what wrote the shards), ``ds_version``
    and ``notes``. ``check_rounding=False`` skips reading the module weight of every master.
    """

    def __init__(self, path: str | Path, *, check_rounding: bool = True):
        root = Path(path)
        _refuse_zero3(root)
        self.module = NeoXCheckpoint(root)
        _refuse_zero3(self.module.path)
        self.check_rounding = check_rounding
        self.notes: list[str] = [note for note in self.module.notes  # not ignored here
                                 if not OPTIM_FILE.match(Path(note.split(": ")[0]).name)]
        # per optimizer file: its flat parts (views of its map, never touched) and where the map
        # starts (None: unknown, the parts are then read through the map)
        self._optim_maps: MappedFiles[tuple[list[torch.Tensor], int | None]] = MappedFiles()
        self._files = self._scan()
        self.pp = len(self._files) // self.tp
        self._shards = {file: self._read_shard(file, dp, mp) for mp, ranks in self._files.items()
                        for dp, file in ranks.items()}
        self.dp, self.optimizer, self.ds_version = self._check_shards()
        self._masters, self._manifest = self._build_index()
        if check_rounding:
            self._spot_check()
        stages = f"{self.pp} pipeline stages x {self.tp} TP ranks" if self.pp > 1 else f"{self.tp} TP rank(s)"
        self.notes.append(
            f"{self.path}: fp32 masters of {len(self._masters)} tensors from {len(self._shards)} optimizer "
            f"files ({self.optimizer}, DeepSpeed {self.ds_version}; {self.dp} DP ranks, {stages})"
        )

    # -- the NeoX reader's attributes --------------------------------------------------------
    @property
    def path(self) -> Path:
        return self.module.path

    @property
    def root(self) -> Path:
        return self.module.root

    @property
    def tag(self) -> str:
        return self.module.tag

    @property
    def layout(self) -> str:
        return self.module.layout

    @property
    def tp(self) -> int:
        return self.module.tp

    @property
    def layer_indices(self) -> list[int]:
        return self.module.layer_indices

    @property
    def config_files(self) -> list[Path]:
        return self.module.config_files

    @property
    def optimizer_files(self) -> list[Path]:
        return [file for mp in sorted(self._files) for _, file in sorted(self._files[mp].items())]

    # -- structure ---------------------------------------------------------------------------
    def _scan(self) -> dict[int, dict[int, Path]]:
        """Optimizer files by model-parallel rank and DP rank, all of one save and complete."""
        files: dict[int, dict[int, Path]] = {}
        prefixes: dict[str, Path] = {}
        for entry in sorted(self.path.iterdir(), key=lambda p: natural_key(p.name)):
            match = OPTIM_FILE.match(entry.name)
            if match:
                files.setdefault(int(match["mp"]), {})[int(match["dp"])] = entry
                prefixes.setdefault(match["prefix"] or "", entry)
            elif entry.name.endswith(OPTIM_SUFFIX):
                raise CheckpointError(
                    "an optimizer file mapper does not know (not {bf16_}zero_pp_rank_D_mp_rank_MM"
                    f"{OPTIM_SUFFIX}; MoE expert shards are not supported)",
                    where=entry, hint=NO_OPTIMIZER_HINT,
                )
        if not files:
            raise CheckpointError(
                f"no ZeRO optimizer shards (*{OPTIM_SUFFIX}) here, so no fp32 master weights: the run "
                "trained without ZeRO/bf16 optimizer, or saved without optimizer state (no_save_optim)",
                where=self.path, hint=NO_OPTIMIZER_HINT,
            )
        if len(prefixes) > 1:
            shown = ", ".join(p.name for p in prefixes.values())
            raise CheckpointError(
                f"optimizer files of two kinds ({shown}): one save writes only one",
                where=self.path, hint="keep the files of one save only in the tag folder",
            )
        tp, bf16 = self.module.tp, "bf16_" in prefixes
        missing = sorted(set(range(max(files) + 1)) - set(files))
        if missing:
            raise CheckpointError(
                f"model-parallel ranks {missing} have no optimizer files (found ranks {sorted(files)})",
                where=self.path / optim_file_name(0, missing[0], bf16=bf16),
                hint="copy the optimizer files of every model-parallel rank of this save",
            )
        if len(files) % tp or (self.layout != PIPELINE and len(files) != tp):
            per = "one per TP rank" if self.layout != PIPELINE else "one per pipeline stage and TP rank"
            raise CheckpointError(
                f"optimizer files for {len(files)} model-parallel ranks, but the module weights have "
                f"{tp} TP rank(s) ({self.layout} layout: {per})",
                where=self.path / optim_file_name(0, len(files), bf16=bf16),
                hint="the optimizer and model files come from different saves; copy one save",
            )
        return files

    def _read_shard(self, file: Path, dp: int, mp: int) -> _Shard:
        state = self._load_optim(file)
        optim = state[OPTIMIZER_STATE_DICT]
        version = optim.get(DS_VERSION, state.get(DS_VERSION))
        _check_version(version, file, self.notes)
        stage = _plain_int(optim.get(ZERO_STAGE)) if ZERO_STAGE in optim else None
        if stage == 3 or FP32_FLAT_GROUPS in optim:
            raise _zero3_error(file)
        if ZERO_STAGE in optim and stage not in (1, 2):
            raise CheckpointError(
                f"zero_stage {optim.get(ZERO_STAGE)!r}: mapper reads ZeRO stages 1 and 2",
                where=file, hint=NO_OPTIMIZER_HINT,
            )
        flats = optim.get(SINGLE_PARTITION_OF_FP32_GROUPS)
        if not isinstance(flats, list) or not all(isinstance(t, torch.Tensor) for t in flats):
            raise CheckpointError(
                f"no list of tensors under {SINGLE_PARTITION_OF_FP32_GROUPS!r}: not a layout mapper knows",
                where=file, hint=NO_OPTIMIZER_HINT,
            )
        flats = [t.detach() for t in flats]
        for group, flat in enumerate(flats):
            if flat.dim() != 1 or flat.dtype != torch.float32:
                raise CheckpointError(
                    f"param group {group}: the saved master partition is {flat.dtype} with shape "
                    f"{tuple(flat.shape)}, expected a flat float32 tensor (fp16 masters are not fp32 masters)",
                    where=file, hint=NO_OPTIMIZER_HINT,
                )
        groups = len(flats)
        paddings = _int_list(optim.get(GROUP_PADDINGS), groups, GROUP_PADDINGS, file)
        counts = optim.get(PARTITION_COUNT)
        counts = _int_list([counts] * groups if isinstance(counts, int) else counts, groups, PARTITION_COUNT, file)
        self._optim_maps.keep(file, _placed(file, flats, state))
        return _Shard(file, dp, mp, stage, tuple(int(t.numel()) for t in flats), tuple(paddings),
                      tuple(counts), str(version))

    def _load_optim(self, file: Path) -> dict[str, Any]:
        if not safe_pickle.is_zip_file(file):
            raise CheckpointError(
                "this optimizer file is in torch's legacy (pre-1.6, non-zip) format, which cannot be "
                "memory-mapped; mapper reads optimizer shards by ranges only",
                where=file, hint="re-save it with torch >= 1.6, or " + NO_OPTIMIZER_HINT,
            )
        state = safe_pickle.load(file, training_state=True)
        if not isinstance(state, dict) or not isinstance(state.get(OPTIMIZER_STATE_DICT), Mapping):
            raise CheckpointError(
                f"no {OPTIMIZER_STATE_DICT!r} dict: not a DeepSpeed ZeRO optimizer file",
                where=file, hint=NO_OPTIMIZER_HINT,
            )
        return state

    def _check_shards(self) -> tuple[int, str, str]:
        """DP degree, what wrote the shards and the DeepSpeed version; all files must agree."""
        first = self._shards[self.optimizer_files[0]]
        for shard in self._shards.values():
            # one rank's DP files share their param groups; other ranks (pipeline stages) may not
            like = self._shards[self._files[shard.mp][min(self._files[shard.mp])]]
            same = (shard.stage, shard.version, len(shard.lengths), shard.partition_counts)
            if same != (first.stage, first.version, len(like.lengths), like.partition_counts):
                raise CheckpointError(
                    f"this file (ZeRO stage {shard.stage}, DeepSpeed {shard.version}, {len(shard.lengths)} "
                    f"param groups over {list(shard.partition_counts)} DP ranks) disagrees with "
                    f"{first.file.name} (stage {first.stage}, DeepSpeed {first.version}) or {like.file.name} "
                    f"({len(like.lengths)} groups over {list(like.partition_counts)})",
                    where=shard.file, hint="keep the optimizer files of one save only in the tag folder",
                )
        counts = {count for shard in self._shards.values() for count in shard.partition_counts}
        if len(counts) > 1:
            raise CheckpointError(
                f"param groups are split over different numbers of DP ranks {sorted(counts)} "
                "(MoE expert data parallelism), which mapper does not read",
                where=first.file, hint=NO_OPTIMIZER_HINT,
            )
        dp = counts.pop() if counts else len(self._files[0])
        for mp, ranks in sorted(self._files.items()):
            missing = sorted(set(range(dp)) - set(ranks))
            extra = sorted(set(ranks) - set(range(dp)))
            if missing or extra:
                problem = f"DP ranks {missing} have no optimizer file" if missing else f"DP ranks {extra} are extra"
                where = (self.path / optim_file_name(missing[0], mp, bf16=first.file.name.startswith("bf16_"))
                         if missing else ranks[extra[0]])
                raise CheckpointError(
                    f"{problem} for model-parallel rank {mp}: the optimizer was partitioned over {dp} DP ranks",
                    where=where, hint="copy every DP rank's optimizer file of this save (all are needed)",
                )
        optimizer = "BF16_Optimizer" if first.stage is None else f"DeepSpeedZeroOptimizer (ZeRO stage {first.stage})"
        return dp, optimizer, first.version

    def _model_states(self, mp: int) -> tuple[Path, dict[str, Any]]:
        file = self.path / mp_rank_file_name(mp)
        if not file.is_file():
            raise CheckpointError(
                f"model-parallel rank {mp} has optimizer files but no model-state file: its "
                f"{PARAM_SHAPES} say what the flat masters hold",
                where=file, hint="copy the mp_rank files of this save into the tag folder",
            )
        state = safe_pickle.load(file, training_state=True)
        shapes = state.get(PARAM_SHAPES) if isinstance(state, dict) else None
        if not isinstance(shapes, list) or not all(isinstance(g, Mapping) for g in shapes):
            raise CheckpointError(
                f"no {PARAM_SHAPES} (a list of {{name: shape}} per param group): DeepSpeed writes them "
                "when it saves ZeRO or bf16 optimizer shards, so these files come from different saves",
                where=file, hint="keep the model-state and optimizer files of one save together",
            )
        return file, state

    # -- the index ---------------------------------------------------------------------------
    def _build_index(self) -> tuple[dict[str, _Master], dict[str, TensorMeta]]:
        module = self.module.manifest()
        masters: dict[str, _Master] = {}
        buffers: set[str] = set()
        tied_copies: list[str] = []
        for mp, ranks in sorted(self._files.items()):
            rank = mp % self.tp
            file, state = self._model_states(mp)
            shards = [self._shards[ranks[dp]] for dp in range(self.dp)]
            groups: list[Mapping[str, Any]] = state[PARAM_SHAPES]
            if len(groups) != len(shards[0].lengths):
                raise CheckpointError(
                    f"{len(groups)} param groups in {PARAM_SHAPES}, but the optimizer files have "
                    f"{len(shards[0].lengths)}", where=file,
                    hint="keep the model-state and optimizer files of one save together",
                )
            for group, shapes in enumerate(groups):
                for name, master in self._layout(group, shapes, shards, file).items():
                    key = self._key_of(name, rank, module, file)
                    if key in masters:
                        if TIED_NAME.match(name):  # a tied module's copy on a later pipeline stage
                            tied_copies.append(f"{name} (model-parallel rank {mp})")
                            continue
                        raise CheckpointError(
                            f"{name} and {masters[key].name} are both the master of {key}", where=file,
                            hint="the model-state files come from different saves or models",
                        )
                    self._check_shape(key, master, module)
                    masters[key] = master
            buffers |= {key for name in state.get(BUFFER_NAMES) or [] if (key := self._try_key(name, rank, module))}
            for alias, owner in (state.get(SHARED_PARAMS) or {}).items():
                alias_key, owner_key = self._try_key(alias, rank, module), self._try_key(owner, rank, module)
                if alias_key and owner_key in masters and alias_key not in masters:
                    masters[alias_key] = masters[owner_key]
        if tied_copies:
            self.notes.append(
                f"tied parameters held again on later pipeline stages, not read (the first stage's "
                f"master is used; DeepSpeed keeps them equal): {', '.join(tied_copies)}"
            )
        self._note_module_only(module, masters, buffers)
        manifest = {key: TensorMeta(masters[key].shape, torch.float32) if key in masters else meta
                    for key, meta in module.items()}
        return masters, manifest

    def _layout(self, group: int, shapes: Mapping[str, Any], shards: list[_Shard], file: Path) -> dict[str, _Master]:
        """Where each parameter of one param group lies in the DP parts (the module doc)."""
        lengths = [shard.lengths[group] for shard in shards]
        paddings = [shard.paddings[group] for shard in shards]
        sizes = {name: _shape(shape, name, file) for name, shape in shapes.items()}
        needed = sum(math.prod(shape) for shape in sizes.values())
        saved = sum(lengths)
        kind = shards[0].stage
        if kind is None:  # BF16_Optimizer: equal parts, padding kept at the end
            fits = len(set(lengths)) == 1 and saved - needed == sum(paddings)
            says = f"{saved} elements in parts of {lengths}, {sum(paddings)} of them padding"
        else:  # ZeRO 1/2: padding cut off; parts plus their padding are equal
            fits = saved == needed and len({n + p for n, p in zip(lengths, paddings)}) == 1
            says = f"{saved} elements in parts of {lengths} (+ padding {paddings})"
        if not fits:
            raise CheckpointError(
                f"param group {group}: sizes do not add up: {PARAM_SHAPES} lists {len(sizes)} parameters "
                f"of {needed} elements, the {self.dp} optimizer files hold {says}",
                where=file,
                hint="the model-state and optimizer files come from different saves (or a DeepSpeed "
                "version mapper does not know); copy the files of one save. Files: "
                + ", ".join(s.file.name for s in shards),
            )
        starts = [sum(lengths[:r]) for r in range(len(lengths))]
        layout: dict[str, _Master] = {}
        offset = 0
        for name, shape in sizes.items():
            numel = math.prod(shape)
            pieces = []
            for shard, start, length in zip(shards, starts, lengths):
                lo, hi = max(offset, start), min(offset + numel, start + length)
                if lo < hi:
                    pieces.append(_Piece(shard.file, group, lo - start, hi - lo))
            layout[name] = _Master(name, shape, tuple(pieces), file)
            offset += numel
        return layout

    def _try_key(self, name: str, rank: int, module: Mapping[str, TensorMeta]) -> str | None:
        """The NeoX key of DeepSpeed parameter ``name`` on TP rank ``rank``, or None."""
        match = SEQUENTIAL_KEY.match(name) or PIPELINE_NAME.match(name)
        if match:
            return neox_key(int(match["idx"]), match["key"], rank)
        match = TIED_NAME.match(name)
        if match:  # a tied module: saved in the layer file of its first use
            found = [k for idx in self.layer_indices if (k := neox_key(idx, match["key"], rank)) in module]
            return found[0] if len(found) == 1 else None
        return None

    def _key_of(self, name: str, rank: int, module: Mapping[str, TensorMeta], file: Path) -> str:
        key = self._try_key(name, rank, module)
        if key is None:
            raise CheckpointError(
                f"parameter name {name!r} in {PARAM_SHAPES} names no tensor of the module weights "
                "(expected {idx}.{key}, sequential.{idx}.{key}, or tied_modules.{tie}.{key} saved in one layer)",
                where=file, hint="this is not a GPT-NeoX checkpoint mapper knows; " + NO_OPTIMIZER_HINT,
            )
        if key not in module:
            close = difflib.get_close_matches(key, list(module), n=2)
            raise CheckpointError(
                f"{PARAM_SHAPES} lists {name!r}, but the module weights have no {key}"
                + (f" (nearest: {', '.join(close)})" if close else ""),
                where=file, hint="the model-state and layer files come from different saves; copy one save",
            )
        return key

    def _check_shape(self, key: str, master: _Master, module: Mapping[str, TensorMeta]) -> None:
        if tuple(module[key].shape) != master.shape:
            raise CheckpointError(
                f"{PARAM_SHAPES} gives {master.name} the shape {list(master.shape)}, but the module "
                f"weight {key} is {module[key]}",
                where=master.model_states, hint="the model-state and layer files come from different saves",
            )

    def _note_module_only(self, module: Mapping[str, TensorMeta], masters: Mapping[str, _Master],
                          buffers: set[str]) -> None:
        rest = [key for key in module if key not in masters]
        extra = [k for k in rest if k.split("@")[0].endswith("_extra_state")]
        saved_buffers = [k for k in rest if k in buffers]
        other = [k for k in rest if k not in buffers and k not in extra]
        for keys, what in ((extra, "TE FP8 metadata (_extra_state), not a parameter"),
                           (saved_buffers, "buffers, not parameters"),
                           (other, "no master copy in the optimizer shards (frozen parameters?)")):
            if keys:
                shown = ", ".join(keys[:3]) + (f", ... ({len(keys)} in all)" if len(keys) > 3 else "")
                self.notes.append(f"taken as saved in the module weights: {what}: {shown}")

    # -- Source ------------------------------------------------------------------------------
    def manifest(self) -> dict[str, TensorMeta]:
        """Every tensor's shape and dtype: float32 for masters, as saved for the rest."""
        return dict(self._manifest)

    def is_master(self, key: str) -> bool:
        """True when ``get(key)`` is an fp32 master (False: the module weight as saved)."""
        return key in self._masters

    def master_location(self, key: str) -> list[tuple[Path, int, int, int]]:
        """Where the fp32 master of ``key`` lies, in order: (optimizer file, param group, first
        element in that file's saved part, element count) for each DP part holding some of it."""
        master = self._masters[key]
        return [(piece.file, piece.group, piece.start, piece.numel) for piece in master.pieces]

    def get(self, key: str) -> torch.Tensor:
        """The fp32 master of ``key`` (a new tensor), or the module weight for the rest."""
        if key not in self._manifest:
            close = difflib.get_close_matches(key, list(self._manifest), n=3)
            raise CheckpointError(
                "no such tensor in this checkpoint", where=f"{self.path}:{key}",
                hint=f"did you mean {', '.join(close)}?" if close else "see manifest() for the keys",
            )
        master = self._masters.get(key)
        if master is None:
            return self.module.get(key)
        out = torch.empty(math.prod(master.shape), dtype=torch.float32)
        at = 0
        for piece in master.pieces:
            flat, base = self._flat(piece.file, piece.group)
            part = flat.narrow(0, piece.start, piece.numel)
            if base is None:
                out.narrow(0, at, piece.numel).copy_(part)
            else:
                _read_into(piece.file, part.data_ptr() - base, out.narrow(0, at, piece.numel))
            at += piece.numel
        out = out.view(master.shape)
        if self.check_rounding:
            self._check_rounding(key, master, out)
        return out

    def _flat(self, file: Path, group: int) -> tuple[torch.Tensor, int | None]:
        """One flat part of ``file`` and where the file's map starts (None: unknown)."""
        flats, base = self._optim_maps.load(file, self._map_again)
        return flats[group], base

    def _map_again(self, file: Path) -> tuple[list[torch.Tensor], int | None]:
        """After close(): the file's flat parts, mapped again."""
        state = self._load_optim(file)
        flats = [t.detach() for t in state[OPTIMIZER_STATE_DICT][SINGLE_PARTITION_OF_FP32_GROUPS]]
        if tuple(int(t.numel()) for t in flats) != self._shards[file].lengths:
            raise CheckpointError("this optimizer file changed while it was being read", where=file,
                                  hint="run again once nothing writes to the checkpoint")
        return _placed(file, flats, state)

    def _check_rounding(self, key: str, master: _Master, value: torch.Tensor) -> None:
        """The module weight must be the master rounded to its dtype (DeepSpeed copies the
        updated masters into the module weights after every step)."""
        weight = self.module.get(key)
        bad = _rounding_mismatch(value, weight) if weight.shape != value.shape else _blockwise_mismatch(value, weight)
        if bad is not None:
            count, worst, at_master, at_module = bad
            files = sorted({p.file.name for p in master.pieces})
            raise CheckpointError(
                f"the fp32 master of {key} ({master.name} in {', '.join(files)}) does not round to the "
                f"module weight in {self.module.file_of(key).name}: {count} of {value.numel()} elements "
                f"differ by more than one {weight.dtype} step (worst: master {at_master!r}, module "
                f"{at_module!r}, difference {worst:.3g})",
                where=master.pieces[0].file if master.pieces else master.model_states,
                hint="the optimizer files belong to another save (another step or run) than the model "
                "weights: copy the *_optim_states.pt files saved with this tag, or " + NO_OPTIMIZER_HINT,
            )

    def _spot_check(self) -> None:
        """Check the smallest master of every optimizer file now, so that files of another save
        are refused when the reader opens, not in the middle of a conversion (``get`` still
        checks every master it reads)."""
        smallest: dict[Path, tuple[int, str]] = {}
        for key, master in self._masters.items():
            size = math.prod(master.shape)
            for piece in master.pieces:
                if piece.file not in smallest or size < smallest[piece.file][0]:
                    smallest[piece.file] = (size, key)
        for key in sorted({key for _, key in smallest.values()}):
            self.get(key)

    def close(self) -> None:
        """Let go of the optimizer files' maps and the module reader's (the index stays)."""
        self._optim_maps.clear()
        self.module.close()

    def __repr__(self) -> str:
        return (f"MasterWeights({str(self.path)!r}, layout={self.layout}, tp={self.tp}, pp={self.pp}, "
                f"dp={self.dp}, {self.optimizer}, DeepSpeed {self.ds_version})")


# -- helpers ---------------------------------------------------------------------------------
def _zero3_error(where: Path) -> CheckpointError:
    return CheckpointError(
        "a ZeRO stage 3 checkpoint: every parameter is partitioned on its own, a layout mapper does "
        "not read (it reads ZeRO stages 1 and 2 and the bf16 optimizer)",
        where=where,
        hint="consolidate it with DeepSpeed's zero_to_fp32.py (saved in the checkpoint folder), or "
        "train/save with ZeRO stage 1 or 2",
    )


def _refuse_zero3(path: Path) -> None:
    """ZeRO-3 saves ``zero_pp_rank_D_mp_rank_MM_model_states.pt`` instead of ``mp_rank`` files."""
    folders = [path]
    try:
        folders.append(resolve_tag_folder(path)[0])
    except CheckpointError:
        pass
    for folder in folders:
        if folder.is_dir():
            found = sorted(p for p in folder.iterdir() if ZERO3_MODEL_FILE.match(p.name))
            if found:
                raise _zero3_error(found[0])


def _check_version(version: object, file: Path, notes: list[str]) -> None:
    match = re.match(r"^\s*v?(\d+)\.(\d+)(?:\.(\d+))?", str(version)) if isinstance(version, str) else None
    if match is None:
        raise CheckpointError(
            f"no DeepSpeed version ({DS_VERSION} is {version!r}): cannot tell which layout this file has",
            where=file, hint="mapper reads optimizer shards written by DeepSpeed 0.7 to 0.x; " + NO_OPTIMIZER_HINT,
        )
    found = tuple(int(part or 0) for part in match.groups())
    if found < OLDEST_VERSION or found[0] >= 1:
        raise CheckpointError(
            f"written by DeepSpeed {version}; mapper reads the optimizer-shard layout of DeepSpeed "
            f"{'.'.join(map(str, OLDEST_VERSION))} and later 0.x versions (read from the source of "
            f"{'.'.join(map(str, NEWEST_READ))})",
            where=file,
            hint="load the checkpoint in a DeepSpeed mapper reads and save it again, or " + NO_OPTIMIZER_HINT,
        )
    if found > NEWEST_READ:
        note = (f"optimizer shards written by DeepSpeed {version}, newer than the "
                f"{'.'.join(map(str, NEWEST_READ))} this reader was written from; every size and every "
                "master's rounding is still checked")
        if note not in notes:
            notes.append(note)


def _placed(file: Path, flats: list[torch.Tensor], state: object) -> tuple[list[torch.Tensor], int | None]:
    """A file's flat parts and where its map starts, if every part is confirmed to be bytes of the
    file (all the file's tensors vote on the start, :func:`~mapper.formats.file_ranges.place`)."""
    placement = place(file, _tensors_in(state))
    offsets = {offset for offset, _ in placement.records} if placement is not None else set()
    placed = placement is not None and all(
        flat.numel() == 0 or flat.untyped_storage().data_ptr() - placement.base in offsets for flat in flats
    )
    return flats, placement.base if placed and placement is not None else None


def _read_into(path: Path, offset: int, out: torch.Tensor) -> torch.Tensor:
    """Fill the contiguous tensor ``out`` with ``out.nbytes`` bytes of ``path`` at ``offset``."""
    buffer = memoryview(out.view(-1).view(torch.uint8).numpy()).cast("B")
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        done = 0
        while done < len(buffer):
            got = f.readinto(buffer[done:])
            if not got:
                raise CheckpointError(
                    f"the file ends before the {out.nbytes} bytes at offset {offset}", where=path,
                    hint="the file is truncated; copy it again",
                )
            done += got
    return out


def _tensors_in(obj: object, depth: int = 0) -> list[torch.Tensor]:
    """Every tensor in a loaded container tree."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if depth > 32:
        return []
    values = obj.values() if isinstance(obj, Mapping) else obj if isinstance(obj, (list, tuple)) else ()
    return [t for value in values for t in _tensors_in(value, depth + 1)]


def _plain_int(value: object) -> int | None:
    """An int, or the value of an inert DeepSpeed enum (``ZeroStageEnum(1)``)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, safe_pickle.Inert) and len(value.args) == 1 and isinstance(value.args[0], int):
        return value.args[0]
    return None


def _int_list(value: object, groups: int, what: str, file: Path) -> list[int]:
    if value is None and what == GROUP_PADDINGS:
        raise CheckpointError(
            f"no {GROUP_PADDINGS!r}: written by a DeepSpeed older than 0.7.0", where=file,
            hint="load the checkpoint in DeepSpeed >= 0.7 and save it again, or " + NO_OPTIMIZER_HINT,
        )
    items = [_plain_int(v) for v in value] if isinstance(value, list) else []
    if len(items) != groups or any(v is None or v < 0 for v in items):
        raise CheckpointError(
            f"{what!r} is {value!r}, expected {groups} non-negative integers (one per param group)",
            where=file, hint=NO_OPTIMIZER_HINT,
        )
    return [int(v) for v in items if v is not None]


def _shape(shape: object, name: str, file: Path) -> tuple[int, ...]:
    dims = tuple(shape) if isinstance(shape, (torch.Size, tuple, list)) else None
    if dims is None or not all(isinstance(d, int) and d >= 0 for d in dims):
        raise CheckpointError(f"{PARAM_SHAPES} gives {name!r} the shape {shape!r}", where=file,
                              hint="the model-state file is damaged; copy it again")
    return dims


ROUNDING_BLOCK = 1 << 22  # elements compared at a time: two blocks in memory, never a copy of the tensor


def _blockwise_mismatch(master: torch.Tensor, weight: torch.Tensor) -> tuple[int, float, float, float] | None:
    """:func:`_rounding_mismatch` of two tensors of one shape, a block at a time. A module weight
    that is a registered range of its file is read block by block into one buffer rather than
    touched through the layer file's map (whose pages would stay resident)."""
    where = mapped_range(weight)
    flat_master, flat_weight = master.reshape(-1), weight.reshape(-1)
    count = master.numel()
    buffer = torch.empty(min(ROUNDING_BLOCK, count), dtype=weight.dtype) if where is not None else None
    found: tuple[int, float, float, float] | None = None
    for start in range(0, count, ROUNDING_BLOCK):
        stop = min(count, start + ROUNDING_BLOCK)
        if where is not None and buffer is not None:
            block = _read_into(where.path, where.offset + start * weight.element_size(), buffer[: stop - start])
        else:
            block = flat_weight[start:stop]
        bad = _rounding_mismatch(flat_master[start:stop], block)
        if bad is not None and found is None:
            found = bad
        elif bad is not None and found is not None:  # elements off add up; the worst one is kept
            worst = bad if bad[1] > found[1] else found
            found = (found[0] + bad[0], worst[1], worst[2], worst[3])
    return found


def _rounding_mismatch(master: torch.Tensor, weight: torch.Tensor) -> tuple[int, float, float, float] | None:
    """None if ``weight`` is ``master`` rounded to its dtype (within one step of that dtype, for
    any rounding mode); else (elements off, largest difference, master and module value there)."""
    if weight.shape != master.shape or not weight.dtype.is_floating_point:
        return master.numel(), math.inf, math.nan, math.nan
    rounded = master.to(weight.dtype)
    if bitwise_equal(rounded, weight):
        return None  # the common case, bit for bit
    same = (rounded == weight) | (rounded.isnan() & weight.isnan())
    if bool(same.all()):
        return None
    info = torch.finfo(weight.dtype)
    _, exponent = torch.frexp(master)
    step = torch.ldexp(torch.full_like(master, info.eps), exponent - 1).clamp_min(info.tiny * info.eps)
    diff = (weight.float() - master).abs()
    bad = ~(same | (diff <= step))
    if not bool(bad.any()):
        return None
    diff = torch.where(bad, diff.nan_to_num(nan=math.inf), torch.zeros_like(diff))
    worst = int(diff.flatten().argmax())
    return (int(bad.sum()), float(diff.flatten()[worst]), float(master.flatten()[worst]),
            float(weight.flatten()[worst]))
