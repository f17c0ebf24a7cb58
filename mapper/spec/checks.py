"""Checks a flat rule set must pass before it meets any checkpoint.

The schema checks the shape of the data; these check its meaning: patterns parse, expressions
use declared parameters, and placeholders flow so that every rule can be inverted (a
placeholder on one side only would leave the inverse unable to rebuild a key).
"""

from __future__ import annotations

import re

from mapper.errors import RuleFileError, file_order
from mapper.expressions import parse
from mapper.ops import Op
from mapper.patterns import Pattern
from mapper.spec.models import Parameter, RuleSet
from mapper.spec.parameters import CONFIG_PARAMETERS

GENERAL_HINT = (
    "placeholders must appear on both sides of a rule (fuse/split: all but `over`); "
    "every other name in a pattern or expression must be a declared parameter or one the config "
    "supplies (`mapper rules params` lists them)"
)
_FIELD = re.compile(r"\{([^{}]*)\}")
_DEFAULTS = {"trim_vocab": 0}  # given only by --trim-vocab


def declare_config_parameters(ruleset: RuleSet) -> RuleSet:
    """Declare the parameters the config supplies that the rules use but do not declare.

    A rule file may write ``expr: 'hidden_size // num_heads'`` without declaring either: their
    values come from the model config (``mapper rules params`` lists them)."""
    declared = set(ruleset.parameters) | set(ruleset.placeholders)
    wanted = sorted((names_used(ruleset) - declared) & set(CONFIG_PARAMETERS))
    if not wanted:
        return ruleset
    added = {name: Parameter(description=CONFIG_PARAMETERS[name], default=_DEFAULTS.get(name)) for name in wanted}
    return ruleset.model_copy(update={"parameters": {**ruleset.parameters, **added}}).with_provenance(ruleset)


def names_used(ruleset: RuleSet) -> set[str]:
    """Every name the rule set's expressions, conditions, ranges and pattern fields read."""
    texts = [p.expr for p in ruleset.parameters.values() if p.expr] + [str(s) for s in ruleset.ranged.values()]
    for op in ruleset.ops:
        texts += op.expressions() + ([op.when] if op.when else [])
        texts += [field.partition(":")[0] for pattern in op.input_patterns() + op.output_patterns()
                  for field in _FIELD.findall(pattern)]
    names: set[str] = set()
    for text in texts:
        try:
            names |= parse(str(text)).names
        except RuleFileError:  # reported by check_rule_set, with its rule
            continue
    return names


def check_rule_set(ruleset: RuleSet) -> None:
    """Raise one RuleFileError listing every problem found, each with its rule's location."""
    problems: list[str] = []
    parameters = set(ruleset.parameters)

    for name, parameter in ruleset.parameters.items():
        if parameter.expr is not None:
            unknown = parse(parameter.expr).names - parameters
            if unknown:
                problems.append(f"parameter {name!r}: expr uses undeclared {', '.join(sorted(unknown))}")
    for name, spec in ruleset.ranged.items():
        unknown = parse(str(spec)).names - parameters
        if unknown:
            problems.append(f"placeholder {name!r}: range uses undeclared {', '.join(sorted(unknown))}")

    hints: list[str] = []  # fixes of specific problems (a forbidden expression...)
    located = []
    for index, op in enumerate(ruleset.ops):
        for problem in _check_op(op, ruleset, parameters, hints):
            origin = ruleset.origin(op.id) or f"rule {index}"
            located.append((file_order(origin.split(" (")[0]), f"{origin} [{op.id}]: {problem}"))
    problems += [text for _, text in sorted(located, key=lambda item: item[0])]  # file order

    if problems:
        shown = "\n".join(f"  - {p}" for p in problems)
        if len(hints) < len(problems):
            hints.append(GENERAL_HINT)
        raise RuleFileError(
            f"rule set {ruleset.name!r} has {len(problems)} problem(s):\n{shown}", hint="; ".join(dict.fromkeys(hints))
        )


def _check_op(op: Op, ruleset: RuleSet, parameters: set[str], hints: list[str]) -> list[str]:
    problems: list[str] = []
    choices = ruleset.choices
    try:
        inputs = [Pattern(p, parameters, choices) for p in op.input_patterns()]
        outputs = [Pattern(p, parameters, choices) for p in op.output_patterns()]
    except RuleFileError as error:
        hints.append(error.hint or GENERAL_HINT)
        return [error.message]

    for expression in op.expressions() + ([op.when] if op.when else []):
        try:
            unknown = parse(expression).names - parameters
        except RuleFileError as error:
            problems.append(error.message)
            hints.append(error.hint or GENERAL_HINT)
            continue
        if unknown:
            problems.append(f"expression {expression!r} uses undeclared {', '.join(sorted(unknown))}")

    def same(patterns: list[Pattern], side: str) -> frozenset[str]:
        sets = {p.placeholders for p in patterns}
        if len(sets) > 1:
            problems.append(f"the `{side}` patterns use different placeholders: {' / '.join(p.text for p in patterns)}")
        return patterns[0].placeholders if patterns else frozenset()

    used_in, used_out = same(inputs, "from"), same(outputs, "to")
    gather, scatter = op.gather_over, op.scatter_over
    for over in (gather, scatter):
        if over is not None and over not in ruleset.ranged:
            problems.append(
                f"`over: {over}` needs {over!r} declared as an integer placeholder with a range "
                f"(e.g. placeholders: {{{over}: tp}})"
            )
    if gather is not None:
        if gather not in used_in:
            problems.append(f"`from` must use the `over` placeholder {{{gather}}}")
        expected_out = used_in - {gather}
    elif scatter is not None:
        if scatter not in used_out:
            problems.append(f"`to` must use the `over` placeholder {{{scatter}}}")
        expected_out = used_in | {scatter}
    else:
        expected_out = used_in

    if inputs and outputs and used_out != expected_out:
        only_in = sorted(expected_out - used_out)
        only_out = sorted(used_out - expected_out)
        if only_in:
            problems.append(
                f"placeholder(s) {', '.join(only_in)} used in `from` but not in `to`: keys would "
                "collide and the inverse could not rebuild them"
            )
        if only_out:
            problems.append(
                f"placeholder(s) {', '.join(only_out)} used in `to` but not in `from`: nothing binds them"
            )
    enumerable = set(ruleset.ranged) | set(choices)
    if not inputs or not outputs:  # drop / create: the inverse enumerates every key
        free = sorted((used_in | used_out) - enumerable)
        if free:
            problems.append(
                f"placeholder(s) {', '.join(free)} need a declared range or choices so the inverse "
                "can re-create every key"
            )
    return problems
