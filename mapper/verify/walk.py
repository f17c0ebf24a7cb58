"""Streamed verification: both forwards block by block, every point judged on the same input.

For each stage (embedding, block ``i``, final norm, output layer) the reference gives its output
on its own input, and the converted model's stage is run twice while it is loaded: on the
*reference's* input (the point's verdict: no error inherited from earlier layers, see
:mod:`mapper.verify.tolerances`) and on its own previous output (the end-to-end run, whose logits
are compared with depth-aware bounds). Only the current stage of each side is held: one NeoX layer
(read through a lazy mapping) and one HF decoder layer (materialised from its files), plus
activations.

References (:class:`Reference`): :class:`BuiltinReference` computes NeoX's forward from the NeoX
tensors (mapper's reading of gpt-neox) and can run any input, so it also probes each block on a
small-scale input (where a norm's epsilon shows) and re-runs the attention and MLP branches of a
diverging block on the HF model's inputs to them; :class:`DumpReference` reads what gpt-neox itself
computed (``neox_reference_dump.py``), for any variant, and localises within a block from the
residual stream between attention and MLP when the dump holds it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, Protocol

import torch
from torch import nn

from mapper.configs.hf import approximations
from mapper.errors import MapperError
from mapper.verify.blame import BLOCK, blame
from mapper.verify.compare import common_vocab, compare_continuations, judge, logit_statistics
from mapper.verify.dump import ReferenceDump
from mapper.verify.hf_side import HFStages, first_tensor
from mapper.verify.reference import (
    LayerTensors,
    NeoXStages,
    RowParallelResult,
    apply_norm,
    attention_block,
    load_norm,
    mlp_block,
    mlp_kind,
    per_rank_outputs,
)
from mapper.verify.report import PointComparison, VerifyReport
from mapper.verify.settings import SettingCheck
from mapper.verify.tolerances import Tolerances, end_to_end, unit_roundoff

Tensor = torch.Tensor
Progress = Callable[[int, int], None]
SMALL_SCALE = 30.0  # probe inputs have mean square SMALL_SCALE × the norm's eps


class Reference(Protocol):
    """The side a conversion is verified against."""

    description: str
    num_layers: int
    computes: bool  # can run any input (probes, branch re-runs, continuation)

    def open(self, block: int) -> Any: ...
    def embeddings(self, input_ids: Tensor) -> Tensor: ...
    def block(self, block: int, x: Tensor, handle: Any) -> Tensor: ...
    def final_norm(self, x: Tensor) -> Tensor: ...
    def logits(self, h: Tensor) -> Tensor: ...


class BuiltinReference:
    """mapper's NeoX forward (:mod:`mapper.verify.reference`) from NeoX tensors, one layer at a time."""

    computes = True

    def __init__(self, stages: NeoXStages):
        self.stages, self.config = stages, stages.config
        self.num_layers = stages.config.num_layers
        self.description = ("mapper's built-in reading of gpt-neox (mapper/verify/reference.py); to verify against "
                            "gpt-neox itself: `mapper reference-script`, then `mapper verify --reference`")

    def open(self, block: int) -> LayerTensors:
        return self.stages.layer(self.config.block_layer_index(block))

    def embeddings(self, input_ids: Tensor) -> Tensor:
        return self.stages.embeddings(input_ids)

    def block(self, block: int, x: Tensor, handle: LayerTensors) -> Tensor:
        return self.stages.block(block, x, handle)

    def final_norm(self, x: Tensor) -> Tensor:
        return self.stages.final_norm(x)

    def logits(self, h: Tensor) -> Tensor:
        return self.stages.logits(h)

    def small_scale(self, x: Tensor) -> Tensor:
        """``x`` scaled to a mean square of SMALL_SCALE × eps: there a norm's eps moves its output
        by a few percent (eps 1e-5 instead of 1e-6: ~15%), and HF and NeoX must still agree."""
        target = SMALL_SCALE * min(self.config.norm_eps, self.config.mlp_norm_eps)
        mean_square = float(x.double().pow(2).mean())
        return x * (target / mean_square) ** 0.5 if mean_square > 0 else x

    def parts(self, block: int, handle: LayerTensors, layer: Any, x: Tensor, judge_part: Callable[..., PointComparison]
              ) -> list[PointComparison]:
        """The block's attention and MLP branches, each on the HF layer's own inputs to it."""
        config = self.config
        seen = _capture_branches(layer, x)
        with torch.no_grad():
            attn_in = seen["attn_in"].to(handle.dtype)
            attn = _branch(attention_block(apply_norm(attn_in, load_norm(handle, "input_layernorm", config)), handle,
                                           config), config.gpt_j_residual)
            h = seen["mlp_in"].to(handle.dtype)
            if mlp_kind(handle) != "te":  # TE LayerNormMLP norms its input itself
                norm = "input_layernorm" if config.gpt_j_residual and config.gpt_j_tied else "post_attention_layernorm"
                h = apply_norm(h, load_norm(handle, norm, config))
            mlp = _branch(mlp_block(h, handle, config), config.gpt_j_residual)
        return [judge_part(f"blocks.{block}.attention", attn, seen["attn_out"]),
                judge_part(f"blocks.{block}.mlp", mlp, seen["mlp_out"])]


