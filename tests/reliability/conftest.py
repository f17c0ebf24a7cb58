"""Fixtures of the reliability corpus: valid checkpoints built once, copied per test to break.

The helpers live in ``_reliability.py`` beside this file (tests import it by name; pytest runs
with ``--import-mode=importlib``, so this folder is put on ``sys.path`` here).
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from _reliability import neox_checkpoint  # noqa: E402

from mapper.checkpoints import convert_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Valid inputs, built once: a TP=2 NeoX checkpoint and its HF conversion."""
    base = tmp_path_factory.mktemp("pristine")
    neox = neox_checkpoint(base / "neox", "neox-new", tp=2)
    convert_checkpoint(neox, base / "hf")
    return {"neox": neox, "hf": base / "hf"}


@pytest.fixture
def neox(pristine: dict[str, Path], tmp_path: Path) -> Path:
    """A private copy of a valid TP=2 NeoX checkpoint (neox-new layout), free to break."""
    return Path(shutil.copytree(pristine["neox"], tmp_path / "neox"))


@pytest.fixture
def hf(pristine: dict[str, Path], tmp_path: Path) -> Path:
    """A private copy of a valid HF folder written by mapper (with its mapper/ record), free to break."""
    return Path(shutil.copytree(pristine["hf"], tmp_path / "hf"))


@pytest.fixture
def out(tmp_path: Path) -> Iterator[Path]:
    """Where a conversion writes (not created)."""
    yield tmp_path / "OUT"
