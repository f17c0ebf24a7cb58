"""Loading torch ``.pt``/``.bin`` pickles without ever running code from them.

A pickle is a program: ``pickle.load`` of a hostile file can run anything. Checkpoints come from
other people, so this module is the only place mapper reads a pickle, and its policy is:

1. Only ``torch.load(..., weights_only=True)``: torch's restricted unpickler, which resolves a
   global only from an allow-list and refuses the rest *before* importing or calling it. Never
   ``weights_only=False`` and never ``pickle.load``; there is no fallback.
2. Before a zip-format file (``torch.save`` since 1.6) is loaded, every global its pickle names is
   listed statically, without unpickling (``torch.serialization.get_unsafe_globals_in_checkpoint``,
   plus any global this process allow-listed itself, found with :mod:`pickletools`). If one is not
   allowed for this kind of file, :class:`~mapper.errors.UnsafeCheckpointError` names all of them
   and the file, and nothing is loaded.
3. Allowed beyond torch's own tensor/container allow-list:

   - in every file, ``io.BytesIO`` (``_io.BytesIO``): old Transformer Engine versions stored the
     FP8 metadata ``_extra_state`` as one. After loading, a BytesIO is accepted only as the value
     of a key ending in ``._extra_state`` (or the key ``_extra_state``) and is exposed as a uint8
     tensor of its bytes. Those bytes (a nested pickle) are never unpickled. An empty BytesIO
     pickles its ``b""`` as a call of ``builtins.bytes``, which is mapped to
     :func:`plain_bytes` (``bytes(n)`` itself would allocate whatever ``n`` the file says).
   - in DeepSpeed training-state files only (``mp_rank_XX_model_states.pt``, which besides
     ``"module"`` hold DeepSpeed's ``buffer_names``, ``optimizer``, ``lr_scheduler``,
     ``ds_config``, ``ds_version``, ... and NeoX's ``iteration``, ``args`` and RNG states, see
     ``DeepSpeedEngine._save_checkpoint`` and NeoX ``megatron/checkpointing.py``; and ZeRO
     optimizer shards ``*_optim_states.pt``, see :mod:`mapper.formats.zero`): the few
     plain-data classes those entries are known to contain, :data:`PLAIN_DATA_GLOBALS`
     (``argparse.Namespace``; numpy arrays, dtypes and scalars from ``np.random.get_state()``;
     DeepSpeed's fp16 loss scalers, the ZeRO stage enum and the ``fragment_address`` records of
     ``param_slice_mappings``). Their names are mapped, with the ``(object, "module.Name")``
     form of ``torch.serialization.safe_globals``, to :class:`Inert` stand-ins: classes of ours
     that record their arguments and state and run nothing, so numpy/argparse/DeepSpeed code is
     never imported or called. An inert object inside ``"module"`` (where tensors belong) is
     refused; elsewhere mapper never looks at it.
   - anything else is refused.
4. Legacy non-zip files (``_use_new_zipfile_serialization=False``) cannot be memory-mapped.
   They are read whole, their pickles' globals listed the same way (:mod:`pickletools`), then
   loaded with ``weights_only=True`` from memory; the restricted unpickler still refuses an
   unknown global before touching it, and its error is reported as an UnsafeCheckpointError.
5. Resources. Small files must not cost much memory or time, nor be read differently than
   ``torch.load`` reads them:

   - only regular files are opened (a FIFO named like a checkpoint would block forever);
   - ``builtins.bytearray`` is refused although torch allows it: ``bytearray(2000000000)`` in a
     pickle of a few bytes allocates and zeroes 2 GB (:data:`REFUSED_GLOBALS`);
   - a zip record stored compressed is refused (``torch.save`` never compresses, and the
     memory map would read the compressed bytes as values; a deflated ``data.pkl`` can inflate a
     1 MB file to a 1 GB pickle), as is a ``data.pkl`` larger than :data:`MAX_PICKLE_BYTES`;
   - the file is loaded onto the ``meta`` device first (the pickle only, no tensor data,
     nothing allocated): every tensor must be a dense tensor whose storage is a record of the
     file, and no storage may claim more bytes than its record holds (``torch.load`` refuses that
     file; the memory map would read past the record). A tensor the pickle builds itself
     (``torch.FloatTensor(2**31)``, a meta or sparse tensor) is refused too. The checked tensors
     then become views of the file mapped into memory, each at the record offset torch reports,
     exactly as ``torch.load(mmap=True)`` makes them (:func:`with_mapped_data`): the pickle is
     unpickled once, which halves the time to open a checkpoint of many files. Where torch
     does not report offsets, or the file was saved in the other byte order, it is loaded again
     with ``mmap=True``.

torch keeps its allow-list process-wide, so loads through this module are serialized by a lock,
and only entries not already allow-listed are added for the duration of one load and then
removed again (a caller's own allow-list is left as it was).
"""

