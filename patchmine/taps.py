"""Activations of named graph nodes, via torchvision's FX feature extraction.

Public names: layer_names, node_shapes, output_shapes, module_outputs, resolve_layers,
default_layers, Layers, select_layers, Tap, run_channels_last.

Layer names are the dotted FX node names torchvision's ``get_graph_node_names`` reports (``features.3``,
``layer1.0.relu_1``, ``add_3``), never re-joined with ``_``, or module names (``layer3``,
``features``, ``_blocks.10``): a module name means the module's output node, by torchvision's
``create_feature_extractor`` rule (the last node of the graph whose name starts with the module's:
``layer3`` -> ``layer3.5.relu_2``). The name as given stays the layer's name, as torchvision keeps it
as the output key; the node it means is recorded beside it.
"""

from __future__ import annotations

import copy
import inspect
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from patchmine.errors import UnknownNameError, UsageError, nearest
from patchmine.geometry import Field

if TYPE_CHECKING:
    from patchmine.tokens import View

__all__ = [
    "layer_names",
    "node_shapes",
    "module_outputs",
    "output_shapes",
    "resolve_layers",
    "default_layers",
    "Layers",
    "select_layers",
    "Tap",
    "run_channels_last",
]

# The model always runs on chunks of a fixed number of images (the last one padded with zero images):
# kernels pick code paths by batch shape (a batch of 1, a GEMM row remainder, oneDNN's choice of
# algorithm for the thread count), so a forward whose batch shape followed the batch size could
# change an activation's last bits with it, and with them the result file. With one chunk shape per
# device, an image's activations are the same bits whatever the batch size and thread count (only the
# padding waste changes). CPU: 16 images, as PyTorch runs a float32 1x1 convolution single-threaded
# with its native kernel below a batch of 16 and with oneDNN from 16 on (ATen's
# ConvParams::use_mkldnn). CUDA and other accelerators: 32, the CLI's default batch size, enough to
# keep a GPU busier (a smaller batch is padded up to it).
BATCH_MULTIPLE = 16
CHUNK = {"cpu": BATCH_MULTIPLE}
DEVICE_CHUNK = 32


def chunk_size(device: torch.device | str) -> int:
    """Images per forward pass on ``device`` (its type: cpu, cuda, ...)."""
    return CHUNK.get(torch.device(device).type, DEVICE_CHUNK)


def layer_names(model: nn.Module) -> list[str]:
    """Every node of the traced graph in eval mode, in execution order (the input excluded)."""
    try:
        _, names = get_graph_node_names(model.eval())
    except Exception as e:
        raise UsageError(
            f"{type(model).__name__} cannot be traced with torch.fx ({type(e).__name__}: {e}); "
            "patchmine needs a model without data-dependent Python control flow"
        ) from e
    return [n for n in names[1:] if n != "output"]


def node_shapes(model: nn.Module, input_size: int) -> dict[str, tuple[int, ...]]:
    """Per-image output shape of each node with a 4-D (N,C,H,W) or 2-D (N,C) tensor output."""
    return {n: s for n, s in output_shapes(model, input_size).items() if len(s) in (1, 3)}


@torch.inference_mode()
def output_shapes(model: nn.Module, input_size: int) -> dict[str, tuple[int, ...]]:
    """Per-image output shape of every node with a tensor output of 2 to 5 dims (tokens too)."""
    names = layer_names(model)
    extractor = create_feature_extractor(model.eval(), return_nodes=names)
    device = next(model.parameters(), torch.empty(0)).device
    out = extractor(torch.zeros(2, 3, input_size, input_size, device=device))
    return {
        n: tuple(v.shape[1:])
        for n, v in out.items()
        if isinstance(v, torch.Tensor) and 2 <= v.ndim <= 5 and v.shape[0] == 2
    }


