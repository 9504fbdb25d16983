"""Activations of named graph nodes, via torchvision's FX feature extraction.

Public names: layer_names, node_shapes, output_shapes, resolve_layers, default_layers, Tap.

Layer names are the dotted FX node names torchvision's ``get_graph_node_names`` reports (``features.3``,
``layer1.0.relu_1``, ``add_3``), never re-joined with ``_``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from patchmine.errors import UnknownNameError, UsageError, nearest

__all__ = ["layer_names", "node_shapes", "output_shapes", "resolve_layers", "default_layers", "Tap"]

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


class Tap(nn.Module):
    """A model cut down to the chosen nodes, fed uint8 pixels.

    Calling it with ``pixels`` (N, 3, S, S) uint8 returns ``{node: (N, C, H, W) or (N, C)}`` float32
    activations: the pixels are scaled to [0, 1], normalized with the model's mean/std and the batch
    is padded to a multiple of ``BATCH_MULTIPLE`` (the padding rows are dropped from the output).
    ``views`` (from `patchmine.tokens.minable`) names, for token, prefix (``@cls``) and channel-last
    nodes, the graph node to tap and how to turn its output into such a map.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str], mean, std, views=None):
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
