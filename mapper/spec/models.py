"""The rule format, version 1: pydantic models that are the single source of truth.

``schemas/ruleset.v1.json`` is generated from these models (``mapper rules schema``); a test
fails when the file is stale. A rule file looks like::

    schema_version: 1
    name: neox-te-to-hf-gpt-neox
    version: 1.0.0
    description: GPT-NeoX with Transformer Engine -> HF GPTNeoXForCausalLM
    source: neox
    target: hf-gpt-neox
    parameters:
      num_layers: {description: transformer layers}
      tp: {default: 1}
    placeholders:
      i: num_layers        # integer placeholder ranging over 0 .. num_layers-1
      r: tp
      wb: [weight, bias]   # string placeholder: one of these
    include: [fragments/embedding.yaml]
    rules:
      - fuse: {from: "layer_{i+2:02d}.attention.qkv.{wb}@rank{r}", over: r, dim: 0,
               to: "gpt_neox.layers.{i}.attention.query_key_value.{wb}"}
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    create_model,
    field_validator,
    model_validator,
)

from mapper.errors import RuleFileError
from mapper.expressions import parse
from mapper.ops import ALL_OPS, Op
from mapper.ops.base import Stage
from mapper.spec.parameters import parameters_sentence

_SEMVER = r"^\d+\.\d+\.\d+(?:[-+][0-9A-Za-z.-]+)?$"
_NAME = r"^[a-z0-9][a-z0-9._-]*$"
MAX_PLACEHOLDER_RANGE = 65_536  # values of one integer placeholder (layers, TP ranks)
MAX_PLACEHOLDER_COMBINATIONS = 2**20  # of all integer placeholders together


class Parameter(BaseModel):
    """A named integer the rules use: a dimension (``num_heads``, ``tp``) or a switch (``tied``).

    Values come from the model config or the caller (``--param``); ``default`` is used when
    neither gives one, ``expr`` derives the value from other parameters. The parameters the
    config supplies need no declaration (``mapper rules params`` lists them).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    description: str | None = Field(None, description="What the parameter means.")
    default: int | None = Field(None, description="Value when the config and the caller give none.")
    expr: str | None = Field(
        None, description="Derive the value from other parameters, e.g. 'hidden_size // num_heads'."
    )

    @model_validator(mode="after")
    def _one_source(self) -> Parameter:
        if self.default is not None and self.expr is not None:
            raise ValueError("give either `default` or `expr`, not both")
        if self.expr is not None:
            parse(self.expr)
        return self


class Include(BaseModel):
    """A fragment whose rules apply only when a condition on the parameters holds.

    This is how one rule set covers every mix of independent switches: ``{path:
    fragments/gpt-neox/names-attention-te.yaml, when: te_mha}`` beside ``{path:
    fragments/gpt-neox/names-attention.yaml, when: not te_mha}``. The condition joins the ``when``
    of every rule the fragment brings (``(te_mha) and (gpt_j_residual)``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str = Field(description="Fragment or rule set file, relative to this file, or a shipped one: "
                      "`builtin:gpt-neox/tp-merge` (a fragment), `builtin:neox-to-hf-gpt-neox` (a rule set).")
    when: str | None = Field(
        None, description="Include the fragment's rules only when this expression over parameters is "
        "true, e.g. 'te_mha' or 'not te_norm and not te_layernorm_mlp'.")

    @field_validator("when")
    @classmethod
    def _parses(cls, value: str | None) -> str | None:
        if value is not None:
            parse(value)
        return value


Placeholder = Annotated[
    Union[int, str, list[str]],
    Field(
        description="An integer placeholder's range (an expression: it takes 0 .. value-1), or a "
        "string placeholder's list of choices."
    ),
]


def _tag_of_rule(value: Any) -> str | None:
    """A rule is a mapping with exactly one key: the op's name."""
    if isinstance(value, Mapping) and len(value) == 1:
        return next(iter(value))
    if isinstance(value, BaseModel):
        return next(iter(type(value).model_fields))
    return None