def module_outputs(names: Sequence[str]) -> dict[str, str]:
    """Every name torchvision's feature extraction accepts -> the node it means.

    A name is a dotted prefix of node names (a module, ``layer3``, ``layer3.5``) or a node name
    itself; it means the last node in graph order that starts with it (torchvision's rule), which for
    a module is its output node.

    Args:
        names: node names in execution order (`layer_names`).

    Returns:
        name -> node, ordered by where each name first appears in the graph.

    Example:
        >>> module_outputs(["layer1.0.conv1", "layer1.0.relu", "fc"])["layer1"]
        'layer1.0.relu'
    """
    out: dict[str, str] = {}
    for node in names:
        parts = node.split(".")
        for i in range(1, len(parts) + 1):
            out[".".join(parts[:i])] = node
    return out


def _block_outputs(modules: dict[str, str]) -> set[str]:
    """The modules that hold others (their names are not nodes) and their output nodes."""
    blocks = {name for name, node in modules.items() if name != node}
    return blocks | {modules[b] for b in blocks}


def _suggest(name: str, choices: Sequence[str], blocks: set[str]) -> list[str]:
    """The valid names nearest to a typo, the outputs of blocks first."""
    close = nearest(name, choices, n=10)
    return ([c for c in close if c in blocks] + [c for c in close if c not in blocks])[:5]


def resolve_layers(
    shapes: dict[str, tuple[int, ...]],
    layers: Sequence[str],
    modules: dict[str, str] | None = None,
) -> dict[str, str]:
    """Check layer names against the minable nodes; map module names to their output nodes.

    Args:
        shapes: the minable nodes -> per-image shape (their order is the graph's).
        layers: names as the user gave them: node names or module names.
        modules: `module_outputs` of the model's graph (default: the nodes of ``shapes`` only).

    Returns:
        name as given -> the node it means, in the order given; a name meaning a node already
        asked for (``layer3`` and ``layer3.5.relu_2``) is dropped.

    Raises:
        UsageError: no names.
        UnknownNameError: names that are neither nodes nor modules (each named, with its nearest
            valid names), or a module whose output node cannot be mined.
    """
    if not layers:
        raise UsageError("no layers given; name at least one (`patchmine layers MODEL` lists them)")
    modules = modules if modules is not None else module_outputs(list(shapes))
    out: dict[str, str] = {}
    unknown, unminable = [], []
    for name in layers:
        node = name if name in shapes else modules.get(name)
        if node is None:
            unknown.append(name)
        elif node not in shapes:
            unminable.append(f"{name!r} (its output node {node} is not a feature map or vector)")
        elif node not in out.values():
            out[name] = node
    if unknown:
        choices = list(dict.fromkeys([*modules, *shapes]))
        blocks = _block_outputs(modules)
        what = [
            f"{n!r} (nearest: {', '.join(_suggest(n, choices, blocks)) or 'none'})" for n in unknown
        ]
        raise UnknownNameError(
            f"unknown layer{'s' * (len(unknown) > 1)} {'; '.join(what)}; "
            "`patchmine layers MODEL` lists them"
        )
    if unminable:
        raise UsageError(f"cannot mine layer {'; '.join(unminable)}")
    return out


def default_layers(shapes: dict[str, tuple[int, ...]], count: int = 5) -> list[str]:
    """About ``count`` layers from early to late, out of ``shapes`` (graph order).

    The candidates are the last node of each feature-map size (a CNN's stages) and, where those are
    fewer than ``count``, also the last node of each numbered block (``features.5.3``,
    ``encoder.layers.encoder_layer_5``): a transformer keeps one token grid from its patch embedding
    to its head, so its depth shows in its blocks, not in its map sizes. Evenly spaced picks are
    taken from the candidates when there are more than ``count``, the first and the last kept.
    """
    maps = [name for name, shape in shapes.items() if len(shape) == 3 and shape[1] > 1]
    last: dict[tuple[int, ...] | str, str] = {}
    for name in maps:
        last[shapes[name][1:]] = name
    if len(last) < count:
        for name in maps:
            block = _block(name)
            if block is not None:
                last[block] = name
    ends = set(last.values())
    picks = [name for name in maps if name in ends]
    if len(picks) > count:
        step = (len(picks) - 1) / (count - 1)
        picks = [picks[round(i * step)] for i in range(count)]
    return picks


