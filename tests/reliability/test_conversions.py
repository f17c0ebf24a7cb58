"""Conversions that cannot or must not complete, and options a user can get wrong.

The output folder appears complete or not at all: after any refusal or failure there is no
``OUT``, no hidden staging folder ``.OUT.mapper-staging-*`` beside it and no temporary file; an
existing ``OUT`` is replaced (``--force``) only once the new one is complete. (The conversion
killed with SIGKILL is in test_processes.py.)
"""

from __future__ import annotations

import errno
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from _reliability import (
    Tensors,
    assert_nothing_left,
    assert_refusal,
    assert_refused,
    copy_rules,
    edit_safetensors,
    leftovers,
    load_safetensors,
    neox_checkpoint,
    run_cli,
    snapshot,
    tag_folder,
)

import mapper.checkpoints
from mapper.checkpoints import convert_checkpoint, prepare
from mapper.errors import CompileError, ConversionError, MapperError
from mapper.formats.output import StagingFolder


def _huge_weight(t: Tensors) -> None:
    t["layer_02.mlp.linear1.weight@rank0"][0, 0] = 1e6  # float16 tops out at 65504


# --- casting -------------------------------------------------------------------------------------
def test_a_cast_to_float16_that_overflows_is_refused_and_bfloat16_works(tmp_path: Path, out: Path) -> None:
    neox = neox_checkpoint(tmp_path / "neox", tp=1, mutate=_huge_weight)
    assert_refusal(
        ["convert", neox, out, "--dtype", "float16"], ConversionError,
        names=["gpt_neox.layers.0.mlp.dense_h_to_4h.weight"], says=["overflows to inf", "1e+06", "bfloat16"],
    )
    assert_nothing_left(out, tmp_path)
    outcome = run_cli(["convert", neox, out, "--dtype", "bfloat16"])  # what the hint suggests
    assert outcome.code == 0, outcome.stderr
    assert load_safetensors(out / "model.safetensors")["gpt_neox.layers.0.mlp.dense_h_to_4h.weight"].dtype == torch.bfloat16


@pytest.mark.parametrize(("dtype", "says"), [("int8", "floating-point"), ("float17", "unknown dtype 'float17'")])
def test_a_dtype_that_is_no_float_is_refused(neox: Path, out: Path, dtype: str, says: str) -> None:
    assert_refusal(["convert", neox, out, "--dtype", dtype], MapperError, names=[dtype], says=[says])
    assert_nothing_left(out)


# --- what transformers expects ------------------------------------------------------------------
def _misnamed_final_norm(tmp_path: Path) -> Path:
    """A rule set that compiles but names the final norm as no HF GPT-NeoX model does."""
    rules = copy_rules(tmp_path)
    for fragment in (rules / "fragments" / "gpt-neox").glob("*.yaml"):
        fragment.write_text(fragment.read_text().replace("gpt_neox.final_layer_norm.", "gpt_neox.final_norm."))
    return rules / "neox-to-hf-gpt-neox.yaml"


def test_an_output_transformers_would_not_load_is_refused_and_nothing_is_left(
    tmp_path: Path, neox: Path, out: Path
) -> None:
    rules = _misnamed_final_norm(tmp_path)
    assert_refusal(
        ["convert", neox, out, "--rules", rules], CompileError,
        names=["gpt_neox.final_norm.weight", "gpt_neox.final_layer_norm.weight"],
        says=["produced but not expected in the target", "expected in the target but no rule produces it"],
    )
    assert_nothing_left(out, tmp_path)
    with pytest.raises(CompileError, match="final_norm"):  # the library: prepare() waits for the check
        prepare(neox, rules=rules)


