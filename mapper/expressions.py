"""Safe integer expressions for rule files: ``num_heads // tp * head_dim``, ``i + 2``, ``tied``.

Rule files are data, not code: expressions are parsed with :mod:`ast` and only integer
arithmetic, comparisons, ``and``/``or``/``not``, ``x if c else y`` and ``min``/``max`` are
allowed. Nothing is ever passed to ``eval``.

Limits (a rule file may come from anywhere, e.g. inside a model folder): an expression has at
most :data:`MAX_LENGTH` characters, and every value it computes, including intermediate ones,
lies within +-:data:`MAX_VALUE` (2**63, the range of a tensor dimension): ``2 ** 64 ** 64``
would otherwise compute a number of millions of digits. Both are errors naming the limit.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Mapping
from functools import lru_cache

from mapper.errors import RuleFileError

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_COMPARE = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
}
_FUNCTIONS = {"min": min, "max": max}
MAX_LENGTH = 500  # characters of one expression
MAX_VALUE = 2**63  # magnitude of any value an expression computes


class Expression:
    """A parsed, validated expression; ``names`` are the free variables it reads."""

    def __init__(self, text: str):
        self.text = text.strip()
        if len(self.text) > MAX_LENGTH:
            raise RuleFileError(
                f"expression {self.text[:40]!r}... has {len(self.text)} characters; the limit is {MAX_LENGTH}",
                hint="split the computation into parameters with their own `expr`",
            )
        try:
            self._tree = ast.parse(self.text, mode="eval").body
        except (SyntaxError, RecursionError, MemoryError) as error:
            message = error.msg if isinstance(error, SyntaxError) else "nested too deeply"
            raise RuleFileError(
                f"cannot parse expression {text!r}: {message}",
                hint="expressions use integers, names, + - * // % **, comparisons, and/or/not, "
                "'a if cond else b', min() and max()",
            ) from None
        try:
            self.names: frozenset[str] = frozenset(_check(self._tree, self.text))
        except RecursionError:
            raise RuleFileError(
                f"expression {self.text!r} is nested too deeply", hint="split it into parameters with their own `expr`"
            ) from None

    def evaluate(self, values: Mapping[str, int]) -> int:
        missing = sorted(self.names - set(values))
        if missing:
            raise RuleFileError(
                f"expression {self.text!r} uses undefined name(s) {', '.join(missing)}",
                hint="declare them under 'parameters' (or bind them as placeholders)",
            )
        try:
            return _evaluate(self._tree, values)
        except ZeroDivisionError:
            raise RuleFileError(f"expression {self.text!r} divides by zero with {dict(values)}") from None
        except _OutOfRange as error:
            raise RuleFileError(
                f"expression {self.text!r} {error} with {dict(values)}; values are limited to "
                f"-2**63 < v < 2**63 (the range of a tensor dimension)",
                hint="check the expression and the parameter values it uses",
            ) from None

    def __repr__(self) -> str:
        return f"Expression({self.text!r})"


@lru_cache(maxsize=4096)
def parse(text: str) -> Expression:
    return Expression(text)


def evaluate(text: str | int, values: Mapping[str, int]) -> int:
    """Evaluate an expression (or pass an int through)."""
    if isinstance(text, bool):
        return int(text)
    if isinstance(text, int):
        return text
    return parse(str(text)).evaluate(values)


def _check(node: ast.AST, text: str) -> set[str]:
    """Reject anything but the allowed grammar; return the free names."""
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, int):
            raise RuleFileError(
                f"expression {text!r}: only integer constants are allowed, got {node.value!r}"
            )
        if abs(node.value) >= MAX_VALUE:
            raise RuleFileError(
                f"expression {text!r}: the constant {node.value} is not below 2**63 in magnitude (the limit)",
                hint="values in rule files are sizes and indices",
            )
        return set()
    if isinstance(node, ast.Name):
        if node.id in _FUNCTIONS:
            raise RuleFileError(f"expression {text!r}: {node.id} must be called")
        return {node.id}
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        return _check(node.left, text) | _check(node.right, text)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd, ast.Not)):
        return _check(node.operand, text)
    if isinstance(node, ast.BoolOp):
        return set().union(*(_check(v, text) for v in node.values))
    if isinstance(node, ast.Compare) and all(type(op) in _COMPARE for op in node.ops):
        return set().union(_check(node.left, text), *(_check(c, text) for c in node.comparators))
    if isinstance(node, ast.IfExp):
        return _check(node.test, text) | _check(node.body, text) | _check(node.orelse, text)
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in _FUNCTIONS
        and not node.keywords
        and node.args
    ):
        return set().union(*(_check(a, text) for a in node.args))
    raise RuleFileError(
        f"expression {text!r}: {type(node).__name__} is not allowed",
        hint="use integers, names, + - * // % **, comparisons, and/or/not, 'a if c else b', min, max",
    )


class _OutOfRange(Exception):
    """A value outside +-MAX_VALUE (said by Expression.evaluate, which knows the text)."""


def _bounded(value: int, what: str) -> int:
    if abs(value) >= MAX_VALUE:
        raise _OutOfRange(f"computes {what} beyond the limit")
    return value


def _power(left: int, right: int) -> int:
    """``left ** right``, refused before computing when the result cannot be within the limit."""
    if right < 0:
        raise _OutOfRange(f"raises to the negative power {right}")
    if abs(left) > 1 and (abs(left).bit_length() - 1) * right >= MAX_VALUE.bit_length() - 1:
        raise _OutOfRange(f"computes {left} ** {right}, beyond the limit")
    return left**right


def _evaluate(node: ast.AST, values: Mapping[str, int]) -> int:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        return _bounded(int(values[node.id]), f"{node.id} = {values[node.id]}")
    if isinstance(node, ast.BinOp):
        left, right = _evaluate(node.left, values), _evaluate(node.right, values)
        if isinstance(node.op, ast.Pow):
            return _bounded(_power(left, right), "a power")
        return _bounded(_BINARY[type(node.op)](left, right), "a value")
    if isinstance(node, ast.UnaryOp):
        value = _evaluate(node.operand, values)
        if isinstance(node.op, ast.Not):
            return int(not value)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BoolOp):
        results = [_evaluate(v, values) for v in node.values]
        return int(all(results) if isinstance(node.op, ast.And) else any(results))
    if isinstance(node, ast.Compare):
        left = _evaluate(node.left, values)
        for op, comparator in zip(node.ops, node.comparators):
            right = _evaluate(comparator, values)
            if not _COMPARE[type(op)](left, right):
                return 0
            left = right
        return 1
    if isinstance(node, ast.IfExp):
        return _evaluate(node.body if _evaluate(node.test, values) else node.orelse, values)
    if isinstance(node, ast.Call):
        return _FUNCTIONS[node.func.id](*(_evaluate(a, values) for a in node.args))  # type: ignore[union-attr]
    raise AssertionError(f"unchecked node {node!r}")  # _check rejected everything else


def solve_linear(expression: Expression, unknown: str, result: int, values: Mapping[str, int]) -> int:
    """Solve ``expression == result`` for the one placeholder ``unknown``.

    Placeholder arithmetic is limited to sums and differences in which ``unknown`` appears once
    with a plus sign (``i``, ``i + 2``, ``i + num_layers + 3``, ``4 + i - 1``): the expression is
    then ``unknown + offset`` and ``unknown = result - offset``, always unique.
    """
    return result - expression.evaluate({**values, unknown: 0})


def check_linear(expression: Expression, unknown: str) -> None:
    """Raise unless ``expression`` is ``unknown + offset`` (see :func:`solve_linear`)."""
    if _count_positive(expression._tree, unknown) != 1:
        raise RuleFileError(
            f"placeholder arithmetic {expression.text!r} must have the form '{unknown}', "
            f"'{unknown} + e' or '{unknown} - e' (e without {unknown})",
            hint="only sums and differences with the placeholder added once can be solved from a key",
        )


def _count_positive(node: ast.AST, unknown: str) -> int:
    """How often ``unknown`` is added; -1000 when it appears anywhere else (not solvable)."""
    if isinstance(node, ast.Name):
        return 1 if node.id == unknown else 0
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub)):
        right = _count_positive(node.right, unknown)
        if isinstance(node.op, ast.Sub) and right:
            return -1000
        return _count_positive(node.left, unknown) + right
    if unknown in _check(node, ""):
        return -1000
    return 0
