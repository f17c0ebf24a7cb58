"""How far a converted model may be from the reference, per point, per dtype, and at depth.

Every point is judged on the *same input* on both sides: block ``i`` of the converted model is fed
the reference's input of block ``i``, the final norm the reference's last block output, the output
layer the reference's final norm. So a point measures that point's own error, never errors
inherited from earlier layers, and there is nothing to accumulate with depth.

A point passes when

    max|ref − cand| <= atol + rtol · max|basis| + ROUNDING · u · max|ref|
    ‖ref − cand‖    <= rtol · ‖basis‖ + ROUNDING · u · ‖ref‖

``basis`` is what the point itself computes: for a block, its *update* (output − input, i.e. the
attention and MLP contributions it adds to the residual stream), elsewhere the point's value.
Judging a block by its update instead of by the residual stream it returns keeps small settings
visible: the stream is mostly the block's input, which dilutes any change to the update. ``u`` is
the unit roundoff of the dtype the points are stored in (2^-24 fp32, 2^-8 bf16, 2^-11 fp16): the outputs of both sides are rounded to it at the stream's scale, whatever the
update's size, and ``ROUNDING`` = 8 covers the few roundings (residual adds, bias adds) each side
makes there.

Per-dtype ``(atol, rtol)`` (:func:`default_tolerances`): fp32/fp64 ``(1e-6, 1e-4)``; bf16 ``(1e-3,
5e-2)``; fp16 ``(1e-3, 2e-2)``. Measured on a 24-block, width-512 TE model at TP 2 (parallel
residual): legitimate noise is 3e-7 of a block's update in fp32, 7.6e-3 in bf16. The mistakes
mapper is tested against move a block's update by 0.1 to 2 (a wrong norm, QKV layout, gate/up
order), a doubled MLP-out bias 0.09, the exact GELU read as tanh 1.5e-4 (tiny model), an eps of
1e-6 instead of 1e-5 2e-2 on the small-scale probe: fp32 sees each of them, bf16 the mapping
mistakes (docs/verification.md).

The end-to-end logits (the converted model run on its own, from the token ids) do accumulate
rounding with depth; they are judged with the same bounds widened by ``sqrt(L + 2)`` for ``L``
blocks (:func:`end_to_end`), a random-walk growth of independent per-layer roundings. They are a
second look (and the KL / top-k statistics are computed on them); the per-point verdicts carry
the localisation.

The compared dtype is the coarsest of the compute dtype and the dtype the weights were stored in
on either side (``convert --dtype``, or a reference dumped in bf16): comparing a bf16 model in
fp32 still has bf16 weights in it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mapper.errors import MapperError

ROUNDING = 8
_COARSENESS = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


@dataclass(frozen=True)
class Tolerances:
    atol: float
    rtol: float


def default_tolerances(dtype: torch.dtype) -> Tolerances:
    """Bounds that pass legitimate rounding noise in ``dtype`` and catch real mistakes (module doc)."""
    if dtype in (torch.float32, torch.float64):
        return Tolerances(atol=1e-6, rtol=1e-4)
    if dtype == torch.bfloat16:
        return Tolerances(atol=1e-3, rtol=5e-2)
    if dtype == torch.float16:
        return Tolerances(atol=1e-3, rtol=2e-2)
    raise MapperError(f"cannot verify in dtype {dtype}", hint="use float32, bfloat16 or float16")


def coarsest(*dtypes: torch.dtype | None) -> torch.dtype:
    """The least precise floating dtype among ``dtypes`` (None entries ignored)."""
    known = [d for d in dtypes if d is not None and d in _COARSENESS]
    return max(known, key=_COARSENESS.index) if known else torch.float32


def unit_roundoff(dtype: torch.dtype) -> float:
    """Half the spacing of ``dtype``'s numbers at 1 (2**-24 for float32, 2**-8 for bfloat16)."""
    return torch.finfo(dtype if dtype in _COARSENESS else torch.float32).eps / 2


def end_to_end(tolerances: Tolerances, num_layers: int) -> Tolerances:
    """The bounds for the end-to-end logits after ``num_layers`` blocks (module doc)."""
    widen = math.sqrt(num_layers + 2)
    return Tolerances(atol=tolerances.atol * widen, rtol=tolerances.rtol * widen)