def test_a_key_check_that_fails_while_streaming_stops_the_conversion_at_the_next_group(
    neox: Path, out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The transformers key check runs beside the streaming (importing transformers takes
    seconds); once it has failed, the next group raises its error and nothing is committed."""
    monkeypatch.setattr(mapper.checkpoints.conversion, "expected_tensors", lambda config: {"only.this": (1,)})
    ready = prepare(neox, background_checks=True)
    assert ready.hf_key_check is not None and isinstance(ready.hf_key_check.exception(timeout=300), CompileError)
    groups: list[int] = []
    with pytest.raises(CompileError, match="only.this"):
        convert_checkpoint(neox, out, prepared=ready, on_group=lambda index, nbytes: groups.append(index))
    assert groups == []
    assert_nothing_left(out)


def test_a_key_check_that_fails_after_the_last_group_still_commits_nothing(
    neox: Path, out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    streamed = threading.Event()

    def slow_expected(config: object) -> dict[str, tuple[int, ...]]:
        assert streamed.wait(timeout=300)
        return {"only.this": (1,)}

    monkeypatch.setattr(mapper.checkpoints.conversion, "expected_tensors", slow_expected)
    ready = prepare(neox, background_checks=True)
    original = mapper.checkpoints.run.execute

    def execute_then_release(*args: object, **kwargs: object) -> object:
        report = original(*args, **kwargs)
        streamed.set()
        return report

    monkeypatch.setattr(mapper.checkpoints.run, "execute", execute_then_release)
    with pytest.raises(CompileError, match="only.this"):
        convert_checkpoint(neox, out, prepared=ready)
    assert_nothing_left(out)


# --- where the output goes ---------------------------------------------------------------------
@pytest.mark.parametrize("where", ["inside", "same", "parent"])
def test_an_output_that_would_touch_the_input_is_refused(neox: Path, where: str) -> None:
    out = {"inside": tag_folder(neox) / "hf", "same": neox, "parent": neox.parent}[where]
    before = snapshot(neox)
    assert_refusal(
        ["convert", neox, out, "--force"], ConversionError, names=[out],
        says=["contains the input folder" if where == "parent" else "input folder"],
    )
    assert snapshot(neox) == before
    assert not (tag_folder(neox) / "hf").exists()
    assert [p for p in neox.parent.iterdir() if ".mapper-" in p.name] == []


def test_an_existing_output_is_refused_without_force_and_left_alone(neox: Path, out: Path) -> None:
    out.mkdir()
    (out / "notes.txt").write_text("my earlier conversion")
    assert_refusal(["convert", neox, out], ConversionError, names=[out], says=["already exists", "--force"])
    assert snapshot(out) == {"notes.txt": b"my earlier conversion"}
    assert leftovers(out) == [out]


def test_an_output_path_that_is_a_file_is_refused_even_with_force(neox: Path, out: Path) -> None:
    out.write_text("not a folder")
    assert_refusal(["convert", neox, out, "--force"], ConversionError, names=[out], says=["not a folder"])
    assert out.read_text() == "not a folder"


def test_force_replaces_the_output_only_once_the_new_one_is_complete(
    neox: Path, out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out.mkdir()
    (out / "notes.txt").write_text("my earlier conversion")
    old = snapshot(out)
    seen: dict[str, object] = {}
    commit = StagingFolder.commit

    def spying_commit(self: StagingFolder) -> Path:
        seen["old output intact"] = snapshot(self.out) == old
        seen["staged"] = sorted(p.name for p in self.path.iterdir())
        return commit(self)

    monkeypatch.setattr(StagingFolder, "commit", spying_commit)
    outcome = run_cli(["convert", neox, out, "--force", "--max-shard-size", "150KB"])
    assert outcome.code == 0, outcome.stderr
    assert seen["old output intact"] is True
    assert seen["staged"] == sorted(p.name for p in out.iterdir())  # the new output, complete, before the switch
    assert {"config.json", "model.safetensors.index.json"} <= set(seen["staged"])  # type: ignore[arg-type]
    assert not (out / "notes.txt").exists()
    assert leftovers(out) == [out]


def test_a_failed_forced_conversion_keeps_the_old_output(tmp_path: Path, out: Path) -> None:
    out.mkdir()
    (out / "notes.txt").write_text("my earlier conversion")
    neox = neox_checkpoint(tmp_path / "neox", tp=1, mutate=_huge_weight)
    assert_refusal(["convert", neox, out, "--force", "--dtype", "float16"], ConversionError, says=["overflows"])
    assert snapshot(out) == {"notes.txt": b"my earlier conversion"}
    assert leftovers(out) == [out]


# --- a full disk ---------------------------------------------------------------------------------
DiskFiller = Callable[[int], None]


@pytest.fixture
def full_disk(monkeypatch: pytest.MonkeyPatch) -> DiskFiller:
    """``full_disk(n)``: writes into a staging folder fail with ENOSPC once ``n`` bytes are in,
    whether written from memory (``write``) or copied file to file (``copy_file_range``,
    ``sendfile``)."""
    real_write, real_copy, real_sendfile = os.write, os.copy_file_range, os.sendfile

    def install(capacity: int) -> None:
        written = 0

        def take(fd: int, nbytes: int) -> None:
            nonlocal written
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                target = ""
            if ".mapper-staging-" in target:
                if written + nbytes > capacity:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                written += nbytes

        def write(fd: int, data: bytes) -> int:
            take(fd, len(memoryview(data).cast("B")))
            return real_write(fd, data)

        def copy_file_range(src: int, dst: int, count: int, *offsets: int | None) -> int:
            take(dst, count)
            return real_copy(src, dst, count, *offsets)

        def sendfile(out_fd: int, in_fd: int, offset: int | None, count: int) -> int:
            take(out_fd, count)
            return real_sendfile(out_fd, in_fd, offset, count)

        monkeypatch.setattr(os, "write", write)
        monkeypatch.setattr(os, "copy_file_range", copy_file_range)
        monkeypatch.setattr(os, "sendfile", sendfile)

    return install


def test_a_full_disk_is_reported_and_nothing_is_left(neox: Path, out: Path, full_disk: DiskFiller) -> None:
    full_disk(200_000)  # the output needs about 430 kB
    assert_refusal(
        ["convert", neox, out, "--max-shard-size", "150KB"], ConversionError,
        names=[f"{out}: "], says=["the disk is full", "free disk space", "Nothing was left behind"],
    )
    assert_nothing_left(out, out.parent)


def test_a_full_disk_while_writing_neox_is_reported_and_nothing_is_left(
    hf: Path, out: Path, full_disk: DiskFiller
) -> None:
    full_disk(100_000)
    assert_refusal(["convert", hf, out], ConversionError, names=[f"{out}: "], says=["the disk is full"])
    assert_nothing_left(out, out.parent)


def test_a_full_disk_during_a_forced_conversion_keeps_the_old_output(
    neox: Path, out: Path, full_disk: DiskFiller
) -> None:
    out.mkdir()
    (out / "notes.txt").write_text("my earlier conversion")
    full_disk(200_000)
    assert_refusal(["convert", neox, out, "--force"], ConversionError, says=["the disk is full"])
    assert snapshot(out) == {"notes.txt": b"my earlier conversion"}
    assert leftovers(out) == [out]


@pytest.mark.parametrize("failure", [errno.ENOSPC, errno.EIO])
def test_a_disk_that_fails_only_when_the_data_is_flushed_is_reported_and_nothing_is_left(
    neox: Path, out: Path, monkeypatch: pytest.MonkeyPatch, failure: int
) -> None:
    """With delayed allocation a full disk (or a failing one) may show only at fsync, which runs
    in the background while the next file is written."""
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if "model-00002" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(failure, os.strerror(failure))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    says = ["the disk is full"] if failure == errno.ENOSPC else ["cannot write model-00002", "Input/output error"]
    assert_refusal(
        ["convert", neox, out, "--max-shard-size", "150KB"], ConversionError, names=[f"{out}: "], says=says,
    )
    assert_nothing_left(out, out.parent)


# --- options --------------------------------------------------------------------------------
@pytest.mark.parametrize("part", ["3/2", "0/4", "x", "1/0", "2"])
def test_a_bad_part_is_refused(neox: Path, out: Path, part: str) -> None:
    assert_refusal(["convert", neox, out, "--part", part], MapperError, names=[f"'{part}'"], says=["I/N", "--part 3/8"])
    assert_nothing_left(out)
    assert not (out.parent / f".{out.name}.mapper-parts").exists()


def test_a_tp_degree_the_heads_do_not_divide_is_refused(hf: Path, out: Path) -> None:
    assert_refusal(
        ["convert", hf, out, "--tp", "3"], MapperError,
        names=["--tp 3", hf / "config.json"], says=["4 attention heads", "1, 2, 4"],
    )
    assert_nothing_left(out)


@pytest.mark.parametrize("size", ["5XB", "0", "-1GB", "lots"])
def test_a_bad_shard_size_is_refused(neox: Path, out: Path, size: str) -> None:
    assert_refusal(["convert", neox, out, "--max-shard-size", size], MapperError, names=[f"'{size}'"], says=["5GB"])
    assert_nothing_left(out)


@pytest.mark.parametrize("param", ["tp", "=2", "tp=two"])
def test_a_malformed_param_is_refused(neox: Path, out: Path, param: str) -> None:
    assert_refusal(["convert", neox, out, "--param", param], MapperError, names=[f"'{param}'"], says=["--param"])
    assert_nothing_left(out)


def test_a_trim_vocab_beyond_the_vocabulary_is_refused(neox: Path, out: Path) -> None:
    assert_refusal(
        ["convert", neox, out, "--trim-vocab", "1000"], MapperError,
        names=["--trim-vocab 1000", tag_folder(neox)], says=["112 vocabulary rows", "at most 112"],
    )
    assert_nothing_left(out)


def test_a_config_file_that_does_not_exist_is_refused(tmp_path: Path, neox: Path, out: Path) -> None:
    config = tmp_path / "configs" / "6-9B.yml"
    assert_refusal(["convert", neox, out, "--config", config], MapperError, names=[config], says=["--config"])
    assert_nothing_left(out)


def test_a_config_file_that_is_not_yaml_is_refused(tmp_path: Path, neox: Path, out: Path) -> None:
    config = tmp_path / "model.yml"
    config.write_text("hidden-size: [64\nnum-attention-heads: 4\n")
    assert_refusal(["convert", neox, out, "--config", config], MapperError, names=[f"{config}:"], says=["not valid YAML", "--config"])
    assert_nothing_left(out)


def test_a_misspelt_option_is_a_usage_error_with_exit_code_2(neox: Path, out: Path) -> None:
    outcome = run_cli(["convert", neox, out, "--shard-size", "1GB"])
    assert outcome.code == 2 and "Traceback" not in outcome.stderr
    assert "--shard-size" in outcome.stderr and "--max-shard-size" in outcome.stderr  # the bad option, the one meant
    assert_nothing_left(out)


# --- exit code 1 is for verification failures only ------------------------------------------
def test_a_verification_that_finds_a_difference_exits_with_1(hf: Path, tmp_path: Path) -> None:
    other = Path(shutil.copytree(hf, tmp_path / "other"))
    edit_safetensors(other / "model.safetensors", lambda t: t["gpt_neox.embed_in.weight"].add_(1.0))
    outcome = run_cli(["diff", hf, other])
    assert_refused(outcome, code=1, names=[], says=["the checkpoints differ"])
    assert outcome.stderr.startswith("failed: ")


def test_a_failed_conversion_removes_the_parent_folders_it_made_for_the_output(tmp_path: Path) -> None:
    neox = neox_checkpoint(tmp_path / "neox", tp=1, mutate=_huge_weight)
    out = tmp_path / "exports" / "2024-05" / "OUT"
    assert_refusal(["convert", neox, out, "--dtype", "float16"], ConversionError, says=["overflows"])
    assert not (tmp_path / "exports").exists()


# --- multi-machine parts ----------------------------------------------------------------------
def test_finalize_without_any_part_is_refused(out: Path) -> None:
    assert_refusal(["finalize", out], ConversionError, names=[out], says=["no parts were written"])
    assert_nothing_left(out)


def test_finalize_with_a_part_missing_is_refused_and_publishes_nothing(neox: Path, out: Path) -> None:
    shards = ["--max-shard-size", "150KB"]
    assert run_cli(["convert", neox, out, "--part", "2/2", *shards]).code == 0
    assert_refusal(["finalize", out], ConversionError, names=[f".{out.name}.mapper-parts"], says=["parts [1]", "run the missing parts"])
    assert not out.exists()
    assert run_cli(["convert", neox, out, "--part", "1/2", *shards]).code == 0
    done = run_cli(["finalize", out])
    assert done.code == 0, done.stderr
    assert leftovers(out) == [out] and (out / "model.safetensors.index.json").is_file()
