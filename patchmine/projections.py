"""Projections: the backward signal of one unit onto the input pixels (ZFNet deconvnet, guided, gradient).

Public names: METHODS, check_method, Projector, ProjectionWarning, rectified_ops, cut_projections.

A projection is the derivative of one activation (node, channel, y, x of one image; the channel only
for an ``(N, C)`` node) with respect to the [0, 1] RGB input, through the normalization, with the
backward rule of every ReLU-family op (``nn.ReLU``, ``nn.ReLU6``, ``nn.Hardtanh(0, t)``, ``F.relu``,
``torch.relu``, ``relu_``, ``F.relu6``, ``F.hardtanh(x, 0, t)``, ``clamp(min=0)``, in place or not)
replaced per method:

- ``gradient``: unchanged (saliency).
- ``deconvnet`` (Zeiler & Fergus 2014): the backward passes ``relu(grad)`` whatever the forward input.
- ``guided`` (Springenberg et al. 2015): the op's own gradient where ``grad > 0``, else 0; on a ReLU
  that is "forward input > 0 and grad > 0" (on ReLU6 the saturation above 6 also blocks, as the
  classic hook-based implementation does).

Max-pooling routes to the forward argmax as autograd does; every other op keeps its gradient. The
rules live in a rewritten copy of the traced graph (the ReLU-family nodes call a custom autograd
Function; torchvision.ops leaf modules that contain such ops are retraced and rewritten the same
way): torch is not patched and the model is not touched.

Batching, per node (on the graph cut at that node): an image's entries are dealt into groups whose
receptive-field boxes are pairwise disjoint (one entry per group without boxes); an image with g
groups is stacked g / r times (rounded up) along the batch, and each backward seeds one group of
every copy: r rounds of backward per forward, r chosen to minimize copies * (1 + r). An image that
wins many channels thus does not make the other images of its batch run idle backwards (one shared
forward with one entry per image per round wasted 4-11x on AlexNet's winners).
``torch.autograd.grad(..., is_grads_batched=True)`` over the rounds was slower on CPU than this loop
(4.1 s vs 2.7 s for 8 rounds of AlexNet conv5, batch 8) and gives the same numbers.

Seeding a group together is exact, bit for bit: every unit a unit depends on has its field inside
the unit's box (the field is the union of its dependencies), so two units with disjoint boxes share
no unit at any layer; every unit's backward value in the shared pass is then computed from exactly
the values (and zeros) of the one-seed pass, and each entry's map is kept inside its own box. Nodes
behind an op whose statistics mix positions although the field analysis counts it element-wise
(GroupNorm, InstanceNorm, LayerNorm, batch statistics) never pack; whole-input fields always overlap.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn
from torchvision.models.feature_extraction import create_feature_extractor

from patchmine.errors import UnknownNameError
from patchmine.patches import cut_patches
from patchmine.taps import BATCH_MULTIPLE, run_channels_last

__all__ = [
    "METHODS",
    "check_method",
    "Projector",
    "ProjectionWarning",
    "rectified_ops",
    "cut_projections",
]

METHODS = ("gradient", "deconvnet", "guided")


def check_method(method: str | None) -> str | None:
    """A ``--projection`` value checked: one of ``METHODS``, or None for ``none`` (and None).

    Raises:
        UnknownNameError: any other name; the message lists the valid ones.
    """
    if method is None or method == "none":
        return None
    if method not in METHODS:
        raise UnknownNameError(
            f"unknown projection method {method!r}; valid: {', '.join(METHODS)}, none"
        )
    return method


class ProjectionWarning(UserWarning):
    """A method that changes nothing on this model (it has no ReLU-family op): it equals gradient."""


class _Rectify(torch.autograd.Function):
    """``clamp(x, lo, hi)`` forward; the deconvnet or guided rule backward."""

    @staticmethod
    def forward(ctx, x, lo, hi, guided):
        y = x.clamp(min=lo) if hi is None else x.clamp(lo, hi)
        ctx.guided = guided
        if guided:
            passes = x > lo if hi is None else (x > lo) & (x < hi)
            ctx.save_for_backward(passes)
        return y

    @staticmethod
    def backward(ctx, grad):
        g = grad.clamp(min=0)
        if ctx.guided:
            (passes,) = ctx.saved_tensors
            g = torch.where(passes, g, torch.zeros((), dtype=g.dtype, device=g.device))
        return g, None, None, None


def _rectify(x: torch.Tensor, lo: float, hi: float | None, guided: bool) -> torch.Tensor:
    return _Rectify.apply(x, lo, hi, guided)


class _RectifyModule(nn.Module):
    """Stands in for a ReLU-family module inside a leaf module that cannot be retraced."""

    def __init__(self, lo: float, hi: float | None, guided: bool):
        super().__init__()
        self.lo, self.hi, self.guided = lo, hi, guided

    def forward(self, x):
        return _rectify(x, self.lo, self.hi, self.guided)


# ReLU-family callables: parameter names (after the input), and whether they work in place
_FUNCTIONS = {
    torch.relu: ((), False),
    torch.relu_: ((), True),
    F.relu: (("inplace",), None),
    F.relu6: (("inplace",), None),
    F.hardtanh: (("min_val", "max_val", "inplace"), None),
    torch.clamp: (("min", "max"), False),
    torch.clip: (("min", "max"), False),
    torch.clamp_: (("min", "max"), True),
    torch.clip_: (("min", "max"), True),
    torch.clamp_min: (("min",), False),
    torch.clamp_min_: (("min",), True),
}
_METHODS = {
    "relu": ((), False),
    "relu_": ((), True),
    "clamp": (("min", "max"), False),
    "clip": (("min", "max"), False),
    "clamp_": (("min", "max"), True),
    "clip_": (("min", "max"), True),
    "clamp_min": (("min",), False),
    "clamp_min_": (("min",), True),
}
_DEFAULTS = {"inplace": False, "min_val": -1.0, "max_val": 1.0, "min": None, "max": None}


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _module_rule(mod: nn.Module) -> tuple[float, float | None] | None:
    """(lo, hi) of a ReLU-family module, else None."""
    if isinstance(mod, nn.ReLU):
        return 0.0, None
    if isinstance(mod, nn.Hardtanh) and mod.min_val == 0 and mod.max_val > 0:  # ReLU6 included
        return 0.0, float(mod.max_val)
    return None


def _call_rule(node: fx.Node) -> tuple[float, float | None, bool] | None:
    """(lo, hi, inplace) of a ReLU-family call_function / call_method node, else None."""
    table = _FUNCTIONS if node.op == "call_function" else _METHODS
    try:
        names, inplace = table.get(node.target, (None, None))
    except TypeError:  # an unhashable target
        return None
    if names is None or not node.args:
        return None
    bound = dict(_DEFAULTS)
    if node.target is F.relu6:
        bound.update(min_val=0.0, max_val=6.0)
    if node.target in (torch.relu, torch.relu_, F.relu, "relu", "relu_"):
        bound.update(min_val=0.0, max_val=None)
    if len(node.args) - 1 > len(names):
        return None
    bound.update(zip(names, node.args[1:], strict=False))
    for key, value in node.kwargs.items():
        if key not in names:
            return None
        bound[key] = value
    if "min" in names:
        lo, hi = bound["min"], bound["max"]
    else:
        lo, hi = bound["min_val"], bound["max_val"]
    if not _number(lo) or lo != 0 or not (hi is None or (_number(hi) and hi > 0)):
        return None
    if inplace is None:
        inplace = bound["inplace"]
        if not isinstance(inplace, bool):
            return None
    return 0.0, None if hi is None else float(hi), inplace


def _contains_rule(mod: nn.Module) -> bool:
    return any(_module_rule(m) is not None for m in mod.modules())


def _swapped(mod: nn.Module, guided: bool) -> tuple[nn.Module, int]:
    """A structural copy of ``mod`` whose ReLU-family submodules are rectifiers (params shared)."""
    rule = _module_rule(mod)
    if rule is not None:
        return _RectifyModule(*rule, guided), 1
    out = copy.copy(mod)
    out._modules = {}
    count = 0
    for name, child in mod._modules.items():
        if child is not None and _contains_rule(child):
            child, n = _swapped(child, guided)
            count += n
        out._modules[name] = child
    return out, count


def _rewritten_leaf(mod: nn.Module, guided: bool) -> tuple[nn.Module, int]:
    try:
        gm = fx.symbolic_trace(mod)
    except Exception:
        return _swapped(mod, guided)
    count = _rewrite(gm, guided)
    return gm, count


def _rewrite(gm: fx.GraphModule, guided: bool) -> int:
    """Replace the ReLU-family ops of ``gm`` (in place) by rectifiers; the number replaced."""
    graph = gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    count = 0
    for node in list(graph.nodes):
        rule = None
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            lohi = _module_rule(mod)
            if lohi is not None:
                rule = (*lohi, bool(getattr(mod, "inplace", False)))
            elif _contains_rule(mod):
                sub, n = _rewritten_leaf(mod, guided)
                name = f"_projection_{count}_{node.target.replace('.', '_')}"
                gm.add_submodule(name, sub)
                node.target = name
                count += n
                continue
        elif node.op in ("call_function", "call_method"):
            rule = _call_rule(node)
        if rule is None:
            continue
        lo, hi, inplace = rule
        source = node.args[0]
        if not isinstance(source, fx.Node):
            continue
        with graph.inserting_before(node):
            new = graph.call_function(_rectify, (source, lo, hi, guided))
        node.replace_all_uses_with(new)
        if inplace:  # later readers of the input saw the rectified values
            for user in list(source.users):
                if user is not new and order.get(user, -1) > order[node]:
                    user.replace_input_with(source, new)
        graph.erase_node(node)
        count += 1
    graph.lint()
    gm.recompile()
    return count


def rectified_ops(model: nn.Module, layers: Sequence[str]) -> int:
    """How many ReLU-family ops the deconvnet / guided rules change up to ``layers`` (graph node
    or module names)."""
    gm = create_feature_extractor(model.eval(), return_nodes=list(dict.fromkeys(layers)))
    return _rewrite(gm, guided=False)


class Projector:
    """Projections of single units of the chosen nodes, for one method.

    Args:
        model: the network (eval mode; it is neither modified nor patched).
        layers: FX node names, as the ``Tap`` takes them.
        mean, std: the model's normalization of [0, 1] RGB input.
        method: one of ``METHODS``.
        max_rows: most images (copies included) in one forward, which bounds memory.
        views: as the ``Tap`` takes them (`patchmine.taps.Layers.views`): for token, ``@cls`` and
            channel-last layers, the node to tap and how its output becomes the mined map.
        pack: seed entries with disjoint boxes in one backward (the same bits); False: one entry
            per backward, for comparisons.

    Attributes:
        n_modified: how many ReLU-family ops (call sites) the method changed before the deepest
            layer; 0 for gradient. A ``ProjectionWarning`` is issued when deconvnet or guided
            changes none.
        forwards, backwards: how many forward and backward passes ``project`` has run.

    Raises:
        KeyError: (``UnknownNameError``) an unknown method; the message lists the valid ones.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[str],
        mean,
        std,
        method: str,
        max_rows: int = 32,
        views: Mapping | None = None,
        pack: bool = True,
    ):
        if method not in METHODS:
            raise UnknownNameError(
                f"unknown projection method {method!r}; valid: {', '.join(METHODS)}"
            )
        self.model, self.method, self.layers = model.eval(), method, list(layers)
        self.max_rows = max(BATCH_MULTIPLE, max_rows - max_rows % BATCH_MULTIPLE)
        self.views = {n: views[n] for n in self.layers if n in (views or {})}
        self._graphs: dict[str, tuple[fx.GraphModule, int]] = {}
        self._packable: dict[str, bool] = {}
        self._channels_last: dict[str, bool | None] = {}  # each node's cut graph: as the Tap
        self.pack = pack
        self.n_modified = 0
        self.forwards = self.backwards = 0
        if method != "gradient":
            self.n_modified = rectified_ops(model, [self._tapped(n) for n in self.layers])
            if self.n_modified == 0:
                warnings.warn(
                    f"{type(model).__name__} has no ReLU-family op before {', '.join(self.layers)}: "
                    f"projection method {method} equals gradient there",
                    ProjectionWarning,
                    stacklevel=2,
                )
        device = next(model.parameters(), torch.empty(0)).device
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1) * 255

    def _tapped(self, node: str) -> str:
        """The graph node (or module) whose output is ``node``'s map, or holds it (a view)."""
        return self.views[node].node if node in self.views else node

    def _graph(self, node: str) -> fx.GraphModule:
        """The graph cut at ``node`` (only its ancestors run), with the method's rules."""
        if node not in self.layers:
            raise UnknownNameError(f"node {node!r} is not one of the projector's {self.layers}")
        if node not in self._graphs:
            gm = create_feature_extractor(self.model, return_nodes=[self._tapped(node)])
            n = _rewrite(gm, guided=self.method == "guided") if self.method != "gradient" else 0
            self._graphs[node] = (gm, n)
        return self._graphs[node][0]

    def modified(self, node: str) -> int:
        """How many ReLU-family ops the method changed on the way to ``node`` (0 for gradient)."""
        self._graph(node)
        return self._graphs[node][1]

    def packable(self, node: str) -> bool:
        """Whether entries of ``node`` with disjoint boxes may share a backward: False when an op
        before it normalizes with statistics over positions (`_MIXING`), or without ``pack``."""
        if node not in self._packable:
            gm = self._graph(node)
            self._packable[node] = not any(_mixes(m) for m in gm.modules())
        return self.pack and self._packable[node]

    def _forward(self, pixels: torch.Tensor, node: str):
        """(leaf, scale, node output) of a forward that keeps its graph; call with grad enabled."""
        n = pixels.shape[0]
        if pixels.dtype == torch.uint8:
            leaf = pixels.float().requires_grad_(True)  # a fresh tensor, never an inference one
            scale, base = 255.0, leaf
        else:
            leaf = pixels.clone().float().requires_grad_(True)
            scale, base = 1.0, leaf * 255
        x = (base - self.mean.to(pixels.device)) / self.std.to(pixels.device)
        pad = -n % BATCH_MULTIPLE  # as the Tap pads: kernels pick code paths by batch size
        if pad:
            x = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))])
        out, self._channels_last[node] = run_channels_last(
            self._graph(node), x, self._channels_last.get(node)
        )
        out = out[self._tapped(node)]
        return leaf, scale, self.views[node](out) if node in self.views else out

    def activations(self, pixels: torch.Tensor, node: str) -> torch.Tensor:
        """The node's output through the rewritten graph (the Tap's values), detached."""
        with torch.inference_mode(False), torch.no_grad():
            return self._forward(pixels, node)[2][: pixels.shape[0]].detach()

    def project(
        self,
        pixels: torch.Tensor,
        node: str,
        rows: Sequence[int] | np.ndarray,
        channels: Sequence[int] | np.ndarray,
        yx: np.ndarray | None = None,
        boxes: np.ndarray | None = None,
    ) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """Projections of entries of one node, computed a round of entries per backward.

        An image's entries are dealt, in order, into groups of pairwise disjoint ``boxes`` (one
        entry per group without boxes); an image with ``g`` groups is forwarded ``ceil(g / r)``
        times (copies stacked along the batch, at most ``max_rows`` rows per forward) and each
        backward seeds one group per copy; ``r`` minimizes ``copies * (1 + r)`` (a backward costs
        about a forward), so an image that wins many channels does not make every other image of
        the batch run idle backwards. The maps are the same bits as one backward per entry.

        Args:
            pixels: (B, 3, S, S) uint8 (0-255), or float in [0, 1]. Works under ``inference_mode``.
            node: one of the projector's layers.
            rows: (M,) the image of each entry (its row in ``pixels``).
            channels: (M,) the channel of each entry.
            yx: (M, 2) feature-map locations for an (N, C, H, W) node; ignored for (N, C).
            boxes: (M, 4) the entries' fields ``(y0, x0, y1, x1)`` as `patchmine.geometry.boxes`
                gives them (not clipped; whole-input for an (N, C) node), or None: one entry per
                backward.

        Yields:
            ``(index, maps)``: index (m,) int64 positions in the entries, maps (m, 3, S, S) float32
            on the pixels' device, d activation / d [0, 1] input, 0 outside the entry's field
            (with ``boxes``, set to exactly 0 there).
        """
        self._graph(node)
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        channels = np.asarray(channels, dtype=np.int64).reshape(-1)
        if len(rows) == 0:
            return
        if rows.min() < 0 or rows.max() >= pixels.shape[0]:
            raise IndexError(f"rows must lie in [0, {pixels.shape[0]})")
        if yx is not None:
            yx = np.asarray(yx, dtype=np.int64).reshape(-1, 2)
        if boxes is not None:
            boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
            if len(boxes) != len(rows):
                raise ValueError(f"{len(boxes)} boxes for {len(rows)} entries")
        copy_of, round_of = _pack(rows, boxes if self.packable(node) else None, self.max_rows)
        n_copies = int(copy_of.max()) + 1
        for lo in range(0, n_copies, self.max_rows):
            in_chunk = np.flatnonzero((copy_of >= lo) & (copy_of < lo + self.max_rows))
            copy_rows = np.zeros(min(self.max_rows, n_copies - lo), dtype=np.int64)
            copy_rows[copy_of[in_chunk] - lo] = rows[in_chunk]  # the image of each copy
            yield from self._chunk(
                pixels[torch.from_numpy(copy_rows).to(pixels.device)],
                node,
                in_chunk,
                copy_of[in_chunk] - lo,
                round_of[in_chunk],
                channels[in_chunk],
                None if yx is None else yx[in_chunk],
                None if boxes is None else boxes[in_chunk],
            )

    def _chunk(self, stacked, node, entry, copy_of, round_of, channels, yx, boxes):
        # the grad-mode contexts close before each yield, or they would leak into the caller
        with torch.inference_mode(False), torch.enable_grad():
            leaf, scale, act = self._forward(stacked, node)
        self.forwards += 1
        if act.ndim == 4:
            if yx is None:
                raise ValueError(f"node {node!r} is (N, C, H, W): entries need yx")
            unit = [copy_of, channels, yx[:, 0], yx[:, 1]]
        elif act.ndim == 2:
            unit = [copy_of, channels]
        else:
            raise ValueError(f"node {node!r} has {act.ndim}-D output; projections need 2-D or 4-D")
        device = act.device
        rounds = int(round_of.max()) + 1
        for r in range(rounds):
            where = np.flatnonzero(round_of == r)
            if act.ndim == 2 and len(np.unique(copy_of[where])) < len(where):
                raise ValueError(f"node {node!r} is (N, C): its entries' boxes cannot be disjoint")
            with torch.inference_mode(False), torch.enable_grad():
                seed = torch.zeros_like(act)
                seed[tuple(torch.from_numpy(u[where]).to(device) for u in unit)] = 1
                (grad,) = torch.autograd.grad(act, leaf, seed, retain_graph=r < rounds - 1)
                maps = grad[torch.from_numpy(copy_of[where]).to(device)]
                if scale != 1:
                    maps.mul_(scale)
                if boxes is not None:  # the other entries of the copy lie outside the box
                    maps = torch.where(_inside(boxes[where], maps.shape[-2:], device), maps, 0.0)
            self.backwards += 1
            yield entry[where], maps

    def project_all(
        self,
        pixels: torch.Tensor,
        node: str,
        rows: Sequence[int] | np.ndarray,
        channels: Sequence[int] | np.ndarray,
        yx: np.ndarray | None = None,
        boxes: np.ndarray | None = None,
    ) -> torch.Tensor:
        """Every entry's projection gathered: (M, 3, S, S) float32, in the order of ``rows``."""
        out = torch.zeros((len(rows), 3, *pixels.shape[-2:]), device=pixels.device)
        for index, maps in self.project(pixels, node, rows, channels, yx, boxes):
            out[torch.from_numpy(index).to(out.device)] = maps
        return out


