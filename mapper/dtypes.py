"""dtype names, in one table: mapper's own (rule files, manifests, ``--dtype``, reports), their
short spellings, safetensors' codes and NeoX's ``precision`` names.

torch >= 2.5 (the floor) has every dtype listed, float8 included. The standalone
``mapper/verify/neox_reference_dump.py`` keeps its own small copy: it runs without mapper.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mapper.errors import MapperError


@dataclass(frozen=True)
class DtypeNames:
    """One dtype's names: mapper's, the other spellings read, safetensors' code, NeoX's precision."""

    name: str
    dtype: torch.dtype
    safetensors: str
    aliases: tuple[str, ...] = ()
    precision: str | None = None  # NeoX's ``precision`` setting for this dtype


TABLE: tuple[DtypeNames, ...] = (
    DtypeNames("float64", torch.float64, "F64", ("fp64", "double")),
    DtypeNames("float32", torch.float32, "F32", ("fp32", "float"), precision="fp32"),
    DtypeNames("float16", torch.float16, "F16", ("fp16", "half"), precision="fp16"),
    DtypeNames("bfloat16", torch.bfloat16, "BF16", ("bf16",), precision="bfloat16"),
    DtypeNames("float8_e4m3fn", torch.float8_e4m3fn, "F8_E4M3"),
    DtypeNames("float8_e5m2", torch.float8_e5m2, "F8_E5M2"),
    DtypeNames("int64", torch.int64, "I64"),
    DtypeNames("int32", torch.int32, "I32"),
    DtypeNames("int16", torch.int16, "I16"),
    DtypeNames("int8", torch.int8, "I8"),
    DtypeNames("uint64", torch.uint64, "U64"),
    DtypeNames("uint32", torch.uint32, "U32"),
    DtypeNames("uint16", torch.uint16, "U16"),
    DtypeNames("uint8", torch.uint8, "U8"),
    DtypeNames("bool", torch.bool, "BOOL"),
)

DTYPES_BY_NAME: dict[str, torch.dtype] = {row.name: row.dtype for row in TABLE}
DTYPE_NAMES: dict[torch.dtype, str] = {row.dtype: row.name for row in TABLE}
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {row.safetensors: row.dtype for row in TABLE}
SAFETENSORS_NAMES: dict[torch.dtype, str] = {row.dtype: row.safetensors for row in TABLE}
PRECISION_DTYPES: dict[str, torch.dtype] = {row.precision: row.dtype for row in TABLE if row.precision}
_SPELLINGS: dict[str, torch.dtype] = {alias: row.dtype for row in TABLE for alias in (row.name, *row.aliases)}


def dtype_from_name(name: str) -> torch.dtype:
    """``"bf16"``, ``"bfloat16"``, ``"torch.bfloat16"`` -> ``torch.bfloat16``."""
    clean = name.strip().removeprefix("torch.").lower()
    if clean not in _SPELLINGS:
        raise MapperError(f"unknown dtype {name!r}", hint=f"use one of: {', '.join(sorted(DTYPES_BY_NAME))}")
    return _SPELLINGS[clean]


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def precision_of(name: str) -> str | None:
    """NeoX's ``precision`` for a dtype name in any spelling (``"float16"`` -> ``"fp16"``), or
    None for a name that is no dtype NeoX trains in."""
    dtype = _SPELLINGS.get(name.strip().removeprefix("torch.").lower())
    return next((row.precision for row in TABLE if row.dtype == dtype), None) if dtype is not None else None
