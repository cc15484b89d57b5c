"""Line charts as inline SVG, with no dependency and no script.

Enough for the benchmark's plots: linear or logarithmic axes, polylines with
point markers (each with a ``<title>`` tooltip), step lines for CDFs, a
legend under the plot.  The output is a standalone ``<svg>`` element that a
browser renders offline.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from html import escape

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
           "#17becf", "#7f7f7f", "#bcbd22")


# Inside each chart, so a chart copied out of the page still renders.
SVG_STYLE = ("<style>text{font:11px system-ui,sans-serif;fill:#333}"
             ".title{font-size:13px;font-weight:600}.axis{font-size:12px}"
             ".grid{stroke:#ececec}.frame{fill:none;stroke:#999}</style>"
             '<rect width="100%" height="100%" fill="#fff"/>')


@dataclass(frozen=True)
class Series:
    """One line: ``points`` are (x, y) in data units."""

    label: str
    points: Sequence[tuple[float, float]]
    color: str
    dashed: bool = False
    step: bool = False
    markers: bool = True


@dataclass(frozen=True)
class Axis:
    """How one axis maps and labels values."""

    label: str
    log: bool = False
    fmt: Callable[[float], str] = lambda v: f"{v:g}"
    ticks: Sequence[float] | None = None
    zero: bool = False


def color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def nice_ticks(lo: float, hi: float, log: bool, target: int = 6) -> list[float]:
    """Round tick values covering [lo, hi]: 1-2-5 steps on a linear axis,
    decades (with 2 and 5 between when the range is short) on a log axis."""
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    if log:
        first, last = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
        inside: list[float] = []
        for steps in ((1.0,), (1.0, 2.0, 5.0), (1.0, 1.5, 2.0, 3.0, 5.0, 7.0)):
            ticks = [m * 10.0 ** e for e in range(first, last + 1) for m in steps]
            inside = [t for t in ticks if lo * 0.999 <= t <= hi * 1.001]
            if len(inside) >= 4:
                break
        return inside
    raw = (hi - lo) / max(target - 1, 1)
    magnitude = 10.0 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1.0, 2.0, 2.5, 5.0, 10.0) if m * magnitude >= raw)
    start = math.ceil(lo / step - 1e-9) * step
    ticks = []
    value = start
    while value <= hi + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    return ticks


def line_chart(title: str, series: Sequence[Series], x: Axis, y: Axis, *,
               width: int = 600, height: int = 340) -> str:
    """An SVG line chart; an empty chart says so instead of failing."""
    left, right, top, bottom = 72, 16, 30, 46
    plot_w, plot_h = width - left - right, height - top - bottom
    usable = [s for s in series if s.points]
    # Two legend columns when the labels fit in half the width.
    columns = 2 if max((len(s.label) for s in usable), default=0) * 6.2 + 34 < plot_w / 2 else 1
    legend_rows = math.ceil(len(usable) / columns)
    total_h = height + 18 * legend_rows + 6
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{total_h}" '
             f'viewBox="0 0 {width} {total_h}" class="chart" role="img" '
             f'aria-label="{escape(title)}">{SVG_STYLE}',
             f'<text x="{width / 2}" y="18" text-anchor="middle" class="title">{escape(title)}</text>']
    xs = [p[0] for s in usable for p in s.points if not x.log or p[0] > 0]
    ys = [p[1] for s in usable for p in s.points if not y.log or p[1] > 0]
    if not xs or not ys:
        parts.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle">'
                     'no data</text></svg>')
        return "".join(parts)
    x_lo, x_hi = _range(xs, x)
    y_lo, y_hi = _range(ys, y)

    def sx(v: float) -> float:
        return left + plot_w * _frac(v, x_lo, x_hi, x.log)

    def sy(v: float) -> float:
        return top + plot_h * (1 - _frac(v, y_lo, y_hi, y.log))

    # Grid and tick labels.
    for t in y.ticks or nice_ticks(y_lo, y_hi, y.log):
        if not _inside(t, y_lo, y_hi):
            continue
        py = sy(t)
        parts.append(f'<line x1="{left}" y1="{py:.1f}" x2="{left + plot_w}" y2="{py:.1f}" '
                     'class="grid"/>')
        parts.append(f'<text x="{left - 6}" y="{py + 4:.1f}" text-anchor="end">'
                     f'{escape(y.fmt(t))}</text>')
    for t in x.ticks or nice_ticks(x_lo, x_hi, x.log):
        if not _inside(t, x_lo, x_hi):
            continue
        px = sx(t)
        parts.append(f'<line x1="{px:.1f}" y1="{top}" x2="{px:.1f}" y2="{top + plot_h}" '
                     'class="grid"/>')
        parts.append(f'<text x="{px:.1f}" y="{top + plot_h + 16}" text-anchor="middle">'
                     f'{escape(x.fmt(t))}</text>')
    parts.append(f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" class="frame"/>')
    parts.append(f'<text x="{left + plot_w / 2}" y="{top + plot_h + 36}" text-anchor="middle" '
                 f'class="axis">{escape(x.label)}{" (log)" if x.log else ""}</text>')
    parts.append(f'<text x="14" y="{top + plot_h / 2}" text-anchor="middle" class="axis" '
                 f'transform="rotate(-90 14 {top + plot_h / 2})">{escape(y.label)}'
                 f'{" (log)" if y.log else ""}</text>')
    # Lines.
    for s in usable:
        pts = [(sx(px), sy(py)) for px, py in s.points
               if (not x.log or px > 0) and (not y.log or py > 0)]
        if not pts:
            continue
        if s.step:
            stepped = [pts[0]]
            for a, b in zip(pts, pts[1:]):
                stepped += [(b[0], a[1]), b]
            pts_path = stepped
        else:
            pts_path = pts
        dash = ' stroke-dasharray="6 4"' if s.dashed else ""
        coords = " ".join(f"{a:.1f},{b:.1f}" for a, b in pts_path)
        parts.append(f'<polyline points="{coords}" fill="none" stroke="{s.color}" '
                     f'stroke-width="1.8"{dash}><title>{escape(s.label)}</title></polyline>')
        if s.markers:
            for (px, py), (cx, cy) in zip(((a, b) for a, b in s.points
                                           if (not x.log or a > 0) and (not y.log or b > 0)), pts):
                parts.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="2.8" fill="{s.color}">'
                             f'<title>{escape(s.label)}: {escape(x.fmt(px))}, '
                             f'{escape(y.fmt(py))}</title></circle>')
    # Legend, two columns under the plot.
    for i, s in enumerate(usable):
        lx = left + (i % columns) * (plot_w / 2)
        ly = height + 4 + 18 * (i // columns)
        dash = ' stroke-dasharray="6 4"' if s.dashed else ""
        parts.append(f'<line x1="{lx:.1f}" y1="{ly:.1f}" x2="{lx + 24:.1f}" y2="{ly:.1f}" '
                     f'stroke="{s.color}" stroke-width="2"{dash}/>')
        parts.append(f'<text x="{lx + 30:.1f}" y="{ly + 4:.1f}">{escape(s.label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _range(values: Sequence[float], axis: Axis) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    if axis.ticks:
        lo, hi = min(lo, *axis.ticks), max(hi, *axis.ticks)
    if axis.log:
        if hi <= lo:
            return lo / 2, hi * 2
        # A little room around the data, in log space.
        pad = (math.log10(hi) - math.log10(lo)) * 0.06
        return 10 ** (math.log10(lo) - pad), 10 ** (math.log10(hi) + pad)
    if axis.zero:
        lo = min(lo, 0.0)
    if hi <= lo:
        return lo - 1, hi + 1
    pad = (hi - lo) * 0.06
    return (lo if axis.zero and lo == 0 else lo - pad), hi + pad


def _inside(v: float, lo: float, hi: float) -> bool:
    slack = (hi - lo) * 1e-9
    return lo - slack <= v <= hi + slack


def _frac(v: float, lo: float, hi: float, log: bool) -> float:
    if log:
        return (math.log10(v) - math.log10(lo)) / (math.log10(hi) - math.log10(lo))
    return (v - lo) / (hi - lo)
