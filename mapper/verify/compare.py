"""Compare a converted HF model with the NeoX reference, point by point, and blame the rules.

The points are the ones :func:`~mapper.verify.reference.neox_forward` gives: the embeddings
(input of block 0), every block's output, the final norm, the logits. They are captured from the
HF model with forward hooks, not ``output_hidden_states``: in transformers 5.x that tuple holds
the input of layer 0 and each layer's output, but ``capture_outputs(tie_last_hidden_states=True)``
overwrites its last entry with the *final-normed* state, so the last block's own output is lost.

Tolerances (:func:`default_tolerances`). A point passes when

    max|ref − cand| <= atol + rtol · max|ref|   and   ‖ref − cand‖ / ‖ref‖ <= rtol.

Both bounds scale with the activation, so one setting fits embeddings (~0.3), residual streams
and logits alike, and outlier features (which dominate ``max|ref|``) cannot hide a diffuse error
from the norm-wise bound. fp32: ``rtol 1e-4``, ``atol 1e-6``. Legitimate fp32 noise (summation
order, SDPA against an einsum softmax, TE's all-reduce simulated as a sum) measures at most
7e-7 relative on every synthetic variant at TP 1 and 2 (logits ≤ 5.3e-6 absolute), so 1e-4 leaves
two orders of magnitude for deeper and wider real models. The mistakes this module is tested
against move the first block by 0.15-1.1 relative (double or stale pre-MLP norm, swapped
gate/up, wrong QKV layout, summed row-parallel bias) and the subtlest, a rotary base of 1000
instead of 10000 in config.json, by 2e-2: still two orders above the bound. bf16 (``rtol 5e-2``,
``atol 1e-3``): one bf16 rounding is 4e-3 relative and the reference and HF round at different
places (attention probabilities, norms, residual adds), which measures up to 1.8e-2 on the tiny
models. The mapping mistakes above still show at 0.15-1.1, but the rotary-base mistake (2e-2)
hides in bf16 noise, and the noise grows with depth: verify in fp32 (the default) to prove a
conversion, in bf16 only to see the model in its training precision.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from mapper.configs import NeoXModelConfig
from mapper.engine.plan import fold_ranks
from mapper.errors import MapperError
from mapper.verify.reference import (
    LayerTensors,
    RowParallelResult,
    apply_norm,
    attention_block,
    load_norm,
    mlp_block,
    mlp_kind,
    neox_forward,
    per_rank_outputs,
)
from mapper.verify.report import Blame, Continuation, PointComparison, RuleRef, VerifyReport

Tensor = torch.Tensor


class ActivationPoints(Protocol):
    """Anything with the four kinds of points (reference or HF activations)."""

    embeddings: Tensor
    blocks: tuple[Tensor, ...]
    final_norm: Tensor
    logits: Tensor


@dataclass(frozen=True)
class Activations:
    """The points captured from an HF model, shaped like :class:`NeoXActivations`."""

    embeddings: Tensor  # [b, s, hidden]: input of block 0
    blocks: tuple[Tensor, ...]  # each block's output
    final_norm: Tensor  # [b, s, hidden]
    logits: Tensor  # [b, s, vocab of the HF model]


@dataclass(frozen=True)
class Tolerances:
    atol: float
    rtol: float


def default_tolerances(dtype: torch.dtype) -> Tolerances:
    """Bounds that pass legitimate rounding noise in ``dtype`` and catch real mistakes (module doc)."""
    if dtype == torch.float32 or dtype == torch.float64:
        return Tolerances(atol=1e-6, rtol=1e-4)
    if dtype in (torch.bfloat16, torch.float16):
        return Tolerances(atol=1e-3, rtol=5e-2)
    raise MapperError(f"cannot verify in dtype {dtype}", hint="use torch.float32 or torch.bfloat16")


def point_names(acts: ActivationPoints) -> list[str]:
    return ["embeddings", *(f"blocks.{i}" for i in range(len(acts.blocks))), "final_norm", "logits"]


def iter_points(acts: ActivationPoints) -> Iterator[tuple[str, Tensor]]:
    """(name, tensor) in forward order: embeddings, blocks.0 .. blocks.L-1, final_norm, logits."""
    yield "embeddings", acts.embeddings
    for i, block in enumerate(acts.blocks):
        yield f"blocks.{i}", block
    yield "final_norm", acts.final_norm
    yield "logits", acts.logits


# ---- capturing the HF model ----------------------------------------------------------------------


@dataclass(frozen=True)
class HFParts:
    """Where the points live in a transformers causal LM (GPTNeoX or Llama)."""

    layers: Sequence[nn.Module]
    final_norm: nn.Module


def hf_parts(model: nn.Module) -> HFParts:
    """Find the decoder layers and the final norm: ``gpt_neox.layers``/``final_layer_norm`` or
    ``model.layers``/``model.norm``."""
    base = getattr(model, "base_model", model)
    layers = getattr(base, "layers", None)
    norm = getattr(base, "final_layer_norm", None)
    norm = getattr(base, "norm", None) if norm is None else norm
    if layers is None or norm is None:
        raise MapperError(f"cannot find decoder layers and final norm in {type(model).__name__}",
                          hint="mapper verifies GPTNeoXForCausalLM and LlamaForCausalLM models")
    return HFParts(list(layers), norm)


def _first_tensor(output: Any) -> Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _hidden_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    return args[0] if args else kwargs["hidden_states"]


@contextmanager
def _hooks(hooks: list[tuple[nn.Module, str, Callable[..., None]]]) -> Iterator[None]:
    """Register ``(module, "pre"|"post", fn)`` hooks for the duration of a block of code."""
    handles = []
    try:
        for module, when, fn in hooks:
            if when == "pre":
                handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))
            else:
                handles.append(module.register_forward_hook(fn))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode and no grad for the run; the model's own mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def hf_activations(model: nn.Module, input_ids: Tensor) -> Activations:
    """Run ``model`` once on ``input_ids`` [batch, seq] and capture the reference's points."""
    parts = hf_parts(model)
    seen: dict[str, Tensor] = {}
    blocks: list[Tensor | None] = [None] * len(parts.layers)

    def embeddings_hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        seen["embeddings"] = _hidden_input(args, kwargs).detach()

    def block_hook(index: int) -> Callable[..., None]:
        def hook(_module: nn.Module, _args: tuple, output: Any) -> None:
            blocks[index] = _first_tensor(output).detach()
        return hook

    def norm_hook(_module: nn.Module, _args: tuple, output: Any) -> None:
        seen["final_norm"] = _first_tensor(output).detach()

    hooks: list[tuple[nn.Module, str, Callable[..., None]]] = [(parts.layers[0], "pre", embeddings_hook)]
    hooks += [(layer, "post", block_hook(i)) for i, layer in enumerate(parts.layers)]
    hooks.append((parts.final_norm, "post", norm_hook))
    with _evaluating(model), _hooks(hooks):
        logits = model(input_ids=input_ids, use_cache=False).logits.detach()
    if any(b is None for b in blocks) or "final_norm" not in seen:
        raise MapperError("the HF model's forward did not run every layer and the final norm")
    return Activations(seen["embeddings"], tuple(blocks), seen["final_norm"], logits)  # type: ignore[arg-type]


