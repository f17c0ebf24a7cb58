"""Key patterns: ``layer_{i+2:02d}.attention.qkv.{wb}@rank{r}`` <-> concrete tensor keys.

A pattern is literal text with fields in braces. A field is an integer expression over
*parameters* (known before compile: ``num_layers``, ``tp``...) and at most one *placeholder*
(bound by matching a key: ``i``, ``r``), optionally zero-padded (``:02d``). A placeholder
declared with a list of choices (``wb: [weight, bias]``) is a string placeholder and stands
alone in its field. Matching solves the arithmetic: ``layer_{i+2:02d}`` matches ``layer_05``
with ``i = 3``; formatting does the reverse, so every pattern works in both directions.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Set
from dataclasses import dataclass
from functools import cached_property

from mapper.errors import RuleFileError
from mapper.expressions import Expression, check_linear, parse, solve_linear

Binding = dict[str, "int | str"]
_FIELD = re.compile(r"\{([^{}]*)\}")
_FORMAT = re.compile(r"^(0?\d*)d?$")


@dataclass(frozen=True)
class Field:
    """One ``{...}`` of a pattern."""

    source: str
    expression: Expression
    placeholder: str | None  # the one placeholder it reads, if any
    width: int  # zero-padding width (0: none)
    choices: tuple[str, ...] | None  # set for string placeholders

    def render(self, value: int) -> str:
        return f"{value:0{self.width}d}" if self.width else str(value)


class Pattern:
    """A parsed key pattern. ``parameters`` and ``choices`` say what the names in fields are."""

    def __init__(self, text: str, parameters: Set[str], choices: Mapping[str, tuple[str, ...]]):
        self.text = text
        self.parts: list[str | Field] = []
        position = 0
        for found in _FIELD.finditer(text):
            literal = text[position : found.start()]
            if "{" in literal or "}" in literal:
                raise RuleFileError(f"pattern {text!r} has an unbalanced brace")
            if not literal and self.parts and isinstance(self.parts[-1], Field):
                raise RuleFileError(
                    f"pattern {text!r}: two fields in a row cannot be told apart",
                    hint="put literal text (e.g. '.' or '_') between fields",
                )
            if literal:
                self.parts.append(literal)
            self.parts.append(_parse_field(found.group(1), text, parameters, choices))
            position = found.end()
        tail = text[position:]
        if "{" in tail or "}" in tail:
            raise RuleFileError(f"pattern {text!r} has an unbalanced brace")
        if tail:
            self.parts.append(tail)
        if not self.parts:
            raise RuleFileError("empty key pattern")
        self.placeholders: frozenset[str] = frozenset(
            p.placeholder for p in self.parts if isinstance(p, Field) and p.placeholder
        )
        literals = [p for p in self.parts if isinstance(p, str)]
        self._longest_literal = max(literals, key=len) if literals else ""

    @cached_property
    def template(self) -> str:
        """The pattern with every field shown as ``*`` (for messages and nearest-rule search)."""
        return "".join(p if isinstance(p, str) else "*" for p in self.parts)

    def bind(self, parameters: Mapping[str, int]) -> BoundPattern:
        """Fix the parameter values: constant fields become literal text, the rest a regex."""
        return BoundPattern(self, parameters)

    def __repr__(self) -> str:
        return f"Pattern({self.text!r})"


class BoundPattern:
    """A pattern with known parameters, ready to match and format keys quickly."""

    def __init__(self, pattern: Pattern, parameters: Mapping[str, int]):
        self.pattern = pattern
        self.parameters = dict(parameters)
        regex = []
        self._fields: list[Field] = []
        for part in pattern.parts:
            if isinstance(part, str):
                regex.append(re.escape(part))
            elif part.placeholder is None:
                regex.append(re.escape(part.render(part.expression.evaluate(self.parameters))))
            elif part.choices is not None:
                regex.append("(" + "|".join(re.escape(c) for c in part.choices) + ")")
                self._fields.append(part)
            else:
                regex.append(r"(\d+)")
                self._fields.append(part)
        self._regex = re.compile("".join(regex))
        self._literal = pattern._longest_literal

    def match(self, key: str) -> Binding | None:
        """The placeholder values that make this pattern produce ``key``, or None."""
        if self._literal not in key:
            return None
        found = self._regex.fullmatch(key)
        if found is None:
            return None
        binding: Binding = {}
        for field, text in zip(self._fields, found.groups()):
            assert field.placeholder is not None
            if field.choices is not None:
                value: int | str = text
            else:
                number = int(text)
                if field.render(number) != text:  # 'layer_5' is not '{i:02d}', nor is 'layer_007'
                    return None
                value = solve_linear(field.expression, field.placeholder, number, self.parameters)
                if value < 0:
                    return None
            if binding.setdefault(field.placeholder, value) != value:
                return None
        return binding

    def format(self, binding: Mapping[str, int | str]) -> str:
        """The key this pattern names for ``binding``."""
        out = []
        for part in self.pattern.parts:
            if isinstance(part, str):
                out.append(part)
            elif part.choices is not None:
                out.append(str(binding[part.placeholder]))  # type: ignore[index]
            else:
                values = {**self.parameters, **{k: v for k, v in binding.items() if isinstance(v, int)}}
                out.append(part.render(part.expression.evaluate(values)))
        return "".join(out)


def _parse_field(
    inside: str, pattern: str, parameters: Set[str], choices: Mapping[str, tuple[str, ...]]
) -> Field:
    expression_text, _, spec = inside.partition(":")
    format_match = _FORMAT.match(spec.strip())
    if format_match is None:
        raise RuleFileError(
            f"pattern {pattern!r}: field {{{inside}}} has format {spec!r}",
            hint="the only formats are none and zero padding such as ':02d'",
        )
    width_text = format_match.group(1)
    width = int(width_text) if width_text and width_text.startswith("0") else 0
    if not expression_text.strip():
        raise RuleFileError(f"pattern {pattern!r} has an empty field {{}}")
    expression = parse(expression_text)
    placeholders = sorted(expression.names - set(parameters))
    if len(placeholders) > 1:
        raise RuleFileError(
            f"pattern {pattern!r}: field {{{inside}}} uses placeholders {', '.join(placeholders)}",
            hint="each field may use at most one placeholder (others must be declared parameters)",
        )
    placeholder = placeholders[0] if placeholders else None
    if placeholder is not None and placeholder in choices:
        if expression.text != placeholder or width:
            raise RuleFileError(
                f"pattern {pattern!r}: string placeholder {placeholder!r} must stand alone as "
                f"{{{placeholder}}}",
                hint="string placeholders take one of their declared choices; no arithmetic",
            )
        return Field(inside, expression, placeholder, 0, tuple(choices[placeholder]))
    if placeholder is not None:
        check_linear(expression, placeholder)
    return Field(inside, expression, placeholder, width, None)
