"""Each op: its shape rule, what it computes, and that its inverse undoes it."""

from __future__ import annotations

import pytest
import torch

from mapper.ops import (
    ALL_OPS,
    Affine,
    Create,
    Drop,
    Flatten,
    Fuse,
    NeedsResidual,
    OpContext,
    Pad,
    Rename,
    ShapeError,
    Slice,
    Split,
    Transpose,
    Unflatten,
    bitwise_equal,
)
from mapper.errors import ConversionError
from mapper.tensors import TensorMeta

CTX = OpContext({"heads": 2, "head_dim": 3, "tp": 2}, {"r": 2})


def meta(*shape: int, dtype: torch.dtype = torch.float32) -> TensorMeta:
    return TensorMeta(tuple(shape), dtype)


def op(cls, **fields):
    return cls.model_validate(fields)


def test_every_op_inverts_to_itself_twice():
    examples = [
        op(Rename, **{"from": "a", "to": "b"}),
        op(Transpose, **{"from": "a", "dims": [0, 2]}),
        op(Unflatten, **{"from": "a", "sizes": ["heads", 3, -1]}),
        op(Flatten, **{"from": "a", "dim": 1, "sizes": [2, 3]}),
        op(Affine, **{"from": "a", "scale": 2.0, "offset": 1.0}),
        op(Slice, **{"from": "a", "keep": 3, "total": "heads * 4", "fill": 0.0}),
        op(Pad, **{"from": "a", "keep": 3, "total": 4}),
        op(Split, **{"from": "a", "to": ["q", "k"], "sizes": [2, "head_dim"]}),
        op(Fuse, **{"from": "a@rank{r}", "to": "a", "over": "r", "mode": "sum"}),
        op(Drop, **{"from": "x", "restore": {"shape": [0], "dtype": "uint8"}, "note": "fp8 metadata"}),
        op(Create, **{"to": "x"}),
    ]
    assert {type(e) for e in examples} == set(ALL_OPS)
    for example in examples:
        assert example.inverse().inverse() == example
        assert example.inverse().note == example.note


def test_rename_moves_the_tensor_untouched():
    x = torch.randn(3)
    (y,) = op(Rename, **{"from": "a", "to": "b"}).apply([x], CTX)
    assert y is x


def test_transpose_swaps_dims_and_is_its_own_inverse():
    t = op(Transpose, **{"from": "w", "dims": [0, 2]})
    assert t.to == "w"  # in place by default
    assert t.infer([meta(2, 3, 4)], CTX) == [meta(4, 3, 2)]
    x = torch.randn(2, 3, 4)
    assert torch.equal(t.inverse().apply(t.apply([x], CTX), CTX)[0], x)
    with pytest.raises(ShapeError, match="at least 2 dimensions"):
        t.infer([meta(5)], CTX)


def test_unflatten_exposes_per_head_layout_and_flatten_folds_it_back():
    u = op(Unflatten, **{"from": "qkv", "sizes": [-1, 3, "head_dim"]})
    assert u.infer([meta(18, 6)], CTX) == [meta(2, 3, 3, 6)]
    x = torch.arange(18 * 6.0).reshape(18, 6)
    (y,) = u.apply([x], CTX)
    assert torch.equal(y[1, 2], x[15:18])  # head 1, value block
    assert torch.equal(u.inverse().apply([y], CTX)[0], x)
    with pytest.raises(ShapeError, match="does not split"):
        u.infer([meta(19, 6)], CTX)
    f = op(Flatten, **{"from": "qkv", "sizes": [2, 4]})
    with pytest.raises(ShapeError, match="are not"):
        f.infer([meta(2, 3, 6)], CTX)


def test_unflatten_needs_at_least_two_sizes_and_one_wildcard():
    with pytest.raises(ValueError, match="at least two"):
        op(Unflatten, **{"from": "a", "sizes": [4]})
    with pytest.raises(ValueError, match="at most one"):
        op(Unflatten, **{"from": "a", "sizes": [-1, -1]})


def test_affine_adds_one_for_zero_centered_gamma_in_float64_and_rounds_once():
    a = op(Affine, **{"from": "g", "offset": 1.0})
    x = torch.tensor([-0.5, 0.0, 1e-3], dtype=torch.bfloat16)
    (y,) = a.apply([x], CTX)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, (x.double() + 1).to(torch.bfloat16))
    assert a.lossy and a.inverse().invert
    with pytest.raises(ShapeError, match="floating"):
        a.infer([meta(3, dtype=torch.int64)], CTX)
    with pytest.raises(ValueError, match="not be 0"):
        op(Affine, **{"from": "g", "scale": 0.0})


