"""Pictures of a result file: montages, heat / mask overlays, overviews, context views, gallery.

Public names: OVERLAYS, Grid, montage_grid, overview_grid, context_grid, montage, overview, context,
render, parse_channels.

Everything reads a result through `patchmine.store` (never HDF5 directly) and returns PIL images, so
it is as usable from a notebook as from ``patchmine render``:

    >>> import patchmine
    >>> from patchmine import render
    >>> r = patchmine.open("out.h5")
    >>> render.montage(r.layer("features.10"), 5, overlay="heat")      # PIL.Image
    >>> render.render("out.h5", "gallery/")                             # gallery/index.html

Geometry: a tile shows a winner's box (model-input pixels, ``box``); its activation map ``heat``
(H, W) is laid over it by sampling, at every tile pixel, the map bilinearly at the unit whose box
center is nearest (unit y has its center at ``y*stride + offset + (size-1)/2``), so overlays stay
exact for any stride and padding. Pixels of a box outside the input are never overlaid.
"""

from __future__ import annotations

import bisect
import functools
import html
import math
import os
import re
import threading
import weakref
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from patchmine.errors import UsageError

__all__ = [
    "OVERLAYS",
    "Grid",
    "montage_grid",
    "overview_grid",
    "context_grid",
    "montage",
    "overview",
    "context",
    "render",
    "parse_channels",
]

OVERLAYS = ("heat", "mask", "none")

# look
BG = (24, 24, 27)
PANEL = (38, 38, 43)
EMPTY = (48, 48, 54)
TEXT = (232, 232, 236)
DIM_TEXT = (150, 150, 160)
SCORE = (255, 196, 80)
BOX = (255, 214, 0)
RED = (235, 64, 52)
OUTLINE = (0, 255, 220)
PAD = 6
MIN_TILE = 112  # montage tiles are at least this many pixels wide
THUMB = 64  # overview tiles
CONTEXT = 200  # context view cells
HEAT_ALPHA = 0.6
MASK_DIM = 0.28
MASK_Q = 0.995
PNG = {"compress_level": 1}  # fast; montages are mostly flat background and upscaled pixels
JPEG = {"quality": 88}  # context views are photographs

# turbo-like colormap anchors (value, rgb)
_CMAP_ANCHORS = [
    (0.0, (48, 18, 59)),
    (0.15, (68, 90, 204)),
    (0.3, (38, 180, 235)),
    (0.45, (38, 236, 154)),
    (0.6, (164, 252, 60)),
    (0.75, (250, 186, 57)),
    (0.9, (227, 67, 18)),
    (1.0, (150, 10, 5)),
]


def _make_lut() -> np.ndarray:
    xs = np.array([a for a, _ in _CMAP_ANCHORS])
    cs = np.array([c for _, c in _CMAP_ANCHORS], dtype=np.float32)
    t = np.linspace(0, 1, 256)
    return np.stack([np.interp(t, xs, cs[:, i]) for i in range(3)], axis=1).astype(np.float32)


_LUT = _make_lut()


@functools.lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def _text_w(font: ImageFont.ImageFont, text: str) -> float:
    try:
        return font.getlength(text)
    except AttributeError:  # very old bitmap font
        return 6 * len(text)


def _fit(font: ImageFont.ImageFont, text: str, width: float) -> str:
    """``text`` shortened from the left with an ellipsis until it fits ``width`` pixels."""
    if _text_w(font, text) <= width:
        return text
    lo, hi = 0, len(text)
    while lo < hi:  # smallest cut that fits
        mid = (lo + hi) // 2
        if _text_w(font, "…" + text[mid:]) <= width:
            hi = mid
        else:
            lo = mid + 1
    return "…" + text[lo:]


def _fmt(v: float) -> str:
    if not math.isfinite(v):
        return "nan"
    return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"


# --------------------------------------------------------------------------------------------------
# geometry