def _wrapper(op: type[Op]) -> type[BaseModel]:
    model = create_model(
        f"{op.__name__}Rule",
        __config__=ConfigDict(extra="forbid", frozen=True),
        __doc__=op.__doc__,
        **{op.name: (op, Field(description=(op.__doc__ or "").strip()))},
    )
    return model


RULE_WRAPPERS: dict[str, type[BaseModel]] = {op.name: _wrapper(op) for op in ALL_OPS}

Rule = Annotated[
    Union[tuple(Annotated[wrapper, Tag(name)] for name, wrapper in RULE_WRAPPERS.items())],  # type: ignore[misc]
    Discriminator(_tag_of_rule),
]


def wrap(op: Op) -> BaseModel:
    """The ``{op_name: {...}}`` form of an op, as it appears in a rule file."""
    return RULE_WRAPPERS[op.name](**{op.name: op})


def unwrap(rule: BaseModel) -> Op:
    return getattr(rule, next(iter(type(rule).model_fields)))


@dataclass(frozen=True)
class Override:
    """An included rule that a rule set replaced or dropped (``rules show`` and plans show it)."""

    rule: str  # the included rule's id
    origin: str  # where that rule was written
    by: str  # where the `replace` / `exclude` entry is (file:line)
    replacements: tuple[str, ...] = ()  # the ids of the rules that run in its place; none: excluded

    def describe(self) -> str:
        done = f"replaced by {', '.join(self.replacements)}" if self.replacements else "excluded"
        return f"{self.rule} ({self.origin}): {done} at {self.by}"


