"""The natural key order: ``layers.2`` before ``layers.10``, the one order every listing uses.

Readers list tensors and files in it, writers fill shards in it, compile orders targets in it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_DIGITS = re.compile(r"(\d+)")


def natural_key(text: str) -> tuple[tuple[str | int, ...], str]:
    """Sort key putting ``layers.2`` before ``layers.10`` (digit runs compare as numbers).

    Text and number runs alternate, so two keys never compare a number with a text; the text
    itself breaks ties (``a01`` / ``a1``) so the order is total.
    """
    parts = _DIGITS.split(text)
    return tuple(int(p) if i % 2 else p for i, p in enumerate(parts)), text


def natural_sorted(keys: Iterable[str]) -> list[str]:
    return sorted(keys, key=natural_key)
