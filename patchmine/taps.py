"""Activations of named graph nodes, via torchvision's FX feature extraction.

Public names: layer_names, node_shapes, output_shapes, resolve_layers, default_layers, Layers,
select_layers, Tap.

Layer names are the dotted FX node names torchvision's ``get_graph_node_names`` reports (``features.3``,
``layer1.0.relu_1``, ``add_3``), never re-joined with ``_``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from patchmine.errors import UnknownNameError, UsageError, nearest
from patchmine.receptive import Field

if TYPE_CHECKING:
    from patchmine.tokens import View

__all__ = [
    "layer_names",
    "node_shapes",
    "output_shapes",
    "resolve_layers",
    "default_layers",
    "Layers",
    "select_layers",
    "Tap",
]

# Batches are padded to a multiple of this many images before the forward pass: CPU kernels pick code
# paths by batch size, so an unpadded forward could change an activation's last bits with the batch
# size, and with it the result file. PyTorch runs a float32 1x1 convolution single-threaded with its
# native kernel below a batch of 16 and with oneDNN from 16 on (ATen's ConvParams::use_mkldnn), and
# the two sum in different orders: 16, not 8, so that every forward takes the oneDNN path.
BATCH_MULTIPLE = 16


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


def resolve_layers(shapes: dict[str, tuple[int, ...]], layers: Sequence[str]) -> list[str]:
    """Check layer names against the minable nodes; the error lists the nearest valid names."""
    if not layers:
        raise UsageError("no layers given")
    out = []
    for name in layers:
        if name not in shapes:
            hint = ", ".join(nearest(name, shapes)) or "run `patchmine layers MODEL` to list them"
            raise UnknownNameError(f"unknown layer {name!r}; nearest: {hint}")
        if name not in out:
            out.append(name)
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
        names: node names, as given (duplicates dropped) or the defaults.
        shapes: node -> per-image shape of the mined map, (C, H, W) or (C,).
        fields: node -> its receptive field (with its layout, token grid and prefix tokens).
        views: node -> `patchmine.tokens.View`, for the token, ``@cls`` and channel-last nodes
            whose tapped output must be turned into that map (see `Tap`).
    """

    names: list[str]
    shapes: dict[str, tuple[int, ...]]
    fields: dict[str, Field]
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
    """Check the asked-for nodes (or pick the defaults) and learn their shapes and fields.

    Token nodes (N, T, D) and their ``@cls`` prefix nodes, and channel-last nodes, are offered
    beside (N, C, H, W) and (N, C) nodes (see `patchmine.tokens.minable`).

    Args:
        model: the network (traced and run once on a zero input for shapes, once for fields).
        input_size: the square input side.
        layers: node names; ``None`` or empty for ``defaults``, else `default_layers`.
        defaults: the model's own default nodes (see ``LoadedModel.default_layers``).

    Raises:
        UnknownNameError: a name that is not a minable node (the nearest ones are listed).
        UsageError: a node whose receptive field cannot be represented (naming where it was lost),
            or whose token grid cannot be found.
    """
    from patchmine.tokens import minable  # tokens builds on this module's output_shapes

    found = minable(model, input_size)
    found.check(layers or ())  # a node that exists but cannot be mined: one line saying why
    if layers:
        names = resolve_layers(found.shapes, layers)
    else:
        names = list(defaults) or default_layers(found.shapes)
    return Layers(
        names,
        {n: found.shapes[n] for n in names},
        {n: found.fields[n] for n in names},
        {n: found.views[n] for n in names if n in found.views},
    )


class Tap(nn.Module):
    """A model cut down to the chosen nodes, fed uint8 pixels.

    Calling it with ``pixels`` (N, 3, S, S) uint8 returns ``{node: (N, C, H, W) or (N, C)}`` float32
    activations: the pixels are scaled to [0, 1], normalized with the model's mean/std and the batch
    is padded to a multiple of ``BATCH_MULTIPLE`` (the padding rows are dropped from the output).
    ``views`` (`Layers.views`) names, for token, prefix (``@cls``) and channel-last nodes, the
    graph node to tap and how to turn its output into such a map.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[str],
        mean,
        std,
        views: Mapping[str, View] | None = None,
    ):
        super().__init__()
        self.layers = list(layers)
        self.views = {n: views[n] for n in self.layers if n in (views or {})}
        tapped = list(dict.fromkeys(self.views[n].node if n in self.views else n for n in layers))
        self.extractor = create_feature_extractor(model.eval(), return_nodes=tapped)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255)

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        n = pixels.shape[0]
        pad = -n % BATCH_MULTIPLE
        x = (pixels.float() - self.mean) / self.std
        if pad:
            x = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))])
        out = self.extractor(x)
        views = self.views
        return {
            k: (views[k](out[views[k].node][:n]) if k in views else out[k][:n]).float()
            for k in self.layers
        }
