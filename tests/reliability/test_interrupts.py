"""Ctrl-C, SIGTERM and a killed process, as a user meets them: `convert` and `roundtrip` stopped
half-way exit 130 (SIGINT) or 143 (SIGTERM) saying "interrupted; nothing was published" -- never
0, which for `roundtrip` means "exact" -- and leave no output, staging or temporary folder. What a
SIGKILL leaves is swept by the next run.

The signals go to a real `mapper` process started with ``subprocess.Popen`` in the test's own
(foreground) process group, with SIGINT's default disposition restored: a shell's background job
ignores SIGINT, which would hide the bug. A test hook (sitecustomize) pauses the run in the main
thread once its writer has staged a file, and says where.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _reliability import MAPPER, assert_nothing_left, leftovers, run_cli, snapshot

import mapper.checkpoints
from mapper.formats.output import HOST
from mapper.verify.roundtrip import roundtrip

PAUSE_HOOK = '''\
"""Test hook (sitecustomize): pause the run in the main thread after a writer's first group."""
import os

if os.environ.get("MAPPER_TEST_PAUSE_IN"):
    import time
    from pathlib import Path

    from mapper.formats import writing

    _write_group = writing.StagedWriter.write_group

    def _pausing_write_group(self, index, tensors):
        _write_group(self, index, tensors)
        if self.kind == os.environ["MAPPER_TEST_PAUSE_IN"]:
            self._worker.close() if self._worker is not None else None  # the staged file is on disk
            paused = Path(os.environ["MAPPER_TEST_PAUSED"])
            paused.with_suffix(".part").write_text(str(self.staging))
            os.replace(paused.with_suffix(".part"), paused)  # the test never reads it half-written
            time.sleep(600)  # until the signal

    writing.StagedWriter.write_group = _pausing_write_group
'''


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # as in a terminal's foreground job


def _start_paused(tmp_path: Path, args: list[object], pause_in: str) -> tuple[subprocess.Popen[str], Path, Path]:
    """A `mapper` process paused in the main thread with one file staged; (process, staging
    folder, its temporary folder)."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(PAUSE_HOOK)
    paused, temp = tmp_path / "paused", tmp_path / "tmp"
    temp.mkdir()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")])),
        "MAPPER_TEST_PAUSE_IN": pause_in,
        "MAPPER_TEST_PAUSED": str(paused),
        "TMPDIR": str(temp),
    }
    process = subprocess.Popen(
        [str(MAPPER), "--quiet", *map(str, args)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, preexec_fn=_default_sigint,
    )
    deadline = time.monotonic() + 300  # a guard against a hang, not a measure: 5-20 s on a loaded machine
    while not paused.exists():
        if process.poll() is not None:
            pytest.fail(f"mapper exited ({process.returncode}) before the pause: {process.communicate()}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("the run never reached the pause")
        time.sleep(0.05)
    staging = Path(paused.read_text())
    assert staging.is_dir() and any(staging.iterdir()), "a file is staged"
    return process, staging, temp


CASES = [
    pytest.param(signal.SIGINT, 130, "convert", id="ctrl-c-during-convert"),
    pytest.param(signal.SIGTERM, 143, "convert", id="sigterm-during-convert"),
    pytest.param(signal.SIGINT, 130, "roundtrip", id="ctrl-c-during-roundtrip"),
    pytest.param(signal.SIGTERM, 143, "roundtrip", id="sigterm-during-roundtrip"),
]


@pytest.mark.parametrize(("signum", "code", "command"), CASES)
def test_an_interrupted_run_exits_with_the_signal_code_and_leaves_nothing(
    neox: Path, out: Path, tmp_path: Path, signum: signal.Signals, code: int, command: str
) -> None:
    before = snapshot(neox)
    args: list[object] = ["convert", neox, out] if command == "convert" else ["roundtrip", neox]
    # convert stops in the HF writer; roundtrip in its second conversion, with the first one
    # already published inside its work folder
    process, staging, temp = _start_paused(tmp_path, args, "hf" if command == "convert" else "neox")
    try:
        if command == "roundtrip":
            assert [p.name for p in temp.iterdir()][0].startswith(f"mapper-roundtrip-{HOST}-{process.pid}-")
        process.send_signal(signum)
        stdout, stderr = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()

    assert process.returncode == code, f"exit code {process.returncode}\n{stderr}"
    assert "interrupted; nothing was published" in stderr
    assert "Traceback" not in stderr and "exact" not in stdout
    assert not staging.exists()
    assert_nothing_left(out, out.parent)
    assert list(temp.iterdir()) == [], "the round trip's work folder is removed"
    assert snapshot(neox) == before


def test_a_keyboard_interrupt_typer_turns_into_a_return_value_still_exits_130(
    neox: Path, out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """typer answers a KeyboardInterrupt it catches with the return value 130; mapper used to drop
    it and exit 0. (Raised directly here, as when no handler of mapper's is installed.)"""
    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(mapper.checkpoints.run, "execute", interrupted)
    outcome = run_cli(["convert", neox, out])
    assert outcome.code == 130, outcome.stderr
    assert "interrupted; nothing was published" in outcome.stderr
    assert_nothing_left(out, out.parent)


def test_a_work_folder_left_by_a_killed_round_trip_is_removed_by_the_next(
    neox: Path, tmp_path: Path, ck_dead_pid: int
) -> None:
    work = tmp_path / "work"
    dead = work / f"mapper-roundtrip-{HOST}-{ck_dead_pid}-abc123"
    alive = work / f"mapper-roundtrip-{HOST}-{os.getppid()}-abc123"  # a live process's
    other_host = work / f"mapper-roundtrip-{HOST}x-{ck_dead_pid}-abc123"
    for folder in (dead, alive, other_host):
        (folder / "hf").mkdir(parents=True)
        (folder / "hf" / "model.safetensors").write_bytes(b"half")

    assert roundtrip(neox, workdir=work).ok
    assert not dead.exists()
    assert alive.exists() and other_host.exists()
    assert sorted(p.name for p in work.iterdir()) == sorted([alive.name, other_host.name])


def test_a_staging_folder_left_by_a_killed_conversion_is_removed_by_the_next(
    neox: Path, out: Path, ck_dead_pid: int
) -> None:
    dead = out.parent / f".{out.name}.mapper-staging-{HOST}-{ck_dead_pid}-abcd1234"
    (dead / "model-00001-of-00002.safetensors").parent.mkdir(parents=True)
    (dead / "model-00001-of-00002.safetensors").write_bytes(b"half")
    assert run_cli(["convert", neox, out]).code == 0
    assert leftovers(out) == [out]


@pytest.fixture
def ck_dead_pid() -> int:
    """The pid of a process that has exited (a child started and reaped here)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid
