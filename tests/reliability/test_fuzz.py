"""Fuzzing the two parsers a user feeds files to: rule files and safetensors headers.

Whatever the bytes, the readers must answer with mapper's own errors (a ``MapperError``, which
the CLI prints as one message with exit code 2), never with another exception (exit code 3, "a
bug") and never hang. Examples are small (at most a few kB) and answered in milliseconds: the
pathological ones (thousands of brackets, nested aliases) are refused at a limit as soon as it
is crossed (see mapper.safe_yaml). The deadline is a guard against a hang, not a measure of
speed: 60 s holds on a loaded 2-core machine (a 2 s deadline failed there on a slow example). The
number of examples comes from the hypothesis CI profile (tests/conftest.py: 200).
"""

from __future__ import annotations

import json
import struct
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from mapper.errors import MapperError
from mapper.formats import HFCheckpoint
from mapper.resources import rules_dir
from mapper.spec import load_rule_file, load_rule_text

DEADLINE = timedelta(seconds=60)
# max_examples comes from the loaded profile (CI: 200); only the deadline is ours.
FUZZ = settings(deadline=DEADLINE, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# --- rule files ---------------------------------------------------------------------------------
SELF_CONTAINED = """\
schema_version: 1
name: fuzz
version: 1.2.3
description: a small self-contained rule set
source: neox
target: hf-gpt-neox
parameters:
  num_layers: {description: transformer layers}
  tp: {default: 2}
  heads: {default: 4}
  head_dim: {expr: "64 // heads"}
placeholders: {i: num_layers, r: tp, wb: [weight, bias]}
rules:
  - rename: {from: "layer_{i+2:02d}.input_layernorm.{wb}@rank{r}", to: "h.{i}.ln.{wb}@rank{r}"}
  - fuse: {from: "h.{i}.ln.{wb}@rank{r}", over: r, mode: replicated, to: "h.{i}.ln.{wb}"}
  - fuse: {from: "layer_{i+2:02d}.qkv.weight@rank{r}", over: r, dim: 0, to: "h.{i}.qkv.weight"}
  - unflatten: {from: "h.{i}.qkv.weight", dim: 0, sizes: [heads, 3, head_dim]}
  - transpose: {from: "h.{i}.qkv.weight", dims: [0, 1]}
  - affine: {from: "h.{i}.qkv.weight", scale: tp, when: "tp > 1 and heads % 2 == 0"}
  - drop: {from: "layer_{i+2:02d}.x._extra_state@rank{r}", restore: {shape: [0], dtype: uint8}, optional: true}
  - slice: {from: "layer_00.emb@rank{r}", keep: 10, total: 16, fill: 0.0, id: vocab}
"""
SHIPPED = sorted(rules_dir().glob("*.yaml")) + sorted(rules_dir().glob("fragments/**/*.yaml"))
SEEDS: list[tuple[str, Path]] = [(SELF_CONTAINED, rules_dir())] + [(p.read_text(), p.parent) for p in SHIPPED]


def test_the_seeds_are_valid() -> None:
    for text, base in SEEDS:
        load_rule_text(text, name="seed.yaml", base=base)


@st.composite
def mutated_rule_text(draw: st.DrawFn) -> tuple[str, Path]:
    """A valid rule file with a few line- and character-level edits (what a hurried edit does)."""
    text, base = draw(st.sampled_from(SEEDS))
    lines = text.splitlines()
    for _ in range(draw(st.integers(1, 4))):
        if not lines:
            lines = [""]
        i = draw(st.integers(0, len(lines) - 1))
        kind = draw(st.sampled_from(["delete", "duplicate", "swap", "char", "number", "insert", "indent"]))
        if kind == "delete":
            del lines[i]
        elif kind == "duplicate":
            lines.insert(i, lines[i])
        elif kind == "swap":
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        elif kind == "char":
            line = lines[i] or " "
            k = draw(st.integers(0, len(line) - 1))
            char = draw(st.sampled_from(list("{}[]:,-#'\"!&*|>%@`\\ \t0123456789_.ax") + ["\x00", "\u00e9", "\ufeff"]))
            lines[i] = line[:k] + char + line[k + 1 :]
        elif kind == "number":
            lines[i] = _change_a_number(lines[i], draw(st.sampled_from([-1, 0, 1, 3, 10**20, -(10**9)])))
        elif kind == "insert":
            lines.insert(i, draw(st.sampled_from([
                "  - rename: {from: a, to: b}", "include: [missing.yaml]", "include: [.]", "rules: 3",
                "  - drop: {from: \"{q}\"}", "parameters: {tp: {expr: \"tp + 1\"}}", "&a [*a]", "- !!python/object:os.system x",
                "  - affine: {from: a, scale: \"2 ** 1000000\"}", "  - pad: {from: a, to_size: \"1 // 0\"}",
            ])))
        else:
            lines[i] = "  " + lines[i] if draw(st.booleans()) else lines[i].lstrip()
    return "\n".join(lines) + "\n", base


def _change_a_number(line: str, value: int) -> str:
    for k, char in enumerate(line):
        if char.isdigit():
            return line[:k] + str(value) + line[k + 1 :]
    return line


def _load_rules_or_mapper_error(text: str, base: Path) -> None:
    try:
        load_rule_text(text, name="fuzzed.yaml", base=base)
    except MapperError as error:
        assert str(error), "an error must say something"


@FUZZ
@given(mutated_rule_text())
@example(("schema_version: 1\ninclude: [\"a\\0b.yaml\"]\n", rules_dir()))
@example(("[" * 2000, rules_dir()))
@example(("{" * 4096, rules_dir()))
@example(("- " * 2000 + "x\n", rules_dir()))
@example(("a: &x [*x, *x]\n", rules_dir()))
def test_mutated_rule_files_give_mapper_errors_only(case: tuple[str, Path]) -> None:
    _load_rules_or_mapper_error(*case)


@FUZZ
@given(st.binary(max_size=512))
@example(b"\xff\xfe" + "rules: []".encode("utf-16-le"))
def test_random_bytes_as_a_rule_file_give_mapper_errors_only(tmp_path_factory: pytest.TempPathFactory, data: bytes) -> None:
    _load_rules_or_mapper_error(data.decode("utf-8", errors="replace"), rules_dir())
    path = tmp_path_factory.mktemp("rules") / "fuzzed.yaml"
    path.write_bytes(data)
    try:
        load_rule_file(path)
    except MapperError as error:
        assert str(error)


# --- safetensors ----------------------------------------------------------------------------------
def _valid_safetensors() -> bytes:
    """A small valid file written by the reference library: 3 tensors, 2 dtypes, metadata."""
    import tempfile

    tensors = {
        "a.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4),
        "b.bias": torch.arange(5, dtype=torch.bfloat16),
        "c.ids": torch.arange(3, dtype=torch.int64),
    }
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.safetensors"
        save_file(tensors, str(path), metadata={"format": "pt"})
        return path.read_bytes()


VALID = _valid_safetensors()
HEADER_END = 8 + struct.unpack("<Q", VALID[:8])[0]


def _read_everything(folder: Path, data: bytes) -> None:
    (folder / "model.safetensors").write_bytes(data)
    try:
        with HFCheckpoint(folder) as checkpoint:
            for key in checkpoint.manifest():
                tensor = checkpoint.get(key)
                tensor.float().sum()  # touch every byte the header claims
    except MapperError as error:
        assert str(error)


@st.composite
def mutated_safetensors(draw: st.DrawFn) -> bytes:
    """The valid file with bytes flipped in the length prefix and the JSON header, or cut short."""
    data = bytearray(VALID)
    for _ in range(draw(st.integers(1, 4))):
        region = draw(st.sampled_from(["length", "header", "header", "data", "cut"]))
        if len(data) < len(VALID):  # already cut short: flip anywhere in what is left
            if data:
                data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        elif region == "length":
            i = draw(st.integers(0, 7))
            data[i] = draw(st.integers(0, 255))
        elif region == "header":
            i = draw(st.integers(8, HEADER_END - 1))
            data[i] = draw(st.sampled_from([ord(c) for c in '0123456789[]{},:"-e. ']) | st.integers(0, 255))
        elif region == "data":
            i = draw(st.integers(HEADER_END, len(data) - 1))
            data[i] ^= 0xFF
        else:
            del data[draw(st.integers(0, len(data))) :]
    return bytes(data)


def _header_json(header: object) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw


@FUZZ
@given(mutated_safetensors())
@example(_header_json({"a": {"dtype": "F32", "shape": [10**12, 10**12], "data_offsets": [0, 4]}}))
@example(_header_json({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}) + bytes(4))
@example(_header_json({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0.0, 4]}}) + bytes(4))
@example(_header_json({"a": {"dtype": "F32", "shape": [1], "data_offsets": [True, 4]}}) + bytes(4))
@example(_header_json({"__metadata__": None, "a": []}))
@example(_header_json([1, 2]))
@example(struct.pack("<Q", 2**64 - 1) + b"{}")
@example(b"")
def test_mutated_safetensors_give_mapper_errors_only(tmp_path_factory: pytest.TempPathFactory, data: bytes) -> None:
    _read_everything(tmp_path_factory.mktemp("st"), data)


@FUZZ
@given(st.binary(max_size=256))
def test_random_bytes_as_safetensors_give_mapper_errors_only(tmp_path_factory: pytest.TempPathFactory, data: bytes) -> None:
    _read_everything(tmp_path_factory.mktemp("st"), data)
