"""Loading pickles never runs code from them: refused up front, named, and nothing executed."""

from __future__ import annotations

import io
import sys
import types
from pathlib import Path
from types import ModuleType

import pytest
import torch

from mapper.errors import CheckpointError, UnsafeCheckpointError
from mapper.formats import HFCheckpoint, NeoXCheckpoint, safe_pickle
from mapper.formats.naming import layer_file_name, mp_rank_file_name
from mapper.tensors import bitwise_equal


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_a_hostile_pickle_is_refused_and_never_runs(
    tmp_path: Path, ck: ModuleType, marker: Path, legacy: bool
) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "x": ck.Hostile(marker)}, path, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(UnsafeCheckpointError, match="posix.system") as info:
        safe_pickle.load(path)
    assert str(path) in str(info.value)
    assert "weights_only=False" not in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_a_hostile_pickle_calling_open_is_refused_too(
    tmp_path: Path, ck: ModuleType, marker: Path, legacy: bool
) -> None:
    path = tmp_path / "evil.pt"
    torch.save(
        {"w": torch.ones(2), "x": ck.HostileOpen(marker)}, path, _use_new_zipfile_serialization=not legacy
    )
    with pytest.raises(UnsafeCheckpointError, match="open"):
        safe_pickle.load(path)


def test_hostile_checkpoints_are_refused_by_every_reader(
    tmp_path: Path, ck: ModuleType, marker: Path
) -> None:
    layer = ck.save_pipeline(tmp_path / "pipe", ck.neox_state(1))
    torch.save({"w": torch.ones(1), "x": ck.Hostile(marker)}, layer / layer_file_name(2, 0))
    with pytest.raises(UnsafeCheckpointError, match="layer_02-model_00"):
        NeoXCheckpoint(layer).manifest()

    seq = ck.save_sequential(tmp_path / "seq", ck.neox_state(1))
    torch.save(
        ck.training_state(1, {"sequential.2.w": torch.ones(1)}) | {"x": ck.Hostile(marker)},
        seq / mp_rank_file_name(0),
    )
    with pytest.raises(UnsafeCheckpointError, match="mp_rank_00"):
        NeoXCheckpoint(seq).manifest()

    hf = ck.save_hf(tmp_path / "hf", {"w": torch.ones(1)}, fmt="bin")
    torch.save({"w": torch.ones(1), "x": ck.Hostile(marker)}, hf / "pytorch_model.bin")
    with pytest.raises(UnsafeCheckpointError, match="pytorch_model.bin"):
        HFCheckpoint(hf)


def test_bytesio_extra_state_loads_but_a_disallowed_global_beside_it_is_refused(
    tmp_path: Path, ck: ModuleType, marker: Path
) -> None:
    fine = tmp_path / "fine.pt"
    torch.save({"mlp._extra_state": io.BytesIO(b"fp8"), "w": torch.ones(1)}, fine)
    assert safe_pickle.tensors_from_state(safe_pickle.load(fine), file=fine, what="t", notes=[])[
        "mlp._extra_state"
    ].tolist() == list(b"fp8")

    bad = tmp_path / "bad.pt"
    torch.save({"mlp._extra_state": io.BytesIO(b"fp8"), "x": ck.Hostile(marker)}, bad)
    with pytest.raises(UnsafeCheckpointError) as info:
        safe_pickle.load(bad)
    needs = info.value.message.split("which could run code")[0]
    assert "posix.system" in needs and "BytesIO" not in needs


def test_bytesio_anywhere_but_an_extra_state_key_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    torch.save({"w": torch.ones(1), "weight": io.BytesIO(b"x")}, folder / layer_file_name(2, 0))
    with pytest.raises(UnsafeCheckpointError, match="'weight'"):
        NeoXCheckpoint(folder).manifest()


def test_bytesio_nested_in_training_state_is_refused(tmp_path: Path, ck: ModuleType) -> None:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    state = ck.training_state(1, {"sequential.2.w": torch.ones(1)}) | {"blob": [io.BytesIO(b"x")]}
    torch.save(state, folder / mp_rank_file_name(0))
    with pytest.raises(UnsafeCheckpointError, match="BytesIO"):
        NeoXCheckpoint(folder).manifest()


