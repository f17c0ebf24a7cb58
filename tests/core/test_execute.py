"""execute streams group by group: inputs are freed after their one consumer, lossy ops fill the sidecar."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

import mapper
from mapper.engine import execute, part_groups
from mapper.errors import ConversionError
from mapper.spec import load_rule_text
from mapper.tensors import DictSink, LazyConcat, TensorMeta

RULES = """\
schema_version: 1
name: stream
version: 1.0.0
description: merge TP shards layer by layer
source: neox
target: hf
parameters: {num_layers: {}, tp: {default: 2}}
placeholders: {i: num_layers, r: tp}
rules:
  - fuse: {from: "layer_{i+2:02d}.w@rank{r}", over: r, to: "layers.{i}.w"}
  - fuse: {from: "layer_{i+2:02d}.b@rank{r}", over: r, mode: sum, to: "layers.{i}.b"}
  - split: {from: "layer_{i+2:02d}.qkv@rank{r}", to: ["layers.{i}.q@rank{r}", "layers.{i}.kv@rank{r}"], sizes: [4, 8]}
  - fuse: {from: "layers.{i}.q@rank{r}", over: r, to: "layers.{i}.q"}
  - fuse: {from: "layers.{i}.kv@rank{r}", over: r, to: "layers.{i}.kv"}
  - drop: {from: "layer_{i+2:02d}._extra_state@rank{r}", restore: {shape: [0], dtype: uint8}}
