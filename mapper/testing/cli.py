"""Running the command line inside a test process."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def run_cli(capsys: Any, *args: str | Path) -> tuple[int, str, str]:
    """``mapper ARGS`` run in this process: (exit code, stdout, stderr), as pytest's ``capsys``
    fixture caught them (a test reads the output a user would see, without a subprocess)."""
    from mapper.cli import main

    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as done:
        code = int(done.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err
