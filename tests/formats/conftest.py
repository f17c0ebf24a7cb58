"""Checkpoints built by the tests themselves: seeded tensors saved in the real layouts.

NeoX states are ``{(layer_idx, tp_rank): {key: tensor}}`` for a 2-layer TE model (layer 0
embedding, 2-3 transformer layers, 5 final norm, 6 final linear), with the dtypes a real
checkpoint mixes (bf16 weights, fp32 norms, uint8 ``_extra_state``, an fp16 tensor, an int64
buffer). Writers put them on disk the way DeepSpeed/NeoX do; HF folders are written with the
reference ``safetensors`` library and ``torch.save``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from mapper.formats.naming import layer_file_name, mp_rank_file_name, neox_key
from mapper.tensors import TensorMeta

NeoXState = dict[tuple[int, int], dict[str, torch.Tensor]]

HIDDEN = 8
VOCAB = 16
TRANSFORMER_LAYERS = (2, 3)
CONFIG_YAML = "num-layers: 2\nhidden-size: 8\nnum-attention-heads: 2\nattention-config: [[[global], 2]]\n"


def _randn(gen: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(dtype)


def neox_state(tp: int, seed: int = 0) -> NeoXState:
    """A small TE-style NeoX model split over ``tp`` ranks (deterministic for a seed)."""
    gen = torch.Generator().manual_seed(seed)
    state: NeoXState = {}
    for rank in range(tp):
        state[(0, rank)] = {"word_embeddings.weight": _randn(gen, VOCAB // tp, HIDDEN, dtype=torch.bfloat16)}
        for idx in TRANSFORMER_LAYERS:
            state[(idx, rank)] = {
                "input_layernorm.weight": _randn(gen, HIDDEN),
                "input_layernorm.bias": _randn(gen, HIDDEN),
                "attention.qkv.weight": _randn(gen, 3 * HIDDEN // tp, HIDDEN, dtype=torch.bfloat16),
                "attention.qkv.bias": _randn(gen, 3 * HIDDEN // tp, dtype=torch.bfloat16),
                "attention.qkv._extra_state": torch.empty(0, dtype=torch.uint8),
                "attention.core_attention._extra_state": torch.tensor([1, 2, 3], dtype=torch.uint8),
                "attention.proj.weight": _randn(gen, HIDDEN, HIDDEN // tp, dtype=torch.bfloat16),
                "attention.proj.bias": _randn(gen, HIDDEN, dtype=torch.float16),
                "attention.rotary_emb.inv_freq": _randn(gen, 2),
                "mlp.layer_norm_weight": _randn(gen, HIDDEN),
                "mlp.layer_norm_bias": _randn(gen, HIDDEN),
                "mlp.fc1_weight": _randn(gen, 4 * HIDDEN // tp, HIDDEN, dtype=torch.bfloat16),
                "mlp.fc2_weight": _randn(gen, HIDDEN, 4 * HIDDEN // tp, dtype=torch.bfloat16),
                "mlp._extra_state": torch.empty(0, dtype=torch.uint8),
                "position_ids": torch.arange(4, dtype=torch.int64),
            }
        state[(5, rank)] = {"norm.weight": _randn(gen, HIDDEN), "norm.bias": _randn(gen, HIDDEN)}
        state[(6, rank)] = {"final_linear.weight": _randn(gen, VOCAB // tp, HIDDEN, dtype=torch.bfloat16)}
    return state


def neox_names(state: NeoXState) -> dict[str, torch.Tensor]:
    """The state under mapper's NeoX key namespace."""
    return {neox_key(idx, key, rank): t for (idx, rank), keys in state.items() for key, t in keys.items()}


def neox_manifest(state: NeoXState) -> dict[str, TensorMeta]:
    return {name: TensorMeta.of(t) for name, t in neox_names(state).items()}


def training_state(tp: int, module: object) -> dict[str, object]:
    """An mp_rank file's content as DeepSpeed + NeoX save it (training state beside the model)."""
    return {
        "module": module,
        "buffer_names": ["attention.rotary_emb.inv_freq"],
        "optimizer": None,
        "lr_scheduler": {"num_iters": 10, "start_lr": 0.0006},
        "sparse_tensor_module_names": set(),
        "skipped_steps": 0,
        "global_steps": 10,
        "global_samples": 80,
        "dp_world_size": 1,
        "mp_world_size": tp,
        "ds_config": {"train_batch_size": 8, "bf16": {"enabled": True}},
        "ds_version": "0.14.0",
        "iteration": 10,
        "args": {"num_layers": 2, "hidden_size": HIDDEN},
        "random_rng_state": (3, tuple(range(5)), None),
        "np_rng_state": np.random.RandomState(0).get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "old_megatron_args": argparse.Namespace(num_layers=2),
    }


def save_pipeline(
    folder: Path, state: NeoXState, *, mp_rank_files: bool = True, legacy: bool = False
) -> Path:
    """The pipeline layout: one file per (layer, rank), mp_rank files with module=None."""
    folder.mkdir(parents=True, exist_ok=True)
    for (idx, rank), tensors in state.items():
        torch.save(
            dict(tensors), folder / layer_file_name(idx, rank), _use_new_zipfile_serialization=not legacy
        )
    if mp_rank_files:
        tp = 1 + max(rank for _, rank in state)
        for rank in range(tp):
            torch.save(training_state(tp, None), folder / mp_rank_file_name(rank))
    return folder


