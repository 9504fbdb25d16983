"""The HTML pages of the gallery: index, layer pages, channel pages (text only, no drawing).

Public names: Sprite, ChannelView, index_page, layer_page, channel_page, file_name.

Pictures are referenced, never embedded: a `Sprite` names a tile sheet written by the gallery and
the size its tiles are shown at; captions, tables and plots (inline SVG) are HTML.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from patchmine.pictures import LayerInfo, format_number

__all__ = ["Sprite", "ChannelView", "index_page", "layer_page", "channel_page", "file_name"]


def file_name(c: int, suffix: str = ".html") -> str:
    """``c0042.html`` and the like."""
    return f"c{c:04d}{suffix}"


def _esc(v) -> str:
    return html.escape(str(v), quote=True)


def _num(v: float) -> str:
    return format_number(float(v))


def _page(title: str, body: str, depth: int) -> str:
    up = "../" * depth
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width">'
        f'<title>{_esc(title)}</title><link rel="stylesheet" href="{up}gallery.css"></head>\n'
        f'<body>\n{body}\n<script src="{up}gallery.js"></script>\n</body></html>\n'
    )


@dataclass(frozen=True)
class Sprite:
    """A tile sheet: ``src`` with ``n`` tiles of ``side`` pixels in ``cols`` columns, shown at
    ``show`` CSS pixels (pixelated when that is a whole multiple of ``side``)."""

    src: str
    n: int
    cols: int
    side: int
    show: int

    def cell(self, i: int, caption: str, title: str = "", href: str = "") -> str:
        r, c = divmod(i, self.cols)
        f = self.show / self.side
        rows = math.ceil(self.n / self.cols)
        style = (
            f"width:{self.show}px;height:{self.show}px;background-image:url({self.src});"
            f"background-size:{self.cols * self.show}px {round(rows * self.side * f)}px;"
            f"background-position:-{c * self.show}px -{r * self.show}px"
        )
        tag = f'<a class="tile" href="{_esc(href)}"' if href else '<span class="tile"'
        end = "</a>" if href else "</span>"
        return (
            f'<figure>{tag} title="{_esc(title)}" style="{style}">{end}'
            f"<figcaption>{caption}</figcaption></figure>"
        )

    def grid(self, captions: Sequence[str], titles: Sequence[str], k: int, hrefs=None) -> str:
        px = " px" if self.show % self.side == 0 and self.show > self.side else ""
        cols = max(1, math.ceil(math.sqrt(k)))
        parts = [
            f'<div class="tiles{px}" style="grid-template-columns:repeat({cols},{self.show + 2}px)">'
        ]
        for i in range(k):
            if i < self.n:
                parts.append(self.cell(i, captions[i], titles[i], hrefs[i] if hrefs else ""))
            else:
                s = self.show
                parts.append(
                    f'<figure><span class="tile empty" style="width:{s}px;height:{s}px">empty'
                    "</span><figcaption>&nbsp;</figcaption></figure>"
                )
        parts.append("</div>")
        return "".join(parts)


@dataclass
class ChannelView:
    """What a channel page shows, gathered by the gallery."""

    info: LayerInfo
    c: int
    records: list[dict]
    name: str = ""
    top: Sprite | None = None
    projection: Sprite | None = None
    full: str = ""  # sheet of the whole boxes, where fields exceed the input
    bottom_records: list[dict] = field(default_factory=list)
    bottom: Sprite | None = None
    bottom_projection: Sprite | None = None
    tokens: Sprite | None = None
    originals: dict[int, tuple[str, int, int] | None] = field(default_factory=dict)
    image_shape: dict[int, tuple[int, int]] = field(default_factory=dict)
    crops: dict[int, tuple[float, float, float, float] | None] = field(default_factory=dict)
    histogram: str = ""
    color_bar: str = ""
    labels_svg: str = ""
    selectivity: float = float("nan")
    border_share: float = float("nan")
    full_paths: list[str] = field(default_factory=list)
    overlay: str = "heat"


def _short(path: str) -> str:
    return path.replace("\\", "/").rsplit("/", 1)[-1]


def _captions(records: list[dict]) -> tuple[list[str], list[str]]:
    caps = [
        f"#{r['rank'] + 1} <b>{_esc(_num(r['score']))}</b> {_esc(_short(r['path']))}"
        for r in records
    ]
    return caps, [str(r["path"]) for r in records]


def _nav(info: LayerInfo, c: int, prev_c, next_c, name: str) -> str:
    nav = (
        '<div class="nav"><span class="keys muted">keys: &larr; &rarr; channel, &uarr; layer</span>'
        f'<a href="../index.html">all layers</a> / <a id="up" href="index.html">'
        f"{_esc(info.name)}</a> / channel {c}"
    )
    if prev_c is not None:
        nav += f' &nbsp; <a id="prev" rel="prev" href="{file_name(prev_c)}">&larr; {prev_c}</a>'
    if next_c is not None:
        nav += f' &nbsp; <a id="next" rel="next" href="{file_name(next_c)}">{next_c} &rarr;</a>'
    return nav + "</div>"


def _context(v: ChannelView, records: list[dict], anchor: str) -> str:
    parts = ['<div class="tiles" style="grid-template-columns:repeat(3,202px)">']
    for r in records:
        i = r["image"]
        cap = f"#{r['rank'] + 1} <b>{_esc(_num(r['score']))}</b> {_esc(_short(r['path']))}"
        orig = v.originals.get(i)
        if orig is None:
            parts.append(
                '<figure class="ctx"><div class="frame" style="width:200px;height:60px">'
                '</div><figcaption class="dead">original missing or unreadable '
                "(see the table)</figcaption></figure>"
            )
            continue
        src, tw, th = orig
        h, w = v.image_shape[i]
        spans = ""
        crop = v.crops.get(i)
        if crop is not None:
            spans += _span("crop", crop, h, w)
        spans += _span("box", r["box_orig"], h, w)
        parts.append(
            f'<figure class="ctx" id="{anchor}{r["rank"]}"><div class="frame" '
            f'style="width:{tw}px;height:{th}px"><img src="{_esc(src)}" width="{tw}" '
            f'height="{th}" alt="{_esc(_short(r["path"]))}">{spans}</div>'
            f'<figcaption title="{_esc(r["path"])}">{cap}</figcaption></figure>'
        )
    parts.append("</div>")
    parts.append(
        '<p class="legend"><i class="lbox"></i>receptive field of the winning unit'
        '<i class="lcrop"></i>the square the network saw (where the image was cropped)</p>'
    )
    return "".join(parts)


def _span(cls: str, box, h: int, w: int) -> str:
    y0, x0, y1, x1 = (float(b) for b in box)
    if not all(math.isfinite(b) for b in (y0, x0, y1, x1)) or h <= 0 or w <= 0:
        return ""
    return (
        f'<span class="{cls}" style="left:{100 * x0 / w:.2f}%;top:{100 * y0 / h:.2f}%;'
        f'width:{100 * (x1 - x0) / w:.2f}%;height:{100 * (y1 - y0) / h:.2f}%"></span>'
    )


def channel_page(v: ChannelView, prev_c: int | None, next_c: int | None) -> str:
    """A channel's page: pictures, plots, context, the winners' table."""
    info, c = v.info, v.c
    title = f"{info.name} · channel {c}" + (f" - {v.name}" if v.name else "")
    dead = ' <span class="dead">dead</span>' if info.dead(c) else ""
    parts = [_nav(info, c, prev_c, next_c, v.name), f"<h1>{_esc(title)}{dead}</h1>"]
    stats = []
    for key, arr in (("max", info.max), ("mean", info.mean)):
        if math.isfinite(arr[c]):
            stats.append(f"{key} {_esc(_num(arr[c]))}")
    if math.isfinite(info.threshold[c]):
        stats.append(f"q{info.q:g} {_esc(_num(info.threshold[c]))}")
    if math.isfinite(v.selectivity):
        stats.append(f"class selectivity {v.selectivity:.3f}")
    if stats:
        parts.append(f'<p class="muted">activation over the corpus: {" &middot; ".join(stats)}</p>')
    caps, titles = _captions(v.records)
    hrefs = [f"#w{r['rank']}" for r in v.records]
    row = []
    if v.top is not None:
        what = f"top-{info.k} receptive-field patches"
        if v.tokens is None and info.field.whole:
            what = f"top-{info.k} inputs"
        extra = (
            f' &middot; <a href="{_esc(v.full)}">whole boxes</a> (fields exceed the input: '
            "tiles show the part inside it)"
            if v.full
            else ""
        )
        row.append(
            f"<div><h3>{what}{extra}</h3>{v.top.grid(caps, titles, info.k, hrefs)}{v.color_bar}</div>"
        )
    if v.projection is not None:
        row.append(
            f"<div><h3>projections (grey = 0)</h3>{v.projection.grid(caps, titles, info.k)}</div>"
        )
    if v.tokens is not None:
        row.append(
            "<div><h3>the winning token, with one token of context</h3>"
            f"{v.tokens.grid(caps, titles, info.k, hrefs)}</div>"
        )
    if v.bottom is not None:
        bcaps, btitles = _captions(v.bottom_records)
        row.append(
            f"<div><h3>bottom-{info.k} (most negative)</h3>"
            f"{v.bottom.grid(bcaps, btitles, info.k)}</div>"
        )
        if v.bottom_projection is not None:
            row.append(
                "<div><h3>their projections</h3>"
                f"{v.bottom_projection.grid(bcaps, btitles, info.k)}</div>"
            )
    if row:
        parts.append('<div class="row">' + "".join(row) + "</div>")
    plots = []
    if v.histogram:
        plots.append(f"<div><h3>activations</h3>{v.histogram}</div>")
    if v.labels_svg:
        plots.append(f"<div><h3>labels of the top-{info.k}</h3>{v.labels_svg}</div>")
    if plots:
        parts.append('<div class="row">' + "".join(plots) + "</div>")
    if v.records:
        parts.append("<h2>in context</h2>" + _context(v, v.records, "w"))
    rows = [
        "<table><tr><th>rank</th><th>score</th><th>image</th><th>yx</th><th>box (input px)</th>"
        "<th>box_orig (original px)</th></tr>"
    ]
    for rec, full in zip(v.records, v.full_paths or [r["path"] for r in v.records], strict=False):
        rows.append(
            f'<tr><td class="n">{rec["rank"] + 1}</td><td class="n">{_esc(_num(rec["score"]))}</td>'
            f'<td><code title="{_esc(full)}">{_esc(rec["path"])}</code></td>'
            f"<td>{_esc(_tuple(rec['yx']))}</td><td>{_esc(_tuple(rec['box']))}</td>"
            f"<td>{_esc(_tuple(rec['box_orig'], 1))}</td></tr>"
        )
    rows.append("</table>")
    if not v.records:
        rows = ['<p class="dead">no entries: this channel was never active on the corpus</p>']
    parts.extend(rows)
    return _page(title, "\n".join(parts), 1)


def _tuple(b, digits: int | None = None) -> str:
    if digits is None:
        return "(" + ", ".join(str(int(x)) for x in b) + ")"
    return "(" + ", ".join(f"{x:.{digits}f}" for x in b) + ")"


def geometry(info: LayerInfo) -> str:
    f = info.field
    if info.attrs.get("layout") == "tokens":
        grid = info.attrs.get("token_grid")
        g = f"tokens {grid[0]}x{grid[1]}" if grid else "tokens"
        return g + (", whole input" if f.whole else f", rf {f.size[0]} px")
    if f.whole:
        return "whole input"
    return f"rf {f.size[0]} px, stride {f.stride[0]}, offset {f.offset[0]}"


def sheet_html(
    slug: str, src: str, info: LayerInfo, cols: int, side: int, rendered: set[int], names, prefix
) -> str:
    """The overview sheet with one positioned link per channel."""
    rows = max(1, math.ceil(info.channels / cols))
    w, h = cols * side, rows * side
    parts = [
        f'<div class="sheet" data-layer="{_esc(slug)}" style="width:{w}px">'
        f'<img src="{_esc(src)}" width="{w}" height="{h}" alt="overview of {_esc(info.name)}">'
    ]
    for c in range(info.channels):
        r, k = divmod(c, cols)
        pos = (
            f"left:{100 * k / cols:.4f}%;top:{100 * r / rows:.4f}%;"
            f"width:{100 / cols:.4f}%;height:{100 / rows:.4f}%"
        )
        t = f"channel {c}" + (f" - {names[c]}" if names else "")
        t += " (dead)" if info.dead(c) else f", top {_num(info.score[c, 0])}"
        if c in rendered:
            parts.append(
                f'<a data-c="{c}" href="{prefix}{file_name(c)}" title="{_esc(t)}" style="{pos}"></a>'
            )
        else:
            parts.append(f'<a data-c="{c}" class="off" title="{_esc(t)}" style="{pos}"></a>')
    parts.append("</div>")
    return "".join(parts)


def layer_page(info: LayerInfo, sheet: str, rows: list[dict], border_share: float) -> str:
    """A layer's page: the overview sheet and a sortable table of its channels, dead ones apart."""
    n_dead = sum(r["dead"] for r in rows)
    shown = sum(r["rendered"] for r in rows)
    meta = [
        f"{info.channels} channels",
        f"k={info.k}",
        geometry(info),
        f"patch {info.patch_size}px",
    ]
    if math.isfinite(border_share):
        meta.append(f"{100 * border_share:.0f}% of winners' fields cross the input edge")
    parts = [
        '<div class="nav"><span class="keys muted">keys: &uarr; all layers</span>'
        f'<a id="up" href="../index.html">all layers</a> / {_esc(info.name)}</div>',
        f"<h1>{_esc(info.name)}</h1>",
        f'<p class="muted">{" &middot; ".join(_esc(m) for m in meta)} &middot; '
        f'<span class="{"dead" if n_dead else ""}">{n_dead} dead</span>'
        + (f" &middot; {shown} of {info.channels} rendered" if shown < info.channels else "")
        + "</p>",
        sheet,
    ]
    has_names = any(r["name"] for r in rows)
    has_sel = any(math.isfinite(r["selectivity"]) for r in rows)
    has_top = any(r["top_label"] for r in rows)
    head = ['<th data-key="num">channel</th>']
    if has_names:
        head.append('<th data-key="text">name</th>')
    head += ['<th data-key="num">max</th>', '<th data-key="num">mean</th>']
    if has_sel:
        head.append('<th data-key="num">selectivity</th>')
    if has_top:
        head.append('<th data-key="text">top label</th>')
    body = []
    for r in rows:
        if r["dead"]:
            continue
        c = r["c"]
        link = f'<a href="{file_name(c)}">{c}</a>' if r["rendered"] else str(c)
        cells = [f'<td class="n" data-v="{c}">{link}</td>']
        if has_names:
            cells.append(f'<td data-v="{_esc(r["name"])}">{_esc(r["name"])}</td>')
        for key in ("max", "mean") + (("selectivity",) if has_sel else ()):
            x = float(r[key])
            cells.append(
                f'<td class="n" data-v="{x if math.isfinite(x) else "NaN"}">{_num(x)}</td>'
            )
        if has_top:
            cells.append(f'<td data-v="{_esc(r["top_label"])}">{_esc(r["top_label"])}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    parts.append(
        '<h2>channels</h2><p class="muted">click a column to sort</p>'
        f'<table class="sortable"><thead><tr>{"".join(head)}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table>"
    )
    dead = [r for r in rows if r["dead"]]
    if dead:
        links = ", ".join(
            f'<a href="{file_name(r["c"])}">{r["c"]}</a>' if r["rendered"] else str(r["c"])
            for r in dead
        )
        parts.append(
            f'<h2 class="dead">dead channels ({len(dead)}: never above 0 on the corpus)</h2>'
            f"<p>{links}</p>"
        )
    return _page(info.name, "\n".join(parts), 1)


