"""YAML (and JSON, which is YAML) from files mapper did not write, parsed within limits.

``yaml.safe_load`` runs no code, but a small document can still cost without bound:

- aliases repeat a node without copying it, so an 863-byte file of nested aliases ("billion
  laughs") is a few kB to PyYAML and 2.8 GB to anything that walks, copies or dumps the result;
  an alias inside its own anchor makes a cycle;
- every ``[`` or ``{`` nests one level: PyYAML's scanner rescans all open levels for every token
  (2000 brackets take seconds) and its composer recurses until Python's recursion limit.

Here a document is refused, with an error naming the limit and the line, when it nests deeper
than :data:`MAX_DEPTH` levels (checked while scanning, before the slow part), expands to more than
:data:`MAX_VALUES` values counting each use of an alias as a copy (worked out on the node graph, in
time proportional to the file), refers to itself, or is longer than :data:`MAX_CHARS`. A mapping
that writes a key twice is refused too, naming the second one: PyYAML would silently keep the
last value. Rule files (:mod:`mapper.spec.loader`) and NeoX configs (:mod:`mapper.configs`) are
read this way.
"""

from __future__ import annotations

from typing import Any

import yaml

from mapper.errors import MapperError

MAX_DEPTH = 64  # nesting levels (a NeoX config or rule file needs fewer than 8)
MAX_VALUES = 200_000  # values after expanding aliases (a NeoX config has a few hundred)
MAX_CHARS = 10 * 2**20  # characters of text (rule files and configs are a few kB)


class _LimitedLoader:
    """Mixin for a PyYAML loader class: refuses nesting deeper than :data:`MAX_DEPTH`."""

    where: str = "<text>"
    error: type[MapperError] = MapperError
    _depth = 0

    def _too_deep(self, mark: Any) -> MapperError:
        return self.error(
            f"the document nests deeper than {MAX_DEPTH} levels (mapper's limit for YAML and JSON input)",
            where=_at(self.where, mark),
            hint="flatten the structure, or look for unbalanced '[' or '{' brackets",
        )

    def fetch_flow_collection_start(self, TokenClass: Any) -> None:  # noqa: N803 -- PyYAML's name
        if self.flow_level >= MAX_DEPTH:  # type: ignore[attr-defined]
            raise self._too_deep(self.get_mark())  # type: ignore[attr-defined]
        super().fetch_flow_collection_start(TokenClass)  # type: ignore[misc]

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise self._too_deep(self.peek_event().start_mark)  # type: ignore[attr-defined]
            return super().compose_node(parent, index)  # type: ignore[misc]
        finally:
            self._depth -= 1


class _Loader(_LimitedLoader, yaml.SafeLoader):
    """PyYAML's safe loader within the limits above."""


def limited_loader(text: str, *, where: str, error: type[MapperError] = MapperError) -> Any:
    """A safe loader for ``text`` that refuses deep nesting; call :func:`compose` with it, and
    ``dispose()`` it when done."""
    if len(text) > MAX_CHARS:
        raise error(
            f"the document has {len(text)} characters; mapper reads YAML and JSON of at most {MAX_CHARS}",
            where=where, hint="is this the right file? rule files and model configs are a few kB",
        )
    loader = _Loader(text)
    loader.where, loader.error = where, error
    return loader


def shipped_loader(text: str, *, where: str, error: type[MapperError] = MapperError) -> Any:
    """A loader for text mapper ships itself (its rule files): libyaml's, ~10 times faster, where
    installed. libyaml composes nesting recursively in C, beyond :data:`MAX_DEPTH`'s reach, so
    text from anywhere else goes through :func:`limited_loader`."""
    if not getattr(yaml, "__with_libyaml__", False):
        return limited_loader(text, where=where, error=error)
    loader = yaml.CSafeLoader(text)
    loader.where, loader.error = where, error
    return loader