def save_sequential(folder: Path, state: NeoXState, *, legacy: bool = False) -> Path:
    """The sequential layout: one mp_rank file per rank with module = {sequential.idx.key: t}."""
    folder.mkdir(parents=True, exist_ok=True)
    tp = 1 + max(rank for _, rank in state)
    for rank in range(tp):
        module = {
            f"sequential.{idx}.{key}": t
            for (idx, r), keys in state.items()
            if r == rank
            for key, t in keys.items()
        }
        torch.save(
            training_state(tp, module),
            folder / mp_rank_file_name(rank),
            _use_new_zipfile_serialization=not legacy,
        )
    return folder


def save_neox_root(
    root: Path, state: NeoXState, *, layout: str = "pipeline", tag: str = "global_step10"
) -> Path:
    """A save folder as NeoX leaves it: ``latest``, ``<tag>/`` with the files and ``configs/``."""
    folder = root / tag
    if layout == "pipeline":
        save_pipeline(folder, state)
    else:
        save_sequential(folder, state)
    (folder / "configs").mkdir()
    (folder / "configs" / "model.yml").write_text(CONFIG_YAML)
    (root / "latest").write_text(tag)
    return root


def hf_state(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "gpt_neox.embed_in.weight": _randn(gen, VOCAB, HIDDEN, dtype=torch.bfloat16),
        "gpt_neox.layers.0.attention.query_key_value.weight": _randn(
            gen, 3 * HIDDEN, HIDDEN, dtype=torch.float16
        ),
        "gpt_neox.layers.0.attention.query_key_value.bias": _randn(gen, 3 * HIDDEN),
        "gpt_neox.layers.2.mlp.dense_h_to_4h.weight": _randn(gen, 4 * HIDDEN, HIDDEN),
        "gpt_neox.layers.10.mlp.dense_h_to_4h.weight": _randn(gen, 4 * HIDDEN, HIDDEN),
        "gpt_neox.layers.0.attention.masked_bias": torch.tensor(-1e9),
        "position_ids": torch.arange(6, dtype=torch.int64),
        "embed_out.weight": _randn(gen, VOCAB, HIDDEN, dtype=torch.bfloat16),
    }


HF_CONFIG = {"model_type": "gpt_neox", "hidden_size": HIDDEN, "vocab_size": VOCAB}


def save_hf(
    folder: Path,
    tensors: Mapping[str, torch.Tensor],
    *,
    shards: int = 1,
    fmt: str = "safetensors",
    legacy: bool = False,
) -> Path:
    """A HF folder written with the reference libraries (safetensors / torch.save) and an index."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(HF_CONFIG))
    keys = sorted(tensors)
    groups = [keys[i::shards] for i in range(shards)]
    stem, ext = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")
    weight_map: dict[str, str] = {}
    for i, group in enumerate(groups):
        name = f"{stem}.{ext}" if shards == 1 else f"{stem}-{i + 1:05d}-of-{shards:05d}.{ext}"
        part = {k: tensors[k].contiguous() for k in group}
        if fmt == "safetensors":
            save_file(part, str(folder / name), metadata={"format": "pt"})
        else:
            torch.save(part, folder / name, _use_new_zipfile_serialization=not legacy)
        weight_map.update({k: name for k in group})
    if shards > 1:
        index = {
            "metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
            "weight_map": weight_map,
        }
        (folder / f"{stem}.{ext}.index.json").write_text(json.dumps(index))
    return folder


def assert_same_tensors(got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor]) -> None:
    """Same keys, dtypes, shapes and bytes (bit-exact, NaN-safe)."""
    assert sorted(got) == sorted(want)
    for key, expected in want.items():
        actual = got[key]
        assert actual.dtype == expected.dtype, key
        assert actual.shape == expected.shape, key
        assert (
            actual.contiguous()
            .reshape(-1)
            .view(torch.uint8)
            .equal(expected.contiguous().reshape(-1).view(torch.uint8))
        ), key


def read_all(source: object) -> dict[str, torch.Tensor]:
    return {key: source.get(key) for key in source.manifest()}  # type: ignore[attr-defined]


def bytes_read() -> int:
    """Bytes this process has read with read(2) and friends so far (Linux ``/proc/self/io``)."""
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    raise RuntimeError("no rchar in /proc/self/io")


def dead_pid() -> int:
    """The pid of a process that has exited (a child we started and reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def hidden_entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="session")
def ck() -> ModuleType:
    """This module: the builders and assertions above, for the tests to call."""
    return sys.modules[__name__]


@pytest.fixture
def marker(tmp_path: Path) -> Iterator[Path]:
    """A file that a hostile pickle would create; tests assert it never appears."""
    path = tmp_path / "PWNED"
    yield path
    assert not path.exists(), "a pickle ran code"


class Hostile:
    """Pickles to a call of ``os.system`` creating ``self.path`` when unpickled."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.path}",)


class HostileOpen:
    """Pickles to ``builtins.open(path, 'w')``: creates the file if run, even from a thread."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return open, (str(self.path), "w")


def bytesio(data: bytes) -> io.BytesIO:
    return io.BytesIO(data)


@pytest.fixture
def kernel_copies(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes of the byte ranges written file to file (``AtomicFile.copy_range``), in order."""
    from mapper.formats.output import AtomicFile

    copied: list[int] = []
    original = AtomicFile.copy_range

    def counting(self: AtomicFile, path: Path, offset: int, nbytes: int) -> int:
        copied.append(nbytes)
        return original(self, path, offset, nbytes)

    monkeypatch.setattr(AtomicFile, "copy_range", counting)
    return copied
