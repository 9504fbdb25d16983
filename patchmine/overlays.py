"""Activation overlays on patches: a perceptual heat map that leaves the texture visible, and masks.

Public names: OVERLAYS, COLORMAP, colormap_stops, heat_range, overlay.

A tile shows a winner's box (model-input pixels); its activation map ``heat`` (H, W) is laid over
it by sampling, at every tile pixel, the map bilinearly at the location whose unit is centered
there (`patchmine.geometry.locations`), so overlays stay exact for any stride and padding. Token
maps of whole-input token nodes (layer attrs ``layout="tokens"``, ``token_rf_*``) are sampled per
token (each pixel takes the value of the token whose patch holds it). Pixels of a box outside the
input are never overlaid.

The heat colour map is inferno (perceptually uniform, dark to bright); its opacity grows with the
activation from 0 (the channel's mean) to `HEAT_ALPHA`, so weak regions keep their texture and
even the strongest keep some.
"""

from __future__ import annotations

import numpy as np

from patchmine import geometry
from patchmine.errors import UsageError

__all__ = ["OVERLAYS", "COLORMAP", "colormap_stops", "heat_range", "overlay"]

OVERLAYS = ("heat", "mask", "none")
HEAT_ALPHA = 0.62
MASK_DIM = 0.28
OUTLINE = (0, 255, 220)

# inferno (matplotlib), 9 anchors
_INFERNO = [
    (0.0, (0, 0, 4)), (0.125, (31, 12, 72)), (0.25, (85, 15, 109)), (0.375, (136, 34, 106)),
    (0.5, (186, 54, 85)), (0.625, (227, 89, 51)), (0.75, (249, 140, 10)), (0.875, (249, 201, 50)),
    (1.0, (252, 255, 164)),
]  # fmt: skip


def _make_lut() -> np.ndarray:
    xs = np.array([a for a, _ in _INFERNO])
    cs = np.array([c for _, c in _INFERNO], dtype=np.float32)
    t = np.linspace(0, 1, 256)
    return np.stack([np.interp(t, xs, cs[:, i]) for i in range(3)], axis=1).astype(np.float32)


COLORMAP = _make_lut()  # (256, 3) float32 RGB


def colormap_stops(n: int = 9) -> list[tuple[float, str, float]]:
    """``n`` stops ``(t, "#rrggbb", opacity)`` of the heat overlay, for colour bars."""
    out = []
    for t in np.linspace(0, 1, n):
        r, g, b = (int(round(v)) for v in COLORMAP[int(round(t * 255))])
        out.append((float(t), f"#{r:02x}{g:02x}{b:02x}", float(HEAT_ALPHA * _opacity(t))))
    return out


def _opacity(v):
    return np.sqrt(v) * 0.85 + 0.15 * v


def heat_range(heat: np.ndarray, used: int, best: float, mean: float) -> tuple[float, float]:
    """(lo, hi) of a channel's heat overlay: its mean is transparent, its strongest activation full.

    Args:
        heat: (k, H, W) maps of the channel's entries; the first ``used`` are real.
        best: the channel's best score; mean: its mean activation (NaN when unknown).
    """
    h = heat[:used]
    hi = float(np.nanmax(h)) if used and h.size else float("nan")
    if used and np.isfinite(hi) and np.isfinite(best):
        hi = max(hi, best)
    lo = float(mean)
    if not np.isfinite(lo) or lo >= hi:
        lo = min(0.0, hi) if np.isfinite(hi) else 0.0
    return lo, hi


