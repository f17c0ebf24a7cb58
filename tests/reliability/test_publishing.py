"""Where the output goes and how it appears: bad output paths are bad input (exit code 2, not
"internal error"), ``--force`` never follows a link, two runs publishing the same output take
turns, an interrupt never falls between the renames, and a damaged part plan is named.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import pathlib
import signal
import threading
from pathlib import Path

import pytest
from _reliability import assert_nothing_left, assert_refusal, leftovers, run_cli, snapshot

import mapper.formats.output
from mapper.errors import ConversionError
from mapper.formats.output import StagingFolder
from mapper.formats.parts import plan_digest
from mapper.interrupts import Interrupted, critical, handling_signals


# --- output paths -------------------------------------------------------------------------------
def test_force_through_a_symlinked_output_never_touches_the_link_target(neox: Path, tmp_path: Path) -> None:
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("five years of work")
    link = tmp_path / "OUT"
    link.symlink_to(precious, target_is_directory=True)
    assert_refusal(["convert", neox, link, "--force"], ConversionError, names=[link], says=["symbolic link"])
    assert snapshot(precious) == {"thesis.tex": b"five years of work"}
    assert link.is_symlink() and link.resolve() == precious
    assert [p.name for p in tmp_path.iterdir() if ".mapper-" in p.name] == []


def test_an_output_below_a_symlinked_folder_is_fine(neox: Path, tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "via").symlink_to(tmp_path / "real", target_is_directory=True)
    outcome = run_cli(["convert", neox, tmp_path / "via" / "OUT"])
    assert outcome.code == 0, outcome.stderr
    assert (tmp_path / "real" / "OUT" / "config.json").is_file()


def test_an_output_whose_parent_is_a_file_is_refused(neox: Path, tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("a file")
    out = tmp_path / "afile" / "sub" / "OUT"
    assert_refusal(["convert", neox, out], ConversionError, names=[out, tmp_path / "afile"], says=["is a file, not a folder"])
    assert (tmp_path / "afile").read_text() == "a file"


def test_an_output_name_too_long_for_the_staging_suffix_is_refused(neox: Path, tmp_path: Path) -> None:
    out = tmp_path / ("x" * 240)  # a valid name, but not with ".mapper-staging-HOST-PID-XXXXXXXX"
    assert_refusal(["convert", neox, out], ConversionError, says=["too long for the hidden staging folder", "at most"])
    assert_nothing_left(out, tmp_path)


def test_a_read_only_output_filesystem_is_refused(neox: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """(mkdir fails with EROFS as on a read-only mount; the tests may run as root, which ignores
    permissions, so the failure is simulated.)"""
    read_only = tmp_path / "ro"
    read_only.mkdir()
    mkdir = pathlib.Path.mkdir

    def refusing_mkdir(self: Path, *args: object, **kwargs: object) -> None:
        if read_only in self.parents:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        mkdir(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(pathlib.Path, "mkdir", refusing_mkdir)
    out = read_only / "OUT"
    assert_refusal(["convert", neox, out], ConversionError, names=[out], says=["Read-only file system"])
    assert list(read_only.iterdir()) == []


def test_an_output_below_a_folder_mapper_may_not_look_into_is_refused(
    neox: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(stat fails with EACCES as for a folder without search permission; simulated, the tests
    may run as root.)"""
    closed = tmp_path / "closed"
    closed.mkdir()
    stat = pathlib.Path.stat

    def refusing_stat(self: Path, *args: object, **kwargs: object) -> os.stat_result:
        if closed in self.parents:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return stat(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(pathlib.Path, "stat", refusing_stat)
    out = closed / "OUT"
    assert_refusal(["convert", neox, out], ConversionError, names=[out], says=["Permission denied"])


def test_the_free_space_message_names_the_output_not_its_staging_folder(
    neox: Path, out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mapper.formats.output, "free_bytes", lambda folder: 1000)
    outcome = assert_refusal(["convert", neox, out], ConversionError, names=[out], says=["only 1000 bytes are free"])
    assert "mapper-staging" not in outcome.stderr
    assert_nothing_left(out, out.parent)


# --- publishing ----------------------------------------------------------------------------------
def _staged(out: Path, who: str) -> StagingFolder:
    staging = StagingFolder(out, force=True)
    staging.create()
    (staging.path / "who").write_text(who)
    return staging


def test_two_forced_publications_of_one_output_take_turns_and_orphan_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first moves the old output aside; while it is between its two renames, the second
    waits for the lock on the folder instead of publishing into the gap (which used to make the
    first fail, exit 3, and orphan the old output as .OUT.mapper-old-*)."""
    out = tmp_path / "OUT"
    out.mkdir()
    (out / "who").write_text("previous")
    first, second = _staged(out, "first"), _staged(out, "second")
    between, resume, second_waits = threading.Event(), threading.Event(), threading.Event()
    rename, flock = os.rename, fcntl.flock

    def pausing_rename(source: object, target: object) -> None:
        rename(source, target)  # type: ignore[arg-type]
        if threading.current_thread().name == "first" and Path(str(source)) == out:
            between.set()
            assert resume.wait(timeout=300)

    def watched_flock(fd: int, operation: int) -> None:
        if threading.current_thread().name == "second":
            second_waits.set()
        flock(fd, operation)

    monkeypatch.setattr(os, "rename", pausing_rename)
    monkeypatch.setattr(fcntl, "flock", watched_flock)
    failures: list[BaseException] = []

    def publish(staging: StagingFolder) -> None:
        try:
            staging.commit()
        except BaseException as error:  # noqa: BLE001 -- reported below
            failures.append(error)

    threads = {name: threading.Thread(target=publish, args=(staging,), name=name)
               for name, staging in (("first", first), ("second", second))}
    threads["first"].start()
    assert between.wait(timeout=300)
    threads["second"].start()
    assert second_waits.wait(timeout=300), "the second publication must take the folder's lock"
    resume.set()
    for thread in threads.values():
        thread.join(timeout=300)
    assert failures == []
    assert (out / "who").read_text() == "second"
    assert leftovers(out) == [out]


def test_an_interrupt_during_publishing_waits_until_the_output_is_in_place(
    neox: Path, out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out.mkdir()
    (out / "notes.txt").write_text("my earlier conversion")
    rename = os.rename

    def rename_then_sigterm(source: object, target: object) -> None:
        rename(source, target)  # type: ignore[arg-type]
        if Path(str(source)) == out:  # the old output moved aside, the new one not yet in place
            signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(os, "rename", rename_then_sigterm)
    outcome = run_cli(["convert", neox, out, "--force"])
    assert outcome.code == 143, outcome.stderr
    assert f"interrupted after publishing {out}" in " ".join(outcome.stderr.split())
    assert (out / "config.json").is_file() and not (out / "notes.txt").exists()
    assert leftovers(out) == [out]


def test_signals_in_a_critical_section_arrive_when_it_ends() -> None:
    steps: list[str] = []
    with handling_signals():
        with pytest.raises(Interrupted) as stopped:
            with critical():
                signal.raise_signal(signal.SIGINT)
                steps.append("finished")
            steps.append("went on")
    assert steps == ["finished"] and stopped.value.exit_code == 130


# --- a damaged part plan ------------------------------------------------------------------------
def _without_files(plan: dict[str, object]) -> str:
    document = {k: v for k, v in plan.items() if k not in ("sha256", "files")}
    return json.dumps({"sha256": plan_digest(document), **document})


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda plan: '{"kind": "hf", "parts": 2,', id="not-json"),
        pytest.param(lambda plan: "[1, 2]", id="a-list"),
        pytest.param(lambda plan: json.dumps({**plan, "kind": 7}), id="a-wrong-kind"),
        pytest.param(_without_files, id="files-missing-digest-valid"),
    ],
)
def test_finalize_with_a_damaged_part_plan_is_refused_naming_it(neox: Path, out: Path, damage: object) -> None:
    shards = ["--max-shard-size", "150KB"]
    for part in ("1/2", "2/2"):
        assert run_cli(["convert", neox, out, "--part", part, *shards]).code == 0
    plan_path = out.parent / f".{out.name}.mapper-parts" / ".mapper" / "plan.json"
    plan_path.write_text(damage(json.loads(plan_path.read_text())))  # type: ignore[operator]
    assert_refusal(["finalize", out], ConversionError, names=[plan_path])
    assert not out.exists()


def test_finalize_with_a_damaged_part_marker_is_refused_naming_it(neox: Path, out: Path) -> None:
    shards = ["--max-shard-size", "150KB"]
    for part in ("1/2", "2/2"):
        assert run_cli(["convert", neox, out, "--part", part, *shards]).code == 0
    marker = out.parent / f".{out.name}.mapper-parts" / ".mapper" / "part-00001-of-00002.json"
    marker.write_text("[]")
    assert_refusal(["finalize", out], ConversionError, names=[marker], says=["damaged"])
    assert not out.exists()
