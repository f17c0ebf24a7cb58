"""compile(rules, manifest) -> Plan: prove a conversion consistent from key/shape metadata alone.

Rules run in order over a *working set* of keys (the manifest at first). Each rule binds its
``from`` pattern against the working set; each binding consumes its input keys and adds its
output keys. At the end the working set is the target. Along the way compile proves:

- every source key is consumed exactly once (or dropped by a rule, on purpose);
- no key is produced twice; every non-optional rule matched; ranged placeholders are complete
  (no missing layer or TP rank);
- shapes and dtypes check through every op;
- the expected target keys (and shapes), when given, are produced exactly;
- the inverse of a lossy op has its sidecar entry or a declared default.

It reports *all* problems in one :class:`CompileError` (grouped by pattern when it is shown),
each naming the rule and where it was written, with the nearest rule for each key no rule
consumed (nearest by module path, then leaf: :mod:`mapper.engine.nearest`), and, for a rule that
matched nothing, the later rule that produces such keys when there is one (rules run in order).
"""

from __future__ import annotations

import itertools
from functools import cached_property
from collections.abc import Collection, Mapping
from typing import Union

from mapper.errors import CompileError, Problem, RuleFileError
from mapper.keyorder import natural_key
from mapper.ops import NeedsResidual, Op, OpContext, ShapeError
from mapper.patterns import BoundPattern, Pattern
from mapper.engine.nearest import nearest, patterns_meet, shape_of
from mapper.engine.plan import Node, Plan, Value, lineage
from mapper.engine.sidecar import Sidecar
from mapper.spec.models import RuleSet
from mapper.tensors import Manifest, TensorMeta

Expected = Union[Mapping[str, tuple[int, ...]], Collection[str], None]


def compile_plan(
    ruleset: RuleSet,
    manifest: Manifest,
    parameters: Mapping[str, int] | None = None,
    *,
    expected: Expected = None,
    sidecar: Sidecar | None = None,
) -> Plan:
    """Compile ``ruleset`` against ``manifest`` (key -> TensorMeta). Raises CompileError."""
    values = ruleset.resolve_parameters(parameters)
    ranges = ruleset.ranges(values)
    builder = _Builder(ruleset, values, ranges, sidecar)
    for key, meta in manifest.items():
        builder.add_source(key, meta)
    for rule_index, op in enumerate(ruleset.ops):
        try:
            active = op.active(values)
        except RuleFileError as error:
            builder.problem(error.message, rule=op)
            continue
        if active:
            builder.apply_rule(rule_index, op)
    builder.finish(expected)
    return builder.plan()


class _Builder:
    def __init__(self, ruleset: RuleSet, parameters: dict[str, int], ranges: dict[str, int], sidecar: Sidecar | None):
        self.ruleset = ruleset
        self.parameters = parameters
        self.ranges = ranges
        self.sidecar = sidecar.manifest() if sidecar is not None else {}
        self.recreate = sidecar.dropped if sidecar is not None else None
        self.choices = ruleset.choices
        self.names = set(ruleset.parameters)
        self.working: dict[str, Value] = {}
        self.sources: dict[str, Value] = {}
        self.nodes: list[Node] = []
        self.problems: list[Problem] = []
        self.notes: list[str] = []
        self._ids = itertools.count()

    # --- bookkeeping -----------------------------------------------------------------------
    def add_source(self, key: str, meta: TensorMeta) -> None:
        value = Value(next(self._ids), key, meta)
        self.sources[key] = value
        self.working[key] = value

    def problem(self, message: str, *, key: str | None = None, rule: Op | None = None, hint: str | None = None) -> None:
        if rule is None:
            self.problems.append(Problem(message, key=key, hint=hint))
        else:
            self.problems.append(Problem(message, key=key, rule=rule.id, hint=hint, origin=self.ruleset.origin(rule.id)))

    def bound(self, text: str) -> BoundPattern:
        return Pattern(text, self.names, self.choices).bind(self.parameters)

    def context(self, keys: list[str]) -> OpContext:
        return OpContext(self.parameters, self.ranges, keys=tuple(keys))

    # --- one rule ----------------------------------------------------------------------------
    def apply_rule(self, rule_index: int, op: Op) -> None:
        inputs = [self.bound(p) for p in op.input_patterns()]
        outputs = [self.bound(p) for p in op.output_patterns()]
        if not inputs:
            bindings = self._enumerate(outputs[0].pattern)
            found = [(b, [], [o.format(b) for o in outputs]) for b in bindings]
            if self.recreate is not None:  # the sidecar says which of these the source really had
                found = [f for f in found if f[2][0] in self.recreate]
        else:
            found = self._match(op, inputs, outputs)
        if not found and not op.optional and inputs:
            self._matched_nothing(rule_index, op, inputs[0].pattern)
        for binding, in_keys, out_keys in found:
            self._add_node(rule_index, op, binding, in_keys, out_keys)

    def _matched_nothing(self, rule_index: int, op: Op, pattern: Pattern) -> None:
        """A required rule found no key: say so, and whether a later rule makes such keys."""
        later = self._later_producer(rule_index, pattern)
        if later is not None:
            other, index = later
            origin = self.ruleset.origin(other.id)
            mine, theirs = op.stage or "?", other.stage or "?"
            self.problem(
                f"matched no key (pattern {pattern.text!r}); rules run in order, and rule {other.id}"
                + (f" at {origin}" if origin else "") + " produces such keys later",
                rule=op,
                hint=(f"this rule runs in stage {mine}, {other.id} in the later stage {theirs}: "
                      if mine != theirs else f"both run in stage {mine}, where rules run in file order (includes first): ")
                + "put the rule that needs the keys in a later stage (`stage:`), or the one that makes them in an "
                "earlier one (or in a `replace` of the included rule it stands for)",
            )
            return
        near = nearest(pattern.template, self._templates())
        self.problem(
            f"matched no key (pattern {pattern.text!r})",
            rule=op,
            hint=(f"the checkpoint has keys like {near!r}; " if near else "")
            + "mark the rule `optional: true` if the tensor may be absent",
        )

    def _later_producer(self, rule_index: int, pattern: Pattern) -> tuple[Op, int] | None:
        """The first active rule after ``rule_index`` whose outputs fit ``pattern``."""
        for index, other in enumerate(self.ruleset.ops[rule_index + 1:], start=rule_index + 1):
            try:
                if not other.active(self.parameters):
                    continue
            except RuleFileError:
                continue
            for text in other.output_patterns():
                if patterns_meet(pattern, Pattern(text, self.names, self.choices)):
                    return other, index
        return None

    def _match(
        self, op: Op, inputs: list[BoundPattern], outputs: list[BoundPattern]
    ) -> list[tuple[dict, list[str], list[str]]]:
        first = inputs[0]
        matches: list[tuple[dict, str]] = []
        for key in self.working:
            binding = first.match(key)
            if binding is not None and self._in_range(binding):
                matches.append((binding, key))
        matches.sort(key=lambda m: natural_key(m[1]))
        self._check_complete(op, first.pattern, [b for b, _ in matches], exclude=op.gather_over)

        results = []
        gather, scatter = op.gather_over, op.scatter_over
        if gather is not None:
            groups: dict[tuple, dict[int, str]] = {}
            for binding, key in matches:
                rest = tuple(sorted((k, v) for k, v in binding.items() if k != gather))
                groups.setdefault(rest, {})[binding[gather]] = key  # type: ignore[index]
            count = self.ranges[gather]
            for rest, members in groups.items():
                missing = [i for i in range(count) if i not in members]
                base = dict(rest)
                if missing:
                    self.problem(
                        f"fuse over {gather} needs {gather} = 0..{count - 1}; missing "
                        + ", ".join(first.format({**base, gather: i}) for i in missing),
                        rule=op,
                        hint=f"a {gather} shard is missing (a TP rank file?), or `{gather}`'s range is wrong",
                    )
                    for key in members.values():  # reported here; not again as unconsumed
                        del self.working[key]
                    continue
                in_keys = [members[i] for i in range(count)]
                results.append((base, in_keys, [o.format(base) for o in outputs]))
            return results
        for binding, key in matches:
            in_keys = [key]
            absent = []
            for other in inputs[1:]:
                other_key = other.format(binding)
                (in_keys if other_key in self.working else absent).append(other_key)
            if absent:
                self.problem(
                    f"found {key} but not {', '.join(absent)}, which the same rule needs", rule=op
                )
                continue
            if scatter is not None:
                out_keys = [outputs[0].format({**binding, scatter: i}) for i in range(self.ranges[scatter])]
            else:
                out_keys = [o.format(binding) for o in outputs]
            results.append((binding, in_keys, out_keys))
        return results

    def _in_range(self, binding: Mapping[str, int | str]) -> bool:
        return all(
            not isinstance(value, int) or name not in self.ranges or value < self.ranges[name]
            for name, value in binding.items()
        )

    def _check_complete(self, op: Op, pattern: Pattern, bindings: list[dict], exclude: str | None) -> None:
        """Ranged placeholders must take every value of their range (no missing layer or rank)."""
        ranged = sorted(n for n in pattern.placeholders if n in self.ranges and n != exclude)
        if not ranged or not bindings:
            return
        groups: dict[tuple, set[tuple]] = {}
        for binding in bindings:
            rest = tuple(sorted((k, v) for k, v in binding.items() if k not in ranged and k != exclude))
            groups.setdefault(rest, set()).add(tuple(binding[n] for n in ranged))
        every = set(itertools.product(*(range(self.ranges[n]) for n in ranged)))
        bound = pattern.bind(self.parameters)
        for rest, seen in groups.items():
            missing = sorted(every - seen)
            if missing:
                keys = [
                    bound.format({**dict(rest), **dict(zip(ranged, combo)), **({exclude: 0} if exclude else {})})
                    for combo in missing[:3]
                ]
                self.problem(
                    f"{len(missing)} key(s) missing for {', '.join(f'{n} in 0..{self.ranges[n] - 1}' for n in ranged)}, "
                    f"e.g. {', '.join(keys)}",
                    rule=op,
                    hint="a layer or TP rank is missing from the checkpoint, or a parameter "
                    f"({', '.join(f'{n}: {self.ruleset.ranged[n]}' for n in ranged)}) is wrong",
                )

    def _enumerate(self, pattern: Pattern) -> list[dict]:
        names = sorted(pattern.placeholders)
        spaces = [
            range(self.ranges[n]) if n in self.ranges else self.choices.get(n, ()) for n in names
        ]
        return [dict(zip(names, combo)) for combo in itertools.product(*spaces)]

    def _add_node(self, rule_index: int, op: Op, binding: dict, in_keys: list[str], out_keys: list[str]) -> None:
        ctx = self.context(in_keys or out_keys)
        writes = f"{op.id}:{in_keys[0]}" if op.lossy else None
        reads = f"{op.id}:{out_keys[0]}" if op.inverse().lossy else None
        residual = self.sidecar.get(f"{reads}#0") if reads else None

        in_values = [self.working[k] for k in in_keys]
        try:
            if residual is not None and not in_keys:
                out_metas = [residual]
            else:
                out_metas = op.infer([v.meta for v in in_values], ctx)
            if reads and residual is None and op.needs_residual([v.meta for v in in_values], ctx):
                raise NeedsResidual(f"{op.name} needs the sidecar (the rule declares no default)")
        except ShapeError as error:
            self.problem(
                f"{error} (inputs: {', '.join(v.describe() for v in in_values)})",
                key=out_keys[0] if out_keys else in_keys[0], rule=op,
            )
            for key in in_keys:
                del self.working[key]
            return
        except NeedsResidual as error:
            if op.optional and not in_keys:  # an optional tensor with neither sidecar nor default
                note = f"not re-created (optional, no sidecar entry, no default): {op.id} {op.note or ''}".rstrip()
                if note not in self.notes:
                    self.notes.append(note)
                return
            self.problem(
                f"{error}; the sidecar has no entry {reads!r}", key=out_keys[0], rule=op,
                hint="convert with the sidecar written by the forward conversion "
                "(mapper/sidecar.safetensors in the HF folder), or declare a default in the rule",
            )
            return
        for key in in_keys:
            del self.working[key]
        node = Node(len(self.nodes), rule_index, op, binding, in_values, [], writes, reads)
        for value in in_values:
            value.consumer = node
        for key, meta in zip(out_keys, out_metas):
            if key in self.working:
                self.problem(
                    f"produced twice (already there before rule {op.id} ran)", key=key, rule=op,
                    hint="two rules (or two bindings) write the same key; check placeholders and fragments",
                )
                continue
            value = Value(next(self._ids), key, meta, producer=node)
            node.outputs.append(value)
            self.working[key] = value
        self.nodes.append(node)

    # --- the end -----------------------------------------------------------------------------
    def finish(self, expected: Expected) -> None:
        leftover = [k for k, v in self.working.items() if v.producer is None]
        for key in leftover:
            self.problem("no rule consumes this tensor", key=key, hint=self._nearest_rule(key))
        targets = {k: v for k, v in self.working.items() if v.producer is not None}
        if expected is not None:
            self.problems.extend(expected_problems(targets, expected))
        self.targets = dict(sorted(targets.items(), key=lambda kv: natural_key(kv[0])))

    def plan(self) -> Plan:
        if self.problems:
            raise CompileError(self.problems, where=f"rule set {self.ruleset.name}")
        return Plan(
            ruleset=self.ruleset, parameters=self.parameters, ranges=self.ranges,
            sources=self.sources, targets=self.targets, nodes=self.nodes, notes=self.notes,
        )

    def _templates(self) -> list[str]:
        """The distinct shapes of the keys still in play (``layer_*.mlp.fc*_weight@rank*``)."""
        return sorted({shape_of(k) for k in self.working})

    @cached_property
    def _rule_templates(self) -> list[tuple[Op, str, str]]:
        return [
            (op, text, Pattern(text, self.names, self.choices).template)
            for op in self.ruleset.ops
            for text in op.input_patterns()
        ]

    def _nearest_rule(self, key: str) -> str:
        """The rule whose input pattern is nearest ``key`` by structure, and why it did not take it."""
        found = self._nearest_rule_for_shape(shape_of(key))
        if found is None:
            return "no rule mentions anything like it: add a rule (or a `drop` with a `note` saying why)"
        op, text = found
        origin = self.ruleset.origin(op.id)
        why = ""
        binding = Pattern(text, self.names, self.choices).bind(self.parameters).match(key)
        if binding is not None:
            why = " (it matches, but " + (
                "a placeholder is out of its range" if not self._in_range(binding)
                else "an earlier rule or a `when` condition took it out of play") + ")"
        return f"nearest rule: {op.id} {op.name} {text!r}{why}" + (f" at {origin}" if origin else "")

    def _nearest_rule_for_shape(self, shape: str) -> tuple[Op, str] | None:
        """Keys of one shape share their nearest rule: searched once per shape."""
        cache = self.__dict__.setdefault("_nearest_cache", {})
        if shape not in cache:
            by_template: dict[str, tuple[Op, str]] = {}
            for op, text, template in self._rule_templates:
                by_template.setdefault(template, (op, text))
            best = nearest(shape, by_template)
            cache[shape] = by_template[best] if best is not None else None
        return cache[shape]


def expected_problems(targets: Mapping[str, Value], expected: Expected) -> list[Problem]:
    """Target keys (and shapes) against what the target model expects: every difference."""
    problems = []
    wanted = set(expected or ())
    for key in sorted(wanted - set(targets)):
        problems.append(Problem("expected in the target but no rule produces it", key=key))
    for key in sorted(set(targets) - wanted):
        problems.append(Problem("produced but not expected in the target", key=key,
                                hint=f"made by rule {targets[key].producer.rule_id}"))  # type: ignore[union-attr]
    if isinstance(expected, Mapping):
        for key in sorted(wanted & set(targets)):
            want = tuple(expected[key])
            if targets[key].meta.shape != want:
                problems.append(Problem(
                    f"shape {list(targets[key].meta.shape)} but the target model expects {list(want)}", key=key,
                    hint=f"made by rules {', '.join(n.rule_id for n in lineage(targets[key]))}",
                ))
    return problems


def check_expected(plan: Plan, expected: Expected) -> None:
    """Raise CompileError unless ``plan`` produces exactly the expected keys and shapes."""
    problems = expected_problems(plan.targets, expected)
    if problems:
        raise CompileError(problems, where=f"rule set {plan.ruleset.name}")
