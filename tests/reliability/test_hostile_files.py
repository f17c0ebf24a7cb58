"""Files built to hurt: checkpoints that would convert to other bytes than NeoX loads, small files
that would take gigabytes, files that are no files, keys that talk to the terminal, links that
would show other files' contents. Each is refused with exit code 2 and one clear message, quickly
and without the memory it asks for, and nothing is written.

Every file is crafted here from a valid synthetic checkpoint (the zip records of ``torch.save``
rewritten with :mod:`zipfile`, pickles assembled opcode by opcode); no binary is shipped.
"""

from __future__ import annotations

import os
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from _reliability import (
    Tensors,
    assert_nothing_left,
    assert_refusal,
    assert_refused,
    edit_torch_file,
    layer_file,
    neox_checkpoint,
    read_safetensors_header,
    run_cli,
    run_cli_subprocess,
    snapshot,
    tag_folder,
    write_safetensors_raw,
)

from mapper.errors import CheckpointError, CompileError, MapperError, UnsafeCheckpointError


def refused(args: list[object], cls: type[MapperError], out: Path, source: Path, **expect: object) -> None:
    """The refusal contract, plus: nothing written, the source unchanged."""
    before = snapshot(source)
    assert_refusal(args, cls, **expect)  # type: ignore[arg-type]
    assert_nothing_left(out, out.parent)
    assert snapshot(source) == before


def rewrite_zip(path: Path, change: Callable[[str, bytes], tuple[bytes, int]]) -> None:
    """Rewrite the ``torch.save`` zip ``path`` record by record: ``change(name, data)`` gives each
    record's new bytes and compression."""
    with zipfile.ZipFile(path) as source:
        records = [(info.filename, source.read(info.filename)) for info in source.infolist()]
    with zipfile.ZipFile(path, "w") as target:
        for name, data in records:
            new, compression = change(name, data)
            target.writestr(zipfile.ZipInfo(name), new, compress_type=compression)


# --- zip records that the memory map would read differently than torch.load ---------------------
def test_a_layer_file_with_compressed_records_is_refused(neox: Path, out: Path) -> None:
    """The memory map would have converted the deflated bytes as if they were the floats."""
    file = layer_file(neox, 2, 1)
    rewrite_zip(file, lambda name, data: (data, zipfile.ZIP_DEFLATED if "/data/" in name else zipfile.ZIP_STORED))
    refused(["convert", neox, out], UnsafeCheckpointError, out, neox,
            names=[file, "/data/0"], says=["stored compressed", "torch.save never compresses"])


