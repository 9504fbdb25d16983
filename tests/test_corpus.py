"""Corpus discovery, robust decoding and exact preprocessing geometry."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from patchmine.corpus import CorpusDataset, discover, load_rgb, make_loader, preprocess
from patchmine.errors import UsageError
from patchmine.receptive import to_input, to_original


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
    assert transform == (1.0, 0.0, 0.0)


def test_shorter_side_already_s_is_only_cropped():
    img = _photo(224, 300)
    pixels, (scale, oy, ox) = preprocess(img, 224)
    assert scale == 1.0 and oy == 0 and ox == 38
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


def test_huge_extreme_aspect_stays_cheap():
    """Cropping happens before resampling: a 1 x 5000 strip never becomes a 224 x 1.1M image."""
    pixels, (scale, oy, ox) = preprocess(_photo(2, 5000), 32)
    assert pixels.shape == (32, 32, 3) and scale == 16.0 and oy == 0
    assert ox == (round(5000 * 16) - 32) // 2
