"""Synthetic NeoX checkpoints look exactly like NeoX's, for every variant and TP size."""

from __future__ import annotations

import pickle
from collections import defaultdict

import pytest
import torch

from mapper.formats.naming import neox_key, parse_neox_key
from mapper.errors import MapperError
from mapper.testing import (
    VARIANTS,
    fp8_extra_state_is_synthetic,
    rotary_inv_freq_of,
    synthesize_neox,
    synthesize_variant,
    tiny_config,
)


def names(tensors: dict, layer: int) -> set[str]:
    """Tensor names of one pipeline layer (rank 0)."""
    out = set()
    for key in tensors:
        parsed = parse_neox_key(key)
        idx, name, rank = parsed.idx, parsed.key, parsed.rank
        if idx == layer and rank == 0:
            out.add(name)
    return out


def by_rank(tensors: dict) -> dict[tuple[int, str], dict[int, torch.Tensor]]:
    grouped: dict[tuple[int, str], dict[int, torch.Tensor]] = defaultdict(dict)
    for key, t in tensors.items():
        parsed = parse_neox_key(key)
        idx, name, rank = parsed.idx, parsed.key, parsed.rank
        grouped[(idx, name)][rank] = t
    return grouped


# ---- determinism and the key namespace ---------------------------------------------------------


def test_same_seed_same_tensors_other_seed_other_tensors() -> None:
    config = tiny_config("te-full", tp=2)
    a, b = synthesize_neox(config, seed=3), synthesize_neox(config, seed=3)
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    c = synthesize_neox(config, seed=4)
    assert not c[neox_key(2, "attention.qkv.weight", 0)].equal(a[neox_key(2, "attention.qkv.weight", 0)])


def test_keys_round_trip_through_the_namespace() -> None:
    assert neox_key(2, "attention.query_key_value.weight", 1) == "layer_02.attention.query_key_value.weight@rank1"
    parsed = parse_neox_key("layer_07.norm.weight@rank0")
    assert (parsed.idx, parsed.key, parsed.rank) == (7, "norm.weight", 0)
    with pytest.raises(MapperError):
        parse_neox_key("sequential.2.norm.weight")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_tensor_exists_on_every_rank_and_replicas_agree(variant: str) -> None:
    config, tensors = synthesize_variant(variant, tp=2)
    sharded_dim0 = ("word_embeddings.weight", "final_linear.weight", "qkv.", "query_key_value.", "linear1.",
                    "dense_h_to_4h.", "fc1_", "mlp.w1.", "mlp.w3.")
    sharded_dim1 = ("attention.dense.weight", "attention.proj.weight", "linear2.weight",
                    "dense_4h_to_h.weight", "fc2_weight", "mlp.w2.weight")
    for (layer, name), ranks in by_rank(tensors).items():
        assert sorted(ranks) == [0, 1], name
        if name.endswith("_extra_state"):
            assert all(t.dtype == torch.uint8 for t in ranks.values())
        elif any(s in name for s in sharded_dim0 + sharded_dim1):
            assert ranks[0].shape == ranks[1].shape and not ranks[0].equal(ranks[1]), name
        else:  # norms, row-parallel biases, position embeddings, rotary buffer: replicated
            assert ranks[0].equal(ranks[1]), name


def test_layer_indices_follow_gpt2_model_pipe() -> None:
    untied, t = synthesize_variant("neox-legacy")  # 2 blocks: 0 embed, 2-3 blocks, 5 norm, 6 final_linear
    assert {parse_neox_key(k).idx for k in t} == {0, 2, 3, 5, 6}
    assert names(t, 5) == {"norm.weight", "norm.bias"} and names(t, 6) == {"final_linear.weight"}
    tied, t = synthesize_variant("neox-new")
    assert {parse_neox_key(k).idx for k in t} == {0, 2, 3, 5}
    assert names(t, 0) == {"word_embeddings.weight"}


# ---- names per variant -------------------------------------------------------------------------


def test_legacy_gpt_neox_names() -> None:
    _, t = synthesize_variant("neox-legacy")
    assert names(t, 2) == {
        "input_layernorm.weight", "input_layernorm.bias", "post_attention_layernorm.weight",
        "post_attention_layernorm.bias", "attention.query_key_value.weight", "attention.query_key_value.bias",
        "attention.dense.weight", "attention.dense.bias", "mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias",
        "mlp.dense_4h_to_h.weight", "mlp.dense_4h_to_h.bias",
    }


def test_new_names_use_linear1_and_linear2() -> None:
    _, t = synthesize_variant("neox-new")
    assert {"mlp.linear1.weight", "mlp.linear1.bias", "mlp.linear2.weight", "mlp.linear2.bias"} <= names(t, 2)
    assert not any("dense_h_to_4h" in n for n in names(t, 2))