@dataclass(frozen=True)
class Grid:
    """Where the cells of a picture lie: ``n`` cells of ``tile`` x ``tile`` pixels in ``cols``
    columns, each with a ``label_h`` pixel label beneath, ``pad`` pixels apart, under a ``header_h``
    pixel title.
    """

    n: int
    cols: int
    tile: int
    label_h: int
    pad: int = PAD
    header_h: int = 0

    @property
    def rows(self) -> int:
        return max(1, math.ceil(self.n / self.cols))

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the whole picture."""
        w = self.pad + self.cols * (self.tile + self.pad)
        h = self.header_h + self.pad + self.rows * (self.tile + self.label_h + self.pad)
        return w, h

    def cell(self, i: int) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of cell ``i``: its tile and its label."""
        r, c = divmod(i, self.cols)
        x = self.pad + c * (self.tile + self.pad)
        y = self.header_h + self.pad + r * (self.tile + self.label_h + self.pad)
        return x, y, x + self.tile, y + self.tile + self.label_h

    def tile_box(self, i: int) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of the picture part of cell ``i``."""
        x0, y0, x1, _ = self.cell(i)
        return x0, y0, x1, y0 + self.tile

    def label_box(self, i: int) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of the label part of cell ``i``."""
        x0, y0, x1, y1 = self.cell(i)
        return x0, y0 + self.tile, x1, y1


def montage_grid(k: int, patch_size: int) -> Grid:
    """The montage layout for ``k`` patches of ``patch_size`` pixels (3 x 3 for k = 9)."""
    cols = max(1, math.ceil(math.sqrt(k)))
    return Grid(k, cols, _tile_side(patch_size), label_h=_LABEL_H, header_h=_HEADER_H)


def overview_grid(channels: int, patch_size: int) -> Grid:
    """The overview layout: one thumbnail per channel, a little wider than tall."""
    cols = max(1, math.ceil(math.sqrt(channels * 1.5)))
    cols = min(cols, channels) if channels else 1
    return Grid(channels, cols, _thumb_side(patch_size), label_h=15, pad=4, header_h=_HEADER_H)


def context_grid(k: int) -> Grid:
    cols = max(1, math.ceil(math.sqrt(k)))
    return Grid(k, cols, CONTEXT, label_h=_LABEL_H, header_h=_HEADER_H)


_LABEL_SIZE = 13
_LINE = _LABEL_SIZE + 4
_LABEL_H = 2 * _LINE + 4
_HEADER_SIZE = 15
_HEADER_H = _HEADER_SIZE + 12


def _tile_side(p: int) -> int:
    return p * math.ceil(MIN_TILE / p) if p < MIN_TILE else p


def _thumb_side(p: int) -> int:
    return p * math.ceil(THUMB / p) if p < THUMB else THUMB


def _resize_tile(img: np.ndarray, side: int) -> Image.Image:
    im = Image.fromarray(np.ascontiguousarray(img))
    if im.size == (side, side):
        return im
    small = im.width < 48 or side % im.width == 0 and im.width < side
    return im.resize((side, side), Image.Resampling.NEAREST if small else Image.Resampling.LANCZOS)


# --------------------------------------------------------------------------------------------------
# per-layer and per-channel data


@dataclass
class _LayerInfo:
    name: str
    channels: int
    k: int
    patch_size: int
    input_size: int
    whole: bool
    size: tuple[int, int]
    stride: tuple[int, int]
    offset: tuple[int, int]
    mean: np.ndarray  # (C,)
    max: np.ndarray  # (C,)
    threshold: np.ndarray  # (C,) activation quantile for masks, NaN when unknown
    q: float
    score: np.ndarray  # (C, k)
    image: np.ndarray  # (C, k)

    def dead(self, c: int) -> bool:
        m = self.max[c]
        return bool(self.image[c, 0] < 0 or (np.isfinite(m) and m <= 0))


_INFO: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_INFO_LOCK = threading.Lock()


def _pair(v) -> tuple[int, int]:
    v = list(v) if isinstance(v, (list, tuple, np.ndarray)) else [v, v]
    return int(v[0]), int(v[-1])


def _layer_info(layer) -> _LayerInfo:
    with _INFO_LOCK:
        info = _INFO.get(layer)
        if info is not None:
            return info
        a = layer.attrs
        c = layer.channels
        try:
            st = layer.stats()
        except (KeyError, ValueError):
            st = {}
        nan = np.full(c, np.nan, dtype=np.float32)
        mean = np.asarray(st.get("mean", nan), dtype=np.float32).reshape(-1)[:c]
        mx = np.asarray(st.get("max", nan), dtype=np.float32).reshape(-1)[:c]
        thr, qv = nan, float("nan")
        if "quantile" in st and "q" in st and np.size(st["q"]):
            qs = np.asarray(st["q"], dtype=np.float64).reshape(-1)
            hit = np.flatnonzero(np.isclose(qs, MASK_Q))
            j = int(hit[0]) if len(hit) else int(np.argmax(qs))
            thr = np.asarray(st["quantile"], dtype=np.float32).reshape(c, -1)[:, j]
            qv = float(qs[j])
        info = _LayerInfo(
            name=layer.name,
            channels=c,
            k=layer.k,
            patch_size=layer.patch_size,
            input_size=int(layer.result.attrs.get("input_size", 0) or 0),
            whole=bool(a.get("rf_whole", False)),
            size=_pair(a.get("rf_size", 1)),
            stride=_pair(a.get("rf_stride", 1)),
            offset=_pair(a.get("rf_offset", 0)),
            mean=mean,
            max=mx,
            threshold=thr,
            q=qv,
            score=np.asarray(layer.score),
            image=np.asarray(layer.image),
        )
        _INFO[layer] = info
        return info


