"""Casting targets to another dtype (``--dtype``) without silently breaking values.

A cast that turns a finite value into inf (or, for float8 without inf, NaN), or changes its sign
bit, is an error naming the tensor: the converted model would not compute what the source
computed. (A tiny value that underflows to a signed zero keeps its sign and is allowed.) Only
floating tensors are cast.

The cast runs a block at a time into the output: a block whose result is all finite (one
``aminmax``, no copy) needs no further look, since rounding keeps the sign of every finite value;
only a block holding inf or NaN is checked element by element. So the check costs no full-size
masks, and memory is the output plus a block.
"""

from __future__ import annotations

import math

import torch

from mapper.errors import ConversionError
from mapper.ops.arith import blocks, flat
from mapper.dtypes import dtype_name


def cast_checked(key: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor.to(dtype)`` for floating tensors, refusing overflow and sign loss; others unchanged."""
    if not dtype.is_floating_point:
        raise ConversionError(
            f"cannot cast model weights to {dtype_name(dtype)}", where=key,
            hint="choose a floating-point dtype: float32, bfloat16 or float16",
        )
    if not tensor.dtype.is_floating_point or tensor.dtype == dtype:
        return tensor
    out = torch.empty(tensor.shape, dtype=dtype)
    source, target = flat(tensor), out.view(-1)
    bad = overflows = 0
    worst = 0.0
    for b in blocks(source.numel()):
        target[b].copy_(source[b])
        if _all_finite(target[b]):
            continue
        block_bad, block_overflows, block_worst = _bad_values(source[b], target[b])
        bad, overflows, worst = bad + block_bad, overflows + block_overflows, max(worst, block_worst)
    if bad:
        what = f"overflows to {_overflow_value(dtype)}" if overflows else "changes sign"
        raise ConversionError(
            f"casting to {dtype_name(dtype)} {what} for {bad} value(s) (largest |x| = {worst:.4g})",
            where=key,
            hint=f"keep the source dtype ({dtype_name(tensor.dtype)}) or choose a wider one such as bfloat16/float32",
        )
    return out


def _overflow_value(dtype: torch.dtype) -> str:
    """What a too-large value becomes: inf, or NaN in a format without inf (float8_e4m3fn)."""
    return "inf" if bool(torch.tensor(float("inf")).to(dtype).isinf()) else "NaN"


def _all_finite(block: torch.Tensor) -> bool:
    if block.numel() == 0:
        return True
    try:
        low, high = torch.aminmax(block)
    except RuntimeError:  # a dtype aminmax does not support (float8): look at every value
        return False
    return math.isfinite(float(low)) and math.isfinite(float(high))


def _bad_values(source: torch.Tensor, out: torch.Tensor) -> tuple[int, int, float]:
    """(values broken, of which overflowed, largest |x| among them) in one block."""
    finite = torch.isfinite(source)
    overflow = ~torch.isfinite(out) & finite
    flipped = (torch.signbit(out) != torch.signbit(source)) & ~torch.isnan(source)
    bad = overflow | flipped
    count = int(bad.sum())
    worst = float(source[bad].abs().max()) if count else 0.0
    return count, int(overflow.sum()), worst
