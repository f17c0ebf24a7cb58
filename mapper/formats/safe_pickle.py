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
4. Legacy non-zip files (``_use_new_zipfile_serialization=False``) cannot be listed up front nor
   memory-mapped. They are loaded with ``weights_only=True`` and no mmap (whole file in memory);
   the restricted unpickler still refuses an unknown global before touching it, and its error is
   reported as an UnsafeCheckpointError.

torch keeps its allow-list process-wide, so loads through this module are serialized by a lock,
and only entries not already allow-listed are added for the duration of one load and then
removed again (a caller's own allow-list is left as it was).
"""

from __future__ import annotations

import io
import pickle
import pickletools
import re
import threading
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar

import torch

from mapper.errors import CheckpointError, UnsafeCheckpointError

ZIP_MAGIC = b"PK\x03\x04"
BYTESIO_GLOBAL = "_io.BytesIO"
BYTES_GLOBAL = "builtins.bytes"

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
    try:
        zipped = is_zip_file(path)
    except OSError as exc:
        raise CheckpointError(
            f"cannot read this file ({exc.strerror or exc})", where=path,
            hint="check that the file exists and is readable",
        ) from exc
    with _LOAD_LOCK:
        if zipped:
            bad = [g for g in unsafe_globals(path) if g not in allowed_names]
            if bad:
                raise _refuse(path, bad, training_state)
        present = set(torch.serialization.get_safe_globals())
        added = [entry for entry in allowance if entry not in present]
        try:
            with torch.serialization.safe_globals(added):
                return torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
        except pickle.UnpicklingError as exc:
            raise UnsafeCheckpointError(
                f"refusing to load: {_unpickler_reason(exc)}. Nothing from the file was run.",
                where=path,
                hint="mapper loads only tensors and plain containers; re-save the weights as a "
                "plain dict of tensors from a trusted environment",
            ) from exc
        except (RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile) as exc:
            raise CheckpointError(
                f"cannot read this torch checkpoint ({type(exc).__name__}: {exc})",
                where=path,
                hint="the file may be truncated or corrupt; copy it again",
            ) from exc


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
