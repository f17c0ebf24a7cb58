"""Which key or rule pattern is "nearest" to another, judged by structure: module path, then leaf.

A key is a module path and a leaf (``layer_*.input_layernorm`` + ``weight``). Plain string
similarity called ``mlp.layer_norm_bias`` the nearest thing to a missing ``input_layernorm.*``
(many shared letters, another module); comparing the module paths first does not. Templates
write every field or number as ``*``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from difflib import SequenceMatcher
from functools import lru_cache

from mapper.patterns import Pattern

MODULE_CUTOFF = 0.6  # module paths less alike than this are not "near"


def shape_of(key: str) -> str:
    """``layer_02.mlp.fc1_weight@rank1`` -> ``layer_*.mlp.fc*_weight@rank*``."""
    return re.sub(r"\d+", "*", key)


def _parts(template: str) -> tuple[tuple[str, ...], str]:
    """Module path components and leaf, without the rank suffix."""
    components = template.split("@")[0].split(".")
    return tuple(components[:-1]), components[-1]


@lru_cache(maxsize=4096)
def closeness(a: str, b: str) -> tuple[float, float]:
    """(module path, leaf) similarity of two templates, each 0..1; compare tuples to rank."""
    (module_a, leaf_a), (module_b, leaf_b) = _parts(a), _parts(b)
    path_a, path_b = ".".join(module_a), ".".join(module_b)
    module = (SequenceMatcher(None, module_a, module_b).ratio() + SequenceMatcher(None, path_a, path_b).ratio()) / 2
    if overlap(path_a, path_b):  # a field (`*`) may stand for what the other names: as good as the literal text
        literal = min(len(path_a) - path_a.count("*"), len(path_b) - path_b.count("*"))
        module = max(module, literal / max(len(path_a), len(path_b), 1))
    leaf = 1.0 if overlap(leaf_a, leaf_b) else SequenceMatcher(None, leaf_a, leaf_b).ratio()
    return round(module, 1), leaf


def nearest(template: str, candidates: Iterable[str]) -> str | None:
    """The candidate template with the most similar module path (then leaf), if any is near."""
    best, best_score = None, (MODULE_CUTOFF, -1.0)
    for candidate in candidates:
        score = closeness(template, candidate)
        if score[0] >= MODULE_CUTOFF and score > best_score:
            best, best_score = candidate, score
    return best


@lru_cache(maxsize=4096)
def overlap(a: str, b: str) -> bool:
    """Whether some key fits both templates (``*`` stands for any text)."""
    @lru_cache(maxsize=None)
    def fits(i: int, j: int) -> bool:
        if i == len(a) and j == len(b):
            return True
        if i < len(a) and a[i] == "*":
            return fits(i + 1, j) or (j < len(b) and fits(i, j + 1))
        if j < len(b) and b[j] == "*":
            return fits(i, j + 1) or (i < len(a) and fits(i + 1, j))
        return i < len(a) and j < len(b) and a[i] == b[j] and fits(i + 1, j + 1)

    return fits(0, 0)


def spelled_out(pattern: Pattern, limit: int = 256) -> list[str]:
    """The shapes of the keys a pattern names: string placeholders spelled out, numbers as ``#``."""
    shapes = [""]
    for part in pattern.parts:
        if isinstance(part, str):
            shapes = [shape + part for shape in shapes]
        elif part.choices is not None:
            shapes = [shape + choice for shape in shapes for choice in part.choices][:limit]
        else:
            shapes = [shape + "#" for shape in shapes]
    return shapes


def patterns_meet(a: Pattern, b: Pattern) -> bool:
    """Whether some key fits both patterns."""
    return any(_shapes_meet(x, y) for x in spelled_out(a) for y in spelled_out(b))


@lru_cache(maxsize=16384)
def _shapes_meet(a: str, b: str) -> bool:
    """Whether some key fits both shapes (``#``: a run of digits)."""
    @lru_cache(maxsize=None)
    def fits(i: int, j: int) -> bool:
        if i == len(a) or j == len(b):
            return i == len(a) and j == len(b)
        if a[i] == "#" and b[j] == "#":
            return fits(i + 1, j + 1)
        if a[i] == "#":  # one or more of b's digits
            end = j
            while end < len(b) and b[end].isdigit():
                end += 1
                if fits(i + 1, end):
                    return True
            return False
        if b[j] == "#":
            end = i
            while end < len(a) and a[end].isdigit():
                end += 1
                if fits(end, j + 1):
                    return True
            return False
        return a[i] == b[j] and fits(i + 1, j + 1)

    return fits(0, 0)
