"""The reference GPT-NeoX forward, computed directly from flattened NeoX tensors.

This is what a converted model is compared against, so it follows NeoX's code, not HF's. Each
function names the NeoX (EleutherAI/gpt-neox) or Transformer Engine (NVIDIA/TransformerEngine)
source it follows. The input is the flattened namespace of :func:`mapper.formats.naming.neox_key`
(``layer_XX.<name>@rankN``); the naming of each module is detected from its keys.

Tensor parallelism is simulated rank by rank, as the ranks compute it:

- column-parallel layers (QKV, MLP-in, vocab-parallel embedding / output layer) run per rank on
  that rank's shard; their outputs stay local (heads / MLP columns) or are gathered (logits);
- row-parallel layers (attention out, MLP out) give per-rank partial sums. What happens next was
  read in ``megatron/model/transformer.py`` (``ParallelTransformerLayer.forward``,
  ``get_mlp``/attention construction with ``parallel_output=self.gpt_j_residual``) and
  ``megatron/mpu/layers.py`` (``RowParallelLinear.forward``: no all-reduce when
  ``parallel_output``; with ``skip_bias_add`` the bias is returned, not added):

  * ``gpt_j_residual: false`` -- the module all-reduces, then the layer adds the bias once
    (``bias_dropout_fn(..., bias=attention_bias, residual=residual)``);
  * ``gpt_j_residual: true`` -- each rank adds its (replicated) bias to its *partial* output,
    ``attn_r + b_attn + mlp_r + b_mlp``, and one ``self.reduce`` (all-reduce) sums the ranks: the
    effective bias is TP × the stored bias.
  * TE modules are different: NeoX's ``TEMultiheadAttention``, ``TELayerNormMLP`` and
    ``TERowParallelLinear`` (``megatron/model/transformer_engine.py``) accept but ignore
    ``parallel_output``; TE's row-parallel ``Linear`` / ``LayerNormMLP`` all-reduce inside
    (``transformer_engine/pytorch/module/linear.py``: ``allreduce(out, tp_group)`` for
    ``parallel_mode == "row"``; ``layernorm_mlp.py``: ``allreduce(fc2_out, tp_group)``) and, with
    ``return_bias=True``, return the bias un-added. Under ``gpt_j_residual`` NeoX then adds the
    bias and all-reduces again, so a TE module's output counts TP times (inferred from the code;
    no TE run was possible here).

Other facts followed here: ``ParallelSelfAttention`` splits MHA QKV rows per rank as
``[heads_r, 3, hd]`` and GQA rows as ``[Q_r | K_r | V_r]`` (``gqa_project``), then
``repeat_interleave``s K/V; TE's ``MultiheadAttention`` (``qkv_weight_interleaved=True``, the default
NeoX keeps) views them as ``[groups_r, heads/groups + 2, hd]``. The TE LayerNormMLP normalizes
inside with its fixed eps and NeoX skips ``post_attention_layernorm`` (``if
self.neox_args.te_layernorm_mlp: layernorm_output = attention_output``), so a stale
``post_attention_layernorm`` in the checkpoint is ignored. Gated MLPs: NeoX's ``Gated_Activation``
does ``x, gate = chunk(2); act(gate) * x`` per shard; TE does ``act(first) * second`` (TE's
``tests/pytorch/test_numerics.py`` ``TorchGLU``), and TE's GELU is the tanh approximation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from mapper.configs import NeoXModelConfig
from mapper.formats.naming import neox_key
from mapper.errors import CheckpointError, MapperError

Tensor = torch.Tensor


@dataclass(frozen=True)
class NeoXActivations:
    """What the reference computed, all ``[batch, seq, ...]``."""

    embeddings: Tensor  # [b, s, hidden]: word (+ learned position) embeddings
    blocks: tuple[Tensor, ...]  # one [b, s, hidden] output per transformer block
    final_norm: Tensor  # [b, s, hidden]
    logits: Tensor  # [b, s, padded vocab]


# ---- reading one pipeline layer ----------------------------------------------------------------


class LayoutUnknown(CheckpointError):
    """The built-in reference does not know how this checkpoint lays out a module.

    It knows gpt-neox's own modules and the shipped TE layouts; a user-written rule set may
    convert a layout it has never seen. That is no reason to doubt the config: verify against
    gpt-neox itself instead (``mapper reference-script``, then ``mapper verify --reference``).
    """

    def __init__(self, message: str, *, where: str | None = None, hint: str | None = None):
        super().__init__(
            f"the built-in reference does not know this layout: {message}", where=where,
            hint=(hint + "; " if hint else "") + "if a rule set of your own converts it, verify against gpt-neox's "
            "own forward pass: `mapper reference-script` prints a script to run in your gpt-neox "
            "environment, then `mapper verify --reference DUMP HF_FOLDER`")


class LayerTensors:
    """The tensors of one pipeline layer, across TP ranks, cast to the compute dtype.

    ``tensors`` may be lazy (a reader-backed mapping): a layer reads only its own keys, each once
    (``cache``), so verification holds one layer at a time.
    ``weights_dtype`` rounds every weight through the precision the HF model was cast to
    (``convert --dtype``), so that both sides compute with the very same weights.
    """

    def __init__(self, tensors: Mapping[str, Tensor], layer: int, config: NeoXModelConfig, dtype: torch.dtype,
                 *, device: torch.device | str | None = None, weights_dtype: torch.dtype | None = None):
        self.tensors, self.layer, self.tp, self.dtype = tensors, layer, config.tp, dtype
        self.device, self.weights_dtype = device, weights_dtype
        self.cache: dict[str, Tensor] = {}

    def key(self, name: str, rank: int = 0) -> str:
        return neox_key(self.layer, name, rank)

    def has(self, name: str) -> bool:
        return self.key(name) in self.tensors

    def raw(self, key: str) -> Tensor:
        if key not in self.cache:
            self.cache[key] = self.tensors[key]
        return self.cache[key]

    def _prepared(self, tensor: Tensor) -> Tensor:
        if self.weights_dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(self.weights_dtype)
        return tensor.to(device=self.device, dtype=self.dtype)

    def shards(self, name: str) -> list[Tensor]:
        """Every rank's copy of ``name`` (sharded tensors)."""
        out = []
        for rank in range(self.tp):
            key = self.key(name, rank)
            if key not in self.tensors:
                raise CheckpointError(f"tensor missing: {key}", where=key,
                                      hint="the checkpoint does not match the config (variant, TP or naming)")
            out.append(self._prepared(self.raw(key)))
        return out

    def replicated(self, name: str) -> Tensor:
        """A tensor every rank holds a copy of (rank 0's is used).

        The copies must agree; a last-bit drift (rtol 1e-3) is tolerated because it changes
        nothing a verification could see, anything larger means an inconsistent checkpoint.
        """
        shards = self.shards(name)
        for rank, t in enumerate(shards[1:], start=1):
            if t.shape != shards[0].shape or not torch.allclose(t.float(), shards[0].float(), rtol=1e-3, atol=1e-6):
                raise CheckpointError(f"replicated tensor differs between rank 0 and rank {rank}",
                                      where=self.key(name, rank),
                                      hint="every TP rank must hold the same copy of norms and row-parallel biases")
        return shards[0]

    def optional_replicated(self, name: str) -> Tensor | None:
        return self.replicated(name) if self.has(name) else None


