"""Many keys said as few patterns: ``layer_*.attention.qkv.{key,query,value}_{bias,weight}@rank*``.

Output that lists one line per key grows with the model (a 2-layer model at TP 2 already has
~100 keys); findings are about patterns. Keys fold first by their numbers (a number all of them
share stays), then by one name at a time (``key`` / ``query`` -> ``{key,query}``), so a pattern
only stands for keys that exist in each of its name positions.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_SEPARATORS = re.compile(r"([._@])")
_NUMBER = re.compile(r"\d+")


def fold_keys(keys: Sequence[str]) -> list[tuple[str, list[str]]]:
    """``(pattern, keys)`` groups covering ``keys``, in the order of each group's first key."""
    by_shape: dict[str, list[str]] = {}
    for key in keys:
        by_shape.setdefault(_NUMBER.sub("*", key), []).append(key)
    members = [(_SEPARATORS.split(_numbers_that_vary(found)), found) for found in by_shape.values()]
    order = {key: index for index, key in enumerate(keys)}
    folded = [("".join(tokens), sorted(found, key=order.__getitem__)) for tokens, found in _fold(members)]
    return sorted(folded, key=lambda group: order[group[1][0]])


def _numbers_that_vary(keys: Sequence[str]) -> str:
    """Keys of one shape as a pattern: a number they all share stays, the others become ``*``."""
    split = [re.split(r"(\d+)", key) for key in keys]
    return "".join(part if i % 2 == 0 or all(s[i] == part for s in split) else "*" for i, part in enumerate(split[0]))


def _fold(members: list[tuple[list[str], list[str]]]) -> list[tuple[list[str], list[str]]]:
    """Merge patterns that differ in one name (``key`` / ``query``) into ``{key,query}``, until none do."""
    merged = True
    while merged:
        merged = False
        for position in range(max((len(tokens) for tokens, _ in members), default=0)):
            together: dict[tuple[str, ...], list[int]] = {}
            for index, (tokens, _) in enumerate(members):
                if position < len(tokens) and tokens[position] not in "._@":
                    rest = tuple(tokens[:position] + ["\0"] + tokens[position + 1:])
                    together.setdefault(rest, []).append(index)
            folds = [indexes for indexes in together.values() if len(indexes) > 1]
            if not folds:
                continue
            gone: set[int] = set()
            for indexes in folds:
                tokens = list(members[indexes[0]][0])
                names = sorted({name for i in indexes for name in _names(members[i][0][position])})
                tokens[position] = "{" + ",".join(names) + "}"
                members.append((tokens, [key for i in indexes for key in members[i][1]]))
                gone.update(indexes)
            members = [member for index, member in enumerate(members) if index not in gone]
            merged = True
            break
    return members


def _names(token: str) -> list[str]:
    return token[1:-1].split(",") if token.startswith("{") and token.endswith("}") else [token]
