"""Receptive fields of a network's nodes, and the geometry of boxes.

Public names: Field, boxes, inside_fraction, crosses_edge, centers, locations, pixel_centers,
to_original, to_input, receptive_fields.

Geometry lives here and nowhere else. ``receptive_fields`` traces a model the way torchvision's
feature extraction does (same FX node names as ``get_graph_node_names``), runs it once on a zero
input to learn every tensor's shape, and walks the graph in topological order, following per axis a
field (size r, stride j, offset o): unit ``y`` sees input pixels ``[y*j + o, y*j + o + r)``.

- conv / pool (kernel k, stride s, padding p, dilation d): ``k' = d*(k-1) + 1; r += (k'-1)*j;
  o -= p*j; j *= s``. Grouped, depthwise, non-square, ``padding='same'`` and ``ceil_mode`` included.
- explicit padding (``nn.ZeroPad2d`` and friends, ``F.pad`` in (left, right, top, bottom) order):
  ``o -= top*j`` (left for x).
- element-wise and pointwise ops keep the field; they are recognised by shape (the output keeps the
  input's spatial sizes), so a Linear or LayerNorm on a channels-last tensor (ConvNeXt) is
  pointwise.
  Which tensor dimensions hold y and x is tracked through permute / transpose / view / reshape.
  Normalisations (BatchNorm, and also LayerNorm / GroupNorm statistics) count as element-wise.
- merges (add, mul, cat, stack, ...) need the same stride and box center on every input, else the
  node is "not aligned"; the result is the union (the largest r). An input that is whole-input or
  broadcast over space (a squeeze-excitation gate) makes the result whole-input.
- global and adaptive pooling, flatten, linear over a spatial axis, softmax over a spatial axis,
  matmul / attention, reductions: whole-input from there on. An adaptive pool to more than 1 x 1
  whose output size divides its input size is an ordinary pool (VGG's ``avgpool`` at 224 px is the
  identity); one with uneven windows is whole-input.
- upsampling, transposed convs, pixel shuffle, fold/unfold, deformable convs, flips and rolls:
  unsupported. Such nodes and everything downstream are left out of ``nodes=None``; asking for one
  raises ``ValueError`` naming the node where the field was lost.

Modules that torchvision keeps as leaves when tracing (``torchvision.ops`` classes such as
``Conv2dNormActivation``, ``SqueezeExcitation``, ``Permute``) are traced through for the analysis.
"""

from __future__ import annotations

import inspect
import math
import numbers
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import fx, nn
from torchvision.models.feature_extraction import LeafModuleAwareTracer, NodePathTracer

from patchmine.errors import UnknownNameError, UsageError, nearest

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
    "receptive_fields",
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


# ---------------------------------------------------------------------------------------------
# Analysis state


@dataclass(frozen=True)
class _State:
    """A tensor's field: ``dims`` are the tensor dims holding (y, x); each axis is (r, j, o).

    ``tokens = (prefix, h, w)``: y and x are flattened into the one dim ``dims[0] == dims[1]``,
    after ``prefix`` tokens that are not on the grid. A whole state keeps ``dims`` / ``tokens`` (the
    layout, and in y, x the field a unit would have without the mixing op) where they are known;
    ``dims is None`` when they are not.
    """

    dims: tuple[int, int] | None = (2, 3)
    y: tuple[int, int, int] = (1, 1, 0)
    x: tuple[int, int, int] = (1, 1, 0)
    whole: bool = False
    tokens: tuple[int, int, int] | None = None


_WHOLE = _State(dims=None, whole=True)


def _whole(st: Any) -> _State:
    """Whole-input from here on, keeping the layout of ``st`` where it is known."""
    return replace(st, whole=True) if isinstance(st, _State) and st.dims is not None else _WHOLE


@dataclass(frozen=True)
class _Unsupported:
    """The field was lost (unsupported op or misaligned merge) at or before a node."""

    message: str


class _Refuse(Exception):
    """Raised by a rule: the node's field cannot be represented."""


@dataclass(frozen=True)
class _Ref:
    state: Any


def _pair(v: Any, name: str | None = None) -> tuple[int, int]:
    """(y, x) from an int or a sequence (one value: both axes); with ``name``, the value must be
    one or two positive ints (ValueError naming it otherwise)."""
    t = (v, v) if isinstance(v, int) else tuple(int(a) for a in v)
    if name is not None and (len(t) not in (1, 2) or min(t) < 1):
        raise ValueError(f"{name} must be two positive ints, got {v!r}")
    return (t[0], t[0]) if len(t) == 1 else (t[0], t[1])


def _window(st: _State, k, s, p, d=(1, 1)) -> _State:
    def axis(a, k, s, p, d):
        r, j, o = a
        return (r + d * (k - 1) * j, j * s, o - p * j)

    return replace(st, y=axis(st.y, k[0], s[0], p[0], d[0]), x=axis(st.x, k[1], s[1], p[1], d[1]))


