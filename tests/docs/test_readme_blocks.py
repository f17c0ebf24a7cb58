"""Every code block of the README runs, or is marked as one that cannot and listed here.

Blocks are read in order, each with the HTML comment on the line before its fence:

- no comment: a ```sh block runs line by line as ``mapper`` commands in a folder where
  ``checkpoints/`` is a tiny synthetic TE checkpoint, so the README's paths work as written (a
  block that reads ``hf-model/`` without writing it gets one converted first; ``#SBATCH --array``
  runs the line with ``${SLURM_ARRAY_TASK_ID}`` once per task); a ```python block is executed in
  an empty folder; a ```yaml rule set is loaded (schema and meaning) beside the shipped fragments.
- ``<!-- output of: COMMAND -->``: the block is an excerpt of what COMMAND prints; numbers with a
  decimal point may differ in their digits (machines round differently), nothing else.
- ``<!-- stand-in for gpt-neox: ... -->``: a sh block whose ``python neox_reference_dump.py``
  line needs gpt-neox; mapper's built-in reference writes the same dump instead.
- ``<!-- run by: tests/FILE.py ... -->``: that test runs it (the file must exist).
- ``<!-- not run: REASON -->``: cannot run inside a test; listed in ``NOT_RUN``, so a new one
  fails until someone has looked at it.

Blocks of sections another test owns (``SECTIONS_RUN_ELSEWHERE``) are run there.
"""

from __future__ import annotations

import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from mapper.testing.cli import run_cli

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"

SECTIONS_RUN_ELSEWHERE = {
    "Walk-through: a rule set for a new key layout (no Python)": "tests/docs/test_readme.py",
    "Walk-through: another TP degree or layout (NeoX → NeoX)": "tests/docs/test_readme.py",
    "Walk-through: the fp32 master weights of a bf16 run": "tests/docs/test_readme.py",
}
NOT_RUN = {  # (section, first line of the block)
    ("Quick start", "make demo   # a tiny TE checkpoint (TP=2) converted to HF, verified against transformers, round-tripped"),
}


@dataclass(frozen=True)
class Block:
    line: int  # of the opening fence, 1-based
    section: str
    language: str
    text: str
    marker: str  # the HTML comment just before the fence, without <!-- -->; "" when none

    @property
    def first_line(self) -> str:
        return self.text.splitlines()[0] if self.text else ""

    @property
    def kind(self) -> str:
        """How the block is checked: sh, python, yaml, output, stand-in, elsewhere, not-run or unknown."""
        if self.section in SECTIONS_RUN_ELSEWHERE or self.marker.startswith("run by:"):
            return "elsewhere"
        for prefix, kind in (("not run:", "not-run"), ("output of:", "output"), ("stand-in for gpt-neox", "stand-in")):
            if self.marker.startswith(prefix):
                return kind
        if self.marker:
            return "unknown"
        return self.language if self.language in ("sh", "python", "yaml") else "unknown"

    def __str__(self) -> str:
        return f"README.md:{self.line} ({self.section}, {self.language or 'text'})"


def readme_blocks() -> list[Block]:
    blocks, section, marker = [], "", ""
    lines = README.read_text(encoding="utf-8").splitlines()
    number = 0
    while number < len(lines):
        line = lines[number]
        if line.startswith("## "):
            section = line[3:].strip()
        if line.startswith("```"):
            end = next(i for i in range(number + 1, len(lines)) if lines[i].startswith("```"))
            blocks.append(Block(number + 1, section, line[3:].strip(), "\n".join(lines[number + 1:end]), marker))
            number, marker = end + 1, ""
            continue
        if line.strip():
            found = re.fullmatch(r"<!--\s*(.*?)\s*-->", line.strip())
            marker = found.group(1) if found else ""
        number += 1
    return blocks


BLOCKS = readme_blocks()
RUNNABLE = [b for b in BLOCKS if b.kind in ("sh", "python", "yaml", "output", "stand-in")]


def test_every_block_is_run_or_marked_as_one_that_cannot_be():
    unknown = [str(b) for b in BLOCKS if b.kind == "unknown"]
    assert not unknown, f"blocks this test does not know how to run (mark them, see the module docstring): {unknown}"
    marked = {(b.section, b.first_line) for b in BLOCKS if b.kind == "not-run"}
    assert marked == NOT_RUN, "a block marked `not run` must be listed in NOT_RUN (and a listed one marked)"
    for block in BLOCKS:
        if block.marker.startswith("run by:"):
            assert (ROOT / block.marker.split()[2]).is_file(), block
        if block.kind == "sh":
            for words in _commands(block):
                assert words[0] == "mapper", f"{block}: only mapper commands run here: {' '.join(words)}"
    owners = {SECTIONS_RUN_ELSEWHERE[b.section] for b in BLOCKS if b.section in SECTIONS_RUN_ELSEWHERE}
    assert all((ROOT / owner).is_file() for owner in owners)


# --- running -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def te_checkpoint(tmp_path_factory):
    """The checkpoint of the walk-throughs (the demo's): TE, TP 2, FP8 metadata, a tokenizer."""
    from mapper.testing import synthesize_variant, write_neox_checkpoint

    config, tensors = synthesize_variant("te-full-fp8", tp=2, seed=0)
    return write_neox_checkpoint(tensors, config, tmp_path_factory.mktemp("readme") / "checkpoints", tokenizer=True), config, tensors


