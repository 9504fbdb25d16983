"""Shared fixtures: small image corpora the tests make themselves, and tiny models."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image, ImageDraw

SHARED_CORPUS = Path(
    os.environ.get("PATCHMINE_SHARED_CORPUS")  # a worktree elsewhere can point at it
    or Path(__file__).resolve().parents[2] / "shared" / "corpus" / "imagenet-sample-500"
)


def make_image(seed: int, size: tuple[int, int]) -> Image.Image:
    """A structured picture (gradient, stripes, discs, boxes) that differs per seed."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    freq = rng.uniform(0.02, 0.2)
    stripes = 127 + 100 * np.sin(freq * (np.cos(angle) * xx + np.sin(angle) * yy))
    base = np.stack([stripes, (xx / max(w - 1, 1)) * 255, (yy / max(h - 1, 1)) * 255], -1)
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 6))):
        x0, y0 = rng.integers(0, w), rng.integers(0, h)
        r = int(rng.integers(3, max(4, min(w, h) // 3)))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.ellipse([x0 - r, y0 - r, x0 + r, y0 + r], fill=color)
        else:
            draw.rectangle([x0 - r, y0 - r, x0 + r, y0 + r], fill=color)
    return img


def write_corpus(folder: Path, n: int, seed: int = 0, duplicates: bool = True) -> Path:
    """``n`` images of varied sizes and formats; with ``duplicates`` two files are byte-identical
    copies (exact ties between images)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        w, h = int(rng.integers(40, 160)), int(rng.integers(40, 160))
        if i % 5 == 0:
            w = h = 64  # already input-sized: passes through
        img = make_image(seed * 1000 + i, (w, h))
        fmt = "png" if i % 3 else "jpg"
        img.save(folder / f"img_{i:03d}.{fmt}")
    if duplicates and n >= 4:
        (folder / "img_dup.png").write_bytes((folder / "img_001.png").read_bytes())
    return folder


TINY_NET = textwrap.dedent(
    """
    import torch
    import torch.nn as nn

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 6, 5, stride=2, padding=2)
            self.bn1 = nn.BatchNorm2d(6)
            self.pool = nn.MaxPool2d(3, stride=2, padding=1)
            self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
            self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
            self.head = nn.Linear(8, 5)

        def forward(self, x):
            x = self.pool(torch.relu(self.bn1(self.conv1(x))))
            y = torch.relu(self.conv2(x))
            y = y + self.conv3(y)
            return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))

    def build():
        torch.manual_seed(0)
        m = Tiny()
        with torch.no_grad():
            m.bn1.running_mean.uniform_(-0.2, 0.2)
            m.bn1.running_var.uniform_(0.5, 2.0)
        return m
    """
)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A model spec ``file.py:build`` for a small conv net with a residual add and a head."""
    path = tmp_path_factory.mktemp("models") / "tiny.py"
    path.write_text(TINY_NET)
    return f"{path}:build"


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"), 14)


def h5_datasets(path: Path) -> dict[str, np.ndarray]:
    """Every dataset of an HDF5 file by path (for whole-file comparisons)."""
    out: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as f:
        f.visititems(
            lambda name, obj: (
                out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None
            )
        )
    return out


def h5_attrs(path: Path) -> dict[str, dict]:
    """Every attribute of every object, minus the creation time and the allocator setting (the
    provenance of the process that wrote it; results never depend on it)."""
    out: dict[str, dict] = {}
    with h5py.File(path, "r") as f:

        def visit(name, obj):
            out[name] = {
                k: v for k, v in obj.attrs.items() if k not in ("created_utc", "allocator")
            }

        visit("/", f)
        f.visititems(visit)
    return out


def assert_same_file(a: Path, b: Path) -> None:
    """Identical datasets (NaN == NaN) and attributes, creation time aside: every dataset, the
    statistics and their exact integer state under ``stats/state`` included, bit for bit."""
    da, db = h5_datasets(a), h5_datasets(b)
    assert sorted(da) == sorted(db)
    for key in da:
        x, y = da[key], db[key]
        assert x.shape == y.shape, key
        if x.dtype.kind == "f":
            assert np.array_equal(x, y, equal_nan=True), key
        else:
            assert np.array_equal(x, y), key
    aa, ab = h5_attrs(a), h5_attrs(b)
    assert aa.keys() == ab.keys()
    for key in aa:
        assert aa[key].keys() == ab[key].keys(), key
        for attr in aa[key]:
            assert np.array_equal(np.asarray(aa[key][attr]), np.asarray(ab[key][attr])), (key, attr)