def _bind(names: Sequence[tuple[str, Any]], args: tuple, kwargs: dict) -> dict[str, Any]:
    out = {name: default for name, default in names}
    for (name, _), value in zip(names, args, strict=False):
        out[name] = value
    out.update({k: v for k, v in kwargs.items() if k in out})
    return out


def _tensor_shape(value: Any) -> tuple[int, ...] | None:
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, (tuple, list)):
        for v in value:
            if isinstance(v, torch.Tensor):
                return tuple(v.shape)
    return None


def _map_reshape(in_shape: tuple[int, ...], out_shape: tuple[int, ...], d: int) -> int | None:
    """Output dim that holds input dim ``d`` intact through a reshape-like op, if any."""
    after = math.prod(in_shape[d + 1 :])
    for e in range(len(out_shape)):
        if out_shape[e] == in_shape[d] and math.prod(out_shape[e + 1 :]) == after:
            return e
    return None


def _hull(axes) -> tuple[int, int, int]:
    """The smallest (r, j, o) covering every input's unit field (the layout's nominal unit)."""
    axes = list(axes)
    lo = min(o for _, _, o in axes)
    return (max(o + r for r, _, o in axes) - lo, max(j for _, j, _ in axes), lo)


def _combine(states: list[_State], where: str) -> _State:
    """Merge the fields of several inputs of one node (add, mul, cat, ...)."""
    if any(s.whole for s in states):
        if len({(s.dims, s.tokens) for s in states}) > 1:
            return _WHOLE
        return _whole(
            replace(states[0], y=_hull(s.y for s in states), x=_hull(s.x for s in states))
        )
    if len({(s.dims, s.tokens) for s in states}) > 1:
        raise _Refuse(f"inputs with different spatial layouts meet at node {where!r}")
    for i, name in enumerate("yx"):
        axes = [(s.y, s.x)[i] for s in states]
        if len({j for _, j, _ in axes}) > 1 or len({2 * o + r - 1 for r, _, o in axes}) > 1:
            listing = ", ".join(f"(size {r}, stride {j}, offset {o})" for r, j, o in axes)
            raise _Refuse(
                f"receptive fields not aligned at node {where!r} along {name}: the inputs have "
                f"{listing}; a merge needs the same stride and the same box center"
            )
    y = max((s.y for s in states), key=lambda a: a[0])
    x = max((s.x for s in states), key=lambda a: a[0])
    return _State(states[0].dims, y, x, tokens=states[0].tokens)


# ---------------------------------------------------------------------------------------------
# Op tables

_POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.LPPool2d)
_PADS = tuple(
    getattr(nn, n)
    for n in ("ZeroPad2d", "ConstantPad2d", "ReflectionPad2d", "ReplicationPad2d", "CircularPad2d")
    if hasattr(nn, n)
)
_ADAPTIVE = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_RESHAPES = (nn.Flatten, nn.Unflatten)
_SOFTMAXES = (nn.Softmax, nn.LogSoftmax, nn.Softmin, nn.Softmax2d)
_GLOBAL_MODULES = (nn.MultiheadAttention,)
_UNSUPPORTED_MODULES = (
    nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, nn.ConvTranspose1d,
    nn.ConvTranspose2d, nn.ConvTranspose3d, nn.PixelShuffle, nn.PixelUnshuffle, nn.Fold,
    nn.Unfold, nn.Conv1d, nn.Conv3d, nn.MaxPool1d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool3d,
    nn.FractionalMaxPool2d, nn.MaxUnpool2d, torchvision.ops.DeformConv2d,
)  # fmt: skip

_CONV_FNS = {F.conv2d, torch.conv2d}
_MAXPOOL_FNS = {F.max_pool2d, F.max_pool2d_with_indices, torch.max_pool2d}
_AVGPOOL_FNS = {F.avg_pool2d, torch._C._nn.avg_pool2d}
_LPPOOL_FNS = {F.lp_pool2d}
_PAD_FNS = {F.pad, torch._C._nn.pad, torch.constant_pad_nd}
_ADAPTIVE_FNS = {
    F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.adaptive_max_pool2d_with_indices,
    torch._C._nn.adaptive_avg_pool2d, torch._C._nn.adaptive_max_pool2d,
}  # fmt: skip
_LINEAR_FNS = {F.linear, torch._C._nn.linear}
_SOFTMAX_FNS = {F.softmax, F.log_softmax, F.softmin, torch.softmax, torch.log_softmax}
_SOFTMAX_METHODS = {"softmax", "log_softmax"}
_CAT_FNS = {torch.cat, torch.concat, torch.concatenate}
_STACK_FNS = {torch.stack}
_PERMUTE_FNS = {torch.permute, torch.transpose, torch.swapaxes, torch.swapdims, torch.movedim,
                torch.moveaxis, torch.t}  # fmt: skip
_PERMUTE_METHODS = {"permute", "transpose", "swapaxes", "swapdims", "movedim", "moveaxis", "t",
                    "mT"}  # fmt: skip
_RESHAPE_FNS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.unflatten,
                operator.getitem}  # fmt: skip