# statistics over positions, which the field analysis counts as element-wise
_MIXING = (nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)
_MIXING_CALLS = {
    F.group_norm, F.layer_norm, F.instance_norm, F.batch_norm, torch.group_norm,
    torch.layer_norm, torch.instance_norm, torch.batch_norm,
}  # fmt: skip


def _mixes(mod: nn.Module) -> bool:
    """Whether ``mod`` (or its graph, for a GraphModule) normalizes with statistics over positions."""
    if isinstance(mod, _MIXING):
        return True
    if isinstance(mod, nn.modules.batchnorm._BatchNorm):
        return mod.training or mod.running_mean is None
    if isinstance(mod, fx.GraphModule):
        for n in mod.graph.nodes:
            try:
                if n.op == "call_function" and n.target in _MIXING_CALLS:
                    return True
            except TypeError:  # an unhashable target
                continue
            if n.op == "call_method" and n.target in ("group_norm", "layer_norm", "instance_norm"):
                return True
    return False


def _inside(box: np.ndarray, hw, device) -> torch.Tensor:
    """(m, 1, H, W) bool: the pixels inside each half-open box ``(y0, x0, y1, x1)``."""
    b = torch.from_numpy(box).to(device)
    ys = torch.arange(hw[0], device=device)
    xs = torch.arange(hw[1], device=device)
    in_y = (ys >= b[:, 0:1]) & (ys < b[:, 2:3])
    in_x = (xs >= b[:, 1:2]) & (xs < b[:, 3:4])
    return (in_y[:, :, None] & in_x[:, None, :])[:, None]


