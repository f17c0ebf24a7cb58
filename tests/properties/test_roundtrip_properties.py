"""Property: for any rule set and any state dict it fits, inverse(apply(S)) == S, bit for bit.

Rule sets are random chains of every op over random shapes and dtypes (bf16, fp16, fp32, int64,
uint8), with tensor-parallel shards fused and split over a ``{r}`` placeholder and layers over
``{i}``. Data includes NaN (with odd payloads and signs), inf, -0.0, subnormals and the largest
finite values (which a scale by 2 overflows), so "equal" means equal bytes; affine scales include
powers of two (computed in the tensor's dtype) and the integer expression ``tp``. Lossy ops are
restored from the sidecar the forward conversion wrote. A second property runs the arithmetic in
blocks of a few elements, so a block boundary falls anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from unittest.mock import patch

import pytest
import torch
import yaml
from hypothesis import assume, given
from hypothesis import strategies as st

import mapper
from mapper.errors import CompileError
from mapper.ops import OPS_BY_NAME, OpContext, ShapeError, arith, bitwise_equal
from mapper.spec import dump_rule_set, load_rule_text
from mapper.tensors import TensorMeta

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8]
SIZES = [1, 2, 3, 4, 6, 8]


@dataclass
class Entry:
    """A live tensor family member: its key stem, metadata, and how it is spread over ranks."""

    stem: str
    meta: TensorMeta
    sharded: bool  # one tensor per rank, key '...@rank{r}'
    uniform: bool  # all ranks hold identical data (needed for a replicated fuse)


@dataclass
class Family:
    entries: list[Entry]
    rules: list[dict] = field(default_factory=list)
    counter: int = 0

    def new_stem(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}s{self.counter}"


def key(entry: Entry) -> str:
    return f"{entry.stem}.l{{i}}" + ("@rank{r}" if entry.sharded else "")


def infer(op_name: str, fields: dict, metas: list[TensorMeta], tp: int) -> list[TensorMeta] | None:
    """The engine's own shape rule, to keep generated chains valid."""
    op = OPS_BY_NAME[op_name].model_validate(fields)
    try:
        return op.infer(metas, OpContext({"tp": tp, "num_layers": 1}, {"r": tp, "i": 1}))
    except ShapeError:
        return None


