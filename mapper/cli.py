"""The ``mapper`` command: a thin layer over the library (every command is one library call).

Exit codes: 0 ok, 1 a verification ran and failed, 2 bad input of any kind (including usage
errors), 3 an internal error (a bug: please report it with ``--debug`` output), 128 + N when
stopped by signal N (130 Ctrl-C, 143 SIGTERM, 129 SIGHUP; see :mod:`mapper.interrupts`). Errors
print one clear message; ``--debug`` adds the traceback (the exit code stays the same). ``--json`` prints machine-readable
results on stdout; progress and human-readable text go to stderr in that case.
"""

from __future__ import annotations

import json
import sys
import traceback
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape as _escape_markup
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table
from typer.core import TyperCommand, TyperGroup

from mapper.errors import MapperError, printable
from mapper.interrupts import Interrupted, handling_signals, published

class _Command(TyperCommand):
    """A command whose help shows no type label on a flag (typer writes ``<bool>``)."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _flags_without_type(super().get_params(ctx))


class _Group(TyperGroup):
    """The same for a group's own options (``--debug``, ``--version``, ``--help``)."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _flags_without_type(super().get_params(ctx))


def _flags_without_type(params: list[Any]) -> list[Any]:
    for param in params:
        if getattr(param, "is_bool_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


app = typer.Typer(
    cls=_Group,
    name="mapper",
    help="Convert GPT-NeoX checkpoints (every Transformer Engine variant) to HuggingFace and back, "
    "from declarative rule files -- and prove the result computes what the source computed.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
rules_app = typer.Typer(cls=_Group, help="List, show, validate and scaffold rule sets; the parameters the config supplies; the JSON Schema.", no_args_is_help=True)
app.add_typer(rules_app, name="rules")


class State:
    """The flags of the current invocation (reset by :func:`main`)."""

    debug = False
    quiet = False


STATE = State()
# Piped or redirected output gets wide tables instead of the 80-column default.
out = Console(highlight=False, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 200)


def escape(text: str) -> str:
    """Text from files (keys, paths) for the console: rich markup and control characters escaped."""
    return _escape_markup(printable(text, newlines=True))


RulesOpt = Annotated[Optional[str], typer.Option("--rules", "-r", metavar="NAME|PATH", help="Rule set name (`mapper rules list`) or path to a rule file. Detected when not given.")]
ConfigOpt = Annotated[Optional[list[Path]], typer.Option("--config", "-c", metavar="FILE", help="NeoX YAML config file (repeat for several), merged as NeoX merges them. Default: the checkpoint's configs/.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
ParamOpt = Annotated[Optional[list[str]], typer.Option("--param", "-p", metavar="NAME=INT", help="Set a rule-set parameter (repeatable; overrides the config).")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", metavar="KEY=VALUE", help="Override a NeoX config setting (repeatable), e.g. te_mha=true, rms-norm-epsilon=1e-6, gqa_layout=pre-1315.")]
ToOpt = Annotated[Optional[str], typer.Option("--to", metavar="hf|neox", help="Output format: hf or neox. Default: the other one (neox -> neox re-shards a NeoX checkpoint, with --tp and --layout).")]
TpOpt = Annotated[Optional[int], typer.Option("--tp", metavar="N", help="TP degree of a NeoX output. Default: the original, else 1.", min=1)]
LayoutOpt = Annotated[Optional[str], typer.Option("--layout", metavar="pipeline|sequential", help="Layout of a NeoX output: pipeline (one file per layer and rank) or sequential (one file per rank). Default: the source's, else pipeline.")]
WeightsOpt = Annotated[str, typer.Option("--weights", metavar="module|master", help="NeoX source weights: module (the model states) or master (the fp32 master copies in the ZeRO optimizer shards of a bf16/fp16 run).")]
ShardSizeOpt = Annotated[str, typer.Option("--max-shard-size", metavar="SIZE", help="Largest HF shard, in transformers' units: 5GB (10^9 bytes), 2GiB (2^30), 500MB, 100KiB, or a number of bytes; a lower-case b means bits (5Gb = 625 MB).")]


@app.callback()
def _global(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks (anywhere on the command line).")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or notes (anywhere on the command line).")] = False,
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.", is_eager=True)] = False,
) -> None:
    if version:
        from mapper import __version__

        out.print(f"mapper {__version__}")
        raise typer.Exit()
    STATE.debug = STATE.debug or debug
    STATE.quiet = STATE.quiet or quiet


# --- helpers ---------------------------------------------------------------------------------
def _params(values: list[str] | None) -> dict[str, int]:
    params = {}
    for item in values or []:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise MapperError(f"--param {item!r} is not NAME=INT", hint="e.g. --param gpt_j_residual=1")
        try:
            params[name.strip()] = int(value)
        except ValueError:
            raise MapperError(f"--param {item!r}: {value!r} is not an integer", hint="e.g. --param tp=2") from None
    return params


def _settings(values: list[str] | None) -> dict[str, Any]:
    """``--set key=value``: values read as YAML scalars (true, 1e-6, 8, te_layernorm)."""
    settings: dict[str, Any] = {}
    for item in values or []:
        name, sep, text = item.partition("=")
        if not sep or not name.strip():
            raise MapperError(f"--set {item!r} is not KEY=VALUE", hint="e.g. --set te_mha=true")
        value: Any = text.strip()
        lowered = value.lower()
        if lowered in ("true", "false"):
            value = lowered == "true"
        else:
            for parse in (int, float):
                try:
                    value = parse(value)
                    break
                except ValueError:
                    continue
        settings[name.strip()] = value
    return settings


_DECIMAL_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9}  # 5Gb (lower-case b): bits, an eighth
_BINARY_UNITS = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def _size(text: str) -> int:
    """``--max-shard-size`` as transformers reads ``max_shard_size`` (``save_pretrained``'s
    ``convert_file_size_to_int``), so a size means the same to both: a whole number followed by
    KiB/MiB/GiB (any case, powers of 2) or KB/MB/GB (powers of 10; a final lower-case ``b`` counts
    bits, so 8Mb is one MB), or a whole number alone for bytes. Anything else (``1B``, ``5G``,
    ``1.5GB``, ``TB``) is refused, as transformers refuses it."""
    upper = text.upper()
    for units in (_BINARY_UNITS, _DECIMAL_UNITS):
        unit = next((u for u in units if upper.endswith(u)), None)
        if unit is not None:
            number = text[: -len(unit)].strip()
            bits = units is _DECIMAL_UNITS and text.endswith("b")
            break
    else:
        number, bits, unit = text.strip(), False, None
    if number.isascii() and number.isdigit():
        size = int(number) * (_BINARY_UNITS | _DECIMAL_UNITS).get(unit or "", 1)
        size = size // 8 if bits else size
        if size > 0:
            return size
    raise MapperError(f"--max-shard-size {text!r} is not a size (transformers' units)",
                      hint="a whole number and a unit: 5GB (10^9 bytes), 500MB, 2GiB (2^30 bytes), 512MiB, 100KB, "
                           "or a number of bytes; a lower-case b means bits (5Gb is 625 MB)")


def _part(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    index, sep, total = text.partition("/")
    try:
        part = (int(index), int(total))
    except ValueError:
        part = (0, 0)
    if not sep or not 1 <= part[0] <= part[1]:
        raise MapperError(f"--part {text!r} is not I/N with 1 <= I <= N", hint="e.g. --part 3/8 for the third of eight parts")
    return part


def _dtype(text: str | None) -> Any:
    if text is None:
        return None
    from mapper.dtypes import dtype_from_name

    dtype = dtype_from_name(text)
    if not dtype.is_floating_point:
        raise MapperError(f"--dtype {text}: weights can only be cast to a floating-point dtype", hint="float32, bfloat16 or float16")
    return dtype


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _notes(notes: list[str], *, as_json: bool, warnings: list[str] = ()) -> None:  # type: ignore[assignment]
    console = err if as_json else out
    for warning in warnings:  # shown even with --quiet: each asks a person to check something
        err.print(f"[yellow]warning:[/yellow] {escape(warning)}")
    if STATE.quiet:
        return
    for note in notes:
        console.print(f"[dim]note:[/dim] {escape(note)}")


def _table(title: str | None, *columns: str) -> Table:
    """A table whose long keys and patterns wrap inside their cells."""
    table = Table(title=title)
    for column in columns:
        table.add_column(column, overflow="fold")
    return table


@contextmanager
def _progress(label: str) -> Iterator[tuple[Any, Any]]:
    """A bytes progress bar (throughput, ETA) on stderr, shown once writing starts."""
    if STATE.quiet:
        yield None, None
        return
    columns = [TextColumn(f"[bold]{label}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn()]
    progress = Progress(*columns, console=err)
    task = None

    def started(total: int) -> None:  # called once per conversion; a round trip makes two
        nonlocal task
        if task is None:
            progress.start()
            task = progress.add_task(label, total=total)
        else:
            progress.update(task, total=progress.tasks[0].total + total)

    def advanced(_index: int, nbytes: int) -> None:
        if task is not None:
            progress.advance(task, nbytes)

    try:
        yield started, advanced
    finally:
        if task is not None:
            progress.stop()


# --- convert / plan / detect -----------------------------------------------------------------
@app.command()
def convert(
    src: Annotated[Path, typer.Argument(metavar="SRC", help="NeoX checkpoint (global_stepN or its parent) or HF folder.")],
    out_dir: Annotated[Path, typer.Argument(metavar="OUT", help="Output folder (appears complete or not at all).")],
    rules: RulesOpt = None,
    config: ConfigOpt = None,
    to: ToOpt = None,
    tp: TpOpt = None,
    layout: LayoutOpt = None,
    weights: WeightsOpt = "module",
    dtype: Annotated[Optional[str], typer.Option("--dtype", metavar="DTYPE", help="Cast floating tensors (float32, bfloat16, float16); overflow is an error.")] = None,
    trim_vocab: Annotated[Optional[int], typer.Option("--trim-vocab", metavar="N", help="Keep only the first N vocabulary rows (cut rows go to the sidecar).", min=1)] = None,
    max_shard_size: ShardSizeOpt = "5GB",
    force: Annotated[bool, typer.Option("--force", help="Replace an existing OUT (only once the new one is complete).")] = False,
    part: Annotated[Optional[str], typer.Option("--part", metavar="I/N", help="Convert only part I/N (a job array on machines sharing a filesystem); then run `mapper finalize OUT`.")] = None,
    average_replicas: Annotated[bool, typer.Option("--average-replicas", help="Average replicated tensors that differ across TP ranks instead of refusing (lossy).")] = False,
    param: ParamOpt = None,
    set_: SetOpt = None,
    strict: Annotated[bool, typer.Option("--strict", help="Refuse settings HF can only approximate (e.g. TE LayerNormMLP's fixed eps) instead of converting and recording them.")] = False,
    force_rules: Annotated[bool, typer.Option("--force-rules", help="Use --rules even when its variant contradicts the config (its settings win).")] = False,
    tokenizer: Annotated[Optional[Path], typer.Option("--tokenizer", metavar="PATH", help="Tokenizer file or folder to write with the output, instead of the one the NeoX config names (tokenizer.json, vocab.json + merges.txt, .model, .tiktoken, or an HF tokenizer folder).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Convert a checkpoint: NeoX -> HF, or HF -> NeoX (the rule set's inverse)."""
    from mapper.checkpoints import convert_checkpoint, prepare

    shard_size, part_of = _size(max_shard_size), _part(part)  # refused before any file is read
    ready = prepare(src, rules=rules, config_files=config or [], tp=tp, trim_vocab=trim_vocab, parameters=_params(param),
                    settings=_settings(set_), strict=strict, force_rules=force_rules, dtype=_dtype(dtype),
                    tokenizer=tokenizer, to=to, layout=layout, weights=weights, background_checks=True)  # convert_checkpoint waits for them before committing
    _notes(ready.notes, as_json=as_json, warnings=ready.warnings)
    if not as_json and not STATE.quiet:
        direction = {"neox-to-hf": "NeoX -> HF", "hf-to-neox": "HF -> NeoX",
                     "neox-to-neox": f"NeoX -> NeoX (TP {getattr(ready.source, 'tp', '?')} -> {ready.output_tp})"}
        how = {"neox-to-hf": "", "hf-to-neox": " (inverted)", "neox-to-neox": " and its inverse"}
        out.print(f"{direction[ready.direction]} with rule set [bold]{ready.forward_rules.name}[/bold] "
                  f"{ready.forward_rules.version}{how[ready.direction]}")
    with _progress("converting") as (started, advanced):
        result = convert_checkpoint(
            src, out_dir, max_shard_size=shard_size, force=force, part=part_of,
            average_replicas=average_replicas, on_start=started, on_group=advanced, prepared=ready,
        )
    summary = {
        "output": str(result.output) if result.output else None,
        "part": part,
        "rules": ready.forward_rules.name,
        "rules_version": ready.forward_rules.version,
        "direction": ready.direction,
        "tensors": result.report.tensors,
        "bytes": result.report.bytes_written,
        "files": result.report.groups,
        "sidecar_entries": len(result.report.sidecar),
        "notes": ready.notes,
        "warnings": ready.warnings,
        "approximations": [a.model_dump() for a in ready.approximations],
    }
    if as_json:
        _print_json(summary)
    elif result.output is None:
        out.print(f"part {part} written; when every part is done, run: mapper finalize {out_dir}")
    else:
        out.print(f"[green]wrote[/green] {result.output}: {result.report.tensors} tensors, "
                  f"{result.report.bytes_written / 1e6:.1f} MB in {result.report.groups} file(s)")
        if ready.direction == "neox-to-hf" and not STATE.quiet:
            options = [f"--config {path}" for path in config or []] + [f"--set {item}" for item in set_ or []]
            out.print(" ".join(["next: mapper verify", str(src), str(result.output), *options])
                      + ("" if dtype is None else f"   (compares in {dtype}, as mapper/record.json records)"))


@app.command()
def finalize(
    out_dir: Annotated[Path, typer.Argument(metavar="OUT", help="The OUT every `convert --part I/N` wrote to.")],
    force: Annotated[bool, typer.Option("--force", help="Replace an existing OUT.")] = False,
) -> None:
    """Last step of a multi-machine conversion: check every part, then publish OUT."""
    from mapper.checkpoints import finalize_parts

    out.print(f"[green]complete[/green]: {finalize_parts(out_dir, force=force)}")


@app.command()
def plan(
    src: Annotated[Path, typer.Argument(metavar="SRC", help="NeoX checkpoint or HF folder.")],
    rules: RulesOpt = None,
    config: ConfigOpt = None,
    to: ToOpt = None,
    tp: TpOpt = None,
    layout: LayoutOpt = None,
    weights: WeightsOpt = "module",
    dtype: Annotated[Optional[str], typer.Option("--dtype", metavar="DTYPE", help="Size the output as cast to this dtype (as convert --dtype would).")] = None,
    trim_vocab: Annotated[Optional[int], typer.Option("--trim-vocab", metavar="N", help="Plan keeping only the first N vocabulary rows of an HF output.", min=1)] = None,
    param: ParamOpt = None,
    set_: SetOpt = None,
    max_shard_size: ShardSizeOpt = "5GB",
    as_json: JsonOpt = False,
) -> None:
    """Dry run from metadata only: source -> ops -> target per tensor (with the rule ids), sizes, peak memory."""
    from mapper.checkpoints import prepare
    from mapper.errors import CompileError

    shard_size = _size(max_shard_size)  # a bad size is refused before any file is read
    try:
        ready = prepare(src, rules=rules, config_files=config or [], tp=tp, trim_vocab=trim_vocab, parameters=_params(param),
                        settings=_settings(set_), to=to, layout=layout, weights=weights, dtype=_dtype(dtype))
    except CompileError as error:
        if as_json:
            _print_json({"ok": False, **error.to_dict()})
        else:
            _problems_table(error)
        raise _said(error) from None
    the_plan = ready.plan
    groups = ready.output_groups(shard_size)
    summary = {**the_plan.summary(), "target_bytes": sum(m.nbytes for m in ready.target_manifest().values()),
               "direction": ready.direction, "parameters": the_plan.parameters,
               "output_files": len(groups), "peak_memory_bytes": ready.peak_memory_bytes(shard_size), "notes": ready.notes}
    if as_json:
        _print_json({**summary, "tensors": the_plan.rows()})
        return
    if not STATE.quiet:  # -q: the summary line only
        table = _table(f"{ready.forward_rules.name} {ready.forward_rules.version} ({ready.direction})",
                       "source", "ops [rule]", "target", "shape")
        for row in the_plan.rows():
            steps = " -> ".join(f"{step['op']} [{step['rule']}" + (f", replaces {step['replaces']}" if step["replaces"] else "")
                                + "]" for step in row["steps"])
            table.add_row(escape(row["sources"]), escape(steps or "(unchanged)"), escape(row["target"]), row["meta"])
        out.print(table)
        for override in the_plan.ruleset.overrides:
            out.print(f"override: {escape(override.describe())}")
    _notes(ready.notes, as_json=False, warnings=ready.warnings)
    out.print(
        f"{summary['source_tensors']} source tensors ({summary['source_bytes'] / 1e6:.1f} MB) -> "
        f"{summary['target_tensors']} target tensors ({summary['target_bytes'] / 1e6:.1f} MB) in "
        f"{len(groups)} file(s); peak memory at most {summary['peak_memory_bytes'] / 1e6:.1f} MB"
    )


def _problems_table(error: Any) -> None:
    """A CompileError's problems, one row per pattern (``--json`` lists every key)."""
    table = _table("problems (one row per pattern; --json lists every key)", "where / tensors", "problem", "count",
                   "hint / nearest rule")
    for group in error.groups:
        place = group.pattern or ""
        if group.origin:
            place = f"{group.origin} [{group.rule}]" + (f"\n{place}" if place else "")
        example = f" (e.g. {group.keys[0]})" if len(group.keys) > group.SHOWN_KEYS else ""
        table.add_row(escape(place), escape(group.message + example), str(len(group.keys) or 1), escape(group.hint or ""))
    err.print(table)


def _said(error: Any) -> MapperError:
    """The error to exit with once a table said what ``error`` says (said once, not twice)."""
    kinds = len(error.groups)
    return MapperError(
        f"the rule set does not fit this checkpoint: {len(error.problems)} problem(s) of {kinds} kind(s), listed above",
        where=error.where, hint=error.hint,
    )


@app.command()
def detect(
    path: Annotated[Path, typer.Argument(metavar="PATH", help="NeoX checkpoint or HF folder.")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Name the rule set that fits a checkpoint, its TE switches and the parts of the rule set they turn on."""
    from mapper.checkpoints import detect_checkpoint
    from mapper.detect import require_single, rule_set_parts

    detection = detect_checkpoint(path, config_files=config or [], settings=_settings(set_))
    if as_json:
        _print_json(detection.summary())
    else:
        table = _table(f"rule sets tried on {path}", "rule set", "fits", "why not / optional rules left unused")
        for candidate in detection.candidates:
            why = candidate.reasons[0].splitlines()[0] if candidate.reasons else ", ".join(candidate.unused_optional) or "-"
            table.add_row(candidate.rules.name, "[green]yes[/green]" if candidate.fits else "no", escape(why))
        out.print(table)
    for conflict in detection.conflicts:
        err.print(f"[yellow]warning:[/yellow] {escape(conflict)}")
    chosen = require_single(detection, f"cannot tell which rule set fits {path}")
    if not as_json:
        out.print(f"[bold]{chosen.name}[/bold] {chosen.version}: {escape(chosen.description.strip())}")
        switches = ", ".join(f"{k}={'on' if v else 'off'}" for k, v in detection.switches().items())
        if switches:
            out.print(f"  switches: {switches}")
        plan_ = detection.chosen.plan if detection.chosen else None
        if plan_ is not None:
            parts = rule_set_parts(chosen, plan_.parameters)
            out.print("  parts that apply:")
            for name in (name for name, on in parts if on):
                out.print(f"    {escape(name)}")
            off = [name for name, on in parts if not on]
            if off:
                out.print("  parts switched off:")
                for name in off:
                    out.print(f"    {escape(name)}")
        for line in detection.chosen.evidence() if detection.chosen else []:
            out.print(f"  evidence: {escape(line)}")


# --- verification ----------------------------------------------------------------------------
@app.command()
def verify(
    first: Annotated[Path, typer.Argument(metavar="NEOX_CHECKPOINT", help="The NeoX checkpoint; with --reference, the HF folder (then the only argument).")],
    second: Annotated[Optional[Path], typer.Argument(metavar="HF_FOLDER", help="The HF folder converted from the checkpoint.")] = None,
    reference: Annotated[Optional[Path], typer.Option("--reference", metavar="DUMP", help="A dump of gpt-neox's own activations (`mapper reference-script`): verify against the training framework itself, for any variant.")] = None,
    rules: RulesOpt = None,
    config: ConfigOpt = None,
    dtype: Annotated[Optional[str], typer.Option("--dtype", metavar="DTYPE", help="Compute precision (default: the cast recorded by `convert --dtype`, a dump's dtype, else float32).")] = None,
    device: Annotated[str, typer.Option("--device", metavar="cpu|cuda", help="Where both forwards run: cpu or cuda.")] = "cpu",
    text: Annotated[Optional[str], typer.Option("--text", metavar="TEXT", help="Verify on this text (needs --tokenizer).")] = None,
    tokenizer: Annotated[Optional[Path], typer.Option("--tokenizer", metavar="DIR", help="Local tokenizer folder for --text.")] = None,
    tokens: Annotated[int, typer.Option("--tokens", metavar="N", help="Greedy continuation length compared on both sides (built-in reference).", min=0)] = 8,
    seq_len: Annotated[int, typer.Option("--seq-len", metavar="N", help="Generated prompt length (without --text).", min=1)] = 16,
    seed: Annotated[int, typer.Option("--seed", metavar="INT", help="Seed of the generated prompt.")] = 0,
    report_file: Annotated[Optional[Path], typer.Option("--report", metavar="FILE", help="Also write the error curves across layers to this self-contained HTML file.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Both forwards block by block, each point judged on the same input; exit 1 if they differ.

    Against mapper's built-in NeoX forward (NEOX_CHECKPOINT HF_FOLDER), or against gpt-neox's own
    activations (--reference DUMP HF_FOLDER).
    """
    from mapper.hf_models import require_local_folder
    from mapper.verify.checkpoints import verify_against_reference, verify_checkpoints

    if device not in ("cpu", "cuda"):
        raise MapperError(f"--device {device!r} is not cpu or cuda", hint="--device cpu (default) or --device cuda")
    paths = [first] if second is None else [first, second]
    expected = 1 if reference is not None else 2
    if len(paths) != expected:
        usage = "mapper verify --reference DUMP HF_FOLDER" if reference is not None else "mapper verify NEOX_CHECKPOINT HF_FOLDER"
        raise MapperError(f"expected {expected} folder(s), got {len(paths)}", hint=f"usage: {usage}")
    roles = ["HF folder"] if reference is not None else ["NeoX checkpoint", "HF folder"]
    for role, path in zip(roles, paths):  # named as missing, never looked up on the Hub
        require_local_folder(path, role)
    if tokenizer is not None:
        require_local_folder(tokenizer, "--tokenizer folder")
    with _count_progress("verifying") as advance:
        if reference is not None:
            report = verify_against_reference(reference, paths[0], rules=rules, config_files=config or [],
                                              dtype=_dtype(dtype), device=device, on_progress=advance)
        else:
            report = verify_checkpoints(
                paths[0], paths[1], rules=rules, config_files=config or [], dtype=_dtype(dtype), device=device,
                text=text, tokenizer=tokenizer, seed=seed, seq_len=seq_len, continuation=tokens, on_progress=advance,
            )
    if report_file is not None:
        from mapper.verify.html import write_html

        write_html(report, report_file)
    if as_json:
        _print_json(report.to_dict())
    else:
        out.print(escape(report.render()))
        if report_file is not None:
            out.print(f"error curves: {report_file}")
    report.raise_if_failed()


@contextmanager
def _count_progress(label: str) -> Iterator[Any]:
    """A stage-count progress bar on stderr (verify: embedding, each block, norm, head, tokens)."""
    if STATE.quiet:
        yield None
        return
    progress = Progress(TextColumn(f"[bold]{label}"), BarColumn(), TextColumn("{task.completed}/{task.total} stages"),
                        TimeRemainingColumn(), console=err, transient=True)
    task = None

    def advance(done: int, total: int) -> None:
        nonlocal task
        if task is None:
            progress.start()
            task = progress.add_task(label, total=total)
        progress.update(task, completed=done, total=total)

    try:
        yield advance
    finally:
        if task is not None:
            progress.stop()


@app.command("reference-script")
def reference_script_command(
    out_file: Annotated[Optional[Path], typer.Option("--out", metavar="FILE", help="Write the script here (default: print it).")] = None,
    ids: Annotated[Optional[Path], typer.Option("--ids", metavar="FILE", help="Also write seeded token ids (JSON) for the script's --ids.")] = None,
    hf: Annotated[Optional[Path], typer.Option("--for", metavar="HF_FOLDER", help="HF folder whose vocabulary bounds the --ids (default: 50000 ids).")] = None,
    seed: Annotated[int, typer.Option("--seed", metavar="INT", help="Seed of the --ids token ids.")] = 0,
    batch: Annotated[int, typer.Option("--batch", metavar="N", help="Rows (sequences) of the --ids.", min=1)] = 2,
    seq_len: Annotated[int, typer.Option("--seq-len", metavar="N", help="Tokens per row of the --ids.", min=1)] = 16,
) -> None:
    """The self-contained script that dumps gpt-neox's own activations for `verify --reference`."""
    from mapper.verify.dump import SCRIPT, reference_script

    script = reference_script()
    if ids is not None:
        import torch

        vocab = 50000
        if hf is not None:
            data = json.loads((hf / "config.json").read_text(encoding="utf-8"))
            vocab = int(data["vocab_size"])
        chosen = torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(seed))
        ids.write_text(json.dumps(chosen.tolist()) + "\n", encoding="utf-8")
    if out_file is None:
        sys.stdout.write(script)
    else:
        out_file.write_text(script, encoding="utf-8")
    name = out_file or SCRIPT
    err.print(
        f"[bold]{'wrote ' + str(out_file) if out_file else 'printed ' + SCRIPT}[/bold] (torch + gpt-neox only; no mapper needed).\n"
        f"In your gpt-neox environment (a checkout with megatron/, DeepSpeed; GPUs and Transformer Engine if the model uses it):\n"
        f"  python {name} --checkpoint CHECKPOINTS/ --out reference.safetensors"
        + (f" --ids {ids}" if ids else "") + "\n"
        "  (one process per TP rank is started for you; or run it under torchrun/deepspeed with --nproc_per_node TP;\n"
        "   --text \"...\" runs a text through the checkpoint's tokenizer; --device cpu works for non-TE models)\n"
        "Then, here:\n"
        "  mapper verify --reference reference.safetensors HF_FOLDER",
        highlight=False,
    )


@app.command()
def roundtrip(
    neox: Annotated[Path, typer.Argument(metavar="NEOX_CHECKPOINT", help="NeoX checkpoint (global_stepN or its parent) to convert there and back.")],
    rules: RulesOpt = None,
    config: ConfigOpt = None,
    param: ParamOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """NeoX -> HF -> NeoX (same TP) in a temporary folder; every tensor must come back bit for bit."""
    from mapper.errors import VerificationFailed
    from mapper.verify.roundtrip import roundtrip as run_roundtrip

    with _progress("round trip") as (started, advanced):
        report = run_roundtrip(neox, rules=rules, config_files=config or [], parameters=_params(param),
                               on_start=started, on_group=advanced)
    if as_json:
        _print_json(report.to_dict())
    else:
        if not STATE.quiet:
            table = _table(f"round trip with {report.rules} (one row per pattern; --json lists every tensor)",
                           "tensors", "count", "dtype/shape", "bitwise equal")
            for group in report.diff.groups(show_equal=True):
                equal = "[green]yes[/green]" if group.status == "equal" else f"[red]{group.status}[/red]"
                table.add_row(escape(group.pattern), str(len(group.rows)), escape(group.meta), equal)
            out.print(table)
            for lossy in report.lossy:
                out.print(f"lossy rule {lossy['rule']} ({escape(lossy['op'])}): {lossy['tensors']} step(s), "
                          f"{lossy['from_sidecar']} restored from the sidecar, {lossy['from_default']} exact without it")
        counts = report.diff.counts()
        out.print(("[green]exact[/green]: " if report.ok else "[red]NOT exact[/red]: ") + ", ".join(f"{v} {k}" for k, v in counts.items()))
    if not report.ok:
        raise VerificationFailed("the round trip did not give every tensor back bit for bit",
                                 hint="the table lists the tensors that differ; `mapper plan` shows their rules")


@app.command()
def diff(
    a: Annotated[Path, typer.Argument(metavar="A", help="Checkpoint A (any supported format).")],
    b: Annotated[Path, typer.Argument(metavar="B", help="Checkpoint B.")],
    rules: Annotated[Optional[str], typer.Option("--rules", "-r", metavar="NAME|PATH", help="Map A through this rule set first (compare mapper's output with another converter's).")] = None,
    config: ConfigOpt = None,
    atol: Annotated[float, typer.Option("--atol", metavar="FLOAT", help="Values within this absolute difference count as close.")] = 0.0,
    show_equal: Annotated[bool, typer.Option("--all", help="Also list equal tensors.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Tensor-by-tensor comparison: missing/extra keys, shape/dtype differences, max abs difference. Exit 1 if they differ."""
    from mapper.errors import VerificationFailed
    from mapper.verify.diff import diff_checkpoints

    report = diff_checkpoints(a, b, rules=rules, config_files=config or [], atol=atol)
    suggestion = None
    if rules is None and report.key_spaces_differ:
        suggestion = (f"A and B name their tensors differently ({report.counts().get('only in A', 0)} only in A, "
                      f"{report.counts().get('only in B', 0)} only in B): to compare a checkpoint with its conversion, "
                      f"map A through the rule set that made it: mapper diff {a} {b} --rules NAME "
                      f"(`mapper detect {a}` names it)")
    if as_json:
        _print_json({**report.to_dict(), "suggestion": suggestion})
    else:
        groups = report.groups(show_equal=show_equal)
        if groups and not STATE.quiet:
            title = f"{a} vs {b}" + (f" (A through {rules})" if rules else "") + " (one row per pattern; --json lists every tensor)"
            table = _table(title, "tensors", "count", "status", "A", "B", "max abs diff")
            for group in groups:
                table.add_row(escape(group.pattern), str(len(group.rows)), group.status, escape(group.meta_a),
                              escape(group.meta_b), "-" if group.max_abs is None else f"{group.max_abs:.3g}")
            out.print(table)
        out.print(", ".join(f"{v} {k}" for k, v in report.counts().items()))
    if not report.ok:  # the error's hint suggests --rules when the key spaces differ
        raise VerificationFailed("the checkpoints differ", hint=suggestion or "see the table (or --json) for every tensor")


# --- rules ---------------------------------------------------------------------------------
@rules_app.command("list")
def rules_list(as_json: JsonOpt = False) -> None:
    """The shipped rule sets with versions, the variants they convert and the switches they follow."""
    from mapper.spec.catalog import builtin_rule_sets, describe_variant, switches_followed

    found = builtin_rule_sets()
    if as_json:
        _print_json([{"name": r.name, "version": r.version, "kind": r.kind, "source": r.source, "target": r.target,
                      "variant": r.variant, "switches": switches_followed(r), "description": r.description.strip()}
                     for r in found])
        return
    table = _table("shipped rule sets", "name", "version", "source -> target", "for (variant)", "switches it follows")
    for r in found:
        kind = " (preset)" if r.kind == "preset" else ""
        table.add_row(r.name + kind, r.version or "", f"{r.source} -> {r.target}", describe_variant(r.variant),
                      ", ".join(switches_followed(r)) or "-")
    out.print(table)
    out.print("A preset is a rule set with some switches fixed (a name kept for a common setup); detection "
              "picks the full rule set and reads the switches from the config.")


@rules_app.command("show")
def rules_show(
    name: Annotated[str, typer.Argument(metavar="NAME", help="Rule set name or path.")],
    as_yaml: Annotated[bool, typer.Option("--yaml", help="Print the flattened rule set (fragments resolved) as YAML.")] = False,
    inverse: Annotated[bool, typer.Option("--inverse", help="Show the inverse (HF -> NeoX) rule set.")] = False,
) -> None:
    """A rule set's header and every rule (fragments resolved), with where each was written."""
    from mapper.spec import dump_rule_set, load_rules

    ruleset = load_rules(name)
    if inverse:
        ruleset = ruleset.invert()
    if as_yaml:
        sys.stdout.write(dump_rule_set(ruleset))
        return
    out.print(f"[bold]{ruleset.name}[/bold] {ruleset.version}: {ruleset.source} -> {ruleset.target}"
              + (" (inverted)" if ruleset.inverted else ""))
    out.print(escape(ruleset.description.strip()))
    if ruleset.variant:
        from mapper.spec.catalog import describe_variant

        out.print(f"for: {escape(describe_variant(ruleset.variant))}")
    if ruleset.parameters:
        out.print("parameters: " + ", ".join(
            f"{k}" + (f"={p.default}" if p.default is not None else f"={p.expr}" if p.expr else "") for k, p in ruleset.parameters.items()))
    out.print("placeholders: " + ", ".join(f"{k}: {v}" for k, v in ruleset.placeholders.items()))
    stage = None
    for op in ruleset.ops:  # one short block per rule: long patterns and conditions stay readable
        if op.stage != stage:
            stage = op.stage
            out.print(f"[bold]stage {stage}[/bold]" if stage else "")
        source, target = ", ".join(op.input_patterns()), ", ".join(op.output_patterns())
        out.print(f"[bold]{escape(op.id or '')}[/bold]  {escape(op.describe())}")
        out.print(f"    {escape(source or '(nothing)')} -> {escape(target or '(dropped)')}")
        replaced = ruleset.replaced_by(op.id)
        for label, value in (("when", op.when), ("note", op.note), ("at", ruleset.origin(op.id)),
                             ("replaces", replaced and f"{replaced.rule} ({replaced.origin})")):
            if value:
                out.print(f"    {label}: {escape(value)}")
    if ruleset.overrides:
        out.print("[bold]overrides[/bold] (included rules this rule set replaced or excluded)")
        for override in ruleset.overrides:
            out.print(f"    {escape(override.describe())}")


@rules_app.command("validate")
def rules_validate(path: Annotated[Path, typer.Argument(metavar="PATH", help="A rule file (YAML or JSON).")]) -> None:
    """Check a rule file against the schema and the rules of the format, with line-precise errors."""
    from mapper.spec import load_rule_file

    ruleset = load_rule_file(path)
    out.print(f"[green]valid[/green]: {ruleset.name} {ruleset.version or ''} ({ruleset.kind}, {len(ruleset.rules)} rules "
              f"after includes)")


@rules_app.command("schema")
def rules_schema() -> None:
    """Print the JSON Schema of the rule format (schemas/ruleset.v1.json)."""
    from mapper.spec.schema import rule_set_schema_text

    sys.stdout.write(rule_set_schema_text())


@rules_app.command("new")
def rules_new(
    name: Annotated[str, typer.Argument(metavar="NAME", help="Name of the new rule set (lower case, e.g. neox-te-myfork-to-hf-gpt-neox).")],
    base: Annotated[str, typer.Option("--from", metavar="NAME|FILE", help="Rule set to start from: a shipped name (`mapper rules list`) or a rule file.")],
    out_dir: Annotated[Path, typer.Option("--out", metavar="DIR", help="Folder to write NAME.yaml into (other files there are left alone).")] = Path("."),
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing NAME.yaml.")] = False,
) -> None:
    """Start a rule set for a new variant: one file that includes BASE by reference, ready for what differs."""
    from mapper.spec.scaffold import scaffold

    written = scaffold(name, base, out_dir, force=force)
    out.print(f"[green]wrote[/green] {written} (it includes {escape(base)}; shipped parts stay where they are)")
    out.print(f"add what differs, then: mapper rules validate {written} && mapper plan CHECKPOINT --rules {written}")


@rules_app.command("params")
def rules_params(
    checkpoint: Annotated[Optional[Path], typer.Argument(metavar="[CHECKPOINT]", help="A NeoX checkpoint or HF folder: show the values for it.")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The parameters the model config supplies to every rule set (usable without declaring them), with their values for CHECKPOINT."""
    from mapper.spec.parameters import CONFIG_PARAMETERS

    values: dict[str, int] = {}
    notes: list[str] = []
    if checkpoint is not None:
        from mapper.checkpoints import checkpoint_parameters

        values, notes = checkpoint_parameters(checkpoint, config_files=config or [], settings=_settings(set_))
        values.setdefault("trim_vocab", 0)
    if as_json:
        _print_json([{"name": name, "value": values.get(name), "meaning": meaning}
                     for name, meaning in CONFIG_PARAMETERS.items()])
        return
    table = _table("parameters the config supplies" + (f" ({checkpoint})" if checkpoint else ""),
                   "parameter", *(["value"] if checkpoint else []), "meaning")
    for name, meaning in CONFIG_PARAMETERS.items():
        shown = [] if checkpoint is None else ["-" if values.get(name) is None else str(values[name])]
        table.add_row(name, *shown, escape(meaning))
    out.print(table)
    _notes(notes, as_json=False)
    out.print("Rule files use these in patterns and expressions without declaring them; declare any other name "
              "under `parameters` (with a default, an expr, or --param NAME=VALUE).")


# --- demo ----------------------------------------------------------------------------------
@app.command()
def demo(
    out_dir: Annotated[Path, typer.Option("--out", metavar="DIR", help="Where the demo writes its checkpoints.")] = Path("demo-output"),
) -> None:
    """Synthesise a tiny TE checkpoint (TP=2), convert it to HF, verify it, round-trip it."""
    from mapper.demo import run_demo

    run_demo(out_dir, out)


for _info in [*app.registered_commands, *rules_app.registered_commands]:  # every command: flags without <bool>
    if _info.cls in (None, TyperCommand):
        _info.cls = _Command


# --- entry point ---------------------------------------------------------------------------
_GLOBAL_FLAGS = {"--debug": "debug", "--quiet": "quiet", "-q": "quiet"}


def _cli_exceptions() -> tuple[tuple[type, ...], tuple[type, ...], tuple[type, ...]]:
    """(exit, abort, usage error) classes of typer, whichever click it is built on."""
    exits: list[type] = [typer.Exit]
    aborts: list[type] = [typer.Abort, KeyboardInterrupt]
    usage: list[type] = [getattr(typer, "TyperException", RuntimeError)]
    try:
        import click

        exits.append(click.exceptions.Exit)
        aborts.append(click.exceptions.Abort)
        usage.append(click.ClickException)
    except ImportError:  # recent typer vendors its own click
        pass
    return tuple(exits), tuple(aborts), tuple(usage)


def run(argv: list[str]) -> None:
    """Run one command, letting exceptions through (for embedding and tests; see :func:`main`).

    ``--debug`` and ``--quiet`` work anywhere on the command line, not only before the command.
    """
    args = list(argv)
    STATE.debug = STATE.quiet = False  # one invocation's flags never leak into the next
    for flag, name in _GLOBAL_FLAGS.items():
        while flag in args:
            args.remove(flag)
            setattr(STATE, name, True)
    if not STATE.debug:
        warnings.filterwarnings("ignore", category=FutureWarning)
    if args == ["--version"]:
        from mapper import __version__

        out.print(f"mapper {__version__}")
        return
    code = app(args=args, prog_name="mapper", standalone_mode=False)
    if code == 130:  # typer's answer to a KeyboardInterrupt it caught (no handler of ours ran)
        raise KeyboardInterrupt
    if isinstance(code, int) and code:
        raise typer.Exit(code)


def main(argv: list[str] | None = None) -> None:
    """The console script: run, then map errors to exit codes (2 bad input, 1 verification
    failed, 3 bug) with one clear message; ``--debug`` adds the traceback."""
    exits, aborts, usage = _cli_exceptions()
    try:
        with handling_signals():
            run(list(sys.argv[1:] if argv is None else argv))
    except Interrupted as stopped:
        _interrupted(stopped.exit_code)
    except MapperError as error:
        if STATE.debug:
            traceback.print_exc()
        label = "error" if error.exit_code == 2 else "failed"
        err.print(f"[bold red]{label}[/bold red]: {escape(str(error))}")
        sys.exit(error.exit_code)
    except exits as done:
        sys.exit(getattr(done, "exit_code", 0))
    except aborts:
        _interrupted(130)
    except usage as error:
        show = getattr(error, "show", None)
        show(file=sys.stderr) if show else err.print(f"error: {error}")
        sys.exit(2)
    except Exception as error:  # noqa: BLE001 -- the last resort: a bug, said as such
        if STATE.debug:
            traceback.print_exc()
        err.print(f"[bold red]internal error[/bold red]: {type(error).__name__}: {escape(str(error))}\n"
                  "  this is a bug in mapper; run again with --debug and report the traceback")
        sys.exit(3)


def _interrupted(code: int) -> None:
    """Say what an interrupted run left: nothing, unless it got to publish an output first."""
    done = published()
    if done:
        err.print(f"interrupted after publishing {', '.join(escape(str(p)) for p in done)}")
    else:
        err.print("interrupted; nothing was published")
    sys.exit(code)


if __name__ == "__main__":
    main()