_RESHAPE_METHODS = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as",
                    "reshape_as", "expand", "expand_as"}  # fmt: skip
_GLOBAL_FNS = {operator.matmul, torch.matmul, torch.bmm, torch.mm, torch.einsum,
               F.scaled_dot_product_attention, F.multi_head_attention_forward}  # fmt: skip
# window attention (Swin) mixes the positions of a window, shifted from block to block: taken as
# mixing all of them (whole-input fields: a superset of the true field, so still correct)
_GLOBAL_FNS |= {
    getattr(torchvision.models.swin_transformer, name)
    for name in ("shifted_window_attention", "shifted_window_attention_v2")
    if hasattr(torchvision.models.swin_transformer, name)
}
_GLOBAL_METHODS = {"matmul", "bmm", "mm"}
_UNSUPPORTED_FNS = {
    F.interpolate, F.upsample, F.upsample_nearest, F.upsample_bilinear, F.conv_transpose1d,
    F.conv_transpose2d, F.conv_transpose3d, F.pixel_shuffle, F.pixel_unshuffle, F.fold, F.unfold,
    F.grid_sample, F.conv1d, F.conv3d, torch.roll, torch.flip, torch.fliplr, torch.flipud,
    torch.rot90, torch.cumsum, torch.cumprod, torchvision.ops.deform_conv2d,
}  # fmt: skip
_UNSUPPORTED_METHODS = {"roll", "flip", "fliplr", "flipud", "rot90", "cumsum", "cumprod", "unfold"}


def _leaf_modules() -> list[type]:
    """torchvision's default leaf modules for tracing (every ``nn.Module`` in torchvision.ops)."""
    return [
        obj
        for _, obj in inspect.getmembers(torchvision.ops)
        if inspect.isclass(obj) and issubclass(obj, nn.Module)
    ]


def _is_torch_nn(module: nn.Module) -> bool:
    return type(module).__module__.startswith(("torch.nn", "torch.ao.nn"))


# ---------------------------------------------------------------------------------------------
# The analysis