from __future__ import annotations

import io
import pickle
import pickletools
import re
import struct
import sys
import threading
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar

import torch

from mapper.errors import CheckpointError, UnsafeCheckpointError
from mapper.formats.file_ranges import zip_records
from mapper.input_files import check_regular

ZIP_MAGIC = b"PK\x03\x04"
BYTESIO_GLOBAL = "_io.BytesIO"
BYTES_GLOBAL = "builtins.bytes"
# allowed by torch's weights_only unpickler, refused here: called from a few bytes of pickle, they
# allocate any size (bytearray(n) zeroes it; torch.FloatTensor(n) and kin are never in a saved state)
REFUSED_GLOBALS = frozenset(
    {"builtins.bytearray", "__builtin__.bytearray"}
    | {f"{cls.__module__}.{cls.__name__}" for cls in torch._tensor_classes}
)
MAX_PICKLE_BYTES = 256 * 2**20  # a data.pkl (state dicts of thousands of tensors take a few MB)

# Plain-data classes/functions DeepSpeed and NeoX training state is known to pickle.
PLAIN_DATA_GLOBALS: tuple[str, ...] = (
    "argparse.Namespace",
    "numpy.ndarray",
    "numpy.dtype",
    "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray._reconstruct",
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


class Inert:
    """Stand-in for an allow-listed plain-data global: records what it is given, runs nothing.

    The restricted unpickler may call it (REDUCE), construct it (NEWOBJ) and hand it its state
    (BUILD); all three only store values.
    """

    source: ClassVar[str] = "?"
    args: tuple[Any, ...]
    state: Any

    def __new__(cls, *args: Any, **kwargs: Any) -> Inert:
        obj = super().__new__(cls)
        obj.__dict__["args"] = args
        obj.__dict__["state"] = None
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.__dict__["state"] = state

    def __repr__(self) -> str:
        return f"<inert {self.source}>"


def _inert_class(name: str) -> type[Inert]:
    return type(f"Inert[{name}]", (Inert,), {"source": name, "__module__": __name__})


INERT_GLOBALS: Mapping[str, type[Inert]] = MappingProxyType(
    {name: _inert_class(name) for name in PLAIN_DATA_GLOBALS}
)

# torch's allow-list is process-global: one load at a time may change it (see the docstring).
_LOAD_LOCK = threading.Lock()


def is_zip_file(path: Path) -> bool:
    """True for the zip format of ``torch.save`` (mmap-able, globals listable up front)."""
    with open(path, "rb") as f:
        return f.read(4) == ZIP_MAGIC


def _corrupt(path: Path, problem: str) -> CheckpointError:
    return CheckpointError(
        f"not a readable torch checkpoint: {problem}", where=path,
        hint="the file may be truncated or corrupt, or was not written by torch.save; copy it again",
    )


def check_zip_records(path: Path) -> dict[int, int]:
    """Refuse compressed records and an oversized ``data.pkl``; (data offset -> size) of every
    record, for :func:`check_storages`."""
    try:
        records = zip_records(path)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, struct.error) as exc:
        raise _corrupt(path, f"its zip directory cannot be read ({exc})") from None
    size = path.stat().st_size
    for record in records:
        if not record.stored:
            raise UnsafeCheckpointError(
                f"record {record.name!r} is stored compressed; torch.save never compresses, and mapper "
                "reads records as they lie in the file. Nothing was loaded.",
                where=path, hint="re-save the checkpoint with torch.save from a trusted environment",
            )
        if record.offset + record.size > size:
            raise _corrupt(path, f"record {record.name!r} ends past the end of the file (truncated?)")
        if record.name.endswith("data.pkl") and record.size > MAX_PICKLE_BYTES:
            raise UnsafeCheckpointError(
                f"its pickle (data.pkl) has {record.size} bytes; mapper reads pickles of at most "
                f"{MAX_PICKLE_BYTES} bytes (a state dict's is a few MB)",
                where=path, hint="is this a model checkpoint? re-save plain tensors with torch.save",
            )
    return {record.offset: record.size for record in records}