# ---- comparing -----------------------------------------------------------------------------------


def compare_tensors(name: str, reference: Tensor, candidate: Tensor, *, atol: float, rtol: float) -> PointComparison:
    """Max abs difference, relative error, cosine and the verdict for one point (in float64)."""
    if reference.shape != candidate.shape:
        raise MapperError(f"{name}: reference shape {tuple(reference.shape)} vs HF {tuple(candidate.shape)}",
                          where=name, hint="the HF config does not describe the converted model")
    a, b = reference.double().flatten(), candidate.double().flatten()
    diff = a - b
    max_abs = float(diff.abs().max()) if diff.numel() else 0.0
    norm_a, norm_b, norm_d = float(a.norm()), float(b.norm()), float(diff.norm())
    rel = norm_d / norm_a if norm_a > 0 else (0.0 if norm_d == 0 else float("inf"))
    cosine = float(a @ b) / (norm_a * norm_b) if norm_a > 0 and norm_b > 0 else (1.0 if norm_d == 0 else 0.0)
    scale = float(a.abs().max()) if a.numel() else 0.0
    tolerance = atol + rtol * scale
    ok = bool(max_abs <= tolerance and rel <= rtol)  # NaN fails both
    return PointComparison(name, tuple(reference.shape), max_abs, rel, cosine, scale, tolerance, rtol, ok)