def test_te_full_names_with_stale_post_attention_layernorm() -> None:
    config, t = synthesize_variant("te-full")
    assert names(t, 2) == {
        "input_layernorm.weight", "input_layernorm.bias",
        "post_attention_layernorm.weight", "post_attention_layernorm.bias",  # stale: ones / zeros
        "attention.qkv.weight", "attention.qkv.bias", "attention.proj.weight", "attention.proj.bias",
        "attention.qkv._extra_state", "attention.core_attention._extra_state", "attention.proj._extra_state",
        "mlp.layer_norm_weight", "mlp.layer_norm_bias", "mlp.fc1_weight", "mlp.fc1_bias",
        "mlp.fc2_weight", "mlp.fc2_bias", "mlp._extra_state",
    }
    assert t[neox_key(2, "post_attention_layernorm.weight", 0)].eq(1).all()
    assert t[neox_key(2, "post_attention_layernorm.bias", 0)].eq(0).all()
    assert not t[neox_key(2, "mlp.layer_norm_weight", 0)].eq(1).any()
    assert t[neox_key(2, "mlp.fc1_weight", 0)].shape == (config.mlp_widths().in_rows, config.hidden_size)


def test_stale_norm_can_be_left_out_and_extra_state_too() -> None:
    config = tiny_config("te-full")
    t = synthesize_neox(config, stale_post_attention_norm=False, extra_state="none")
    assert not any("post_attention_layernorm" in n or "_extra_state" in n for n in names(t, 2))


def test_te_norms_are_nested_under_norm() -> None:
    _, t = synthesize_variant("te-layernorm")
    nested = {"input_layernorm.norm.weight", "input_layernorm.norm.bias", "input_layernorm.norm._extra_state"}
    assert nested <= names(t, 2)
    assert names(t, 5) == {"norm.norm.weight", "norm.norm.bias", "norm.norm._extra_state"}
    _, t = synthesize_variant("te-rmsnorm")
    assert {"input_layernorm.norm.weight", "post_attention_layernorm.norm.weight"} <= names(t, 2)
    assert not any(n.endswith("norm.bias") for n in names(t, 2))


def test_llama_names() -> None:
    _, legacy = synthesize_variant("llama-legacy")
    assert names(legacy, 2) == {
        "input_layernorm.scale", "post_attention_layernorm.scale", "attention.query_key_value.weight",
        "attention.dense.weight", "mlp.w1.weight", "mlp.w2.weight", "mlp.w3.weight",
    }
    assert names(legacy, 5) == {"norm.scale"}
    _, te = synthesize_variant("llama-te")
    assert "mlp.layer_norm_bias" not in names(te, 2)  # RMSNorm LayerNormMLP
    assert {"attention.qkv.bias", "mlp.fc1_bias", "mlp.fc2_bias"} <= names(te, 2)  # TE forces biases


def test_te_linear_adds_extra_state_to_new_names() -> None:
    _, t = synthesize_variant("te-linear")
    assert {"attention.query_key_value._extra_state", "attention.dense._extra_state",
            "mlp.linear1._extra_state", "mlp.linear2._extra_state", "mlp.linear1.weight"} <= names(t, 2)
    assert "final_linear._extra_state" in names(t, 6)


def test_extra_state_is_empty_or_fake_fp8_never_a_pickle() -> None:
    _, empty = synthesize_variant("te-full")
    assert all(t.numel() == 0 for k, t in empty.items() if k.split("@")[0].endswith("_extra_state"))
    _, fp8 = synthesize_variant("te-full-fp8", tp=2)
    states = [t for k, t in fp8.items() if "_extra_state" in k]
    assert states and all(t.dtype == torch.uint8 and t.numel() > 0 for t in states)
    assert all(fp8_extra_state_is_synthetic(t) for t in states)
    for t in states:
        with pytest.raises(Exception):
            pickle.loads(bytes(t.tolist()))