def _refuse_allocating_globals(path: Path, found: set[str]) -> None:
    refused = sorted(found & REFUSED_GLOBALS)
    if refused:
        raise UnsafeCheckpointError(
            f"refusing to load: its pickle calls {', '.join(refused)}, which can allocate any amount of "
            "memory from a few bytes of file. Nothing from the file was run.",
            where=path, hint="model weights are tensors; re-save them as a plain dict of tensors",
        )


def load_skeleton(path: Path, records: Mapping[int, int]) -> tuple[Any, dict[int, int]]:
    """Load ``path``'s pickle onto the meta device (no data read, nothing allocated), refuse
    tensors that are not dense views of the file's records or that claim more than their record
    holds (see the module docstring); the loaded object, and the file offset of each of its
    tensors' storage by ``id`` of the tensor (torch tells it on the storage object it made while
    loading, which a later ``untyped_storage()`` call may not return again)."""
    try:
        skeleton = torch.load(path, map_location="meta", weights_only=True)
    except pickle.UnpicklingError:
        raise  # the caller says what the restricted unpickler refused
    except Exception as exc:  # noqa: BLE001 -- torch's own (and the unpickler's) error types vary
        raise _corrupt(path, f"{type(exc).__name__}: {exc}") from None
    offsets: dict[int, int] = {}
    for key, value in _walk(skeleton, None):
        if not isinstance(value, torch.Tensor):
            continue
        where = f"{path}:{key}" if key is not None else path
        _check_dense(value, where)
        storage = value.untyped_storage()
        offset = getattr(storage, "_checkpoint_offset", None)
        if offset is None and _META_OFFSETS:
            raise CheckpointError(
                "a tensor whose values are not stored in the file (a meta tensor, or one its pickle "
                "builds itself)", where=where,
                hint="save the model's weights after loading them (a meta tensor is only a shape), "
                "with torch.save of plain tensors",
            )
        if offset is not None:
            offsets[id(value)] = offset
        if offset is not None and storage.nbytes() > records.get(offset, -1):
            held = records.get(offset)
            raise _corrupt(
                path,
                f"a tensor's storage claims {storage.nbytes()} bytes, but "
                + (f"its record holds {held}" if held is not None else "no record lies where it would start")
                + (f" (tensor {key!r})" if key is not None else ""),
            )
    return skeleton, offsets


def with_mapped_data(path: Path, skeleton: Any, offsets: Mapping[int, int]) -> Any | None:
    """``skeleton`` (from :func:`load_skeleton`) with every tensor a view of ``path`` mapped into
    memory, as ``torch.load(mmap=True)`` makes them, without unpickling a second time; None where
    that cannot be done the same way (a torch that does not tell record offsets, a file saved on
    a machine of the other byte order, a tensor type or container it does not rebuild): load
    again then."""
    if not _META_OFFSETS or _byte_order(path) not in (None, sys.byteorder):
        return None
    whole = torch.UntypedStorage.from_file(str(path), False, path.stat().st_size)  # MAP_PRIVATE, like torch
    storages: dict[int, torch.UntypedStorage] = {}
    made: set[int] = set()  # ids of the meta tensors replaced (all stay alive in ``tensors`` below)
    results: set[int] = set()  # ids of the tensors made (a container held twice is visited twice)

    def mapped(meta: torch.Tensor) -> torch.Tensor:
        if id(meta) in results:
            return meta
        offset = offsets[id(meta)]
        if offset not in storages:
            storages[offset] = whole[offset : offset + meta.untyped_storage().nbytes()]
        tensor = torch.empty(0, dtype=meta.dtype).set_(storages[offset], meta.storage_offset(), meta.size(), meta.stride())
        made.add(id(meta))
        if type(meta) is torch.nn.Parameter:
            tensor = torch.nn.Parameter(tensor, requires_grad=meta.requires_grad)
        results.add(id(tensor))
        return tensor

    tensors = [v for _, v in _walk(skeleton, None) if isinstance(v, torch.Tensor)]
    if any(type(t) not in (torch.Tensor, torch.nn.Parameter) or id(t) not in offsets for t in tensors):
        return None
    try:
        rebuilt = _replace_tensors(skeleton, mapped)
    except _TooDeep:
        return None
    return rebuilt if made == {id(t) for t in tensors} else None


class _TooDeep(Exception):
    """A container nested deeper than :func:`_walk` looks (its tensors were not checked)."""


