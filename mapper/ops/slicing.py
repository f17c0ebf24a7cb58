"""``slice`` / ``pad``: drop or restore trailing entries along a dimension (vocabulary padding).

NeoX pads the vocabulary to a multiple of ``make-vocab-size-divisible-by x TP``; the padded
rows are real rows of the embedding and output layer. ``slice`` keeps the first ``keep`` of
``total`` entries; the rows it cuts go to the sidecar, so ``pad`` restores them exactly. Without
the sidecar, ``pad`` fills with ``fill`` when the rule declares one, and refuses otherwise.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field, model_validator

from mapper.ops.base import (
    NeedsResidual,
    Op,
    OpContext,
    ShapeError,
    SizeExpr,
    bitwise_equal,
    normalize_dim,
    same_key_if_missing,
)
from mapper.tensors import TensorMeta


class _Window(Op):
    from_: str = Field(alias="from", description="Key pattern of the input tensor.")
    to: str = Field(None, description="Key pattern of the output (default: same key as `from`).")  # type: ignore[assignment]
    dim: int = Field(0, description="The dimension to cut or extend.")
    keep: SizeExpr = Field(description="Entries kept (the small size).")
    total: SizeExpr = Field(description="Entries in the full tensor (the large size).")
    fill: float | None = Field(
        None, description="Value `pad` uses for restored entries when there is no sidecar."
    )

    default_to_from = model_validator(mode="before")(same_key_if_missing)

    def expressions(self) -> list[str]:
        return [s for s in (self.keep, self.total) if isinstance(s, str)]

    def _sizes(self, meta: TensorMeta, ctx: OpContext) -> tuple[int, int, int]:
        dim = normalize_dim(self.dim, len(meta.shape), self.name)
        keep, total = ctx.size(self.keep), ctx.size(self.total)
        if not 0 <= keep <= total:
            raise ShapeError(f"{self.name}: keep={keep} must lie between 0 and total={total}")
        return dim, keep, total

    def _resized(self, meta: TensorMeta, dim: int, size: int) -> TensorMeta:
        return TensorMeta(meta.shape[:dim] + (size,) + meta.shape[dim + 1 :], meta.dtype)

    def _fields(self) -> dict:
        return dict(
            from_=self.to, to=self.from_, dim=self.dim, keep=self.keep, total=self.total,
            fill=self.fill, **self.common_fields(),
        )


class Slice(_Window):
    """Keep the first ``keep`` of ``total`` entries along ``dim``. Lossy; inverse: pad."""

    name: ClassVar[str] = "slice"

    @property
    def lossy(self) -> bool:
        return True

    def infer(self, inputs: list[TensorMeta], ctx: OpContext) -> list[TensorMeta]:
        (meta,) = inputs
        dim, keep, total = self._sizes(meta, ctx)
        if meta.shape[dim] != total:
            raise ShapeError(f"slice: expected {total} entries along dim {dim}, got {meta}")
        return [self._resized(meta, dim, keep)]

    def apply(self, inputs: list[torch.Tensor], ctx: OpContext) -> list[torch.Tensor]:
        dim, keep, _ = self._sizes(TensorMeta.of(inputs[0]), ctx)
        return [inputs[0].narrow(dim, 0, keep)]

    def apply_checked(
        self, inputs: list[torch.Tensor], ctx: OpContext, *, check: bool = True
    ) -> tuple[list[torch.Tensor], bool]:
        """Exact when nothing is cut, or when every cut entry is the ``fill`` that ``pad`` would
        put back: only the cut entries are looked at."""
        x = inputs[0]
        dim, keep, total = self._sizes(TensorMeta.of(x), ctx)
        outputs = [x.narrow(dim, 0, keep)]
        if not check or keep == total:
            return outputs, True
        if self.fill is None:
            return outputs, False
        cut = x.narrow(dim, keep, total - keep)
        return outputs, bitwise_equal(cut, torch.full(cut.shape, self.fill, dtype=x.dtype))

    def residual(self, inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """The cut entries, copied (a view would keep the whole input alive until the sidecar is written)."""
        dim = self.dim % inputs[0].dim()
        keep = outputs[0].shape[dim]
        return [inputs[0].narrow(dim, keep, inputs[0].shape[dim] - keep).clone()]

    def inverse(self) -> Pad:
        return Pad(**self._fields())


class Pad(_Window):
    """Extend ``dim`` from ``keep`` to ``total`` entries (sidecar rows, else ``fill``). Inverse: slice."""

    name: ClassVar[str] = "pad"

    def infer(self, inputs: list[TensorMeta], ctx: OpContext) -> list[TensorMeta]:
        (meta,) = inputs
        dim, keep, total = self._sizes(meta, ctx)
        if meta.shape[dim] != keep:
            raise ShapeError(f"pad: expected {keep} entries along dim {dim}, got {meta}")
        return [self._resized(meta, dim, total)]

    def apply(self, inputs: list[torch.Tensor], ctx: OpContext) -> list[torch.Tensor]:
        x = inputs[0]
        dim, keep, total = self._sizes(TensorMeta.of(x), ctx)
        if total == keep:
            return [x]
        if self.fill is None:
            raise NeedsResidual(
                f"pad needs the {total - keep} cut entries from the sidecar (the rule declares no `fill`)"
            )
        shape = list(x.shape)
        shape[dim] = total - keep
        return [torch.cat([x, torch.full(shape, self.fill, dtype=x.dtype)], dim=dim)]

    def needs_residual(self, inputs: list[TensorMeta], ctx: OpContext) -> bool:
        return self.fill is None and ctx.size(self.keep) != ctx.size(self.total)

    def apply_with_residual(
        self, inputs: list[torch.Tensor], residual: list[torch.Tensor], ctx: OpContext
    ) -> list[torch.Tensor]:
        dim = self.dim % inputs[0].dim()
        return [torch.cat([inputs[0], residual[0].to(inputs[0].dtype)], dim=dim)]

    def inverse(self) -> Slice:
        return Slice(**self._fields())
