"""The reference NeoX forward is right: it matches HF at TP=1 and itself across TP sizes.

HF's GPTNeoXForCausalLM / LlamaForCausalLM are independent implementations of the same math;
weights are moved into them by small hand-written mappings below (test-local, on purpose not the
project's rule sets), so an agreement to 1e-5 checks the reference, not a shared mistake.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from mapper.configs import NeoXModelConfig
from mapper.formats.naming import neox_key
from mapper.errors import CheckpointError, MapperError
from mapper.testing import VARIANTS, synthesize_neox, synthesize_variant, tiny_config
from mapper.verify import neox_forward

TOL = 1e-5
IDS = torch.randint(0, 100, (2, 11), generator=torch.Generator().manual_seed(7))


def _key(layer: int, name: str) -> str:
    return neox_key(layer, name, 0)


def _norm(t: dict, layer: int, prefix: str) -> dict[str, torch.Tensor]:
    for w, b in ((f"{prefix}.norm.weight", f"{prefix}.norm.bias"), (f"{prefix}.scale", None),
                 (f"{prefix}.weight", f"{prefix}.bias")):
        if _key(layer, w) in t:
            out = {"weight": t[_key(layer, w)]}
            if b and _key(layer, b) in t:
                out["bias"] = t[_key(layer, b)]
            return out
    raise KeyError(prefix)


def neox_to_hf_gpt_neox(t: dict, c: NeoXModelConfig, *, pre_mlp_norm: str = "te") -> dict[str, torch.Tensor]:
    """TP=1 NeoX (legacy, new or TE-LNMLP names, MHA) -> GPTNeoXForCausalLM state dict.

    ``pre_mlp_norm="stale"`` maps the stale post_attention_layernorm instead of mlp.layer_norm_*
    (the bug of gpt-neox issue #1353).
    """
    sd = {"gpt_neox.embed_in.weight": t[_key(0, "word_embeddings.weight")]}
    for i in range(c.num_layers):
        L, p = c.block_layer_index(i), f"gpt_neox.layers.{i}."
        for k, v in _norm(t, L, "input_layernorm").items():
            sd[p + f"input_layernorm.{k}"] = v
        if _key(L, "mlp.fc1_weight") in t and pre_mlp_norm == "te":
            sd[p + "post_attention_layernorm.weight"] = t[_key(L, "mlp.layer_norm_weight")]
            sd[p + "post_attention_layernorm.bias"] = t[_key(L, "mlp.layer_norm_bias")]
        else:
            for k, v in _norm(t, L, "post_attention_layernorm").items():
                sd[p + f"post_attention_layernorm.{k}"] = v
        qkv = "attention.qkv" if _key(L, "attention.qkv.weight") in t else "attention.query_key_value"
        out = "attention.proj" if _key(L, "attention.proj.weight") in t else "attention.dense"
        for k in ("weight", "bias"):
            sd[p + f"attention.query_key_value.{k}"] = t[_key(L, f"{qkv}.{k}")]  # [heads, 3, hd] both
            sd[p + f"attention.dense.{k}"] = t[_key(L, f"{out}.{k}")]
        if _key(L, "mlp.fc1_weight") in t:
            names = {"dense_h_to_4h.weight": "fc1_weight", "dense_h_to_4h.bias": "fc1_bias",
                     "dense_4h_to_h.weight": "fc2_weight", "dense_4h_to_h.bias": "fc2_bias"}
        else:
            legacy = _key(L, "mlp.dense_h_to_4h.weight") in t
            a, b = ("dense_h_to_4h", "dense_4h_to_h") if legacy else ("linear1", "linear2")
            names = {f"dense_h_to_4h.{k}": f"{a}.{k}" for k in ("weight", "bias")}
            names |= {f"dense_4h_to_h.{k}": f"{b}.{k}" for k in ("weight", "bias")}
        for hf, nx in names.items():
            sd[p + f"mlp.{hf}"] = t[_key(L, f"mlp.{nx}")]
    for k, v in _norm(t, c.final_norm_layer_index, "norm").items():
        sd[f"gpt_neox.final_layer_norm.{k}"] = v
    sd["lm_head.weight"] = (t[_key(0, "word_embeddings.weight")] if c.tied
                            else t[_key(c.final_linear_layer_index, "final_linear.weight")])
    return sd


def neox_to_hf_llama(t: dict, c: NeoXModelConfig) -> dict[str, torch.Tensor]:
    """TP=1 Llama-architecture NeoX (legacy w1/w2/w3, new gated linear1, or TE) -> LlamaForCausalLM."""
    hd, nq, nkv = c.head_dim, c.num_heads, c.num_kv_heads
    sd = {"model.embed_tokens.weight": t[_key(0, "word_embeddings.weight")]}
    for i in range(c.num_layers):
        L, p = c.block_layer_index(i), f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = _norm(t, L, "input_layernorm")["weight"]
        te_attn = _key(L, "attention.qkv.weight") in t
        qkv = "attention.qkv" if te_attn else "attention.query_key_value"
        for k in ("weight", "bias"):
            if _key(L, f"{qkv}.{k}") not in t:
                continue
            w = t[_key(L, f"{qkv}.{k}")]
            if te_attn:  # per kv group: [its q heads, k, v]
                g = w.reshape(nkv, nq // nkv + 2, hd, *w.shape[1:])
                q, kk, v = g[:, :-2], g[:, -2], g[:, -1]
            elif c.gqa_layout == "pre-1315":  # NeoX GQA before #1315: per query head [q_h | K slice | V slice]
                f = hd * nkv // nq
                g = w.reshape(nq, hd + 2 * f, *w.shape[1:])
                q, kk, v = g[:, :hd], g[:, hd:hd + f], g[:, hd + f:]
            else:  # NeoX GQA: [Q | K | V]
                q, kk, v = w.split([nq * hd, nkv * hd, nkv * hd])
            rest = w.shape[1:]
            sd[p + f"self_attn.q_proj.{k}"] = q.reshape(nq * hd, *rest)
            sd[p + f"self_attn.k_proj.{k}"] = kk.reshape(nkv * hd, *rest)
            sd[p + f"self_attn.v_proj.{k}"] = v.reshape(nkv * hd, *rest)
        out = "attention.proj" if te_attn else "attention.dense"
        for k in ("weight", "bias"):
            if _key(L, f"{out}.{k}") in t:
                sd[p + f"self_attn.o_proj.{k}"] = t[_key(L, f"{out}.{k}")]
        if _key(L, "mlp.fc1_weight") in t:  # TE: [gate; up]
            sd[p + "post_attention_layernorm.weight"] = t[_key(L, "mlp.layer_norm_weight")]
            for k, nx_in, nx_out in (("weight", "fc1_weight", "fc2_weight"), ("bias", "fc1_bias", "fc2_bias")):
                gate, up = t[_key(L, f"mlp.{nx_in}")].chunk(2)
                sd[p + f"mlp.gate_proj.{k}"], sd[p + f"mlp.up_proj.{k}"] = gate, up
                sd[p + f"mlp.down_proj.{k}"] = t[_key(L, f"mlp.{nx_out}")]
        else:
            sd[p + "post_attention_layernorm.weight"] = _norm(t, L, "post_attention_layernorm")["weight"]
            if _key(L, "mlp.w1.weight") in t:  # legacy: w1 gate, w3 up, w2 down
                sd[p + "mlp.gate_proj.weight"] = t[_key(L, "mlp.w1.weight")]
                sd[p + "mlp.up_proj.weight"] = t[_key(L, "mlp.w3.weight")]
                sd[p + "mlp.down_proj.weight"] = t[_key(L, "mlp.w2.weight")]
            else:  # new: linear1 = [up; gate]
                up, gate = t[_key(L, "mlp.linear1.weight")].chunk(2)
                sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"] = gate, up
                sd[p + "mlp.down_proj.weight"] = t[_key(L, "mlp.linear2.weight")]
    sd["model.norm.weight"] = _norm(t, c.final_norm_layer_index, "norm")["weight"]
    sd["lm_head.weight"] = (t[_key(0, "word_embeddings.weight")] if c.tied
                            else t[_key(c.final_linear_layer_index, "final_linear.weight")])
    return sd


def hf_model(tmp_path: Path, hf_config: dict, state_dict: dict) -> torch.nn.Module:
    """Build the HF model from a written config.json, as a user would load it."""
    (tmp_path / "config.json").write_text(json.dumps(hf_config))
    config = AutoConfig.from_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    assert not unexpected, unexpected
    assert not [k for k in missing if "rotary_emb" not in k], missing
    return model


def hf_logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


# ---- the reference agrees with HuggingFace -----------------------------------------------------


@pytest.mark.parametrize(
    ("variant", "overrides"),
    [
        ("neox-legacy", {}),  # parallel residual, exact GELU, untied, rotary 25%
        ("neox-legacy", {"bias_gelu_fusion": True}),  # parallel residual, tanh GELU
        ("neox-sequential", {}),  # sequential residual, exact GELU
        ("neox-new", {}),  # sequential residual, tanh GELU, tied, rotary 50%
    ],
)
def test_reference_matches_hf_gpt_neox(tmp_path: Path, variant: str, overrides: dict) -> None:
    config, tensors = synthesize_variant(variant, **overrides)
    model = hf_model(tmp_path, config.to_hf_config("gpt_neox"), neox_to_hf_gpt_neox(tensors, config))
    ref = neox_forward(tensors, config, IDS)
    assert (ref.logits - hf_logits(model)).abs().max() <= TOL
    with torch.no_grad():
        hidden = model(IDS, output_hidden_states=True).hidden_states
    assert (ref.embeddings - hidden[0]).abs().max() <= TOL
    assert (ref.blocks[0] - hidden[1]).abs().max() <= TOL


@pytest.mark.parametrize("variant", ["llama-legacy", "llama-new", "llama-te"])
def test_reference_matches_hf_llama_with_gqa(tmp_path: Path, variant: str) -> None:
    config, tensors = synthesize_variant(variant, rmsnorm_formula="current")  # HF has only this RMSNorm
    assert config.num_kv_heads < config.num_heads
    model = hf_model(tmp_path, config.to_hf_config("llama"), neox_to_hf_llama(tensors, config))
    ref = neox_forward(tensors, config, IDS)
    assert (ref.logits - hf_logits(model)).abs().max() <= TOL


def test_rmsnorm_before_gpt_neox_1345_is_computed_as_it_was_and_hf_only_approximates_it(tmp_path: Path) -> None:
    """x / (rms + eps) vs x * rsqrt(mean(x^2) + eps): a difference of about eps/rms, small but real."""
    config, tensors = synthesize_variant("llama-legacy", rms_norm_epsilon=1e-5)
    assert config.rmsnorm_formula == "pre-1345"
    model = hf_model(tmp_path, config.to_hf_config("llama"), neox_to_hf_llama(tensors, config))
    old = neox_forward(tensors, config, IDS).logits
    new = neox_forward(tensors, config.model_copy(update={"rmsnorm_formula": "current"}), IDS).logits
    assert (new - hf_logits(model)).abs().max() <= TOL
    assert 1e-5 < (old - hf_logits(model)).abs().max() <= 1e-3


def test_te_layernorm_mlp_matches_hf_only_with_its_own_norm_and_tanh_gelu(tmp_path: Path) -> None:
    """The three ways gpt-neox issue #1353 went wrong each move the logits; the right mapping does not."""
    config, tensors = synthesize_variant("te-full")
    ref = neox_forward(tensors, config, IDS).logits
    hf_config = config.to_hf_config("gpt_neox")
    assert hf_config["hidden_act"] == "gelu_pytorch_tanh"

    right = hf_model(tmp_path, hf_config, neox_to_hf_gpt_neox(tensors, config))
    assert (ref - hf_logits(right)).abs().max() <= TOL

    stale = hf_model(tmp_path, hf_config, neox_to_hf_gpt_neox(tensors, config, pre_mlp_norm="stale"))
    assert (ref - hf_logits(stale)).abs().max() > 1e-2

    double = hf_model(tmp_path, hf_config, neox_to_hf_gpt_neox(tensors, config))
    for layer in double.gpt_neox.layers:  # the workaround: an LN inside the MLP *and* post_attention_layernorm
        inner = torch.nn.LayerNorm(config.hidden_size, eps=1e-5)
        inner.load_state_dict(layer.post_attention_layernorm.state_dict())
        layer.mlp = torch.nn.Sequential(inner, layer.mlp)
    assert (ref - hf_logits(double)).abs().max() > 1e-2

    exact = hf_model(tmp_path, {**hf_config, "hidden_act": "gelu"}, neox_to_hf_gpt_neox(tensors, config))
    assert (ref - hf_logits(exact)).abs().max() > 1e-4


# ---- the reference is TP-invariant -------------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_same_seed_same_logits_at_tp1_and_tp2(variant: str) -> None:
    c1, t1 = synthesize_variant(variant, tp=1)
    c2, t2 = synthesize_variant(variant, tp=2)
    vocab = c1.orig_vocab_size
    diff = neox_forward(t1, c1, IDS).logits[..., :vocab] - neox_forward(t2, c2, IDS).logits[..., :vocab]
    assert diff.abs().max() <= TOL


@pytest.mark.parametrize("variant", ["te-full-parallel", "neox-legacy"])
def test_same_seed_same_logits_at_tp4(variant: str) -> None:
    c1, t1 = synthesize_variant(variant, tp=1)
    c4, t4 = synthesize_variant(variant, tp=4)
    vocab = c1.orig_vocab_size
    diff = neox_forward(t1, c1, IDS).logits[..., :vocab] - neox_forward(t4, c4, IDS).logits[..., :vocab]
    assert diff.abs().max() <= TOL


def test_legacy_and_new_names_of_the_same_weights_compute_the_same() -> None:
    legacy, t_legacy = synthesize_variant("neox-legacy", tp=2)
    t_new = synthesize_neox(legacy, naming="new")
    assert neox_forward(t_legacy, legacy, IDS).logits.equal(neox_forward(t_new, legacy, IDS).logits)


@pytest.mark.parametrize(
    ("variant_name", "bias", "effect"),
    [("neox-parallel", "attention.dense.bias", 1.0), ("neox-sequential", "mlp.linear2.bias", 0.5)],
    ids=["gpt-j-residual: 2 ranks x 0.5", "sequential: once"],
)
def test_a_row_parallel_bias_counts_once_per_rank_under_gpt_j_residual_and_once_otherwise(
    variant_name: str, bias: str, effect: float
) -> None:
    """Under gpt-j-residual every rank adds its stored bias: doubling TP doubles a bias' effect."""
    config, tensors = synthesize_variant(variant_name, tp=2)
    base = neox_forward(tensors, config, IDS).blocks[0]
    bumped = dict(tensors)
    for rank in range(2):
        key = neox_key(2, bias, rank)
        bumped[key] = tensors[key] + 0.5
    delta = neox_forward(bumped, config, IDS).blocks[0] - base
    assert torch.allclose(delta, torch.full_like(delta, effect), atol=1e-5)


# ---- TE LayerNormMLP: its own norm counts, the stale one does not ------------------------------


@pytest.mark.parametrize("tp", [1, 2])
def test_stale_post_attention_layernorm_is_ignored(tp: int) -> None:
    config, tensors = synthesize_variant("te-lnmlp", tp=tp)
    assert neox_key(2, "post_attention_layernorm.weight", 0) in tensors
    base = neox_forward(tensors, config, IDS).logits
    changed = dict(tensors)
    for rank in range(tp):
        for name, value in (("weight", 3.0), ("bias", -2.0)):
            key = neox_key(2, f"post_attention_layernorm.{name}", rank)
            changed[key] = torch.full_like(tensors[key], value)
    assert neox_forward(changed, config, IDS).logits.equal(base)


@pytest.mark.parametrize("tp", [1, 2])
def test_mlp_layer_norm_weight_is_used(tp: int) -> None:
    config, tensors = synthesize_variant("te-lnmlp", tp=tp)
    base = neox_forward(tensors, config, IDS).logits
    changed = dict(tensors)
    for rank in range(tp):
        key = neox_key(2, "mlp.layer_norm_weight", rank)
        changed[key] = tensors[key] * 1.5
    assert (neox_forward(changed, config, IDS).logits - base).abs().max() > 1e-2


def test_te_mlp_equals_plain_mlp_with_its_norm_moved_out() -> None:
    """mlp.layer_norm_* is exactly a post_attention_layernorm: moving it out (and dropping the
    stale one) gives a plain NeoX model with the same logits; keeping the stale one does not."""
    config, tensors = synthesize_variant("te-lnmlp", tp=2)
    ref = neox_forward(tensors, config, IDS).logits
    plain_cfg = config.model_copy(update={"te_layernorm_mlp": False, "bias_gelu_fusion": True})  # TE GELU = tanh
    moves = {"mlp.layer_norm_weight": "post_attention_layernorm.weight",
             "mlp.layer_norm_bias": "post_attention_layernorm.bias",
             "mlp.fc1_weight": "mlp.linear1.weight", "mlp.fc1_bias": "mlp.linear1.bias",
             "mlp.fc2_weight": "mlp.linear2.weight", "mlp.fc2_bias": "mlp.linear2.bias"}
    stale = {k: v for k, v in tensors.items() if not k.split(".", 1)[1].startswith("mlp.")}
    moved = {k: v for k, v in stale.items() if "post_attention_layernorm" not in k}
    for key, value in tensors.items():
        layer_name, rest = key.split(".", 1)
        name, rank = rest.rsplit("@", 1)
        if name in moves:
            moved[f"{layer_name}.{moves[name]}@{rank}"] = value
            if not name.startswith("mlp.layer_norm"):
                stale[f"{layer_name}.{moves[name]}@{rank}"] = value
    assert (neox_forward(moved, plain_cfg, IDS).logits - ref).abs().max() <= TOL
    assert (neox_forward(stale, plain_cfg, IDS).logits - ref).abs().max() > 1e-2


# ---- the reference checks what it reads --------------------------------------------------------


def test_stored_rotary_inv_freq_is_used_when_it_matches() -> None:
    config = tiny_config("neox-new")
    with_buffer = synthesize_neox(config, rotary_inv_freq=True)
    assert neox_key(2, "attention.rotary_emb.inv_freq", 0) in with_buffer
    without = synthesize_neox(config)
    assert neox_forward(with_buffer, config, IDS).logits.equal(neox_forward(without, config, IDS).logits)


def test_stored_rotary_inv_freq_contradicting_the_config_is_an_error() -> None:
    config = tiny_config("neox-new")
    tensors = synthesize_neox(config.model_copy(update={"rotary_emb_base": 1000.0}), rotary_inv_freq=True)
    with pytest.raises(MapperError, match="rotary"):
        neox_forward(tensors, config, IDS)


def test_config_that_contradicts_the_keys_is_an_error() -> None:
    config, tensors = synthesize_variant("te-full")
    with pytest.raises(CheckpointError, match="te_mha"):
        neox_forward(tensors, config.model_copy(update={"te_mha": False}), IDS)
    with pytest.raises(CheckpointError, match="te_layernorm_mlp"):
        neox_forward(tensors, config.model_copy(update={"te_mha": True, "te_layernorm_mlp": False}), IDS)


def test_replicated_tensors_must_agree_across_ranks() -> None:
    config, tensors = synthesize_variant("neox-new", tp=2)
    broken = dict(tensors)
    key = neox_key(2, "input_layernorm.weight", 1)
    broken[key] = tensors[key] + 1
    with pytest.raises(CheckpointError, match="rank 1"):
        neox_forward(broken, config, IDS)


def test_activations_have_the_documented_shapes() -> None:
    config, tensors = synthesize_variant("te-full", tp=2)
    acts = neox_forward(tensors, config, IDS)
    b, s = IDS.shape
    assert acts.embeddings.shape == acts.final_norm.shape == (b, s, config.hidden_size)
    assert len(acts.blocks) == config.num_layers and all(x.shape == (b, s, config.hidden_size) for x in acts.blocks)
    assert acts.logits.shape == (b, s, config.vocab_size)
    assert torch.isfinite(acts.logits).all() and acts.logits.std() > 0.5


def test_bf16_forward_runs_and_stays_close() -> None:
    config, tensors = synthesize_variant("llama-te")
    fp32 = neox_forward(tensors, config, IDS).logits
    bf16 = neox_forward(tensors, config, IDS, dtype=torch.bfloat16).logits
    assert bf16.dtype == torch.bfloat16
    assert (bf16.float() - fp32).abs().max() < 0.2


def test_learned_position_embeddings_are_added_and_tp_invariant() -> None:
    c1, c2 = (tiny_config("neox-sequential", tp=tp, pos_emb="learned") for tp in (1, 2))
    t1, t2 = synthesize_neox(c1), synthesize_neox(c2)
    logits = neox_forward(t1, c1, IDS).logits[..., :100]
    assert (logits - neox_forward(t2, c2, IDS).logits[..., :100]).abs().max() <= TOL
    moved = dict(t1)
    key = neox_key(0, "position_embeddings.weight", 0)
    moved[key] = t1[key].roll(1, dims=0)
    assert (neox_forward(moved, c1, IDS).logits[..., :100] - logits).abs().max() > 1e-2


def test_gpt_j_tied_uses_input_layernorm_for_both_branches() -> None:
    config = tiny_config("neox-parallel", gpt_j_tied=True)
    tensors = synthesize_neox(config)
    base = neox_forward(tensors, config, IDS).logits
    changed = dict(tensors)
    post = neox_key(2, "post_attention_layernorm.weight", 0)
    changed[post] = tensors[post] * 3
    assert neox_forward(changed, config, IDS).logits.equal(base)
    changed[neox_key(2, "input_layernorm.weight", 0)] = tensors[neox_key(2, "input_layernorm.weight", 0)] * 3
    assert not neox_forward(changed, config, IDS).logits.equal(base)


# ---- every TE switch mix, and gpt-neox's layout history -----------------------------------------

TE_SWITCHES = [dict(te_mha=a, te_layernorm_mlp=b, te_columnparallel=c, te_rowparallel=d)
               for a in (False, True) for b in (False, True) for c in (False, True) for d in (False, True)]


@pytest.mark.parametrize("switches", TE_SWITCHES, ids=lambda s: "+".join(k for k, v in s.items() if v) or "none")
@pytest.mark.parametrize(("variant", "norm"), [("neox-parallel", "layernorm"), ("neox-sequential", "te_layernorm"),
                                               ("llama-new", "rmsnorm"), ("llama-new", "te_rmsnorm")])
def test_every_te_switch_mix_computes_the_same_function_at_tp1_and_tp2(variant: str, norm: str, switches: dict) -> None:
    """Any mix of the independent TE switches (DOMAIN §7), on both architectures and residual modes:
    the reference reads the keys each switch writes and gives the same logits at TP 1 and 2."""
    extra = {"intermediate_size": 64} if switches["te_layernorm_mlp"] and variant.startswith("llama") else {}
    c1, c2 = (tiny_config(variant, tp=tp, norm=norm, num_layers=1, **switches, **extra) for tp in (1, 2))
    t1, t2 = synthesize_neox(c1), synthesize_neox(c2)
    vocab = c1.orig_vocab_size
    diff = neox_forward(t1, c1, IDS).logits[..., :vocab] - neox_forward(t2, c2, IDS).logits[..., :vocab]
    assert diff.abs().max() <= TOL


def pre_1315_rows(qkv: torch.Tensor, config: NeoXModelConfig) -> torch.Tensor:
    """One rank's current GQA rows [Q | K | V] rearranged the way gpt-neox stored them before #1315:
    per query head h, [q_h | K rows h·f..(h+1)·f | V rows h·f..(h+1)·f], f = hd·kv/heads."""
    hd, nq, nkv = config.head_dim, config.num_heads // config.tp, config.num_kv_heads // config.tp
    q, k, v = qkv.split([nq * hd, nkv * hd, nkv * hd])
    f = hd * nkv // nq
    return torch.cat([torch.cat([q[h * hd:(h + 1) * hd], k[h * f:(h + 1) * f], v[h * f:(h + 1) * f]])
                      for h in range(nq)])


@pytest.mark.parametrize("tp", [1, 2])
def test_pre_1315_gqa_rows_are_read_per_query_head(tp: int) -> None:
    config, tensors = synthesize_variant("llama-new", tp=tp)
    old = {k: (pre_1315_rows(v, config) if "query_key_value" in k else v) for k, v in tensors.items()}
    history = config.model_copy(update={"gqa_layout": "pre-1315"})
    assert neox_forward(old, history, IDS).logits.equal(neox_forward(tensors, config, IDS).logits)
    assert (neox_forward(old, config, IDS).logits - neox_forward(tensors, config, IDS).logits).abs().max() > 1e-1


def test_pre_1345_rmsnorm_divides_by_rms_plus_eps() -> None:
    from mapper.verify.reference import NormParams, apply_norm

    x = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(0)) * 1e-3
    w = torch.rand(8, generator=torch.Generator().manual_seed(1)) + 0.5
    old = apply_norm(x, NormParams("rmsnorm", w, None, 1e-6, "pre-1345"))
    assert torch.allclose(old, w * x / (x.pow(2).mean(-1, keepdim=True).sqrt() + 1e-6), rtol=1e-6)
    new = apply_norm(x, NormParams("rmsnorm", w, None, 1e-6))
    assert torch.allclose(new, w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6), rtol=1e-6)
    assert not torch.allclose(old, new, rtol=1e-3)  # at this scale the two formulas part


def test_the_rmsnorm_formula_concerns_gpt_neox_own_rmsnorm_only() -> None:
    config, tensors = synthesize_variant("te-rmsnorm")
    history = config.model_copy(update={"rmsnorm_formula": "pre-1345"})
    assert neox_forward(tensors, history, IDS).logits.equal(neox_forward(tensors, config, IDS).logits)
    config, tensors = synthesize_variant("llama-new")
    history = config.model_copy(update={"rmsnorm_formula": "pre-1345"})
    assert not neox_forward(tensors, history, IDS).logits.equal(neox_forward(tensors, config, IDS).logits)
