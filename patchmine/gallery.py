"""The static HTML gallery of a result file: plain files, relative links, no server.

Public names: render.

    >>> from patchmine import gallery
    >>> gallery.render("out.h5", "gallery/")                             # gallery/index.html

The pictures come from `patchmine.pictures`; this module lays out the folders, writes the pages
and draws the channels on a thread pool.
"""

from __future__ import annotations

import bisect
import html
import os
import re
import threading
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from patchmine.errors import UsageError
from patchmine.pictures import (
    OVERLAYS,
    Channel,
    LayerInfo,
    Original,
    draw_context,
    draw_montage,
    draw_overview,
    format_number,
    load_original,
    overview_grid,
    thumb_side,
    thumbnail,
)

__all__ = ["render"]

PNG = {"compress_level": 1}  # fast; montages are mostly flat background and upscaled pixels
JPEG = {"quality": 88}  # context views are photographs

_CSS = """
body{background:#18181b;color:#e8e8ec;font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;
margin:0;padding:16px 24px}
a{color:#7cc4ff;text-decoration:none}a:hover{text-decoration:underline}
h1{font-size:20px;margin:4px 0 12px}h2{font-size:16px;margin:18px 0 8px;color:#c8c8d0}
.nav{color:#9a9aa6;margin-bottom:10px}.nav a{margin-right:4px}
table{border-collapse:collapse;margin:8px 0}td,th{padding:3px 10px;border-bottom:1px solid #34343c;
text-align:left;vertical-align:top}th{color:#a0a0ac;font-weight:600}
td.n{text-align:right;font-variant-numeric:tabular-nums}code{color:#d6d6de}
figure{margin:0}
.pics{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}
.pics img{max-width:100%;height:auto;border:1px solid #34343c}
.grid{display:flex;flex-wrap:wrap;gap:0}.grid a{display:block;background-repeat:no-repeat}
.grid a.off{opacity:.35;pointer-events:none}
.dead{color:#eb4034}.muted{color:#9a9aa6}
"""


class _Originals:
    """Downscaled original images, read once and shared across channels (LRU, thread-safe)."""

    def __init__(self, result, capacity: int = 2048):
        self.result = result
        self.capacity = capacity
        self._cache: OrderedDict[int, Original] = OrderedDict()
        self._lock = threading.Lock()

    def __call__(self, i: int) -> Original:
        """(thumbnail or None, why not), as `patchmine.pictures.load_original`."""
        with self._lock:
            if i in self._cache:
                self._cache.move_to_end(i)
                return self._cache[i]
        got = load_original(self.result, i)
        with self._lock:
            self._cache[i] = got
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        return got


# --------------------------------------------------------------------------------------------------
# pages


def _page(title: str, body: str) -> str:
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>\n<body>\n{body}\n"
        "</body></html>\n"
    )


def _slug(name: str, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".") or "layer"
    slug, n = base, 1
    while slug.lower() in taken:
        n += 1
        slug = f"{base}_{n}"
    taken.add(slug.lower())
    return slug


def _esc(v) -> str:
    return html.escape(str(v), quote=True)


def _box_text(b: Sequence[float], digits: int | None = None) -> str:
    if digits is None:
        return "(" + ", ".join(str(int(v)) for v in b) + ")"
    return "(" + ", ".join(f"{v:.{digits}f}" for v in b) + ")"


def _geometry(info: LayerInfo, long: bool) -> str:
    f = info.field
    if f.whole:
        return "whole input"
    if long:
        return f"{f.size[0]} px, stride {f.stride[0]}, offset {f.offset[0]}"
    return f"rf {f.size[0]} stride {f.stride[0]} offset {f.offset[0]}"


