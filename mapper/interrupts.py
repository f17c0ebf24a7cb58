"""Ctrl-C (SIGINT), SIGTERM and SIGHUP end a run cleanly, with an exit code that says so.

Python turns SIGINT into ``KeyboardInterrupt``, which libraries may swallow (typer turns it into
a return value of 130, which a caller can lose: a round trip interrupted by Ctrl-C exited 0,
"exact"), and SIGTERM/SIGHUP end the process at once, leaving staging and temporary folders
behind. While :func:`handling_signals` is active (the ``mapper`` command), each of these signals
raises :class:`Interrupted` in the main thread instead: a ``BaseException`` no ``except
Exception`` and no library handler takes, so every ``with``/``finally`` on the way out removes
what it made (staging folders, temporary files, a round trip's work folder), and the command
exits with ``128 + signal number`` (130, 143, 129). A signal that arrives while that clean-up
runs is ignored, so the clean-up finishes; SIGKILL cannot be caught, and what it leaves is swept
by the next run (:mod:`mapper.formats.output`, :mod:`mapper.verify.roundtrip`).

:func:`critical` defers these signals over a few steps that must happen together (the renames
that publish an output folder), whether or not :func:`handling_signals` is active.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class Interrupted(BaseException):
    """A run stopped by a signal; ``exit_code`` is ``128 + signum``, as a shell reports it."""

    def __init__(self, signum: int):
        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


class _State:
    active = False  # handling_signals is installed
    raised = False  # an Interrupted was raised: the run is cleaning up
    published: list[Path] = []  # output folders published by this run (see note_published)


_STATE = _State()


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    if _STATE.raised:
        return  # cleaning up after the first signal: let it finish
    _STATE.raised = True
    raise Interrupted(signum)


@contextmanager
def handling_signals() -> Iterator[None]:
    """Raise :class:`Interrupted` on SIGINT/SIGTERM/SIGHUP inside the block (main thread only;
    a signal the process ignores, e.g. SIGINT of a shell's background job, stays ignored)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous: dict[int, Any] = {}
    for signum in SIGNALS:
        if signal.getsignal(signum) is not signal.SIG_IGN:
            previous[signum] = signal.signal(signum, _raise_interrupted)
    _STATE.active, _STATE.raised, _STATE.published = True, False, []
    try:
        yield
    finally:
        _restore(previous)
        _STATE.active = False


@contextmanager
def critical() -> Iterator[None]:
    """Defer SIGINT/SIGTERM/SIGHUP until the block is done, then deliver them as usual.

    Only the main thread receives signals, so elsewhere this does nothing (and is not needed).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []

    def record(signum: int, frame: FrameType | None) -> None:
        pending.append(signum)

    previous = {signum: signal.signal(signum, record) for signum in SIGNALS if signal.getsignal(signum) is not signal.SIG_IGN}
    try:
        yield
    finally:
        _restore(previous)
        if pending:
            signal.raise_signal(pending[0])  # the restored handler runs now


def _restore(previous: dict[int, Any]) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, signal.SIG_DFL if handler is None else handler)  # None: set outside Python


def note_published(path: Path) -> None:
    """Record that ``path`` was published by this run (the interrupt message says so)."""
    if _STATE.active:
        _STATE.published.append(path)


def published() -> list[Path]:
    """Output folders this run published that still exist."""
    return [path for path in _STATE.published if path.exists()]
