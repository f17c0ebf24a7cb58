"""Running the command line inside a test process, as a user would see it."""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Outcome:
    """What a user sees: the exit code and both streams (unpacks as ``code, stdout, stderr``)."""

    code: int
    stdout: str
    stderr: str
    error: BaseException | None = None  # an exception main() let through (a bug)

    def __iter__(self) -> Iterator[object]:
        return iter((self.code, self.stdout, self.stderr))

    @property
    def error_lines(self) -> list[str]:
        """The lines of stderr that state an error (a refusal should state exactly one)."""
        return [line for line in self.stderr.splitlines() if re.match(r"^(error|failed|internal error): ", line)]


@contextlib.contextmanager
def fresh_cli_state() -> Iterator[None]:
    """``--debug`` / ``--quiet`` are sticky process-wide flags of the CLI; a user's process starts
    fresh, so each in-process run does too (and leaves them as it found them)."""
    from mapper import cli

    cli.STATE.debug = cli.STATE.quiet = False
    try:
        yield
    finally:
        cli.STATE.debug = cli.STATE.quiet = False


def run_cli(args: Sequence[str | Path]) -> Outcome:
    """``mapper ARGS`` in this process (fast); exit code and output as a user would see them.

    ``main`` maps every error to its exit code (``--debug`` adds the traceback on stderr).
    """
    from mapper import cli

    out, err = io.StringIO(), io.StringIO()
    code = 0
    error: BaseException | None = None
    with fresh_cli_state():
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                cli.main([str(a) for a in args])
        except SystemExit as done:
            code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
        except Exception as raised:  # noqa: BLE001 -- main() should never let one through
            error, code = raised, 1
    return Outcome(code, out.getvalue(), err.getvalue(), error)
