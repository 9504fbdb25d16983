"""Receptive fields of a network's nodes: the analysis over the traced FX graph.

Public names: Field, boxes, inside_fraction, crosses_edge, centers, locations, pixel_centers,
to_original, to_input, receptive_fields. All but ``receptive_fields`` live in
``patchmine.geometry`` (the geometry of boxes) and are re-exported here; the field states and
per-op helpers the rules below use live in ``patchmine.fieldops``.

``receptive_fields`` traces a model the way torchvision's
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
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
import torchvision
from torch import fx, nn
from torchvision.models.feature_extraction import LeafModuleAwareTracer, NodePathTracer

from patchmine.errors import UnknownNameError, UsageError, nearest
from patchmine.fieldops import (
    _ADAPTIVE,
    _ADAPTIVE_FNS,
    _AVGPOOL_FNS,
    _CAT_FNS,
    _CONV_FNS,
    _GLOBAL_FNS,
    _GLOBAL_METHODS,
    _GLOBAL_MODULES,
    _LINEAR_FNS,
    _LPPOOL_FNS,
    _MAXPOOL_FNS,
    _PAD_FNS,
    _PADS,
    _PERMUTE_FNS,
    _PERMUTE_METHODS,
    _POOLS,
    _RESHAPE_FNS,
    _RESHAPE_METHODS,
    _RESHAPES,
    _SOFTMAX_FNS,
    _SOFTMAX_METHODS,
    _SOFTMAXES,
    _STACK_FNS,
    _UNSUPPORTED_FNS,
    _UNSUPPORTED_METHODS,
    _UNSUPPORTED_MODULES,
    _WHOLE,
    _bind,
    _cat_tokens,
    _combine,
    _elementwise,
    _index,
    _live_states,
    _Ref,
    _Refuse,
    _require,
    _reshape,
    _shaped_like,
    _spatial_input,
    _State,
    _tensor_shape,
    _Unsupported,
    _whole,
    _window,
)
from patchmine.geometry import (
    Field,
    _pair,
    boxes,
    centers,
    crosses_edge,
    inside_fraction,
    locations,
    pixel_centers,
    to_input,
    to_original,
)

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


class _Done(Exception):
    """Every requested node has been analysed: the rest of the graph is not needed."""


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
