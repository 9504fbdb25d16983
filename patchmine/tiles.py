"""Label-free tile sheets for the gallery: patches, projections, token crops, original thumbnails.

Public names: sheet, top_tiles, projection_tiles, token_crops, has_outside_box, WEBP, encode.

The gallery lays its captions out in HTML, so its pictures carry no text: a sheet is ``n`` square
tiles of ``side`` pixels in ``cols`` columns with no gap, and a page shows tile ``i`` as a CSS
sprite. Photographic pictures are lossy WebP (`WEBP`).
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from patchmine import geometry
from patchmine.pictures import (
    EMPTY,
    Channel,
    _fit_square,
    _resize_tile,
    inside_part,
    load_original,
    montage_tile,
)

__all__ = [
    "WEBP", "encode", "sheet", "top_tiles", "projection_tiles", "token_crops", "has_outside_box",
]  # fmt: skip

WEBP = {"format": "WEBP", "quality": 82, "method": 4}


def encode(im: Image.Image, path) -> None:
    """Save a photographic picture as lossy WebP."""
    im.save(path, **WEBP)


def sheet(tiles: list[Image.Image], side: int, cols: int | None = None) -> Image.Image:
    """``tiles`` (each ``side`` x ``side``) in ``cols`` columns (default: about square), no gap."""
    n = max(1, len(tiles))
    cols = cols or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / cols)
    im = Image.new("RGB", (cols * side, rows * side), EMPTY)
    for i, t in enumerate(tiles):
        r, c = divmod(i, cols)
        im.paste(t if t.size == (side, side) else t.resize((side, side)), (c * side, r * side))
    return im


def has_outside_box(ch: Channel) -> bool:
    """Some entry's box is larger than the input (its montage tile shows the inside part)."""
    if ch.info.field.whole:
        return False
    return any(
        inside_part(r["box"], ch.info.patch_size, ch.info.input_size) is not None
        for r in ch.records
    )


def top_tiles(ch: Channel, overlay: str, side: int, inside: bool = True) -> list[Image.Image]:
    """The used slots' patches with their overlay, ``side`` pixels (see `pictures.montage_tile`)."""
    return [montage_tile(ch, s, side, overlay, inside) for s in range(len(ch.records))]


def projection_tiles(ch: Channel, proj: np.ndarray, side: int) -> list[Image.Image]:
    """Projections (k, P, P, 3) as pictures, ZFNet style: each tile scaled symmetrically about grey
    (0 is grey, its largest magnitude black or white); cropped as the patches are."""
    out = []
    for s in range(len(ch.records)):
        p = np.asarray(proj[s], np.float32)
        m = float(np.nanmax(np.abs(p))) if p.size else 0.0
        v = 0.5 + 0.5 * np.nan_to_num(p) / m if m > 0 else np.full(p.shape, 0.5, np.float32)
        tile = _resize_tile(np.clip(np.rint(v * 255), 0, 255).astype(np.uint8), side)
        part = inside_part(ch.records[s]["box"], side, ch.info.input_size)
        if part is not None and not ch.info.field.whole:
            tile = _fit_square(tile.crop(part), side)
        out.append(tile)
    return out


def token_crops(ch: Channel, result, side: int) -> list[Image.Image]:
    """Each winning token's own patch with one token of context around it, from the original
    image at full resolution (from the stored whole-input patch where the original is gone).

    Needs the layer attrs ``token_rf_size`` / ``token_rf_stride`` / ``token_rf_offset``."""
    a = ch.info.attrs
    size = np.broadcast_to(np.asarray(a["token_rf_size"], np.float64), (2,))
    stride = np.broadcast_to(np.asarray(a["token_rf_stride"], np.float64), (2,))
    offset = np.broadcast_to(np.asarray(a.get("token_rf_offset", 0), np.float64), (2,))
    s_in = ch.info.input_size
    out = []
    for slot, rec in enumerate(ch.records):
        ty, tx = _token_of(ch, slot)
        y0, x0 = ty * stride[0] + offset[0] - stride[0], tx * stride[1] + offset[1] - stride[1]
        box = (y0, x0, y0 + size[0] + 2 * stride[0], x0 + size[1] + 2 * stride[1])
        i = rec["image"]
        h, w = (int(v) for v in result.image_shape[i])
        full, _ = load_original(result, i, side=max(h, w, 1))
        tr = result.image_transform[i]
        if full is not None and tr[0] > 0:
            oy0, ox0, oy1, ox1 = geometry.to_original(box, tr, np.float64)
            f = full.width / w if w else 1.0
            crop = full.crop(tuple(round(v * f) for v in (ox0, oy0, ox1, oy1)))
        else:  # the stored patch is the whole input resampled to P
            f = ch.patches.shape[1] / s_in if s_in else 1.0
            pil = Image.fromarray(np.ascontiguousarray(ch.patches[slot]))
            crop = pil.crop(tuple(round(v * f) for v in (box[1], box[0], box[3], box[2])))
        t = crop.resize((side, side), Image.Resampling.LANCZOS)
        # frame the token itself: the middle third for one token of context each side
        px = np.asarray(t).copy()
        fy0 = round(side * stride[0] / (size[0] + 2 * stride[0]))
        fy1 = round(side * (stride[0] + size[0]) / (size[0] + 2 * stride[0]))
        for a0, a1 in ((fy0, fy1),):
            px[a0, a0:a1] = px[a1 - 1, a0:a1] = (255, 214, 0)
            px[a0:a1, a0] = px[a0:a1, a1 - 1] = (255, 214, 0)
        out.append(Image.fromarray(px))
    return out


def _token_of(ch: Channel, slot: int) -> tuple[int, int]:
    """The grid location of slot ``slot``'s winning token: its ``yx``, or the heat map's argmax
    where the node stores (0, 0) for every whole-input entry."""
    y, x = ch.records[slot]["yx"]
    hmap = ch.heat[slot]
    if (y, x) == (0, 0) and hmap.ndim == 2 and hmap.size > 1:
        y, x = np.unravel_index(int(np.nanargmax(hmap)), hmap.shape)
    return int(y), int(x)