class _Analyzer(fx.Interpreter):
    """Runs a graph and, beside every value, computes the field state of every node."""

    def __init__(self, gm: fx.GraphModule, in_states: list[Any], label, inside: str = ""):
        super().__init__(gm)
        self.in_states = list(in_states)
        self.label = label
        self.inside = inside
        self.states: dict[fx.Node, Any] = {}
        self.shapes: dict[fx.Node, tuple[int, ...] | None] = {}
        self._placeholder_index = 0
        self.stop_after: set[fx.Node] | None = None  # stop once these are computed

    def where(self, n: fx.Node) -> str:
        return self.inside or self.label(n)

    def run_node(self, n: fx.Node) -> Any:
        refs = fx.node.map_arg((n.args, n.kwargs), lambda a: _Ref(self.states[a]))
        if n.op == "placeholder":
            out = super().run_node(n)
            i = self._placeholder_index
            self._placeholder_index += 1
            state = self.in_states[i] if i < len(self.in_states) else None
        elif n.op == "call_module" and self._traces_through(self.fetch_attr(n.target)):
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            out, state = self._through(n, refs, args, kwargs)
        else:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            traced = self._into_function(n, refs, args, kwargs)
            if traced is not None:
                out, state = traced
            else:
                out = super().run_node(n)
                state = self._state(n, refs, args, kwargs, out)
        self.states[n] = state
        self.shapes[n] = tuple(out.shape) if isinstance(out, torch.Tensor) else None
        if self.stop_after is not None:
            self.stop_after.discard(n)
            if not self.stop_after:
                raise _Done
        return out

    def _into_function(self, n: fx.Node, refs, args: tuple, kwargs: dict) -> tuple | None:
        """Analyse a call of a Python function the tracer kept whole (``torch.fx.wrap``, e.g.
        Swin's patch merging) by tracing into it; None when it is not one or cannot be traced."""
        fn = n.target
        if n.op != "call_function" or not inspect.isfunction(fn) or fn in _GLOBAL_FNS:
            return None
        where = getattr(fn, "__module__", None) or ""
        if where.startswith("torch") and not where.startswith("torchvision.models"):
            return None  # torch's own functions and torchvision.ops: the op tables cover them
        if kwargs or not args or not all(isinstance(a, torch.Tensor) for a in args):
            return None
        try:
            gm = fx.symbolic_trace(fn)
        except Exception:  # noqa: BLE001 - untraceable: the ordinary rules take it
            return None
        if sum(1 for p in gm.graph.nodes if p.op == "placeholder") != len(args):
            return None
        states = [r.state if isinstance(r, _Ref) else None for r in refs[0]]
        sub = _Analyzer(gm, states, self.label, inside=self.where(n))
        out = sub.run(*args)
        out_node = next(p for p in gm.graph.nodes if p.op == "output")
        found = _live_states(fx.node.map_arg(out_node.args[0], lambda a: _Ref(sub.states[a])))
        if isinstance(found, _Unsupported) or not found:
            return out, found if found else None
        return out, found[0]

    @staticmethod
    def _traces_through(module: nn.Module) -> bool:
        return not _is_torch_nn(module) and not isinstance(module, _UNSUPPORTED_MODULES)

    def _through(self, n: fx.Node, refs, args: tuple, kwargs: dict) -> tuple[Any, Any]:
        """Analyse a leaf module (e.g. a torchvision.ops block) by tracing into it."""
        module = self.fetch_attr(n.target)
        arg_refs, kwarg_refs = refs
        try:
            sig = inspect.signature(module.forward)
            bound_values = sig.bind(*args, **kwargs)
            bound_refs = sig.bind(*arg_refs, **kwarg_refs)
            bound_values.apply_defaults()
            tracer = LeafModuleAwareTracer(
                autowrap_modules=(math, torchvision.ops), leaf_modules=[]
            )
            graph = tracer.trace(module)
            gm = fx.GraphModule(module, graph)
        except Exception as exc:  # untraceable: keep the value, lose the field
            out = module(*args, **kwargs)
            ins = _live_states(refs)
            if isinstance(ins, _Unsupported) or not ins or all(s.whole for s in ins):
                return out, ins if isinstance(ins, _Unsupported) else (_WHOLE if ins else None)
            return out, _Unsupported(
                f"cannot trace into module {type(module).__name__} at node {self.where(n)!r} "
                f"to follow its receptive field ({exc})"
            )
        placeholders = [p.target for p in graph.nodes if p.op == "placeholder"]
        values, states = [], []
        for name in placeholders:
            name = name.lstrip("*")
            values.append(bound_values.arguments.get(name))
            ref = bound_refs.arguments.get(name)
            states.append(ref.state if isinstance(ref, _Ref) else None)
        sub = _Analyzer(gm, states, self.label, inside=self.where(n))
        out = sub.run(*values)
        out_node = next(p for p in graph.nodes if p.op == "output")
        result = fx.node.map_arg(out_node.args[0], lambda a: _Ref(sub.states[a]))
        found = _live_states(result)
        if isinstance(found, _Unsupported):
            return out, found
        if not found:
            return out, None
        try:
            return out, found[0] if len(found) == 1 else _combine(found, self.where(n))
        except _Refuse as exc:
            return out, _Unsupported(str(exc))

    def _state(self, n: fx.Node, refs, args: tuple, kwargs: dict, out: Any) -> Any:
        if n.op in ("get_attr", "output"):
            return None
        live = _live_states(refs)
        if isinstance(live, _Unsupported):
            return live
        if not live:
            return None
        if _tensor_shape(out) is None:
            return None
        if all(s.whole for s in live):
            # the field stays whole; the rules only follow where the grid is (the layout)
            if any(s.dims is None for s in live):
                return _WHOLE
            try:
                return _whole(self._rule(n, refs, args, kwargs, out, live))
            except _Refuse:
                return _WHOLE
        try:
            return self._rule(n, refs, args, kwargs, out, live)
        except _Refuse as exc:
            return _Unsupported(str(exc))

    def _rule(self, n: fx.Node, refs, args, kwargs, out, live: list[_State]) -> _State:
        where = self.where(n)
        target = n.target
        module = self.fetch_attr(target) if n.op == "call_module" else None
        fn = target if n.op == "call_function" else None
        method = target if n.op == "call_method" else None
        first = refs[0][0].state if refs[0] and isinstance(refs[0][0], _Ref) else None
        x = args[0] if args else None
        what = type(module).__name__ if module is not None else getattr(target, "__name__", target)

        if (
            isinstance(module, _UNSUPPORTED_MODULES)
            or fn in _UNSUPPORTED_FNS
            or (method in _UNSUPPORTED_METHODS)
        ):
            raise _Refuse(
                f"node {where!r} ({what}) has no receptive field patchmine can follow "
                "(upsampling, transposed or deformable convs, flips and the like are not supported)"
            )
        if isinstance(module, _GLOBAL_MODULES) or fn in _GLOBAL_FNS or (method in _GLOBAL_METHODS):
            return _whole(_shaped_like(refs, (args, kwargs), out))  # attention keeps its layout

        if isinstance(module, nn.Conv2d) or fn in _CONV_FNS:
            if module is not None:
                k, s, p, d = module.kernel_size, module.stride, module.padding, module.dilation
            else:
                b = _bind(
                    [("input", None), ("weight", None), ("bias", None), ("stride", 1),
                     ("padding", 0), ("dilation", 1), ("groups", 1)], args, kwargs,
                )  # fmt: skip
                k, s, p, d = b["weight"].shape[-2:], b["stride"], b["padding"], b["dilation"]
            k, s, d = _pair(k), _pair(s), _pair(d)
            if isinstance(p, str):
                same = tuple(di * (ki - 1) // 2 for ki, di in zip(k, d, strict=True))
                p = (0, 0) if p == "valid" else same
            return _window(_spatial_input(first, x, where), k, s, _pair(p), d)

        if isinstance(module, _POOLS) or fn in _MAXPOOL_FNS | _AVGPOOL_FNS | _LPPOOL_FNS:
            if module is not None:
                k = module.kernel_size
                s = module.stride or k
                p = getattr(module, "padding", 0)
                d = getattr(module, "dilation", 1)
            else:
                if fn in _LPPOOL_FNS:
                    names = [("input", None), ("norm_type", None), ("kernel_size", None),
                             ("stride", None)]  # fmt: skip
                else:
                    names = [("input", None), ("kernel_size", None), ("stride", None),
                             ("padding", 0), ("dilation", 1)]  # fmt: skip
                    if fn in _AVGPOOL_FNS:
                        names = names[:4]
                b = _bind(names, args, kwargs)
                k = b["kernel_size"]
                s = b["stride"] or k
                p = b.get("padding", 0)
                d = b.get("dilation", 1)
            return _window(_spatial_input(first, x, where), _pair(k), _pair(s), _pair(p), _pair(d))

        if isinstance(module, _PADS) or fn in _PAD_FNS:
            if module is not None:
                pad = module.padding
            else:
                pad = _bind([("input", None), ("pad", ())], args, kwargs)["pad"]
            st = _require(first, where)
            nd = x.ndim
            offsets = {nd - 1 - i // 2: int(pad[i]) for i in range(0, len(pad), 2)}
            (ry, jy, oy), (rx, jx, ox) = st.y, st.x
            oy -= offsets.get(st.dims[0], 0) * jy
            ox -= offsets.get(st.dims[1], 0) * jx
            return replace(st, y=(ry, jy, oy), x=(rx, jx, ox))

        if isinstance(module, _ADAPTIVE) or fn in _ADAPTIVE_FNS:
            st = _spatial_input(first, x, where)
            out_hw = [_tensor_shape(out)[dim] for dim in st.dims]
            if out_hw == [1, 1]:
                return _WHOLE  # global pooling
            k, s = [], []
            for dim, o in zip(st.dims, out_hw, strict=True):
                i = x.shape[dim]
                if i % o:
                    return _WHOLE  # uneven windows: no single stride; conservatively whole
                k.append(i // o)
                s.append(i // o)
            return _window(st, k, s, (0, 0))

        if isinstance(module, _RESHAPES) or fn in _RESHAPE_FNS or method in _RESHAPE_METHODS:
            if fn is operator.getitem and not isinstance(x, torch.Tensor):
                return _require(first, where)
            if fn is operator.getitem:
                return _index(_require(first, where), x, args[1], out)
            return _reshape(_require(first, where), x, out)

        if fn in _PERMUTE_FNS or method in _PERMUTE_METHODS:
            st = _require(first, where)
            meta = torch.empty(tuple(range(2, 2 + x.ndim)), device="meta")
            if fn is not None:
                moved = fn(meta, *args[1:], **kwargs)
            elif method == "mT":
                moved = meta.mT
            else:
                moved = getattr(meta, method)(*args[1:], **kwargs)
            order = [size - 2 for size in moved.shape]
            return replace(st, dims=(order.index(st.dims[0]), order.index(st.dims[1])))

        if isinstance(module, (nn.Linear, nn.LazyLinear)) or fn in _LINEAR_FNS:
            st = _require(first, where)
            if x.ndim - 1 in st.dims:
                return _WHOLE
            return _elementwise(live, refs, args, kwargs, out, where)

        if isinstance(module, _SOFTMAXES) or fn in _SOFTMAX_FNS or method in _SOFTMAX_METHODS:
            st = _require(first, where)
            if isinstance(module, nn.Softmax2d):
                dim = -3
            elif module is not None:
                dim = module.dim
            else:
                dim = _bind([("input", None), ("dim", None)], args, kwargs)["dim"]
            if dim is None:
                dim = 0 if x.ndim in (0, 1, 3) else 1
            if dim % x.ndim in st.dims:
                return _whole(st)
            return _elementwise(live, refs, args, kwargs, out, where)

        if fn in _CAT_FNS:
            dim = _bind([("tensors", None), ("dim", 0)], args, kwargs)["dim"]
            tensors = _bind([("tensors", None), ("dim", 0)], refs[0], refs[1])["tensors"]
            for ref, t in zip(tensors, args[0], strict=True):
                s = ref.state if isinstance(ref, _Ref) else None
                if isinstance(s, _State) and s.dims is not None and dim % t.ndim in s.dims:
                    if s.tokens is not None:
                        return _cat_tokens(tensors, args[0], dim, where)
                    raise _Refuse(f"node {where!r} concatenates along a spatial axis")
            return _elementwise(live, refs, args, kwargs, out, where)

        if fn in _STACK_FNS:
            dim = _bind([("tensors", None), ("dim", 0)], args, kwargs)["dim"]
            nd = _tensor_shape(out).__len__()
            dim %= nd
            moved = []
            for ref in refs[0][0]:
                s = ref.state if isinstance(ref, _Ref) else None
                if isinstance(s, _State):
                    moved.append(replace(s, dims=tuple(d + (d >= dim) for d in s.dims)))
            return _combine(moved, where)

        return _elementwise(live, refs, args, kwargs, out, where)


def _live_states(refs) -> list[_State] | _Unsupported:
    """The field states of the tensor inputs in a nested args structure."""
    found: list[_State] = []

    def walk(a):
        if isinstance(a, _Ref):
            if isinstance(a.state, _Unsupported):
                raise _Stop(a.state)
            if isinstance(a.state, _State):
                found.append(a.state)
        elif isinstance(a, (tuple, list)):
            for b in a:
                walk(b)
        elif isinstance(a, dict):
            for b in a.values():
                walk(b)

    try:
        walk(refs)
    except _Stop as stop:
        return stop.state
    return found


class _Done(Exception):
    """Every requested node has been analysed: the rest of the graph is not needed."""


class _Stop(Exception):
    def __init__(self, state):
        super().__init__()
        self.state = state


def _require(st: Any, where: str) -> _State:
    if not isinstance(st, _State):
        raise _Refuse(f"cannot find the input tensor of node {where!r}")
    return st


def _spatial_input(st: Any, x: Any, where: str) -> _State:
    """The input state of a conv / pool, which must have its spatial axes last (N, C, H, W)."""
    st = _require(st, where)
    if not isinstance(x, torch.Tensor) or st.dims != (x.ndim - 2, x.ndim - 1):
        raise _Refuse(f"node {where!r} slides a window over axes that are not the spatial ones")
    return st


def _reshape(st: _State, x: torch.Tensor, out: Any) -> _State:
    """Follow the spatial axes through view / reshape / flatten / squeeze / indexing."""
    out_shape = _tensor_shape(out)
    in_shape = tuple(x.shape)
    if st.dims is None:
        return _WHOLE
    if st.tokens is not None:
        d = _map_reshape(in_shape, out_shape, st.dims[0])
        if d is not None:
            return replace(st, dims=(d, d))
        prefix, h, w = st.tokens
        t = st.dims[0]
        for e in range(len(out_shape) - 1):  # the tokens unflattened back into (h, w)
            if (
                prefix == 0
                and out_shape[e : e + 2] == (h, w)
                and math.prod(out_shape[:e]) == math.prod(in_shape[:t])
            ):
                return replace(st, dims=(e, e + 1), tokens=None)
        return _whole(None)
    dims = tuple(_map_reshape(in_shape, out_shape, d) for d in st.dims)
    if None not in dims:
        return replace(st, dims=dims)
    a, b = st.dims
    if b == a + 1:  # y and x flattened into one dim: the tokens of a patch embedding
        h, w = in_shape[a], in_shape[b]
        for e in range(len(out_shape)):
            if (
                out_shape[e] == h * w
                and math.prod(out_shape[:e]) == math.prod(in_shape[:a])
                and math.prod(out_shape[e + 1 :]) == math.prod(in_shape[b + 1 :])
            ):
                return replace(st, dims=(e, e), tokens=(0, h, w))
    return _whole(None)  # spatial positions merged, reduced or picked: conservatively whole


def _index(st: _State, x: torch.Tensor, index: Any, out: Any) -> _State:
    """Follow the spatial axes through ``x[index]``; a slice of a spatial axis crops the field."""
    if st.dims is None:
        return _WHOLE
    if st.tokens is not None:
        return _index_tokens(st, x, index, out)
    items = index if isinstance(index, tuple) else (index,)
    if not all(i is None or i is Ellipsis or isinstance(i, (int, slice)) for i in items):
        return _reshape(st, x, out)  # advanced indexing
    consumed = sum(1 for i in items if i is not None and i is not Ellipsis)
    if Ellipsis in items:
        at = items.index(Ellipsis)
        items = items[:at] + (slice(None),) * (x.ndim - consumed) + items[at + 1 :]
    items = items + (slice(None),) * (x.ndim - sum(1 for i in items if i is not None))
    dims, axes = {}, {0: st.y, 1: st.x}
    d_in = d_out = 0
    for item in items:
        if item is None:
            d_out += 1
            continue
        if d_in in st.dims:
            if not isinstance(item, slice):
                return _WHOLE  # one row / column picked: conservatively whole
            a = st.dims.index(d_in)
            start, _, step = item.indices(x.shape[d_in])
            r, j, o = axes[a]
            axes[a] = (r, j * step, o + start * j)
            dims[a] = d_out
        if isinstance(item, slice):
            d_out += 1
        d_in += 1
    return replace(st, dims=(dims[0], dims[1]), y=axes[0], x=axes[1])


def _index_tokens(st: _State, x: torch.Tensor, index: Any, out: Any) -> _State:
    """``x[index]`` on tokens: the token dim kept whole, or its prefix tokens sliced off."""
    items = index if isinstance(index, tuple) else (index,)
    if not all(i is None or i is Ellipsis or isinstance(i, (int, slice)) for i in items):
        return _whole(None)
    if Ellipsis in items:
        at = items.index(Ellipsis)
        consumed = sum(1 for i in items if i is not None and i is not Ellipsis)
        items = items[:at] + (slice(None),) * (x.ndim - consumed) + items[at + 1 :]
    prefix, h, w = st.tokens
    t, d_in, d_out, where = st.dims[0], 0, 0, None
    for item in items:
        if item is None:
            d_out += 1
            continue
        if d_in == t:
            if not isinstance(item, slice):
                return _whole(None)  # one token picked (the class token: mined as @cls)
            start, stop, step = item.indices(x.shape[t])
            if step != 1 or stop != x.shape[t] or start > prefix:
                return _whole(None)
            prefix -= start
            where = d_out
        if isinstance(item, slice):
            d_out += 1
        d_in += 1
    if where is None:  # the token dim comes after the indexed ones
        where = d_out + (t - d_in)
    return replace(st, dims=(where, where), tokens=(prefix, h, w))


def _cat_tokens(tensors, values, dim: int, where: str) -> _State:
    """``torch.cat`` along the token dim: tensors from no input before the grid add prefix tokens."""
    before, found = 0, None
    for ref, t in zip(tensors, values, strict=True):
        s = ref.state if isinstance(ref, _Ref) else None
        if isinstance(s, _State) and not (s.whole and s.dims is None):
            if found is not None or s.tokens is None:
                return _whole(None)
            found = s
        elif isinstance(s, _State):
            return _WHOLE
        elif found is None:
            before += t.shape[dim]
        else:
            return _whole(None)  # tokens after the grid
    prefix, h, w = found.tokens
    return replace(found, tokens=(prefix + before, h, w))


def _shaped_like(refs, values, out: Any) -> Any:
    """The state of the first input tensor shaped like ``out`` (attention's query), if any."""
    shape = _tensor_shape(out)
    found = []

    def walk(r, v):
        if isinstance(r, _Ref):
            if isinstance(r.state, _State) and isinstance(v, torch.Tensor):
                found.append((r.state, tuple(v.shape)))
        elif isinstance(r, (tuple, list)) and isinstance(v, (tuple, list)):
            for a, b in zip(r, v, strict=False):
                walk(a, b)
        elif isinstance(r, dict) and isinstance(v, dict):
            for key in r:
                walk(r[key], v.get(key))

    walk(refs, values)
    return next((st for st, s in found if s == shape), None)


def _elementwise(live, refs, args, kwargs, out, where: str) -> _State:
    """Element-wise / pointwise op or merge: the output keeps the inputs' spatial sizes."""
    out_shape = _tensor_shape(out)
    pairs: list[tuple[_State, torch.Tensor]] = []

    def walk(r, v):
        if isinstance(r, _Ref):
            if isinstance(r.state, _State) and isinstance(v, torch.Tensor):
                pairs.append((r.state, v))
        elif isinstance(r, (tuple, list)) and isinstance(v, (tuple, list)):
            for a, b in zip(r, v, strict=False):
                walk(a, b)
        elif isinstance(r, dict) and isinstance(v, dict):
            for key in r:
                walk(r[key], v.get(key))

    walk(refs, (args, kwargs))
    mapped, spread = [], False
    for st, v in pairs:
        if st.dims is None:
            return _WHOLE
        delta = len(out_shape) - v.ndim
        if delta < 0:
            return _WHOLE  # a reduction over some axes
        dims = (st.dims[0] + delta, st.dims[1] + delta)
        for d_in, d_out in zip(st.dims, dims, strict=True):
            size_in, size_out = v.shape[d_in], out_shape[d_out]
            if size_in == size_out:
                continue
            if size_in == 1 or size_out == 1:
                spread = True  # broadcast over space (a gate), or a reduction with keepdim
                break
            raise _Refuse(
                f"node {where!r} changes a spatial size from {size_in} to {size_out} in a way "
                "patchmine cannot follow (upsampling, cropping or an unknown op)"
            )
        else:
            mapped.append(replace(st, dims=dims))
    if not mapped:
        return _WHOLE
    merged = _combine(mapped, where)
    return _whole(merged) if spread else merged


def _hw(input_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(input_size, numbers.Integral):
        hw = (int(input_size), int(input_size))
    else:
        hw = tuple(int(v) for v in input_size)
    if len(hw) != 2 or min(hw) < 1:
        raise UsageError(f"input_size must be S or (H, W) with positive sides, got {input_size!r}")
    return hw


def receptive_fields(
    model: nn.Module,
    input_size: int | tuple[int, int],
    nodes: Sequence[str] | None = None,
    *,
    channels: int = 3,
) -> dict[str, Field]:
    """The receptive field of the named nodes of a model, computed over its FX graph.

    Args:
        model: the network (traced in eval mode; its training flag is restored).
        input_size: ``S`` or ``(H, W)`` of the model input.
        nodes: FX node names as ``torchvision.models.feature_extraction.get_graph_node_names``
            lists them (eval graph). ``None``: every node whose output is ``(N, C, H, W)`` or
            ``(N, C)`` and whose field is defined (nodes after an unsupported op are left out).
        channels: input channels of the zero image used to learn the shapes.

    Returns:
        ``{node: Field}`` in the order asked for (graph order for ``None``). A node with output
        ``(N, C)`` always gets the whole-input field.

    Raises:
        KeyError: (``patchmine.errors.UnknownNameError``) a node name that does not exist; the
            message lists the nearest valid names.
        ValueError: a requested node whose field cannot be followed (upsampling, a merge of
            misaligned fields, ...); the message names the node where the field was lost.

    Example:
        >>> import torchvision
        >>> f = receptive_fields(torchvision.models.alexnet(), 224, ["features.2"])["features.2"]
        >>> f.size, f.stride, f.offset
        ((19, 19), (8, 8), (-2, -2))
    """
    hw = _hw(input_size)
    was_training = model.training
    try:
        model.eval()
        tracer = NodePathTracer(
            autowrap_modules=(math, torchvision.ops), leaf_modules=_leaf_modules()
        )
        graph = tracer.trace(model)
        gm = fx.GraphModule(tracer.root, graph)
        names: dict[fx.Node, str] = dict(tracer.node_to_qualname)
        by_name = {name: node for node, name in names.items()}
        if nodes is not None:
            nodes = [nodes] if isinstance(nodes, str) else list(nodes)
            for name in nodes:
                if name not in by_name:
                    close = nearest(name, by_name)
                    raise UnknownNameError(
                        f"node {name!r} is not in the model's graph; nearest: "
                        f"{', '.join(close) if close else '(none)'}. List the valid names with "
                        "torchvision.models.feature_extraction.get_graph_node_names(model)[1] "
                        "or `patchmine layers MODEL`."
                    )
        tensor = next(iter(model.parameters()), None)
        if tensor is None:
            tensor = next(iter(model.buffers()), torch.zeros(()))
        dtype = tensor.dtype if tensor.is_floating_point() else torch.float32
        x = torch.zeros((1, channels, *hw), dtype=dtype, device=tensor.device)
        analyzer = _Analyzer(gm, [_State((2, 3))], lambda n: names.get(n, n.name))
        if nodes is not None:
            analyzer.stop_after = {by_name[name] for name in nodes}
        with torch.inference_mode():
            try:
                analyzer.run(x)
            except _Done:
                pass
    finally:
        model.train(was_training)

    grids: dict[tuple[int, int, int], _State] = {}  # every patch grid the model made, first seen
    for state in analyzer.states.values():
        if isinstance(state, _State) and state.tokens is not None:
            grids.setdefault(state.tokens, state)

    def field(state: _State, shape) -> Field | None:
        """The node's Field with its layout; None where the node has no grid patchmine can mine."""
        rank = len(shape) if shape is not None else 0
        layout, extra = "nchw", {}
        if rank == 3:
            if state.tokens is None and state.dims is None:  # layout lost: match the token count
                found = [g for g in grids if g[0] + g[1] * g[2] == shape[1]]
                if len(found) != 1:
                    return None
                state = replace(grids[found[0]], whole=True)
            if state.tokens is None or state.dims != (1, 1):
                return None
            layout = "tokens"
            extra = {"prefix": state.tokens[0], "grid": state.tokens[1:]}
        elif rank == 4 and state.dims == (1, 2):
            layout = "nhwc"
        elif rank != 2 and not (rank == 4 and state.dims in (None, (2, 3))):
            return None
        own = Field(
            size=(state.y[0], state.x[0]),
            stride=(state.y[1], state.x[1]),
            offset=(state.y[2], state.x[2]),
        )
        if layout != "nchw":
            extra.update(layout=layout, unit=own)
        if state.whole or rank == 2:
            return Field(size=hw, stride=hw, offset=(0, 0), whole=True, **extra)
        return replace(own, **extra)

    result: dict[str, Field] = {}
    if nodes is None:
        for node, name in names.items():
            state, shape = analyzer.states.get(node), analyzer.shapes.get(node)
            if not isinstance(state, _State) or shape is None:
                continue
            found = field(state, shape)
            if found is not None:
                result[name] = found
        return result
    for name in nodes:
        node = by_name[name]
        state, shape = analyzer.states.get(node), analyzer.shapes.get(node)
        if isinstance(state, _Unsupported):
            raise UsageError(f"node {name!r} has no receptive field: {state.message}")
        if not isinstance(state, _State) or shape is None:
            raise UsageError(f"node {name!r} does not output a tensor computed from the input")
        found = field(state, shape)
        if found is None:
            what = "x".join(str(v) for v in shape[1:])
            raise UsageError(
                f"node {name!r} outputs {what} per image, which is not a grid patchmine can "
                "find: no patch embedding of the model (a conv whose output is flattened into "
                "tokens) gives that token count"
                if len(shape) == 3
                else f"node {name!r} outputs {what} per image, with its grid in no layout "
                "patchmine mines ((N, C, H, W), (N, H, W, C), (N, T, D) or (N, C))"
            )
        result[name] = found
    return result
