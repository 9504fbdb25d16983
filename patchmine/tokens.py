"""Token and channel-last nodes: which nodes a model offers for mining, and how each is cut out.

Public names: CLS_SUFFIX, View, Minable, minable.

A transformer over image patches outputs (N, T, D) tokens, T = p + h*w: p prefix tokens (class,
distillation, registers) and the h x w patch grid of its patch embedding. Such a node is mined as D
channels over the h x w grid, and its prefix tokens as the separate node ``<node>@cls`` (an (N, D)
node; (N, D, 1, p) when p > 1). A channel-last node (N, H, W, C) (Swin) is mined as (N, C, H, W).
The grid comes from the model itself: `patchmine.receptive` follows the patch embedding's conv
output through the reshape that flattens it into tokens and the concatenation that puts the class
token in front; nothing here knows model names. The `View` of a node turns the tapped output into
the (N, C, H, W) or (N, C) map the collectors take, so that top-k, statistics and the second pass are
the same code for every model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from patchmine.errors import UsageError
from patchmine.receptive import Field, receptive_fields
from patchmine.taps import output_shapes

__all__ = ["CLS_SUFFIX", "View", "Minable", "minable"]

CLS_SUFFIX = "@cls"


@dataclass(frozen=True)
class View:
    """How one mined node is cut from the output of the graph node ``node``.

    Attributes:
        node: the FX node whose output is tapped.
        layout: ``"nhwc"`` (N, H, W, C) -> (N, C, H, W); ``"tokens"`` (N, T, D) -> (N, D, h, w),
            the grid tokens; ``"prefix"`` (N, T, D) -> (N, D), the prefix tokens ((N, D, 1, p) for
            p > 1).
        prefix: the number p of prefix tokens.
        grid: ``(h, w)`` of the patch grid (tokens).
    """

    node: str
    layout: str
    prefix: int = 0
    grid: tuple[int, int] = (0, 0)

    def __call__(self, out: torch.Tensor) -> torch.Tensor:
        """The mined map of a batch: ``out`` as the node gives it -> (N, C, H, W) or (N, C)."""
        if self.layout == "nhwc":
            return out.permute(0, 3, 1, 2).contiguous()
        n, _, d = out.shape
        if self.layout == "tokens":
            return out[:, self.prefix :].transpose(1, 2).reshape(n, d, *self.grid).contiguous()
        if self.prefix == 1:
            return out[:, 0].contiguous()
        return out[:, : self.prefix].transpose(1, 2).unsqueeze(2).contiguous()


@dataclass
class Minable:
    """The nodes of a model that can be mined, with their (C, H, W) / (C,) shapes and fields.

    Attributes:
        shapes: mined name -> per-image shape of the mined map, in graph order.
        fields: mined name -> receptive field, with its ``layout`` (and ``grid``, ``prefix``).
        views: mined name -> `View`, for the nodes whose output is not already (N, C, H, W) / (N, C).
    """

    shapes: dict[str, tuple[int, ...]]
    fields: dict[str, Field]
    views: dict[str, View]
    model: nn.Module
    input_size: int
    outputs: dict[str, tuple[int, ...]]

    def check(self, names: Sequence[str]) -> None:
        """Raise ``UsageError`` naming the first node of ``names`` that exists but cannot be
        mined (its field is lost, its token grid cannot be found); unknown names pass."""
        for name in names:
            if name in self.shapes:
                continue
            base = name.removesuffix(CLS_SUFFIX)
            if base != name and base in self.shapes:
                raise UsageError(
                    f"node {base!r} has no prefix (class) tokens: there is no {name!r}"
                )
            if base in self.outputs:
                receptive_fields(self.model, self.input_size, [base])  # raises, saying why
                raise UsageError(
                    f"node {base!r} outputs {'x'.join(map(str, self.outputs[base]))} per image, "
                    "which is not a grid patchmine mines ((N, C, H, W), (N, H, W, C), (N, T, D) "
                    "or (N, C))"
                )


def minable(model: nn.Module, input_size: int) -> Minable:
    """Every node of ``model`` that can be mined at ``input_size``, token and prefix nodes included.

    Example:
        >>> m = minable(torchvision.models.vit_b_16(), 224)
        >>> m.shapes["encoder.ln"], m.shapes["encoder.ln@cls"], m.fields["encoder.ln"].grid
        ((768, 14, 14), (768,), (14, 14))
    """
    outputs = output_shapes(model, input_size)
    shapes: dict[str, tuple[int, ...]] = {}
    fields: dict[str, Field] = {}
    views: dict[str, View] = {}
    for name, f in receptive_fields(model, input_size).items():
        s = outputs.get(name)
        if s is None:
            continue
        if f.layout == "nchw" and len(s) in (1, 3):
            shapes[name], fields[name] = s, f
        elif f.layout == "nhwc" and len(s) == 3:
            shapes[name], fields[name] = (s[2], s[0], s[1]), f
            views[name] = View(name, "nhwc")
        elif f.layout == "tokens" and len(s) == 2 and f.grid is not None:
            (h, w), p, d = f.grid, f.prefix, s[1]
            if s[0] != p + h * w:
                continue
            shapes[name], fields[name] = (d, h, w), f
            views[name] = View(name, "tokens", p, (h, w))
            if p:
                cls = name + CLS_SUFFIX
                shapes[cls] = (d,) if p == 1 else (d, 1, p)
                side = (input_size, input_size)
                fields[cls] = Field(side, side, (0, 0), whole=True, prefix=p)
                views[cls] = View(name, "prefix", p, (h, w))
    return Minable(shapes, fields, views, model, input_size, outputs)