@dataclass
class _Channel:
    """One channel's winners, read from the file once and shared by every picture of it."""

    info: _LayerInfo
    c: int
    records: list[dict]
    patches: np.ndarray  # (k, P, P, 3) uint8
    heat: np.ndarray  # (k, H, W) float32

    @property
    def dead(self) -> bool:
        return self.info.dead(self.c)

    def heat_range(self) -> tuple[float, float]:
        """(lo, hi): the channel's mean maps to transparent, its strongest activation to full."""
        used = len(self.records)
        h = self.heat[:used]
        hi = float(np.nanmax(h)) if used and h.size else float("nan")
        if used:
            hi = max(hi, float(self.info.score[self.c, 0])) if np.isfinite(hi) else hi
        lo = float(self.info.mean[self.c])
        if not np.isfinite(lo) or lo >= hi:
            lo = min(0.0, hi) if np.isfinite(hi) else 0.0
        return lo, hi


def _read_channel(layer, c: int) -> _Channel:
    info = _layer_info(layer)
    if not 0 <= c < info.channels:
        raise UsageError(f"layer {layer.name!r} has channels 0..{info.channels - 1}, not {c}")
    return _Channel(
        info,
        c,
        layer.records(c),
        np.asarray(layer.patches(c)),
        np.asarray(layer.heat(c), dtype=np.float32),
    )


# --------------------------------------------------------------------------------------------------
# overlays


def _axis_units(
    box0: int, box1: int, n: int, size: int, stride: int, offset: int, units: int, input_size: int
):
    """For ``n`` pixels spanning [box0, box1) of the input: bilinear indices/weights into ``units``
    map positions, and whether each pixel lies inside the input."""
    pix = box0 + (np.arange(n) + 0.5) * ((box1 - box0) / n) - 0.5
    u = (pix - (offset + (size - 1) / 2)) / stride
    u = np.clip(u, 0, units - 1)
    i0 = np.floor(u).astype(np.int64)
    i1 = np.minimum(i0 + 1, units - 1)
    w = (u - i0).astype(np.float32)
    inside = (pix >= -0.5) & (pix < input_size - 0.5) if input_size else np.ones(n, bool)
    return i0, i1, w, inside


def _sample_heat(ch: _Channel, slot: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """(side, side) activations over the slot's box, and the mask of its pixels inside the input."""
    info = ch.info
    hmap = ch.heat[slot]
    y0, x0, y1, x1 = ch.records[slot]["box"]
    iy0, iy1, wy, iny = _axis_units(
        y0, y1, side, info.size[0], info.stride[0], info.offset[0], hmap.shape[0], info.input_size
    )
    ix0, ix1, wx, inx = _axis_units(
        x0, x1, side, info.size[1], info.stride[1], info.offset[1], hmap.shape[1], info.input_size
    )
    rows = (1 - wy)[:, None] * hmap[iy0] + wy[:, None] * hmap[iy1]  # (side, W)
    vals = rows[:, ix0] * (1 - wx) + rows[:, ix1] * wx
    return vals, iny[:, None] & inx[None, :]


def _overlay(tile: Image.Image, ch: _Channel, slot: int, mode: str) -> Image.Image:
    info = ch.info
    if mode == "none" or info.whole or ch.heat.ndim != 3 or ch.heat.shape[1:] == (1, 1):
        return tile
    side = tile.width
    vals, inside = _sample_heat(ch, slot, side)
    rgb = np.asarray(tile, dtype=np.float32)
    if mode == "heat":
        lo, hi = ch.heat_range()
        if not (np.isfinite(hi) and hi > lo):
            return tile
        v = np.clip((vals - lo) / (hi - lo), 0, 1)
        v = np.where(inside & np.isfinite(v), v, 0)
        alpha = (HEAT_ALPHA * np.sqrt(v))[..., None]
        color = _LUT[np.rint(v * 255).astype(np.int64)]
        out = rgb * (1 - alpha) + color * alpha
    elif mode == "mask":
        thr = float(info.threshold[ch.c])
        if not np.isfinite(thr):
            return tile
        keep = (vals > thr) & inside
        out = np.where(keep[..., None], rgb, rgb * MASK_DIM)
        edge = keep & ~_erode(keep, 2 if side >= 96 else 1)
        out[edge] = OUTLINE
    else:
        raise UsageError(f"unknown overlay {mode!r}; choose one of {', '.join(OVERLAYS)}")
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))


