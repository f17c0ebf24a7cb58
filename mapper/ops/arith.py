"""Elementwise arithmetic for the value-changing ops, fast and bit-exact, a block at a time.

Why: computing a 100 MB bf16 weight in float64 makes 400 MB of temporaries and runs ~40 times
slower than the same product in bf16 (measured: 0.4 against 17 GB/s on 2 cores). So:

- **A power-of-two scale** (``tp`` = 2, 4, 8; ``0.5``) runs in the tensor's own dtype. The
  product ``x * 2^k`` is exact in any binary floating-point format that can hold it, so the
  result is the exact value rounded once, the same bits float64-then-round gives; only where it
  overflows, or leaves the normal range (subnormals), is anything rounded, and there both ways
  round the same exact value once. The check that the inverse gives ``x`` back therefore only has
  to look for those: going up, the largest magnitude (``aminmax``, no copy); going down (or with
  NaN about, whose payload a bf16 product does not keep), the inverse of the block, compared.
- **Any other scale or an offset** runs in float64 as before, one block at a time through two
  reused buffers, so the bits are the same and memory is a few MB whatever the tensor's size.

Each function can fold in the exactness check (``check=True``): the inverse map applied to the
block just computed, compared bit for bit with the input block while both are in cache. That is
the engine's lossy-op check (docs/architecture.md, "Exact inverses") without a full-size copy.
A zero offset is not added: ``-0.0 + 0.0`` is ``+0.0``, which would lose a sign for nothing.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch

from mapper.tensors import bitwise_equal

BLOCK = 1 << 18  # elements per block: ~0.5-2 MB, stays in cache between computing and checking


def power_of_two(value: float) -> bool:
    """``±2^k`` (including 1): multiplying by it is exact unless the result leaves the normal range."""
    if value == 0 or not math.isfinite(value):
        return False
    mantissa, _ = math.frexp(value)
    return abs(mantissa) == 0.5


def _in_dtype(scale: float, dtype: torch.dtype) -> bool:
    """A power-of-two scale whose product and quotient torch computes exactly in ``dtype``."""
    if not power_of_two(scale):
        return False
    info = torch.finfo(dtype)
    return info.tiny <= abs(scale) <= info.max and info.tiny <= 1 / abs(scale) <= info.max


def blocks(count: int, size: int | None = None) -> Iterator[slice]:
    """Consecutive slices of ``size`` (default :data:`BLOCK`) elements covering ``count``."""
    size = max(1, size or BLOCK)
    for start in range(0, count, size):
        yield slice(start, min(count, start + size))


def flat(tensor: torch.Tensor) -> torch.Tensor:
    """A 1-d view of the elements in C order (a copy only for a non-contiguous view)."""
    return tensor.contiguous().view(-1)


def pairs(x: torch.Tensor, out: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Matching blocks of ``x`` and ``out`` (contiguous, same shape), about :data:`BLOCK` elements
    each: runs of the flat elements, or for a strided ``x`` (a dim-1 tensor-parallel shard) blocks
    of whole rows read where they are, so a strided input is never copied whole."""
    row = math.prod(x.shape[1:]) if x.dim() >= 2 else 0
    if x.is_contiguous() or not 0 < row <= BLOCK:
        source, target = flat(x), out.view(-1)
        for b in blocks(source.numel()):
            yield source[b], target[b]
        return
    rows = max(1, BLOCK // row)
    for start in range(0, x.shape[0], rows):
        yield x[start : start + rows], out[start : start + rows]


def affine(
    x: torch.Tensor, scale: float, offset: float, *, invert: bool = False, check: bool = False
) -> tuple[torch.Tensor, bool]:
    """``x * scale + offset`` (``invert``: ``(x - offset) / scale``) in ``x``'s dtype, and whether
    the opposite map gives ``x`` back bit for bit (only computed with ``check``; else True)."""
    out = torch.empty(x.shape, dtype=x.dtype)
    exact = True
    size = min(BLOCK, x.numel())  # the largest block pairs() makes
    if offset == 0 and _in_dtype(scale, x.dtype):
        factor = 1 / scale if invert else scale
        scratch = torch.empty(size, dtype=x.dtype) if check else None
        for source, target in pairs(x, out):
            torch.mul(source, factor, out=target)
            if check and exact:
                exact = _power_of_two_exact(source, target, factor, scratch)
        return out, exact
    wide = torch.empty(size, dtype=torch.float64)
    back = torch.empty(size, dtype=x.dtype) if check else None
    for source, target in pairs(x, out):
        w = wide[: source.numel()].view(source.shape)
        w.copy_(source)
        _forward(w, scale, offset, invert)
        target.copy_(w)
        if check and exact:
            assert back is not None
            w.copy_(target)
            _forward(w, scale, offset, not invert)
            r = back[: source.numel()].view(source.shape)
            r.copy_(w)
            exact = bitwise_equal(r, source)
    return out, exact


def _forward(w: torch.Tensor, scale: float, offset: float, invert: bool) -> None:
    """In place on a float64 block: ``w * scale + offset`` or ``(w - offset) / scale``."""
    if invert:
        if offset:
            w.sub_(offset)
        w.div_(scale)
    else:
        w.mul_(scale)
        if offset:
            w.add_(offset)


def _power_of_two_exact(x: torch.Tensor, y: torch.Tensor, factor: float, scratch: torch.Tensor | None) -> bool:
    """Whether ``y = x * factor`` (a power of two, computed in x's dtype) is undone exactly."""
    if abs(factor) > 1:  # going up: exact unless something overflows (NaN payloads: look closer)
        low, high = torch.aminmax(x)
        largest = max(-float(low), float(high))
        if largest * abs(factor) <= torch.finfo(x.dtype).max:  # False for NaN and inf
            return True
    assert scratch is not None
    back = scratch[: x.numel()].view(x.shape)
    torch.mul(y, 1 / factor, out=back)
    return bitwise_equal(back, x)


def tree_sum(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Pairwise sum in the tensors' dtype, one block at a time: exact for ``2^k`` equal shares,
    and added in the order a balanced all-reduce adds them."""
    first = tensors[0]
    out = torch.empty(first.shape, dtype=first.dtype)
    sources, target = [flat(t) for t in tensors], out.view(-1)
    for b in blocks(target.numel()):
        level = [s[b] for s in sources]
        while len(level) > 1:
            level = [
                level[i] + level[i + 1] if i + 1 < len(level) else level[i] for i in range(0, len(level), 2)
            ]
        target[b].copy_(level[0])
    return out


def mean(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The float64 mean of the tensors, rounded once to their dtype, one block at a time."""
    first = tensors[0]
    out = torch.empty(first.shape, dtype=first.dtype)
    sources, target = [flat(t) for t in tensors], out.view(-1)
    for b in blocks(target.numel(), BLOCK // max(len(tensors), 1)):
        target[b].copy_(torch.stack([s[b].to(torch.float64) for s in sources]).mean(0))
    return out