def logit_statistics(reference: Tensor, candidate: Tensor) -> dict[str, float]:
    """KL(reference ‖ candidate) mean over positions, top-1 agreement and top-5 set overlap."""
    ref = reference.double().reshape(-1, reference.shape[-1])
    cand = candidate.double().reshape(-1, candidate.shape[-1])
    log_p, log_q = ref.log_softmax(-1), cand.log_softmax(-1)
    kl = float((log_p.exp() * (log_p - log_q)).sum(-1).mean())
    top1 = float((ref.argmax(-1) == cand.argmax(-1)).double().mean())
    k = min(5, ref.shape[-1])
    top_ref, top_cand = ref.topk(k, dim=-1).indices, cand.topk(k, dim=-1).indices
    overlap = (top_ref[:, :, None] == top_cand[:, None, :]).any(-1).double().sum(-1) / k
    return {"kl": kl, "top1": top1, "top5": float(overlap.mean())}


def compare(
    reference: ActivationPoints, candidate: ActivationPoints, *, atol: float, rtol: float,
) -> list[PointComparison]:
    """Every point, in forward order. Logits are compared over the candidate's vocabulary when it is
    a trimmed prefix of the reference's padded one (``--trim-vocab``)."""
    if len(reference.blocks) != len(candidate.blocks):
        raise MapperError(f"reference has {len(reference.blocks)} blocks, HF model {len(candidate.blocks)}",
                          hint="the HF config's num_hidden_layers does not match the checkpoint")
    results = []
    for (name, ref), (_, cand) in zip(iter_points(reference), iter_points(candidate)):
        if name != "logits":
            results.append(compare_tensors(name, ref, cand, atol=atol, rtol=rtol))
            continue
        ref, cand = common_vocab(ref, cand)
        point = compare_tensors(name, ref, cand, atol=atol, rtol=rtol)
        stats = logit_statistics(ref, cand)
        results.append(replace(point, **stats, compared_vocab=ref.shape[-1]))
    return results


def common_vocab(reference: Tensor, candidate: Tensor) -> tuple[Tensor, Tensor]:
    """Cut the reference's logits to the candidate's (trimmed) vocabulary."""
    vocab = candidate.shape[-1]
    if vocab > reference.shape[-1]:
        raise MapperError(f"the HF model has {vocab} vocabulary rows, the checkpoint only {reference.shape[-1]}",
                          hint="the HF config's vocab_size does not match the checkpoint")
    return reference[..., :vocab], candidate


# ---- greedy continuation -------------------------------------------------------------------------


def greedy_reference(
    tensors: Mapping[str, Tensor], config: NeoXModelConfig, input_ids: Tensor, steps: int, *,
    vocab: int, dtype: torch.dtype,
) -> Tensor:
    """Greedy decoding with the reference: one full forward per new token (no cache to get wrong)."""
    ids = input_ids
    for _ in range(steps):
        logits = neox_forward(tensors, config, ids, dtype=dtype).logits[:, -1, :vocab]
        ids = torch.cat([ids, logits.float().argmax(-1, keepdim=True)], dim=1)
    return ids[:, input_ids.shape[1]:]


def greedy_hf(model: nn.Module, input_ids: Tensor, steps: int, *, vocab: int) -> Tensor:
    """Greedy decoding with the HF model's own forward (argmax, no sampling, no cache, no EOS stop)."""
    ids = input_ids
    with _evaluating(model):
        for _ in range(steps):
            logits = model(input_ids=ids, use_cache=False).logits[:, -1, :vocab]
            ids = torch.cat([ids, logits.float().argmax(-1, keepdim=True)], dim=1)
    return ids[:, input_ids.shape[1]:]


