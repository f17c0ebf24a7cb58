"""Plans made of plans: one rule set's output read by another, and a plan that changes nothing.

Re-sharding a NeoX checkpoint is the rule set (merge the TP ranks) followed by its inverse at
another TP degree (shard them again). :func:`chain_plans` joins the two proven plans into one DAG,
each node keeping the parameters of the plan it came from, so the executor streams the whole
thing one output file at a time like any other plan. :func:`identity_plan` passes every tensor
through unchanged (a change of file layout only).
"""

from __future__ import annotations

from mapper.engine.plan import Node, Plan, Value
from mapper.ops import Rename
from mapper.spec.models import RuleSet
from mapper.tensors import Manifest


def chain_plans(first: Plan, second: Plan) -> Plan:
    """``second`` reading ``first``'s targets (``second`` was compiled against ``first.target_manifest``)."""
    missing = sorted(set(second.sources) - set(first.targets))
    if missing:
        raise ValueError(f"the second plan reads keys the first does not produce: {missing[:3]}")
    for plan in (first, second):
        for node in plan.nodes:
            node.parameters, node.ranges = plan.parameters, plan.ranges
    # values are told apart by id while executing: each compile numbered its own from 0
    taken = max([v.id for v in first.sources.values()] + [v.id for n in first.nodes for v in n.outputs], default=-1)
    for node in second.nodes:
        for value in node.outputs:
            taken += 1
            value.id = taken
    for key, value in second.sources.items():
        upstream = first.targets[key]
        consumer = value.consumer
        if consumer is not None:
            consumer.inputs = [upstream if v is value else v for v in consumer.inputs]
        upstream.consumer = consumer
    nodes = first.nodes + second.nodes
    for index, node in enumerate(nodes):
        node.index = index
    return Plan(ruleset=second.ruleset, parameters=second.parameters, ranges=second.ranges, sources=first.sources,
                targets=second.targets, nodes=nodes, notes=first.notes + second.notes)


def identity_plan(manifest: Manifest, ruleset: RuleSet, parameters: dict[str, int]) -> Plan:
    """Every key of ``manifest`` to itself, bytes untouched (``ruleset`` and ``parameters`` describe the
    model for reports and writers)."""
    sources: dict[str, Value] = {}
    targets: dict[str, Value] = {}
    nodes: list[Node] = []
    for index, (key, meta) in enumerate(manifest.items()):
        source = Value(2 * index, key, meta)
        node = Node(index, 0, Rename(from_=key, to=key, id="pass-through"), {}, [source], [])
        target = Value(2 * index + 1, key, meta, producer=node)
        source.consumer = node
        node.outputs.append(target)
        sources[key], targets[key] = source, target
        nodes.append(node)
    return Plan(ruleset=ruleset, parameters=dict(parameters), ranges={}, sources=sources, targets=targets, nodes=nodes)
