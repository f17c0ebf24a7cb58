"""``unflatten`` / ``flatten``: the reshapes per-head layouts need, each the other's inverse.

Fused QKV rows are ``[heads, 3, head_dim]`` (per-head interleaved) or ``[groups, q_per_group + 2,
head_dim]`` (Transformer Engine GQA). Unflatten exposes that structure so a ``split`` can take
Q, K and V apart; flatten folds it back. Both carry the same ``sizes`` so either can be inverted
without looking at a tensor. One size may be ``-1`` (whatever is left).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from pydantic import Field, field_validator, model_validator

from mapper.ops.base import Op, OpContext, ShapeError, SizeExpr, normalize_dim, same_key_if_missing
from mapper.tensors import TensorMeta


def _check_sizes(sizes: list[SizeExpr]) -> list[SizeExpr]:
    if len(sizes) < 2:
        raise ValueError("sizes needs at least two entries")
    if sum(1 for s in sizes if s == -1) > 1:
        raise ValueError("at most one size may be -1")
    return sizes


def _resolve(sizes: list[int], total: int, what: str) -> list[int]:
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if known <= 0 or total % known:
            raise ShapeError(f"{what}: {total} does not split into sizes {sizes}")
        return [total // known if s == -1 else s for s in sizes]
    if known != total:
        raise ShapeError(f"{what}: dimension of size {total} cannot become {sizes} (product {known})")
    return sizes


class Unflatten(Op):
    """Split dimension ``dim`` into ``sizes``: ``[3*h*d, n]`` -> ``[h, 3, d, n]``. Inverse: flatten."""

    name: ClassVar[str] = "unflatten"

    from_: str = Field(alias="from", description="Key pattern of the input tensor.")
    to: str = Field(None, description="Key pattern of the output (default: same key as `from`).")  # type: ignore[assignment]
    dim: int = Field(0, description="The dimension to split.")
    sizes: list[SizeExpr] = Field(description="New sizes (expressions allowed; one may be -1).")

    default_to_from = model_validator(mode="before")(same_key_if_missing)
    check_sizes = field_validator("sizes")(_check_sizes)

    def expressions(self) -> list[str]:
        return [s for s in self.sizes if isinstance(s, str)]

    def infer(self, inputs: list[TensorMeta], ctx: OpContext) -> list[TensorMeta]:
        (meta,) = inputs
        dim = normalize_dim(self.dim, len(meta.shape), "unflatten")
        sizes = _resolve(ctx.sizes(self.sizes), meta.shape[dim], "unflatten")
        shape = meta.shape[:dim] + tuple(sizes) + meta.shape[dim + 1 :]
        return [TensorMeta(shape, meta.dtype)]

    def apply(self, inputs: list[torch.Tensor], ctx: OpContext) -> list[torch.Tensor]:
        return [inputs[0].unflatten(self.dim, ctx.sizes(self.sizes))]

    def inverse(self) -> Flatten:
        return Flatten(from_=self.to, to=self.from_, dim=self.dim, sizes=self.sizes, **self.common_fields())


class Flatten(Op):
    """Merge dimensions ``dim .. dim+len(sizes)-1``, which must be ``sizes``, into one. Inverse: unflatten."""

    name: ClassVar[str] = "flatten"

    from_: str = Field(alias="from", description="Key pattern of the input tensor.")
    to: str = Field(None, description="Key pattern of the output (default: same key as `from`).")  # type: ignore[assignment]
    dim: int = Field(0, description="The first dimension to merge.")
    sizes: list[SizeExpr] = Field(description="Sizes of the merged dimensions (one may be -1).")

    default_to_from = model_validator(mode="before")(same_key_if_missing)
    check_sizes = field_validator("sizes")(_check_sizes)

    def expressions(self) -> list[str]:
        return [s for s in self.sizes if isinstance(s, str)]

    def _span(self, meta: TensorMeta) -> tuple[int, int]:
        start = normalize_dim(self.dim, len(meta.shape), "flatten")
        end = start + len(self.sizes)
        if end > len(meta.shape):
            raise ShapeError(f"flatten: {meta} has no dimensions {start}..{end - 1}")
        return start, end

    def infer(self, inputs: list[TensorMeta], ctx: OpContext) -> list[TensorMeta]:
        (meta,) = inputs
        start, end = self._span(meta)
        found = list(meta.shape[start:end])
        for want, have in zip(ctx.sizes(self.sizes), found):
            if want != -1 and want != have:
                raise ShapeError(f"flatten: dimensions {found} of {meta} are not {ctx.sizes(self.sizes)}")
        shape = meta.shape[:start] + (math.prod(found),) + meta.shape[end:]
        return [TensorMeta(shape, meta.dtype)]

    def apply(self, inputs: list[torch.Tensor], ctx: OpContext) -> list[torch.Tensor]:
        start, end = self._span(TensorMeta.of(inputs[0]))
        return [inputs[0].flatten(start, end - 1)]

    def inverse(self) -> Unflatten:
        return Unflatten(from_=self.to, to=self.from_, dim=self.dim, sizes=self.sizes, **self.common_fields())