# ---- embeddings, norms, rotary, attention, MLP -------------------------------------------------


def embed(layer: LayerTensors, config: NeoXModelConfig, input_ids: Tensor) -> Tensor:
    """``megatron/model/word_embeddings.py`` Embedding: vocab-parallel lookup (+ learned positions).

    Each rank looks up the ids in its vocabulary range and the all-reduce sums the ranks, which
    equals a lookup in the shards concatenated along the vocabulary.
    """
    table = torch.cat(layer.shards("word_embeddings.weight"), dim=0)
    if int(input_ids.max()) >= table.shape[0] or int(input_ids.min()) < 0:
        raise MapperError(f"input ids must be in [0, {table.shape[0]})")
    x = F.embedding(input_ids.to(table.device), table)
    if config.pos_emb == "learned":
        positions = torch.arange(input_ids.shape[1], device=table.device)
        x = x + F.embedding(positions, layer.replicated("position_embeddings.weight"))[None]
    return x


@dataclass(frozen=True)
class NormParams:
    family: Literal["layernorm", "rmsnorm"]
    weight: Tensor
    bias: Tensor | None
    eps: float
    formula: Literal["current", "pre-1345"] = "current"  # RMSNorm only: gpt-neox's own before #1345


def load_norm(layer: LayerTensors, prefix: str, config: NeoXModelConfig, *, eps: float | None = None) -> NormParams:
    """A norm module's parameters, whatever its class.

    ``megatron/model/norms.py``: torch ``LayerNorm`` (``.weight``, ``.bias``), NeoX ``RMSNorm``
    (``.scale``, newest NeoX also ``.offset``); ``transformer_engine.py``: ``TELayerNorm`` /
    ``TERMSNorm`` wrap ``te.pytorch.LayerNorm/RMSNorm`` as ``self.norm`` (``.norm.weight``,
    ``.norm.bias``). TE LayerNormMLP's own norm is read by :func:`mlp_block`.
    """
    eps = config.norm_eps if eps is None else eps
    # gpt-neox's own RMSNorm changed formula with #1345; TE's norms always use rsqrt
    formula = config.rmsnorm_formula if config.norm == "rmsnorm" else "current"
    for weight, bias in ((f"{prefix}.norm.weight", f"{prefix}.norm.bias"),
                         (f"{prefix}.scale", f"{prefix}.offset"),
                         (f"{prefix}.weight", f"{prefix}.bias")):
        if layer.has(weight):
            return NormParams(config.norm_family, layer.replicated(weight), layer.optional_replicated(bias), eps,
                              formula)
    raise LayoutUnknown(f"no norm parameters under {prefix!r}", where=layer.key(prefix + ".*"),
                        hint=f"it knows {prefix}.weight, {prefix}.scale and {prefix}.norm.weight")


