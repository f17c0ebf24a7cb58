"""The README is a specification: its commands, example code and format reference must be true."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from mapper.cli import main
from mapper.spec.schema import rule_format_reference

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def run_cli(*args: str) -> int:
    try:
        main(list(args))
    except SystemExit as done:
        return int(done.code or 0)
    return 0


def test_quick_start_has_exactly_the_two_setup_commands_and_ci_runs_the_test_one():
    quick = README.split("## Quick start", 1)[1].split("##", 1)[0]
    block = re.search(r"```sh\n(.*?)```", quick, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]
    assert commands == ["make demo", "make test"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert [line for line in ci.splitlines() if line and not line.startswith(("#", "set ", "cd "))] == ["make test"]


def test_the_library_example_runs():
    code = re.search(r"## Using it as a library\n\n```python\n(.*?)```", README, re.S).group(1)
    exec(compile(code, "README.md", "exec"), {})  # noqa: S102 -- our own documentation


def test_the_rule_format_reference_is_generated_from_the_schema():
    start, end = "<!-- rule-format-reference:start -->\n", "<!-- rule-format-reference:end -->"
    embedded = README.split(start, 1)[1].split(end, 1)[0]
    assert embedded == rule_format_reference(), "regenerate it: see tests/docs/test_readme.py"


def test_every_shipped_rule_set_is_in_the_supported_variants_table():
    from mapper.spec import builtin_rule_files

    table = README.split("## Supported variants", 1)[1].split("##", 1)[0]
    assert {name for name in builtin_rule_files()} == set(re.findall(r"`(neox-[a-z0-9-]+)`", table))


def test_the_new_te_variant_walk_through_works(tmp_path, capsys):
    from mapper.testing import synthesize_variant, write_neox_checkpoint

    config, tensors = synthesize_variant("te-mha", tp=2, norm="te_layernorm")
    checkpoints = write_neox_checkpoint(tensors, config, tmp_path / "checkpoints")
    assert run_cli("detect", str(checkpoints)) == 2  # no shipped rule set fits
    assert run_cli("plan", str(checkpoints), "--rules", "neox-te-mha-to-hf-gpt-neox") == 2
    assert "input_layernorm.norm.weight@rank0: no rule consumes this tensor" in capsys.readouterr().err.replace("\n", "")

    name = "neox-te-mha-te-norm-to-hf-gpt-neox"
    assert run_cli("rules", "new", name, "--from", "neox-te-mha-to-hf-gpt-neox", "--out", str(tmp_path / "my-rules")) == 0
    path = tmp_path / "my-rules" / f"{name}.yaml"
    edit = yaml.safe_load(re.search(r"swap the two norm fragments.*?```yaml\n(.*?)```", README, re.S).group(1))
    document = {**yaml.safe_load(path.read_text()), **edit}
    path.write_text(yaml.safe_dump(document, sort_keys=False))

    assert run_cli("rules", "validate", str(path)) == 0
    assert run_cli("convert", str(checkpoints), str(tmp_path / "hf-model"), "--rules", str(path), "-q") == 0
    assert run_cli("verify", str(checkpoints), str(tmp_path / "hf-model")) == 0
    assert "verdict: OK" in capsys.readouterr().out
    assert run_cli("convert", str(tmp_path / "hf-model"), str(tmp_path / "back"), "-q") == 0
    assert run_cli("diff", str(checkpoints), str(tmp_path / "back")) == 0
