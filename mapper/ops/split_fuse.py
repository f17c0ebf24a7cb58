"""``fuse`` / ``split``: many tensors to one and back. This is how tensor-parallel shards merge.

Three modes, the same word on both sides so a rule and its inverse read alike:

- ``concat``: concatenate along ``dim`` (column-parallel weights on dim 0, row-parallel on dim 1,
  Q/K/V into one QKV...). Split takes the pieces apart again (``sizes``, or equal parts).
- ``replicated``: every input must be bit-identical (norms, row-parallel biases without GPT-J
  residual); fuse keeps one copy and refuses differing copies unless the conversion is told to
  average them. Split copies the tensor to every output.
- ``sum``: the sum of the inputs (row-parallel biases with GPT-J residual, where every rank adds
  its bias before the all-reduce). Split divides evenly; both directions are lossy in floating
  point, so the sidecar keeps whatever the division cannot give back.

Inputs (for fuse) or outputs (for split) are either a list of patterns, in order, or one pattern
taken ``over`` a placeholder's whole range, in order (``...@rank{r}`` over ``r``, range ``tp``).

Arithmetic runs in the tensors' dtype, a block at a time (:mod:`mapper.ops.arith`); a sum's
exactness check compares each input with the share the split would give back, nothing more.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator

from mapper.ops import arith
from mapper.ops.base import (
    Op,
    OpContext,
    ShapeError,
    SizeExpr,
    bitwise_equal,
    conversion_error,
    normalize_dim,
    require_same,
)
from mapper.tensors import TensorMeta

Mode = Literal["concat", "replicated", "sum"]


class _Parts(Op):
    dim: int = Field(0, description="The dimension to concatenate along or split (mode concat).")
    over: str | None = Field(
        None, description="Placeholder whose whole range gives the parts, in order (e.g. the TP rank)."
    )
    mode: Mode = Field("concat", description="concat, replicated or sum (see the op's description).")
    sizes: list[SizeExpr] | None = Field(
        None, description="Size of each part along `dim` (list form, mode concat); default equal parts."
    )

    def expressions(self) -> list[str]:
        return [s for s in self.sizes or [] if isinstance(s, str)]

    def _check_form(self, many: str | list[str], side: str) -> None:
        if self.over is not None and not isinstance(many, str):
            raise ValueError(f"with `over`, `{side}` is one pattern that uses the placeholder")
        if self.over is None and (isinstance(many, str) or len(many) < 2):
            raise ValueError(f"`{side}` needs a list of at least two patterns, or `over` a placeholder")
        if self.sizes is not None:
            if self.mode != "concat" or self.over is not None:
                raise ValueError("`sizes` applies only to mode concat with a list of patterns")
            if len(self.sizes) != len(many):
                raise ValueError(f"`sizes` has {len(self.sizes)} entries for {len(many)} patterns")

    def _fields(self) -> dict:
        return dict(dim=self.dim, over=self.over, mode=self.mode, sizes=self.sizes, **self.common_fields())

    def _part_sizes(self, count: int, whole: int, ctx: OpContext) -> list[int]:
        if self.sizes is None:
            if whole % count:
                raise ShapeError(f"{self.name}: {whole} does not split into {count} equal parts")
            return [whole // count] * count
        sizes = ctx.sizes(self.sizes)
        if sum(sizes) != whole:
            raise ShapeError(f"{self.name}: sizes {sizes} (sum {sum(sizes)}) do not add up to {whole}")
        return sizes


class Fuse(_Parts):
    """Many tensors -> one (concat, replicated or sum). Inverse: split."""

    name: ClassVar[str] = "fuse"

    from_: str | list[str] = Field(
        alias="from", description="Input patterns in order, or one pattern used `over` a placeholder."
    )
    to: str = Field(description="Key pattern of the fused tensor.")

    @model_validator(mode="after")
    def _form(self) -> Fuse:
        self._check_form(self.from_, "from")
        return self

    def input_patterns(self) -> list[str]:
        return [self.from_] if isinstance(self.from_, str) else list(self.from_)

    @property
    def gather_over(self) -> str | None:
        return self.over

    @property
    def lossy(self) -> bool:
        return self.mode != "concat"

    def infer(self, inputs: list[TensorMeta], ctx: OpContext) -> list[TensorMeta]:
        if self.mode != "concat":
            meta = require_same(inputs, f"fuse ({self.mode})")
            if self.mode == "sum" and not meta.dtype.is_floating_point:
                raise ShapeError(f"fuse (sum) needs floating-point tensors (its inverse divides), got {meta}")
            return [meta]
        first = inputs[0]
        dim = normalize_dim(self.dim, len(first.shape), "fuse")
        for meta in inputs[1:]:
            rest = lambda m: m.shape[:dim] + m.shape[dim + 1 :]  # noqa: E731
            if meta.dtype != first.dtype or len(meta.shape) != len(first.shape) or rest(meta) != rest(first):
                raise ShapeError(f"fuse: cannot concatenate {first} and {meta} along dim {dim}")
        parts = [m.shape[dim] for m in inputs]
        if self.sizes is None and len(set(parts)) > 1:
            raise ShapeError(
                f"fuse: part sizes {parts} along dim {dim} differ; declare `sizes` so the inverse "
                "split can cut them apart again"
            )
        if self.sizes is not None and ctx.sizes(self.sizes) != parts:
            raise ShapeError(f"fuse: part sizes {parts} along dim {dim} are not the declared sizes {ctx.sizes(self.sizes)}")
        shape = first.shape[:dim] + (sum(parts),) + first.shape[dim + 1 :]
        return [TensorMeta(shape, first.dtype)]

    @property
    def concat_dim(self) -> int | None:
        return self.dim if self.mode == "concat" else None

    def apply(self, inputs: list[torch.Tensor], ctx: OpContext) -> list[torch.Tensor]:
        return self.apply_checked(inputs, ctx, check=False)[0]

    def apply_checked(
        self, inputs: list[torch.Tensor], ctx: OpContext, *, check: bool = True
    ) -> tuple[list[torch.Tensor], bool]:
        if self.mode == "concat":
            return [torch.cat(inputs, dim=self.dim)], True
        if self.mode == "sum":
            total = arith.tree_sum(inputs)
            if not check:
                return [total], True
            share, _ = arith.affine(total, len(inputs), 0.0, invert=True)  # what split gives back
            return [total], all(bitwise_equal(share, t) for t in inputs)
        different = [i for i, t in enumerate(inputs[1:], 1) if not bitwise_equal(t, inputs[0])]
        if not different:
            return [inputs[0]], True
        if ctx.average_replicas:
            return [arith.mean(inputs)], False
        worst = max(_largest_difference(inputs[i], inputs[0]) for i in different)
        raise conversion_error(
            ctx,
            f"replicated tensors differ across parts {different} (max abs difference {worst:.3g}); "
            "they should be identical copies",
            hint="the checkpoint may be corrupt or the rule set wrong; `--average-replicas` averages "
            "them instead (lossy, recorded in the sidecar)",
        )

    def inverse(self) -> Split:
        return Split(from_=self.to, to=self.from_, **self._fields())


class Split(_Parts):
    """One tensor -> many (concat pieces, replicated copies, or an even share of a sum). Inverse: fuse."""

    name: ClassVar[str] = "split"

    from_: str = Field(alias="from", description="Key pattern of the tensor to split.")
    to: str | list[str] = Field(
        description="Output patterns in order, or one pattern used `over` a placeholder."
    )

    @model_validator(mode="after")
    def _form(self) -> Split:
        self._check_form(self.to, "to")
        return self

    def output_patterns(self) -> list[str]:
        return [self.to] if isinstance(self.to, str) else list(self.to)

    @property
    def scatter_over(self) -> str | None:
        return self.over

    @property
    def lossy(self) -> bool:
        return self.mode == "sum"

    def _count(self, ctx: OpContext) -> int:
        return ctx.ranges[self.over] if self.over is not None else len(self.to)

    @property
    def split_dim(self) -> int | None:
        return self.dim if self.mode == "concat" else None

    def infer(self, inputs: list[TensorMeta], ctx: OpContext) -> list[TensorMeta]:
        (meta,) = inputs
        count = self._count(ctx)
        if self.mode != "concat":
            if self.mode == "sum" and not meta.dtype.is_floating_point:
                raise ShapeError(f"split (sum) divides, so it needs a floating-point tensor, got {meta}")
            return [meta] * count
        dim = normalize_dim(self.dim, len(meta.shape), "split")
        return [
            TensorMeta(meta.shape[:dim] + (size,) + meta.shape[dim + 1 :], meta.dtype)
            for size in self._part_sizes(count, meta.shape[dim], ctx)
        ]

    def apply(self, inputs: list[torch.Tensor], ctx: OpContext) -> list[torch.Tensor]:
        x, count = inputs[0], self._count(ctx)
        if self.mode == "replicated":
            return [x] * count
        if self.mode == "sum":
            share, _ = arith.affine(x, count, 0.0, invert=True)
            return [share] * count
        return list(torch.split(x, self._part_sizes(count, x.shape[self.dim], ctx), dim=self.dim))

    def inverse(self) -> Fuse:
        return Fuse(from_=self.to, to=self.from_, **self._fields())


def _largest_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| in float64, a block at a time (for the message about differing replicas)."""
    x, y = arith.flat(a), arith.flat(b)
    return max(
        ((x[s].to(torch.float64) - y[s].to(torch.float64)).abs().max().item() for s in arith.blocks(x.numel())),
        default=0.0,
    )
