"""The HuggingFace side, from transformers itself: which tensors a config's model expects.

Compile checks a conversion's output against the key set and shapes that transformers would save
for the target config (built on the meta device: no memory, no download), so a missing bias or a
wrong MLP width is an error before the output is committed, not a warning from
``from_pretrained``. transformers is a dependency of the package (it also writes the tokenizer
files); where it is missing anyway (an install with ``--no-deps``), this check is skipped (and said
so).

Importing transformers' model code takes 2-4 s, longer than converting a 2 GB checkpoint. The key
set is a function of the config and the installed transformers alone, so it is kept in a small
JSON file per (config, transformers) in ``$MAPPER_CACHE_DIR`` (default
``$XDG_CACHE_HOME/mapper`` or ``~/.cache/mapper``; set it to the empty string to turn the cache
off). The cache key includes transformers' version and the size and modification time of the
model files that decide the key set, so upgrading or editing transformers misses the cache.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mapper.configs import TARGETS
from mapper.errors import CheckpointError, MapperError
from mapper.formats.output import write_bytes_atomic


def transformers_available() -> bool:
    """Whether transformers is installed (found, not imported: importing it takes seconds)."""
    return importlib.util.find_spec("transformers") is not None


def require_local_folder(folder: str | Path, role: str) -> Path:
    """``folder`` if it is a folder on this machine. transformers' ``from_pretrained`` takes a
    path that does not exist for a Hub repository id and, offline, reports a failed connection to
    huggingface.co; a missing folder is said to be missing instead."""
    path = Path(folder)
    if not path.exists():
        raise CheckpointError(f"no such {role}", where=path,
                              hint=f"check the path: the {role} is read from the local disk (nothing is downloaded)")
    if not path.is_dir():
        raise CheckpointError(f"the {role} is a file, not a folder", where=path, hint=f"pass the {role} itself")
    return path


def config_object(config: Mapping[str, Any]) -> Any:
    """A transformers config object from a ``config.json`` dict."""
    from transformers import AutoConfig

    data = dict(config)
    model_type = data.pop("model_type", None)
    if model_type is None:
        raise CheckpointError("config.json has no model_type", hint=f"add model_type ({' or '.join(TARGETS)})")
    for key in ("architectures", "transformers_version"):
        data.pop(key, None)
    try:
        return AutoConfig.for_model(model_type, **data)
    except (ValueError, KeyError) as error:
        raise CheckpointError(f"transformers cannot build a {model_type!r} config: {error}") from None


CACHE_ENV = "MAPPER_CACHE_DIR"
CACHE_FORMAT = 1


def cache_folder() -> Path | None:
    """Where expected key sets are kept between runs (None: caching is off)."""
    configured = os.environ.get(CACHE_ENV)
    if configured is not None:
        return Path(configured).expanduser() if configured else None
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mapper"


def transformers_identity(model_type: str) -> dict[str, Any] | None:
    """transformers' version and the (size, mtime) of the files that decide a model's key set,
    found without importing transformers. None when transformers is not installed."""
    try:
        distribution = importlib.metadata.distribution("transformers")
    except importlib.metadata.PackageNotFoundError:
        return None
    files = {}
    for name in (
        "modeling_utils.py",
        "core_model_loading.py",
        "conversion_mapping.py",
        f"models/{model_type}/modeling_{model_type}.py",
        f"models/{model_type}/configuration_{model_type}.py",
    ):
        try:
            stat = Path(str(distribution.locate_file(f"transformers/{name}"))).stat()
        except OSError:
            continue
        files[name] = [stat.st_size, stat.st_mtime_ns]
    return {"version": distribution.version, "files": files}


def expected_tensors(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Key -> shape of every tensor ``save_pretrained`` writes for this config (tied ones
    excluded); from the cache (see the module docstring) when transformers was asked before."""
    folder = cache_folder()
    identity = transformers_identity(str(config.get("model_type", "")))
    if folder is None or identity is None:
        return expected_tensors_from_transformers(config)
    document = {"format": CACHE_FORMAT, "transformers": identity, "config": dict(config)}
    digest = hashlib.sha256(json.dumps(document, sort_keys=True, default=str).encode()).hexdigest()
    path = folder / "hf-keys" / f"{digest}.json"
    cached = _read_cached(path)
    if cached is not None:
        return cached
    found = expected_tensors_from_transformers(config)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(path, json.dumps({**document, "tensors": found}, default=str).encode())
    except (OSError, MapperError):
        pass  # a read-only or full cache folder only costs time
    return found


def _read_cached(path: Path) -> dict[str, tuple[int, ...]] | None:
    try:
        tensors = json.loads(path.read_text(encoding="utf-8"))["tensors"]
        return {str(key): tuple(int(d) for d in shape) for key, shape in tensors.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # missing or damaged: ask transformers again


def expected_tensors_from_transformers(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """:func:`expected_tensors` without the cache: builds the model on the meta device."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config_object(config))
    state = model.state_dict()
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    for key in tied:
        state.pop(key, None)
    try:  # transformers renames some keys when saving (GPT-NeoX: lm_head -> embed_out)
        from transformers.core_model_loading import revert_weight_conversion

        state = revert_weight_conversion(model, state)
    except ImportError:  # older transformers 5.x: names are saved as they are
        pass
    return {key: tuple(tensor.shape) for key, tensor in dict(state).items()}


def load_model(folder: Path, *, dtype: torch.dtype = torch.float32) -> Any:
    """``from_pretrained`` on a local folder, refusing missing or unexpected keys."""
    require_local_folder(folder, "HF folder")
    if not transformers_available():
        raise MapperError("verification needs transformers", hint="pip install 'transformers>=5,<6'")
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            str(folder), dtype=dtype, output_loading_info=True, local_files_only=True
        )
    except (OSError, ValueError) as error:
        raise CheckpointError(f"transformers cannot load this folder: {error}", where=folder) from None
    problems = {k: sorted(v) for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if problems:
        raise CheckpointError(
            f"transformers loaded the model with {problems}", where=folder,
            hint="the folder does not hold what its config.json describes; convert it again",
        )
    return model.eval()
