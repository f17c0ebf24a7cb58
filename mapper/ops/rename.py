"""``rename``: give a tensor a new key. Most of a conversion is this."""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field

from mapper.ops.base import Op, OpContext
from mapper.tensors import TensorMeta


class Rename(Op):
    """Move a tensor to a new key, bytes untouched. Inverse: rename back."""

    name: ClassVar[str] = "rename"
    passes_through: ClassVar[bool] = True

    from_: str = Field(alias="from", description="Key pattern of the input tensor.")
    to: str = Field(description="Key pattern of the output; same placeholders as `from`.")

    def infer(self, inputs: list[TensorMeta], ctx: OpContext) -> list[TensorMeta]:
        return list(inputs)

    def apply(self, inputs: list[torch.Tensor], ctx: OpContext) -> list[torch.Tensor]:
        return list(inputs)

    def inverse(self) -> Rename:
        return Rename(from_=self.to, to=self.from_, **self.common_fields())