class RuleSet(BaseModel):
    """A rule set (or a fragment to include in one): header, parameters, placeholders, rules."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = Field(description="Version of this rule format (always 1).")
    kind: Literal["ruleset", "preset", "fragment"] = Field(
        "ruleset", description="A fragment is only included by rule sets; it needs no version/source/target. "
        "A preset is a rule set included whole with some switches fixed by its `variant` (a shipped name "
        "kept for a common setup); detection picks the full rule set instead."
    )
    name: str = Field(pattern=_NAME, description="Short lower-case name, e.g. 'neox-te-to-hf-gpt-neox'.")
    version: str | None = Field(
        None, pattern=_SEMVER, description="Semantic version of this rule set (required for kind ruleset)."
    )
    description: str = Field(description="What this rule set converts, in one or two sentences.")
    source: str | None = Field(
        None, description="Format converted from: 'neox', or an HF target such as 'hf-gpt-neox', 'hf-llama', 'hf-mistral'."
    )
    target: str | None = Field(None, description="Format converted to (same spellings as `source`).")
    variant: dict[str, Any] = Field(
        default_factory=dict,
        description="The model settings this rule set is for (NeoX config keys, `_` spelling, and values; "
        "a list means any of these values). A model config that contradicts it rules the rule set out "
        "(`mapper detect`, or an error for `--rules`); for HF -> NeoX it supplies the NeoX settings "
        "(e.g. `te_mha: true`). Listed by `mapper rules list`.",
    )
    inverted: bool = Field(False, description="True for a rule set produced by invert().")
    parameters: dict[str, Parameter] = Field(
        default_factory=dict,
        description="Named integers. The model config supplies these, so a rule file uses them without "
        f"declaring them: {parameters_sentence()} (`mapper rules params [CHECKPOINT]` lists them with their "
        "values); declare any other name the rules use.",
    )
    placeholders: dict[str, Placeholder] = Field(
        default_factory=dict, description="Placeholders with a range (integers) or choices (strings)."
    )
    include: list[str | Include] = Field(
        default_factory=list,
        description="Fragments or whole rule sets whose rules this one uses, in order: paths relative to "
        "this file, or shipped ones by reference (`builtin:gpt-neox/tp-merge`, `builtin:neox-to-hf-gpt-neox`), "
        "which picks up their fixes. An entry `{path: ..., when: ...}` includes it only when its condition "
        "holds. A rule set that includes a rule set takes its source, target and variant unless it says its own.",
    )
    stage: Stage | None = Field(
        None, description="The stage of this file's own rules whose keys have no `@rank` to show theirs "
        "(shipped fragments say theirs: names per rank `ranks`, the TP merge `merge`, the vocabulary `model`).",
    )
    exclude: list[str] = Field(
        default_factory=list,
        description="Included rules to drop, by id (`mapper rules show` lists them), or every rule a fragment "
        "wrote, by the fragment's name.",
    )
    replace: dict[str, list[Rule]] = Field(  # type: ignore[valid-type]
        default_factory=dict,
        description="Included rules to replace: rule id (or fragment name) -> the rules that run instead, at "
        "its place, in its stage and under its `when`.",
    )
    rules: list[Rule] = Field(
        default_factory=list, description="This file's own rules, each one op. With includes, they run stage "
        "by stage (ranks, merge, model) with the included rules, after them within a stage; a file that "
        "includes nothing runs them in the order written.",
    )

    _origins: dict[str, str] = PrivateAttr(default_factory=dict)  # rule id -> "file:line (rule n, op)"
    _authors: dict[str, str] = PrivateAttr(default_factory=dict)  # rule id -> name of the file that wrote it
    _overrides: list[Override] = PrivateAttr(default_factory=list)

    @model_validator(mode="after")
    def _header(self) -> RuleSet:
        if self.kind != "fragment" and not self.include:  # an included rule set may give source and target
            missing = [f for f in ("version", "source", "target") if getattr(self, f) is None]
            if missing:
                raise ValueError(f"a rule set needs {', '.join(missing)} (or set kind: fragment)")
        clash = sorted(set(self.parameters) & set(self.placeholders))
        if clash:
            raise ValueError(f"{', '.join(clash)} declared both as parameter and as placeholder")
        return self

    @field_validator("placeholders")
    @classmethod
    def _placeholders(cls, value: dict[str, Any]) -> dict[str, Any]:
        for name, spec in value.items():
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                raise ValueError(f"placeholder name {name!r} is not an identifier")
            if isinstance(spec, list) and not spec:
                raise ValueError(f"placeholder {name!r} has an empty list of choices")
            if isinstance(spec, str):
                parse(spec)
        return value

    # --- views ---------------------------------------------------------------------------
    @property
    def ops(self) -> list[Op]:
        return [unwrap(rule) for rule in self.rules]

    @property
    def choices(self) -> dict[str, tuple[str, ...]]:
        return {k: tuple(v) for k, v in self.placeholders.items() if isinstance(v, list)}

    @property
    def ranged(self) -> dict[str, int | str]:
        return {k: v for k, v in self.placeholders.items() if not isinstance(v, list)}

    def __eq__(self, other: object) -> bool:
        """Equal content; where the rules were read from (``origin``) does not count."""
        return type(other) is type(self) and self.__dict__ == other.__dict__  # type: ignore[union-attr]

    __hash__ = None  # type: ignore[assignment]

    def origin(self, rule_id: str | None) -> str | None:
        """Where a rule was written (``file:line``), when the rule set was loaded from files."""
        return self._origins.get(rule_id or "")

    def with_origins(self, origins: Mapping[str, str]) -> RuleSet:
        self._origins = {**self._origins, **origins}  # a copy shares the dict with its original
        return self

    @property
    def overrides(self) -> list[Override]:
        """Included rules this rule set replaced or excluded (when loaded from files)."""
        return list(self._overrides)

    def replaced_by(self, rule_id: str | None) -> Override | None:
        """The override a rule runs for, if it replaces an included rule."""
        return next((o for o in self._overrides if rule_id in o.replacements), None)

    def with_provenance(self, other: RuleSet) -> RuleSet:
        """Where ``other``'s rules were written and what it overrode, kept on this (derived) rule set."""
        self._origins = {**self._origins, **other._origins}
        self._authors = {**self._authors, **other._authors}
        self._overrides = list(other._overrides)
        return self

    # --- parameters ----------------------------------------------------------------------
    def resolve_parameters(self, given: Mapping[str, int] | None = None) -> dict[str, int]:
        """Every parameter's value: given (from config or caller), else default, else derived."""
        given = dict(given or {})
        values: dict[str, int] = {}
        pending: dict[str, str] = {}
        missing = []
        for name, parameter in self.parameters.items():
            if name in given and given[name] is not None:
                values[name] = int(given[name])
            elif parameter.default is not None:
                values[name] = parameter.default
            elif parameter.expr is not None:
                pending[name] = parameter.expr
            else:
                missing.append(name)
        if missing:
            described = "; ".join(
                f"{n} ({self.parameters[n].description})" if self.parameters[n].description else n
                for n in missing
            )
            raise RuleFileError(
                f"rule set {self.name!r} needs parameter(s) {described}",
                hint="give the model config (--config NEOX_YAML, or config.json in an HF folder) "
                "or pass them explicitly (--param name=value)",
            )
        while pending:
            ready = {n: e for n, e in pending.items() if parse(e).names <= set(values)}
            if not ready:
                raise RuleFileError(
                    f"rule set {self.name!r}: parameters {', '.join(sorted(pending))} derive from "
                    "each other in a cycle or from undefined names",
                    hint="each `expr` may only use other parameters, without cycles",
                )
            for name, expression in ready.items():
                values[name] = parse(expression).evaluate(values)
                del pending[name]
        return values

    def ranges(self, parameters: Mapping[str, int]) -> dict[str, int]:
        """Size of each integer placeholder's range under these parameter values.

        Compile enumerates ranges (every layer and rank must be present), so they are capped:
        each at :data:`MAX_PLACEHOLDER_RANGE` values, all together at
        :data:`MAX_PLACEHOLDER_COMBINATIONS` (a NeoX model has a few hundred layers, TP <= 64)."""
        ranges = {name: parse(str(spec)).evaluate(parameters) for name, spec in self.ranged.items()}
        for name, size in ranges.items():
            if not 0 <= size <= MAX_PLACEHOLDER_RANGE:
                raise RuleFileError(
                    f"rule set {self.name!r}: placeholder {name!r} ranges over {size} values "
                    f"({self.placeholders[name]} with {dict(parameters)}); the limit is 0 to {MAX_PLACEHOLDER_RANGE}",
                    hint="check the parameter values (the model config) and the placeholder's range",
                )
        if math.prod(ranges.values()) > MAX_PLACEHOLDER_COMBINATIONS:
            described = " x ".join(f"{name}: {size}" for name, size in ranges.items())
            raise RuleFileError(
                f"rule set {self.name!r}: the integer placeholders span {math.prod(ranges.values())} combinations "
                f"({described}); the limit is {MAX_PLACEHOLDER_COMBINATIONS}",
                hint="check the parameter values (the model config) and the placeholders' ranges",
            )
        return ranges

    # --- inversion -----------------------------------------------------------------------
    def invert(self) -> RuleSet:
        """The reverse rule set: rules reversed, each op replaced by its inverse.

        ``invert(invert(r)) == r`` for every flattened rule set. Fragments must be resolved
        first (``mapper.load_rules`` does that).
        """
        if self.include or self.replace or self.exclude:
            raise RuleFileError(
                f"rule set {self.name!r} still has includes; load it with mapper.load_rules() to "
                "resolve them before inverting"
            )
        inverted = self.model_copy(
            update={
                "source": self.target,
                "target": self.source,
                "inverted": not self.inverted,
                "rules": [wrap(op.inverse()) for op in reversed(self.ops)],
            }
        )
        return inverted.with_provenance(self)

    def to_data(self) -> dict[str, Any]:
        """Plain data (as a rule file would hold it): dump to YAML or JSON and load back equal."""
        return self.model_dump(mode="json", by_alias=True, exclude_defaults=True)
