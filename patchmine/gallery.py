"""The static HTML gallery of a result file: plain files, relative links, no server.

Public names: render.

    >>> from patchmine import gallery
    >>> gallery.render("out.h5", "gallery/")                             # gallery/index.html

Layout: ``index.html`` (every layer's overview sheet, a filter box), ``gallery.css``,
``gallery.js`` (the one script), ``img/`` (each winner image once, downscaled, shared by every
context view), and per layer ``<layer>/index.html``, ``overview.webp`` and per channel
``cNNNN.html`` with its tile sheets ``cNNNN*.webp``. Photographs are lossy WebP; captions, plots
and the boxes of the context views are HTML and SVG. Pages come from `patchmine.pages`, tile
sheets from `patchmine.tiles`; this module reads the file, draws on a thread pool and removes
what an earlier render left that this one did not write.
"""

from __future__ import annotations

import bisect
import math
import os
import re
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from patchmine import geometry, svg, tiles
from patchmine.errors import UsageError
from patchmine.layout import CONTEXT, tile_side
from patchmine.overlays import OVERLAYS, colormap_stops
from patchmine.pages import (
    ChannelView,
    Sprite,
    channel_page,
    file_name,
    index_page,
    layer_page,
    sheet_html,
)
from patchmine.pictures import (
    Channel,
    LayerInfo,
    _fit_square,
    inside_part,
    load_original,
    thumb_side,
    thumbnail,
)
from patchmine.site_assets import CSS, JS

__all__ = ["render"]

MANIFEST = ".patchmine-gallery"  # the files the last render wrote, one per line
_OURS = re.compile(r"^(c\d{4,}.*\.(html|png|jpg|webp)|overview\.(png|webp)|index\.html)$")


def _slug(name: str, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".") or "layer"
    if base in ("img",):
        base = "layer_img"
    slug, n = base, 1
    while slug.lower() in taken:
        n += 1
        slug = f"{base}_{n}"
    taken.add(slug.lower())
    return slug


def _fmap(layer) -> str:
    hw = layer.attrs.get("fmap_hw", [1, 1])
    return "x".join(str(v) for v in (hw if isinstance(hw, (list, tuple)) else [hw]))


def _store_side(p: int) -> int:
    """Stored tile side: the patch itself, or a whole multiple of it when tiny."""
    return p * math.ceil(64 / p) if p < 64 else p


class _Layer:
    """What every channel of one layer shares while its pages are drawn."""

    def __init__(self, lr, result, overlay: str, folder: Path, labels, label_names):
        self.lr, self.result, self.overlay, self.folder = lr, result, overlay, folder
        self.info = LayerInfo.read(lr)
        self.names = lr.channel_names
        self.selectivity = lr.selectivity
        self.bottom = lr.bottom
        self.bottom_info = LayerInfo.read(self.bottom) if self.bottom is not None else None
        self.tokens = self.info.attrs.get("layout") == "tokens" and (
            self.info.attrs.get("token_rf_stride") is not None
        )
        self.hist = lr.stats_state().get("hist")
        self.edges = None
        if self.hist is not None:
            from patchmine.stats import bin_edges

            self.edges = bin_edges()
        try:
            st = lr.stats()
            self.q, self.quantiles = np.asarray(st["q"]), np.asarray(st["quantile"])
        except (KeyError, ValueError):
            self.q = self.quantiles = None
        self.border_share = float(self.info.attrs.get("border_share", float("nan")))
        self.top_label = _top_labels(self.info, labels, label_names)
        self.labels, self.label_names = labels, label_names

    def name(self, c: int) -> str:
        return str(self.names[c]) if self.names and c < len(self.names) else ""


def _top_labels(info: LayerInfo, labels, names) -> list[str] | None:
    """Per channel, the most frequent label among its top-k images (None without labels)."""
    if labels is None or names is None:
        return None
    out = []
    for c in range(info.channels):
        imgs = info.image[c][info.image[c] >= 0]
        got = Counter(int(labels[i]) for i in imgs if labels[i] >= 0)
        out.append(names[got.most_common(1)[0][0]] if got else "")
    return out


