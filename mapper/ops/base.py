"""What every op is: its parameters (a pydantic model), its shape rule, its apply, its inverse.

An op instance is one rule of a rule file (``- rename: {from: ..., to: ...}``). The engine binds
its key patterns against a manifest and calls :meth:`Op.infer` (metadata only) while compiling
and :meth:`Op.apply` while executing. It never special-cases an op.

Lossy ops (``lossy = True``) may not be undone by their inverse alone: the engine applies one
with :meth:`Op.apply_checked`, which also says whether the inverse gives the input back bit for
bit (by default: it runs the inverse and compares; an op may fold a cheaper, equivalent check
into its own computation). Where it does not, the engine stores :meth:`Op.residual` in the
*sidecar*, and the inverse op uses it (:meth:`Op.apply_with_residual`) to restore the exact input.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from mapper.errors import ConversionError
from mapper.expressions import evaluate
from mapper.tensors import TensorMeta, bitwise_equal  # noqa: F401 -- re-exported: how ops check inverses

Stage = Literal["ranks", "merge", "model"]  # when a rule runs: per TP rank, merging ranks, whole model
SizeExpr = int | str  # an integer or an expression over parameters, e.g. "num_kv_heads // tp * head_dim"


class ShapeError(Exception):
    """An op's shape rule rejects its inputs (compile turns it into a Problem)."""


class NeedsResidual(Exception):
    """An inverse op cannot restore its output without the sidecar (and has no declared default)."""


@dataclass(frozen=True)
class OpContext:
    """What an op may read besides its tensors: parameters, placeholder ranges, options."""

    parameters: Mapping[str, int]
    ranges: Mapping[str, int] = field(default_factory=dict)
    average_replicas: bool = False
    keys: Sequence[str] = ()  # the input keys of the node being run, for error messages

    def size(self, expression: SizeExpr) -> int:
        return evaluate(expression, self.parameters)

    def sizes(self, expressions: Sequence[SizeExpr]) -> list[int]:
        return [self.size(e) for e in expressions]