class DumpReference:
    """What gpt-neox computed, read point by point from a dump."""

    computes = False

    def __init__(self, dump: ReferenceDump):
        self.dump = dump
        self.num_layers = dump.num_layers
        self.description = dump.describe()

    def open(self, block: int) -> None:
        return None

    def embeddings(self, input_ids: Tensor) -> Tensor:
        return self.dump.get("embeddings")

    def block(self, block: int, x: Tensor, handle: None) -> Tensor:
        return self.dump.get(f"blocks.{block}")

    def final_norm(self, x: Tensor) -> Tensor:
        return self.dump.get("final_norm")

    def logits(self, h: Tensor) -> Tensor:
        return self.dump.get("logits")

    def parts(self, block: int, layer: Any, x: Tensor, y: Tensor,
              judge_part: Callable[..., PointComparison]) -> list[PointComparison]:
        """With the residual stream between attention and MLP in the dump (sequential residual):
        the HF layer's stream there on the same input, then its MLP half on the dump's stream."""
        name = f"blocks.{block}.after_attention"
        if not self.dump.has(name):
            return []
        middle = self.dump.get(name)
        module = layer.module
        post_norm = getattr(module, "post_attention_layernorm", None)
        if post_norm is None or getattr(module, "use_parallel_residual", False):
            return []
        seen = _capture_branches(layer, x)
        with torch.no_grad():
            m = middle.to(seen["mlp_in"].device, seen["mlp_in"].dtype)
            after_mlp = m + first_tensor(module.mlp(post_norm(m)))
        return [judge_part(f"blocks.{block}.attention", middle, seen["mlp_in"], before=x),
                judge_part(f"blocks.{block}.mlp", y, after_mlp, before=middle)]


def _capture_branches(layer: Any, x: Tensor) -> dict[str, Tensor]:
    """Run the HF layer on ``x`` keeping its branch inputs and outputs (hooks)."""
    module = layer.module
    attention = getattr(module, "attention", None) or module.self_attn
    seen: dict[str, Tensor] = {}

    def keep_input(name: str) -> Callable[..., None]:
        def hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            seen[name] = (args[0] if args else kwargs["hidden_states"]).detach()
        return hook

    def keep_output(name: str) -> Callable[..., None]:
        def hook(_m: nn.Module, _args: tuple, output: Any) -> None:
            seen[name] = first_tensor(output).detach()
        return hook

    handles = [module.input_layernorm.register_forward_pre_hook(keep_input("attn_in"), with_kwargs=True),
               attention.register_forward_hook(keep_output("attn_out")),
               module.post_attention_layernorm.register_forward_pre_hook(keep_input("mlp_in"), with_kwargs=True),
               module.mlp.register_forward_hook(keep_output("mlp_out"))]
    try:
        layer(x)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _branch(result: RowParallelResult, gpt_j_residual: bool) -> Tensor:
    """A branch's contribution to the residual, as all ranks together add it (reference.py wiring)."""
    outs = per_rank_outputs(result, gpt_j_residual=gpt_j_residual)
    return torch.stack(outs).sum(0) if gpt_j_residual else outs[0]


# ---- the walk -------------------------------------------------------------------------------------


