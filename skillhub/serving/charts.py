"""Charts of the registry browser as SVG drawn on the server: no JavaScript library, nothing
fetched from elsewhere, the same picture in every browser (and in a test's screenshot).

Every text drawn (task names, policy names) is escaped here: names are user data.
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


def _color(value: float, low: float, high: float) -> str:
    """White (low) to deep blue (high)."""
    t = 0.0 if high <= low else min(1.0, max(0.0, (value - low) / (high - low)))
    r, g, b = (int(255 + (c - 255) * t) for c in (8, 69, 148))
    return f"rgb({r},{g},{b})"


def heatmap(matrix: Sequence[Sequence[float | None]], rows: Sequence[str], columns: Sequence[str], *,
            title: str, low: float | None = None, high: float | None = None, digits: int = 2,
            row_label: str = "", column_label: str = "") -> str:
    """A matrix as an SVG heatmap, each cell with its value (empty for None)."""
    cell, left, top = 54, 12 + 7 * max((len(r) for r in rows), default=4), 64
    values = [v for row in matrix for v in row if v is not None]
    low = min(values, default=0.0) if low is None else low
    high = max(values, default=1.0) if high is None else high
    width, height = left + cell * len(columns) + 10, top + cell * len(rows) + 30
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart heatmap" width="{width}" height="{height}" '
             f'role="img" aria-label="{escape(title)}">',
             f'<text x="4" y="16" class="title">{escape(title)}</text>']
    if column_label:
        parts.append(f'<text x="{left}" y="34" class="axis">{escape(column_label)}</text>')
    for j, name in enumerate(columns):
        x = left + j * cell + cell / 2
        parts.append(f'<text x="{x}" y="{top - 6}" text-anchor="middle" class="label">{escape(name[:9])}</text>')
    for i, name in enumerate(rows):
        y = top + i * cell
        parts.append(f'<text x="{left - 6}" y="{y + cell / 2 + 4}" text-anchor="end" class="label">'
                     f'{escape(name)}</text>')
        for j, value in enumerate(matrix[i]):
            x = left + j * cell
            fill = "#f3f3f3" if value is None else _color(value, low, high)
            parts.append(f'<rect x="{x}" y="{y}" width="{cell - 2}" height="{cell - 2}" fill="{fill}"/>')
            if value is not None:
                dark = (high > low and (value - low) / (high - low) > 0.55)
                parts.append(f'<text x="{x + cell / 2 - 1}" y="{y + cell / 2 + 4}" text-anchor="middle" '
                             f'class="value{" dark" if dark else ""}" data-row="{i}" data-column="{j}">'
                             f'{value:.{digits}f}</text>')
    if row_label:
        parts.append(f'<text x="4" y="{height - 8}" class="axis">{escape(row_label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def line_chart(series: dict[str, Sequence[float | None]], steps: Sequence[str], *, title: str,
               low: float = 0.0, high: float = 1.0) -> str:
    """One line per series over the steps (a None leaves a gap), with a legend."""
    width, height, left, top, plot_h = 560, 260, 44, 28, 170
    plot_w = width - left - 150
    span = max(1, len(steps) - 1)
    high = high if high > low else low + 1

    def point(k: int, v: float) -> tuple[float, float]:
        return left + plot_w * k / span, top + plot_h * (1 - (v - low) / (high - low))

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart lines" width="{width}" height="{height}" '
             f'role="img" aria-label="{escape(title)}">', f'<text x="4" y="16" class="title">{escape(title)}</text>',
             f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" class="axis-line"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" class="axis-line"/>',
             f'<text x="{left - 4}" y="{top + 4}" text-anchor="end" class="label">{high:g}</text>',
             f'<text x="{left - 4}" y="{top + plot_h}" text-anchor="end" class="label">{low:g}</text>']
    for k, step in enumerate(steps):
        x, _ = point(k, low)
        parts.append(f'<text x="{x}" y="{top + plot_h + 16}" text-anchor="middle" class="label">'
                     f'{escape(step[:10])}</text>')
    for n, (name, values) in enumerate(series.items()):
        color = _PALETTE[n % len(_PALETTE)]
        runs, run = [], []
        for k, value in enumerate(values):
            if value is None:
                runs, run = runs + [run] if run else runs, []
            else:
                run.append(point(k, value))
        runs += [run] if run else []
        for points in runs:
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
            parts.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"/>')
            parts.extend(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{color}"/>' for x, y in points)
        y = top + 14 * n + 6
        parts.append(f'<rect x="{left + plot_w + 16}" y="{y - 8}" width="10" height="10" fill="{color}"/>'
                     f'<text x="{left + plot_w + 30}" y="{y + 1}" class="label">{escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)