def _byte_order(path: Path) -> str | None:
    """The ``byteorder`` record torch.save writes (None before torch 2.1 wrote it: little)."""
    with zipfile.ZipFile(path) as archive:
        names = [n for n in archive.namelist() if n == "byteorder" or n.endswith("/byteorder")]
        return archive.read(names[0]).decode("ascii", "replace").strip() if names else None


def _replace_tensors(obj: Any, make: Callable[[torch.Tensor], torch.Tensor], depth: int = 0) -> Any:
    """``obj`` with each tensor replaced by ``make(tensor)``, through the containers :func:`_walk`
    visits (changed in place: they come fresh from the unpickler)."""
    if isinstance(obj, torch.Tensor):
        return make(obj)
    if depth > 64 and isinstance(obj, (dict, list, tuple, Inert)):
        raise _TooDeep
    if isinstance(obj, dict):
        for key, value in obj.items():
            obj[key] = _replace_tensors(value, make, depth + 1)
    elif isinstance(obj, list):
        obj[:] = [_replace_tensors(value, make, depth + 1) for value in obj]
    elif type(obj) is tuple:
        return tuple(_replace_tensors(value, make, depth + 1) for value in obj)
    elif isinstance(obj, Inert):
        obj.__dict__["args"] = _replace_tensors(obj.args, make, depth + 1)
        obj.__dict__["state"] = _replace_tensors(obj.state, make, depth + 1)
    return obj


def _check_dense(tensor: torch.Tensor, where: str | Path) -> None:
    """Refuse tensors without plain values in the file: sparse, quantized, meta, nested."""
    if tensor.layout != torch.strided or tensor.is_quantized or getattr(tensor, "is_nested", False):
        raise CheckpointError(
            f"a {str(tensor.layout).removeprefix('torch.')}{' quantized' if tensor.is_quantized else ''} tensor; "
            "mapper converts dense (strided) tensors only", where=where,
            hint="densify it (tensor.to_dense()) and save again",
        )


def _checkpoint_offsets_supported() -> bool:
    """Whether this torch tells, on the meta device, where a storage's record lies."""
    buffer = io.BytesIO()
    torch.save({"probe": torch.zeros(1)}, buffer)
    buffer.seek(0)
    probe = torch.load(buffer, map_location="meta", weights_only=True)["probe"]
    return getattr(probe.untyped_storage(), "_checkpoint_offset", None) is not None


_META_OFFSETS = _checkpoint_offsets_supported()


def plain_bytes(*args: Any) -> bytes:
    """Stand-in for ``builtins.bytes`` (protocol 2 pickles ``b""`` as ``bytes()``).

    The real ``bytes(n)`` would allocate ``n`` zero bytes for any ``n`` a file asks for; this one
    accepts only what pickle itself emits: no argument, or text with its encoding.
    """
    if not args:
        return b""
    if len(args) == 2 and isinstance(args[0], str) and args[1] in ("latin1", "latin-1", "utf-8"):
        return args[0].encode(args[1])
    raise pickle.UnpicklingError(f"bytes{args!r} is not how pickle encodes bytes")


def _allowance(training_state: bool) -> list[Callable[..., Any] | tuple[Callable[..., Any], str]]:
    entries: list[Callable[..., Any] | tuple[Callable[..., Any], str]] = [
        (io.BytesIO, BYTESIO_GLOBAL),
        (plain_bytes, BYTES_GLOBAL),
    ]
    if training_state:
        entries += [(cls, name) for name, cls in INERT_GLOBALS.items()]
    return entries


def _global_name(entry: Any) -> str:
    if isinstance(entry, tuple):
        return str(entry[1])
    return f"{getattr(entry, '__module__', '?')}.{getattr(entry, '__qualname__', '?')}"


def _pickle_of_zip(path: Path) -> bytes:
    with zipfile.ZipFile(path) as archive:
        names = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        if not names:
            raise CheckpointError(
                "no data.pkl inside this zip file: not a torch.save checkpoint",
                where=path,
                hint="pass a file written by torch.save",
            )
        return archive.read(names[0])


def _globals_in_pickle(data: bytes) -> set[str]:
    """Every GLOBAL the pickle names, read with pickletools (which executes nothing)."""
    found: set[str] = set()
    for opcode, arg, _pos in pickletools.genops(data):
        if opcode.name in ("GLOBAL", "INST") and isinstance(arg, str):
            found.add(arg.replace(" ", ".", 1))
        elif opcode.name == "STACK_GLOBAL":
            found.add("<STACK_GLOBAL>")
    return found


