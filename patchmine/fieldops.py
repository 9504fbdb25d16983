"""Field states and how ops move them: the building blocks of the receptive-field analysis.

A tensor's ``_State`` says which of its dims hold (y, x) and, per axis, the field (r, j, o) of a
unit. Here: the state types, the window / padding arithmetic, merging the fields of several inputs,
the tables that sort ops into rules, and the helpers that follow the spatial axes through reshape,
indexing, token concatenation and element-wise ops. ``patchmine.receptive`` runs the graph and
applies them; its docstring states the rules.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

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


# ---------------------------------------------------------------------------------------------
# Following the spatial axes


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


def _tensor_states(refs, values) -> list[tuple[_State, torch.Tensor]]:
    """(state, tensor) of every tensor in ``values`` whose place in ``refs`` carries a state."""
    found: list[tuple[_State, torch.Tensor]] = []

    def walk(r, v):
        if isinstance(r, _Ref):
            if isinstance(r.state, _State) and isinstance(v, torch.Tensor):
                found.append((r.state, v))
        elif isinstance(r, (tuple, list)) and isinstance(v, (tuple, list)):
            for a, b in zip(r, v, strict=False):
                walk(a, b)
        elif isinstance(r, dict) and isinstance(v, dict):
            for key in r:
                walk(r[key], v.get(key))

    walk(refs, values)
    return found


def _shaped_like(refs, values, out: Any) -> Any:
    """The state of the first input tensor shaped like ``out`` (attention's query), if any."""
    shape = _tensor_shape(out)
    return next((st for st, v in _tensor_states(refs, values) if tuple(v.shape) == shape), None)


def _elementwise(live, refs, args, kwargs, out, where: str) -> _State:
    """Element-wise / pointwise op or merge: the output keeps the inputs' spatial sizes."""
    out_shape = _tensor_shape(out)
    pairs = _tensor_states(refs, (args, kwargs))
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