def repetition_score(tokens: Tensor, n: int = 2) -> float:
    """Fraction of repeated n-grams (1 − distinct/total) in each sequence, averaged over the batch.

    A model that loops ("the the the", a repeated phrase) scores near 1; varied text near 0.
    """
    scores = []
    for row in tokens.tolist():
        grams = [tuple(row[i:i + n]) for i in range(len(row) - n + 1)]
        scores.append(1.0 - len(set(grams)) / len(grams) if grams else 0.0)
    return sum(scores) / len(scores) if scores else 0.0


def compare_continuations(reference: Tensor, candidate: Tensor, *, ngram: int = 2) -> Continuation:
    same = reference == candidate
    mismatched_steps = (~same).any(0).nonzero()
    return Continuation(
        steps=reference.shape[1],
        reference_tokens=reference.tolist(),
        candidate_tokens=candidate.tolist(),
        agreement=float(same.double().mean()) if same.numel() else 1.0,
        first_mismatch=int(mismatched_steps[0]) if len(mismatched_steps) else None,
        repetition_ngram=ngram,
        repetition_reference=repetition_score(reference, ngram),
        repetition_candidate=repetition_score(candidate, ngram),
    )


# ---- blame ---------------------------------------------------------------------------------------

_BLOCK = re.compile(r"^blocks\.(\d+)(?:\.(attention|mlp))?$")
_HINTS = {
    "embeddings": "check the embedding rules (vocab-parallel rows concatenated in rank order)",
    "attention": "check the QKV layout (per-head interleaved / GQA blocks / TE per-group), the attention "
                 "norm and the output projection and its bias; or the HF config's heads, rope_theta and "
                 "partial_rotary_factor",
    "mlp": "check the pre-MLP norm (TE mlp.layer_norm_* is the real one, post_attention_layernorm may be "
           "stale), gate/up order, the MLP-out bias merge; or the HF config's hidden_act and eps",
    "block": "the attention and MLP branches agree on their inputs, so the block's wiring differs: check "
             "use_parallel_residual (NeoX gpt-j-residual) in the HF config",
    "final_norm": "check the final norm rules and the HF config's layer_norm_eps / rms_norm_eps",
    "logits": "check the output layer rules (final_linear, or tie_word_embeddings) and the vocabulary size",
}


def keys_for_point(point: str, keys: Sequence[str]) -> list[str]:
    """The HF tensors a point reads directly (its own weights, not the upstream ones)."""
    embedding = [k for k in keys if re.search(r"(^|\.)(embed_in|embed_tokens)\.weight$", k)]
    if point == "embeddings":
        return embedding
    if point == "final_norm":
        return [k for k in keys if re.search(r"(^|\.)final_layer_norm\.|^model\.norm\.", k)]
    if point == "logits":
        out = [k for k in keys if re.fullmatch(r"(embed_out|lm_head)\.weight", k)]
        return out or embedding  # tied: the logits read the embedding
    match = _BLOCK.match(point)
    if not match:
        return []
    index, part = match.group(1), match.group(2)
    modules = {"attention": r"(input_layernorm|attention|self_attn)",
               "mlp": r"(post_attention_layernorm|mlp)"}.get(part or "", r"[^.]+")
    return [k for k in keys if re.search(rf"(^|\.)layers\.{index}\.{modules}\.", k)]


def rules_for_keys(plan: Any, keys: Sequence[str]) -> list[RuleRef]:
    """``plan.rules_for`` with each rule's ``file:line``, in the rule set's own order."""
    known = [k for k in keys if k in plan.targets]
    order = {op.id: index for index, op in enumerate(plan.ruleset.ops)}
    rules = sorted(plan.rules_for(known), key=lambda rule: order.get(rule, len(order)))
    return [RuleRef(rule, plan.ruleset.origin(rule)) for rule in rules]