def unsafe_globals(path: Path) -> list[str]:
    """Globals ``path``'s pickle needs beyond torch's default allow-list (zip files only).

    Globals the running process allow-listed itself are reported too: this module's policy, not
    whatever happens to be allow-listed, decides what a checkpoint may contain.
    """
    try:
        found = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
        process_allowed = {_global_name(e) for e in torch.serialization.get_safe_globals()}
        if process_allowed:
            found |= _globals_in_pickle(_pickle_of_zip(path)) & process_allowed
    except (pickle.UnpicklingError, ValueError, EOFError) as exc:
        raise UnsafeCheckpointError(
            f"the pickle in this file cannot be checked safely ({exc}); it was not loaded",
            where=path,
            hint="re-save it with torch.save (pickle protocol 2) from a trusted environment",
        ) from exc
    except (RuntimeError, OSError, zipfile.BadZipFile) as exc:  # torch's zip reader raises OSError too
        raise CheckpointError(
            f"not a readable torch checkpoint ({exc})",
            where=path,
            hint="the file may be truncated or corrupt; copy it again",
        ) from exc
    return sorted(found)


def _refuse(path: Path, bad: list[str], training_state: bool) -> UnsafeCheckpointError:
    allowed = [BYTESIO_GLOBAL, BYTES_GLOBAL] + (list(PLAIN_DATA_GLOBALS) if training_state else [])
    return UnsafeCheckpointError(
        f"refusing to load: its pickle needs {', '.join(bad)}, which could run code. "
        "Nothing from the file was run.",
        where=path,
        hint=(
            "mapper loads only tensors, containers and "
            + ", ".join(allowed)
            + ". If you trust the file, load it yourself and re-save plain tensors "
            "(torch.save({k: v for k, v in sd.items() if torch.is_tensor(v)}, path))"
        ),
    )


def _unpickler_reason(exc: Exception) -> str:
    """The line of torch's refusal that says what was refused (not its advice to disable it)."""
    match = re.search(
        r"(Unsupported global: GLOBAL \S+|[^\n]*unsupported GLOBAL[^\n]*|Trying to [^\n]*"
        r"|Can only [^\n]*|Unsupported operand[^\n]*|persistent_load[^\n]*)",
        str(exc),
    )
    return match.group(1).strip().rstrip(".") if match else "the restricted unpickler refused it"