def _block(name: str) -> str | None:
    """The numbered module a node lies in (its name up to the last parent ending in a digit:
    ``features.5.3``, ``encoder.layers.encoder_layer_5``), or None."""
    parents = name.split(".")[:-1]
    for i in range(len(parents), 0, -1):
        if parents[i - 1][-1:].isdigit():
            return ".".join(parents[:i])
    return None


@dataclass(frozen=True)
class Layers:
    """The nodes a run mines, in order, with what the collectors and the file need of each.

    Attributes:
        names: layer names, as given (node or module names, duplicates dropped) or the defaults.
        shapes: name -> per-image output shape, (C, H, W) or (C,).
        fields: name -> its receptive field.
        nodes: name -> the graph node it means (itself for a node name; a module's output node).
        views: name -> `patchmine.tokens.View`, for the token, ``@cls`` and channel-last nodes
            whose tapped output must be turned into that map (see `Tap`).
    """

    names: list[str]
    shapes: dict[str, tuple[int, ...]]
    fields: dict[str, Field]
    nodes: dict[str, str] = field(default_factory=dict)
    views: dict[str, View] = field(default_factory=dict)

    def fmap_hw(self, name: str) -> tuple[int, int]:
        """(H, W) of a node's map; (1, 1) for a node with output (N, C)."""
        s = self.shapes[name]
        return (s[1], s[2]) if len(s) == 3 else (1, 1)


def select_layers(
    model: nn.Module,
    input_size: int,
    layers: Sequence[str] | None = None,
    defaults: Sequence[str] = (),
) -> Layers:
    """Check the asked-for layers (or pick the defaults) and learn their shapes and fields.

    Token nodes (N, T, D) and their ``@cls`` prefix nodes, and channel-last nodes, are offered
    beside (N, C, H, W) and (N, C) nodes (see `patchmine.tokens.minable`).

    Args:
        model: the network (traced and run once on a zero input for shapes, once for fields).
        input_size: the square input side.
        layers: node or module names (see `module_outputs`); ``None`` for ``defaults``, else the
            last node of each map size. An empty list is an error.
        defaults: the model's own default nodes (see ``LoadedModel.default_layers``).

    Raises:
        UnknownNameError: a name that is neither a minable node nor a module (the nearest valid
            names are listed, every unknown name of the list in one message).
        UsageError: no names, a node whose receptive field cannot be represented (naming where
            it was lost), or whose token grid cannot be found.
    """
    from patchmine.tokens import minable  # tokens builds on this module's output_shapes

    found = minable(model, input_size)
    if layers is None:
        names = list(defaults) or default_layers(found.shapes)
        nodes = {n: n for n in names}
    else:
        modules = module_outputs(layer_names(model))
        # a node that exists but cannot be mined: one line saying why
        found.check([n if n in found.shapes else modules.get(n, n) for n in layers])
        nodes = resolve_layers(found.shapes, layers, modules)
        names = list(nodes)
    return Layers(
        names,
        {n: found.shapes[nodes[n]] for n in names},
        {n: found.fields[nodes[n]] for n in names},
        nodes,
        {n: found.views[nodes[n]] for n in names if nodes[n] in found.views},
    )


# ---------------------------------------------------------------------------------------------
# Keeping tapped values intact in the extractor graph
#
# The extractor returns its nodes' tensors after the whole graph has run, so a tapped tensor that a
# later node changes in place (``nn.ReLU(inplace=True)``, ``x += y``, ``x.relu_()``) would read as
# the changed one. Tensors that may share memory are grouped (views, in-place results, and, to be
# safe, the outputs of leaf modules and functions that are not torch's); a mutation of a tapped
# node's group after it is either made out of place in the extractor's graph (when nothing later
# reads the old memory) or, failing that, the tapped node is cloned for the output.