"""


class FreshSource:
    """Makes every tensor on demand (as a memory-mapped reader would) and tracks which are alive."""

    def __init__(self, layers: int, width: int = 64, extra: bytes = b""):
        self.layers, self.width, self.extra = layers, width, extra
        self.alive: list[tuple[str, weakref.ref]] = []

    def _shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        out = {}
        for i in range(self.layers):
            for r in range(2):
                p = f"layer_{i + 2:02d}"
                out[f"{p}.w@rank{r}"] = ((self.width, self.width), torch.float32)
                out[f"{p}.b@rank{r}"] = ((self.width,), torch.float32)
                out[f"{p}.qkv@rank{r}"] = ((12, self.width), torch.float32)
                out[f"{p}._extra_state@rank{r}"] = ((len(self.extra),), torch.uint8)
        return out

    def manifest(self):
        return {k: TensorMeta(s, d) for k, (s, d) in self._shapes().items()}

    def get(self, key: str) -> torch.Tensor:
        shape, dtype = self._shapes()[key]
        if dtype == torch.uint8:
            tensor = torch.tensor(list(self.extra), dtype=torch.uint8)
        else:
            seed = sum(map(ord, key))
            tensor = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
        self.alive.append((key, weakref.ref(tensor)))
        return tensor

    def live_keys(self) -> list[str]:
        gc.collect()
        return [k for k, ref in self.alive if ref() is not None]


class LayerSink(DictSink):
    """One output file per layer; records which source tensors were alive at each write."""

    def __init__(self, source: FreshSource):
        super().__init__()
        self.source = source
        self.alive_at_write: list[list[str]] = []

    def groups(self, manifest):
        layers = sorted({k.split(".")[1] for k in manifest}, key=int)
        return [[k for k in manifest if k.split(".")[1] == layer] for layer in layers]

    def write_group(self, index, tensors):
        self.alive_at_write.append(self.source.live_keys())
        super().write_group(index, tensors)


@pytest.fixture
def rules():
    return load_rule_text(RULES)


def test_source_tensors_are_freed_after_their_group(rules):
    source = FreshSource(layers=4)
    sink = LayerSink(source)
    execute(mapper.compile(rules, source, {"num_layers": 4}), source, sink)
    assert len(sink.alive_at_write) == 4
    for layer, alive in enumerate(sink.alive_at_write):
        # nothing from another layer is alive when a layer's file is written
        assert all(k.startswith(f"layer_{layer + 2:02d}.") for k in alive), alive


def test_peak_memory_follows_the_largest_group_not_the_model(rules):
    peaks = []
    for layers in (2, 4, 8):
        source = FreshSource(layers)
        plan = mapper.compile(rules, source, {"num_layers": layers})
        report = execute(plan, source, LayerSink(source))
        peaks.append(report.peak_live_bytes)
        assert report.peak_live_bytes <= 2 * report.largest_group_bytes
        assert report.peak_live_bytes <= plan.peak_bytes(LayerSink(source).groups(plan.target_manifest))
    assert peaks[0] == peaks[1] == peaks[2]


def test_lossy_rules_keep_only_what_their_inverse_cannot_restore(rules):
    source = FreshSource(layers=2, extra=b"\x01\x02fp8")
    result = mapper.convert(rules, source, {"num_layers": 2})
    entries = sorted(result.sidecar.entries)
    # FP8 bytes are not the empty default; random per-rank biases are not an even share of their sum
    assert "stream#5:layer_02._extra_state@rank0" in entries
    assert "stream#1:layer_02.b@rank0" in entries
    back = mapper.convert(rules.invert(), result.tensors, {"num_layers": 2}, sidecar=result.sidecar)
    assert bytes(back.tensors["layer_03._extra_state@rank1"].tolist()) == b"\x01\x02fp8"
    assert torch.equal(back.tensors["layer_02.b@rank1"], source.get("layer_02.b@rank1"))
    assert len(back.report.restored) == len(entries)


def test_without_the_sidecar_the_declared_defaults_apply(rules):
    source = FreshSource(layers=1, extra=b"\x07")
    result = mapper.convert(rules, source, {"num_layers": 1})
    back = mapper.convert(rules.invert(), result.tensors, {"num_layers": 1})
    assert back.tensors["layer_02._extra_state@rank0"].shape == (0,)
    total = result.tensors["layers.0.b"]
    assert torch.equal(back.tensors["layer_02.b@rank0"] + back.tensors["layer_02.b@rank1"], total)


def test_a_stale_sidecar_entry_is_not_used(rules):
    source = FreshSource(layers=1)
    result = mapper.convert(rules, source, {"num_layers": 1})
    edited = dict(result.tensors)
    edited["layers.0.b"] = edited["layers.0.b"] + 1.0  # the HF model was fine-tuned
    with pytest.warns(UserWarning, match="no longer matches"):
        back = mapper.convert(rules.invert(), edited, {"num_layers": 1}, sidecar=result.sidecar)
    assert back.report.stale == ["stream#1:layer_02.b@rank0"]
    assert torch.allclose(back.tensors["layer_02.b@rank0"] * 2, edited["layers.0.b"])


def test_parts_split_the_work_and_together_write_everything_once(rules):
    source = FreshSource(layers=5)
    plan = mapper.compile(rules, source, {"num_layers": 5})
    whole = LayerSink(source)
    execute(plan, source, whole)
    written: dict[str, torch.Tensor] = {}
    sidecar_entries: set[str] = set()
    for part in range(1, 4):
        sink = LayerSink(source)
        report = execute(plan, source, sink, part=(part, 3))
        assert not set(sink.tensors) & set(written)
        written.update(sink.tensors)
        sidecar_entries |= set(report.sidecar.entries)
    assert sorted(written) == sorted(whole.tensors)
    assert all(torch.equal(written[k], whole.tensors[k]) for k in written)
    assert [list(part_groups(5, (p, 3))) for p in (1, 2, 3)] == [[0], [1, 2], [3, 4]]
    with pytest.raises(mapper.MapperError, match="part 4/3 does not exist"):
        part_groups(5, (4, 3))


def test_casting_refuses_overflow_and_names_the_tensor(rules):
    state = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in FreshSource(1).manifest().items()}
    state["layer_02.w@rank1"][0, 0] = 1e6
    with pytest.raises(ConversionError, match=r"float16 overflows to inf for 1 value") as caught:
        mapper.convert(rules, state, {"num_layers": 1}, dtype=torch.float16)
    assert caught.value.where == "layers.0.w"
    ok = mapper.convert(rules, {**state, "layer_02.w@rank1": torch.zeros(64, 64)}, {"num_layers": 1},
                        dtype=torch.bfloat16)
    assert ok.tensors["layers.0.w"].dtype == torch.bfloat16
    assert ok.tensors["layers.0.q"].dtype == torch.bfloat16


class StreamingSink(DictSink):
    """A sink that writes values part by part, as the HF and NeoX writers do."""

    writes_lazy = True


def test_a_streaming_sink_gets_concatenations_unmade_and_others_get_tensors(rules):
    source = FreshSource(1)
    state = {k: source.get(k) for k in source.manifest()}
    renamed = load_rule_text(RULES.replace(
        '  - drop:', '  - rename: {from: "layers.{i}.w", to: "layers.{i}.weight"}\n  - drop:'))
    sink = StreamingSink()
    mapper.convert(renamed, state, {"num_layers": 1}, sink=sink)
    weight = sink.tensors["layers.0.weight"]  # a fuse, then a rename (which passes it through)
    assert isinstance(weight, LazyConcat) and weight.parts[0] is state["layer_02.w@rank0"]
    assert torch.equal(weight.materialize(), torch.cat([state["layer_02.w@rank0"], state["layer_02.w@rank1"]]))
    assert isinstance(sink.tensors["layers.0.b"], torch.Tensor)  # a sum is computed
    plain = mapper.convert(renamed, state, {"num_layers": 1}).tensors
    assert isinstance(plain["layers.0.weight"], torch.Tensor)  # any other sink gets the tensor
    assert torch.equal(plain["layers.0.weight"], weight.materialize())


def test_a_split_of_a_merge_gets_views_of_the_parts_when_re_sharding():
    """TP 2 -> 4: the merge is never made; each new shard views half of one old rank."""
    text = RULES.replace('  - drop:', '  - split: {from: "layers.{i}.w", to: "layers.{i}.w@new{n}", over: n}\n  - drop:')
    text = text.replace("placeholders: {i: num_layers, r: tp}", "placeholders: {i: num_layers, r: tp, n: new_tp}")
    text = text.replace("tp: {default: 2}}", "tp: {default: 2}, new_tp: {default: 4}}")
    source = FreshSource(1)
    state = {k: source.get(k) for k in source.manifest()}
    sink = StreamingSink()
    mapper.convert(load_rule_text(text), state, {"num_layers": 1}, sink=sink)
    merged = torch.cat([state["layer_02.w@rank0"], state["layer_02.w@rank1"]])
    for n, expected in enumerate(merged.chunk(4)):
        shard = sink.tensors[f"layers.0.w@new{n}"]
        assert isinstance(shard, LazyConcat) and len(shard.parts) == 1
        assert shard.parts[0].untyped_storage().data_ptr() == state[f"layer_02.w@rank{n // 2}"].untyped_storage().data_ptr()
        assert torch.equal(shard.materialize(), expected)


@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("sizes", [[48], [5, 43], [16, 16, 16], [20, 4, 24], [1] * 48])
def test_cutting_an_unmade_concatenation_gives_what_splitting_the_made_one_gives(dim, sizes):
    gen = torch.Generator().manual_seed(dim)
    parts = [torch.randn(10 if dim else n, n if dim else 10, generator=gen) for n in (12, 30, 6)]
    lazy = LazyConcat(parts, dim)
    made = torch.cat(parts, dim)
    for piece, expected in zip(lazy.split(sizes), torch.split(made, sizes, dim), strict=True):
        assert piece.shape == expected.shape and torch.equal(piece.materialize(), expected)
        assert torch.equal(torch.cat([c.clone() for c in piece.chunks(64)]).view(-1), expected.contiguous().view(-1))


def test_an_op_after_a_concatenation_gets_the_real_tensor():
    text = RULES.replace('  - drop:', '  - transpose: {from: "layers.{i}.w", to: "layers.{i}.wt"}\n  - drop:')
    source = FreshSource(1)
    state = {k: source.get(k) for k in source.manifest()}
    sink = StreamingSink()
    mapper.convert(load_rule_text(text), state, {"num_layers": 1}, sink=sink)
    expected = torch.cat([state["layer_02.w@rank0"], state["layer_02.w@rank1"]]).T
    assert isinstance(sink.tensors["layers.0.wt"], torch.Tensor)
    assert torch.equal(sink.tensors["layers.0.wt"], expected)


def test_torch_runs_on_one_thread_while_converting_and_as_before_afterwards(rules):
    seen: list[int] = []

    class Watching(DictSink):
        def write_group(self, index, tensors):
            seen.append(torch.get_num_threads())
            super().write_group(index, tensors)

    source = FreshSource(2)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        mapper.convert(rules, {k: source.get(k) for k in source.manifest()}, {"num_layers": 2}, sink=Watching(group_size=1))
        assert len(seen) > 1 and set(seen) == {1} and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_a_cast_checks_every_block_and_counts_across_them(monkeypatch, rules):
    from mapper.ops import arith

    monkeypatch.setattr(arith, "BLOCK", 100)
    state = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in FreshSource(1).manifest().items()}
    state["layer_02.w@rank0"].view(-1)[[5, 950, 3000]] = torch.tensor([1e6, -1e6, 7e5])
    state["layer_02.w@rank1"].view(-1)[[10, 20]] = torch.tensor([float("inf"), float("nan")])  # fine
    with pytest.raises(ConversionError, match=r"overflows to inf for 3 value\(s\) \(largest \|x\| = 1e\+06\)"):
        mapper.convert(rules, state, {"num_layers": 1}, dtype=torch.float16)
    state["layer_02.w@rank0"].zero_()
    out = mapper.convert(rules, state, {"num_layers": 1}, dtype=torch.float16).tensors["layers.0.w"]
    assert torch.isinf(out.view(-1)[64 * 64 + 10]) and torch.isnan(out.view(-1)[64 * 64 + 20])