def compose(loader: Any) -> yaml.Node | None:
    """The document's root node, after checking the limits and that no mapping repeats a key
    (None for an empty document)."""
    node = loader.get_single_node()
    if node is not None:
        check_expansion(node, where=loader.where, error=loader.error)
        check_unique_keys(loader, node)
    return node


_MERGE_TAG = "tag:yaml.org,2002:merge"


def check_unique_keys(loader: Any, root: yaml.Node) -> None:
    """Refuse a mapping that writes a key twice (as the keys are read: ``1`` and ``1.0`` are one
    key), naming the second. Only plain keys are compared; a key that cannot be read is left to
    whoever constructs the document, and ``<<`` merges follow YAML's rules."""
    visited: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) in visited:
            continue
        visited.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
        elif isinstance(node, yaml.MappingNode):
            seen: set[Any] = set()
            for key_node, value_node in node.value:
                stack.extend((key_node, value_node))
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _MERGE_TAG:
                    continue
                try:
                    key = loader.construct_object(key_node)
                except yaml.YAMLError:
                    continue
                if key in seen:
                    raise loader.error(
                        f"key {key!r} appears twice in the same mapping", where=_at(loader.where, key_node.start_mark),
                        hint="YAML would silently keep the last one; remove the duplicate",
                    )
                seen.add(key)


def check_expansion(root: yaml.Node, *, where: str, error: type[MapperError] = MapperError) -> None:
    """Refuse a node graph that refers to itself, or that expands (each node counted once per path
    that reaches it, as a copy would count it) to more than :data:`MAX_VALUES` values or deeper
    than :data:`MAX_DEPTH` levels (aliases can nest what the text does not)."""
    measured: dict[int, tuple[int, int]] = {}  # node -> (values, levels) of its expansion
    open_nodes: set[int] = set()

    def refuse(node: yaml.Node, message: str, hint: str) -> MapperError:
        return error(message, where=_at(where, node.start_mark), hint=hint)

    def too_deep(node: yaml.Node) -> MapperError:
        return refuse(node, f"the document nests deeper than {MAX_DEPTH} levels once its aliases are expanded "
                      "(mapper's limit for YAML and JSON input)", "write the values out instead of nesting aliases")

    def measure(node: yaml.Node, depth: int) -> tuple[int, int]:
        key = id(node)
        if key in open_nodes:
            raise refuse(node, "a YAML alias refers to a node that contains it (a recursive structure)",
                         "remove the alias (*name) inside its own anchor (&name)")
        found = measured.get(key)
        if found is None:
            if depth > MAX_DEPTH:
                raise too_deep(node)
            values, levels = 1, 1
            if isinstance(node, (yaml.SequenceNode, yaml.MappingNode)):
                open_nodes.add(key)
                pairs = node.value if isinstance(node, yaml.MappingNode) else [(child,) for child in node.value]
                for child in (n for pair in pairs for n in pair):
                    child_values, child_levels = measure(child, depth + 1)
                    values, levels = values + child_values, max(levels, child_levels + 1)
                    if values > MAX_VALUES:
                        raise refuse(node, f"the document expands to more than {MAX_VALUES} values (aliases "
                                     "repeating aliases?); that is mapper's limit for YAML and JSON input",
                                     "write the values out instead of nesting aliases")
                open_nodes.discard(key)
            found = measured[key] = (values, levels)
        if depth + found[1] - 1 > MAX_DEPTH:
            raise too_deep(node)
        return found

    measure(root, 1)


def load_yaml(text: str, *, where: str, error: type[MapperError] = MapperError) -> Any:
    """``yaml.safe_load(text)`` within the limits above. Errors of the limits are ``error``
    naming ``where:line:column``; PyYAML's own errors (``yaml.YAMLError``) pass through."""
    instance = limited_loader(text, where=where, error=error)
    try:
        node = compose(instance)
        return None if node is None else instance.construct_document(node)
    finally:
        instance.dispose()


def _at(where: str, mark: Any) -> str:
    return f"{where}:{mark.line + 1}:{mark.column + 1}" if mark is not None else where
