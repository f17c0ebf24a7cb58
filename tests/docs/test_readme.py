"""The README is a specification: its commands, example code and format reference must be true."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mapper.testing.cli import run_cli

from readme_sections import embedded, generated_sections

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def exit_code(*args: str, printed: list[str] | None = None) -> int:
    """``mapper ARGS``' exit code; what it printed on stdout is appended to ``printed``."""
    outcome = run_cli(args)
    if printed is not None:
        printed.append(outcome.stdout)
    return outcome.code


def read(printed: list[str]) -> str:
    """What the commands printed since the last read."""
    text = "".join(printed)
    printed.clear()
    return text


def test_quick_start_has_exactly_the_two_setup_commands_and_ci_runs_the_test_one():
    quick = README.split("## Quick start", 1)[1].split("##", 1)[0]
    block = re.search(r"```sh\n(.*?)```", quick, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]
    assert commands == ["make demo", "make test"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert [line for line in ci.splitlines() if line and not line.startswith(("#", "set ", "cd "))] == ["make test"]


@pytest.mark.parametrize("marker", sorted(generated_sections()))
def test_the_generated_sections_match_what_they_are_generated_from(marker: str):
    assert embedded(README, marker) == generated_sections()[marker](), (
        f"README section {marker} is stale: run `python tests/docs/readme_sections.py`"
    )


def _unfused_qkv(tensors: dict, config) -> dict:
    """The fork of the walk-through: TE attention's Q, K and V stored apart (fuse_qkv_params=False)."""
    out = {}
    for key, tensor in tensors.items():
        name, _, rank = key.partition("@")
        if ".attention.qkv." not in name or name.endswith("_extra_state"):
            out[key] = tensor
            continue
        prefix, kind = name.rsplit(".", 1)  # layer_XX.attention.qkv, weight|bias
        rows = tensor.reshape(-1, 3, config.head_dim, *tensor.shape[1:])  # [heads_r, 3, hd, ...]
        for i, part in enumerate(("query", "key", "value")):
            out[f"{prefix}.{part}_{kind}@{rank}"] = rows[:, i].reshape(-1, *tensor.shape[1:]).clone()
    return out


def said(text: str) -> str:
    """Output with line breaks and indentation folded to single spaces (the console wraps lines)."""
    return " ".join(text.split())


def _fork_dump(tensors: dict, config, path):
    """The dump gpt-neox would write for the fork: its activations on mapper-chosen ids."""
    import torch

    from mapper.verify.dump import write_builtin_dump

    ids = torch.randint(0, config.orig_vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    return write_builtin_dump(tensors, config, path, ids)


def test_the_new_key_layout_walk_through_works(tmp_path):
    from mapper.testing import synthesize_variant, write_neox_checkpoint

    printed: list[str] = []
    section = README.split("## Walk-through: a rule set for a new key layout", 1)[1].split("\n## ", 1)[0]
    config, fused = synthesize_variant("te-full", tp=2)
    checkpoints = write_neox_checkpoint(_unfused_qkv(fused, config), config, tmp_path / "checkpoints")

    # the refusal, as the README shows it (each finding once per pattern)
    refused = run_cli(["convert", checkpoints, tmp_path / "no"])
    assert refused.code == 2
    refusal = said(refused.stderr)
    shown = re.search(r"```\n(.*?)```", section, re.S).group(1)
    for finding in re.split(r"\n(?=\S)", shown.strip()):
        assert said(finding) in refusal, finding

    # `rules new` writes one file that includes the shipped rule set; the README's file is that plus what differs
    name = "neox-unfused-qkv-to-hf-gpt-neox"
    assert exit_code("rules", "new", name, "--from", "neox-to-hf-gpt-neox", "--out", str(tmp_path / "my-rules"), printed=printed) == 0
    assert [p.name for p in (tmp_path / "my-rules").iterdir()] == [f"{name}.yaml"]
    path = tmp_path / "my-rules" / f"{name}.yaml"
    (mine,) = re.findall(r"```yaml\n(.*?)```", section, re.S)
    for line in path.read_text().splitlines():
        if line and not line.startswith(("#", "description:")):
            assert line in mine, line
    assert len(mine.splitlines()) <= 20  # all of it about what differs
    path.write_text(mine)

    commands = [line.split("#")[0].split() for line in re.search(r"```sh\nmapper rules validate(.*?)```", section, re.S)
                .group(0).splitlines()[1:-1]]
    assert [c[:2] for c in commands][:4] == [["mapper", "rules"], ["mapper", "rules"], ["mapper", "convert"], ["mapper", "roundtrip"]]
    for command in commands:
        args = [arg.replace("my-rules/", f"{tmp_path}/my-rules/").replace("checkpoints/", f"{checkpoints}/")
                .replace("hf-model/", f"{tmp_path}/hf-model/") for arg in command[1:]]
        assert exit_code(*args, printed=printed) == 0, command
    shown_rules = said(read(printed))
    assert "stage ranks" in shown_rules and "overrides" in shown_rules
    assert "gpt-neox-names-attention-te#0 (" in shown_rules and "excluded at" in shown_rules
    # verified against what the fork computes: its gpt-neox would write the dump; here the built-in reference of
    # the same weights in NeoX's own layout stands in for it (the script itself is tested against real gpt-neox)
    verify_block = re.search(r"```sh\nmapper reference-script(.*?)```", section, re.S).group(0).splitlines()[1:-1]
    assert [line.split()[:2] for line in verify_block] == [["mapper", "reference-script"], ["python", "neox_reference_dump.py"],
                                                           ["mapper", "verify"]]
    dump = _fork_dump(fused, config, tmp_path / "reference.safetensors")
    for line in (verify_block[0], verify_block[2]):
        args = [arg.replace("reference.safetensors", str(dump)).replace("neox_reference_dump.py", str(tmp_path / "script.py"))
                .replace("hf-model/", f"{tmp_path}/hf-model/") for arg in line.split("#")[0].split()[1:]]
        assert exit_code(*args, printed=printed) == 0, line
    assert "verdict: OK" in said(read(printed))
    # the mistake the README names: converts, round-trips, and fails against the dump, blaming the fork's rule
    path.write_text(mine.replace('["query.{i}.{wb}@rank{r}", "key.{i}.{wb}@rank{r}"', '["key.{i}.{wb}@rank{r}", "query.{i}.{wb}@rank{r}"'))
    assert exit_code("convert", str(checkpoints), str(tmp_path / "hf-wrong"), "--rules", str(path), "-q", printed=printed) == 0
    assert exit_code("verify", "--reference", str(dump), str(tmp_path / "hf-wrong"), printed=printed) == 1
    report = said(read(printed))
    assert "first divergence at blocks.0" in report and "attention" in report and f"{path}:" in report
    path.write_text(mine)

    # the fork's conversion is the HF model the shipped rules make of the stock (fused) checkpoint
    stock = write_neox_checkpoint(fused, config, tmp_path / "stock")
    assert exit_code("convert", str(stock), str(tmp_path / "hf-stock"), "-q", printed=printed) == 0
    assert exit_code("diff", str(tmp_path / "hf-model"), str(tmp_path / "hf-stock"), printed=printed) == 0
    assert exit_code("convert", str(tmp_path / "hf-model"), str(tmp_path / "back"), "-q", printed=printed) == 0
    assert exit_code("diff", str(checkpoints), str(tmp_path / "back"), printed=printed) == 0
    assert exit_code("rules", "params", str(checkpoints), printed=printed) == 0
    assert re.search(r"head_dim\s*│\s*16\s*│", read(printed))


def _commands(section: str) -> list[list[str]]:
    block = re.search(r"```sh\n(.*?)```", section, re.S).group(1)
    return [line.split("#")[0].split() for line in block.splitlines() if line.strip()]


def test_the_reshard_and_master_weight_walk_throughs_run(tmp_path):
    from mapper.formats import NeoXCheckpoint
    from mapper.testing.zero import write_zero_run

    run = write_zero_run("llama-te", tmp_path / "checkpoints", tp=2, dp=2, num_heads=8, num_kv_heads=4)
    for title in ("## Walk-through: another TP degree or layout", "## Walk-through: the fp32 master weights"):
        section = README.split(title, 1)[1].split("\n## ", 1)[0]
        for command in _commands(section):
            assert command[0] == "mapper"
            args = [arg.replace("checkpoints", str(tmp_path / "checkpoints")).replace("hf-model-fp32/", f"{tmp_path}/hf32/")
                    for arg in command[1:]]
            assert exit_code(*args) == 0, command
    with NeoXCheckpoint(tmp_path / "checkpoints-tp2") as back, NeoXCheckpoint(run.root) as original:
        assert back.tp == 2 and back.layout == "sequential"
        not_carried = set(original.manifest()) - set(back.manifest())  # the stale norm, as the README says
        assert not_carried and all(".post_attention_layernorm." in k for k in not_carried)
    with NeoXCheckpoint(tmp_path / "checkpoints-tp1") as masters:
        assert masters.tp == 1 and all(masters.get(k).dtype.is_floating_point for k in masters.manifest() if "weight" in k)
