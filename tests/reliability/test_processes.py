"""What only a real `mapper` process shows: pickles that would run code, a conversion killed with
SIGKILL half-way, and the traceback of ``--debug``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from _reliability import (
    MAPPER,
    assert_nothing_left,
    assert_refused,
    edit_torch_file,
    layer_file,
    leftovers,
    load_safetensors,
    run_cli,
    run_cli_subprocess,
    snapshot,
    tag_folder,
)

from mapper.formats import HFCheckpoint


class RunsCode:
    """Pickles to ``os.system("touch MARKER")``: unpickling it would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


# --- pickles that would run code ----------------------------------------------------------------
@pytest.mark.parametrize(
    ("where", "legacy"),
    [("layer file", False), ("layer file", True), ("mp_rank training state", False)],
    ids=["zip-layer-file", "legacy-layer-file", "mp-rank-file"],
)
def test_a_neox_pickle_that_would_run_code_is_refused_without_running_it(
    neox: Path, out: Path, tmp_path: Path, where: str, legacy: bool
) -> None:
    marker = tmp_path / "PWNED"
    file = layer_file(neox, 2, 1) if where == "layer file" else tag_folder(neox) / "mp_rank_01_model_states.pt"
    key = "attention.dense.weight" if where == "layer file" else "lr_scheduler"
    edit_torch_file(file, lambda state: state.__setitem__(key, RunsCode(marker)), legacy=legacy)
    before = snapshot(neox)

    outcome = run_cli_subprocess(["convert", neox, out])
    assert_refused(outcome, names=[file, "posix.system"], says=["refusing to load", "Nothing from the file was run"])
    assert "UnsafeCheckpointError" not in outcome.stderr  # one message, not a class name
    assert not marker.exists(), "the pickle ran"
    assert_nothing_left(out, out.parent)
    assert snapshot(neox) == before


def test_an_hf_pytorch_model_bin_that_would_run_code_is_refused_without_running_it(
    hf: Path, out: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "PWNED"
    weights = load_safetensors(hf / "model.safetensors")
    (hf / "model.safetensors").unlink()
    torch.save({**weights, "gpt_neox.embed_in.weight": RunsCode(marker)}, hf / "pytorch_model.bin")

    outcome = run_cli_subprocess(["convert", hf, out])
    assert_refused(outcome, names=[hf / "pytorch_model.bin", "posix.system"], says=["refusing to load"])
    assert not marker.exists(), "the pickle ran"
    assert_nothing_left(out, out.parent)


# --- killed half-way ------------------------------------------------------------------------------
STALL_HOOK = '''\
"""Test hook (sitecustomize): stall the writer half-way through its N-th shard."""
import os

if os.environ.get("MAPPER_TEST_STALL_IN_SHARD"):
    import time
    from pathlib import Path

    from mapper.formats import output

    _write = output.AtomicFile.write
    _shards = []

    def _stalling_write(self, data):
        done = _write(self, data)
        if self.path.name.startswith("model-") and self.path not in _shards:
            _shards.append(self.path)
        nth = _shards.index(self.path) + 1 if self.path in _shards else 0
        if nth == int(os.environ["MAPPER_TEST_STALL_IN_SHARD"]) and self.written > done:
            stalled = Path(os.environ["MAPPER_TEST_STALLED"])
            stalled.with_suffix(".part").write_text(str(self.tmp))
            os.replace(stalled.with_suffix(".part"), stalled)  # the test never reads it half-written
            time.sleep(600)  # until SIGKILL
        return done

    output.AtomicFile.write = _stalling_write
'''


def _wait_for(path: Path, process: subprocess.Popen[bytes], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, f"mapper exited early ({process.returncode}): {process.stderr.read()!r}"  # type: ignore[union-attr]
        assert time.monotonic() < deadline, "the conversion never reached the stall point"
        time.sleep(0.05)


def test_a_conversion_killed_mid_write_leaves_no_partial_output_and_a_rerun_completes(
    neox: Path, out: Path, tmp_path: Path, pristine: dict[str, Path]
) -> None:
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(STALL_HOOK)
    stalled = tmp_path / "stalled"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")])),
        "MAPPER_TEST_STALL_IN_SHARD": "3",
        "MAPPER_TEST_STALLED": str(stalled),
    }
    args = [str(MAPPER), "--quiet", "convert", str(neox), str(out), "--max-shard-size", "120KB"]
    process = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_for(stalled, process)
        partial = Path(stalled.read_text())  # the third shard begun is half-written
        staging = partial.parent
        assert partial.is_file() and partial.name.startswith(".model-0000")
        assert list(staging.glob("model-0000[12]-of-*.safetensors"))  # (two writer threads: 1 or 2 done)
        assert not out.exists()
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait(timeout=120) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stderr.close()  # type: ignore[union-attr]

    assert not out.exists(), "a partial output folder is visible"
    assert [p.name.startswith(f".{out.name}.mapper-staging-") for p in leftovers(out)] == [True]  # hidden, dead pid

    rerun = run_cli(["convert", neox, out, "--max-shard-size", "120KB"])
    assert rerun.code == 0, rerun.stderr
    assert leftovers(out) == [out], "the rerun removes the dead run's staging folder"
    with HFCheckpoint(out) as converted, HFCheckpoint(pristine["hf"]) as reference:
        assert converted.manifest() == reference.manifest()
        for key in reference.manifest():
            assert torch.equal(converted.get(key), reference.get(key)), key
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()


# --- --debug --------------------------------------------------------------------------------
def _bad_rule_file(tmp_path: Path) -> list[object]:
    path = tmp_path / "bad.yaml"
    path.write_text("schema_version: 1\nname: x\nrules:\n  - renam: {from: a, to: b}\n")
    return ["rules", "validate", path]


def _truncated_checkpoint(tmp_path: Path, neox: Path, out: Path) -> list[object]:
    file = layer_file(neox, 3, 1)
    file.write_bytes(file.read_bytes()[:300])
    return ["convert", neox, out]


@pytest.mark.parametrize(
    ("make", "error"), [(_bad_rule_file, "RuleFileError"), (_truncated_checkpoint, "CheckpointError")],
    ids=["rule-file", "checkpoint"],
)
def test_debug_shows_the_traceback_and_without_it_there_is_none(
    tmp_path: Path, neox: Path, out: Path, make: object, error: str
) -> None:
    args = make(tmp_path) if make is _bad_rule_file else make(tmp_path, neox, out)  # type: ignore[operator]
    plain = run_cli_subprocess(args)
    assert_refused(plain)
    assert error not in plain.stderr

    debug = run_cli_subprocess(["--debug", *args])
    assert "Traceback (most recent call last)" in debug.stderr
    assert f"mapper.errors.{error}" in debug.stderr
    assert debug.code != 0
    assert_nothing_left(out, out.parent)


def test_debug_keeps_the_exit_code_of_the_error(tmp_path: Path) -> None:
    assert run_cli_subprocess(["--debug", *_bad_rule_file(tmp_path)]).code == 2


def test_the_in_process_runner_matches_a_real_process(tmp_path: Path) -> None:
    """The other tests run `mapper` in-process for speed; it must print what a process prints."""
    args = _bad_rule_file(tmp_path)
    real, here = run_cli_subprocess(args), run_cli(args)
    assert (real.code, real.stderr, real.stdout) == (here.code, here.stderr, here.stdout)

