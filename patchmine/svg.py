"""Small inline SVG plots for the gallery pages: activation histograms, colour bars, label bars.

Public names: activation_histogram, color_bar, label_bars.

Each function returns an ``<svg>`` element as text (no script, no external font), sized in CSS
pixels, that a page embeds as is.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

import numpy as np

__all__ = ["activation_histogram", "color_bar", "label_bars"]

_AXIS = "#8a8a96"
_BAR = "#5b8def"
_MARK = "#ffc450"
_FONT = 'font-family="system-ui,sans-serif" font-size="11" fill="#a0a0ac"'


def _num(v: float) -> str:
    if not math.isfinite(v):
        return "nan"
    return f"{v:.3g}"


def _esc(v) -> str:
    return html.escape(str(v), quote=True)


def _density(
    hist: np.ndarray | None, edges: tuple[np.ndarray, np.ndarray] | None, q, qv, lo, hi, bins
) -> tuple[np.ndarray, str]:
    """Counts in ``bins`` equal bins over [lo, hi] and where they come from."""
    grid = np.linspace(lo, hi, bins + 1)
    if hist is not None and edges is not None and hist.sum() > 0:
        elo, ehi = edges
        counts = np.asarray(hist[: len(elo)], np.float64)
        mid = (elo + ehi) / 2
        idx = np.clip(np.searchsorted(grid, mid, side="right") - 1, 0, bins - 1)
        out = np.zeros(bins)
        np.add.at(out, idx, counts)
        return out, "histogram of every sampled location"
    # from quantiles: the mass between consecutive quantiles spread evenly over their values
    cdf = np.interp(grid, qv, q, left=np.nan, right=np.nan)
    out = np.nan_to_num(np.diff(cdf), nan=0.0)
    return out, f"from the quantiles {q[0]:g}..{q[-1]:g} (the tail)"


def activation_histogram(
    marks: Sequence[float],
    *,
    hist: np.ndarray | None = None,
    edges: tuple[np.ndarray, np.ndarray] | None = None,
    q: Sequence[float] = (),
    quantiles: Sequence[float] = (),
    vmax: float = float("nan"),
    bottom_marks: Sequence[float] = (),
    width: int = 460,
    height: int = 120,
    bins: int = 60,
) -> str:
    """A channel's activation distribution (log counts) with its top-k scores marked.

    Args:
        marks: the top-k scores (drawn as amber ticks); bottom_marks: the bottom-k ones.
        hist, edges: the channel's stored histogram (``stats/state/hist`` row) and
            `patchmine.stats.bin_edges`; without them the plot is drawn from ``q`` / ``quantiles``.
        vmax: the channel's maximum (extends the range).

    Returns:
        ``<svg>`` text, or ``""`` when there is nothing to draw.
    """
    qv = np.asarray(quantiles, np.float64)
    qq = np.asarray(q, np.float64)
    values = [v for v in (*marks, *bottom_marks, vmax, *qv.tolist()) if math.isfinite(v)]
    have_hist = hist is not None and edges is not None and np.asarray(hist).sum() > 0
    if have_hist:
        elo, ehi = edges
        used = np.flatnonzero(np.asarray(hist[: len(elo)]) > 0)
        values += [float(elo[used[0]]), float(ehi[used[-1]])]
    elif len(qv) < 2 or not np.all(np.isfinite(qv)):
        return ""
    lo, hi = min(values), max(values)
    if not hi > lo:
        lo, hi = lo - 1, hi + 1
    counts, source = _density(hist if have_hist else None, edges, qq, qv, lo, hi, bins)
    pad_l, pad_b, pad_t = 6, 18, 6
    w, h = width - 2 * pad_l, height - pad_b - pad_t
    logc = np.log1p(counts * (1.0 if have_hist else 1000.0))
    top = logc.max() or 1.0
    bw = w / bins
    parts = [
        f'<svg class="hist" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'role="img" aria-label="activation histogram"><title>activations of this channel, '
        f"{_esc(source)}; log scale; amber: top-k scores</title>"
    ]
    for i, c in enumerate(logc):
        if c <= 0:
            continue
        bh = h * c / top
        parts.append(
            f'<rect x="{pad_l + i * bw:.1f}" y="{pad_t + h - bh:.1f}" width="{max(bw - 1, 1):.1f}" '
            f'height="{bh:.1f}" fill="{_BAR}"/>'
        )

    def x_of(v: float) -> float:
        return pad_l + w * (v - lo) / (hi - lo)

    for vals, color in ((marks, _MARK), (bottom_marks, "#7cc4ff")):
        for v in vals:
            if math.isfinite(v):
                x = x_of(v)
                parts.append(
                    f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{pad_t}" y2="{pad_t + h}" '
                    f'stroke="{color}" stroke-width="1.5"/>'
                )
    y = pad_t + h
    parts.append(f'<line x1="{pad_l}" x2="{pad_l + w}" y1="{y}" y2="{y}" stroke="{_AXIS}"/>')
    parts.append(f'<text x="{pad_l}" y="{height - 4}" {_FONT}>{_esc(_num(lo))}</text>')
    parts.append(
        f'<text x="{pad_l + w}" y="{height - 4}" text-anchor="end" {_FONT}>{_esc(_num(hi))}</text>'
    )
    if lo < 0 < hi:
        x = x_of(0.0)
        parts.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{y}" y2="{y + 4}" stroke="{_AXIS}"/>'
            f'<text x="{x:.1f}" y="{height - 4}" text-anchor="middle" {_FONT}>0</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def color_bar(stops: Sequence[tuple[float, str, float]], lo: float, hi: float, width=240) -> str:
    """The heat overlay's colour bar from ``lo`` (transparent) to ``hi`` over a texture stripe."""
    grad = "".join(
        f'<stop offset="{t:.3f}" stop-color="{c}" stop-opacity="{a:.3f}"/>' for t, c, a in stops
    )
    bar_h = 12
    return (
        f'<svg class="cbar" width="{width}" height="{bar_h + 16}" role="img" '
        f'aria-label="heat colour bar"><title>heat overlay: activation {_esc(_num(lo))} '
        f"(transparent) to {_esc(_num(hi))}</title>"
        '<defs><linearGradient id="pm-heat">' + grad + "</linearGradient>"
        '<pattern id="pm-chk" width="8" height="8" patternUnits="userSpaceOnUse">'
        '<rect width="8" height="8" fill="#9a9aa0"/><rect width="4" height="4" fill="#d0d0d4"/>'
        '<rect x="4" y="4" width="4" height="4" fill="#d0d0d4"/></pattern></defs>'
        f'<rect width="{width}" height="{bar_h}" fill="url(#pm-chk)"/>'
        f'<rect width="{width}" height="{bar_h}" fill="url(#pm-heat)"/>'
        f'<text x="0" y="{bar_h + 13}" {_FONT}>{_esc(_num(lo))}</text>'
        f'<text x="{width}" y="{bar_h + 13}" text-anchor="end" {_FONT}>{_esc(_num(hi))}</text>'
        "</svg>"
    )


def label_bars(rows: Sequence[tuple[str, float]], title: str, width: int = 300) -> str:
    """Horizontal bars ``(label, value)`` (values >= 0), largest first as given."""
    if not rows:
        return ""
    top = max(v for _, v in rows) or 1.0
    line = 16
    label_w = 130
    parts = [
        f'<svg class="bars" width="{width}" height="{line * len(rows) + 4}" role="img" '
        f'aria-label="{_esc(title)}"><title>{_esc(title)}</title>'
    ]
    for i, (name, v) in enumerate(rows):
        y = 2 + i * line
        bw = (width - label_w - 40) * max(v, 0) / top
        short = name if len(name) <= 20 else name[:19] + "…"
        parts.append(
            f'<text x="{label_w - 4}" y="{y + 11}" text-anchor="end" {_FONT}>{_esc(short)}</text>'
            f'<rect x="{label_w}" y="{y + 2}" width="{bw:.1f}" height="{line - 5}" fill="{_BAR}"/>'
            f'<text x="{label_w + bw + 4:.1f}" y="{y + 11}" {_FONT}>{_esc(_num(v))}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)
