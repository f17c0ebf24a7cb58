"""Tensor-by-tensor comparison of two checkpoints, optionally mapping one through a rule set.

Users compare mapper's output with another converter's (or an old conversion with a new one):
missing and extra keys, shape and dtype differences, and the largest absolute difference. With
a rule set, checkpoint A is converted on the fly and compared group by group, so nothing is
written and memory stays bounded like a conversion's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from mapper.engine import execute
from mapper.formats import open_checkpoint
from mapper.keyorder import natural_sorted
from mapper.ops import bitwise_equal
from mapper.tensors import Manifest, Source, TensorMeta

Status = Literal["equal", "close", "different", "only in A", "only in B", "shape differs"]


@dataclass
class TensorDiff:
    key: str
    status: Status
    a: TensorMeta | None = None
    b: TensorMeta | None = None
    max_abs: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key, "status": self.status, "a": str(self.a) if self.a else None,
            "b": str(self.b) if self.b else None, "max_abs_diff": self.max_abs,
        }


@dataclass
class DiffGroup:
    """Rows of one status whose keys fold into one pattern (what the command line prints)."""

    pattern: str
    status: Status
    rows: list[TensorDiff]

    @property
    def meta(self) -> str:
        return _one_or_many([str(r.a or r.b) for r in self.rows])

    @property
    def meta_a(self) -> str:
        return _one_or_many([str(r.a) if r.a else "-" for r in self.rows])

    @property
    def meta_b(self) -> str:
        return _one_or_many([str(r.b) if r.b else "-" for r in self.rows])

    @property
    def max_abs(self) -> float | None:
        found = [r.max_abs for r in self.rows if r.max_abs is not None]
        return max(found) if found else None


def _one_or_many(values: list[str]) -> str:
    distinct = list(dict.fromkeys(values))
    return distinct[0] if len(distinct) == 1 else f"{len(distinct)} kinds, e.g. {distinct[0]}"


@dataclass
class DiffReport:
    rows: list[TensorDiff] = field(default_factory=list)

    def groups(self, *, show_equal: bool = False) -> list[DiffGroup]:
        """The rows by status, each status's keys folded into patterns (``mapper.keyfold``)."""
        from mapper.keyfold import fold_keys

        by_status: dict[Status, dict[str, TensorDiff]] = {}
        for row in self.rows:
            if row.status != "equal" or show_equal:
                by_status.setdefault(row.status, {})[row.key] = row
        return [DiffGroup(pattern, status, [rows[k] for k in keys])
                for status, rows in by_status.items() for pattern, keys in fold_keys(list(rows))]

    @property
    def key_spaces_differ(self) -> bool:
        """Most keys of one side are missing from the other: A and B name tensors differently
        (a NeoX checkpoint against an HF folder), so a key-by-key comparison says little."""
        counts = self.counts()
        only_a, only_b = counts.get("only in A", 0), counts.get("only in B", 0)
        common = len(self.rows) - only_a - only_b
        return common < max(only_a, only_b)

    @property
    def ok(self) -> bool:
        """True when both hold the same keys with equal (or, with atol, close) values."""
        return all(r.status in ("equal", "close") for r in self.rows)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for row in self.rows:
            out[row.status] = out.get(row.status, 0) + 1
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "counts": self.counts(), "tensors": [r.to_dict() for r in self.rows]}


def diff_tensor(key: str, a: torch.Tensor, b: torch.Tensor, atol: float) -> TensorDiff:
    """One key: bitwise equal, close within ``atol``, or different (dtype differences noted)."""
    meta_a, meta_b = TensorMeta.of(a), TensorMeta.of(b)
    if meta_a.shape != meta_b.shape:
        return TensorDiff(key, "shape differs", meta_a, meta_b)
    if bitwise_equal(a, b):
        return TensorDiff(key, "equal", meta_a, meta_b, 0.0)
    if a.numel() == 0:
        return TensorDiff(key, "different", meta_a, meta_b)
    worst = (a.to(torch.float64) - b.to(torch.float64)).abs().nan_to_num(float("inf")).max().item()
    same_dtype = meta_a.dtype == meta_b.dtype
    if worst <= atol and (same_dtype or atol > 0):
        return TensorDiff(key, "close", meta_a, meta_b, worst)
    return TensorDiff(key, "different", meta_a, meta_b, worst)


def diff_sources(a: Source, b: Source, *, atol: float = 0.0) -> DiffReport:
    """Compare two sources key by key, reading one pair of tensors at a time."""
    report = DiffReport()
    left, right = a.manifest(), b.manifest()
    for key in natural_sorted(list(set(left) | set(right))):
        if key not in right:
            report.rows.append(TensorDiff(key, "only in A", left[key]))
        elif key not in left:
            report.rows.append(TensorDiff(key, "only in B", None, right[key]))
        else:
            report.rows.append(diff_tensor(key, a.get(key), b.get(key), atol))
    return report


class _ComparingSink:
    """A sink that compares each finished group with checkpoint B instead of writing it."""

    def __init__(self, other: Source, atol: float, report: DiffReport):
        self.other, self.atol, self.report = other, atol, report
        self.theirs = other.manifest()

    def groups(self, manifest: Manifest) -> list[list[str]]:
        return [[key] for key in natural_sorted(list(manifest))]

    def write_group(self, index: int, tensors: Mapping[str, torch.Tensor]) -> None:
        for key, tensor in tensors.items():
            if key not in self.theirs:
                self.report.rows.append(TensorDiff(key, "only in A", TensorMeta.of(tensor)))
            else:
                self.report.rows.append(diff_tensor(key, tensor, self.other.get(key), self.atol))


def diff_checkpoints(
    a: str | Path,
    b: str | Path,
    *,
    rules: str | Path | None = None,
    config_files: Sequence[str | Path] = (),
    atol: float = 0.0,
) -> DiffReport:
    """Compare checkpoint folders; with ``rules``, A is first mapped through them (in memory)."""
    if rules is None:
        return diff_sources(open_checkpoint(a), open_checkpoint(b), atol=atol)
    from mapper.checkpoints import prepare

    prepared = prepare(a, rules=rules, config_files=config_files)
    other = open_checkpoint(b)
    report = DiffReport()
    execute(prepared.plan, prepared.source, _ComparingSink(other, atol, report))
    produced = set(prepared.plan.targets)
    for key, meta in other.manifest().items():
        if key not in produced:
            report.rows.append(TensorDiff(key, "only in B", None, meta))
    return report