def test_slice_keeps_the_head_and_its_residual_is_the_cut_tail():
    s = op(Slice, **{"from": "emb", "keep": 5, "total": 8})
    x = torch.randn(8, 2)
    (y,) = s.apply([x], CTX)
    assert torch.equal(y, x[:5])
    (tail,) = s.residual([x], [y])
    assert torch.equal(tail, x[5:])
    pad = s.inverse()
    assert torch.equal(pad.apply_with_residual([y], [tail], CTX)[0], x)
    with pytest.raises(NeedsResidual):
        pad.apply([y], CTX)  # no fill declared
    assert pad.needs_residual([meta(5, 2)], CTX)
    with pytest.raises(ShapeError, match="expected 8"):
        s.infer([meta(7, 2)], CTX)


def test_pad_with_fill_is_undone_exactly_by_slice():
    p = op(Pad, **{"from": "emb", "keep": 2, "total": 4, "fill": 0.0})
    x = torch.randn(2, 3)
    (y,) = p.apply([x], CTX)
    assert y.shape == (4, 3) and torch.equal(y[2:], torch.zeros(2, 3))
    assert torch.equal(p.inverse().apply([y], CTX)[0], x)


def test_fuse_concatenates_shards_in_rank_order():
    f = op(Fuse, **{"from": "w@rank{r}", "to": "w", "over": "r", "dim": 1})
    a, b = torch.randn(4, 2), torch.randn(4, 2)
    assert f.infer([meta(4, 2), meta(4, 2)], CTX) == [meta(4, 4)]
    (w,) = f.apply([a, b], CTX)
    assert torch.equal(w, torch.cat([a, b], 1))
    assert f.concat_dim == 1  # all it does: the engine may leave it to a streaming writer
    parts = f.inverse().apply([w], CTX)
    assert all(torch.equal(p, q) for p, q in zip(parts, [a, b]))
    with pytest.raises(ShapeError, match="cannot concatenate"):
        f.infer([meta(4, 2), meta(3, 2)], CTX)


def test_fuse_list_needs_declared_sizes_for_unequal_parts():
    f = op(Fuse, **{"from": ["q", "k", "v"], "to": "qkv"})
    with pytest.raises(ShapeError, match="declare `sizes`"):
        f.infer([meta(4, 2), meta(2, 2), meta(2, 2)], CTX)
    g = op(Fuse, **{"from": ["q", "k", "v"], "to": "qkv", "sizes": [4, 2, 2]})
    assert g.infer([meta(4, 2), meta(2, 2), meta(2, 2)], CTX) == [meta(8, 2)]
    with pytest.raises(ValueError, match="entries for 3 patterns"):
        op(Fuse, **{"from": ["q", "k", "v"], "to": "qkv", "sizes": [4, 4]})


def test_replicated_fuse_refuses_copies_that_differ_unless_averaging():
    f = op(Fuse, **{"from": "ln@rank{r}", "to": "ln", "over": "r", "mode": "replicated"})
    same = torch.ones(3)
    assert f.apply([same, same.clone()], CTX)[0] is same
    other = same.clone()
    other[1] = 2.0
    with pytest.raises(ConversionError, match="differ across parts") as caught:
        f.apply([same, other], OpContext({}, keys=("ln@rank0", "ln@rank1")))
    assert "ln@rank0" in str(caught.value) and "--average-replicas" in str(caught.value)
    averaged = f.apply([same, other], OpContext({}, average_replicas=True))[0]
    assert torch.equal(averaged, torch.tensor([1.0, 1.5, 1.0]))


def test_sum_fuse_adds_row_parallel_biases_and_split_shares_them_back():
    f = op(Fuse, **{"from": "b@rank{r}", "to": "b", "over": "r", "mode": "sum"})
    b = torch.tensor([1.0, -2.0, 0.5])
    (total,) = f.apply([b, b], CTX)
    assert torch.equal(total, 2 * b)
    assert all(torch.equal(s, b) for s in f.inverse().apply([total], CTX))
    with pytest.raises(ShapeError, match="floating"):
        f.infer([meta(3, dtype=torch.int64)] * 2, CTX)


