"""Casting targets to another dtype (``--dtype``) without silently breaking values.

A cast that turns a finite value into inf, or changes its sign bit, is an error naming the
tensor: the converted model would not compute what the source computed. (A tiny value that
underflows to a signed zero keeps its sign and is allowed.) Only floating tensors are cast.
"""

from __future__ import annotations

import torch

from mapper.errors import ConversionError
from mapper.tensors import dtype_name


def cast_checked(key: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor.to(dtype)`` for floating tensors, refusing overflow and sign loss; others unchanged."""
    if not dtype.is_floating_point:
        raise ConversionError(
            f"cannot cast model weights to {dtype_name(dtype)}", where=key,
            hint="choose a floating-point dtype: float32, bfloat16 or float16",
        )
    if not tensor.dtype.is_floating_point or tensor.dtype == dtype:
        return tensor
    out = tensor.to(dtype)
    overflow = torch.isinf(out) & torch.isfinite(tensor)
    flipped = (torch.signbit(out) != torch.signbit(tensor)) & ~torch.isnan(tensor)
    bad = overflow | flipped
    if bool(bad.any()):
        worst = tensor[bad].abs().max().item()
        what = "overflows to inf" if bool(overflow.any()) else "changes sign"
        raise ConversionError(
            f"casting to {dtype_name(dtype)} {what} for {int(bad.sum())} value(s) (largest |x| = {worst:.4g})",
            where=key,
            hint=f"keep the source dtype ({dtype_name(tensor.dtype)}) or choose a wider one such as bfloat16/float32",
        )
    return out
