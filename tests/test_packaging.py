"""A non-editable install finds the shipped rule sets and the schema (they live outside mapper/)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_non_editable_install_ships_rules_and_schema(tmp_path: Path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-cache-dir", "--target", str(target), str(ROOT)],
        check=True, cwd=tmp_path, capture_output=True,
    )
    probe = (
        "import mapper, mapper.resources as r, mapper.spec as s;"
        "assert mapper.__file__.startswith(%r), mapper.__file__;"
        "assert r.schema_path().is_file();"
        "print(len(s.builtin_rule_files()), s.load_rules('neox-te-to-hf-gpt-neox').name)"
    ) % str(target)
    found = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True,
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
    )
    assert found.returncode == 0, found.stderr
    count, name = found.stdout.split()
    assert int(count) == len(list((ROOT / "rules").glob("*.yaml"))) and name == "neox-te-to-hf-gpt-neox"