@torch.no_grad()
def walk(
    reference: BuiltinReference | DumpReference,
    hf: HFStages,
    input_ids: Tensor,
    *,
    tolerances: Tolerances,
    compare_dtype: torch.dtype,
    plan: Any | None = None,
    keys: Sequence[str] = (),
    settings: Sequence[SettingCheck] = (),
    continuation: int = 0,
    seed: int | None = None,
    notes: Sequence[str] = (),
    on_progress: Progress | None = None,
) -> VerifyReport:
    """Verify ``hf`` against ``reference`` on ``input_ids`` (module doc); the report of every point."""
    layers = hf.num_layers
    if reference.num_layers != layers:
        raise MapperError(f"the reference has {reference.num_layers} blocks, the HF model {layers}",
                          hint="the HF config's num_hidden_layers does not match the checkpoint")
    computes = isinstance(reference, BuiltinReference)
    steps = continuation if computes else 0
    total = layers + 3 + 2 * steps
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if on_progress is not None:
            on_progress(done, total)

    unit = unit_roundoff(compare_dtype)

    def point(name: str, ref: Tensor, cand: Tensor, *, before: Tensor | None = None,
              probe: PointComparison | None = None, tol: Tolerances = tolerances) -> PointComparison:
        return judge(name, ref, cand, atol=tol.atol, rtol=tol.rtol, unit=unit, before=before, probe=probe)

    # What HF only approximates (mapper.configs.hf.approximations) shows most on the small-scale
    # probe, which is there to see norm epsilons: there it is measured and reported, not judged.
    approximate = [a.setting for a in approximations(reference.config)] if computes else []
    measured: list[str] = []

    def unjudged(probe: PointComparison) -> PointComparison:
        if approximate and not probe.ok:
            measured.append(f"{probe.name} rel err {probe.rel_err:.2g}")
            return replace(probe, ok=True)
        return probe

    ref_x = reference.embeddings(input_ids)
    hf_x = hf.start(input_ids)
    points = [point("embeddings", ref_x, hf_x)]
    tick()
    chain = hf_x
    parts: list[PointComparison] = []
    failed_block: int | None = None
    for index in range(layers):
        with hf.layer(index) as layer:
            handle = reference.open(index)
            ref_y = reference.block(index, ref_x, handle)
            cand = layer(ref_x)
            chain = layer(chain)
            probe = None
            if computes:
                small = reference.small_scale(ref_x)
                probe = unjudged(point(f"blocks.{index}@small-scale", reference.block(index, small, handle),
                                       layer(small), before=small))
            judged = point(f"blocks.{index}", ref_y, cand, before=ref_x, probe=probe)
            halves = [] if computes else reference.parts(index, layer, ref_x, ref_y, point)
            if not all(h.ok for h in halves):
                judged = replace(judged, ok=False, halves_ok=False)
            if not judged.ok and failed_block is None and all(p.ok for p in points):
                failed_block = index
                if computes:
                    parts = reference.parts(index, handle, layer, ref_x, lambda n, r, c: point(n, r, c))
                else:
                    parts = halves
        points.append(judged)
        ref_x = ref_y
        del handle
        tick()

    with hf.norm() as norm:
        ref_h = reference.final_norm(ref_x)
        probe = None
        if computes:
            small = reference.small_scale(ref_x)
            probe = unjudged(point("final_norm@small-scale", reference.final_norm(small), norm(small)))
        points.append(point("final_norm", ref_h, norm(ref_x), probe=probe))
        chain = norm(chain)
    tick()
    with hf.head() as head:
        ref_logits = reference.logits(ref_h)
        local = head(ref_h)
        alone = head(chain)
    ref_cut, local = common_vocab(ref_logits, local)
    points.append(replace(point("logits", ref_cut, local), compared_vocab=int(local.shape[-1])))
    ref_cut, alone = common_vocab(ref_logits, alone)
    e2e = point("logits (end to end)", ref_cut, alone, tol=end_to_end(tolerances, layers))
    e2e = replace(e2e, **logit_statistics(ref_cut, alone), compared_vocab=int(alone.shape[-1]))
    tick()

    cont = None
    if steps:
        ref_tokens = _greedy(lambda ids: _reference_last_logits(reference, ids), input_ids, steps, hf.vocab, tick)
        hf_tokens = _greedy(lambda ids: _hf_last_logits(hf, ids), input_ids, steps, hf.vocab, tick)
        cont = compare_continuations(ref_tokens, hf_tokens)

    first = next((p for p in points if not p.ok), None)
    found = None
    if first is not None:
        match = BLOCK.match(first.name)
        prefix = f"layer_{int(match.group(1)) + 2:02d}." if match else None
        found = blame(first, plan=plan, keys=keys, parts=parts if match else [], source_prefix=prefix,
                      settings=settings)
    return VerifyReport(
        points=points, atol=tolerances.atol, rtol=tolerances.rtol, dtype=str(compare_dtype).removeprefix("torch."),
        input_shape=(int(input_ids.shape[0]), int(input_ids.shape[1])), seed=seed, continuation=cont, blame=found,
        reference=reference.description, end_to_end=e2e, settings=list(settings),
        notes=list(notes) + ([f"approximations recorded for this conversion ({', '.join(approximate)}) are measured, "
                              f"not judged, on the small-scale probes: {'; '.join(measured) or 'none shows'}"]
                             if approximate else []),
    )


def _reference_last_logits(reference: BuiltinReference, ids: Tensor) -> Tensor:
    x = reference.embeddings(ids)
    for index in range(reference.num_layers):
        x = reference.block(index, x, reference.open(index))
    return reference.logits(reference.final_norm(x))[:, -1]


def _hf_last_logits(hf: HFStages, ids: Tensor) -> Tensor:
    x = hf.start(ids)
    for index in range(hf.num_layers):
        with hf.layer(index) as layer:
            x = layer(x)
    with hf.norm() as norm:
        x = norm(x)
    with hf.head() as head:
        return head(x[:, -1:])[:, -1]


def _greedy(last_logits: Callable[[Tensor], Tensor], input_ids: Tensor, steps: int, vocab: int,
            tick: Callable[[], None]) -> Tensor:
    """Greedy decoding, one full (streamed) forward per new token: no cache to get wrong."""
    ids = input_ids
    for _ in range(steps):
        logits = last_logits(ids)[..., :vocab]
        ids = torch.cat([ids, logits.float().argmax(-1, keepdim=True).to(ids.device)], dim=1)
        tick()
    return ids[:, input_ids.shape[1]:]

