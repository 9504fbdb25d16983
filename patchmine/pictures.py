"""Pictures of a result file: montages with heat / mask overlays, overviews, context views.

Public names: OVERLAYS, Grid, montage_grid, overview_grid, context_grid, montage, overview,
context, LayerInfo, Channel, draw_montage, draw_projections, draw_overview, draw_context, thumbnail, thumb_side,
load_original, format_number, montage_tile, inside_part.

The notebook API is ``montage``, ``overview`` and ``context``; they read a result through
`patchmine.store` (never HDF5 directly) and return PIL images:

    >>> import patchmine
    >>> from patchmine import pictures
    >>> r = patchmine.open("out.h5")
    >>> pictures.montage(r.layer("features.10"), 5, overlay="heat")      # PIL.Image

The other public names are the parts `patchmine.gallery` draws its files with: a `LayerInfo` read
once per layer, a `Channel` read once per channel, and the ``draw_*`` functions over them.

A tile shows a winner's box (model-input pixels) with its activation map laid over it
(`patchmine.overlays`); a box larger than the input shows its part inside the input.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from patchmine import geometry, overlays
from patchmine.errors import UsageError
from patchmine.layout import (
    CONTEXT,
    HEADER_SIZE,
    LABEL_SIZE,
    LINE,
    PAD,
    Grid,
    context_grid,
    montage_grid,
    overview_grid,
    thumb_side,
)
from patchmine.overlays import OVERLAYS

__all__ = [
    "OVERLAYS", "Grid", "montage_grid", "overview_grid", "context_grid", "montage", "overview",
    "context", "LayerInfo", "Channel", "draw_montage", "draw_projections", "draw_overview",
    "draw_context", "thumbnail", "thumb_side", "load_original", "format_number", "montage_tile",
    "inside_part",
]  # fmt: skip

# look
BG = (24, 24, 27)
PANEL = (38, 38, 43)
EMPTY = (48, 48, 54)
TEXT = (232, 232, 236)
DIM_TEXT = (150, 150, 160)
SCORE = (255, 196, 80)
BOX = (255, 214, 0)
RED = (235, 64, 52)
MASK_Q = 0.995


@functools.lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def _fit(font: ImageFont.ImageFont, text: str, width: float) -> str:
    """``text`` shortened from the left with an ellipsis until it fits ``width`` pixels."""
    if font.getlength(text) <= width:
        return text
    lo, hi = 0, len(text)
    while lo < hi:  # smallest cut that fits
        mid = (lo + hi) // 2
        if font.getlength("…" + text[mid:]) <= width:
            hi = mid
        else:
            lo = mid + 1
    return "…" + text[lo:]


def format_number(v: float) -> str:
    """A score or statistic as the pictures and pages print it (4 significant digits)."""
    if not math.isfinite(v):
        return "nan"
    return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"


# --------------------------------------------------------------------------------------------------
# layouts


def _resize_tile(img: np.ndarray, side: int) -> Image.Image:
    im = Image.fromarray(np.ascontiguousarray(img))
    if im.size == (side, side):
        return im
    small = im.width < 48 or side % im.width == 0 and im.width < side
    return im.resize((side, side), Image.Resampling.NEAREST if small else Image.Resampling.LANCZOS)


# --------------------------------------------------------------------------------------------------
# per-layer and per-channel data


@dataclass(frozen=True)
class LayerInfo:
    """What every picture and page of one layer needs, read from the file once.

    ``mean``, ``max`` and ``threshold`` are (C,) float32 (NaN where the file has no statistics);
    ``threshold`` is the activation quantile ``q`` (0.995 where stored) that masks keep.
    ``score`` and ``image`` are the layer's (C, k) arrays.
    """

    name: str
    channels: int
    k: int
    patch_size: int
    input_size: int
    field: geometry.Field
    mean: np.ndarray
    max: np.ndarray
    threshold: np.ndarray
    q: float
    score: np.ndarray
    image: np.ndarray
    attrs: dict

    @classmethod
    def read(cls, layer) -> LayerInfo:
        """From a `patchmine.store.LayerResult`."""
        c = layer.channels
        try:
            st = layer.stats()
        except (KeyError, ValueError):
            st = {}
        nan = np.full(c, np.nan, dtype=np.float32)
        thr, qv = nan, float("nan")
        if "quantile" in st and "q" in st and np.size(st["q"]):
            qs = np.asarray(st["q"], dtype=np.float64).reshape(-1)
            hit = np.flatnonzero(np.isclose(qs, MASK_Q))
            j = int(hit[0]) if len(hit) else int(np.argmax(qs))
            thr = np.asarray(st["quantile"], dtype=np.float32).reshape(c, -1)[:, j]
            qv = float(qs[j])
        return cls(
            name=layer.name,
            channels=c,
            k=layer.k,
            patch_size=layer.patch_size,
            input_size=int(layer.result.attrs.get("input_size", 0) or 0),
            field=geometry.Field.from_attrs(layer.attrs),
            mean=np.asarray(st.get("mean", nan), dtype=np.float32).reshape(-1)[:c],
            max=np.asarray(st.get("max", nan), dtype=np.float32).reshape(-1)[:c],
            threshold=thr,
            q=qv,
            score=np.asarray(layer.score),
            image=np.asarray(layer.image),
            attrs=dict(layer.attrs),
        )

    def dead(self, c: int) -> bool:
        """Never active: no entries, or a recorded maximum <= 0."""
        m = self.max[c]
        return bool(self.image[c, 0] < 0 or (np.isfinite(m) and m <= 0))

    @property
    def n_dead(self) -> int:
        return sum(self.dead(c) for c in range(self.channels))


@dataclass(frozen=True)
class Channel:
    """One channel's winners, read from the file once and shared by every picture of it."""

    info: LayerInfo
    c: int
    records: list[dict]
    patches: np.ndarray  # (k, P, P, 3) uint8
    heat: np.ndarray  # (k, H, W) float32

    @classmethod
    def read(cls, layer, c: int, info: LayerInfo) -> Channel:
        """Channel ``c`` of a `patchmine.store.LayerResult` whose `LayerInfo` is ``info``."""
        if not 0 <= c < info.channels:
            raise UsageError(f"layer {layer.name!r} has channels 0..{info.channels - 1}, not {c}")
        patches = np.asarray(layer.patches(c))
        heat = np.asarray(layer.heat(c), dtype=np.float32)
        return cls(info, c, layer.records(c), patches, heat)

    @property
    def dead(self) -> bool:
        return self.info.dead(self.c)

    def heat_range(self) -> tuple[float, float]:
        """(lo, hi): the channel's mean maps to transparent, its strongest activation to full."""
        best = float(self.info.score[self.c, 0]) if self.records else float("nan")
        return overlays.heat_range(self.heat, len(self.records), best, self.info.mean[self.c])