def _originals(result, images: Iterable[int], out: Path, pool, done: dict) -> None:
    """Write ``img/iNNNNNN.webp`` for the images not yet written; ``done[i]`` = (src from a layer
    folder, width, height) or None where the original cannot be read."""
    todo = sorted(set(images) - set(done))
    (out / "img").mkdir(exist_ok=True)

    def one(i: int):
        thumb, _ = load_original(result, i, CONTEXT)
        if thumb is None:
            return i, None
        name = f"img/i{i:06d}.webp"
        tiles.encode(thumb, out / name)
        return i, (f"../{name}", thumb.width, thumb.height)

    for i, got in pool.map(one, todo):
        done[i] = got


def _crop_square(result, i: int, input_size: int):
    """The input square in original pixels, where it is not the whole image; else None."""
    tr = result.image_transform[i]
    if not (tr[0] > 0 and input_size):
        return None
    crop = geometry.to_original((0, 0, input_size, input_size), tr, np.float64)
    h, w = (float(v) for v in result.image_shape[i])
    if crop[0] > 1 or crop[1] > 1 or crop[2] < h - 1 or crop[3] < w - 1:
        return tuple(float(v) for v in crop)
    return None


def _thumb(patch, box, side: int, info: LayerInfo) -> Image.Image:
    """An overview tile; a box larger than the input shows its part inside the input."""
    tile = thumbnail(patch, side)
    part = None if patch is None or info.field.whole else inside_part(box, side, info.input_size)
    return tile if part is None else _fit_square(tile.crop(part), side)


def _sprite(tiles_: list[Image.Image], side: int, show: int, folder: Path, name: str) -> Sprite:
    cols = max(1, math.ceil(math.sqrt(max(1, len(tiles_)))))
    tiles.encode(tiles.sheet(tiles_, side, cols), folder / name)
    return Sprite(name, len(tiles_), cols, side, show)


def _render_channel(L: _Layer, ch: Channel, extra: dict, prev_c, next_c, originals) -> list[str]:
    """Draw and write one channel's sheets and page; returns the file names written."""
    info, c, folder = L.info, ch.c, L.folder
    p = info.patch_size
    side, show = _store_side(p), tile_side(p)  # stored, and shown in CSS px
    written = []
    v = ChannelView(info=info, c=c, records=ch.records, name=L.name(c), overlay=L.overlay)
    result = L.result
    v.full_paths = []
    for r in ch.records:
        try:
            v.full_paths.append(str(result.image_file(r["image"])))
        except (KeyError, IndexError, TypeError):
            v.full_paths.append(r["path"])
    if ch.records and (L.tokens or not info.field.whole):
        name = file_name(c, ".webp")
        v.top = _sprite(tiles.top_tiles(ch, L.overlay, side), side, show, folder, name)
        written.append(name)
        if tiles.has_outside_box(ch):
            v.full = file_name(c, "_full.webp")
            full = tiles.sheet(tiles.top_tiles(ch, L.overlay, side, inside=False), side)
            tiles.encode(full, folder / v.full)
            written.append(v.full)
        if L.overlay == "heat":
            lo, hi = ch.heat_range()
            if math.isfinite(hi) and hi > lo:
                v.color_bar = svg.color_bar(colormap_stops(), lo, hi)
    proj = extra.get("projection")
    if proj is not None and ch.records:
        name = file_name(c, "_proj.webp")
        v.projection = _sprite(tiles.projection_tiles(ch, proj, side), side, show, folder, name)
        written.append(name)
    if L.tokens and ch.records:
        name = file_name(c, "_tokens.webp")
        v.tokens = _sprite(tiles.token_crops(ch, result, 96), 96, 128, folder, name)
        written.append(name)
    bch = extra.get("bottom")
    if bch is not None and bch.records:
        v.bottom_records = bch.records
        name = file_name(c, "_bottom.webp")
        v.bottom = _sprite(tiles.top_tiles(bch, "none", side), side, show, folder, name)
        written.append(name)
        bproj = extra.get("bottom_projection")
        if bproj is not None:
            name = file_name(c, "_bottom_proj.webp")
            v.bottom_projection = _sprite(
                tiles.projection_tiles(bch, bproj, side), side, show, folder, name
            )
            written.append(name)
    for r in ch.records:
        i = r["image"]
        v.originals[i] = originals.get(i)
        v.image_shape[i] = tuple(int(x) for x in result.image_shape[i])
        v.crops[i] = None if info.field.whole else _crop_square(result, i, info.input_size)
    qv = L.quantiles[c] if L.quantiles is not None else ()
    v.histogram = svg.activation_histogram(
        [r["score"] for r in ch.records],
        hist=L.hist[c] if L.hist is not None else None,
        edges=L.edges,
        q=L.q if L.q is not None else (),
        quantiles=qv,
        vmax=float(info.max[c]),
        bottom_marks=[r["score"] for r in v.bottom_records],
    )
    if L.selectivity is not None:
        v.selectivity = float(L.selectivity[c])
    if L.labels is not None and L.label_names is not None and ch.records:
        got = Counter(int(L.labels[r["image"]]) for r in ch.records if L.labels[r["image"]] >= 0)
        rows = [(L.label_names[lab], float(n)) for lab, n in got.most_common(8)]
        v.labels_svg = svg.label_bars(rows, f"labels of the top-{info.k} images")
    page = file_name(c)
    (folder / page).write_text(channel_page(v, prev_c, next_c), encoding="utf-8")
    return [*written, page]


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