class Op(BaseModel):
    """Fields every rule has, whatever its op."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    name: ClassVar[str]
    # True for ops that pass values through untouched (rename): the engine may hand them a
    # concatenation not made yet (mapper.tensors.LazyConcat) and forward it to the writer.
    passes_through: ClassVar[bool] = False
    id: str | None = Field(
        None,
        description="Stable name of this rule (reports, sidecar). Default: the file's name and the rule's index, e.g. 'neox-common#0'.",
    )
    when: str | None = Field(
        None,
        description="Apply this rule only when this expression over parameters is true, "
        "e.g. 'gpt_j_residual' or 'not tied'.",
    )
    optional: bool = Field(
        False, description="Matching no key is fine (e.g. biases a model may not have)."
    )
    note: str | None = Field(None, description="Why this rule exists; shown in plans and reports.")
    stage: Stage | None = Field(
        None,
        description="When the rule runs: `ranks` (per TP rank, keys `...@rank{r}`), `merge` (joining the "
        "ranks) or `model` (whole tensors); rules run stage by stage, in file order within a stage. "
        "Default: what its `@rank` keys show (both sides: ranks, one side: merge), else the file's `stage`, "
        "else model; a stated stage the keys contradict is an error.",
    )

    def active(self, parameters: Mapping[str, int]) -> bool:
        """Whether this rule applies under these parameter values (its ``when``)."""
        return self.when is None or bool(evaluate(self.when, parameters))

    # --- key patterns -------------------------------------------------------------------
    def input_patterns(self) -> list[str]:
        return [self.from_]  # type: ignore[attr-defined]

    def output_patterns(self) -> list[str]:
        return [self.to]  # type: ignore[attr-defined]

    @property
    def lossy(self) -> bool:
        """True when the inverse alone may not restore the input bit for bit."""
        return False

    @property
    def gather_over(self) -> str | None:
        """The placeholder whose whole range this op takes as inputs (fuse over ranks)."""
        return None

    @property
    def scatter_over(self) -> str | None:
        """The placeholder whose whole range this op produces as outputs (split into ranks)."""
        return None

    # --- behaviour ----------------------------------------------------------------------
    def infer(self, inputs: list[TensorMeta], ctx: OpContext) -> list[TensorMeta]:
        """The shape rule: output metadata, or ShapeError."""
        raise NotImplementedError

    def apply(self, inputs: list[torch.Tensor], ctx: OpContext) -> list[torch.Tensor]:
        """Compute the outputs (may raise NeedsResidual for an inverse without a default)."""
        raise NotImplementedError

    def apply_checked(
        self, inputs: list[torch.Tensor], ctx: OpContext, *, check: bool = True
    ) -> tuple[list[torch.Tensor], bool]:
        """:meth:`apply`, and whether :meth:`inverse` gives ``inputs`` back bit for bit (always
        True without ``check``). How the engine runs a lossy op."""
        outputs = self.apply(inputs, ctx)
        if not check:
            return outputs, True
        try:
            exact = all_bitwise_equal(self.inverse().apply(outputs, ctx), inputs)
        except NeedsResidual:
            exact = False
        return outputs, exact

    @property
    def concat_dim(self) -> int | None:
        """The dimension along which :meth:`apply` concatenates its inputs, when that is all it
        does (None otherwise): the engine may then leave the result unmade for a writer that
        streams the parts (:class:`mapper.tensors.LazyConcat`)."""
        return None

    @property
    def split_dim(self) -> int | None:
        """The dimension along which :meth:`apply` cuts its one input into its outputs, when that
        is all it does (None otherwise): the engine may then cut an unmade concatenation into
        unmade pieces (:meth:`mapper.tensors.LazyConcat.split`) instead of making it first."""
        return None

    def apply_with_residual(
        self, inputs: list[torch.Tensor], residual: list[torch.Tensor], ctx: OpContext
    ) -> list[torch.Tensor]:
        """Apply the inverse of a lossy op with its sidecar residual (default: the residual is
        the exact output). The engine checks the result still maps back to ``inputs``."""
        return list(residual)

    def inverse(self) -> Op:
        """The op that undoes this one (exactly, or with the sidecar when ``lossy``)."""
        raise NotImplementedError

    def needs_residual(self, inputs: list[TensorMeta], ctx: OpContext) -> bool:
        """True when this op (an inverse) cannot produce its output without the sidecar."""
        return False

    def residual(self, inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """What the sidecar keeps when the inverse alone does not restore ``inputs``."""
        return [t.clone() for t in inputs]

    def expressions(self) -> list[str]:
        """Integer expressions among this op's fields (checked against the declared parameters)."""
        return []

    def describe(self) -> str:
        """Short text for plans: ``fuse(dim=0, over r)``."""
        shown = self.model_dump(
            exclude={"id", "when", "optional", "note", "stage", "from_", "to"}, exclude_defaults=True
        )
        inner = ", ".join(f"{k}={_short(v)}" for k, v in shown.items())
        return f"{self.name}({inner})" if inner else self.name

    def common_fields(self) -> dict[str, Any]:
        """The fields every op carries, to copy onto its inverse."""
        return {"id": self.id, "when": self.when, "optional": self.optional, "note": self.note, "stage": self.stage}


def same_key_if_missing(cls: type, data: Any) -> Any:
    """``to`` defaults to ``from`` for in-place ops (``- transpose: {from: x}``)."""
    if isinstance(data, dict) and "to" not in data:
        source = data.get("from", data.get("from_"))
        if source is not None:
            return {**data, "to": source}
    return data


def _short(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(map(str, value)) + "]"
    return str(value)


def normalize_dim(dim: int, ndim: int, what: str) -> int:
    if not -ndim <= dim < max(ndim, 1):
        raise ShapeError(f"{what}: dim {dim} does not exist in a {ndim}-d tensor")
    return dim % ndim if ndim else 0


def require_same(metas: list[TensorMeta], what: str) -> TensorMeta:
    first = metas[0]
    for meta in metas[1:]:
        if meta != first:
            raise ShapeError(f"{what}: inputs differ ({first} vs {meta})")
    return first


def all_bitwise_equal(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(bitwise_equal(x, y) for x, y in zip(a, b))


def conversion_error(ctx: OpContext, message: str, hint: str | None = None) -> ConversionError:
    where = ", ".join(ctx.keys[:4]) + (" ..." if len(ctx.keys) > 4 else "") if ctx.keys else None
    return ConversionError(message, where=where, hint=hint)