def apply_norm(x: Tensor, p: NormParams) -> Tensor:
    """LayerNorm, or RMSNorm as NeoX's current ``RMSNorm`` / TE compute it:
    ``x * rsqrt(mean(x^2) + eps) * weight (+ offset)`` in fp32; before gpt-neox #1345 NeoX's own
    RMSNorm computed ``x / (‖x‖ / sqrt(d) + eps)`` in x's dtype (``formula="pre-1345"``)."""
    if p.family == "layernorm":
        return F.layer_norm(x, (x.shape[-1],), p.weight, p.bias, p.eps)
    if p.formula == "pre-1345":
        rms = x.norm(2, dim=-1, keepdim=True) * x.shape[-1] ** -0.5
        out = p.weight * (x / (rms + p.eps))
        return (out + p.bias if p.bias is not None else out).to(x.dtype)
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + p.eps)
    out = p.weight.float() * normed
    if p.bias is not None:
        out = out + p.bias.float()
    return out.to(x.dtype)


def rotary_tables(
    config: NeoXModelConfig, seq: int, inv_freq: Tensor | None, dtype: torch.dtype,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """``megatron/model/positional_embeddings.py`` RotaryEmbedding: ``inv_freq = 1/base^(2i/dim)``
    over ``dim = int(head_dim * rotary_pct)``, ``emb = cat(freqs, freqs)``; fp32 cos/sin."""
    dim = config.rotary_ndims
    if inv_freq is None:
        inv_freq = 1.0 / (config.rotary_emb_base ** (torch.arange(0, dim, 2, device=device).float() / dim))
    freqs = torch.outer(torch.arange(seq, dtype=torch.float32, device=inv_freq.device), inv_freq.float())
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """NeoX ``apply_rotary_pos_emb`` (rotate-half) on the first ``rotary_ndims`` dims of each head.

    ``x``: [b, s, heads, hd]; cos/sin: [s, rotary_ndims]. The remaining dims pass through
    (``ParallelSelfAttention.forward`` partial rotary; TE's fused rope does the same).
    """
    n = cos.shape[-1]
    rot, rest = x[..., :n], x[..., n:]
    half = n // 2
    rotated = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.cat([rot * c + rotated * s, rest], dim=-1)


def split_qkv(mixed: Tensor, config: NeoXModelConfig, layout: Literal["neox", "te"]) -> tuple[Tensor, Tensor, Tensor]:
    """One rank's fused QKV output [b, s, rows_r] -> q [b,s,nq,hd], k/v [b,s,nkv,hd].

    NeoX MHA: ``view(np, 3*hn)`` + split (transformer.py forward); NeoX GQA: ``torch.split`` into
    ``[np*hn, kvp*hn, kvp*hn]`` (``gqa_project``); TE: ``view(ng, np/ng + 2, hn)`` split
    ``(np/ng, 1, 1)`` (``multi_head_attention.py``, ``qkv_weight_interleaved``). NeoX GQA before
    gpt-neox #1315 (``config.gqa_layout == "pre-1315"``): ``view(np, hn + 2f)`` split ``[hn, f, f]``
    with ``f = hn * kvp / np``, the K and V parts of all query heads then read as ``[kvp, hn]``.
    """
    b, s, _ = mixed.shape
    hd = config.head_dim
    nq, nkv = config.num_heads // config.tp, config.num_kv_heads // config.tp
    if layout == "te":
        per = nq // nkv
        grouped = mixed.view(b, s, nkv, per + 2, hd)
        q = grouped[:, :, :, :per].reshape(b, s, nq, hd)
        return q, grouped[:, :, :, per], grouped[:, :, :, per + 1]
    if not config.is_gqa:
        q, k, v = mixed.view(b, s, nq, 3 * hd).split(hd, dim=-1)
        return q, k, v
    if config.gqa_layout == "pre-1315":
        f = hd * nkv // nq
        q, k, v = mixed.view(b, s, nq, hd + 2 * f).split([hd, f, f], dim=-1)
        return q, k.reshape(b, s, nkv, hd), v.reshape(b, s, nkv, hd)
    q, k, v = mixed.split([nq * hd, nkv * hd, nkv * hd], dim=-1)
    return q.reshape(b, s, nq, hd), k.reshape(b, s, nkv, hd), v.reshape(b, s, nkv, hd)


def causal_attention(q: Tensor, k: Tensor, v: Tensor, window: int | None = None) -> Tensor:
    """Softmax(q k^T / sqrt(hd), causal) v with K/V heads ``repeat_interleave``d for GQA.
    Returns [b, s, nq * hd] (heads concatenated, as ``context_layer.view(..., hp)``).

    ``window`` is NeoX's ``sliding_window_width`` W: the query at position i attends to keys
    i-W .. i (W + 1 keys), as flash-attn's ``window_size=(W, -1)`` that NeoX's flash path passes
    (and its training mask, ``megatron/utils.py`` ``get_attn_mask``: ``triu(diagonal=-W)``)."""
    b, s, nq, hd = q.shape
    rep = nq // k.shape[2]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) / hd**0.5
    mask = torch.ones(s, s, dtype=torch.bool, device=q.device).triu(1)
    if window is not None:
        mask |= torch.ones(s, s, dtype=torch.bool, device=q.device).tril(-window - 1)
    probs = scores.masked_fill(mask, float("-inf")).softmax(-1)
    ctx = torch.einsum("bhqk,bkhd->bqhd", probs, v.float()).to(q.dtype)
    return ctx.reshape(b, s, nq * hd)


@dataclass(frozen=True)
class RowParallelResult:
    """A row-parallel module's per-rank partial outputs, its bias and whether it all-reduces itself."""

    partials: list[Tensor]
    bias: Tensor | None
    reduces_inside: bool


def attention_block(x: Tensor, layer: LayerTensors, config: NeoXModelConfig) -> RowParallelResult:
    """Self-attention on normed input ``x``: NeoX ``ParallelSelfAttention`` or TE ``MultiheadAttention``."""
    te = layer.has("attention.qkv.weight")
    if not te and not layer.has("attention.query_key_value.weight"):
        raise LayoutUnknown("no fused QKV weight (attention.qkv.weight or attention.query_key_value.weight)",
                            where=layer.key("attention.*"))
    if te != config.te_mha:
        raise LayoutUnknown(
            f"the attention keys are {'TE' if te else 'NeoX'}'s but the config says te_mha={config.te_mha}",
            where=layer.key("attention.*"), hint="if the config is wrong, fix te-mha in it")
    qkv, out = ("attention.qkv", "attention.proj") if te else ("attention.query_key_value", "attention.dense")
    weights = layer.shards(f"{qkv}.weight")
    biases = layer.shards(f"{qkv}.bias") if layer.has(f"{qkv}.bias") else [None] * config.tp
    out_weights = layer.shards(f"{out}.weight")
    cos = sin = None
    if config.pos_emb == "rotary":
        cos, sin = rotary_tables(config, x.shape[1], _stored_inv_freq(layer, config), x.dtype, x.device)
    partials = []
    for w, b, wo in zip(weights, biases, out_weights):
        q, k, v = split_qkv(F.linear(x, w, b), config, "te" if te else "neox")
        if cos is not None:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        partials.append(F.linear(causal_attention(q, k, v, config.effective_sliding_window), wo))
    return RowParallelResult(partials, layer.optional_replicated(f"{out}.bias"), te or config.te_rowparallel)


def _stored_inv_freq(layer: LayerTensors, config: NeoXModelConfig) -> Tensor | None:
    """The saved rotary buffer, if any (NeoX ``rotary_save_freqs_buffer``); it must match the config."""
    for name in ("attention.rotary_emb.inv_freq", "attention.rotary_embeddings.inv_freq"):
        if layer.has(name):
            stored = layer.replicated(name).float()
            dim = config.rotary_ndims
            expected = 1.0 / (config.rotary_emb_base ** (torch.arange(0, dim, 2, device=stored.device).float() / dim))
            tol = 1e-5 if layer.raw(layer.key(name)).dtype == torch.float32 and layer.weights_dtype in (
                None, torch.float32, torch.float64) else 1e-2
            if stored.shape != expected.shape or not torch.allclose(stored, expected, rtol=tol, atol=0):
                raise MapperError(
                    "the checkpoint's rotary inv_freq does not match the config's rotary-emb-base / rotary-pct",
                    where=layer.key(name),
                    hint=f"config gives base {config.rotary_emb_base} over {dim} dims; check the YAML "
                    "(the official converter once defaulted the base to 1000)")
            return stored
    return None


def neox_activation(h: Tensor, config: NeoXModelConfig) -> Tensor:
    """NeoX's own MLP activation (``megatron/model/activations.py``; ``Gated_Activation`` in
    transformer.py: ``x, gate = chunk(2); act(gate) * x``). GELU is tanh only with bias_gelu_fusion
    (``bias_gelu``); GEGLU uses exact ``F.gelu``."""
    if config.is_gated:
        x, gate = h.chunk(2, dim=-1)
        act = {"swiglu": F.silu, "geglu": F.gelu, "reglu": F.relu}[config.activation]
        return act(gate) * x
    if config.activation == "gelu":
        return F.gelu(h, approximate="tanh" if config.bias_gelu_fusion else "none")
    return {"relu": F.relu, "silu": F.silu}[config.activation](h)


def te_activation(h: Tensor, config: NeoXModelConfig) -> Tensor:
    """TE LayerNormMLP activations: tanh GELU; gated = act(first half) * second half."""
    table = {"gelu": lambda t: F.gelu(t, approximate="tanh"), "relu": F.relu, "silu": F.silu}
    if config.is_gated:
        first, second = h.chunk(2, dim=-1)
        kind = {"swiglu": "silu", "geglu": "gelu", "reglu": "relu"}[config.activation]
        return table[kind](first) * second
    if config.activation not in ("gelu", "relu"):
        raise MapperError(f"TE LayerNormMLP does not support activation {config.activation!r} in NeoX")
    return table[config.activation](h)


def mlp_kind(layer: LayerTensors) -> Literal["te", "new", "legacy", "llama_legacy"]:
    """Detect the MLP naming from its keys (as the official converter does, by the MLP-in key)."""
    for name, kind in (("mlp.fc1_weight", "te"), ("mlp.linear1.weight", "new"),
                       ("mlp.dense_h_to_4h.weight", "legacy"), ("mlp.w1.weight", "llama_legacy")):
        if layer.has(name):
            return kind  # type: ignore[return-value]
    raise LayoutUnknown("no MLP weights it knows", where=layer.key("mlp.*"),
                        hint="it knows mlp.fc1_weight, mlp.linear1.weight, mlp.dense_h_to_4h.weight and mlp.w1.weight")


def mlp_block(x: Tensor, layer: LayerTensors, config: NeoXModelConfig) -> RowParallelResult:
    """The MLP on its input ``x`` (already normed, except for TE LayerNormMLP which norms itself)."""
    kind = mlp_kind(layer)
    if (kind == "te") != config.te_layernorm_mlp:
        raise LayoutUnknown(
            f"the MLP keys are {'TE' if kind == 'te' else 'NeoX'}'s ({kind}) but the config says "
            f"te_layernorm_mlp={config.te_layernorm_mlp}",
            where=layer.key("mlp.*"), hint="if the config is wrong, fix te-layernorm-mlp in it")
    partials: list[Tensor] = []
    if kind == "te":  # transformer_engine LayerNormMLP: norm -> fc1 -> act -> fc2 (bias returned)
        norm = NormParams(config.norm_family, layer.replicated("mlp.layer_norm_weight"),
                          layer.optional_replicated("mlp.layer_norm_bias"), config.mlp_norm_eps)
        xn = apply_norm(x, norm)
        fc1_b = layer.shards("mlp.fc1_bias") if layer.has("mlp.fc1_bias") else [None] * config.tp
        for w1, b1, w2 in zip(layer.shards("mlp.fc1_weight"), fc1_b, layer.shards("mlp.fc2_weight")):
            partials.append(F.linear(te_activation(F.linear(xn, w1, b1), config), w2))
        return RowParallelResult(partials, layer.optional_replicated("mlp.fc2_bias"), True)
    if kind == "llama_legacy":  # LLaMAParallelMLP: w2(act(w1 x) * w3 x), no biases
        w1s, w3s, w2s = (layer.shards(f"mlp.{n}.weight") for n in ("w1", "w3", "w2"))
        for w1, w3, w2 in zip(w1s, w3s, w2s):
            partials.append(F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2))
        return RowParallelResult(partials, None, config.te_rowparallel)
    name_in, name_out = ("mlp.linear1", "mlp.linear2") if kind == "new" else ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
    b_in = layer.shards(f"{name_in}.bias") if layer.has(f"{name_in}.bias") else [None] * config.tp
    for w1, b1, w2 in zip(layer.shards(f"{name_in}.weight"), b_in, layer.shards(f"{name_out}.weight")):
        partials.append(F.linear(neox_activation(F.linear(x, w1, b1), config), w2))
    return RowParallelResult(partials, layer.optional_replicated(f"{name_out}.bias"), config.te_rowparallel)


