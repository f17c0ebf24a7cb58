"""The tensor-graph engine: compile (metadata only) -> plan -> streamed execution."""

from mapper.engine.compile import compile_plan
from mapper.engine.execute import ExecutionReport, execute, part_groups
from mapper.engine.plan import Node, Plan, Value
from mapper.engine.sidecar import Sidecar

__all__ = ["ExecutionReport", "Node", "Plan", "Sidecar", "Value", "compile_plan", "execute", "part_groups"]
