"""``verify --report FILE.html``: the per-point error curves, so a divergence is seen at a glance.

One self-contained HTML file (inline SVG and CSS, no script, nothing fetched): max|diff| against its
tolerance, the relative error against its bound, and 1 − cosine, each across the points in forward
order (log scales), failing points in red; then the report's text.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence
from pathlib import Path

from mapper.formats.output import write_bytes_atomic
from mapper.verify.report import PointComparison, VerifyReport

WIDTH, HEIGHT, LEFT, BOTTOM, TOP = 900, 220, 70, 60, 20


def _log(value: float) -> float:
    return math.log10(max(value, 1e-12)) if math.isfinite(value) else 3.0


def _chart(title: str, points: Sequence[PointComparison], series: list[tuple[str, str, Callable[[PointComparison], float]]],
           ) -> str:
    """A log-scale line chart of ``series`` (label, colour, value of a point) over the points."""
    values = [_log(get(p)) for _, _, get in series for p in points]
    low, high = math.floor(min(values)), math.ceil(max(values))
    high = high if high > low else low + 1
    plot_w, plot_h = WIDTH - LEFT - 20, HEIGHT - TOP - BOTTOM
    step = plot_w / max(len(points) - 1, 1)

    def xy(i: int, v: float) -> tuple[float, float]:
        return LEFT + i * step, TOP + plot_h * (high - _log(v)) / (high - low)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" role="img">',
             f'<text x="{LEFT}" y="14" class="title">{html.escape(title)}</text>']
    for decade in range(low, high + 1):
        y = TOP + plot_h * (high - decade) / (high - low)
        parts.append(f'<line x1="{LEFT}" x2="{WIDTH - 20}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
                     f'<text x="{LEFT - 6}" y="{y + 4:.1f}" class="axis" text-anchor="end">1e{decade}</text>')
    every = max(1, len(points) // 24)
    for i, p in enumerate(points):
        if i % every == 0 or i == len(points) - 1:
            x = LEFT + i * step
            parts.append(f'<text x="{x:.1f}" y="{HEIGHT - BOTTOM + 14}" class="axis" '
                         f'transform="rotate(35 {x:.1f} {HEIGHT - BOTTOM + 14})">{html.escape(p.name)}</text>')
    for label, colour, get in series:
        line = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(i, get(p)) for i, p in enumerate(points)))
        parts.append(f'<polyline points="{line}" fill="none" stroke="{colour}" stroke-width="1.5"/>')
        for i, p in enumerate(points):
            x, y = xy(i, get(p))
            fill = colour if p.ok else "#d62728"
            parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{2.5 if p.ok else 4}" fill="{fill}">'
                         f'<title>{html.escape(p.name)}: {label} {get(p):.3g}</title></circle>')
    legend_x = WIDTH - 260
    for k, (label, colour, _) in enumerate(series):
        parts.append(f'<rect x="{legend_x}" y="{TOP + 14 * k}" width="10" height="3" fill="{colour}"/>'
                     f'<text x="{legend_x + 14}" y="{TOP + 14 * k + 5}" class="axis">{html.escape(label)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def render_html(report: VerifyReport) -> str:
    """The report as one self-contained HTML page."""
    points = list(report.points) + ([report.end_to_end] if report.end_to_end is not None else [])
    verdict = "OK" if report.ok else "FAILED"
    charts = [
        _chart("max |ref − hf| and its tolerance", points,
               [("max|diff|", "#1f77b4", lambda p: p.max_abs_diff), ("tolerance", "#999999", lambda p: p.tolerance)]),
        _chart("relative error (blocks: of their update) and its bound", points,
               [("rel err", "#2ca02c", lambda p: p.rel_err), ("bound", "#999999", lambda p: p.rtol)]),
        _chart("1 − cosine", points, [("1 − cosine", "#9467bd", lambda p: 1.0 - p.cosine)]),
    ]
    style = ("body{font-family:sans-serif;margin:24px;color:#222}.title{font-size:13px;font-weight:bold}"
             ".axis{font-size:10px;fill:#555}.grid{stroke:#e5e5e5}pre{background:#f6f6f6;padding:12px;"
             "font-size:12px;overflow-x:auto}.ok{color:#2ca02c}.failed{color:#d62728}")
    body = "\n".join(f"<div>{chart}</div>" for chart in charts)
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>mapper verify: {verdict}</title>"
            f"<style>{style}</style></head><body>\n<h1>mapper verify: <span class=\"{verdict.lower()}\">{verdict}"
            f"</span></h1>\n<p>{html.escape(report.reference)}</p>\n{body}\n<pre>{html.escape(report.render())}</pre>"
            "\n</body></html>\n")


def write_html(report: VerifyReport, path: str | Path) -> Path:
    path = Path(path)
    write_bytes_atomic(path, render_html(report).encode("utf-8"))
    return path
