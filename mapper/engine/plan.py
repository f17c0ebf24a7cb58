"""The compiled plan: a DAG from source keys through ops to target keys, built from metadata only.

Every tensor flowing through the conversion is a :class:`Value` (a key at one point in the rule
sequence, with its shape and dtype); every application of a rule to one binding of its
placeholders is a :class:`Node`. Each value has at most one consumer (compile proves every key
is consumed exactly once), so the executor can free a tensor the moment its consumer ran.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from mapper.ops import Op
from mapper.spec.models import RuleSet
from mapper.tensors import TensorMeta


@dataclass(eq=False)
class Value:
    """A tensor at one point of the conversion: a source key, an intermediate, or a target."""

    id: int
    key: str
    meta: TensorMeta
    producer: Node | None = None  # None: read from the source
    consumer: Node | None = None  # None: a target (or dropped)

    def sources(self) -> list[str]:
        """The source keys this value was made from (itself, for a source): what users know."""
        if self.producer is None:
            return [self.key]
        return [key for value in self.producer.inputs for key in value.sources()]

    def describe(self) -> str:
        """``key meta``, plus where an intermediate came from (``... (from layer_02.x@rank1)``)."""
        origin = "" if self.producer is None else f" (from {', '.join(self.sources()[:4])})"
        return f"{self.key} {self.meta}{origin}"

    def __repr__(self) -> str:
        return f"Value({self.key!r}, {self.meta})"


@dataclass(eq=False)
class Node:
    """One rule applied to one binding of its placeholders."""

    index: int
    rule_index: int
    op: Op
    binding: dict[str, int | str]
    inputs: list[Value]
    outputs: list[Value]
    # Sidecar entries are named after the forward node: "<rule id>:<its first input key>".
    writes_residual: str | None = None  # lossy op: entry to fill when its inverse is not exact
    reads_residual: str | None = None  # inverse of a lossy op: entry that restores it exactly
    # In a chain of plans (mapper.engine.chain), the parameters of the plan the node came from.
    parameters: dict[str, int] | None = None
    ranges: dict[str, int] | None = None

    @property
    def rule_id(self) -> str:
        return self.op.id or f"rule {self.rule_index}"

    def __repr__(self) -> str:
        return f"Node({self.rule_id}, {[v.key for v in self.inputs]} -> {[v.key for v in self.outputs]})"


@dataclass
class Plan:
    """What a conversion will do, proven consistent before any tensor byte is read."""

    ruleset: RuleSet
    parameters: dict[str, int]
    ranges: dict[str, int]
    sources: dict[str, Value]
    targets: dict[str, Value]
    nodes: list[Node]
    notes: list[str] = field(default_factory=list)

    # --- manifests -------------------------------------------------------------------------
    @property
    def target_manifest(self) -> dict[str, TensorMeta]:
        return {k: v.meta for k, v in self.targets.items()}

    @property
    def dropped(self) -> list[Node]:
        """Nodes that remove tensors on purpose (reported: a stale norm must never go unnoticed)."""
        return [n for n in self.nodes if not n.outputs]

    @property
    def created(self) -> list[Node]:
        return [n for n in self.nodes if not n.inputs]

    @property
    def lossy_nodes(self) -> list[Node]:
        return [n for n in self.nodes if n.op.lossy]

    # --- lineage ---------------------------------------------------------------------------
    def lineage(self, target: str) -> list[Node]:
        """Every node that contributed to ``target``, in execution order."""
        return lineage(self.targets[target])

    def rules_for(self, targets: Iterable[str]) -> list[str]:
        """The rule ids that produced these targets (for 'which rule is responsible?')."""
        ids: dict[str, None] = {}
        for target in targets:
            for node in self.lineage(target):
                ids.setdefault(node.rule_id)
        return list(ids)

    # --- scheduling ------------------------------------------------------------------------
    def schedule(self, groups: Sequence[Sequence[str]], *, orphans: bool = True) -> list[list[Node]]:
        """For each output group, the nodes to run (each node once, in the first group needing it).

        Nodes that feed no target (drops) run with the last group when ``orphans`` is set: they
        still have to run, since their residuals go to the sidecar.
        """
        done: set[int] = set()
        steps = []
        for position, group in enumerate(groups):
            ends = [self.targets[k] for k in group]
            needed = self._ancestors([v.producer for v in ends if v.producer is not None], done)
            if orphans and position == len(groups) - 1:
                needed |= self._ancestors([n for n in self.dropped if n.index not in done], done)
            done |= needed
            steps.append([self.nodes[i] for i in sorted(needed)])
        return steps

    def _ancestors(self, nodes: list[Node], done: set[int]) -> set[int]:
        needed: set[int] = set()
        stack = list(nodes)
        while stack:
            node = stack.pop()
            if node.index in done or node.index in needed:
                continue
            needed.add(node.index)
            stack.extend(v.producer for v in node.inputs if v.producer is not None)
        return needed

    def peak_bytes(self, groups: Sequence[Sequence[str]]) -> int:
        """Most bytes alive at once when executing group by group (inputs freed after use)."""
        live: dict[int, int] = {}
        peak = 0
        for group, nodes in zip(groups, self.schedule(groups)):
            for node in nodes:
                for value in node.inputs:
                    live.setdefault(value.id, value.meta.nbytes)
                for value in node.outputs:
                    live[value.id] = value.meta.nbytes
                peak = max(peak, sum(live.values()))
                for value in node.inputs:
                    live.pop(value.id, None)
            for key in group:
                value = self.targets[key]
                live.setdefault(value.id, value.meta.nbytes)  # a source passed through untouched
            peak = max(peak, sum(live.values()))
            for key in group:
                live.pop(self.targets[key].id, None)
        return peak

    # --- presentation ----------------------------------------------------------------------
    def rows(self) -> list[dict[str, Any]]:
        """One row per target: its sources (ranks folded), the op chain with each step's rule id
        (and the included rule it replaces, if it does), the target."""
        rows = []
        for key, value in self.targets.items():
            steps = {n.rule_id: n.op for n in self.lineage(key)}  # one entry per rule, not per rank
            rows.append(
                {
                    "sources": fold_ranks(sorted(set(value.sources()))),
                    "ops": [op.describe() for op in steps.values()] or ["(unchanged)"],
                    "rules": list(steps),
                    "steps": [self._step(rule_id, op) for rule_id, op in steps.items()],
                    "target": key,
                    "meta": str(value.meta),
                }
            )
        for node in self.dropped:
            rows.append(
                {
                    "sources": fold_ranks([v.key for v in node.inputs]),
                    "ops": [node.op.describe()],
                    "rules": [node.rule_id],
                    "steps": [self._step(node.rule_id, node.op)],
                    "target": "(dropped" + (f": {node.op.note}" if node.op.note else "") + ")",
                    "meta": str(node.inputs[0].meta),
                }
            )
        return rows

    def _step(self, rule_id: str, op: Op) -> dict[str, Any]:
        replaced = self.ruleset.replaced_by(rule_id)
        return {"op": op.describe(), "rule": rule_id, "stage": op.stage, "replaces": replaced.rule if replaced else None}

    def explain(self) -> str:
        """Plain-text rendering: ``sources -> op -> op -> target`` per tensor."""
        lines = [
            f"plan for rule set {self.ruleset.name} {self.ruleset.version or ''}".rstrip()
            + f": {len(self.sources)} source tensors -> {len(self.targets)} target tensors, "
            f"{len(self.nodes)} steps",
        ]
        for row in self.rows():
            lines.append(f"{row['sources']} -> {' -> '.join(row['ops'])} -> {row['target']}  {row['meta']}")
        lines.extend(f"override: {o.describe()}" for o in self.ruleset.overrides)
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)

    def __repr__(self) -> str:  # a summary: the full plan of a real model is megabytes of keys
        return (f"Plan({self.ruleset.name!r} {self.ruleset.version or ''}: {len(self.sources)} source -> "
                f"{len(self.targets)} target tensors in {len(self.nodes)} steps, {len(self.dropped)} dropped)")

    def summary(self) -> dict[str, Any]:
        return {
            "rules": self.ruleset.name,
            "version": self.ruleset.version,
            "source_tensors": len(self.sources),
            "target_tensors": len(self.targets),
            "steps": len(self.nodes),
            "dropped": [n.inputs[0].key for n in self.dropped],
            "overrides": [o.describe() for o in self.ruleset.overrides],
            "source_bytes": sum(v.meta.nbytes for v in self.sources.values()),
            "target_bytes": sum(v.meta.nbytes for v in self.targets.values()),
        }


def lineage(value: Value) -> list[Node]:
    """Every node that contributed to ``value``, in execution order."""
    seen: dict[int, Node] = {}
    stack = [value]
    while stack:
        node = stack.pop().producer
        if node is not None and node.index not in seen:
            seen[node.index] = node
            stack.extend(node.inputs)
    return [seen[i] for i in sorted(seen)]


_RANK = re.compile(r"^(.*@rank)(\d+)$")


def fold_ranks(keys: Sequence[str]) -> str:
    """``a@rank0, a@rank1`` -> ``a@rank{0..1}``: plans stay readable at TP=8."""
    groups: dict[str, list[int]] = {}
    plain = []
    for key in keys:
        found = _RANK.match(key)
        if found:
            groups.setdefault(found.group(1), []).append(int(found.group(2)))
        else:
            plain.append(key)
    folded = []
    for stem, ranks in groups.items():
        ranks.sort()
        if len(ranks) > 1 and ranks == list(range(ranks[0], ranks[-1] + 1)):
            folded.append(f"{stem}{{{ranks[0]}..{ranks[-1]}}}")
        else:
            folded.extend(f"{stem}{r}" for r in ranks)
    return ", ".join(plain + folded)