def per_rank_outputs(result: RowParallelResult, *, gpt_j_residual: bool) -> list[Tensor]:
    """Each rank's module output as NeoX's layer holds it, bias included (see module docstring)."""
    if result.reduces_inside or not gpt_j_residual:
        total = torch.stack(result.partials).sum(0)  # the module's own all-reduce
        outs = [total] * len(result.partials)
    else:
        outs = list(result.partials)  # parallel_output=True: not reduced yet
    return outs if result.bias is None else [o + result.bias for o in outs]


def transformer_block(x: Tensor, layer: LayerTensors, config: NeoXModelConfig) -> Tensor:
    """``ParallelTransformerLayer.forward`` (megatron/model/transformer.py), both residual modes."""
    te_mlp = mlp_kind(layer) == "te"
    ln1 = load_norm(layer, "input_layernorm", config)
    if config.gpt_j_residual:
        x1 = apply_norm(x, ln1)
        if te_mlp:
            x2 = x  # the LayerNormMLP norms x itself (also when gpt_j_tied)
        elif config.gpt_j_tied:
            x2 = x1
        else:
            x2 = apply_norm(x, load_norm(layer, "post_attention_layernorm", config))
        attn = per_rank_outputs(attention_block(x1, layer, config), gpt_j_residual=True)
        mlp = per_rank_outputs(mlp_block(x2, layer, config), gpt_j_residual=True)
        return x + torch.stack([a + m for a, m in zip(attn, mlp)]).sum(0)  # one all-reduce
    attn = per_rank_outputs(attention_block(apply_norm(x, ln1), layer, config), gpt_j_residual=False)[0]
    h = x + attn
    mlp_in = h if te_mlp else apply_norm(h, load_norm(layer, "post_attention_layernorm", config))
    return h + per_rank_outputs(mlp_block(mlp_in, layer, config), gpt_j_residual=False)[0]