def dropped_weights(plan: Any, source_prefix: str) -> list[str]:
    """Tensors under ``source_prefix`` (one NeoX layer) that the plan drops, FP8 metadata and rotary
    buffers aside: a real weight dropped in place of a stale one is the #1353 mistake."""
    by_rule: dict[str, list[str]] = {}
    for node in plan.dropped:
        by_rule.setdefault(node.rule_id, []).extend(
            v.key for v in node.inputs
            if v.key.startswith(source_prefix) and not v.key.split("@")[0].endswith(("_extra_state", "inv_freq")))
    return [f"{fold_ranks(sorted(keys))}  [{rule}]" for rule, keys in by_rule.items() if keys]


def blame(
    point: PointComparison, *, plan: Any | None, model: nn.Module, parts: list[PointComparison],
    source_prefix: str | None = None,
) -> Blame:
    """Name the tensors, and with a plan the rules, behind the first diverging point.

    ``source_prefix`` (``layer_XX.`` for a block) also lists what the rules drop from that layer."""
    keys = list(plan.targets) if plan is not None else list(model.state_dict())
    is_block = _BLOCK.match(point.name) is not None
    differing = [p for p in parts if not p.ok]
    if is_block and differing:
        blamed = sorted({k for p in differing for k in keys_for_point(p.name, keys)}, key=keys.index)
        names = " and ".join(p.name.rsplit(".", 1)[1] for p in differing)
        verb = "computes" if len(differing) == 1 else "compute"
        detail = f"inside {point.name}, re-run on the HF model's own inputs: {names} {verb} something else"
        hint = "; ".join(_HINTS[p.name.rsplit(".", 1)[1]] for p in differing)
    else:
        blamed = keys_for_point(point.name, keys)
        detail = f"{point.name} is the first point beyond tolerance; every earlier point agrees"
        hint = _HINTS["block"] if is_block else _HINTS.get(point.name)
    rules = rules_for_keys(plan, blamed) if plan is not None else []
    dropped = dropped_weights(plan, source_prefix) if plan is not None and source_prefix else []
    return Blame(point.name, detail, parts, blamed, rules, hint, dropped)


# ---- inside a block ------------------------------------------------------------------------------


def _branch(result: RowParallelResult, gpt_j_residual: bool) -> Tensor:
    """A branch's contribution to the residual, as all ranks together add it (reference.py wiring)."""
    outs = per_rank_outputs(result, gpt_j_residual=gpt_j_residual)
    return torch.stack(outs).sum(0) if gpt_j_residual else outs[0]


def block_parts(
    tensors: Mapping[str, Tensor], config: NeoXModelConfig, model: nn.Module, input_ids: Tensor, block: int, *,
    dtype: torch.dtype, atol: float, rtol: float,
) -> list[PointComparison]:
    """Compare block ``block``'s attention branch (norm + attention + bias) and MLP branch (pre-MLP
    norm + MLP) with the reference's, both fed the HF model's own inputs to those branches, so
    drift inherited from earlier in the block cannot blame the wrong branch."""
    layer_module = hf_parts(model).layers[block]
    attention = getattr(layer_module, "attention", None)
    attention = layer_module.self_attn if attention is None else attention
    seen: dict[str, Tensor] = {}

    def keep_input(name: str) -> Callable[..., None]:
        def hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            seen[name] = _hidden_input(args, kwargs).detach()
        return hook

    def keep_output(name: str) -> Callable[..., None]:
        def hook(_m: nn.Module, _args: tuple, output: Any) -> None:
            seen[name] = _first_tensor(output).detach()
        return hook

    hooks = [(layer_module.input_layernorm, "pre", keep_input("attn_in")), (attention, "post", keep_output("attn_out")),
             (layer_module.post_attention_layernorm, "pre", keep_input("mlp_in")),
             (layer_module.mlp, "post", keep_output("mlp_out"))]
    with _evaluating(model), _hooks(hooks):
        model(input_ids=input_ids, use_cache=False)

    layer = LayerTensors(tensors, config.block_layer_index(block), config, dtype)
    with torch.no_grad():
        x = seen["attn_in"].to(dtype)
        attn = _branch(attention_block(apply_norm(x, load_norm(layer, "input_layernorm", config)), layer, config),
                       config.gpt_j_residual)
        h = seen["mlp_in"].to(dtype)
        if mlp_kind(layer) != "te":  # TE LayerNormMLP norms its input itself
            norm = "input_layernorm" if config.gpt_j_residual and config.gpt_j_tied else "post_attention_layernorm"
            h = apply_norm(h, load_norm(layer, norm, config))
        mlp = _branch(mlp_block(h, layer, config), config.gpt_j_residual)
    return [compare_tensors(f"blocks.{block}.attention", attn, seen["attn_out"], atol=atol, rtol=rtol),
            compare_tensors(f"blocks.{block}.mlp", mlp, seen["mlp_out"], atol=atol, rtol=rtol)]


