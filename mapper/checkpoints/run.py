"""Running a prepared conversion into a folder: the writer, the files beside the model, parts.

The output appears complete or not at all (:mod:`mapper.formats.output`). An HF output carries
mapper's record in its ``mapper/`` subfolder (:mod:`mapper.record`), so the way back inverts the
very same rules.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mapper.version import __version__
from mapper.checkpoints.conversion import Prepared, prepare
from mapper.engine import ExecutionReport, execute
from mapper.errors import MapperError
from mapper.formats.hf_writer import HFWriter
from mapper.formats.neox_writer import NeoXWriter
from mapper.formats.output import AtomicFile, write_bytes_atomic
from mapper.formats.safetensors_io import write_safetensors
from mapper.formats.parts import recorded_kind
from mapper.record import output_path
from mapper.spec import dump_rule_set


@dataclass
class ConversionResult:
    prepared: Prepared
    report: ExecutionReport
    output: Path | None  # None for one part of a multi-part run

    def __repr__(self) -> str:  # a summary; the plan, configs and sidecar are in the fields
        written = "one part written" if self.output is None else f"wrote {self.output}"
        return (f"ConversionResult({written}: {self.report.tensors} tensors, {self.report.bytes_written:,} bytes "
                f"in {self.report.groups} file(s); {self.prepared.direction} with {self.prepared.forward_rules.name!r} "
                f"{self.prepared.forward_rules.version or ''}; {len(self.report.sidecar)} sidecar entries)")


def convert_checkpoint(
    src: str | Path,
    out: str | Path,
    *,
    max_shard_size: int = 5 * 10**9,
    force: bool = False,
    part: tuple[int, int] | None = None,
    average_replicas: bool = False,
    on_start: Callable[[int], None] | None = None,
    on_group: Callable[[int, int], None] | None = None,
    prepared: Prepared | None = None,
    **options: Any,
) -> ConversionResult:
    """Convert a checkpoint folder into ``out`` (complete, or not at all).

    ``options`` are :func:`~mapper.checkpoints.prepare`'s (rules, config_files, to, tp, dtype,
    trim_vocab, settings, ...); a ``prepared`` conversion already holds them, so giving both is an
    error. A check still running in ``prepared`` (``prepare(background_checks=True)``) overlaps
    the streaming; the conversion stops at the first group after it fails, and never commits
    before it passed.
    """
    given = {name: value for name, value in options.items() if value not in (None, (), {}, False)}
    if prepared is not None and given:
        raise MapperError(f"convert_checkpoint: {', '.join(sorted(given))} given with prepared=",
                          hint="a prepared conversion already holds its options: pass them to prepare()")
    ready = prepared or prepare(src, background_checks=True, **options)

    def group_done(index: int, nbytes: int) -> None:
        ready.raise_if_check_failed()
        if on_group is not None:
            on_group(index, nbytes)

    if ready.direction == "hf-to-neox" and ready.tokenizer is not None and ready.neox_yaml is not None:
        ready.neox_yaml.update(ready.tokenizer.yaml_keys(Path(out)))  # where NeoX will find it, not the source's path
    writer = _writer(ready, Path(out), max_shard_size=max_shard_size, force=force, part=part)
    with writer:
        if on_start is not None:
            on_start(sum(m.nbytes for m in ready.target_manifest().values()))
        report = execute(
            ready.plan, ready.source, writer, sidecar=ready.sidecar, average_replicas=average_replicas,
            cast=ready.options.dtype, part=part, on_group=group_done,
        )
        ready.wait_for_checks()
        last = part is None or part[0] == part[1]
        if ready.to_hf:
            _write_record(ready, writer.staging, report, part)
        if ready.tokenizer is not None and last:
            ready.tokenizer.write(writer.staging)
    return ConversionResult(ready, report, writer.finalize() if part is None else None)


def finalize_parts(out: str | Path, *, force: bool = False) -> Path:
    """The last step of a multi-machine conversion: check every part, then publish ``out``."""
    writer = HFWriter if recorded_kind(Path(out)) == "hf" else NeoXWriter
    return writer.finalize_parts(out, force=force)


def _writer(ready: Prepared, out: Path, *, max_shard_size: int, force: bool,
            part: tuple[int, int] | None) -> HFWriter | NeoXWriter:
    source = ready.source
    inputs = [getattr(source, "path", out), getattr(source, "root", getattr(source, "path", out))]
    if ready.to_hf:
        metadata = {"mapper_rules": ready.forward_rules.name, "mapper_rules_version": str(ready.forward_rules.version),
                    "mapper_version": __version__}
        return HFWriter(out, config=dict(ready.hf_config or {}), max_shard_size=max_shard_size, metadata=metadata,
                        parts=part, force=force, inputs=inputs)
    return NeoXWriter(out, yaml_config=ready.neox_yaml, tp=ready.output_tp, parts=part, force=force, inputs=inputs,
                      layout=ready.layout)


def _write_record(ready: Prepared, staging: Path, report: ExecutionReport, part: tuple[int, int] | None) -> None:
    """mapper's record, the rules as used, the NeoX config and the sidecar, in the output's ``mapper/``."""
    (staging / output_path(staging, "record").parent.name).mkdir(exist_ok=True)
    if part is None or part[0] == part[1]:
        write_bytes_atomic(output_path(staging, "record"), (json.dumps(ready.record(), indent=2) + "\n").encode())
        write_bytes_atomic(output_path(staging, "rules"), dump_rule_set(ready.forward_rules).encode())
        write_bytes_atomic(output_path(staging, "neox_config"),
                           yaml.safe_dump(_plain(ready.neox_yaml or {}), sort_keys=False).encode())
    if report.sidecar.entries or report.sidecar.dropped:
        suffix = f".part-{part[0]:05d}-of-{part[1]:05d}" if part else ""
        tensors, metadata = report.sidecar.contents()
        with AtomicFile(output_path(staging, "sidecar", suffix)) as f:
            write_safetensors(f, tensors, metadata)


def _plain(data: Any) -> Any:
    """YAML-safe copy of a config dict (tuples and numpy-ish scalars become plain types)."""
    return json.loads(json.dumps(data, default=str))
