"""``affine``: ``y = x * scale + offset``, e.g. Transformer Engine's ``zero_centered_gamma``.

TE can store a norm's gamma as ``gamma - 1``; HF wants gamma itself: ``affine: {offset: 1}``;
under gpt-j-residual TE's row-parallel outputs are scaled by ``tp``: ``affine: {scale: tp}``.
The result is the exact value rounded once to the tensor's dtype: a power-of-two scale is
computed in that dtype, anything else in float64, a block at a time (:mod:`mapper.ops.arith`).
``(w + 1) - 1`` is not always ``w`` in floating point, so the op is lossy: where the inverse does
not give the input back bit for bit, the sidecar keeps the original and the round trip stays exact.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field, field_validator, model_validator

from mapper.ops import arith
from mapper.ops.base import Op, OpContext, ShapeError, same_key_if_missing
from mapper.tensors import TensorMeta


class Affine(Op):
    """``y = x * scale + offset`` (or, with ``invert``, ``y = (x - offset) / scale``)."""

    name: ClassVar[str] = "affine"

    from_: str = Field(alias="from", description="Key pattern of the input tensor.")
    to: str = Field(None, description="Key pattern of the output (default: same key as `from`).")  # type: ignore[assignment]
    scale: float | str = Field(1.0, description="Multiplier (not 0); a number or an integer expression such as 'tp'.")
    offset: float | str = Field(0.0, description="Added after scaling; a number or an integer expression.")
    invert: bool = Field(False, description="Compute the inverse map (x - offset) / scale instead.")

    default_to_from = model_validator(mode="before")(same_key_if_missing)

    @field_validator("scale")
    @classmethod
    def _nonzero(cls, value: float | str) -> float | str:
        if value == 0:
            raise ValueError("scale must not be 0 (the op would not be invertible)")
        return value

    def expressions(self) -> list[str]:
        return [v for v in (self.scale, self.offset) if isinstance(v, str)]

    def _numbers(self, ctx: OpContext) -> tuple[float, float]:
        scale = ctx.size(self.scale) if isinstance(self.scale, str) else self.scale
        offset = ctx.size(self.offset) if isinstance(self.offset, str) else self.offset
        if scale == 0:
            raise ShapeError(f"affine: scale {self.scale!r} evaluates to 0")
        return scale, offset

    @property
    def lossy(self) -> bool:
        return True

    def infer(self, inputs: list[TensorMeta], ctx: OpContext) -> list[TensorMeta]:
        (meta,) = inputs
        if not meta.dtype.is_floating_point:
            raise ShapeError(f"affine needs a floating-point tensor, got {meta}")
        self._numbers(ctx)
        return [meta]

    def apply(self, inputs: list[torch.Tensor], ctx: OpContext) -> list[torch.Tensor]:
        return self.apply_checked(inputs, ctx, check=False)[0]

    def apply_checked(
        self, inputs: list[torch.Tensor], ctx: OpContext, *, check: bool = True
    ) -> tuple[list[torch.Tensor], bool]:
        x = inputs[0]
        scale, offset = self._numbers(ctx)
        y, exact = arith.affine(x, scale, offset, invert=self.invert, check=check)
        return [y], exact

    def inverse(self) -> Affine:
        return Affine(
            from_=self.to, to=self.from_, scale=self.scale, offset=self.offset,
            invert=not self.invert, **self.common_fields(),
        )