def mapper_cli(args: list[str]) -> tuple[int, str]:
    """``mapper ARGS``' exit code and everything it printed."""
    outcome = run_cli(args)
    return outcome.code, outcome.stdout + outcome.stderr


def _commands(block: Block) -> list[list[str]]:
    """Each command line of a sh block, as words; ``#SBATCH --array=A-B`` expands the next lines'
    ``${SLURM_ARRAY_TASK_ID}`` over A..B."""
    commands, tasks = [], None
    for raw in block.text.splitlines():
        array = re.match(r"#SBATCH --array=(\d+)-(\d+)", raw.strip())
        if array:
            tasks = range(int(array.group(1)), int(array.group(2)) + 1)
        words = shlex.split(raw, comments=True)
        if not words:
            continue
        if any("${SLURM_ARRAY_TASK_ID}" in w for w in words):
            assert tasks is not None, f"{block}: ${{SLURM_ARRAY_TASK_ID}} without #SBATCH --array"
            commands += [[w.replace("${SLURM_ARRAY_TASK_ID}", str(task)) for w in words] for task in tasks]
        else:
            commands.append(words)
    return commands


def _reads_hf_model_first(commands: list[list[str]]) -> bool:
    for words in commands:
        positional = [w for w in words[2:] if not w.startswith("-")]
        if words[1:2] == ["convert"] and positional[1:2] == ["hf-model/"]:
            return False
        if "hf-model/" in words:
            return True
    return False


def _stand_in_dump(words: list[str], config, tensors) -> None:
    """What ``python neox_reference_dump.py --checkpoint C --out DUMP`` writes, from mapper's
    built-in reference (gpt-neox is not here)."""
    import torch
    import yaml

    from mapper.verify import write_builtin_dump

    assert words[:2] == ["python", "neox_reference_dump.py"] and "--checkpoint" in words
    out = Path(words[words.index("--out") + 1])
    saved = yaml.safe_load(Path("hf-model/mapper/neox-config.yaml").read_text(encoding="utf-8"))
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    write_builtin_dump(tensors, config, out, ids, config_yaml=saved)


def _numbers_loose(text: str) -> str:
    """Whitespace collapsed; decimals (1.073e-06, 0.86) as '#': digits a machine may round otherwise."""
    return re.sub(r"\d+\.\d+(?:e[+-]\d+)?", "#", " ".join(text.split()))


@pytest.mark.parametrize("block", RUNNABLE, ids=[f"line {b.line} {b.kind}" for b in RUNNABLE])
def test_the_block_runs(block: Block, te_checkpoint, tmp_path: Path, monkeypatch):
    checkpoint, config, tensors = te_checkpoint
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    if block.kind == "python":
        exec(compile(block.text, f"README.md:{block.line}", "exec"), {"__name__": "__readme__"})  # noqa: S102
        return
    if block.kind == "yaml":
        from mapper.spec import load_rule_file

        rules = shutil.copytree(ROOT / "rules", work / "rules")  # its includes are the shipped fragments
        (rules / "readme-example.yaml").write_text(block.text + "\n", encoding="utf-8")
        load_rule_file(rules / "readme-example.yaml")
        return
    shutil.copytree(checkpoint, work / "checkpoints")
    if block.kind == "output":
        words = shlex.split(block.marker.split(":", 1)[1])
        assert words[0] == "mapper"
        code, printed = mapper_cli(words[1:])
        assert code == 0, printed
        shown = _numbers_loose(printed)
        missing = [line for line in block.text.splitlines() if line.strip() and _numbers_loose(line) not in shown]
        assert not missing, f"{block}: `{' '.join(words)}` no longer prints these lines: {missing}"
        return
    commands = _commands(block)
    if _reads_hf_model_first(commands):
        from mapper.checkpoints import convert_checkpoint

        convert_checkpoint(work / "checkpoints", work / "hf-model")
    for words in commands:
        if words[0] == "python" and block.kind == "stand-in":
            _stand_in_dump(words, config, tensors)
            continue
        code, printed = mapper_cli(words[1:])
        assert code == 0, f"{block}: `{' '.join(words)}` exited {code}:\n{printed}"


# --- what the README says about files ----------------------------------------------------------------
def test_the_readme_names_every_file_convert_writes(te_checkpoint, tmp_path: Path):
    from mapper.checkpoints import convert_checkpoint

    checkpoint, _, _ = te_checkpoint
    out = convert_checkpoint(checkpoint, tmp_path / "hf-model").output
    text = README.read_text(encoding="utf-8")
    paragraph = text[text.index("`convert` reads the model config"):].split("\n\n", 1)[0]
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert "mapper/rules.yaml" in written
    unnamed = [name for name in written if f"`{name}`" not in paragraph]
    assert not unnamed, f"convert writes files the README does not name: {unnamed}"


def test_every_test_and_doc_the_readme_names_exists():
    text = README.read_text(encoding="utf-8")
    named = set(re.findall(r"`((?:tests|docs|benchmarks)/[\w./-]+)`", text))
    named |= {link for link in re.findall(r"\]\(((?:tests|docs|benchmarks)/[^)#]+)\)", text)}
    assert "tests/docs/test_readme.py" in named
    assert not [path for path in sorted(named) if not (ROOT / path).exists()]