def load(path: str | Path, *, training_state: bool = False) -> Any:
    """Load a torch file under the policy above; zip files are memory-mapped.

    ``training_state=True`` is for DeepSpeed ``mp_rank_*`` files (their non-model entries may
    need :data:`PLAIN_DATA_GLOBALS`). Returns the unpickled object, which may contain
    ``io.BytesIO`` values (see :func:`tensors_from_state`) and :class:`Inert` objects.
    """
    path = Path(path)
    allowance = _allowance(training_state)
    allowed_names = {_global_name(entry) for entry in allowance}
    check_regular(path, what="this checkpoint file")
    try:
        zipped = is_zip_file(path)
        legacy = None if zipped else path.read_bytes()  # read whole anyway (no memory map)
    except OSError as exc:
        raise CheckpointError(
            f"cannot read this file ({exc.strerror or exc})", where=path,
            hint="check that the file exists and is readable",
        ) from exc
    with _LOAD_LOCK:
        if zipped:
            records = check_zip_records(path)
            _refuse_allocating_globals(path, _globals_in_pickle(_pickle_of_zip(path)))
            bad = [g for g in unsafe_globals(path) if g not in allowed_names]
            if bad:
                raise _refuse(path, bad, training_state)
        else:
            assert legacy is not None
            _refuse_allocating_globals(path, _globals_in_legacy(path, legacy))
        present = set(torch.serialization.get_safe_globals())
        added = [entry for entry in allowance if entry not in present]
        try:
            with torch.serialization.safe_globals(added):
                if zipped:
                    mapped = with_mapped_data(path, *load_skeleton(path, records))
                    if mapped is not None:
                        return mapped
                    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                return torch.load(io.BytesIO(legacy), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise UnsafeCheckpointError(
                f"refusing to load: {_unpickler_reason(exc)}. Nothing from the file was run.",
                where=path,
                hint="mapper loads only tensors and plain containers; re-save the weights as a "
                "plain dict of tensors from a trusted environment",
            ) from exc
        except CheckpointError:
            raise
        except Exception as exc:  # noqa: BLE001 -- a damaged file makes torch (and its unpickler) raise anything
            raise CheckpointError(
                f"cannot read this torch checkpoint ({type(exc).__name__}: {exc})",
                where=path,
                hint="the file may be truncated or corrupt; copy it again",
            ) from exc


def _globals_in_legacy(path: Path, data: bytes) -> set[str]:
    """The globals of a legacy file's pickles (magic number, protocol, system info, the object,
    the storage keys; raw storage bytes follow them)."""
    stream = io.BytesIO(data)
    found: set[str] = set()
    try:
        for _ in range(5):
            for opcode, arg, _pos in pickletools.genops(stream):
                if opcode.name in ("GLOBAL", "INST") and isinstance(arg, str):
                    found.add(arg.replace(" ", ".", 1))
    except (ValueError, EOFError, struct.error, UnicodeDecodeError) as exc:
        raise UnsafeCheckpointError(
            f"the pickle in this file cannot be checked safely ({exc}); it was not loaded", where=path,
            hint="re-save it with torch.save from a trusted environment",
        ) from None
    return found


def bytes_tensor(data: bytes) -> torch.Tensor:
    """A uint8 tensor holding ``data`` (its own copy; empty data gives an empty tensor)."""
    if not data:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def is_extra_state_key(key: str) -> bool:
    """Where Transformer Engine keeps FP8 metadata (``x._extra_state`` or a top-level one)."""
    return key == "_extra_state" or key.endswith("._extra_state")


def _walk(obj: Any, key: str | None, depth: int = 0) -> Iterator[tuple[str | None, Any]]:
    """Every (dict key it sits under, value) in a loaded container tree."""
    yield key, obj
    if depth > 64:
        return
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from _walk(v, str(k), depth + 1)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for v in obj:
            yield from _walk(v, None, depth + 1)
    elif isinstance(obj, Inert):
        yield from _walk(obj.args, None, depth + 1)
        yield from _walk(obj.state, None, depth + 1)


def check_bytesio_placement(obj: Any, *, file: Path) -> None:
    """Refuse an ``io.BytesIO`` anywhere but as the value of an ``_extra_state`` key."""
    for key, value in _walk(obj, None):
        if isinstance(value, io.BytesIO) and (key is None or not is_extra_state_key(key)):
            raise UnsafeCheckpointError(
                f"an io.BytesIO object sits under {key!r}; BytesIO is only accepted as the value "
                "of a '._extra_state' key (old Transformer Engine FP8 metadata)",
                where=file,
                hint="re-save the checkpoint with plain tensors only",
            )


def tensors_from_state(state: Any, *, file: Path, what: str, notes: list[str]) -> dict[str, torch.Tensor]:
    """The tensors of a loaded state dict, in file order.

    BytesIO ``_extra_state`` values become uint8 tensors of their bytes; plain scalars and None
    are skipped with a note (nothing to convert); anything else is an error naming the key.
    """
    if not isinstance(state, Mapping):
        raise CheckpointError(
            f"{what} is a {type(state).__name__}, expected a dict of tensors",
            where=file,
            hint="pass a DeepSpeed/NeoX checkpoint written by torch.save of a state dict",
        )
    tensors: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        where = f"{file}:{key}"
        if not isinstance(key, str):
            raise CheckpointError(
                f"{what} has a non-string key {key!r}", where=file, hint="keys must be strings"
            )
        if isinstance(value, torch.Tensor):
            _check_dense(value, where)
            if value.device.type != "cpu":
                raise CheckpointError(
                    f"a tensor on the {value.device.type} device: it has no values in the file", where=where,
                    hint="save the model's weights after loading them (a meta tensor is only a shape)",
                )
            tensors[key] = value.detach() if isinstance(value, torch.nn.Parameter) else value
        elif isinstance(value, io.BytesIO):
            if not is_extra_state_key(key):
                check_bytesio_placement({key: value}, file=file)
            tensors[key] = bytes_tensor(value.getvalue())
        elif value is None or isinstance(value, (bool, int, float, str, bytes)):
            notes.append(f"{where}: skipped a {type(value).__name__} value (not a tensor)")
        elif isinstance(value, Inert):
            raise UnsafeCheckpointError(
                f"{what} holds a {value.source} object where a tensor belongs",
                where=where,
                hint="only tensors are accepted in model weights",
            )
        else:
            raise CheckpointError(
                f"{what} holds a {type(value).__name__} under {key!r}, expected a tensor",
                where=where,
                hint="the model weights must be a flat dict of tensors",
            )
    return tensors