def _groups(rows: np.ndarray, boxes: np.ndarray | None) -> np.ndarray:
    """Each entry's group within its image: first fit in entry order into a group whose boxes are
    all disjoint from its own (without boxes, the entry's rank within its image)."""
    group = np.empty(len(rows), dtype=np.int64)
    for image in np.unique(rows):
        at = np.flatnonzero(rows == image)
        if boxes is None:
            group[at] = np.arange(len(at))
            continue
        b = boxes[at]
        overlap = (
            (b[:, None, 0] < b[None, :, 2])
            & (b[None, :, 0] < b[:, None, 2])
            & (b[:, None, 1] < b[None, :, 3])
            & (b[None, :, 1] < b[:, None, 3])
        )
        mine = np.empty(len(at), dtype=np.int64)
        for j in range(len(at)):
            taken = np.zeros(j + 1, dtype=bool)
            taken[mine[:j][overlap[j, :j]]] = True
            mine[j] = int(np.argmin(taken))  # the first group with no overlapping box
        group[at] = mine
    return group


def _pack(
    rows: np.ndarray, boxes: np.ndarray | None = None, max_rows: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Deal entries into (copy, round): each copy holds one image, each round one group per copy
    (`_groups`: entries with pairwise disjoint boxes; one entry without boxes).

    The rounds r minimize the rows run times (1 + r): the copies, or with ``max_rows`` the rows
    of the forwards as ``project`` pads them (chunks of ``max_rows``, the last one padded to a
    multiple of ``BATCH_MULTIPLE``), so that fewer copies count only where they save rows.

    Returns:
        copy_of (M,), round_of (M,): copies numbered image by image (an image's copies adjacent).
    """
    rank = _groups(rows, boxes)  # 0 for an image's first group, 1, 2, ...
    _, image_of = np.unique(rows, return_inverse=True)
    counts = np.zeros(int(image_of.max()) + 1, dtype=np.int64)  # groups per image
    np.maximum.at(counts, image_of, rank + 1)

    def run(copies: int) -> int:
        if max_rows is None:
            return copies
        full, rest = divmod(copies, max_rows)
        return full * max_rows + -(-rest // BATCH_MULTIPLE) * BATCH_MULTIPLE

    # rows * (1 + r): a forward of each copy plus r backward rounds over it
    best = min(
        range(1, int(counts.max()) + 1),
        key=lambda r: (run(int(np.sum(-(-counts // r)))) * (1 + r), r),
    )
    copies = -(-counts // best)
    start = np.concatenate([[0], np.cumsum(copies)[:-1]])
    copy_of = start[image_of] + rank // best
    round_of = rank % best
    return copy_of.astype(np.int64), round_of.astype(np.int64)


def cut_projections(maps: torch.Tensor, box: np.ndarray, patch_size: int) -> np.ndarray:
    """Cut each projection to its entry's box exactly as ``cut_patches`` cuts the pixels.

    Args:
        maps: (M, 3, S, S) float projections over the whole input.
        box: (M, 4) int y0, x0, y1, x1 half-open boxes (``geometry.boxes``), all of one size.
        patch_size: P; larger boxes are resampled to P x P as the patches are.

    Returns:
        (M, h, w, 3) float16 for boxes that fit in P (h x w the box), else (M, P, P, 3); 0 outside
        the input.
    """
    rows = np.arange(len(maps))
    cut = cut_patches(maps.detach().float().cpu(), rows, np.asarray(box), patch_size, (0, 0, 0))
    return cut.to(torch.float16).numpy()