def index_page(result, layers: list[dict]) -> str:
    """The index: run facts, the filter box and every layer's overview sheet.

    ``layers``: per layer ``slug``, ``info``, ``fmap``, ``sheet`` (HTML), ``names``, ``top``,
    ``rendered`` (set).
    """
    a = result.attrs
    meta = [
        ("file", str(result.path)),
        ("model", f"{a.get('model', '?')}  (weights {a.get('weights', '?')})"),
        ("input", f"{a.get('input_size', '?')} px"),
        ("top-k", f"k={a.get('k', '?')}, per image {a.get('per_image', '?')}"),
        ("images", f"{a.get('n_images', result.n_images)} ({a.get('n_failed', 0)} unreadable)"),
        ("made", f"{a.get('created_utc', '?')} by patchmine {a.get('patchmine_version', '?')}"),
    ]
    parts = ["<h1>patchmine gallery</h1>", "<table>"]
    parts += [f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in meta]
    parts.append(
        "</table>"
        '<p><input id="filter" type="search" placeholder="filter: channel number, class name or '
        'top label" aria-label="filter channels"> <span id="hit-count" class="muted"></span></p>'
        '<ul id="hits"></ul>'
    )
    data = []
    for L in layers:
        info = L["info"]
        parts.append(
            f'<h2><a href="{_esc(L["slug"])}/index.html">{_esc(info.name)}</a></h2>'
            f'<p class="muted">{info.channels} channels &middot; map {_esc(L["fmap"])} &middot; '
            f"{_esc(geometry(info))} &middot; {info.n_dead} dead</p>" + L["sheet"]
        )
        data.append(
            {
                "slug": L["slug"],
                "name": info.name,
                "n": info.channels,
                "names": L["names"],
                "top": L["top"],
                "rendered": [int(c in L["rendered"]) for c in range(info.channels)],
            }
        )
    blob = json.dumps(data, ensure_ascii=True).replace("</", "<\\/")
    parts.append(f'<script id="pm-data" type="application/json">{blob}</script>')
    return _page("patchmine gallery", "\n".join(parts), 0)