def _bilinear(u: np.ndarray, units: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices (i0, i1) and weights of i1 that sample a map of ``units`` at fractional ``u``."""
    u = np.clip(u, 0, units - 1)
    i0 = np.floor(u).astype(np.int64)
    i1 = np.minimum(i0 + 1, units - 1)
    return i0, i1, (u - i0).astype(np.float32)


def _token_field(attrs: dict) -> tuple[np.ndarray, np.ndarray] | None:
    """(stride, offset) per axis of a token node's own patches, or None."""
    if attrs.get("layout") != "tokens" or attrs.get("token_rf_stride") is None:
        return None
    stride = np.broadcast_to(np.asarray(attrs["token_rf_stride"], np.float64), (2,))
    offset = np.broadcast_to(np.asarray(attrs.get("token_rf_offset", 0), np.float64), (2,))
    return stride, offset


def _sample(hmap, box, side, field, tokens, input_size) -> tuple[np.ndarray, np.ndarray]:
    """(side, side) activations over ``box`` and the mask of its pixels inside the input."""
    pix = geometry.pixel_centers(box, side)  # (side, 2): y, x
    if tokens is not None:
        stride, offset = tokens
        ty = np.clip(np.floor((pix[:, 0] - offset[0]) / stride[0]), 0, hmap.shape[0] - 1)
        tx = np.clip(np.floor((pix[:, 1] - offset[1]) / stride[1]), 0, hmap.shape[1] - 1)
        vals = hmap[ty.astype(np.int64)][:, tx.astype(np.int64)]
    else:
        units = geometry.locations(field, pix)
        iy0, iy1, wy = _bilinear(units[:, 0], hmap.shape[0])
        ix0, ix1, wx = _bilinear(units[:, 1], hmap.shape[1])
        rows = (1 - wy)[:, None] * hmap[iy0] + wy[:, None] * hmap[iy1]  # (side, W)
        vals = rows[:, ix0] * (1 - wx) + rows[:, ix1] * wx
    s = input_size
    inside = (pix >= -0.5) & (pix < s - 0.5) if s else np.ones((side, 2), bool)
    return vals, inside[:, 0, None] & inside[None, :, 1]


def overlay(
    tile: np.ndarray,
    hmap: np.ndarray,
    box,
    mode: str,
    *,
    field: geometry.Field,
    attrs: dict,
    input_size: int,
    value_range: tuple[float, float],
    threshold: float,
) -> np.ndarray:
    """``tile`` (side, side, 3) uint8 showing ``box`` with the map ``hmap`` (H, W) laid over it.

    Args:
        mode: ``"heat"`` (inferno, translucent), ``"mask"`` (pixels above ``threshold`` kept, the
            rest dimmed, outlined) or ``"none"``.
        field, attrs: the layer's receptive field and attrs (token geometry).
        value_range: (lo, hi) of `heat_range`.

    Returns:
        The overlaid tile; ``tile`` itself where there is nothing to overlay.
    """
    if mode not in OVERLAYS:
        raise UsageError(f"unknown overlay {mode!r}; choose one of {', '.join(OVERLAYS)}")
    tokens = _token_field(attrs)
    if mode == "none" or hmap.ndim != 2 or hmap.shape == (1, 1):
        return tile
    if field.whole and tokens is None:
        return tile
    side = tile.shape[0]
    vals, inside = _sample(hmap.astype(np.float32), box, side, field, tokens, input_size)
    rgb = tile.astype(np.float32)
    if mode == "heat":
        lo, hi = value_range
        if not (np.isfinite(hi) and hi > lo):
            return tile
        v = np.clip((vals - lo) / (hi - lo), 0, 1)
        v = np.where(inside & np.isfinite(v), v, 0)
        alpha = (HEAT_ALPHA * _opacity(v))[..., None]
        out = rgb * (1 - alpha) + COLORMAP[np.rint(v * 255).astype(np.int64)] * alpha
    else:
        if not np.isfinite(threshold):
            return tile
        keep = (vals > threshold) & inside
        out = np.where(keep[..., None], rgb, rgb * MASK_DIM)
        edge = keep & ~_erode(keep, 2 if side >= 96 else 1)
        out[edge] = OUTLINE
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _erode(m: np.ndarray, steps: int) -> np.ndarray:
    for _ in range(steps):
        p = np.pad(m, 1, constant_values=False)
        m = m & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return m