_INPLACE_OPERATORS = {
    operator.iadd: operator.add,
    operator.isub: operator.sub,
    operator.imul: operator.mul,
    operator.itruediv: operator.truediv,
    operator.ifloordiv: operator.floordiv,
    operator.imod: operator.mod,
    operator.ipow: operator.pow,
    operator.imatmul: operator.matmul,
    operator.iand: operator.and_,
    operator.ior: operator.or_,
    operator.ixor: operator.xor,
}

# ops (Tensor methods, torch / F functions, getattr names) whose output may share their input's memory
_VIEWS = frozenset(
    "view view_as reshape reshape_as flatten unflatten transpose permute squeeze unsqueeze expand "
    "expand_as narrow select t T mT H mH contiguous detach unfold as_strided chunk split "
    "tensor_split unbind movedim moveaxis swapaxes swapdims diagonal real imag to type type_as "
    "float cpu cuda data __getitem__ getitem dropout dropout1d dropout2d dropout3d alpha_dropout "
    "feature_alpha_dropout".split()
)
_VIEW_MODULES = (
    nn.Identity,
    nn.Flatten,
    nn.Unflatten,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)


def _is_torch_function(f) -> bool:
    return f in _INPLACE_OPERATORS or getattr(f, "__module__", None) in (
        "torch",
        "torch._C._nn",
        "torch.nn.functional",
        "torch._VariableFunctions",
        "_operator",
        "operator",
        "builtins",
    )


def _name(f) -> str:
    return getattr(f, "__name__", "")


def _inplace_name(name: str) -> bool:
    return name.endswith("_") and not name.endswith("__")


def _bound(node: fx.Node) -> inspect.BoundArguments | None:
    try:
        return inspect.signature(node.target).bind(*node.args, **node.kwargs)
    except (TypeError, ValueError):
        return None


def _mutated(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The node whose tensor ``node`` changes in place, if any."""
    first = node.args[0] if node.args else None
    if node.op == "call_module":
        hit = getattr(gm.get_submodule(node.target), "inplace", False) is True
    elif node.op == "call_method":
        hit = _inplace_name(node.target)
    elif node.op == "call_function":
        if isinstance(node.kwargs.get("out"), fx.Node):
            return node.kwargs["out"]
        f = node.target
        hit = f in _INPLACE_OPERATORS or f is operator.setitem
        hit = hit or (_is_torch_function(f) and _inplace_name(_name(f)))
        hit = hit or node.kwargs.get("inplace") is True
        if not hit and "inplace" not in node.kwargs and (b := _bound(node)) is not None:
            hit = b.arguments.get("inplace") is True
    else:
        return None
    return first if hit and isinstance(first, fx.Node) else None


def _alias_parents(gm: fx.GraphModule, node: fx.Node) -> list[fx.Node]:
    """The input nodes whose memory ``node``'s output may share."""
    if (m := _mutated(gm, node)) is not None:
        return [m]
    first = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, _VIEW_MODULES):
            return [first] if first is not None else []
        if type(module).__module__.startswith("torch.nn"):
            return []
    elif node.op == "call_method":
        return [first] if node.target in _VIEWS and first is not None else []
    elif node.op == "call_function" and _is_torch_function(node.target):
        f = node.target
        view = _name(f) in _VIEWS or f is operator.getitem
        view = view or (f is getattr and len(node.args) > 1 and node.args[1] in _VIEWS)
        return [first] if view and first is not None else []
    elif node.op in ("placeholder", "get_attr", "output"):
        return []
    return list(node.all_input_nodes)  # a leaf module or function we do not know: assume it may


def _groups(gm: fx.GraphModule, graph: fx.Graph) -> dict[fx.Node, fx.Node]:
    """Node -> a representative of the nodes that may share its memory."""
    root: dict[fx.Node, fx.Node] = {}

    def find(n: fx.Node) -> fx.Node:
        while root.setdefault(n, n) is not n:
            n = root[n]
        return n

    for node in graph.nodes:
        for p in _alias_parents(gm, node):
            root[find(node)] = find(p)
    return {n: find(n) for n in graph.nodes}