def output_logits(h: Tensor, layer: LayerTensors, config: NeoXModelConfig) -> Tensor:
    """``parallel_lm_logits`` with the tied word embeddings (``layer`` 0), or ``ParallelLinear``
    (``final_linear`` of the last layer, column-parallel over the vocabulary); per-rank logits are
    gathered along the vocabulary."""
    name = "word_embeddings.weight" if config.tied else "final_linear.weight"
    return torch.cat([F.linear(h, w) for w in layer.shards(name)], dim=-1)


class NeoXStages:
    """The reference forward one stage at a time (embedding, each block, final norm, logits), reading
    each layer's tensors when it is computed: what streamed verification holds is one layer.

    ``device`` is where it computes; ``weights_dtype`` rounds the weights as ``convert --dtype`` did.
    """

    def __init__(self, tensors: Mapping[str, Tensor], config: NeoXModelConfig, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, weights_dtype: torch.dtype | None = None):
        self.tensors, self.config, self.dtype = tensors, config, dtype
        self.device, self.weights_dtype = device, weights_dtype

    def layer(self, index: int, dtype: torch.dtype | None = None) -> LayerTensors:
        return LayerTensors(self.tensors, index, self.config, dtype or self.dtype, device=self.device,
                            weights_dtype=self.weights_dtype)

    def embeddings(self, input_ids: Tensor) -> Tensor:
        if input_ids.dim() != 2:
            raise MapperError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        with torch.no_grad():
            return embed(self.layer(0), self.config, input_ids).to(self.dtype)

    def block(self, block: int, x: Tensor, layer: LayerTensors | None = None) -> Tensor:
        with torch.no_grad():
            return transformer_block(x, layer or self.layer(self.config.block_layer_index(block)), self.config)

    def final_norm(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return apply_norm(x, load_norm(self.layer(self.config.final_norm_layer_index), "norm", self.config))

    def logits(self, h: Tensor) -> Tensor:
        index = 0 if self.config.tied else self.config.final_linear_layer_index
        with torch.no_grad():
            return output_logits(h, self.layer(index), self.config)


def neox_forward(
    tensors: Mapping[str, Tensor],
    config: NeoXModelConfig,
    input_ids: torch.LongTensor,
    *,
    dtype: torch.dtype = torch.float32,
) -> NeoXActivations:
    """GPT-NeoX's forward on ``input_ids`` [batch, seq], as the TP ranks of ``config.tp`` compute it.

    Layer indices follow ``megatron/model/gpt2_model.py`` (``GPT2ModelPipe.init_specs``): 0 the
    embedding, 2..L+1 the blocks, L+3 the final norm (``NormPipe``: ``norm.*``), L+4 the
    untied ``final_linear``.
    """
    stages = NeoXStages(tensors, config, dtype=dtype)
    x = embeddings = stages.embeddings(input_ids)
    blocks = []
    for block in range(config.num_layers):
        x = stages.block(block, x)
        blocks.append(x)
    h = stages.final_norm(x)
    return NeoXActivations(embeddings=embeddings, blocks=tuple(blocks), final_norm=h, logits=stages.logits(h))