# ---- the whole verification ----------------------------------------------------------------------


def default_input_ids(config: NeoXModelConfig, vocab: int, *, seed: int, batch: int, seq_len: int) -> Tensor:
    """Seeded random token ids below the real (unpadded) vocabulary, when it is known."""
    high = min(vocab, config.orig_vocab_size or vocab)
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, high, (batch, seq_len), generator=generator)


def _model_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def verify_conversion(
    neox_tensors: Mapping[str, Tensor],
    config: NeoXModelConfig,
    hf_model: nn.Module,
    *,
    plan: Any | None = None,
    input_ids: Tensor | None = None,
    seed: int = 0,
    batch: int = 2,
    seq_len: int = 16,
    continuation: int = 8,
    dtype: torch.dtype = torch.float32,
    atol: float | None = None,
    rtol: float | None = None,
) -> VerifyReport:
    """Run the NeoX reference and ``hf_model`` on the same tokens and compare them point by point.

    ``plan`` (the conversion's :class:`~mapper.engine.Plan`) lets a failure name the rules that
    produced the diverging point's tensors. ``dtype`` is the compute precision of both sides
    (bf16: compare in the training precision, with looser default tolerances); a model held in
    another dtype is compared through a cast copy (load it in ``dtype`` to avoid the copy).
    """
    tol = default_tolerances(dtype)
    atol = tol.atol if atol is None else atol
    rtol = tol.rtol if rtol is None else rtol
    model = hf_model if _model_dtype(hf_model) == dtype else copy.deepcopy(hf_model).to(dtype)
    vocab = int(model.get_output_embeddings().weight.shape[0])
    if input_ids is None:
        input_ids = default_input_ids(config, vocab, seed=seed, batch=batch, seq_len=seq_len)
        used_seed: int | None = seed
    else:
        used_seed = None
    input_ids = input_ids.long()
    if input_ids.dim() != 2:
        raise MapperError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    if input_ids.shape[1] + continuation > config.positions:
        raise MapperError(f"{input_ids.shape[1]} tokens + {continuation} continuation exceed the model's "
                          f"{config.positions} positions", hint="use a shorter seq_len or continuation")

    reference = neox_forward(neox_tensors, config, input_ids, dtype=dtype)
    candidate = hf_activations(model, input_ids)
    points = compare(reference, candidate, atol=atol, rtol=rtol)

    cont = None
    if continuation > 0:
        ref_tokens = greedy_reference(neox_tensors, config, input_ids, continuation, vocab=vocab, dtype=dtype)
        hf_tokens = greedy_hf(model, input_ids, continuation, vocab=vocab)
        cont = compare_continuations(ref_tokens, hf_tokens)

    first = next((p for p in points if not p.ok), None)
    found = None
    if first is not None:
        parts: list[PointComparison] = []
        prefix = None
        match = _BLOCK.match(first.name)
        if match:
            block = int(match.group(1))
            parts = block_parts(neox_tensors, config, model, input_ids, block, dtype=dtype, atol=atol, rtol=rtol)
            prefix = f"layer_{config.block_layer_index(block):02d}."
        found = blame(first, plan=plan, model=model, parts=parts, source_prefix=prefix)
    return VerifyReport(points=points, atol=atol, rtol=rtol, dtype=str(dtype).removeprefix("torch."),
                        input_shape=(int(input_ids.shape[0]), int(input_ids.shape[1])), seed=used_seed,
                        continuation=cont, blame=found)
