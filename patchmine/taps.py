"""Activations of named graph nodes, via torchvision's FX feature extraction.

Public names: layer_names, node_shapes, resolve_layers, default_layers, Layers, select_layers, Tap.

Layer names are the dotted FX node names torchvision's ``get_graph_node_names`` reports (``features.3``,
``layer1.0.relu_1``, ``add_3``), never re-joined with ``_``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from patchmine.errors import UnknownNameError, UsageError, nearest
from patchmine.receptive import Field, receptive_fields

__all__ = [
    "layer_names",
    "node_shapes",
    "resolve_layers",
    "default_layers",
    "Layers",
    "select_layers",
    "Tap",
]

# Batches are padded to a multiple of this many images before the forward pass: CPU kernels pick code
# paths by batch size (a batch of 1, or a GEMM row remainder), so an unpadded forward could change an
# activation's last bits with the batch size, and with it the result file.
BATCH_MULTIPLE = 8


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


@torch.inference_mode()
def node_shapes(model: nn.Module, input_size: int) -> dict[str, tuple[int, ...]]:
    """Per-image output shape of each node with a 4-D (N,C,H,W) or 2-D (N,C) tensor output."""
    names = layer_names(model)
    extractor = create_feature_extractor(model.eval(), return_nodes=names)
    device = next(model.parameters(), torch.empty(0)).device
    out = extractor(torch.zeros(2, 3, input_size, input_size, device=device))
    return {
        n: tuple(v.shape[1:])
        for n, v in out.items()
        if isinstance(v, torch.Tensor) and v.ndim in (2, 4) and v.shape[0] == 2
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
    """About ``count`` layers from early to late: the last node of each feature-map size."""
    last: dict[tuple[int, ...], str] = {}
    for name, shape in shapes.items():
        if len(shape) == 3 and shape[1] > 1:
            last[shape[1:]] = name
    picks = list(last.values())
    if len(picks) > count:
        step = (len(picks) - 1) / (count - 1)
        picks = [picks[round(i * step)] for i in range(count)]
    return picks


@dataclass(frozen=True)
class Layers:
    """The nodes a run mines, in order, with what the collectors and the file need of each.

    Attributes:
        names: node names, as given (duplicates dropped) or the defaults.
        shapes: node -> per-image output shape, (C, H, W) or (C,).
        fields: node -> its receptive field.
    """

    names: list[str]
    shapes: dict[str, tuple[int, ...]]
    fields: dict[str, Field]

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

    Args:
        model: the network (traced and run once on a zero input for shapes, once for fields).
        input_size: the square input side.
        layers: node names; ``None`` or empty for ``defaults``, else the last node of each map size.
        defaults: the model's own default nodes (see ``LoadedModel.default_layers``).

    Raises:
        UnknownNameError: a name that is not a minable node (the nearest ones are listed).
        UsageError: a node whose receptive field cannot be represented (naming where it was lost).
    """
    every = node_shapes(model, input_size)
    fields = receptive_fields(model, input_size)  # the nodes that have a field
    shapes = {n: s for n, s in every.items() if n in fields}
    for name in layers or ():
        if name in every and name not in fields:  # raises, saying where the field was lost
            receptive_fields(model, input_size, [name])
    if layers:
        names = resolve_layers(shapes, layers)
    else:
        names = list(defaults) or default_layers(shapes)
    return Layers(names, {n: shapes[n] for n in names}, {n: fields[n] for n in names})


class Tap(nn.Module):
    """A model cut down to the chosen nodes, fed uint8 pixels.

    Calling it with ``pixels`` (N, 3, S, S) uint8 returns ``{node: (N, C, H, W) or (N, C)}`` float32
    activations: the pixels are scaled to [0, 1], normalized with the model's mean/std and the batch
    is padded to a multiple of ``BATCH_MULTIPLE`` (the padding rows are dropped from the output).
    """

    def __init__(self, model: nn.Module, layers: Sequence[str], mean, std):
        super().__init__()
        self.layers = list(layers)
        self.extractor = create_feature_extractor(model.eval(), return_nodes=self.layers)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255)

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        n = pixels.shape[0]
        pad = -n % BATCH_MULTIPLE
        x = (pixels.float() - self.mean) / self.std
        if pad:
            x = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))])
        out = self.extractor(x)
        return {k: out[k][:n].float() for k in self.layers}
