"""The shipped rule sets as a catalog: which there are, what each is for, which switches it follows.

``mapper rules list`` prints it; the README's "Supported variants" table is generated from it
(``tests/docs/test_readme.py`` checks it is current).
"""

from __future__ import annotations

from mapper.expressions import parse
from mapper.spec import builtin_rule_files, load_rule_file
from mapper.spec.loader import rule_file_header
from mapper.spec.models import RuleSet

# Parameters that switch parts of a rule set on or off (the rest are sizes).
SWITCH_PARAMETERS = ("te_norm", "te_mha", "te_layernorm_mlp", "te_columnparallel", "te_rowparallel",
                     "gpt_j_residual", "gqa_pre_1315", "legacy_mlp")


def builtin_rule_sets(source: str | None = None, target: str | None = None, *, presets: bool = True) -> list[RuleSet]:
    """The shipped rule sets, optionally only those converting from ``source`` / to ``target``.

    Each file's own header decides whether it is wanted; only those are assembled with their
    includes (detection runs on every conversion, and assembling all of them cost it ~0.2 s)."""
    def fits(r: RuleSet, *, header: bool) -> bool:  # a header may inherit source/target: None is "maybe"
        def same(have: str | None, want: str | None) -> bool:
            return want is None or have == want or (header and have is None)
        return same(r.source, source) and same(r.target, target) and (presets or r.kind != "preset")

    wanted = [path for path in builtin_rule_files().values() if fits(rule_file_header(path), header=True)]
    return [r for r in map(load_rule_file, wanted) if fits(r, header=False)]


def switches_followed(ruleset: RuleSet) -> list[str]:
    """The switch parameters whose value turns parts of ``ruleset`` on or off (and its ``variant``
    does not fix)."""
    used: set[str] = set()
    for op in ruleset.ops:
        if op.when:
            used |= parse(op.when).names
    return [name for name in SWITCH_PARAMETERS if name in used and not isinstance(ruleset.variant.get(name), bool)]


def describe_variant(variant: dict) -> str:
    """``norm=layernorm|te_layernorm, te_mha=true``."""
    def value(v: object) -> str:
        if isinstance(v, list):
            return "|".join(map(value, v))
        return str(v).lower() if isinstance(v, bool) else str(v)

    return ", ".join(f"{k}={value(v)}" for k, v in variant.items())


def supported_variants_markdown() -> str:
    """The README's table of shipped rule sets, generated from the rule files."""
    rows = ["| rule set | converts | for | switches it follows |", "|---|---|---|---|"]
    for r in sorted(builtin_rule_sets(), key=lambda r: (r.kind == "preset", r.target or "", r.name)):
        kind = " (preset)" if r.kind == "preset" else ""
        followed = ", ".join(f"`{s}`" for s in switches_followed(r)) if r.kind != "preset" else "fixed by its variant"
        rows.append(f"| `{r.name}`{kind} | {r.source} → {r.target} | {describe_variant(r.variant)} | {followed or '-'} |")
    return "\n".join(rows) + "\n"