def _clean(out: Path, written: set[str], folders: set[str]) -> None:
    """Remove what an earlier render wrote and this one did not (a manifest, and for galleries
    older than it, the files of our own naming in the folders rendered now)."""
    old: set[str] = set()
    manifest = out / MANIFEST
    if manifest.is_file():
        old = {ln for ln in manifest.read_text(encoding="utf-8").splitlines() if ln}
    for folder in folders:
        for f in (out / folder).iterdir():
            if f.is_file() and _OURS.match(f.name):
                old.add(f"{folder}/{f.name}")
    for rel in sorted(old - written):
        f = out / rel
        if ".." in Path(rel).parts or not f.is_file():
            continue
        f.unlink()
        if f.parent != out and not any(f.parent.iterdir()):
            f.parent.rmdir()
    manifest.write_text("".join(f"{w}\n" for w in sorted(written)), encoding="utf-8")


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

    Writes ``out_dir/index.html`` (every layer's overview sheet, a filter box), per layer
    ``<layer>/index.html`` (its channels, sortable) and ``overview.webp``, and per rendered
    channel ``cNNNN.html`` with its tile sheets (``cNNNN.webp`` top-k, ``_proj``, ``_bottom``,
    ``_tokens``, ``_full`` where the file has them); winner images once under ``img/``. Files of
    an earlier render that this one does not write are removed.

    Args:
        path: a result file.
        out_dir: output folder (created; files in it are overwritten).
        layers: layer names (default: all, in file order).
        channels: channel numbers (default: all); per layer, channels beyond its count are left
            out. ``patchmine.cli.parse_channels`` turns ``"0,5,9-20"`` into such a list.
        overlay: ``"heat"``, ``"mask"`` or ``"none"`` on the patches.
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
    written: set[str] = {"index.html", "gallery.css", "gallery.js"}
    with open_result(path) as result:
        names = list(layers) if layers else list(result.layers)
        lrs = [result.layer(n) for n in names]  # unknown names fail here, before any work
        if wanted is not None and lrs and max(wanted) >= max(lr.channels for lr in lrs):
            most = max(lr.channels for lr in lrs)
            raise UsageError(
                f"channel {max(wanted)} out of range: the selected layers have at most "
                f"{most} channels (0..{most - 1})"
            )
        (out / "gallery.css").write_text(CSS, encoding="utf-8")
        (out / "gallery.js").write_text(JS, encoding="utf-8")
        labels, label_names = result.image_label, result.label_names
        taken: set[str] = {"img"}
        entries = []
        originals: dict = {}
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for lr in lrs:
                slug = _slug(lr.name, taken)
                folder = out / slug
                folder.mkdir(exist_ok=True)
                L = _Layer(lr, result, overlay, folder, labels, label_names)
                info = L.info
                all_channels = range(info.channels)
                sel = [c for c in (all_channels if wanted is None else wanted) if c < info.channels]
                selset = set(sel)
                need = {int(i) for c in sel for i in info.image[c] if i >= 0}
                _originals(result, need, out, pool, originals)
                written |= {f"img/i{i:06d}.webp" for i in need if originals.get(i)}
                side = thumb_side(info.patch_size)
                thumbs: list[Image.Image] = []
                boxes = lr.box
                pending: deque[Future] = deque()
                bar = tqdm(total=len(sel), desc=lr.name, unit="ch", disable=not progress)
                try:
                    for c in all_channels:
                        dead = info.dead(c)
                        if c not in selset:
                            best = None if dead else lr.patches(c)[0]
                            thumbs.append(_thumb(best, boxes[c, 0], side, info))
                            continue
                        ch = Channel.read(lr, c, info)
                        thumbs.append(
                            _thumb(None if dead else ch.patches[0], boxes[c, 0], side, info)
                        )
                        extra = {"projection": lr.projection(c)}
                        if L.bottom is not None:
                            extra["bottom"] = Channel.read(L.bottom, c, L.bottom_info)
                            extra["bottom_projection"] = L.bottom.projection(c)
                        i = bisect.bisect_left(sel, c)
                        prev_c = sel[i - 1] if i > 0 else None
                        next_c = sel[i + 1] if i + 1 < len(sel) else None
                        pending.append(
                            pool.submit(_render_channel, L, ch, extra, prev_c, next_c, originals)
                        )
                        while len(pending) > 2 * workers:
                            written |= {f"{slug}/{f}" for f in pending.popleft().result()}
                            bar.update(1)
                    while pending:
                        written |= {f"{slug}/{f}" for f in pending.popleft().result()}
                        bar.update(1)
                finally:
                    for f in pending:
                        f.cancel()
                    bar.close()
                cols = max(1, math.ceil(math.sqrt(info.channels * 1.5)))
                cols = min(cols, info.channels) if info.channels else 1
                tiles.encode(tiles.sheet(thumbs, side, cols), folder / "overview.webp")
                rows = [
                    {
                        "c": c,
                        "name": L.name(c),
                        "max": info.max[c],
                        "mean": info.mean[c],
                        "selectivity": L.selectivity[c] if L.selectivity is not None else np.nan,
                        "top_label": L.top_label[c] if L.top_label else "",
                        "dead": info.dead(c),
                        "rendered": c in selset,
                    }
                    for c in all_channels
                ]
                sheet = sheet_html(slug, "overview.webp", info, cols, side, selset, L.names, "")
                page = layer_page(info, sheet, rows, L.border_share)
                (folder / "index.html").write_text(page, encoding="utf-8")
                written |= {f"{slug}/overview.webp", f"{slug}/index.html"}
                index_sheet = sheet_html(
                    slug, f"{slug}/overview.webp", info, cols, side, selset, L.names, f"{slug}/"
                )
                entries.append(
                    {
                        "slug": slug,
                        "info": info,
                        "fmap": _fmap(lr),
                        "sheet": index_sheet,
                        "names": L.names,
                        "top": L.top_label,
                        "rendered": selset,
                    }
                )
        index = out / "index.html"
        index.write_text(index_page(result, entries), encoding="utf-8")
    _clean(out, written, {e["slug"] for e in entries})
    return index
