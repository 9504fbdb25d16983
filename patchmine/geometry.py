"""The geometry of a known receptive field: boxes, centers and the image transform.

Public names: Field, boxes, inside_fraction, crosses_edge, centers, locations, pixel_centers,
to_original, to_input (also importable from ``patchmine.receptive``).

Geometry lives here and nowhere else. Pure numpy: given a node's ``Field`` (computed by
``patchmine.receptive.receptive_fields`` or read back from a result file), unit ``y`` sees input
pixels ``[y*stride + offset, y*stride + offset + size)`` per axis; the functions below map units to
boxes and centers, pixels back to units, and boxes between model-input and original-image pixels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = [
    "Field",
    "boxes",
    "inside_fraction",
    "crosses_edge",
    "centers",
    "locations",
    "pixel_centers",
    "to_original",
    "to_input",
]


@dataclass(frozen=True)
class Field:
    """The receptive field of a node's units, per axis (y, x), in model-input pixels.

    Unit ``(y, x)`` sees input rows ``[y*stride[0] + offset[0], y*stride[0] + offset[0] + size[0])``
    and the same for columns. A whole-input field (after global pooling, flatten, linear, a
    squeeze-excitation gate, ...) has ``size == stride == (H, W)``, ``offset == (0, 0)`` and
    ``whole=True``; every unit of such a node sees the whole input.

    Attributes:
        size: ``(ry, rx)`` field size in pixels.
        stride: ``(jy, jx)`` distance in pixels between neighbouring units' fields.
        offset: ``(oy, ox)`` first pixel of unit (0, 0)'s field, usually negative (padding).
        whole: True when every unit sees the whole input.
        layout: where the node's output keeps its grid: ``"nchw"`` (N, C, H, W) or (N, C),
            ``"nhwc"`` (N, H, W, C), ``"tokens"`` (N, T, D) with T = prefix + h*w.
        grid: ``(h, w)``, the patch grid of a ``"tokens"`` node.
        prefix: the prefix tokens (class, distillation, registers) before the grid's tokens.
        unit: for ``"tokens"`` and ``"nhwc"`` nodes, the field one grid unit would have if no op
            mixed positions (the token's own patch; equal to the field where that is exact).
    """

    size: tuple[int, int]
    stride: tuple[int, int]
    offset: tuple[int, int]
    whole: bool = False
    layout: str = "nchw"
    grid: tuple[int, int] | None = None
    prefix: int = 0
    unit: Field | None = None

    def box(self, y: int, x: int) -> tuple[int, int, int, int]:
        """The field of unit ``(y, x)`` as ``(y0, x0, y1, x1)``, half-open, not clipped.

        For a whole-input field this is ``(0, 0, H, W)`` for every unit.
        """
        if self.whole:
            return (0, 0, self.size[0], self.size[1])
        y0 = int(y) * self.stride[0] + self.offset[0]
        x0 = int(x) * self.stride[1] + self.offset[1]
        return (y0, x0, y0 + self.size[0], x0 + self.size[1])

    @property
    def suppression(self) -> Field:
        """The field per-image suppression compares boxes with: a whole-field token (or
        channel-last) unit's own patch (``unit``), else the field itself."""
        return self.unit if self.whole and self.unit is not None else self

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> Field:
        """The field a result file records in a layer's attributes (``rf_size``, ``rf_stride``,
        ``rf_offset``, ``rf_whole``; a scalar stands for both axes), with the v2 ``layout``,
        ``token_grid``, ``prefix_tokens`` and ``token_rf_size`` / ``_stride`` / ``_offset``."""
        unit = None
        if "token_rf_size" in attrs:
            unit = cls(
                size=_pair(attrs["token_rf_size"]),
                stride=_pair(attrs["token_rf_stride"]),
                offset=_pair(attrs["token_rf_offset"]),
            )
        grid = attrs.get("token_grid")
        return cls(
            size=_pair(attrs.get("rf_size", 1)),
            stride=_pair(attrs.get("rf_stride", 1)),
            offset=_pair(attrs.get("rf_offset", 0)),
            whole=bool(attrs.get("rf_whole", False)),
            layout=str(attrs.get("layout", "nchw")),
            grid=None if grid is None else _pair(grid),
            prefix=int(attrs.get("prefix_tokens", 0)),
            unit=unit,
        )


def _pair(v: Any, name: str | None = None) -> tuple[int, int]:
    """(y, x) from an int or a sequence (one value: both axes); with ``name``, the value must be
    one or two positive ints (ValueError naming it otherwise)."""
    t = (v, v) if isinstance(v, int) else tuple(int(a) for a in v)
    if name is not None and (len(t) not in (1, 2) or min(t) < 1):
        raise ValueError(f"{name} must be two positive ints, got {v!r}")
    return (t[0], t[0]) if len(t) == 1 else (t[0], t[1])


def _numpy(a: Any) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def boxes(field: Field, yx: Any) -> np.ndarray:
    """Vectorized ``Field.box``.

    Args:
        field: the node's receptive field.
        yx: ``(..., 2)`` integer feature-map locations (numpy array, torch tensor or nested lists).

    Returns:
        ``(..., 4)`` int32 boxes ``(y0, x0, y1, x1)``, half-open, model-input pixels, not clipped.
    """
    yx = _numpy(yx)
    if yx.shape[-1:] != (2,):
        raise ValueError(f"yx must have shape (..., 2), got {yx.shape}")
    yx = yx.astype(np.int64)
    if field.whole:
        whole = np.array([0, 0, field.size[0], field.size[1]], dtype=np.int32)
        return np.broadcast_to(whole, yx.shape[:-1] + (4,)).copy()
    start = yx * np.asarray(field.stride, np.int64) + np.asarray(field.offset, np.int64)
    return np.concatenate([start, start + np.asarray(field.size, np.int64)], -1).astype(np.int32)


def inside_fraction(field: Field, fmap_hw: Sequence[int], input_hw: Sequence[int]) -> np.ndarray:
    """How much of each unit's box lies inside the input: the ``--min-inside`` measure.

    Per axis, the part of the box inside the input divided by ``min(size, input side)`` (the most
    a box of that size can have inside); the fraction is the product of the two axes. For a field
    no larger than the input this is the share of the box's area inside the input; for a larger
    one, units whose box covers the whole input along an axis count as fully inside there.

    Args:
        field: the node's receptive field (a whole-input field gives 1 everywhere).
        fmap_hw: ``(H, W)`` of the node's map.
        input_hw: the model input's ``(height, width)`` in pixels.

    Returns:
        ``(H, W)`` float64 fractions in [0, 1].
    """
    H, W = (int(v) for v in fmap_hw)
    if field.whole:
        return np.ones((H, W))
    inside, most = [], 1
    for n, size, stride, offset, side in zip(
        (H, W), field.size, field.stride, field.offset, input_hw, strict=True
    ):
        start = np.arange(n, dtype=np.int64) * stride + offset
        inside.append(np.clip(np.minimum(start + size, side) - np.maximum(start, 0), 0, None))
        most *= min(int(size), int(side))
    return (inside[0][:, None] * inside[1][None, :]) / most  # one rounding: exact comparisons


def crosses_edge(box: Any, input_hw: Sequence[int]) -> np.ndarray:
    """Whether boxes ``(..., 4)`` (model-input pixels, half-open) run past the input's edge."""
    b = _numpy(box)
    h, w = (int(v) for v in input_hw)
    return (b[..., 0] < 0) | (b[..., 1] < 0) | (b[..., 2] > h) | (b[..., 3] > w)


def _yx(a: Any, name: str) -> np.ndarray:
    a = _numpy(a).astype(np.float64)
    if a.shape[-1:] != (2,):
        raise ValueError(f"{name} must have shape (..., 2), got {a.shape}")
    return a


def centers(field: Field, yx: Any) -> np.ndarray:
    """The center of each unit's box, in model-input pixel coordinates.

    Pixel ``i`` is centered at ``i``, so a box ``[y0, y1)`` is centered at ``(y0 + y1 - 1) / 2``,
    which is ``y*stride + offset + (size - 1)/2`` for unit ``y``.

    Args:
        field: the node's receptive field.
        yx: ``(..., 2)`` feature-map locations, whole or fractional.

    Returns:
        ``(..., 2)`` float64 centers ``(cy, cx)``; for a whole-input field, the input's center.
    """
    yx = _yx(yx, "yx")
    size = np.asarray(field.size, np.float64)
    if field.whole:
        return np.broadcast_to((size - 1) / 2, yx.shape).copy()
    return yx * np.asarray(field.stride) + (np.asarray(field.offset) + (size - 1) / 2)


def locations(field: Field, pixels: Any) -> np.ndarray:
    """The feature-map location under input pixels: the inverse of ``centers``.

    Args:
        field: the node's receptive field.
        pixels: ``(..., 2)`` model-input pixel coordinates ``(y, x)`` (pixel ``i`` centered at
            ``i``).

    Returns:
        ``(..., 2)`` float64 fractional locations ``(y, x)`` whose unit is centered on each
        pixel, not clipped to the map (``round`` gives the unit whose center is nearest); all 0
        for a whole-input field.
    """
    pixels = _yx(pixels, "pixels")
    if field.whole:
        return np.zeros_like(pixels)
    center0 = np.asarray(field.offset) + (np.asarray(field.size, np.float64) - 1) / 2
    return (pixels - center0) / np.asarray(field.stride)


def pixel_centers(box: Sequence[float], n: int) -> np.ndarray:
    """Where the pixels of a box resampled to ``n`` x ``n`` lie in the model input.

    Args:
        box: ``(y0, x0, y1, x1)``, half-open, model-input pixels.
        n: pixels per side after resampling.

    Returns:
        ``(n, 2)`` float64: row ``i`` holds the y coordinate of the center of the ``i``-th pixel
        row and the x coordinate of the center of the ``i``-th pixel column, in model-input pixel
        coordinates (pixel ``j`` centered at ``j``; with ``n = y1 - y0`` they are ``y0 + i``).
    """
    y0, x0, y1, x1 = (float(v) for v in box)
    i = np.arange(n) + 0.5
    return np.stack([y0 + i * ((y1 - y0) / n) - 0.5, x0 + i * ((x1 - x0) / n) - 0.5], axis=1)


def _affine(transform: Any) -> tuple[np.ndarray, np.ndarray]:
    t = _numpy(transform).astype(np.float64)
    if t.shape[-1:] not in ((3,), (4,)):
        raise ValueError(f"transform must have shape (..., 3) or (..., 4), got {t.shape}")
    scale = t[..., [0, 3, 0, 3]] if t.shape[-1] == 4 else t[..., 0:1]
    offset = t[..., [1, 2, 1, 2]]
    return scale, offset


def to_original(box: Any, transform: Any, dtype: Any = np.float32) -> np.ndarray:
    """Map boxes from model-input pixels to original-image pixels.

    Args:
        box: ``(..., 4)`` boxes ``(y0, x0, y1, x1)`` in model-input pixels.
        transform: ``(..., 4)`` per image ``(scale_y, offset_y, offset_x, scale_x)`` with, per axis,
            ``original = (input + offset) / scale`` (or ``(..., 3)``, one scale for both axes, as
            older files hold it); broadcast against ``box[..., 0]``.
        dtype: of the result: float32 as the file stores ``box_orig``, or float64 (computed in
            float64 either way).

    Returns:
        ``(..., 4)`` boxes in original-image pixels.
    """
    b = _numpy(box).astype(np.float64)
    if b.shape[-1:] != (4,):
        raise ValueError(f"box must have shape (..., 4), got {b.shape}")
    scale, offset = _affine(transform)
    return ((b + offset) / scale).astype(dtype)


def to_input(box_orig: Any, transform: Any) -> np.ndarray:
    """Map boxes from original-image pixels to model-input pixels (inverse of ``to_original``).

    Args:
        box_orig: ``(..., 4)`` boxes ``(y0, x0, y1, x1)`` in original-image pixels.
        transform: ``(..., 4)`` or ``(..., 3)`` as in ``to_original``.

    Returns:
        ``(..., 4)`` float32 boxes in model-input pixels: ``input = original * scale - offset``.
    """
    b = _numpy(box_orig).astype(np.float64)
    if b.shape[-1:] != (4,):
        raise ValueError(f"box_orig must have shape (..., 4), got {b.shape}")
    scale, offset = _affine(transform)
    return (b * scale - offset).astype(np.float32)
