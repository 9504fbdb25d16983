"""The second pass's patch cutting and scratch arrays: bit-identical to the per-patch reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from patchmine.patches import Scratch, SharedPatches, cut_patches


def reference_cut(pixels, rows, box, patch_size, fill):
    """The per-patch implementation the batched one replaced (kept as the specification)."""
    s = pixels.shape[-1]
    m = len(rows)
    h, w = int(box[0, 2] - box[0, 0]), int(box[0, 3] - box[0, 1])
    color = torch.tensor(fill, dtype=torch.uint8).view(3, 1, 1)
    if h <= patch_size and w <= patch_size:
        out = color.expand(m, 3, h, w).clone()
        for i, (r, (y0, x0, y1, x1)) in enumerate(zip(rows.tolist(), box.tolist(), strict=True)):
            sy0, sx0, sy1, sx1 = max(y0, 0), max(x0, 0), min(y1, s), min(x1, s)
            if sy1 > sy0 and sx1 > sx0:
                out[i, :, sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = pixels[r, :, sy0:sy1, sx0:sx1]
        return out.permute(0, 2, 3, 1)
    fy, fx = patch_size / h, patch_size / w
    used, where = np.unique(rows, return_inverse=True)
    small = F.interpolate(  # torch's uint8 kernel, as torchvision's Resize on uint8 tensors
        pixels[torch.from_numpy(used)].contiguous(memory_format=torch.channels_last),
        size=(max(1, round(s * fy)), max(1, round(s * fx))),
        mode="bilinear",
        antialias=True,
        align_corners=False,
    )
    sh, sw = small.shape[-2:]
    out = color.expand(m, 3, patch_size, patch_size).clone()
    for i, (u, y0, x0) in enumerate(
        zip(where.tolist(), box[:, 0].tolist(), box[:, 1].tolist(), strict=True)
    ):
        py, px = round(-y0 * fy), round(-x0 * fx)
        ty0, tx0 = max(py, 0), max(px, 0)
        ty1, tx1 = min(py + sh, patch_size), min(px + sw, patch_size)
        if ty1 > ty0 and tx1 > tx0:
            out[i, :, ty0:ty1, tx0:tx1] = small[u, :, ty0 - py : ty1 - py, tx0 - px : tx1 - px]
    return out.permute(0, 2, 3, 1)


@pytest.mark.parametrize(
    "size,box_hw,patch_size",
    [
        (32, (7, 7), 16),  # exact crops
        (32, (5, 9), 16),  # exact, not square
        (32, (16, 16), 16),  # exact, box == P
        (40, (23, 23), 12),  # resampled (odd scale)
        (40, (40, 40), 12),  # resampled, the whole image
        (33, (50, 31), 10),  # resampled, larger than the image, not square
        (224, (224, 224), 96),  # a whole-image field at the default patch size
    ],
)
def test_cut_patches_matches_reference(size, box_hw, patch_size):
    g = np.random.default_rng(sum(box_hw) * 1000 + size)
    pixels = torch.from_numpy(g.integers(0, 256, (5, 3, size, size), dtype=np.uint8))
    h, w = box_hw
    m = 300
    y0 = g.integers(-h - 6, size + 6, m)  # off every edge, partly and entirely
    x0 = g.integers(-w - 6, size + 6, m)
    y0[:8] = [-h - 5, size + 3, -h, size, 0, size - h, -1, size - h + 1]
    x0[:8] = [0, 2, size - w + 1, -w + 1, -w - 5, size + 9, size - w, -3]
    box = np.stack([y0, x0, y0 + h, x0 + w], 1).astype(np.int32)
    rows = g.integers(0, 5, m)
    rows[:5] = np.arange(5)
    fill = (124, 116, 104)
    want = reference_cut(pixels, rows, box, patch_size, fill)
    got = cut_patches(pixels, rows, box, patch_size, fill)
    assert got.shape == want.shape and got.dtype == torch.uint8
    assert torch.equal(got, want)
    nhwc = pixels.contiguous(memory_format=torch.channels_last)  # as the second pass holds them
    assert torch.equal(cut_patches(nhwc, rows, box, patch_size, fill), want)
    one = cut_patches(pixels, rows[:1], box[:1], patch_size, fill)  # a single patch
    assert torch.equal(one, want[:1])


@pytest.mark.parametrize("in_memory", [1 << 30, 0], ids=["memory", "file"])
def test_scratch_put_take_read(tmp_path, in_memory):
    shape = (4, 3, 5, 2)
    s = Scratch(tmp_path / "x", shape, np.float16, in_memory=in_memory)
    ref = np.zeros(shape, np.float16)
    g = np.random.default_rng(0)
    for entries in ([0, 1, 2, 7, 11], [5, 3], [10, 9, 8, 4, 6]):
        v = g.standard_normal((len(entries), 5, 2)).astype(np.float16)
        s.put(np.asarray(entries), v)
        ref.reshape(-1, 5, 2)[entries] = v
    for c in range(4):
        assert np.array_equal(s[c], ref[c])
    assert np.array_equal(s.take(np.asarray([11, 0, 6])), ref.reshape(-1, 5, 2)[[11, 0, 6]])
    s.close()


@pytest.mark.parametrize(("k", "size"), [(3, 6), (100, 64)], ids=["memory", "file"])
def test_shared_patches_read_as_the_array_they_stand_for(tmp_path, k, size):
    """Entries pointing at shared patches (and ones put on their own, as torchrun's rank 0 gets
    them) read back as a dense (C, k, P, P, 3) array; unset entries hold the fill color."""
    shape, fill = (4, k, size, size, 3), (124, 116, 104)  # file: over Scratch's 4 MB in memory
    s = SharedPatches(tmp_path / "x", shape, fill)
    assert (s._rows._array is None) == (size == 64)
    ref = np.broadcast_to(np.asarray(fill, np.uint8), shape).copy()
    flat = ref.reshape(-1, size, size, 3)
    g = np.random.default_rng(1)
    images = g.integers(0, 255, (3, size, size, 3), dtype=np.uint8)
    shared = np.asarray([0, 5, 2, k + 1, 3 * k])  # three images over five entries
    which = np.asarray([2, 0, 2, 1, 0])
    s.share(shared, which, images)
    flat[shared] = images[which]
    alone = np.asarray([4 * k - 1, 1])
    v = g.integers(0, 255, (2, size, size, 3), dtype=np.uint8)
    s.put(alone, v)
    flat[alone] = v
    for c in range(4):
        assert np.array_equal(s[c], ref[c])
    pick = np.asarray([5, 4 * k - 1, 4, 0])
    assert np.array_equal(s.take(pick), flat[pick])
    s.close()


def test_resampled_patch_is_pillows_resize():
    """A whole-image patch shrunk to P is what Pillow's bilinear resize gives, within one level."""
    from PIL import Image

    g = np.random.default_rng(3)
    smooth = F.interpolate(torch.from_numpy(g.random((1, 3, 28, 28))), size=(224, 224))
    pixels = (smooth * 255).round().to(torch.uint8)  # a photo-like image: smooth, with edges
    box = np.array([[0, 0, 224, 224]])
    got = cut_patches(pixels, np.zeros(1, np.int64), box, 96, (0, 0, 0))[0].numpy()
    pil = Image.fromarray(pixels[0].permute(1, 2, 0).numpy()).resize((96, 96), Image.BILINEAR)
    diff = np.abs(got.astype(int) - np.asarray(pil, int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01
