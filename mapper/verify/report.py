"""The verification report: what was compared, what differed first, and which rules to look at.

The report is plain data (no tensors), so it serialises to JSON for ``--json`` and renders as a
compact table for people. Its verdict rests only on the per-point tolerances; KL divergence,
top-k agreement and the greedy continuation are diagnostics that say *how* a model is wrong
(the #1353 model still agreed on many top-1 tokens but fell into repetition).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from mapper.errors import VerificationFailed
from mapper.verify.settings import SettingCheck


@dataclass(frozen=True)
class PointComparison:
    """One activation point, reference against candidate, both computed from the same input.

    ``tolerance`` is the bound on ``max_abs_diff`` and ``rtol`` the bound on ``rel_err``
    (``‖ref − cand‖ / ‖basis‖``); ``basis`` says what the point is measured against: its ``value``,
    or for a block its ``update`` (output − input), ``scale`` being the basis' largest magnitude
    (see :mod:`mapper.verify.tolerances`). ``probe`` is the same point on a small-scale input (where
    norm epsilons show). Logits also carry the distribution statistics.
    """

    name: str
    shape: tuple[int, ...]
    max_abs_diff: float
    rel_err: float
    cosine: float
    scale: float
    tolerance: float
    rtol: float
    ok: bool
    kl: float | None = None  # KL(reference ‖ candidate), mean over positions (logits only)
    top1: float | None = None  # fraction of positions with the same argmax
    top5: float | None = None  # mean overlap of the top-5 sets (fraction of 5)
    compared_vocab: int | None = None  # logits columns compared (HF may hold a trimmed vocab)
    basis: str = "value"  # "update" for blocks: output − input
    probe: PointComparison | None = None  # the same point on a small-scale input
    halves_ok: bool = True  # a dump's stream between attention and MLP agrees too (when it has one)

    def why(self) -> str:
        """Which bound this point breaks, in words."""
        reasons = []
        if not self.max_abs_diff <= self.tolerance:
            reasons.append(f"max|diff| {self.max_abs_diff:.3g} > tolerance {self.tolerance:.3g}")
        if not self.rel_err <= self.rtol:
            reasons.append(f"rel err {self.rel_err:.3g} > {self.rtol:.3g}"
                           + (" (relative to the block's update)" if self.basis == "update" else ""))
        if not self.halves_ok:
            reasons.append("the residual stream between its attention and MLP differs")
        if self.probe is not None and not self.probe.ok:
            reasons.append(f"on a small-scale input (where norm epsilons matter): {self.probe.why()}")
        return "; ".join(reasons) or "within tolerance"


@dataclass(frozen=True)
class Continuation:
    """Greedy continuations of the same prompts by the reference and by the candidate."""

    steps: int
    reference_tokens: list[list[int]]
    candidate_tokens: list[list[int]]
    agreement: float  # fraction of generated tokens that are equal, position by position
    first_mismatch: int | None  # earliest step (0-based) where any sequence differs
    repetition_ngram: int
    repetition_reference: float  # fraction of repeated n-grams in the generated tokens
    repetition_candidate: float


@dataclass(frozen=True)
class RuleRef:
    """A rule that produced a blamed tensor, and where it is written (most likely first in a blame;
    ``why`` says why it ranks where it does)."""

    rule: str
    origin: str | None
    why: str | None = None


@dataclass(frozen=True)
class Blame:
    """The first diverging point and the rules that produced the weights feeding it.

    For a block, ``parts`` re-runs its attention and MLP branches on the candidate's own inputs,
    so the blame narrows to the branch that computes something else (not merely inherits drift).
    """

    point: str
    detail: str
    parts: list[PointComparison] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    rules: list[RuleRef] = field(default_factory=list)
    hint: str | None = None
    dropped: list[str] = field(default_factory=list)  # weights of the same NeoX layer the rules drop


@dataclass(frozen=True)
class VerifyReport:
    """Everything one verification found; ``ok`` is the verdict."""

    points: list[PointComparison]
    atol: float
    rtol: float
    dtype: str
    input_shape: tuple[int, int]
    seed: int | None
    continuation: Continuation | None = None
    blame: Blame | None = None
    reference: str = "mapper's built-in NeoX forward"
    end_to_end: PointComparison | None = None  # the converted model run alone from the tokens
    settings: list[SettingCheck] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (all(p.ok for p in self.points) and all(s.ok for s in self.settings)
                and (self.end_to_end is None or self.end_to_end.ok))

    @property
    def wrong_settings(self) -> list[SettingCheck]:
        return [s for s in self.settings if not s.ok]

    @property
    def first_divergence(self) -> PointComparison | None:
        """The earliest point (in forward order) beyond tolerance: where the bug is."""
        return next((p for p in self.points if not p.ok), None)

    @property
    def logits(self) -> PointComparison | None:
        """The logits with the distribution statistics: end to end when computed, else local."""
        return self.end_to_end or next((p for p in self.points if p.name == "logits"), None)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable (non-finite floats become None)."""
        data = _finite(asdict(self))
        first = self.first_divergence
        data.update(ok=self.ok, first_divergence=None if first is None else first.name)
        return data

    def render(self) -> str:
        """A compact plain-text table, then the distribution checks, then the verdict."""
        batch, seq = self.input_shape
        lines = [f"reference: {self.reference}",
                 f"verification in {self.dtype} on {batch}x{seq} tokens"
                 + (f" (seed {self.seed})" if self.seed is not None else "")
                 + "; each point on the reference's input; tolerance: max|diff| <= "
                 f"{self.atol:.0e} + {self.rtol:.0e}·max|basis| (+ rounding) and rel err <= {self.rtol:.0e}; "
                 "blocks are measured against their update (output − input)"]
        lines += _table(self.points + ([self.end_to_end] if self.end_to_end is not None else []))
        logits = self.logits
        if logits is not None and logits.kl is not None:
            lines.append(f"logits end to end: KL(ref‖hf) {logits.kl:.3g}   top-1 agreement {logits.top1:.3f}   "
                         f"top-5 overlap {logits.top5:.3f}   (vocab {logits.compared_vocab})")
        wrong = self.wrong_settings
        if self.settings:
            lines.append(f"config.json: {len(self.settings) - len(wrong)} of {len(self.settings)} settings agree with "
                         "the NeoX config" + (":" if wrong else ""))
            lines += [f"  {s.field}: config.json has {s.hf!r}, the NeoX config says {s.expected!r} ({s.meaning})"
                      for s in wrong]
        lines += [f"note: {note}" for note in self.notes]
        if self.continuation is not None:
            c = self.continuation
            where = "none" if c.first_mismatch is None else f"step {c.first_mismatch}"
            lines.append(f"greedy continuation, {c.steps} tokens: agreement {c.agreement:.3f}, first mismatch {where}; "
                         f"repeated {c.repetition_ngram}-grams: ref {c.repetition_reference:.2f}, "
                         f"hf {c.repetition_candidate:.2f}")
        lines.append(self._verdict())
        return "\n".join(lines)

    def _verdict(self) -> str:
        first = self.first_divergence
        if self.ok:
            return f"verdict: OK, all {len(self.points)} points within tolerance" + (
                f", {len(self.settings)} config.json settings agree" if self.settings else "")
        wrong = self.wrong_settings
        if first is None:
            if wrong:
                return (f"verdict: FAILED, config.json differs from the NeoX config in "
                        f"{', '.join(s.field for s in wrong)} (every point agrees on its input)")
            assert self.end_to_end is not None
            return (f"verdict: FAILED, every point agrees on its own input but the end-to-end logits differ: "
                    f"{self.end_to_end.why()}")
        lines = [f"verdict: FAILED, first divergence at {first.name}: {first.why()}"]
        if wrong:
            lines.append(f"  config.json also differs in {', '.join(s.field for s in wrong)} (see above)")
        if self.blame is not None:
            b = self.blame
            lines.append(f"  {b.detail}")
            for part in b.parts:
                state = "ok" if part.ok else "DIFFERS"
                lines.append(f"    {part.name:<22} {state:<8} max|diff| {part.max_abs_diff:.3g}, rel err {part.rel_err:.3g}")
            if b.rules:
                lines.append(f"  rules that produced {_short_keys(b.keys)}, most likely first:")
                lines += [f"    {r.rule:<34} {r.origin or '(origin unknown)'}" + (f"  [{r.why}]" if r.why else "")
                          for r in b.rules]
            elif b.keys:
                lines.append(f"  HF tensors involved: {_short_keys(b.keys)} (pass the plan to name the rules)")
            if b.dropped:
                lines.append("  dropped by the rules from the same NeoX layer (is one of them the real weight?):")
                lines += [f"    {d}" for d in b.dropped]
            if b.hint:
                lines.append(f"  hint: {b.hint}")
        return "\n".join(lines)

    def error(self) -> VerificationFailed | None:
        """The error describing this failure, or None when the verification passed."""
        if self.ok:
            return None
        first = self.first_divergence
        wrong = self.wrong_settings
        if first is None:
            if wrong:
                lines = [f"config.json differs from the NeoX config: " + "; ".join(
                    f"{s.field} is {s.hf!r}, expected {s.expected!r}" for s in wrong)]
                return VerificationFailed("\n".join(lines), where="config.json",
                                          hint="fix these fields in config.json (or the NeoX config the conversion read)")
            assert self.end_to_end is not None
            return VerificationFailed(
                f"the end-to-end logits differ beyond the depth-aware tolerance: {self.end_to_end.why()}",
                where="logits", hint="every point agrees on its own input: see the per-point table (--report)")
        lines = [f"the converted model first differs from the NeoX reference here: {first.why()}"]
        if wrong:
            lines.append("  config.json differs from the NeoX config: " + "; ".join(
                f"{s.field} is {s.hf!r}, expected {s.expected!r}" for s in wrong))
        if self.blame is not None:
            differing = [p.name.rsplit(".", 1)[-1] for p in self.blame.parts if not p.ok]
            if differing:
                lines[0] += f" (inside the block: {' and '.join(differing)})"
            if self.blame.rules:
                lines.append("  responsible rules:")
                lines += [f"    {r.rule}  {r.origin or ''}".rstrip() for r in self.blame.rules]
            if self.blame.dropped:
                lines.append("  dropped by the rules from the same NeoX layer:")
                lines += [f"    {d}" for d in self.blame.dropped]
        hint = self.blame.hint if self.blame is not None and self.blame.hint else (
            "check the rules that produced this point's tensors and the HF config")
        return VerificationFailed("\n".join(lines), where=first.name, hint=hint)

    def raise_if_failed(self) -> None:
        """Raise :class:`VerificationFailed` naming the first diverging point and its rules."""
        error = self.error()
        if error is not None:
            raise error


def _table(points: list[PointComparison]) -> list[str]:
    width = max([len("point")] + [len(p.name) for p in points])
    header = f"{'point':<{width}}  {'max|diff|':>10}  {'tolerance':>10}  {'rel err':>9}  {'rtol':>8}  {'cosine':>9}  ok"
    rows = [header]
    for p in points:
        rows.append(f"{p.name:<{width}}  {p.max_abs_diff:>10.3e}  {p.tolerance:>10.3e}  {p.rel_err:>9.2e}  "
                    f"{p.rtol:>8.1e}  {p.cosine:>9.6f}  {'yes' if p.ok else 'NO'}"
                    + ("" if p.probe is None or p.probe.ok else "  (small-scale input)"))
    return rows


def _short_keys(keys: list[str], limit: int = 4) -> str:
    """A few key names for a sentence; the JSON has them all."""
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "") if keys else "(no tensors)"


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
