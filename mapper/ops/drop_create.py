"""``drop`` / ``create``: a tensor the other format has no place for, and its way back.

FP8 ``_extra_state``, a saved rotary ``inv_freq`` buffer, the stale ``post_attention_layernorm``
of pre-fix TE checkpoints: HF has nowhere to put them. ``drop`` removes one on purpose (a key
no rule mentions is an error). It is lossy: the sidecar keeps the tensor unless it equals the
declared ``restore`` default. ``create`` is the inverse: it makes the tensor again from the
sidecar, else from ``restore`` (an empty uint8 ``_extra_state``, say), else -- for an
``optional`` rule -- not at all.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field

from mapper.ops.base import NeedsResidual, Op, OpContext, SizeExpr
from mapper.dtypes import dtype_from_name
from mapper.tensors import TensorMeta


class Restore(BaseModel):
    """A default for a dropped tensor, used by the inverse when the sidecar has none."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    shape: list[SizeExpr] = Field(description="Shape (expressions allowed); [0] for an empty tensor.")
    dtype: str = Field(description="dtype name, e.g. uint8, float32, bfloat16.")
    fill: float = Field(0.0, description="Value of every element.")

    def meta(self, ctx: OpContext) -> TensorMeta:
        return TensorMeta(tuple(ctx.sizes(self.shape)), dtype_from_name(self.dtype))

    def make(self, ctx: OpContext) -> torch.Tensor:
        meta = self.meta(ctx)
        return torch.full(meta.shape, self.fill, dtype=meta.dtype)


class Drop(Op):
    """Remove a tensor on purpose (say why in `note`). Lossy; inverse: create."""

    name: ClassVar[str] = "drop"

    from_: str = Field(alias="from", description="Key pattern of the tensor to drop.")
    restore: Restore | None = Field(
        None, description="What the inverse creates when the sidecar has nothing for this key."
    )

    @property
    def lossy(self) -> bool:
        return True

    def expressions(self) -> list[str]:
        return [s for s in self.restore.shape if isinstance(s, str)] if self.restore else []

    def output_patterns(self) -> list[str]:
        return []

    def infer(self, inputs: list[TensorMeta], ctx: OpContext) -> list[TensorMeta]:
        return []

    def apply(self, inputs: list[torch.Tensor], ctx: OpContext) -> list[torch.Tensor]:
        return []

    def inverse(self) -> Create:
        return Create(to=self.from_, restore=self.restore, **self.common_fields())


class Create(Op):
    """Make a tensor that has no input: from the sidecar, else `restore`. Inverse: drop."""

    name: ClassVar[str] = "create"

    to: str = Field(description="Key pattern of the tensor to create; every placeholder needs a range.")
    restore: Restore | None = Field(None, description="Default when the sidecar has nothing for this key.")

    def input_patterns(self) -> list[str]:
        return []

    def expressions(self) -> list[str]:
        return [s for s in self.restore.shape if isinstance(s, str)] if self.restore else []

    def needs_residual(self, inputs: list[TensorMeta], ctx: OpContext) -> bool:
        return self.restore is None

    def infer(self, inputs: list[TensorMeta], ctx: OpContext) -> list[TensorMeta]:
        if self.restore is None:
            raise NeedsResidual("create has no `restore` default, so it needs the sidecar")
        return [self.restore.meta(ctx)]

    def apply(self, inputs: list[torch.Tensor], ctx: OpContext) -> list[torch.Tensor]:
        if self.restore is None:
            raise NeedsResidual("create has no `restore` default, so it needs the sidecar")
        return [self.restore.make(ctx)]

    def inverse(self) -> Drop:
        return Drop(from_=self.to, restore=self.restore, **self.common_fields())
