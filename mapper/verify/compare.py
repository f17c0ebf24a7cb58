"""Comparing activations: one point's verdict, logit statistics, continuations, and the whole
verification of a model in memory (:func:`verify_conversion`).

The points are the embeddings (input of block 0), every block's output, the final norm and the
logits; how each is judged (on the same input, blocks by their update, per-dtype tolerances) is
described in :mod:`mapper.verify.tolerances`, the streamed walk in :mod:`mapper.verify.walk`.
:func:`hf_activations` captures the points of a whole HF forward with hooks, not
``output_hidden_states``: in transformers 5.x that tuple holds the input of layer 0 and each
layer's output, but ``capture_outputs(tie_last_hidden_states=True)`` overwrites its last entry with
the *final-normed* state, so the last block's own output is lost.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch
from torch import nn

from mapper.configs import NeoXModelConfig
from mapper.errors import MapperError
from mapper.verify.hf_side import first_tensor as _first_tensor
from mapper.verify.hf_side import hf_parts
from mapper.verify.report import Continuation, PointComparison, VerifyReport
from mapper.verify.tolerances import ROUNDING, Tolerances, default_tolerances  # noqa: F401 - re-exported

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


def iter_points(acts: ActivationPoints) -> Iterator[tuple[str, Tensor]]:
    """(name, tensor) in forward order: embeddings, blocks.0 .. blocks.L-1, final_norm, logits."""
    yield "embeddings", acts.embeddings
    for i, block in enumerate(acts.blocks):
        yield f"blocks.{i}", block
    yield "final_norm", acts.final_norm
    yield "logits", acts.logits


# ---- capturing the HF model ----------------------------------------------------------------------


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


def judge(
    name: str, reference: Tensor, candidate: Tensor, *, atol: float, rtol: float, unit: float = 0.0,
    before: Tensor | None = None, probe: PointComparison | None = None,
) -> PointComparison:
    """One point's verdict (in float64): ``before`` is the input both sides were given when the
    point is judged by its update (a block), ``unit`` the unit roundoff of the compared dtype;
    the bounds are :mod:`mapper.verify.tolerances`'. A failing ``probe`` fails the point."""
    if reference.shape != candidate.shape:
        raise MapperError(f"{name}: reference shape {tuple(reference.shape)} vs HF {tuple(candidate.shape)}",
                          where=name, hint="the HF config does not describe the converted model")
    ref = reference.detach().to("cpu", torch.float64).flatten()
    cand = candidate.detach().to("cpu", torch.float64).flatten()
    start = None if before is None else before.detach().to("cpu", torch.float64).flatten()
    basis = ref if start is None else ref - start
    moved = cand if start is None else cand - start
    diff = ref - cand
    max_abs = float(diff.abs().max()) if diff.numel() else 0.0
    norm_basis, norm_moved, norm_diff = float(basis.norm()), float(moved.norm()), float(diff.norm())
    rel = norm_diff / norm_basis if norm_basis > 0 else (0.0 if norm_diff == 0 else float("inf"))
    if norm_basis > 0 and norm_moved > 0:
        cosine = float(basis @ moved) / (norm_basis * norm_moved)
    else:
        cosine = 1.0 if norm_diff == 0 else 0.0
    scale = float(basis.abs().max()) if basis.numel() else 0.0
    rounding = ROUNDING * unit
    tolerance = atol + rtol * scale + rounding * (float(ref.abs().max()) if ref.numel() else 0.0)
    rel_bound = rtol + (rounding * float(ref.norm()) / norm_basis if norm_basis > 0 else 0.0)
    ok = bool(max_abs <= tolerance and rel <= rel_bound) and (probe is None or probe.ok)  # NaN fails both
    return PointComparison(name, tuple(reference.shape), max_abs, rel, cosine, scale, tolerance, rel_bound, ok,
                           basis="value" if start is None else "update", probe=probe)


def compare_tensors(name: str, reference: Tensor, candidate: Tensor, *, atol: float, rtol: float) -> PointComparison:
    """Max abs difference, relative error, cosine and the verdict for one point, by its value."""
    return judge(name, reference, candidate, atol=atol, rtol=rtol)


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


# ---- the whole verification of a model in memory ----------------------------------------------------


def default_input_ids(config: NeoXModelConfig, vocab: int, *, seed: int, batch: int, seq_len: int) -> Tensor:
    """Seeded random token ids below the real (unpadded) vocabulary, when it is known."""
    high = min(vocab, config.orig_vocab_size or vocab)
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, high, (batch, seq_len), generator=generator)


def checked_input_ids(input_ids: Tensor, positions: int, continuation: int) -> Tensor:
    input_ids = input_ids.long()
    if input_ids.dim() != 2:
        raise MapperError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    if input_ids.shape[1] + continuation > positions:
        raise MapperError(f"{input_ids.shape[1]} tokens + {continuation} continuation exceed the model's "
                          f"{positions} positions", hint="use a shorter seq_len or continuation")
    return input_ids


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
    weights_dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    atol: float | None = None,
    rtol: float | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> VerifyReport:
    """Run the NeoX reference and ``hf_model`` on the same tokens and judge every point on the same input.

    ``plan`` (the conversion's :class:`~mapper.engine.Plan`) lets a failure name the rules that
    produced the diverging point's tensors. ``dtype`` is the compute precision of both sides;
    ``weights_dtype`` the precision the HF weights were cast to (``convert --dtype``), through
    which the reference's weights are rounded too. A model held in another dtype is run one
    stage at a time as a cast copy. ``hf_model.config`` is checked field by field against
    ``config`` (:mod:`mapper.verify.settings`).
    """
    from mapper.verify.hf_side import LoadedHF
    from mapper.verify.reference import NeoXStages
    from mapper.verify.settings import check_settings
    from mapper.verify.tolerances import coarsest
    from mapper.verify.walk import BuiltinReference, walk

    compared = coarsest(dtype, weights_dtype)
    tol = default_tolerances(compared)
    tol = Tolerances(atol=tol.atol if atol is None else atol, rtol=tol.rtol if rtol is None else rtol)
    hf = LoadedHF(hf_model, dtype=dtype, device=device)
    try:
        used_seed: int | None = None
        if input_ids is None:
            input_ids = default_input_ids(config, hf.vocab, seed=seed, batch=batch, seq_len=seq_len)
            used_seed = seed
        input_ids = checked_input_ids(input_ids, config.positions, continuation)
        stages = NeoXStages(neox_tensors, config, dtype=dtype, device=device, weights_dtype=weights_dtype)
        keys = list(plan.targets) if plan is not None else list(hf_model.state_dict())
        return walk(BuiltinReference(stages), hf, input_ids, tolerances=tol, compare_dtype=compared, plan=plan,
                    keys=keys, settings=check_settings(hf_model.config.to_dict(), config), continuation=continuation,
                    seed=used_seed, on_progress=on_progress)
    finally:
        hf.close()
