"""NeoX -> HF -> NeoX at the same TP degree, and a bitwise verdict for every tensor.

The round trip is the proof that nothing was lost or invented: every source tensor comes back
with the same dtype, shape and bytes. Lossy rules (drops of FP8 metadata, summed biases...)
are listed with what the sidecar restored, so "exact" is never an accident of defaults.

Both conversions are written into a work folder ``mapper-roundtrip-<host>-<pid>-*`` in the
temporary folder (``$TMPDIR``), removed on the way out, interrupts included
(:mod:`mapper.interrupts`); one left by a killed run (its pid dead) is removed by the next round
trip.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mapper.checkpoints import convert_checkpoint
from mapper.formats import NeoXCheckpoint
from mapper.formats.output import HOST, pid_alive
from mapper.verify.diff import DiffReport, diff_sources


WORK_PREFIX = "mapper-roundtrip-"


def sweep_stale_work_folders(parent: Path) -> list[Path]:
    """Remove the work folders of round trips of this host whose process is gone (killed)."""
    pattern = re.compile(rf"^{re.escape(WORK_PREFIX)}{re.escape(HOST)}-(?P<pid>\d+)-")
    removed = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = pattern.match(entry.name)
        if match and int(match["pid"]) != os.getpid() and not pid_alive(int(match["pid"])):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
    return removed


@dataclass
class RoundtripReport:
    rules: str
    diff: DiffReport
    lossy: list[dict[str, Any]] = field(default_factory=list)  # per lossy rule: how it came back

    @property
    def ok(self) -> bool:
        return self.diff.ok

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "rules": self.rules, "lossy_rules": self.lossy, **self.diff.to_dict()}


def roundtrip(
    src: str | Path,
    *,
    rules: str | Path | None = None,
    config_files: Sequence[str | Path] = (),
    parameters: Mapping[str, int] | None = None,
    workdir: str | Path | None = None,
    on_start: Callable[[int], None] | None = None,
    on_group: Callable[[int, int], None] | None = None,
) -> RoundtripReport:
    """Convert ``src`` to HF and back in a temporary folder and compare every tensor bitwise.

    ``on_start(nbytes)`` is called once per direction, ``on_group`` after every file (progress).
    """
    parent = Path(workdir) if workdir is not None else Path(tempfile.gettempdir())
    sweep_stale_work_folders(parent)
    with tempfile.TemporaryDirectory(prefix=f"{WORK_PREFIX}{HOST}-{os.getpid()}-", dir=parent) as tmp:
        forward = convert_checkpoint(src, Path(tmp) / "hf", rules=rules, config_files=config_files,
                                     parameters=parameters, on_start=on_start, on_group=on_group)
        assert forward.output is not None
        back = convert_checkpoint(forward.output, Path(tmp) / "neox", tp=forward.prepared.output_tp,
                                  on_start=on_start, on_group=on_group)
        assert back.output is not None
        with NeoXCheckpoint(back.output) as returned:
            report = diff_sources(forward.prepared.source, returned)
    restored, defaults = set(back.report.restored), set(back.report.defaults)
    by_rule: dict[str, dict[str, Any]] = {}
    for node in forward.prepared.plan.lossy_nodes:
        entry = node.writes_residual or ""
        row = by_rule.setdefault(
            node.rule_id, {"rule": node.rule_id, "op": node.op.describe(), "note": node.op.note,
                           "tensors": 0, "from_sidecar": 0, "from_default": 0},
        )
        row["tensors"] += 1
        row["from_sidecar"] += entry in restored
        row["from_default"] += entry in defaults
    return RoundtripReport(forward.prepared.forward_rules.name, report, list(by_rule.values()))
