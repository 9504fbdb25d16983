"""First-layer kernels as a picture: the RGB convolution's filters in a grid (AlexNet conv1 style).

Public names: first_rgb_conv, kernel_grid, filters.

    >>> from patchmine.filters import filters
    >>> filters("alexnet", "DEFAULT", "conv1.png")   # 64 kernels of 11 x 11 x 3, 8 x 8 grid
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from patchmine.errors import UsageError

__all__ = ["first_rgb_conv", "kernel_grid", "filters"]

NORMS = ("minmax", "symmetric")


def first_rgb_conv(module: nn.Module) -> tuple[str, nn.Conv2d]:
    """The first ``nn.Conv2d`` with 3 input channels (and no grouping), in module order.

    Raises:
        UsageError: the model has none (its first layer does not see RGB pixels).
    """
    convs = []
    for name, m in module.named_modules():
        if isinstance(m, nn.Conv2d):
            if m.in_channels == 3 and m.groups == 1:
                return name, m
            convs.append(f"{name or '<root>'} (in_channels={m.in_channels}, groups={m.groups})")
    seen = "; its convolutions: " + ", ".join(convs[:5]) if convs else "; it has no nn.Conv2d"
    raise UsageError(f"no convolution with 3 input channels (RGB) in the model{seen}")


def kernel_grid(
    weight: torch.Tensor | np.ndarray,
    scale: int | None = None,
    gap: int = 1,
    norm: str = "minmax",
    cols: int | None = None,
    gap_color: tuple[int, int, int] = (255, 255, 255),
) -> Image.Image:
    """Kernels (O, 3, kh, kw) as an RGB grid image.

    Each kernel is normalized on its own, over its three colors together: ``minmax`` maps its
    min..max to 0..255, ``symmetric`` maps -m..m to 0..255 with m its largest magnitude (0 is grey).
    Kernels are upscaled ``scale`` times with nearest neighbour and laid out ``cols`` wide
    (default ceil(sqrt(O))) with ``gap`` pixels between them.

    Returns:
        An image of width ``cols*kw*scale + (cols-1)*gap`` and height
        ``rows*kh*scale + (rows-1)*gap``, rows = ceil(O / cols).
    """
    w = weight.detach().float().cpu().numpy() if isinstance(weight, torch.Tensor) else weight
    w = np.asarray(w, dtype=np.float64)
    if w.ndim != 4 or w.shape[1] != 3:
        raise UsageError(f"expected kernels of shape (O, 3, kh, kw), got {tuple(w.shape)}")
    if norm not in NORMS:
        raise UsageError(f"unknown norm {norm!r}; choose one of {', '.join(NORMS)}")
    o, _, kh, kw = w.shape
    scale = scale or max(1, math.ceil(48 / max(kh, kw)))
    cols = cols or max(1, math.ceil(math.sqrt(o)))
    rows = max(1, math.ceil(o / cols))
    flat = w.reshape(o, -1)
    if norm == "minmax":
        lo, hi = flat.min(1), flat.max(1)
    else:
        hi = np.abs(flat).max(1)
        lo = -hi
    span = np.where(hi > lo, hi - lo, 1.0)
    img = (w - lo[:, None, None, None]) / span[:, None, None, None]
    img = np.where((hi > lo)[:, None, None, None], img, 0.5)
    img = np.clip(np.rint(img * 255), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)  # O,kh,kw,3
    img = img.repeat(scale, axis=1).repeat(scale, axis=2)
    th, tw = kh * scale, kw * scale
    canvas = np.empty((rows * th + (rows - 1) * gap, cols * tw + (cols - 1) * gap, 3), np.uint8)
    canvas[:] = gap_color
    for i in range(o):
        r, c = divmod(i, cols)
        y, x = r * (th + gap), c * (tw + gap)
        canvas[y : y + th, x : x + tw] = img[i]
    return Image.fromarray(canvas)


def filters(
    model: str | nn.Module,
    weights: str | None = None,
    out: str | os.PathLike | None = None,
    scale: int | None = None,
    norm: str = "minmax",
    input_size: int = 224,
) -> Image.Image:
    """Picture of a model's first RGB convolution's kernels, saved to ``out`` when given.

    Args:
        model: a name for `patchmine.models.load_model` (torchvision name, ``efficientnet_lite0``,
            ``file.py:factory``) or an ``nn.Module``.
        weights: as for ``load_model`` (``DEFAULT``, a weights name, ``none``, a checkpoint path).
        out: PNG path to write.
        scale, norm: see `kernel_grid`.

    Returns:
        The grid image; ``image.info["description"]`` says which layer and how many kernels.

    Raises:
        UsageError: the model has no RGB convolution, or ``out`` cannot be written.
    """
    if out is not None:
        out = Path(out)
        folder = out.parent if str(out.parent) else Path(".")
        if not folder.is_dir():
            raise UsageError(f"output folder does not exist: {folder}")
        if out.is_dir():
            raise UsageError(f"output is a folder, expected an image file path: {out}")
        if out.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"):
            raise UsageError(f"output needs an image suffix such as .png: {out}")
    if isinstance(model, nn.Module):
        module = model
    else:
        from patchmine.models import load_model

        module = load_model(model, weights, input_size).module
    name, conv = first_rgb_conv(module)
    im = kernel_grid(conv.weight, scale=scale, norm=norm)
    kh, kw = conv.kernel_size
    im.info["description"] = (
        f"{conv.out_channels} kernels {kh}x{kw}x3 from {name!r}, {im.width}x{im.height} px"
    )
    if out is not None:
        try:
            im.save(out)
        except OSError as e:
            raise UsageError(f"cannot write {out}: {e.strerror or e}") from None
    return im
