"""First-layer kernel pictures."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from patchmine.errors import UsageError
from patchmine.filters import filters, first_rgb_conv, kernel_grid


def test_alexnet_conv1_grid(tmp_path):
    out = tmp_path / "conv1.png"
    im = filters("alexnet", "none", out)
    # torchvision's AlexNet conv1: 64 kernels of 11 x 11 x 3 -> 8 x 8 grid, scale 5, 1-px gaps
    scale = 5
    side = 8 * 11 * scale + 7
    assert im.size == (side, side)
    assert Image.open(out).size == (side, side)
    assert "64 kernels 11x11x3" in im.info["description"]
    a = np.asarray(im)
    # gaps are the gap color, kernels span the full range each (per-kernel min/max)
    assert (a[11 * scale] == 255).all() and (a[:, 11 * scale] == 255).all()
    k0 = a[: 11 * scale, : 11 * scale]
    assert k0.min() == 0 and k0.max() == 255


def test_kernel_grid_values_and_layout():
    w = torch.zeros(5, 3, 2, 3)
    w[0, 0, 0, 0] = 1.0  # kernel 0: one bright red weight
    w[1] = -1.0
    w[1, 2, 1, 2] = 1.0  # kernel 1: one bright blue weight on dark
    im = kernel_grid(w, scale=2, gap=1, gap_color=(9, 9, 9))
    # 5 kernels -> 3 columns, 2 rows; kernel 2 x 3 at scale 2 -> 4 x 6 tiles
    assert im.size == (3 * 6 + 2, 2 * 4 + 1)
    a = np.asarray(im)
    assert tuple(a[0, 0]) == (255, 0, 0) and tuple(a[1, 1]) == (255, 0, 0)
    assert tuple(a[0, 2]) == (0, 0, 0)
    assert tuple(a[2, 7 + 4]) == (0, 0, 255)  # kernel 1 starts at x = 6 + gap
    assert (a[:, 6] == 9).all()  # the gap
    assert (a[5:, 14:] == 9).all()  # the unused 6th cell is gap color
    sym = np.asarray(kernel_grid(w, scale=1, norm="symmetric"))
    assert tuple(sym[0, 1]) == (128, 128, 128)  # zero is grey
    flat = np.asarray(kernel_grid(torch.zeros(1, 3, 2, 2)))
    assert (flat == 128).all()  # a constant kernel is grey, not NaN


def test_first_rgb_conv_skips_other_convs():
    m = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Conv2d(3, 3, 3, groups=3), nn.Conv2d(3, 8, 5))
    name, conv = first_rgb_conv(m)
    assert name == "2" and conv.out_channels == 8


def test_model_without_rgb_conv_is_refused(tmp_path):
    src = tmp_path / "gray.py"
    src.write_text(
        "from torch import nn\n"
        "def build():\n"
        "    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4, 2))\n"
    )
    with pytest.raises(UsageError, match="no convolution with 3 input channels"):
        filters(f"{src}:build", "none", tmp_path / "x.png")
    with pytest.raises(UsageError, match="no nn.Conv2d"):
        filters(nn.Sequential(nn.Linear(3, 2)))
    assert not (tmp_path / "x.png").exists()


def test_filters_cli(tmp_path, capsys):
    from patchmine.cli import main

    base = ["filters", "alexnet", "--weights", "none"]
    out = tmp_path / "f.png"
    assert main([*base, "--out", str(out), "--scale", "2", "--norm", "symmetric"]) == 0
    assert Image.open(tmp_path / "f.png").size == (8 * 22 + 7, 8 * 22 + 7)
    capsys.readouterr()
    assert main([*base, "--out", str(tmp_path / "missing" / "f.png")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "does not exist" in err