def test_extra_state_bytes_are_never_unpickled(tmp_path: Path, ck: ModuleType, marker: Path) -> None:
    """FP8 metadata holding a hostile pickle is passed on as bytes, not run."""
    hostile_meta = io.BytesIO()
    torch.save(ck.Hostile(marker), hostile_meta)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    torch.save(
        {
            "mlp._extra_state": io.BytesIO(hostile_meta.getvalue()),
            "attention.qkv._extra_state": torch.frombuffer(
                bytearray(hostile_meta.getvalue()), dtype=torch.uint8
            ),
        },
        folder / layer_file_name(2, 0),
    )
    checkpoint = NeoXCheckpoint(folder)
    assert bytes(checkpoint.get("layer_02.mlp._extra_state@rank0").tolist()) == hostile_meta.getvalue()
    assert checkpoint.get("layer_02.attention.qkv._extra_state@rank0").numel() == len(hostile_meta.getvalue())


def test_training_state_classes_become_inert_stand_ins_that_run_nothing(
    tmp_path: Path, marker: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DeepSpeed's loss scaler (and argparse/numpy) load as records; their code never runs."""
    fake = types.ModuleType("deepspeed.runtime.fp16.loss_scaler")

    class DynamicLossScaler:
        def __init__(self) -> None:
            self.cur_scale = 65536.0

        def __setstate__(self, state: dict[str, object]) -> None:
            marker.write_text("ran")

    DynamicLossScaler.__module__ = fake.__name__
    DynamicLossScaler.__qualname__ = "DynamicLossScaler"
    fake.DynamicLossScaler = DynamicLossScaler  # type: ignore[attr-defined]
    for name in ("deepspeed", "deepspeed.runtime", "deepspeed.runtime.fp16", fake.__name__):
        monkeypatch.setitem(sys.modules, name, fake if name == fake.__name__ else types.ModuleType(name))
    path = tmp_path / mp_rank_file_name(0)
    torch.save({"module": None, "optimizer": {"loss_scaler": DynamicLossScaler()}}, path)
    monkeypatch.delitem(sys.modules, fake.__name__)

    with pytest.raises(UnsafeCheckpointError, match="DynamicLossScaler"):
        safe_pickle.load(path)  # not a training-state file: refused
    loaded = safe_pickle.load(path, training_state=True)
    scaler = loaded["optimizer"]["loss_scaler"]
    assert isinstance(scaler, safe_pickle.Inert)
    assert scaler.source == "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler"
    assert scaler.state == {"cur_scale": 65536.0}


def test_deepspeed_and_neox_training_state_loads_and_is_ignored(tmp_path: Path, ck: ModuleType) -> None:
    """numpy RNG state, argparse.Namespace, ds_config... beside the weights do not get in the way."""
    state = ck.neox_state(1)
    checkpoint = NeoXCheckpoint(ck.save_sequential(tmp_path / "ckpt", state))
    assert checkpoint.manifest() == ck.neox_manifest(state)


def test_an_inert_object_where_weights_belong_is_refused(tmp_path: Path) -> None:
    import argparse

    folder = tmp_path / "ckpt"
    folder.mkdir()
    torch.save({"module": {"sequential.2.w": argparse.Namespace(a=1)}}, folder / mp_rank_file_name(0))
    with pytest.raises(UnsafeCheckpointError, match="argparse.Namespace object where a tensor belongs"):
        NeoXCheckpoint(folder).manifest()


def test_the_process_allow_list_does_not_widen_the_policy(tmp_path: Path, marker: Path) -> None:
    import argparse

    path = tmp_path / "ns.pt"
    torch.save({"w": torch.ones(1), "ns": argparse.Namespace(a=1)}, path)
    with torch.serialization.safe_globals([argparse.Namespace]):
        with pytest.raises(UnsafeCheckpointError, match="argparse.Namespace"):
            safe_pickle.load(path)
        assert argparse.Namespace in torch.serialization.get_safe_globals()
    assert argparse.Namespace not in torch.serialization.get_safe_globals()


def test_loading_leaves_the_process_allow_list_as_it_was(tmp_path: Path, ck: ModuleType) -> None:
    before = set(torch.serialization.get_safe_globals())
    NeoXCheckpoint(ck.save_sequential(tmp_path / "ckpt", ck.neox_state(1))).manifest()
    assert set(torch.serialization.get_safe_globals()) == before


def test_bytes_stand_in_refuses_allocation_requests() -> None:
    assert safe_pickle.plain_bytes() == b""
    assert safe_pickle.plain_bytes("\xff", "latin1") == b"\xff"
    with pytest.raises(Exception, match="not how pickle encodes bytes"):
        safe_pickle.plain_bytes(10**12)


def test_a_corrupt_file_is_a_checkpoint_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.pt"
    torch.save({"w": torch.ones(100)}, path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError):
        safe_pickle.load(path)


def _same_as_torch(ours: object, theirs: object) -> None:
    """Structure, types, values and storage sharing as torch.load(mmap=True) gives them."""
    assert type(ours) is type(theirs)
    if isinstance(theirs, torch.Tensor):
        assert (ours.dtype, ours.shape, ours.stride(), ours.storage_offset()) == (
            theirs.dtype, theirs.shape, theirs.stride(), theirs.storage_offset())
        assert ours.requires_grad == theirs.requires_grad
        assert bitwise_equal(ours, theirs)
    elif isinstance(theirs, dict):
        assert list(ours) == list(theirs)
        for key in theirs:
            _same_as_torch(ours[key], theirs[key])
    elif isinstance(theirs, (list, tuple)):
        assert len(ours) == len(theirs)
        for a, b in zip(ours, theirs):
            _same_as_torch(a, b)
    else:
        assert ours == theirs


def test_one_unpickling_gives_what_torch_load_with_mmap_gives(tmp_path: Path) -> None:
    from collections import OrderedDict

    base = torch.arange(24, dtype=torch.bfloat16).view(4, 6)
    shared = [torch.ones(3), torch.zeros(0)]
    state = {
        "module": OrderedDict(w=base, row=base[1], col=base[:, 2], t=base.T, p=torch.nn.Parameter(torch.ones(2, 2))),
        "nested": {"tuple": (torch.full((2,), 7, dtype=torch.int64), 3, "text"), "list": shared, "again": shared},
        "flat": torch.tensor(5.0), "none": None,
    }
    path = tmp_path / "state.pt"
    torch.save(state, path)
    skeleton = safe_pickle.load_skeleton(path, safe_pickle.check_zip_records(path))
    assert safe_pickle.with_mapped_data(path, *skeleton) is not None  # not the fallback
    ours = safe_pickle.load(path)
    _same_as_torch(ours, torch.load(path, weights_only=True, mmap=True))
    module = ours["module"]
    assert module["row"].untyped_storage().data_ptr() == module["w"].untyped_storage().data_ptr()  # views stay views
    assert ours["nested"]["list"] is ours["nested"]["again"]  # one list held twice stays one list


def test_without_record_offsets_the_file_is_loaded_again_the_same(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "state.pt"
    torch.save({"w": torch.arange(6.0).view(2, 3)}, path)
    monkeypatch.setattr(safe_pickle, "_META_OFFSETS", False)
    assert safe_pickle.with_mapped_data(path, {}, {}) is None
    assert torch.equal(safe_pickle.load(path)["w"], torch.arange(6.0).view(2, 3))


def test_a_structure_nested_deeper_than_the_checks_look_is_loaded_by_torch(tmp_path: Path) -> None:
    nested: object = {"w": torch.ones(2)}
    for _ in range(80):
        nested = {"inner": nested}
    path = tmp_path / "deep.pt"
    torch.save(nested, path)
    skeleton = safe_pickle.load_skeleton(path, safe_pickle.check_zip_records(path))
    assert safe_pickle.with_mapped_data(path, *skeleton) is None  # not rebuilt: loaded again by torch
    loaded = safe_pickle.load(path)
    for _ in range(80):
        loaded = loaded["inner"]
    assert loaded["w"].device.type == "cpu" and torch.equal(loaded["w"], torch.ones(2))
