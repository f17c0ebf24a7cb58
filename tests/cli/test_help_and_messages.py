"""What a person reads: complete help, sizes as transformers means them, a missing folder said
to be missing, options refused where they do not apply, and a ``--version`` that starts no torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mapper.cli import _size, app
from mapper.errors import MapperError
from mapper.testing import synthesize_variant, write_neox_checkpoint
from mapper.testing.cli import run_cli



def every_command() -> list[tuple[list[str], object]]:
    """(words, click command) for the top level and every command and subcommand."""
    import typer.main

    found = []

    def walk(words: list[str], command: object) -> None:
        found.append((words, command))
        for name, sub in sorted(getattr(command, "commands", {}).items()):
            walk([*words, name], sub)

    walk([], typer.main.get_command(app))
    return found


COMMANDS = every_command()


@pytest.mark.parametrize("words,command", COMMANDS, ids=[" ".join(w) or "mapper" for w, _ in COMMANDS])
def test_every_option_and_argument_of_every_command_is_explained(words, command):
    unexplained = [param.name for param in command.params if not (getattr(param, "help", None) or "").strip()]
    assert not unexplained, f"mapper {' '.join(words)}: no help for {unexplained}"
    code, out, _ = run_cli([*words, "--help"])
    assert code == 0
    assert "<bool>" not in out and "<list" not in out, out  # typer's type labels, meaningless to a person


def test_version_and_help_do_not_import_torch_or_transformers():
    """``mapper --version`` answers at once: torch alone takes seconds to import."""
    for args in (["--version"], ["--help"], ["convert", "--help"]):
        done = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", f"from mapper.cli import main; main({args!r})"],
            capture_output=True, text=True,
        )
        assert done.returncode == 0, done.stderr
        imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
        assert "mapper.cli" in imported
        assert not imported & {"torch", "transformers", "numpy", "safetensors"}, (args, imported & {"torch", "transformers"})
    version = subprocess.run([sys.executable, "-c", "from mapper.cli import main; main(['--version'])"],
                             capture_output=True, text=True)
    assert version.stdout.strip().startswith("mapper 0.") and version.stderr == ""


# --- --max-shard-size: transformers' units exactly --------------------------------------------
ACCEPTED_BY_BOTH = ["5GB", "500MB", "100KB", "1KB", "2GiB", "512MiB", "1KiB", "2gib", "3mib", "5gB", "5 GB",
                    "5Gb", "5gb", "8Mb", "1Kb", "7kb"]
REFUSED_BY_BOTH = ["1B", "5G", "1.5GB", "5TB", "GB", "", "abc", "5GB ", "1e9", "5 G B", "0x10MB", "5GiBs"]


@pytest.mark.parametrize("text", ACCEPTED_BY_BOTH)
def test_a_size_means_what_it_means_to_transformers(text):
    from transformers.utils.hub import convert_file_size_to_int

    assert _size(text) == convert_file_size_to_int(text)


def test_lower_case_b_is_bits_and_ib_is_powers_of_two():
    assert _size("5GB") == 5 * 10**9 and _size("5Gb") == 5 * 10**9 // 8
    assert _size("2GiB") == 2 * 2**30 and _size("2Gib") == 2 * 2**30  # binary units: no bits (as transformers)


@pytest.mark.parametrize("text", REFUSED_BY_BOTH)
def test_a_size_transformers_refuses_is_refused(text):
    from transformers.utils.hub import convert_file_size_to_int

    with pytest.raises(ValueError):
        convert_file_size_to_int(text)
    with pytest.raises(MapperError, match="is not a size"):
        _size(text)


def test_a_plain_number_is_bytes_and_a_size_must_be_positive():
    from transformers.utils.hub import convert_file_size_to_int

    assert _size("1000") == convert_file_size_to_int(1000) == 1000  # an int, to transformers
    for text in ("0", "0GB", "-1GB", "+5GB", "5_000MB"):  # transformers' int() takes these; a shard size is > 0
        with pytest.raises(MapperError):
            _size(text)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    config, tensors = synthesize_variant("te-full", tp=2)
    return write_neox_checkpoint(tensors, config, tmp_path_factory.mktemp("ckpt") / "neox", tokenizer=True)


@pytest.fixture(scope="module")
def hf_folder(tiny_checkpoint, tmp_path_factory) -> Path:
    from mapper.checkpoints import convert_checkpoint

    return convert_checkpoint(tiny_checkpoint, tmp_path_factory.mktemp("hf") / "hf").output


def test_an_unknown_size_is_refused_before_the_checkpoint_is_read(tiny_checkpoint, tmp_path):
    code, out, err = run_cli(["convert", tiny_checkpoint, tmp_path / "hf", "--max-shard-size", "1B"])
    assert code == 2 and "--max-shard-size '1B' is not a size" in err and "hint:" in err
    assert out == "" and not (tmp_path / "hf").exists()


# --- a missing local folder ----------------------------------------------------------------------
def test_verify_names_a_missing_hf_folder_and_never_the_network(tiny_checkpoint, tmp_path):
    code, _, err = run_cli(["verify", tiny_checkpoint, tmp_path / "missing-folder"])
    assert code == 2 and "no such HF folder" in err and "missing-folder" in err
    assert "huggingface.co" not in err and "connect" not in err


def test_verify_names_a_missing_checkpoint_dump_and_tokenizer(tiny_checkpoint, hf_folder, tmp_path):
    code, _, err = run_cli(["verify", tmp_path / "no-neox", hf_folder])
    assert code == 2 and "no such NeoX checkpoint" in err
    code, _, err = run_cli(["verify", "--reference", tmp_path / "dump.safetensors", tmp_path / "no-hf"])
    assert code == 2 and "no such HF folder" in err
    code, _, err = run_cli(["verify", tiny_checkpoint, hf_folder, "--text", "hello", "--tokenizer", tmp_path / "no-tok"])
    assert code == 2 and "no such --tokenizer folder" in err and "huggingface.co" not in err
    code, _, err = run_cli(["verify", tiny_checkpoint, hf_folder / "config.json"])
    assert code == 2 and "is a file, not a folder" in err


def test_the_library_says_missing_too(tmp_path):
    from mapper.hf_models import load_model
    from mapper.verify.checkpoints import _tokenize

    for call in (lambda: load_model(tmp_path / "absent"), lambda: _tokenize("hello", tmp_path / "absent")):
        with pytest.raises(MapperError, match="no such") as raised:
            call()
        assert "huggingface.co" not in str(raised.value)


# --- options that do not apply to a direction ----------------------------------------------------
def test_tp_is_refused_for_neox_to_hf(tiny_checkpoint, tmp_path):
    code, _, err = run_cli(["convert", tiny_checkpoint, tmp_path / "hf", "--tp", "2"])
    assert code == 2 and "--tp does not apply to a neox -> hf conversion" in err and "hint:" in err
    assert not (tmp_path / "hf").exists()


def test_trim_vocab_is_refused_for_hf_to_neox(hf_folder, tmp_path):
    code, _, err = run_cli(["convert", hf_folder, tmp_path / "neox", "--trim-vocab", "100"])
    assert code == 2 and "--trim-vocab does not apply to a hf -> neox conversion" in err and "hint:" in err
    assert not (tmp_path / "neox").exists()