def test_rotary_buffer_is_optional_and_named_per_attention_kind() -> None:
    config = tiny_config("neox-new")
    t = synthesize_neox(config, rotary_inv_freq=True)
    assert t[neox_key(2, "attention.rotary_emb.inv_freq", 0)].equal(rotary_inv_freq_of(config))
    assert rotary_inv_freq_of(config).shape == (config.rotary_ndims // 2,)
    te = synthesize_neox(tiny_config("te-mha"), rotary_inv_freq=True)
    assert neox_key(2, "attention.rotary_embeddings.inv_freq", 0) in te


# ---- sharding: one set of full weights ---------------------------------------------------------


def test_tp2_shards_merge_back_into_the_tp1_tensors() -> None:
    """Column-parallel concat on dim 0, row-parallel on dim 1; gated and GQA tensors per shard."""
    c1, t1 = synthesize_variant("llama-new", tp=1)
    c2, t2 = synthesize_variant("llama-new", tp=2)
    g = lambda t, name, r=0: t[neox_key(2, name, r)]  # noqa: E731
    # row-parallel weight: concat on dim 1
    assert torch.cat([g(t2, "attention.dense.weight", r) for r in (0, 1)], 1).equal(g(t1, "attention.dense.weight"))
    # gated linear1 = [up; gate] per shard: split each shard, then concat the halves
    ups, gates = zip(*(g(t2, "mlp.linear1.weight", r).chunk(2) for r in (0, 1)))
    up1, gate1 = g(t1, "mlp.linear1.weight").chunk(2)
    assert torch.cat(ups).equal(up1) and torch.cat(gates).equal(gate1)
    assert not torch.cat([g(t2, "mlp.linear1.weight", r) for r in (0, 1)]).equal(g(t1, "mlp.linear1.weight"))
    # GQA QKV = [Q_r | K_r | V_r] per rank
    hd, nq, nkv = c1.head_dim, c1.num_heads, c1.num_kv_heads
    parts = [g(t2, "attention.query_key_value.weight", r).split([nq // 2 * hd, nkv // 2 * hd, nkv // 2 * hd])
             for r in (0, 1)]
    merged = torch.cat([torch.cat([p[i] for p in parts]) for i in range(3)])
    assert merged.equal(g(t1, "attention.query_key_value.weight"))
    # vocab-parallel embedding
    assert torch.cat([t2[neox_key(0, "word_embeddings.weight", r)] for r in (0, 1)])[:100].equal(
        t1[neox_key(0, "word_embeddings.weight", 0)][:100])


def test_te_gqa_qkv_is_grouped_per_kv_head() -> None:
    c1, t1 = synthesize_variant("llama-te", tp=1)
    c2, t2 = synthesize_variant("llama-te", tp=2)
    hd, nkv = c1.head_dim, c1.num_kv_heads
    per = c1.num_heads // nkv
    full = t1[neox_key(2, "attention.qkv.weight", 0)].reshape(nkv, per + 2, hd, -1)
    for r in (0, 1):  # rank r holds kv group r with its q heads
        shard = t2[neox_key(2, "attention.qkv.weight", r)].reshape(1, per + 2, hd, -1)
        assert shard.equal(full[r:r + 1])
    # TE fc1 = [gate; up] per shard
    gates, ups = zip(*(t2[neox_key(2, "mlp.fc1_weight", r)].chunk(2) for r in (0, 1)))
    gate1, up1 = t1[neox_key(2, "mlp.fc1_weight", 0)].chunk(2)
    assert torch.cat(gates).equal(gate1) and torch.cat(ups).equal(up1)


def test_gpt_j_row_parallel_bias_is_stored_divided_by_tp() -> None:
    """Real checkpoints hold one bias on every rank and every rank adds it: effective = TP × stored."""
    _, t1 = synthesize_variant("neox-parallel", tp=1)
    _, t2 = synthesize_variant("neox-parallel", tp=2)
    for name in ("attention.dense.bias", "mlp.linear2.bias"):
        assert torch.allclose(2 * t2[neox_key(2, name, 0)], t1[neox_key(2, name, 0)])
    _, s1 = synthesize_variant("neox-sequential", tp=1)
    _, s2 = synthesize_variant("neox-sequential", tp=2)
    assert s2[neox_key(2, "mlp.linear2.bias", 1)].equal(s1[neox_key(2, "mlp.linear2.bias", 0)])


def test_te_gpt_j_row_parallel_weight_is_stored_divided_by_tp() -> None:
    _, t1 = synthesize_variant("te-full-parallel", tp=1)
    _, t2 = synthesize_variant("te-full-parallel", tp=2)
    merged = torch.cat([t2[neox_key(2, "mlp.fc2_weight", r)] for r in (0, 1)], dim=1)
    assert torch.allclose(2 * merged, t1[neox_key(2, "mlp.fc2_weight", 0)])


# ---- values ------------------------------------------------------------------------------------


def test_weights_are_well_scaled_norms_near_but_not_one_biases_nonzero() -> None:
    _, t = synthesize_variant("neox-new")
    w = t[neox_key(2, "input_layernorm.weight", 0)]
    assert (w - 1).abs().max() > 0.05 and (w - 1).abs().mean() < 0.5 and not w.eq(1).any()
    assert not t[neox_key(2, "attention.query_key_value.bias", 0)].eq(0).any()
    qkv = t[neox_key(2, "attention.query_key_value.weight", 0)]
    assert 0.05 < qkv.std() < 0.3


def test_dtype_applies_to_floats_not_to_extra_state() -> None:
    config = tiny_config("te-full")
    t = synthesize_neox(config, dtype=torch.bfloat16)
    assert {x.dtype for k, x in t.items() if "_extra_state" not in k} == {torch.bfloat16}
    assert {x.dtype for k, x in t.items() if "_extra_state" in k} == {torch.uint8}


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_tiny_vocab_is_padded_the_neox_way(tp: int) -> None:
    config = tiny_config("te-full", tp=tp)
    assert config.vocab_size % (8 * tp) == 0 and config.vocab_size >= config.orig_vocab_size
    t = synthesize_neox(config)
    assert t[neox_key(0, "word_embeddings.weight", tp - 1)].shape == (config.vocab_size // tp, config.hidden_size)


def test_impossible_naming_combinations_are_refused() -> None:
    with pytest.raises(MapperError, match="new"):
        synthesize_neox(tiny_config("te-linear"), naming="legacy")
    with pytest.raises(MapperError, match="legacy"):
        synthesize_neox(tiny_config("llama-legacy"), naming="new")
    with pytest.raises(MapperError, match="variant"):
        tiny_config("no-such-variant")