def test_split_forms_are_validated():
    with pytest.raises(ValueError, match="list of at least two"):
        op(Split, **{"from": "a", "to": "b"})
    with pytest.raises(ValueError, match="one pattern"):
        op(Split, **{"from": "a", "to": ["b", "c"], "over": "r"})
    s = op(Split, **{"from": "a", "to": ["b", "c"], "sizes": [1, 2]})
    with pytest.raises(ShapeError, match="do not add up"):
        s.infer([meta(4)], CTX)


def test_drop_restores_its_declared_default_and_create_needs_one():
    d = op(Drop, **{"from": "x._extra_state", "restore": {"shape": [0], "dtype": "uint8"}})
    (made,) = d.inverse().apply([], CTX)
    assert made.dtype == torch.uint8 and made.shape == (0,)
    bare = op(Create, **{"to": "x"})
    assert bare.needs_residual([], CTX)
    with pytest.raises(NeedsResidual):
        bare.apply([], CTX)


def test_bitwise_equality_is_about_bytes():
    nan = torch.tensor([float("nan"), -0.0])
    assert bitwise_equal(nan, nan.clone())
    assert not bitwise_equal(torch.tensor([0.0]), torch.tensor([-0.0]))
    assert not bitwise_equal(torch.zeros(2), torch.zeros(2, dtype=torch.float16))
    assert bitwise_equal(torch.empty(0), torch.empty(0))


@pytest.mark.parametrize("offset", range(8))
@pytest.mark.parametrize("dtype", [torch.uint8, torch.bfloat16, torch.float32, torch.float64])
def test_bitwise_equality_holds_for_views_at_any_offset(offset, dtype):
    """Compared through wide integer views: a view at an odd offset must still meet its copy."""
    base = torch.arange(40).to(dtype)
    view = base[offset : offset + 16]
    assert bitwise_equal(view, view.clone()) and bitwise_equal(view.clone(), view)
    changed = view.clone()
    changed[-1] = 99
    assert not bitwise_equal(view, changed)


def test_slice_is_exact_only_when_every_cut_entry_is_the_fill_and_keeps_a_copy_otherwise():
    s = op(Slice, **{"from": "emb", "keep": 2, "total": 4, "fill": 0.0})
    x = torch.cat([torch.randn(2, 3), torch.zeros(2, 3)])
    (kept,), exact = s.apply_checked([x], CTX)
    assert exact and torch.equal(kept, x[:2])
    x[3, 1] = -0.0  # pad would put +0.0 back: not the same bits
    (kept,), exact = s.apply_checked([x], CTX)
    assert not exact
    (cut,) = s.residual([x], [kept])
    assert torch.equal(cut, x[2:]) and cut.untyped_storage().nbytes() == cut.nbytes  # not a view of x
    assert op(Slice, **{"from": "emb", "keep": 2, "total": 4}).apply_checked([x], CTX)[1] is False


def test_a_sum_is_exact_when_each_rank_holds_the_share_split_gives_back():
    f = op(Fuse, **{"from": "b@rank{r}", "to": "b", "over": "r", "mode": "sum"})
    b = torch.tensor([1.0, -2.0, 0.5], dtype=torch.bfloat16)
    (total,), exact = f.apply_checked([b, b, b, b], CTX)
    assert exact and torch.equal(total, 4 * b)
    (total,), exact = f.apply_checked([b, b.clone().fill_(1.0)], CTX)
    assert torch.equal(total, b + 1.0) and not exact
    # the same verdict as applying the inverse and comparing (the generic check)
    shares = f.inverse().apply([total], CTX)
    assert exact == all(torch.equal(s, t) for s, t in zip(shares, [b, b.clone().fill_(1.0)]))


def test_affine_by_tp_runs_in_the_dtype_and_checks_for_overflow_only_going_up():
    a = op(Affine, **{"from": "w", "scale": "tp"})
    ctx = OpContext({"tp": 2})
    w = torch.tensor([1.5, -0.0, 3e38], dtype=torch.bfloat16)
    (y,), exact = a.apply_checked([w[:2]], ctx)
    assert y.dtype == torch.bfloat16 and torch.equal(y, w[:2] * 2) and exact
    assert torch.signbit(y[1])  # -0.0 stays -0.0
    (y,), exact = a.apply_checked([w], ctx)
    assert torch.isinf(y[2]) and not exact  # overflow: the sidecar keeps the original