def _channel_page(
    ch: Channel,
    result,
    overlay: str,
    prev_c: int | None,
    next_c: int | None,
    context_notes: dict[int, str],
) -> str:
    info = ch.info
    c = ch.c
    nav = (
        f'<div class="nav"><a href="../index.html">all layers</a> / '
        f'<a href="index.html">{_esc(info.name)}</a> / channel {c}'
    )
    if prev_c is not None:
        nav += f' &nbsp; <a href="c{prev_c:04d}.html">&larr; {prev_c}</a>'
    if next_c is not None:
        nav += f' &nbsp; <a href="c{next_c:04d}.html">{next_c} &rarr;</a>'
    nav += "</div>"
    dead = ' <span class="dead">dead</span>' if ch.dead else ""
    parts = [nav, f"<h1>{_esc(info.name)} &middot; channel {c}{dead}</h1>"]
    stats = []
    for key, arr in (("max", info.max), ("mean", info.mean)):
        if np.isfinite(arr[c]):
            stats.append(f"{key} {_esc(format_number(float(arr[c])))}")
    if np.isfinite(info.threshold[c]):
        stats.append(f"q{info.q:g} {_esc(format_number(float(info.threshold[c])))}")
    if stats:
        parts.append(f'<p class="muted">activation over the corpus: {" &middot; ".join(stats)}</p>')
    shown_overlay = "" if overlay == "none" or info.field.whole else f", {_esc(overlay)} overlay"
    parts.append(
        '<div class="pics">'
        f'<figure><img src="c{c:04d}.png" alt="top {info.k} patches of channel {c}">'
        f'<figcaption class="muted">top-{info.k} receptive-field patches{shown_overlay}'
        "</figcaption></figure>"
        f'<figure><img src="c{c:04d}_context.jpg" alt="winners of channel {c} in context">'
        '<figcaption class="muted">in the original images</figcaption></figure></div>'
    )
    rows = [
        "<table><tr><th>rank</th><th>score</th><th>image</th><th>yx</th><th>box (input px)</th>"
        "<th>box_orig (original px)</th><th></th></tr>"
    ]
    for rec in ch.records:
        try:
            full = str(result.image_file(rec["image"]))
        except (KeyError, IndexError, TypeError):
            full = rec["path"]
        note = context_notes.get(rec["rank"], "")
        rows.append(
            f'<tr><td class="n">{rec["rank"] + 1}</td>'
            f'<td class="n">{_esc(format_number(rec["score"]))}</td>'
            f'<td><code title="{_esc(full)}">{_esc(rec["path"])}</code></td>'
            f"<td>{_esc(_box_text(rec['yx']))}</td><td>{_esc(_box_text(rec['box']))}</td>"
            f"<td>{_esc(_box_text(rec['box_orig'], 1))}</td>"
            f'<td class="dead">{_esc(note)}</td></tr>'
        )
    rows.append("</table>")
    if not ch.records:
        rows = ['<p class="dead">no entries: this channel was never active on the corpus</p>']
    parts.extend(rows)
    return _page(f"{info.name} channel {c}", "\n".join(parts))


def _layer_page(info: LayerInfo, rendered: list[int]) -> str:
    g = overview_grid(info.channels, info.patch_size)
    cw, chh = g.tile + g.pad, g.tile + g.label_h + g.pad
    shown = set(rendered)
    n_dead = info.n_dead
    parts = [
        '<div class="nav"><a href="../index.html">all layers</a> / ' + _esc(info.name) + "</div>",
        f"<h1>{_esc(info.name)}</h1>",
        f'<p class="muted">{info.channels} channels &middot; k={info.k} &middot; '
        f"{_esc(_geometry(info, long=False))} &middot; "
        f'patch {info.patch_size}px &middot; <span class="{"dead" if n_dead else ""}">'
        f'{n_dead} dead</span> &middot; <a href="overview.png">overview image</a></p>',
    ]
    if len(shown) < info.channels:
        parts.append(
            f'<p class="muted">{len(shown)} of {info.channels} channels rendered; '
            "the others are dimmed</p>"
        )
    cells = ['<div class="grid">']
    for c in range(info.channels):
        x0, y0, _, _ = g.cell(c)
        x, y = x0 - g.pad // 2, y0 - g.pad // 2
        title = f"channel {c}" + (
            " (dead)" if info.dead(c) else f", top score {format_number(float(info.score[c, 0]))}"
        )
        style = (
            f"width:{cw}px;height:{chh}px;background-image:url(overview.png);"
            f"background-position:-{x}px -{y}px"
        )
        if c in shown:
            cells.append(f'<a href="c{c:04d}.html" title="{_esc(title)}" style="{style}"></a>')
        else:
            cells.append(f'<a class="off" title="{_esc(title)}" style="{style}"></a>')
    cells.append("</div>")
    parts.append("".join(cells))
    return _page(info.name, "\n".join(parts))


def _index_page(result, entries: list[tuple[str, LayerInfo, str, int]]) -> str:
    """``entries``: per layer (folder, info, feature-map size "HxW", channels rendered)."""
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
        "</table><h2>layers</h2><table><tr><th>layer</th><th>channels</th><th>map</th>"
        "<th>receptive field</th><th>patch</th><th>dead</th><th>rendered</th></tr>"
    )
    for slug, info, fmap, n_rendered in entries:
        parts.append(
            f'<tr><td><a href="{_esc(slug)}/index.html">{_esc(info.name)}</a></td>'
            f'<td class="n">{info.channels}</td><td>{_esc(fmap)}</td>'
            f"<td>{_esc(_geometry(info, long=True))}</td>"
            f'<td class="n">{info.patch_size}</td><td class="n">{info.n_dead}</td>'
            f'<td class="n">{n_rendered}</td></tr>'
        )
    parts.append("</table>")
    return _page("patchmine gallery", "\n".join(parts))


def _fmap(layer) -> str:
    hw = layer.attrs.get("fmap_hw", [1, 1])
    return "x".join(str(v) for v in (hw if isinstance(hw, (list, tuple)) else [hw]))


# --------------------------------------------------------------------------------------------------
# orchestration


def _render_channel(
    ch: Channel,
    result,
    overlay: str,
    folder: Path,
    prev_c: int | None,
    next_c: int | None,
    originals: _Originals,
) -> None:
    c = ch.c
    draw_montage(ch, overlay).save(folder / f"c{c:04d}.png", **PNG)
    draw_context(ch, result, originals).save(folder / f"c{c:04d}_context.jpg", **JPEG)
    notes = {}
    for rec in ch.records:
        thumb, why = originals(rec["image"])
        if thumb is None:
            notes[rec["rank"]] = f"{why}: context shows the stored patch"
    page = _channel_page(ch, result, overlay, prev_c, next_c, notes)
    (folder / f"c{c:04d}.html").write_text(page, encoding="utf-8")