# --------------------------------------------------------------------------------------------------
# overlays


def _overlay(tile: Image.Image, ch: Channel, slot: int, mode: str) -> Image.Image:
    info = ch.info
    if mode == "none" or ch.heat.ndim != 3:
        return tile
    out = overlays.overlay(
        np.asarray(tile),
        ch.heat[slot],
        ch.records[slot]["box"],
        mode,
        field=info.field,
        attrs=info.attrs,
        input_size=info.input_size,
        value_range=ch.heat_range(),
        threshold=float(info.threshold[ch.c]),
    )
    return Image.fromarray(out)


def inside_part(box, patch_size: int, input_size: int) -> tuple[int, int, int, int] | None:
    """(left, top, right, bottom) of the part of a box inside the input, in the pixels of its
    ``patch_size`` patch, when the box is larger than the input on some axis; else None."""
    y0, x0, y1, x1 = (float(v) for v in box)
    s = input_size
    if not s or (y1 - y0 <= s and x1 - x0 <= s):
        return None
    fy, fx = patch_size / (y1 - y0), patch_size / (x1 - x0)
    t, b_ = (max(0.0, -y0) * fy, (min(y1, s) - y0) * fy)
    left, r = (max(0.0, -x0) * fx, (min(x1, s) - x0) * fx)
    part = (int(round(left)), int(round(t)), int(round(r)), int(round(b_)))
    if part[2] - part[0] < 2 or part[3] - part[1] < 2:
        return None
    return part