@st.composite
def chain_step(draw: st.DrawFn, family: Family, prefix: str, tp: int) -> None:
    """Append one random, valid rule to a family and update its live entries."""
    entry_index = draw(st.integers(0, len(family.entries) - 1))
    entry = family.entries[entry_index]
    meta, ndim = entry.meta, len(entry.meta.shape)
    is_float = meta.dtype.is_floating_point
    choices = ["rename", "slice", "pad", "drop", "split"]
    if ndim >= 2:
        choices += ["transpose", "flatten"]
    choices += ["unflatten"]
    if is_float:
        choices += ["affine"]
    choices += ["gather"] * 4 if entry.sharded else (["scatter"] * 2 if tp > 1 else [])
    kind = draw(st.sampled_from(choices))
    out = replace(entry, stem=family.new_stem(prefix))
    src = key(entry)

    def emit(op: str, fields: dict, new_entries: list[Entry]) -> None:
        family.rules.append({op: fields})
        family.entries[entry_index : entry_index + 1] = new_entries

    dim = draw(st.integers(0, max(ndim - 1, 0)))
    if kind == "rename":
        emit("rename", {"from": src, "to": key(out)}, [out])
    elif kind == "transpose":
        dims = draw(st.lists(st.integers(0, ndim - 1), min_size=2, max_size=2, unique=True))
        fields = {"from": src, "to": key(out), "dims": dims}
        (new,) = infer("transpose", fields, [meta], tp)
        emit("transpose", fields, [replace(out, meta=new)])
    elif kind == "unflatten":
        size = meta.shape[dim] if ndim else 1
        if size == 0:
            return
        divisors = [d for d in range(1, size + 1) if size % d == 0]
        first = draw(st.sampled_from(divisors))
        sizes: list = [first, size // first]
        if draw(st.booleans()):
            sizes[draw(st.integers(0, 1))] = -1
        if draw(st.booleans()):
            sizes = [f"{s} * 1" if s != -1 else s for s in sizes]  # expressions are fine too
        if ndim == 0:
            return
        fields = {"from": src, "to": key(out), "dim": dim, "sizes": sizes}
        (new,) = infer("unflatten", fields, [meta], tp)
        emit("unflatten", fields, [replace(out, meta=new)])
    elif kind == "flatten":
        dim = draw(st.integers(0, ndim - 2))
        sizes = list(meta.shape[dim : dim + 2])
        if draw(st.booleans()):
            sizes[draw(st.integers(0, 1))] = -1
        fields = {"from": src, "to": key(out), "dim": dim, "sizes": sizes}
        (new,) = infer("flatten", fields, [meta], tp)
        emit("flatten", fields, [replace(out, meta=new)])
    elif kind == "affine":
        fields = {
            "from": src, "to": key(out),
            "scale": draw(st.sampled_from([1.0, 2.0, 0.5, 4.0, 0.25, -2.0, -3.0, 0.1, "tp"])),
            "offset": draw(st.sampled_from([0.0, 1.0, -0.25, 1e-3])),
        }
        emit("affine", fields, [out])
    elif kind in ("slice", "pad"):
        size = meta.shape[dim]
        if kind == "slice":
            keep, total = draw(st.integers(0, size)), size
        else:
            keep, total = size, size + draw(st.integers(0, 3))
        fields = {"from": src, "to": key(out), "dim": dim, "keep": keep, "total": total}
        if kind == "pad" or draw(st.booleans()):
            fields["fill"] = draw(st.sampled_from([0.0, 1.0]))
        (new,) = infer(kind, fields, [meta], tp)
        emit(kind, fields, [replace(out, meta=new)])
    elif kind == "drop":
        fields: dict = {"from": src}
        if draw(st.booleans()):
            fields["restore"] = {"shape": list(meta.shape), "dtype": str(meta.dtype).removeprefix("torch."),
                                 "fill": draw(st.sampled_from([0.0, 1.0]))}
        emit("drop", fields, [])
    elif kind == "split":
        size = meta.shape[dim]
        if size < 2:
            return
        parts = draw(st.integers(2, min(3, size)))
        cuts = sorted(draw(st.lists(st.integers(1, size - 1), min_size=parts - 1, max_size=parts - 1, unique=True)))
        sizes = [b - a for a, b in zip([0] + cuts, cuts + [size])]
        outs = [replace(out, stem=family.new_stem(prefix)) for _ in sizes]
        fields = {"from": src, "to": [key(o) for o in outs], "dim": dim, "sizes": sizes}
        news = infer("split", fields, [meta], tp)
        assert news is not None
        outs = [replace(o, meta=m) for o, m in zip(outs, news)]
        if draw(st.booleans()):  # fuse the parts straight back, maybe in another order
            order = draw(st.permutations(range(len(outs))))
            back = replace(out, stem=family.new_stem(prefix))
            family.rules.append({"split": fields})
            fuse = {"from": [key(outs[k]) for k in order], "to": key(back), "dim": dim,
                    "sizes": [sizes[k] for k in order]}
            (new,) = infer("fuse", fuse, [outs[k].meta for k in order], tp)
            family.rules.append({"fuse": fuse})
            family.entries[entry_index : entry_index + 1] = [replace(back, meta=new)]
        else:
            emit("split", fields, outs)
    elif kind == "gather":
        modes = ["concat"] + (["replicated"] if entry.uniform else []) + (["sum"] if is_float else [])
        mode = draw(st.sampled_from(modes))
        new_out = replace(out, sharded=False, uniform=True)
        fields = {"from": src, "to": key(new_out), "over": "r", "mode": mode}
        if mode == "concat":
            fields["dim"] = dim
        (new,) = infer("fuse", fields, [meta] * tp, tp)
        emit("fuse", fields, [replace(new_out, meta=new)])
    elif kind == "scatter":
        modes = (["concat"] if meta.shape[dim] % tp == 0 else []) + ["replicated"] + (["sum"] if is_float else [])
        mode = draw(st.sampled_from(modes))
        new_out = replace(out, sharded=True, uniform=mode != "concat")
        fields = {"from": src, "to": key(new_out), "over": "r", "mode": mode}
        if mode == "concat":
            fields["dim"] = dim
        news = infer("split", fields, [meta], tp)
        emit("split", fields, [replace(new_out, meta=news[0])])


def random_tensor(meta: TensorMeta, generator: torch.Generator) -> torch.Tensor:
    """Random values with special ones sprinkled into floats at random places: NaN, inf, -0.0, a
    subnormal, the largest finite values, and (16-bit formats) a negative NaN with an odd payload.
    Equality must be bitwise."""
    if meta.dtype.is_floating_point:
        t = (torch.randn(meta.shape, generator=generator) * 3).to(meta.dtype)
        flat = t.view(-1)
        info = torch.finfo(meta.dtype)
        specials = [float("nan"), float("inf"), -0.0, info.smallest_normal / 4, info.max, -info.max]
        places = torch.randperm(flat.numel(), generator=generator).tolist()
        for place, value in zip(places, specials[: flat.numel() // 2]):
            flat[place] = value
        if meta.dtype.itemsize == 2 and flat.numel() > 2 * len(specials):
            odd_nan = {torch.bfloat16: 0xFF81, torch.float16: 0xFC01}[meta.dtype] - 0x10000
            flat.view(torch.int16)[places[len(specials)]] = odd_nan
        return t
    high = 256 if meta.dtype == torch.uint8 else 2**40
    return torch.randint(0, high, meta.shape, generator=generator, dtype=torch.int64).to(meta.dtype)


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[str, dict[str, torch.Tensor], dict[str, int]]:
    """A rule file (YAML text) and a state dict it fits."""
    tp = draw(st.sampled_from([1, 2, 4]))
    layers = draw(st.integers(1, 2))
    sources: list[Entry] = []
    rules: list[dict] = []
    for n in range(draw(st.integers(1, 3))):
        shape = tuple(draw(st.lists(st.sampled_from(SIZES), min_size=1, max_size=3)))
        dtype = draw(st.sampled_from(DTYPES))
        sharded = tp > 1 and draw(st.booleans())
        entry = Entry(f"f{n}", TensorMeta(shape, dtype), sharded, uniform=not sharded or draw(st.booleans()))
        family = Family([entry])
        for _ in range(draw(st.integers(1, 5))):
            if not family.entries:
                break
            draw(chain_step(family, f"f{n}", tp))
        if family.rules:
            sources.append(entry)
            rules.extend(family.rules)
    assume(rules)
    document = {
        "schema_version": 1, "name": "random", "version": "0.0.1", "description": "generated",
        "source": "a", "target": "b",
        "parameters": {"tp": {"default": tp}, "num_layers": {"default": layers}},
        "placeholders": {"i": "num_layers", "r": "tp"},
        "rules": rules,
    }
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    state: dict[str, torch.Tensor] = {}
    for entry in sources:
        for i in range(layers):
            shared = random_tensor(entry.meta, generator)
            for r in range(tp if entry.sharded else 1):
                tensor = shared if entry.uniform else random_tensor(entry.meta, generator)
                name = key(entry).replace("{i}", str(i)).replace("{r}", str(r))
                state[name] = tensor.clone()
    return yaml.safe_dump(document, sort_keys=False), state, {"tp": tp, "num_layers": layers}


def assert_bitwise_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, name
        assert bitwise_equal(actual[name], tensor), name


@given(scenarios())
def test_inverse_of_apply_is_identity_bit_for_bit(scenario):
    text, state, _ = scenario
    rules = load_rule_text(text)
    forward = mapper.convert(rules, state)
    back = mapper.convert(rules.invert(), forward.tensors, sidecar=forward.sidecar)
    assert_bitwise_same(back.tensors, state)


@given(scenarios(), st.integers(1, 9))
def test_the_round_trip_holds_whatever_the_block_size(scenario, block):
    text, state, _ = scenario
    rules = load_rule_text(text)
    with patch.object(arith, "BLOCK", block):
        forward = mapper.convert(rules, state)
        back = mapper.convert(rules.invert(), forward.tensors, sidecar=forward.sidecar)
    assert_bitwise_same(back.tensors, state)


@given(scenarios())
def test_rule_sets_serialise_stably_and_invert_twice_to_themselves(scenario):
    text, state, _ = scenario
    rules = load_rule_text(text)
    for fmt in ("yaml", "json"):
        assert load_rule_text(dump_rule_set(rules, fmt=fmt)) == rules
    assert rules.invert().invert() == rules
    assert load_rule_text(dump_rule_set(rules.invert())) == rules.invert()
    plan = mapper.compile(rules, state)
    again = mapper.compile(load_rule_text(dump_rule_set(rules)), state)
    assert plan.explain() == again.explain()


@given(scenarios(), st.data())
def test_a_duplicated_target_is_rejected(scenario, data):
    text, state, _ = scenario
    document = yaml.safe_load(text)
    rule = data.draw(st.sampled_from(document["rules"]))
    document["rules"].append(rule)  # the same rule again: its inputs are gone, or its outputs collide
    rules = load_rule_text(yaml.safe_dump(document))
    with pytest.raises(CompileError) as caught:
        mapper.compile(rules, state)
    assert any(m in str(caught.value) for m in ("produced twice", "matched no key", "missing"))


@given(scenarios(), st.data())
def test_an_unconsumed_source_key_is_rejected(scenario, data):
    text, state, _ = scenario
    extra = data.draw(st.sampled_from(sorted(state)))
    state = {**state, "stray." + extra: state[extra]}
    with pytest.raises(CompileError) as caught:
        mapper.compile(load_rule_text(text), state)
    assert f"stray.{extra}: no rule consumes this tensor" in str(caught.value)


@given(scenarios(), st.data())
def test_a_shape_that_does_not_fit_is_rejected(scenario, data):
    text, state, _ = scenario
    name = data.draw(st.sampled_from(sorted(state)))
    tensor = state[name]
    grown = torch.zeros((*tensor.shape[:-1], tensor.shape[-1] + 7), dtype=tensor.dtype)
    rules = load_rule_text(text)
    try:
        mapper.compile(rules, {**state, name: grown})
    except CompileError:
        return
    # A few chains are shape-agnostic (rename, replicate, sum, drop without restore):
    # then the shape must simply flow through and the round trip still holds.
    altered = {**state, name: grown}
    for other in [k for k in state if k != name and k.split("@")[0] == name.split("@")[0]]:
        altered[other] = torch.zeros_like(grown)
    try:
        forward = mapper.convert(rules, altered)
    except (CompileError, mapper.ConversionError):
        return
    back = mapper.convert(rules.invert(), forward.tensors, sidecar=forward.sidecar)
    assert_bitwise_same(back.tensors, altered)
