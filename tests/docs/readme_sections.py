"""The README sections generated from code, and the command that rewrites them.

Run ``python tests/docs/readme_sections.py`` after changing the rule format, the shipped rule sets
or the config parameters; ``test_readme.py`` fails until the README matches.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

README_PATH = Path(__file__).resolve().parents[2] / "README.md"


def generated_sections() -> dict[str, Callable[[], str]]:
    """Marker name -> the function producing the text between its start and end markers."""
    from mapper.spec.catalog import supported_variants_markdown
    from mapper.spec.parameters import parameters_markdown
    from mapper.spec.schema import rule_format_reference

    return {
        "rule-format-reference": rule_format_reference,
        "supported-variants": supported_variants_markdown,
        "config-parameters": parameters_markdown,
    }


def embedded(readme: str, marker: str) -> str:
    """The README's text between ``<!-- marker:start -->`` and ``<!-- marker:end -->``."""
    return readme.split(f"<!-- {marker}:start -->\n", 1)[1].split(f"<!-- {marker}:end -->", 1)[0]


def regenerate(readme: str) -> str:
    for marker, produce in generated_sections().items():
        start, end = f"<!-- {marker}:start -->\n", f"<!-- {marker}:end -->"
        before, rest = readme.split(start, 1)
        after = rest.split(end, 1)[1]
        readme = before + start + produce() + end + after
    return readme


if __name__ == "__main__":
    README_PATH.write_text(regenerate(README_PATH.read_text()))
    print(f"regenerated {', '.join(generated_sections())} in {README_PATH}")