def _wanted(channels: Iterable[int] | None) -> list[int] | None:
    """Channel numbers sorted and unique; None for all."""
    if channels is None:
        return None
    if isinstance(channels, str):
        raise UsageError(
            f"channels must be channel numbers, got the text {channels!r}; "
            "patchmine.cli.parse_channels reads lists such as 0,5,9-20"
        )
    out = sorted({int(c) for c in channels})
    if not out:
        raise UsageError("empty channel list")
    if out[0] < 0:
        raise UsageError(f"channel numbers are 0 or more, got {out[0]}")
    return out


def _prepare(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"output exists and is not a folder: {out}")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create output folder {out}: {e.strerror or e}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise UsageError(f"output folder is not writable: {out}")


def render(
    path: str | os.PathLike,
    out_dir: str | os.PathLike,
    layers: Sequence[str] | None = None,
    channels: Iterable[int] | None = None,
    overlay: str = "heat",
    progress: bool = True,
    workers: int | None = None,
) -> Path:
    """Render a result file as a static HTML gallery (plain files, relative links, no server).

    Writes ``out_dir/index.html`` (layers), ``out_dir/<layer>/index.html`` (the overview, linking
    to channels), ``overview.png``, and per rendered channel ``cNNNN.png`` (montage),
    ``cNNNN_context.jpg`` and ``cNNNN.html`` (both pictures and a table of the winners).

    Args:
        path: a result file.
        out_dir: output folder (created; files in it are overwritten).
        layers: layer names (default: all, in file order).
        channels: channel numbers (default: all); per layer, channels beyond its count are left
            out. ``patchmine.cli.parse_channels`` turns ``"0,5,9-20"`` into such a list.
        overlay: ``"heat"``, ``"mask"`` or ``"none"`` on the montages.
        progress: show a tqdm bar over channels.
        workers: threads that draw and encode the pictures (default: the cores, at most 8).

    Returns:
        The path of ``out_dir/index.html``.
    """
    from tqdm.auto import tqdm

    from patchmine.store import open_result

    if overlay not in OVERLAYS:
        raise UsageError(f"unknown overlay {overlay!r}; choose one of {', '.join(OVERLAYS)}")
    wanted = _wanted(channels)
    out = Path(out_dir)
    _prepare(out)
    workers = workers or min(8, os.cpu_count() or 1)
    with open_result(path) as result:
        names = list(layers) if layers else list(result.layers)
        lrs = [result.layer(n) for n in names]  # unknown names fail here, before any work
        if wanted is not None and lrs and max(wanted) >= max(lr.channels for lr in lrs):
            most = max(lr.channels for lr in lrs)
            raise UsageError(
                f"channel {max(wanted)} out of range: the selected layers have at most "
                f"{most} channels (0..{most - 1})"
            )
        originals = _Originals(result)
        taken: set[str] = set()
        entries = []
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for lr in lrs:
                info = LayerInfo.read(lr)
                slug = _slug(lr.name, taken)
                folder = out / slug
                folder.mkdir(exist_ok=True)
                all_channels = range(info.channels)
                sel = [c for c in (all_channels if wanted is None else wanted) if c < info.channels]
                selset = set(sel)
                side = thumb_side(info.patch_size)
                thumbs: dict[int, Image.Image] = {}
                pending: deque[Future] = deque()
                bar = tqdm(
                    total=len(sel), desc=lr.name, unit="ch", disable=not progress, leave=True
                )
                try:
                    for c in all_channels:
                        dead = info.dead(c)
                        if c not in selset:
                            thumbs[c] = thumbnail(None if dead else lr.patches(c)[0], side)
                            continue
                        ch = Channel.read(lr, c, info)
                        thumbs[c] = thumbnail(None if dead else ch.patches[0], side)
                        i = bisect.bisect_left(sel, c)
                        prev_c = sel[i - 1] if i > 0 else None
                        next_c = sel[i + 1] if i + 1 < len(sel) else None
                        pending.append(
                            pool.submit(
                                _render_channel,
                                ch,
                                result,
                                overlay,
                                folder,
                                prev_c,
                                next_c,
                                originals,
                            )
                        )
                        while len(pending) > 2 * workers:
                            pending.popleft().result()
                            bar.update(1)
                    while pending:
                        pending.popleft().result()
                        bar.update(1)
                finally:
                    for f in pending:
                        f.cancel()
                    bar.close()
                draw_overview(info, thumbs).save(folder / "overview.png", compress_level=6)
                (folder / "index.html").write_text(_layer_page(info, sel), encoding="utf-8")
                entries.append((slug, info, _fmap(lr), len(sel)))
        index = out / "index.html"
        index.write_text(_index_page(result, entries), encoding="utf-8")
    return index