def test_a_storage_claiming_more_bytes_than_its_record_holds_is_refused(neox: Path, out: Path) -> None:
    """torch.load refuses this file; the memory map would read past the record into the next."""
    file = layer_file(neox, 3, 0)
    rewrite_zip(file, lambda name, data: (data[: len(data) // 2] if name.endswith("/data/0") else data, zipfile.ZIP_STORED))
    refused(["convert", neox, out], CheckpointError, out, neox,
            names=[file], says=["claims", "bytes, but its record holds"])


def test_a_pickle_that_inflates_to_256_mb_from_a_small_file_is_refused_unread(neox: Path, out: Path) -> None:
    """A deflated data.pkl: a 256 MB string from ~260 kB of file (a 1 GB one fits in 1 MB)."""
    file = layer_file(neox, 2, 0)
    size = 256 * 2**20
    with zipfile.ZipFile(file) as source:
        records = [(info.filename, source.read(info.filename)) for info in source.infolist()]
    with zipfile.ZipFile(file, "w") as target:
        for name, data in records:
            if not name.endswith("data.pkl"):
                target.writestr(zipfile.ZipInfo(name), data)
                continue
            info = zipfile.ZipInfo(name)
            info.compress_type = zipfile.ZIP_DEFLATED
            with target.open(info, "w", force_zip64=True) as pkl:  # {"a": "xxx...x"}, protocol 2
                pkl.write(b"\x80\x02}q\x00X\x01\x00\x00\x00aq\x01X" + struct.pack("<I", size))
                chunk = b"x" * 2**20
                for _ in range(size // len(chunk)):
                    pkl.write(chunk)
                pkl.write(b"q\x02s.")
    assert file.stat().st_size < 2**20
    refused(["convert", neox, out], UnsafeCheckpointError, out, neox, names=[file, "data.pkl"], says=["compressed"])


# --- small pickles asking for a lot of memory ----------------------------------------------------
class Allocates:
    """Pickles to a call of ``func(*args)``: what a hostile pickle asks the unpickler to run."""

    def __init__(self, func: object, *args: object):
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return self.func, self.args


@pytest.mark.parametrize(
    ("value", "named"),
    [
        (Allocates(bytearray, 2_000_000_000), "bytearray"),  # allowed by torch; 2 GB zeroed
        (Allocates(torch.FloatTensor, 2**31), "torch.FloatTensor"),  # a legacy constructor: 8 GB
    ],
    ids=["bytearray-2e9", "float-tensor-2e31"],
)
def test_a_pickle_that_would_allocate_gigabytes_is_refused_before_it_runs(
    neox: Path, out: Path, value: object, named: str
) -> None:
    file = layer_file(neox, 2, 1)
    edit_torch_file(file, lambda state: state.__setitem__("attention.dense.weight", value))
    assert file.stat().st_size < 2**20
    outcome = run_cli_subprocess(["convert", neox, out])  # a process of its own: never this one's memory
    assert_refused(outcome, names=[file, named], says=["allocate", "Nothing from the file was run"])
    assert_nothing_left(out, out.parent)


def test_a_tensor_the_pickle_builds_itself_is_refused(neox: Path, out: Path) -> None:
    """A tensor over a storage the pickle allocates (not a record of the file): its values would
    be whatever that memory held."""
    made = Allocates(torch.Tensor, 16)  # torch.Tensor(16): allowed, uninitialised memory
    file = layer_file(neox, 2, 0)
    edit_torch_file(file, lambda state: state.__setitem__("attention.dense.bias", made))
    refused(["convert", neox, out], CheckpointError, out, neox,
            names=[file, "attention.dense.bias"], says=["not stored in the file"])


@pytest.mark.parametrize(
    ("tensor", "says"),
    [
        (torch.empty(16, device="meta"), "not stored in the file"),
        (torch.eye(4).to_sparse(), "sparse_coo"),
    ],
    ids=["meta", "sparse"],
)
def test_meta_and_sparse_tensors_are_refused_naming_the_key(neox: Path, out: Path, tensor: torch.Tensor, says: str) -> None:
    file = layer_file(neox, 3, 1)
    edit_torch_file(file, lambda state: state.__setitem__("attention.dense.bias", tensor))
    refused(["convert", neox, out], CheckpointError, out, neox, names=[file, "attention.dense.bias"], says=[says])


# --- files that are no files -------------------------------------------------------------------------
def _neox_file(kind: str) -> Callable[[Path, Path], tuple[Path, list[object]]]:
    def place(neox: Path, hf: Path) -> tuple[Path, list[object]]:
        path = {
            "layer": layer_file(neox, 2, 0),
            "mp_rank": tag_folder(neox) / "mp_rank_01_model_states.pt",
            "config": tag_folder(neox) / "configs" / "model.yml",
            "latest": neox / "latest",
        }[kind]
        return path, ["convert", neox]
    return place


def _hf_file(kind: str) -> Callable[[Path, Path], tuple[Path, list[object]]]:
    def place(neox: Path, hf: Path) -> tuple[Path, list[object]]:
        if kind == "shard":
            header, data = read_safetensors_header(hf / "model.safetensors")
            (hf / "model.safetensors").rename(hf / "model-00001-of-00001.safetensors")
            (hf / "model.safetensors.index.json").write_text(
                '{"weight_map": {' + ", ".join(f'"{k}": "model-00001-of-00001.safetensors"' for k in header if k != "__metadata__") + "}}"
            )
            return hf / "model-00001-of-00001.safetensors", ["convert", hf]
        name = {"weights": "model.safetensors", "config": "config.json", "sidecar": "mapper/sidecar.safetensors"}[kind]
        return hf / name, ["convert", hf]
    return place


NOT_FILES = [
    pytest.param(_neox_file("layer"), id="neox-layer-file"),
    pytest.param(_neox_file("mp_rank"), id="neox-mp-rank-file"),
    pytest.param(_neox_file("config"), id="neox-config"),
    pytest.param(_neox_file("latest"), id="neox-latest"),
    pytest.param(_hf_file("weights"), id="hf-model-safetensors"),
    pytest.param(_hf_file("shard"), id="hf-shard"),
    pytest.param(_hf_file("config"), id="hf-config-json"),
    pytest.param(_hf_file("sidecar"), id="hf-sidecar"),
]


def _replace_with(path: Path, device: str) -> None:
    path.unlink(missing_ok=True)
    if device == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to(device)


@pytest.mark.parametrize("place", NOT_FILES)
def test_a_device_linked_under_a_checkpoint_file_name_is_refused(
    neox: Path, hf: Path, out: Path, place: Callable[[Path, Path], tuple[Path, list[object]]]
) -> None:
    """/dev/null here (in this process: reading it ends); /dev/zero or /dev/urandom would never."""
    path, args = place(neox, hf)
    _replace_with(path, os.devnull)
    outcome = run_cli([*args, out])
    assert_refused(outcome, names=[path], says=["is a character device, not a regular file"])
    assert_nothing_left(out, out.parent)


@pytest.mark.parametrize(
    "place",
    [pytest.param(_neox_file("layer"), id="neox-layer-file"), pytest.param(_hf_file("weights"), id="hf-model-safetensors")],
)
def test_a_fifo_under_a_checkpoint_file_name_is_refused_and_never_waited_for(
    neox: Path, hf: Path, out: Path, place: Callable[[Path, Path], tuple[Path, list[object]]]
) -> None:
    """Opening a FIFO for reading waits for a writer, forever: run in a process of its own."""
    path, args = place(neox, hf)
    _replace_with(path, "fifo")
    outcome = run_cli_subprocess([*args, out], timeout=300)
    assert_refused(outcome, names=[path], says=["is a FIFO (named pipe), not a regular file"])
    assert_nothing_left(out, out.parent)


def test_a_fifo_given_as_the_config_is_refused(neox: Path, out: Path, tmp_path: Path) -> None:
    fifo = tmp_path / "model.yml"
    os.mkfifo(fifo)
    outcome = run_cli_subprocess(["convert", neox, out, "--config", fifo], timeout=300)
    assert_refused(outcome, names=[fifo], says=["FIFO"])
    assert_nothing_left(out, out.parent)


# --- shapes beyond a tensor ------------------------------------------------------------------------
def test_a_safetensors_dimension_of_2_to_the_70_is_refused_in_diff_without_cpp_frames(hf: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    header, data = read_safetensors_header(hf / "model.safetensors")
    header["huge"] = {"dtype": "F32", "shape": [2**70, 0], "data_offsets": [len(data), len(data)]}
    write_safetensors_raw(other / "model.safetensors", header, data)
    outcome = run_cli(["diff", hf, other])
    assert_refused(outcome, names=[other / "model.safetensors", "huge"], says=["beyond what a tensor can have"])
    assert "frame #" not in outcome.stderr and "c10::" not in outcome.stderr


# --- what reaches the terminal ---------------------------------------------------------------------
ESCAPES = "\x1b[2J\x1b[31mred\x07\u202e"


def test_control_characters_in_a_key_are_escaped_in_messages_and_tables(tmp_path: Path, out: Path) -> None:
    def add_loud_key(tensors: Tensors) -> None:
        for rank in range(2):
            tensors[f"layer_02.mlp.{ESCAPES}.weight@rank{rank}"] = torch.zeros(3)

    neox = neox_checkpoint(tmp_path / "neox", tp=2, mutate=add_loud_key)
    escaped = "layer_02.mlp.\\x1b[2J\\x1b[31mred\\x07\\u202e.weight@rank"  # one key, or the group of both ranks
    for args in (["convert", neox, out, "--rules", "neox-to-hf-gpt-neox"], ["plan", neox, "--rules", "neox-to-hf-gpt-neox"]):
        outcome = run_cli(args)
        assert outcome.code == 2, outcome.stderr
        shown = outcome.stdout + outcome.stderr
        assert not any(char in shown for char in "\x1b\x07\u202e"), repr(shown)
        assert escaped in " ".join(shown.split()), shown
    assert_nothing_left(out, out.parent)
    assert escaped in str(assert_refusal(["convert", neox, out, "--rules", "neox-to-hf-gpt-neox"], CompileError).stderr)


@pytest.mark.parametrize("content", ["TOP-SECRET-TOKEN\n", "global_step_secret_7\n"], ids=["not-a-name", "a-name"])
def test_a_latest_that_links_to_another_file_never_shows_its_contents(
    neox: Path, out: Path, tmp_path: Path, content: str
) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text(content)
    (neox / "latest").unlink()
    (neox / "latest").symlink_to(secret)
    outcome = run_cli(["convert", neox, out])
    assert_refused(outcome, names=[neox / "latest"], says=["link to another file", "contents are not shown"])
    assert content.strip() not in outcome.stdout + outcome.stderr
    assert_nothing_left(out, out.parent)
