"""Shared support of the reliability corpus: run the CLI as a user does, build bad inputs, check
that a refusal is one clear message with a fix and that nothing was left behind.

Every bad input is generated here from seeded synthetic checkpoints (``mapper.testing``); no
binary is shipped with the tests.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from mapper import cli
from mapper.errors import MapperError
from mapper.testing import synthesize_variant, write_neox_checkpoint
from mapper.testing.cli import Outcome, fresh_cli_state, run_cli  # noqa: F401 -- run_cli: for the tests

MAPPER = Path(sys.executable).with_name("mapper")
REPO = Path(__file__).resolve().parents[2]

Tensors = dict[str, torch.Tensor]
Mutation = Callable[[Tensors], None]


# --- running the command line -----------------------------------------------------------------
def run_cli_subprocess(
    args: Sequence[str | Path], *, env: dict[str, str] | None = None, timeout: float = 300
) -> Outcome:
    """``mapper ARGS`` as a separate process (for what only a real process shows)."""
    completed = subprocess.run(
        [str(MAPPER), *map(str, args)], capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    return Outcome(completed.returncode, completed.stdout, completed.stderr)


def raised_by(args: Sequence[str | Path]) -> BaseException:
    """The exception ``mapper ARGS`` raises inside (``mapper.cli.run`` lets it through)."""
    with fresh_cli_state():
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                cli.run([str(a) for a in args])
        except Exception as raised:  # noqa: BLE001 -- the test inspects it
            return raised
    raise AssertionError(f"mapper {' '.join(map(str, args))} did not fail")


# --- what a refusal must look like ------------------------------------------------------------
def assert_refused(
    outcome: Outcome, *, names: Sequence[str | Path] = (), says: Sequence[str] = (), code: int = 2
) -> None:
    """Exit ``code``; one error message naming ``names`` (file, key, rule), saying ``says``, with a
    ``hint:``; no traceback."""
    text = outcome.stderr
    assert outcome.code == code, f"exit code {outcome.code}, expected {code}\nstderr:\n{text}"
    assert "Traceback" not in text, text
    assert len(outcome.error_lines) == 1, f"expected one error message, got {outcome.error_lines}\n{text}"
    assert "hint: " in text, f"no hint (fix) in:\n{text}"
    flat = " ".join(text.split())  # the console may wrap long lines at a space
    for name in names:
        assert str(name) in flat, f"{name!r} is not named in:\n{text}"
    for phrase in says:
        assert phrase.lower() in flat.lower(), f"{phrase!r} not said in:\n{text}"


def assert_error_class(args: Sequence[str | Path], cls: type[MapperError]) -> MapperError:
    """``mapper ARGS`` raises exactly ``cls`` (not a subclass, not a bug) with a hint."""
    error = raised_by(args)
    assert type(error) is cls, f"{type(error).__name__}: {error}"
    assert isinstance(error, MapperError) and error.hint, error
    return error


def assert_refusal(
    args: Sequence[str | Path], cls: type[MapperError], *, names: Sequence[str | Path] = (),
    says: Sequence[str] = (), code: int = 2,
) -> Outcome:
    """The full contract for one bad input: exact class (``mapper.cli.run``), then the user's view."""
    assert_error_class(args, cls)
    outcome = run_cli(args)
    assert_refused(outcome, names=names, says=says, code=code)
    return outcome


def leftovers(out: Path) -> list[Path]:
    """Anything a run for output ``out`` may leave: ``out`` itself, its staging, parts, old copies,
    temporary files."""
    found = [out] if out.exists() or out.is_symlink() else []
    if out.parent.is_dir():
        found += [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.mapper-")]
        found += [p for p in out.parent.iterdir() if ".tmp-" in p.name or p.name.endswith(".tmp")]
    return found


def assert_nothing_left(out: Path, *also: Path) -> None:
    """No output folder, no hidden staging folder beside it, no temporary files anywhere under the
    folders given."""
    assert leftovers(out) == [], leftovers(out)
    for folder in also:
        stray = [p for p in folder.rglob("*") if ".tmp" in p.name or ".mapper-staging-" in p.name]
        assert stray == [], stray


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes): an input must come out unchanged."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- building inputs --------------------------------------------------------------------------
def neox_checkpoint(
    root: Path, variant: str = "neox-new", *, tp: int = 1, mutate: Mutation | None = None,
    layout: str = "pipeline", config: bool = True, seed: int = 0, **overrides: object,
) -> Path:
    """A synthetic NeoX save folder (``latest``, ``global_step100/``, ``configs/``) at ``root``.

    ``mutate`` edits the flattened tensors (``layer_XX.key@rankN``) before they are saved.
    """
    model, tensors = synthesize_variant(variant, tp=tp, seed=seed, **overrides)
    if mutate is not None:
        mutate(tensors)
    write_neox_checkpoint(tensors, model, root, layout=layout)  # type: ignore[arg-type]
    if not config:
        shutil.rmtree(root / "global_step100" / "configs")
    return root


def tag_folder(root: Path) -> Path:
    return root / "global_step100"


def copy_rules(folder: Path) -> Path:
    """A private copy of the shipped ``rules/`` tree (to break one file of it)."""
    target = folder / "rules"
    shutil.copytree(REPO / "rules", target)
    return target


def layer_file(root: Path, idx: int, rank: int = 0) -> Path:
    return tag_folder(root) / f"layer_{idx:02d}-model_{rank:02d}-model_states.pt"


def edit_torch_file(path: Path, edit: Callable[[dict[str, object]], None], *, legacy: bool = False) -> None:
    """Load a state dict saved with torch.save (our own, trusted), edit it, save it again."""
    state = torch.load(path, weights_only=False)
    edit(state)
    torch.save(state, path, _use_new_zipfile_serialization=not legacy)


def edit_safetensors(path: Path, edit: Callable[[Tensors], None]) -> None:
    """Rewrite a safetensors file with the reference library after editing its tensors."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    edit(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


def load_safetensors(path: Path) -> Tensors:
    from safetensors.torch import load_file

    return load_file(str(path))


# --- safetensors surgery ----------------------------------------------------------------------
def read_safetensors_header(path: Path) -> tuple[dict[str, object], bytes]:
    """(parsed JSON header, tensor data) of a safetensors file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_safetensors_raw(path: Path, header: dict[str, object], data: bytes) -> None:
    """A safetensors file with exactly this header (even a lying one) and data."""
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(len(text) + 8) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
