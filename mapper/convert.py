"""The library entry points over tensors: compile a rule set against a source, then convert.

These work on anything that is a :class:`~mapper.tensors.Source` (a checkpoint reader) or a
plain ``{key: tensor}`` dict; ``mapper.checkpoints`` adds folders, configs and writers on top.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from mapper.engine import ExecutionReport, Plan, Sidecar, compile_plan, execute
from mapper.engine.compile import Expected
from mapper.spec.models import RuleSet
from mapper.tensors import DictSink, DictSource, Manifest, Sink, Source, TensorMeta

SourceLike = Source | Mapping[str, torch.Tensor]


def as_source(source: SourceLike) -> Source:
    return source if isinstance(source, Source) else DictSource(source)


def manifest_of(source: SourceLike | Manifest) -> dict[str, TensorMeta]:
    if isinstance(source, Source):
        return dict(source.manifest())
    return {k: v if isinstance(v, TensorMeta) else TensorMeta.of(v) for k, v in source.items()}


def compile(  # noqa: A001 -- mapper.compile reads best; the builtin is not needed here
    rules: RuleSet,
    source: SourceLike | Manifest,
    parameters: Mapping[str, int] | None = None,
    *,
    expected: Expected = None,
    sidecar: Sidecar | None = None,
) -> Plan:
    """Prove ``rules`` fit ``source`` (metadata only) and return the plan; raises CompileError."""
    return compile_plan(rules, manifest_of(source), parameters, expected=expected, sidecar=sidecar)


@dataclass
class Conversion:
    """The result of :func:`convert`: the plan, what happened, and (without a sink) the tensors."""

    plan: Plan
    report: ExecutionReport
    tensors: dict[str, torch.Tensor] | None

    @property
    def sidecar(self) -> Sidecar:
        """Residuals of lossy rules: give it to the inverse conversion for a bit-exact way back."""
        return self.report.sidecar


def convert(
    rules: RuleSet,
    source: SourceLike,
    parameters: Mapping[str, int] | None = None,
    *,
    sink: Sink | None = None,
    sidecar: Sidecar | None = None,
    expected: Expected = None,
    average_replicas: bool = False,
    dtype: torch.dtype | None = None,
) -> Conversion:
    """Convert ``source`` with ``rules``; into ``sink`` if given, else into a returned dict."""
    reader = as_source(source)
    plan = compile(rules, reader, parameters, expected=expected, sidecar=sidecar)
    target = sink if sink is not None else DictSink()
    report = execute(plan, reader, target, sidecar=sidecar, average_replicas=average_replicas, cast=dtype)
    tensors = target.tensors if isinstance(target, DictSink) and sink is None else None
    return Conversion(plan, report, tensors)