def _erode(m: np.ndarray, steps: int) -> np.ndarray:
    for _ in range(steps):
        p = np.pad(m, 1, constant_values=False)
        m = m & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return m


# --------------------------------------------------------------------------------------------------
# pictures


def _header(draw: ImageDraw.ImageDraw, width: int, left: str, right: str = "") -> None:
    f = _font(_HEADER_SIZE)
    draw.text((PAD, 6), _fit(f, left, width - 2 * PAD), font=f, fill=TEXT)
    if right:
        rw = _text_w(f, right)
        if _text_w(f, left) + rw + 4 * PAD < width:
            draw.text((width - PAD - rw, 6), right, font=f, fill=DIM_TEXT)


def _label(
    draw: ImageDraw.ImageDraw,
    box,
    rank: int | None,
    score: float | None,
    name: str,
    name_color=DIM_TEXT,
) -> None:
    f = _font(_LABEL_SIZE)
    x0, y0, x1, _ = box
    width = x1 - x0
    y = y0 + 3
    if rank is not None:
        tag = f"#{rank + 1}"
        draw.text((x0 + 2, y), tag, font=f, fill=TEXT)
        if score is not None:
            s = _fmt(score)
            draw.text((x0 + 2 + _text_w(f, tag) + 8, y), s, font=f, fill=SCORE)
    if name:
        draw.text((x0 + 2, y + _LINE), _fit(f, name, width - 4), font=f, fill=name_color)


def _empty_tile(side: int, text: str = "empty") -> Image.Image:
    im = Image.new("RGB", (side, side), EMPTY)
    d = ImageDraw.Draw(im)
    f = _font(_LABEL_SIZE)
    d.text(((side - _text_w(f, text)) / 2, side / 2 - 8), text, font=f, fill=DIM_TEXT)
    return im


def _short(path: str) -> str:
    return path.replace("\\", "/").rsplit("/", 1)[-1] if path else path


def _montage(ch: _Channel, overlay: str) -> Image.Image:
    info = ch.info
    g = montage_grid(info.k, info.patch_size)
    im = Image.new("RGB", g.size, BG)
    draw = ImageDraw.Draw(im)
    title = f"{info.name}  channel {ch.c}"
    if info.whole:
        title += "  (whole input)"
    right = "dead" if ch.dead else ""
    if not right and overlay != "none" and not info.whole:
        right = f"overlay: {overlay}"
    _header(draw, g.size[0], title, right)
    for slot in range(info.k):
        tb = g.tile_box(slot)
        if slot < len(ch.records):
            rec = ch.records[slot]
            tile = _overlay(_resize_tile(ch.patches[slot], g.tile), ch, slot, overlay)
            im.paste(tile, tb[:2])
            _label(draw, g.label_box(slot), slot, rec["score"], _short(rec["path"]))
        else:
            im.paste(_empty_tile(g.tile), tb[:2])
    return im


def montage(layer, channel: int, overlay: str = "none") -> Image.Image:
    """The k winners of one channel as a grid of upscaled patches with rank, score and source.

    Args:
        layer: a `patchmine.store.LayerResult`.
        channel: channel index.
        overlay: ``"heat"`` (the activation map, translucent), ``"mask"`` (NetDissect style: pixels
            above the channel's 0.995 activation quantile kept, the rest dimmed, outlined) or
            ``"none"``. Whole-input layers have no overlay.

    Returns:
        An RGB image; its layout is ``montage_grid(layer.k, layer.patch_size)``.
    """
    if overlay not in OVERLAYS:
        raise UsageError(f"unknown overlay {overlay!r}; choose one of {', '.join(OVERLAYS)}")
    return _montage(_read_channel(layer, channel), overlay)