def _out_of_place(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Rewrite an in-place ``node`` to its out-of-place form; False when there is none."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if next(module.parameters(), None) is not None or next(module.buffers(), None) is not None:
            return False
        clone = copy.deepcopy(module)  # the user's module (shared with the model) keeps its flag
        clone.inplace = False
        name = next(
            f"_out_of_place_{i}"
            for i in range(len(gm._modules) + 1)
            if not hasattr(gm, f"_out_of_place_{i}")
        )
        gm.add_submodule(name, clone)
        node.target = name
    elif node.op == "call_method":
        if not (_inplace_name(node.target) and hasattr(torch.Tensor, node.target[:-1])):
            return False
        node.target = node.target[:-1]
    elif node.target in _INPLACE_OPERATORS:
        node.target = _INPLACE_OPERATORS[node.target]
    elif _inplace_name(name := _name(node.target)) and _is_torch_function(node.target):
        for space in (torch, F):
            if getattr(space, name, None) is node.target and hasattr(space, name[:-1]):
                node.target = getattr(space, name[:-1])
                return True
        return False
    elif node.kwargs.get("inplace") is True:
        node.kwargs = {**node.kwargs, "inplace": False}
    elif (b := _bound(node)) is not None and b.arguments.get("inplace") is True:
        b.arguments["inplace"] = False
        node.args, node.kwargs = b.args, b.kwargs
    else:
        return False
    return True


def _old_memory_read_later(gm: fx.GraphModule, graph: fx.Graph, mutation: fx.Node) -> bool:
    """Whether a node after ``mutation`` reads the mutated memory other than through its result."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    groups = _groups(gm, graph)
    group = groups[_mutated(gm, mutation)]
    through = {mutation}  # the mutation's result and its views
    for n in graph.nodes:
        if order[n] > order[mutation]:
            parents = _alias_parents(gm, n)
            if parents and all(p in through for p in parents):
                through.add(n)
    return any(
        order[user] > order[mutation] and user.op != "output"
        for n in graph.nodes
        if groups[n] is group and n not in through
        for user in n.users
        if user is not mutation
    )


def _keep_tapped_values(gm: fx.GraphModule) -> None:
    """Make the extractor return each tapped node's value as it was computed (see above)."""
    graphs = [getattr(gm, "train_graph", gm.graph), getattr(gm, "eval_graph", gm.graph)]
    for graph in {id(g): g for g in graphs}.values():
        _keep_graph_values(gm, graph)
    gm.recompile()


def _keep_graph_values(gm: fx.GraphModule, graph: fx.Graph) -> None:
    (output,) = (n for n in graph.nodes if n.op == "output")
    while True:
        order = {n: i for i, n in enumerate(graph.nodes)}
        groups = _groups(gm, graph)
        hazard = next(
            (
                (tapped, node)
                for tapped in output.all_input_nodes
                for node in graph.nodes
                if order[node] > order[tapped]
                and (m := _mutated(gm, node)) is not None
                and groups[m] is groups[tapped]
            ),
            None,
        )
        if hazard is None:
            return
        tapped, mutation = hazard
        if not _old_memory_read_later(gm, graph, mutation) and _out_of_place(gm, mutation):
            continue
        with graph.inserting_after(tapped):
            kept = graph.call_method("clone", (tapped,))
        output.replace_input_with(tapped, kept)


class Tap(nn.Module):
    """A model cut down to the chosen nodes, fed uint8 pixels.

    Calling it with ``pixels`` (N, 3, S, S) uint8 returns ``{node: (N, C, H, W) or (N, C)}`` float32
    activations: the pixels are scaled to [0, 1], normalized with the model's mean/std and the model
    runs on chunks of ``chunk_size(device)`` images, the last one padded (the padding rows are dropped
    from the output), so that the output does not depend on the batch size. A tapped node's value is
    the one it had when computed, even when a later node changes it in place.
    ``layers`` may hold module names: torchvision resolves them by the rule of `module_outputs`,
    and the output keeps the names as given.
    ``views`` (`Layers.views`) names, for token, prefix (``@cls``) and channel-last nodes, the
    graph node to tap and how to turn its output into such a map.
    ``channels_last`` is the memory format the model runs in on CPU: ``None`` (the default) tries
    channels-last on the first chunk and keeps NCHW if the cut model cannot take it (see
    `run_channels_last`); ``True`` or ``False`` fixes it. The output is contiguous (NCHW) either way.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[str],
        mean,
        std,
        views: Mapping[str, View] | None = None,
        channels_last: bool | None = None,
    ):
        super().__init__()
        self.layers = list(layers)
        self.views = {n: views[n] for n in self.layers if n in (views or {})}
        tapped = list(dict.fromkeys(self.views[n].node if n in self.views else n for n in layers))
        self.extractor = create_feature_extractor(model.eval(), return_nodes=tapped)
        self.channels_last = channels_last  # None: settled by the first chunk on CPU
        _keep_tapped_values(self.extractor)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255)

    def forward(self, pixels: torch.Tensor, contiguous: bool = True) -> dict[str, torch.Tensor]:
        """Every tapped layer's float32 output for ``pixels`` (N, 3, S, S) uint8, contiguous (NCHW);
        with ``contiguous=False`` in the memory format the model gave (channels-last on CPU),
        which spares a transposing copy to callers that only index the maps (the second pass)."""
        n = pixels.shape[0]
        chunk = chunk_size(pixels.device)
        pad = -n % chunk
        x = (pixels.float() - self.mean) / self.std
        if pad:
            x = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))])
        outs = [self._extract(part) for part in x.split(chunk)]
        last = n - chunk * (len(outs) - 1)  # real images in the last chunk
        views, acts = self.views, {}
        for k in self.layers:
            node = views[k].node if k in views else k
            a = _rows(outs, node, last, contiguous)
            a = (views[k](a) if k in views else a).float()
            acts[k] = a.contiguous() if contiguous else a
        return acts

    def _extract(self, part: torch.Tensor) -> dict[str, torch.Tensor]:
        out, self.channels_last = run_channels_last(self.extractor, part, self.channels_last)
        return out


def run_channels_last(
    module: nn.Module, x: torch.Tensor, choice: bool | None
) -> tuple[Any, bool | None]:
    """``(module(x), choice)``, run on CPU in channels-last memory format unless ``choice`` is False.

    On CPU a forward runs 1.3-1.5x faster channels-last than NCHW (oneDNN's convolutions and
    pooling; AlexNet, VGG16, the embedded model; ResNet-50 1.1x). ``choice`` None tries it and, if
    the module cannot take it (a ``view`` that needs NCHW strides), runs NCHW: callers keep the
    returned choice, so that every later input runs the same way and the bits do not depend on the
    batch size. Elsewhere (CUDA...) ``x`` runs as it is and ``choice`` comes back unchanged.
    """
    if x.device.type != "cpu" or choice is False:
        return module(x), choice
    try:  # nn.Module's call: a torch.fx GraphModule's own prints the error to stderr first
        return nn.Module.__call__(module, x.contiguous(memory_format=torch.channels_last)), True
    except RuntimeError:
        if choice:  # chosen, or proven by an earlier input: a real error
            raise
        return module(x.contiguous()), False  # raises again if the format was not the cause


def _rows(
    outs: list[dict[str, torch.Tensor]], node: str, last: int, contiguous: bool = True
) -> torch.Tensor:
    """A node's output from every chunk, stacked, without the last chunk's padding rows,
    contiguous (else in the chunks' memory format)."""
    parts = [o[node] for o in outs]
    parts[-1] = parts[-1][:last]
    if not contiguous:
        return parts[0] if len(parts) == 1 else torch.cat(parts)
    if len(parts) == 1:
        return parts[0].contiguous()
    out = parts[0].new_empty((sum(len(p) for p in parts), *parts[0].shape[1:]))
    return torch.cat(parts, out=out)  # contiguous (NCHW) whatever the parts' format, in one copy
