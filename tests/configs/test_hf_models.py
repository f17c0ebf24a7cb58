"""The tensors transformers expects for a config, and the cache that spares importing it again.

Importing transformers' model code costs seconds; the key set depends only on the config and the
installed transformers, so it is cached per (config, transformers version and model files).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import mapper.hf_models as hf_models
from mapper.hf_models import cache_folder, expected_tensors, expected_tensors_from_transformers

from mapper.testing import synthesize_variant

pytest.importorskip("transformers")


def _config(arch: str = "gpt_neox") -> dict[str, Any]:
    model, _ = synthesize_variant("neox-new" if arch == "gpt_neox" else "llama-new", tp=1, num_layers=2)
    return model.to_hf_config(arch)  # type: ignore[arg-type]


@pytest.fixture
def asked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[dict[str, Any]]:
    """Every config for which transformers itself was asked; the cache goes to ``tmp_path``."""
    monkeypatch.setenv("MAPPER_CACHE_DIR", str(tmp_path / "cache"))
    calls: list[dict[str, Any]] = []

    def counting(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
        calls.append(dict(config))
        return expected_tensors_from_transformers(config)

    monkeypatch.setattr(hf_models, "expected_tensors_from_transformers", counting)
    return calls


@pytest.mark.parametrize("arch", ["gpt_neox", "llama"])
def test_the_second_ask_for_a_config_is_answered_from_the_cache(asked: list[dict[str, Any]], arch: str) -> None:
    config = _config(arch)
    first = expected_tensors(config)
    second = expected_tensors(config)
    assert first == second == expected_tensors_from_transformers(config)
    assert len(asked) == 1
    assert len(list((cache_folder() or Path()).glob("hf-keys/*.json"))) == 1


def test_another_config_or_another_transformers_asks_again(
    asked: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _config()
    expected_tensors(config)
    wider = {**config, "intermediate_size": config["intermediate_size"] * 2}
    assert expected_tensors(wider) != expected_tensors(config)
    assert len(asked) == 2
    real = hf_models.transformers_identity
    monkeypatch.setattr(hf_models, "transformers_identity", lambda model_type: {**(real(model_type) or {}), "version": "99"})
    expected_tensors(config)
    assert len(asked) == 3


def test_the_identity_of_transformers_names_its_model_files(asked: list[dict[str, Any]]) -> None:
    identity = hf_models.transformers_identity("gpt_neox")
    assert identity is not None and identity["version"]
    assert "models/gpt_neox/modeling_gpt_neox.py" in identity["files"]
    assert "modeling_utils.py" in identity["files"]


def test_a_damaged_cache_entry_is_asked_again_and_replaced(asked: list[dict[str, Any]]) -> None:
    config = _config()
    want = expected_tensors(config)
    (entry,) = (cache_folder() or Path()).glob("hf-keys/*.json")
    for damage in ("{not json", '{"tensors": 3}', '{"tensors": {"a": ["x"]}}', ""):
        entry.write_text(damage)
        assert expected_tensors(config) == want
    assert len(asked) == 5
    assert expected_tensors(config) == want and len(asked) == 5  # repaired


def test_an_empty_cache_setting_turns_the_cache_off(asked: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAPPER_CACHE_DIR", "")
    assert cache_folder() is None
    config = _config()
    expected_tensors(config)
    expected_tensors(config)
    assert len(asked) == 2


def test_an_unwritable_cache_only_costs_time(asked: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("MAPPER_CACHE_DIR", str(blocker))
    config = _config()
    assert expected_tensors(config) == expected_tensors(config)
    assert len(asked) == 2


def test_the_default_cache_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MAPPER_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_folder() == tmp_path / "mapper"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_folder() == Path.home() / ".cache" / "mapper"