def _dead_tile(side: int) -> Image.Image:
    im = Image.new("RGB", (side, side), (92, 92, 96))
    d = ImageDraw.Draw(im)
    w = max(2, side // 16)
    d.line((4, 4, side - 5, side - 5), fill=RED, width=w)
    d.line((4, side - 5, side - 5, 4), fill=RED, width=w)
    f = _font(max(10, side // 5))
    t = "dead"
    tw = _text_w(f, t)
    d.rectangle(
        (
            (side - tw) / 2 - 3,
            side / 2 - side // 10 - 2,
            (side + tw) / 2 + 3,
            side / 2 + side // 10 + 3,
        ),
        fill=(92, 92, 96),
    )
    d.text(((side - tw) / 2, side / 2 - side // 10), t, font=f, fill=(255, 255, 255))
    return im


def _thumb(patch: np.ndarray | None, side: int, dead: bool) -> Image.Image:
    if dead or patch is None:
        return _dead_tile(side)
    return _resize_tile(patch, side)


def _overview_image(info: _LayerInfo, thumbs: dict[int, Image.Image]) -> Image.Image:
    g = overview_grid(info.channels, info.patch_size)
    im = Image.new("RGB", g.size, BG)
    draw = ImageDraw.Draw(im)
    n_dead = sum(info.dead(c) for c in range(info.channels))
    _header(
        draw,
        g.size[0],
        f"{info.name}  {info.channels} channels",
        f"{n_dead} dead" if n_dead else "",
    )
    f = _font(11)
    for c in range(info.channels):
        x0, y0, x1, _ = g.tile_box(c)
        im.paste(thumbs.get(c) or _dead_tile(g.tile), (x0, y0))
        t = str(c)
        draw.text(
            (x0 + (g.tile - _text_w(f, t)) / 2, y0 + g.tile + 1),
            t,
            font=f,
            fill=RED if info.dead(c) else DIM_TEXT,
        )
    return im


def overview(layer) -> Image.Image:
    """One thumbnail per channel (its best patch, with the channel number).

    Dead channels (never active: no entries, or stats max <= 0) are a grey tile with a red X.
    Layout: ``overview_grid(layer.channels, layer.patch_size)``.
    """
    info = _layer_info(layer)
    side = _thumb_side(info.patch_size)
    thumbs = {}
    for c in range(info.channels):
        dead = info.dead(c)
        thumbs[c] = _thumb(None if dead else layer.patches(c)[0], side, dead)
    return _overview_image(info, thumbs)


class _Originals:
    """Downscaled original images, read once and shared across channels (LRU, thread-safe)."""

    def __init__(self, result, side: int = CONTEXT, capacity: int = 2048):
        self.result = result
        self.side = side
        self.capacity = capacity
        self._cache: OrderedDict[int, tuple[Image.Image | None, str]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, i: int) -> tuple[Image.Image | None, str]:
        """(thumbnail or None, why not)."""
        with self._lock:
            if i in self._cache:
                self._cache.move_to_end(i)
                return self._cache[i]
        got = self._load(i)
        with self._lock:
            self._cache[i] = got
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        return got

    def _load(self, i: int) -> tuple[Image.Image | None, str]:
        try:
            path = self.result.image_file(i)
        except (KeyError, IndexError, TypeError):
            return None, "original unknown"
        if not path.is_file():
            return None, "original missing"
        try:
            with Image.open(path) as im:
                if im.format == "JPEG":
                    im.draft("RGB", (self.side, self.side))
                    im.load()
                    im = ImageOps.exif_transpose(im).convert("RGB")
                else:
                    from patchmine.corpus import load_rgb

                    im = load_rgb(path)
        except Exception:  # noqa: BLE001 - any unreadable original falls back to the stored patch
            return None, "original unreadable"
        h, w = (int(v) for v in self.result.image_shape[i])
        if h > 0 and w > 0 and abs(im.width / im.height - w / h) > 0.02 * (w / h):
            return None, "original changed"
        return _fit_image(im, self.side), ""


def _fit_image(im: Image.Image, side: int) -> Image.Image:
    """``im`` scaled to fit ``side`` x ``side``: shrunk smoothly, or grown (sharply when tiny)."""
    f = min(side / im.width, side / im.height)
    size = (max(1, round(im.width * f)), max(1, round(im.height * f)))
    if size == im.size:
        return im
    if f < 1:
        how = Image.Resampling.LANCZOS
    else:
        how = Image.Resampling.NEAREST if f >= 3 else Image.Resampling.BICUBIC
    return im.resize(size, how)


def _context(ch: _Channel, originals: _Originals) -> Image.Image:
    info = ch.info
    result = originals.result
    g = context_grid(info.k)
    im = Image.new("RGB", g.size, BG)
    draw = ImageDraw.Draw(im)
    _header(draw, g.size[0], f"{info.name}  channel {ch.c}  in context", "box: receptive field")
    for slot in range(info.k):
        x0, y0, x1, y1 = g.tile_box(slot)
        if slot >= len(ch.records):
            im.paste(_empty_tile(g.tile), (x0, y0))
            continue
        rec = ch.records[slot]
        thumb, why = originals.get(rec["image"])
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=PANEL)
        if thumb is None:
            p = info.patch_size
            side = p * (g.tile // p) if p <= g.tile else g.tile
            off = (g.tile - side) // 2
            im.paste(_resize_tile(ch.patches[slot], side), (x0 + off, y0 + off))
            _label(
                draw, g.label_box(slot), slot, rec["score"], f"{why}: stored patch", name_color=RED
            )
            continue
        ox = x0 + (g.tile - thumb.width) // 2
        oy = y0 + (g.tile - thumb.height) // 2
        im.paste(thumb, (ox, oy))
        h, w = (float(v) for v in result.image_shape[rec["image"]])
        s = thumb.width / w if w > 0 else 1.0
        t = [float(v) for v in result.image_transform[rec["image"]]]
        sc, ty, tx, sx = t if len(t) == 4 else (*t, t[0])  # older files: one scale
        if sc > 0 and sx > 0 and info.input_size and not info.whole:  # the square the network saw
            cy0, cx0 = ty / sc * s, tx / sx * s
            cy1, cx1 = (info.input_size + ty) / sc * s, (info.input_size + tx) / sx * s
            if cy0 > 1 or cx0 > 1 or cy1 < thumb.height - 1 or cx1 < thumb.width - 1:
                draw.rectangle(
                    (ox + cx0, oy + cy0, ox + cx1 - 1, oy + cy1 - 1),
                    outline=(150, 150, 160),
                    width=1,
                )
        by0, bx0, by1, bx1 = rec["box_orig"]
        if all(math.isfinite(v) for v in (by0, bx0, by1, bx1)):
            r = (ox + bx0 * s, oy + by0 * s, ox + bx1 * s - 1, oy + by1 * s - 1)
            r = (max(r[0], x0), max(r[1], y0), min(r[2], x1 - 1), min(r[3], y1 - 1))
            if r[2] > r[0] and r[3] > r[1]:
                draw.rectangle(r, outline=(0, 0, 0), width=4)
                draw.rectangle((r[0] + 1, r[1] + 1, r[2] - 1, r[3] - 1), outline=BOX, width=2)
        _label(draw, g.label_box(slot), slot, rec["score"], _short(rec["path"]))
    return im


def context(result, layer, channel: int, originals: _Originals | None = None) -> Image.Image:
    """The k winners of a channel in their whole original images (downscaled), box drawn.

    The original is re-read from ``result.image_file(i)``; where it is gone, unreadable or changed,
    the stored patch stands in and the label says so. A thin grey square marks the center crop the
    network saw, when it is not the whole image.

    Args:
        result: a `patchmine.store.Result`.
        layer: a layer name or `LayerResult` of it.
        channel: channel index.
    """
    lr = result.layer(layer) if isinstance(layer, str) else layer
    return _context(_read_channel(lr, channel), originals or _Originals(result))


# --------------------------------------------------------------------------------------------------
# channels on the command line


def parse_channels(
    spec: str | Iterable[int] | None, channels: int | None = None
) -> list[int] | None:
    """``"0,5,9-20"`` -> [0, 5, 9, ..., 20] (sorted, unique); ``None`` -> None (all).

    Raises:
        UsageError: malformed ranges, or a channel >= ``channels`` when given.
    """
    if spec is None:
        return None
    out: set[int] = set()
    if isinstance(spec, str):
        for part in (p.strip() for p in spec.split(",")):
            if not part:
                continue
            m = re.fullmatch(r"(\d+)\s*(?:-\s*(\d+))?", part)
            if not m:
                raise UsageError(f"bad channel list item {part!r}; use e.g. 0,5,9-20")
            a = int(m.group(1))
            b = int(m.group(2)) if m.group(2) is not None else a
            if b < a:
                raise UsageError(f"bad channel range {part!r}: end before start")
            out.update(range(a, b + 1))
    else:
        for v in spec:
            if int(v) < 0:
                raise UsageError(f"channel numbers are 0 or more, got {v}")
            out.add(int(v))
    if not out:
        raise UsageError("empty channel list")
    if channels is not None and max(out) >= channels:
        raise UsageError(
            f"channel {max(out)} out of range: the layer has channels 0..{channels - 1}"
        )
    return sorted(out)


# --------------------------------------------------------------------------------------------------
# gallery

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


def _e(v) -> str:
    return html.escape(str(v), quote=True)


def _box_text(b: Sequence[float], digits: int | None = None) -> str:
    if digits is None:
        return "(" + ", ".join(str(int(v)) for v in b) + ")"
    return "(" + ", ".join(f"{v:.{digits}f}" for v in b) + ")"


def _channel_page(
    ch: _Channel,
    result,
    overlay: str,
    layer_slug: str,
    prev_c,
    next_c,
    context_notes: dict[int, str],
) -> str:
    info = ch.info
    c = ch.c
    nav = (
        f'<div class="nav"><a href="../index.html">all layers</a> / '
        f'<a href="index.html">{_e(info.name)}</a> / channel {c}'
    )
    if prev_c is not None:
        nav += f' &nbsp; <a href="c{prev_c:04d}.html">&larr; {prev_c}</a>'
    if next_c is not None:
        nav += f' &nbsp; <a href="c{next_c:04d}.html">{next_c} &rarr;</a>'
    nav += "</div>"
    dead = ' <span class="dead">dead</span>' if ch.dead else ""
    parts = [nav, f"<h1>{_e(info.name)} &middot; channel {c}{dead}</h1>"]
    stats = []
    for key, arr in (("max", info.max), ("mean", info.mean)):
        if np.isfinite(arr[c]):
            stats.append(f"{key} {_e(_fmt(float(arr[c])))}")
    if np.isfinite(info.threshold[c]):
        stats.append(f"q{info.q:g} {_e(_fmt(float(info.threshold[c])))}")
    if stats:
        parts.append(f'<p class="muted">activation over the corpus: {" &middot; ".join(stats)}</p>')
    parts.append(
        '<div class="pics">'
        f'<figure><img src="c{c:04d}.png" alt="top {info.k} patches of channel {c}">'
        f'<figcaption class="muted">top-{info.k} receptive-field patches'
        f"{'' if overlay == 'none' or info.whole else f', {_e(overlay)} overlay'}</figcaption>"
        "</figure>"
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
            f'<tr><td class="n">{rec["rank"] + 1}</td><td class="n">{_e(_fmt(rec["score"]))}</td>'
            f'<td><code title="{_e(full)}">{_e(rec["path"])}</code></td>'
            f"<td>{_e(_box_text(rec['yx']))}</td><td>{_e(_box_text(rec['box']))}</td>"
            f"<td>{_e(_box_text(rec['box_orig'], 1))}</td>"
            f'<td class="dead">{_e(note)}</td></tr>'
        )
    rows.append("</table>")
    if not ch.records:
        rows = ['<p class="dead">no entries: this channel was never active on the corpus</p>']
    parts.extend(rows)
    return _page(f"{info.name} channel {c}", "\n".join(parts))


def _layer_page(info: _LayerInfo, rendered: list[int]) -> str:
    g = overview_grid(info.channels, info.patch_size)
    cw, chh = g.tile + g.pad, g.tile + g.label_h + g.pad
    shown = set(rendered)
    n_dead = sum(info.dead(c) for c in range(info.channels))
    geo = (
        "whole input"
        if info.whole
        else f"rf {info.size[0]} stride {info.stride[0]} offset {info.offset[0]}"
    )
    parts = [
        '<div class="nav"><a href="../index.html">all layers</a> / ' + _e(info.name) + "</div>",
        f"<h1>{_e(info.name)}</h1>",
        f'<p class="muted">{info.channels} channels &middot; k={info.k} &middot; '
        f"{_e(geo)} &middot; "
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
            " (dead)" if info.dead(c) else f", top score {_fmt(float(info.score[c, 0]))}"
        )
        style = (
            f"width:{cw}px;height:{chh}px;background-image:url(overview.png);"
            f"background-position:-{x}px -{y}px"
        )
        if c in shown:
            cells.append(f'<a href="c{c:04d}.html" title="{_e(title)}" style="{style}"></a>')
        else:
            cells.append(f'<a class="off" title="{_e(title)}" style="{style}"></a>')
    cells.append("</div>")
    parts.append("".join(cells))
    return _page(info.name, "\n".join(parts))


def _index_page(result, entries: list[tuple[str, str, _LayerInfo, int]]) -> str:
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
    parts += [f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in meta]
    parts.append(
        "</table><h2>layers</h2><table><tr><th>layer</th><th>channels</th><th>map</th>"
        "<th>receptive field</th><th>patch</th><th>dead</th><th>rendered</th></tr>"
    )
    for name, slug, info, n_rendered in entries:
        geo = (
            "whole input"
            if info.whole
            else f"{info.size[0]} px, stride {info.stride[0]}, offset {info.offset[0]}"
        )
        n_dead = sum(info.dead(c) for c in range(info.channels))
        parts.append(
            f'<tr><td><a href="{_e(slug)}/index.html">{_e(name)}</a></td>'
            f'<td class="n">{info.channels}</td><td>{_e(_fmap(result, name))}</td>'
            f"<td>{_e(geo)}</td>"
            f'<td class="n">{info.patch_size}</td><td class="n">{n_dead}</td>'
            f'<td class="n">{n_rendered}</td></tr>'
        )
    parts.append("</table>")
    return _page("patchmine gallery", "\n".join(parts))


def _fmap(result, name: str) -> str:
    hw = result.layer(name).attrs.get("fmap_hw", [1, 1])
    return "x".join(str(v) for v in (hw if isinstance(hw, (list, tuple)) else [hw]))


def _render_channel(
    ch: _Channel,
    result,
    overlay: str,
    folder: Path,
    slug: str,
    prev_c,
    next_c,
    originals: _Originals,
) -> None:
    c = ch.c
    _montage(ch, overlay).save(folder / f"c{c:04d}.png", **PNG)
    _context(ch, originals).save(folder / f"c{c:04d}_context.jpg", **JPEG)
    notes = {}
    for rec in ch.records:
        thumb, why = originals.get(rec["image"])
        if thumb is None:
            notes[rec["rank"]] = f"{why}: context shows the stored patch"
    page = _channel_page(ch, result, overlay, slug, prev_c, next_c, notes)
    (folder / f"c{c:04d}.html").write_text(page, encoding="utf-8")


def render(
    path: str | os.PathLike,
    out_dir: str | os.PathLike,
    layers: Sequence[str] | None = None,
    channels: str | Iterable[int] | None = None,
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
        channels: ``"0,5,9-20"`` or a list of ints (default: all); per layer, channels beyond its
            count are left out.
        overlay: ``"heat"``, ``"mask"`` or ``"none"`` on the montages.
        progress: show a tqdm bar over channels.
        workers: threads that draw and encode PNGs (default: the cores, at most 8).

    Returns:
        The path of ``out_dir/index.html``.
    """
    from tqdm.auto import tqdm

    from patchmine.store import open_result

    if overlay not in OVERLAYS:
        raise UsageError(f"unknown overlay {overlay!r}; choose one of {', '.join(OVERLAYS)}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"output exists and is not a folder: {out}")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create output folder {out}: {e.strerror or e}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise UsageError(f"output folder is not writable: {out}")
    workers = workers or min(8, os.cpu_count() or 1)
    with open_result(path) as result:
        names = list(layers) if layers else list(result.layers)
        lrs = [result.layer(n) for n in names]  # unknown names fail here, before any work
        wanted = parse_channels(channels)
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
                info = _layer_info(lr)
                slug = _slug(lr.name, taken)
                folder = out / slug
                folder.mkdir(exist_ok=True)
                sel = [
                    c
                    for c in (wanted if wanted is not None else range(info.channels))
                    if c < info.channels
                ]
                side = _thumb_side(info.patch_size)
                thumbs: dict[int, Image.Image] = {}
                pending: deque[Future] = deque()
                bar = tqdm(
                    total=len(sel), desc=lr.name, unit="ch", disable=not progress, leave=True
                )
                selset = set(sel)
                try:
                    for c in range(info.channels):
                        dead = info.dead(c)
                        if c not in selset:
                            thumbs[c] = _thumb(None if dead else lr.patches(c)[0], side, dead)
                            continue
                        ch = _read_channel(lr, c)
                        thumbs[c] = _thumb(None if dead else ch.patches[0], side, dead)
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
                                slug,
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
                _overview_image(info, thumbs).save(folder / "overview.png", compress_level=6)
                (folder / "index.html").write_text(_layer_page(info, sel), encoding="utf-8")
                entries.append((lr.name, slug, info, len(sel)))
        index = out / "index.html"
        index.write_text(_index_page(result, entries), encoding="utf-8")
    return index
