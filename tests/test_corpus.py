"""Corpus discovery, robust decoding and exact preprocessing geometry."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image
from torchvision.transforms.functional import _compute_resized_output_size

from patchmine import corpus as corpus_module
from patchmine.corpus import (
    CorpusDataset,
    CorpusLoader,
    discover,
    load_rgb,
    make_loader,
    preprocess,
)
from patchmine.errors import UsageError
from patchmine.receptive import to_input, to_original
from tests.conftest import SHARED_CORPUS


def _photo(h: int, w: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(yy * 255 // max(h - 1, 1)), (xx * 255 // max(w - 1, 1)), (yy + xx) % 256], -1)
    noise = rng.integers(0, 40, size=(h, w, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")


def test_discover_sorted_recursive_case_insensitive(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "deep").mkdir(parents=True)
    for rel in ["b/2.JPG", "a/deep/1.png", "a/0.jpeg", "z.PNG"]:
        _photo(8, 8).save(tmp_path / rel, format="PNG")
    (tmp_path / "notes.txt").write_text("not an image list of this corpus")
    (tmp_path / "a" / "readme.md").write_text("x")
    c = discover([tmp_path])
    assert c.paths == ("a/0.jpeg", "a/deep/1.png", "b/2.JPG", "z.PNG")
    assert c.file(0) == tmp_path.resolve() / "a/0.jpeg"
    assert discover([tmp_path]).fingerprint() == c.fingerprint()


def test_discover_file_list_keeps_order_and_repeats(tmp_path):
    for n in ["x.png", "y.png"]:
        _photo(8, 8).save(tmp_path / n)
    lst = tmp_path / "list.txt"
    lst.write_text("# two copies\ny.png\nx.png\n\ny.png\n")
    c = discover([lst])
    assert c.paths == ("y.png", "x.png", "y.png")
    assert c.file(1) == tmp_path.resolve() / "x.png"


def test_discover_errors(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        discover([tmp_path / "missing"])
    with pytest.raises(UsageError, match="empty corpus"):
        discover([tmp_path])
    with pytest.raises(UsageError, match="no corpus"):
        discover([])


def test_symlink_loop_terminates(tmp_path):
    (tmp_path / "d").mkdir()
    _photo(8, 8).save(tmp_path / "d" / "a.png")
    (tmp_path / "d" / "loop").symlink_to(tmp_path / "d", target_is_directory=True)
    c = discover([tmp_path])
    assert "d/a.png" in c.paths and len(c) <= 2


def test_passthrough_is_pixel_exact():
    img = _photo(224, 224)
    pixels, transform = preprocess(img, 224)
    assert np.array_equal(pixels, np.asarray(img))
    assert transform == (1.0, 0.0, 0.0, 1.0)


def test_shorter_side_already_s_is_only_cropped():
    img = _photo(224, 300)
    pixels, (sy, oy, ox, sx) = preprocess(img, 224)
    assert sy == sx == 1.0 and oy == 0 and ox == 38
    assert np.array_equal(pixels, np.asarray(img)[:, 38 : 38 + 224])


@pytest.mark.parametrize("hw", [(375, 500), (500, 375), (97, 100), (1632, 1836), (30, 700)])
def test_geometry_maps_back_to_original(hw):
    """A distinctive spot in the original lands where the recorded transform says."""
    h, w = hw
    s = 64
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    m = min(h, w)
    cy, cx = h // 2 + m // 7, w // 2 - m // 9  # off-center, inside the center crop
    r = m // 8 + 1
    arr[cy - r : cy + r, cx - r : cx + r] = 255
    pixels, transform = preprocess(Image.fromarray(arr), s)
    ys, xs = np.nonzero(pixels[..., 0] > 127)
    box_in = np.array([ys.min(), xs.min(), ys.max() + 1, xs.max() + 1], dtype=np.float32)
    box_orig = to_original(box_in, np.array(transform, dtype=np.float32))
    tol = 1.5 / transform[0] + 1
    assert np.allclose(box_orig, [cy - r, cx - r, cy + r, cx + r], atol=tol)
    assert np.allclose(to_input(box_orig, np.array(transform, dtype=np.float32)), box_in, atol=1e-3)


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "CMYK", "I;16", "I", "1", "RGB"])
def test_every_mode_decodes_to_rgb(tmp_path, mode):
    base = _photo(40, 50)
    if mode == "I;16":
        img = Image.fromarray(np.asarray(base.convert("L"), dtype=np.uint16) * 257)
    elif mode == "I":
        img = Image.fromarray(np.asarray(base.convert("L"), dtype=np.int32) * 257)
    else:
        img = base.convert(mode)
    fmt = "JPEG" if mode == "CMYK" else ("TIFF" if mode in ("I", "LA") else "PNG")
    path = tmp_path / f"x.{fmt.lower()}"
    path.write_bytes(_encode(img, fmt))
    out = load_rgb(path)
    assert out.mode == "RGB" and out.size == (50, 40)
    if mode in ("L", "I;16", "I"):  # 16-bit gray is scaled, not clipped to white
        ref = np.asarray(base.convert("L"), dtype=np.int16)
        assert np.abs(np.asarray(out)[..., 0].astype(np.int16) - ref).max() <= 1


def test_exif_orientation_applied(tmp_path):
    img = _photo(20, 60)  # landscape pixels, EXIF says rotate 90 degrees
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif)
    assert load_rgb(path).size == (20, 60)


def test_transparent_palette_composited_over_white(tmp_path):
    img = Image.new("P", (10, 10), 0)
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    img.putpixel((0, 0), 1)
    p = tmp_path / "t.png"
    img.save(p, transparency=0)
    out = np.asarray(load_rgb(p))
    assert tuple(out[5, 5]) == (255, 255, 255) and tuple(out[0, 0]) == (0, 0, 255)


def test_bad_files_are_recorded_and_skipped(tmp_path):
    _photo(300, 400).save(tmp_path / "a_good.jpg")
    (tmp_path / "b_empty.jpg").write_bytes(b"")
    (tmp_path / "c_text.jpg").write_text("hello, not a picture")
    good = _encode(_photo(300, 400, 1), "JPEG")
    (tmp_path / "d_truncated.jpg").write_bytes(good[: len(good) // 2])
    (tmp_path / "e_png_named_jpg.jpg").write_bytes(_encode(_photo(64, 64), "PNG"))
    corpus = discover([tmp_path])
    ds = CorpusDataset(corpus, 64)
    items = [ds[i] for i in range(len(ds))]
    assert [it["ok"] for it in items] == [True, False, False, False, True]
    assert all(it["error"] for it in items if not it["ok"])
    assert all(it["pixels"].shape == (3, 64, 64) for it in items)
    batches = list(make_loader(ds, batch_size=2, workers=2))
    assert [int(i) for b in batches for i in b["index"]] == list(range(5))
    assert [bool(o) for b in batches for o in b["ok"]] == [True, False, False, False, True]


def test_corpus_loader_serves_every_pass_from_the_same_workers(tmp_path):
    """The second pass reuses the first pass's workers (no fork from a process full of
    activations), and each pass gets exactly the images asked for, in the order asked."""
    import multiprocessing

    for i in range(6):
        _photo(40 + i, 50, i).save(tmp_path / f"{i}.png")
    corpus = discover([tmp_path])
    ds = CorpusDataset(corpus, 32)
    loader = CorpusLoader(corpus, 32, batch_size=4, workers=2)
    before, seen = {p.pid for p in multiprocessing.active_children()}, []
    passes = ((range(6), None, [4, 2]), ([5, 1, 3, 0, 4, 2], 1, [1, 1, 1, 1, 2]), ([2], 2, [1]))
    for want, first, sizes in passes:
        got = list(loader.batches(want, first=first))  # first: the first batch in parts
        assert [len(b["index"]) for b in got] == sizes
        assert [int(i) for b in got for i in b["index"]] == list(want)
        pixels = torch.cat([b["pixels"] for b in got])
        assert torch.equal(pixels, torch.stack([ds[i]["pixels"] for i in want]))
        seen.append({p.pid for p in multiprocessing.active_children()} - before)
    assert len(seen[0]) == 2 and seen[0] == seen[1] == seen[2]
    loader.close()


def test_huge_extreme_aspect_stays_cheap():
    """A 1 x 5000 strip never becomes a 224 x 1.1M image: past 2^24 pixels the crop is resampled
    straight from the original (within one grey level of torchvision), same geometry."""
    pixels, (sy, oy, ox, sx) = preprocess(_photo(2, 5000), 32)  # 32 x 80000: made whole, exact
    assert pixels.shape == (32, 32, 3) and sy == sx == 16.0 and oy == 0
    assert ox == round((80000 - 32) / 2)
    pixels, (sy, oy, ox, sx) = preprocess(_photo(1, 5000), 224)
    assert pixels.shape == (224, 224, 3) and sy == sx == 224.0 and oy == 0
    assert ox == round((224 * 5000 - 224) / 2)


def _torchvision(img: Image.Image, size: int, resize: int) -> np.ndarray:
    return np.asarray(T.Compose([T.Resize(resize), T.CenterCrop(size)])(img))


def _odd_sizes(s: int) -> list[tuple[int, int]]:
    rng = np.random.default_rng(s)
    fixed = [(1, 37), (37, 1), (1, 1), (s, s), (s + 1, s), (s, s + 1), (s - 1, s + 3), (2, 3 * s)]
    return fixed + [(int(rng.integers(1, 700)), int(rng.integers(1, 700))) for _ in range(12)]


@pytest.mark.parametrize("s, r", [(224, 224), (224, 256), (64, 64), (64, 57), (7, 9)])
def test_pixel_equal_to_torchvision_on_odd_sizes(s, r):
    """Resize(R) + CenterCrop(S) on the PIL image, pixel for pixel (R < S: zero padding, as
    torchvision pads), with the geometry torchvision computes."""
    for i, (h, w) in enumerate(_odd_sizes(s)):
        img = _photo(h, w, seed=i)
        pixels, (sy, oy, ox, sx) = preprocess(img, s, r)
        assert np.array_equal(pixels, _torchvision(img, s, r)), (h, w)
        nh, nw = _compute_resized_output_size((h, w), [r])
        assert (sy, sx) == (nh / h, nw / w), (h, w)
        if nh >= s and nw >= s:
            assert (oy, ox) == (int(round((nh - s) / 2.0)), int(round((nw - s) / 2.0)))


def test_transform_is_exact_per_axis():
    """The recorded transform maps every input pixel onto the original exactly, each axis with its
    own scale: on a ramp whose grey level is the original x (or y) coordinate, an input pixel's
    value is its center's original coordinate (to the 8-bit rounding), across the whole crop. One
    scale for both axes would be off by up to a model-input pixel on the long side."""
    for h, w, s, r in [
        (181, 250, 64, 64),
        (250, 181, 64, 64),
        (97, 230, 64, 80),
        (200, 255, 224, 256),
    ]:
        ramp_x = np.broadcast_to(np.arange(w, dtype=np.uint8)[None, :, None], (h, w, 3))
        ramp_y = np.broadcast_to(np.arange(h, dtype=np.uint8)[:, None, None], (h, w, 3))
        for axis, ramp in ((1, ramp_x), (0, ramp_y)):
            pixels, t = preprocess(Image.fromarray(np.ascontiguousarray(ramp)), s, r)
            centers = np.arange(s) + 0.5
            box = np.zeros((s, 4))
            box[:, axis], box[:, axis + 2] = centers, centers
            orig = to_original(box, np.array(t, np.float32))[:, axis] - 0.5  # pixel center -> index
            got = pixels[s // 2, :, 0] if axis == 1 else pixels[:, s // 2, 0]
            inner = (orig > 3) & (orig < (w if axis == 1 else h) - 4)  # clear of edge clamping
            assert inner.sum() > s // 2
            err = np.abs(got[inner] - orig[inner])
            assert err.max() <= 0.51, (h, w, s, r, axis, err.max())


def test_crop_of_huge_resize_is_close_to_torchvision(monkeypatch):
    """The path for strips past 2^24 resized pixels: same size and geometry, within a grey level."""
    monkeypatch.setattr(corpus_module, "_WHOLE_RESIZE_PIXELS", 0)
    for i, (h, w) in enumerate([(3, 400), (400, 3), (150, 170), (224, 225)]):
        img = _photo(h, w, seed=i)
        for s, r in [(64, 64), (64, 80), (64, 48)]:
            got, t = preprocess(img, s, r)
            monkeypatch.setattr(corpus_module, "_WHOLE_RESIZE_PIXELS", 1 << 24)
            exact, t_exact = preprocess(img, s, r)
            monkeypatch.setattr(corpus_module, "_WHOLE_RESIZE_PIXELS", 0)
            assert t == t_exact
            assert np.abs(got.astype(int) - _torchvision(img, s, r)).max() <= 1
            assert np.array_equal(exact, _torchvision(img, s, r))


@pytest.mark.corpus
@pytest.mark.skipif(not SHARED_CORPUS.is_dir(), reason=f"needs {SHARED_CORPUS}")
@pytest.mark.parametrize("r", [224, 256])
def test_pixel_equal_to_torchvision_on_shared_photos(r):
    """40 real photographs, opened as a torchvision user would: patchmine's input is theirs."""
    files = sorted(SHARED_CORPUS.glob("*.JPEG"))[::12][:40]
    assert len(files) == 40
    for path in files:
        with Image.open(path) as im:
            img = im.convert("RGB")
        assert np.array_equal(preprocess(load_rgb(path), 224, r)[0], _torchvision(img, 224, r)), (
            path
        )