def montage_tile(ch: Channel, slot: int, side: int, overlay: str, inside: bool) -> Image.Image:
    """Slot ``slot``'s patch as a ``side`` x ``side`` tile with its overlay; with ``inside``, a box
    larger than the input shows only its part inside the input (the stored patch keeps the box)."""
    tile = _overlay(_resize_tile(ch.patches[slot], side), ch, slot, overlay)
    part = inside_part(ch.records[slot]["box"], side, ch.info.input_size) if inside else None
    if part is None or ch.info.field.whole:
        return tile
    return _fit_square(tile.crop(part), side)


def _fit_square(im: Image.Image, side: int) -> Image.Image:
    """``im`` scaled to fit ``side`` x ``side``, centered on the background colour."""
    f = side / max(im.width, im.height)
    small = im.resize(
        (max(1, round(im.width * f)), max(1, round(im.height * f))), Image.Resampling.LANCZOS
    )
    if small.size == (side, side):
        return small
    out = Image.new("RGB", (side, side), EMPTY)
    out.paste(small, ((side - small.width) // 2, (side - small.height) // 2))
    return out


# --------------------------------------------------------------------------------------------------
# drawing


def _header(draw: ImageDraw.ImageDraw, width: int, left: str, right: str = "") -> None:
    f = _font(HEADER_SIZE)
    draw.text((PAD, 6), _fit(f, left, width - 2 * PAD), font=f, fill=TEXT)
    if right:
        rw = f.getlength(right)
        if f.getlength(left) + rw + 4 * PAD < width:
            draw.text((width - PAD - rw, 6), right, font=f, fill=DIM_TEXT)


def _label(
    draw: ImageDraw.ImageDraw,
    box,
    rank: int,
    score: float,
    name: str,
    name_color=DIM_TEXT,
) -> None:
    f = _font(LABEL_SIZE)
    x0, y0, x1, _ = box
    y = y0 + 3
    tag = f"#{rank + 1}"
    draw.text((x0 + 2, y), tag, font=f, fill=TEXT)
    draw.text((x0 + 2 + f.getlength(tag) + 8, y), format_number(score), font=f, fill=SCORE)
    if name:
        draw.text((x0 + 2, y + LINE), _fit(f, name, x1 - x0 - 4), font=f, fill=name_color)


def _empty_tile(side: int) -> Image.Image:
    im = Image.new("RGB", (side, side), EMPTY)
    d = ImageDraw.Draw(im)
    f = _font(LABEL_SIZE)
    d.text(((side - f.getlength("empty")) / 2, side / 2 - 8), "empty", font=f, fill=DIM_TEXT)
    return im


def _short(path: str) -> str:
    return path.replace("\\", "/").rsplit("/", 1)[-1] if path else path


def _check_overlay(overlay: str) -> None:
    if overlay not in OVERLAYS:
        raise UsageError(f"unknown overlay {overlay!r}; choose one of {', '.join(OVERLAYS)}")


def draw_montage(ch: Channel, overlay: str, inside: bool = True) -> Image.Image:
    """The montage of a `Channel` (see `montage`)."""
    info = ch.info
    g = montage_grid(info.k, info.patch_size)
    im = Image.new("RGB", g.size, BG)
    draw = ImageDraw.Draw(im)
    title = f"{info.name}  channel {ch.c}"
    tokens = info.attrs.get("layout") == "tokens"
    if info.field.whole:
        title += "  (whole input)"
    right = "dead" if ch.dead else ""
    if not right and overlay != "none" and (tokens or not info.field.whole):
        right = f"overlay: {overlay}"
    _header(draw, g.size[0], title, right)
    for slot in range(info.k):
        tb = g.tile_box(slot)
        if slot < len(ch.records):
            rec = ch.records[slot]
            im.paste(montage_tile(ch, slot, g.tile, overlay, inside), tb[:2])
            _label(draw, g.label_box(slot), slot, rec["score"], _short(rec["path"]))
        else:
            im.paste(_empty_tile(g.tile), tb[:2])
    return im


def draw_projections(
    ch: Channel, proj: np.ndarray, method: str = "", inside: bool = True
) -> Image.Image:
    """ZFNet's layout for a `Channel`: its projections (k, P, P, 3) in a grid on the left, each
    scaled symmetrically about grey, and the patches they belong to in the same grid on the right."""
    from patchmine.tiles import projection_tiles  # tiles draws with this module's parts

    info = ch.info
    g = montage_grid(info.k, info.patch_size)
    w, h = g.size
    shift = w - g.pad
    im = Image.new("RGB", (w + shift, h), BG)
    draw = ImageDraw.Draw(im)
    title = f"{info.name}  channel {ch.c}" + ("  (whole input)" if info.field.whole else "")
    _header(draw, im.width, title, "dead" if ch.dead else f"{method or 'projections'} | patches")
    tiles = projection_tiles(ch, proj, g.tile)
    for slot in range(info.k):
        x0, y0, _, _ = g.tile_box(slot)
        if slot < len(ch.records):
            rec = ch.records[slot]
            im.paste(tiles[slot], (x0, y0))
            im.paste(montage_tile(ch, slot, g.tile, "none", inside), (x0 + shift, y0))
            lx0, ly0, lx1, ly1 = g.label_box(slot)
            _label(
                draw, (lx0 + shift, ly0, lx1 + shift, ly1), slot, rec["score"], _short(rec["path"])
            )
        else:
            im.paste(_empty_tile(g.tile), (x0, y0))
            im.paste(_empty_tile(g.tile), (x0 + shift, y0))
    return im


def montage(layer, channel: int, overlay: str = "none", inside: bool = True) -> Image.Image:
    """The k winners of one channel as a grid of upscaled patches with rank, score and source.

    Args:
        layer: a `patchmine.store.LayerResult`.
        channel: channel index.
        overlay: ``"heat"`` (the activation map, translucent), ``"mask"`` (NetDissect style: pixels
            above the channel's 0.995 activation quantile kept, the rest dimmed, outlined),
            ``"none"``, or ``"projection"`` (ZFNet style: the entries' projections in a grid beside
            the patches; needs a file mined with ``--projection`` or ``patchmine project``).
            Whole-input layers have no heat or mask overlay (token layers show the token map).
        inside: where a field is larger than the input, show only the box's part inside it.

    Returns:
        An RGB image; its layout is ``montage_grid(layer.k, layer.patch_size)`` (twice, side by
        side, for ``"projection"``).
    """
    if overlay == "projection":
        proj = layer.projection(channel)
        if proj is None:
            raise UsageError(
                f"layer {layer.name!r} has no projections: mine with --projection, or add them "
                "with `patchmine project FILE`"
            )
        ch = Channel.read(layer, channel, LayerInfo.read(layer))
        return draw_projections(ch, proj, (layer.projection_attrs or {}).get("method", ""), inside)
    _check_overlay(overlay)
    return draw_montage(Channel.read(layer, channel, LayerInfo.read(layer)), overlay, inside)


def _dead_tile(side: int) -> Image.Image:
    im = Image.new("RGB", (side, side), (92, 92, 96))
    d = ImageDraw.Draw(im)
    w = max(2, side // 16)
    d.line((4, 4, side - 5, side - 5), fill=RED, width=w)
    d.line((4, side - 5, side - 5, 4), fill=RED, width=w)
    f = _font(max(10, side // 5))
    tw, th = f.getlength("dead"), side // 10
    box = ((side - tw) / 2 - 3, side / 2 - th - 2, (side + tw) / 2 + 3, side / 2 + th + 3)
    d.rectangle(box, fill=(92, 92, 96))
    d.text(((side - tw) / 2, side / 2 - th), "dead", font=f, fill=(255, 255, 255))
    return im


def thumbnail(patch: np.ndarray | None, side: int) -> Image.Image:
    """An overview tile: ``patch`` resized to ``side``, or the dead tile where it is None."""
    return _dead_tile(side) if patch is None else _resize_tile(patch, side)


def draw_overview(info: LayerInfo, thumbs: dict[int, Image.Image]) -> Image.Image:
    """The overview of a layer from its tiles ``{channel: thumbnail}`` (see `overview`)."""
    g = overview_grid(info.channels, info.patch_size)
    im = Image.new("RGB", g.size, BG)
    draw = ImageDraw.Draw(im)
    n_dead = info.n_dead
    right = f"{n_dead} dead" if n_dead else ""
    _header(draw, g.size[0], f"{info.name}  {info.channels} channels", right)
    f = _font(11)
    for c in range(info.channels):
        x0, y0, x1, _ = g.tile_box(c)
        im.paste(thumbs.get(c) or _dead_tile(g.tile), (x0, y0))
        t = str(c)
        draw.text(
            (x0 + (g.tile - f.getlength(t)) / 2, y0 + g.tile + 1),
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
    info = LayerInfo.read(layer)
    side = thumb_side(info.patch_size)
    thumbs = {
        c: thumbnail(None if info.dead(c) else layer.patches(c)[0], side)
        for c in range(info.channels)
    }
    return draw_overview(info, thumbs)


# --------------------------------------------------------------------------------------------------
# context views

Original = tuple[Image.Image | None, str]  # (downscaled original or None, why not)


def load_original(result, i: int, side: int = CONTEXT) -> Original:
    """Image ``i`` of a `patchmine.store.Result` re-read and scaled to fit ``side`` x ``side``.

    Returns:
        ``(image, "")``, or ``(None, why)`` where the original is unknown, missing, unreadable or
        changed (its aspect ratio differs from the recorded one).
    """
    try:
        path = result.image_file(i)
    except (KeyError, IndexError, TypeError):
        return None, "original unknown"
    if not path.is_file():
        return None, "original missing"
    try:
        with Image.open(path) as im:
            if im.format == "JPEG":
                im.draft("RGB", (side, side))
                im.load()
                im = ImageOps.exif_transpose(im).convert("RGB")
            else:
                from patchmine.corpus import load_rgb

                im = load_rgb(path)
    except Exception:  # noqa: BLE001 - any unreadable original falls back to the stored patch
        return None, "original unreadable"
    h, w = (int(v) for v in result.image_shape[i])
    if h > 0 and w > 0 and abs(im.width / im.height - w / h) > 0.02 * (w / h):
        return None, "original changed"
    return _fit_image(im, side), ""


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


def draw_context(ch: Channel, result, original: Callable[[int], Original]) -> Image.Image:
    """The context view of a `Channel` (see `context`); ``original(i)`` gives image ``i`` as
    `load_original` does."""
    info = ch.info
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
        thumb, why = original(rec["image"])
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
        w = float(result.image_shape[rec["image"]][1])
        s = thumb.width / w if w > 0 else 1.0
        transform = result.image_transform[rec["image"]]
        if transform[0] > 0 and info.input_size and not info.field.whole:  # the square it saw
            n = info.input_size
            crop = geometry.to_original((0, 0, n, n), transform, np.float64)
            cy0, cx0, cy1, cx1 = (float(v) * s for v in crop)
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


def context(result, layer, channel: int) -> Image.Image:
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
    ch = Channel.read(lr, channel, LayerInfo.read(lr))
    return draw_context(ch, result, functools.partial(load_original, result))
