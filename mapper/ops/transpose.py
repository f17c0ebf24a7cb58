"""``transpose``: swap two dimensions (e.g. a layout that stores ``[in, out]`` instead of ``[out, in]``)."""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field, model_validator

from mapper.ops.base import Op, OpContext, ShapeError, normalize_dim, same_key_if_missing
from mapper.tensors import TensorMeta


class Transpose(Op):
    """Swap dimensions ``dims[0]`` and ``dims[1]``. Its own inverse."""

    name: ClassVar[str] = "transpose"

    from_: str = Field(alias="from", description="Key pattern of the input tensor.")
    to: str = Field(None, description="Key pattern of the output (default: same key as `from`).")  # type: ignore[assignment]
    dims: tuple[int, int] = Field((0, 1), description="The two dimensions to swap.")

    default_to_from = model_validator(mode="before")(same_key_if_missing)

    def infer(self, inputs: list[TensorMeta], ctx: OpContext) -> list[TensorMeta]:
        (meta,) = inputs
        if len(meta.shape) < 2:
            raise ShapeError(f"transpose needs at least 2 dimensions, got {meta}")
        a, b = (normalize_dim(d, len(meta.shape), "transpose") for d in self.dims)
        shape = list(meta.shape)
        shape[a], shape[b] = shape[b], shape[a]
        return [TensorMeta(tuple(shape), meta.dtype)]

    def apply(self, inputs: list[torch.Tensor], ctx: OpContext) -> list[torch.Tensor]:
        return [inputs[0].transpose(*self.dims)]

    def inverse(self) -> Transpose:
        return Transpose(from_=self.to, to=self.from_, dims=self.dims, **self.common_fields())
