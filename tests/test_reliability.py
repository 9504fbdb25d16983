"""Reliability: every bad input gets a clear answer; no fault loses work or leaves a broken file.

- a corpus zoo (broken, odd, hostile files) is mined: the good images exactly as if alone, each bad
  one recorded with its reason;
- bad arguments: exit 2 and one clear line on stderr, never a traceback;
- faults: SIGINT / SIGTERM in every phase, a full disk, a damaged checkpoint: a valid checkpoint, a
  message saying how to resume, no partial output and no stray temporary files.

CLI cases run in real processes. Importing torch costs seconds, so most of them go through one driver
process that imports patchmine once and forks a fresh child per command line (``_cli_many``).
"""

from __future__ import annotations

import os
import shutil
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import patchmine
import patchmine.mine as mine_mod
from patchmine.mine import mine
from tests.conftest import make_image, write_corpus

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["pool", "add", "head"]
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


# ------------------------------------------------------------------------------------------------
# The zoo


def _png_header(w: int, h: int) -> bytes:
    """A valid PNG header that declares a ``w`` x ``h`` RGB image, with an empty image stream."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(tag + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


NON_UTF8_GOOD = b"g_caf\xe9_good.png"  # Latin-1 bytes: not valid UTF-8
NON_UTF8_BAD = b"z_bad_\xff\xfe.jpg"


def _write_good(folder: Path) -> list[str]:
    """The odd-but-valid files of the zoo; returns their names (as ``discover`` gives them)."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []

    def save(name: str, img: Image.Image, **kw) -> None:
        img.save(folder / name, **kw)
        names.append(name)

    save("a_plain.png", make_image(1, (90, 70)))
    save("a_plain2.jpg", make_image(2, (64, 64)))
    save("b_one_pixel.png", Image.new("RGB", (1, 1), (200, 30, 60)))
    save("c_wide.png", make_image(3, (4000, 3)))
    save("c_tall.png", make_image(4, (3, 4000)))
    frames = [make_image(5 + i, (50, 40)).convert("P") for i in range(3)]
    save("d_animated.gif", frames[0], save_all=True, append_images=frames[1:], duration=50, loop=0)
    gray16 = (np.asarray(make_image(8, (60, 50)).convert("L"), np.uint16) * 257).astype(np.uint16)
    save("e_gray16.png", Image.fromarray(gray16))
    assert Image.open(folder / "e_gray16.png").mode.startswith("I")
    save("f_cmyk.jpg", make_image(9, (70, 66)).convert("CMYK"))
    pal = make_image(10, (48, 48)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    save("g_palette_transparent.png", pal, transparency=0)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    save("h_exif_rotated.jpg", make_image(11, (100, 50)), exif=exif)
    # a PNG that calls itself .jpg: decoded by content, not by name
    make_image(12, (64, 80)).save(folder / "i_png_named.jpg", format="PNG")
    names.append("i_png_named.jpg")
    with open(os.path.join(os.fsencode(folder), NON_UTF8_GOOD), "wb") as f:
        make_image(13, (66, 64)).save(f, format="PNG")
    names.append(os.fsdecode(NON_UTF8_GOOD))
    return sorted(names)


def _write_bad(folder: Path) -> dict[str, str]:
    """The broken and hostile files; returns name -> a word the recorded reason must contain.

    The file deleted between discovery and reading (``m_deleted.png``) is made here and deleted by
    the test after discovery.
    """
    bad: dict[str, str] = {}
    (folder / "m_zero_bytes.jpg").write_bytes(b"")
    bad["m_zero_bytes.jpg"] = "cannot identify"
    jpeg = folder / "m_truncated.jpg"
    make_image(20, (120, 90)).save(jpeg, quality=95)
    data = jpeg.read_bytes()
    jpeg.write_bytes(data[: len(data) // 2])
    bad["m_truncated.jpg"] = "truncated"
    (folder / "m_text.jpg").write_text("hello, I am not a picture\n")
    bad["m_text.jpg"] = "cannot identify"
    # decompression bombs: a small file whose header declares 2 and 1.2 times Pillow's limit
    (folder / "m_bomb_big.png").write_bytes(_png_header(20000, 20000))
    bad["m_bomb_big.png"] = "DecompressionBomb"
    (folder / "m_bomb_small.png").write_bytes(_png_header(10000, 10000))
    bad["m_bomb_small.png"] = "DecompressionBomb"
    make_image(21, (64, 64)).save(folder / "m_deleted.png")
    bad["m_deleted.png"] = "No such file"
    os.symlink("m_loop.jpg", folder / "m_loop.jpg")  # a link to itself
    bad["m_loop.jpg"] = "symbolic links"
    os.mkfifo(folder / "m_fifo.jpg")  # opening it would block forever
    bad["m_fifo.jpg"] = "not a regular file"
    with open(os.path.join(os.fsencode(folder), NON_UTF8_BAD), "wb") as f:
        f.write(b"garbage")
    bad[os.fsdecode(NON_UTF8_BAD)] = "cannot identify"
    if not IS_ROOT:  # root reads through chmod 000; test_unreadable_file covers it otherwise
        (folder / "m_unreadable.png").write_bytes((folder / "a_plain.png").read_bytes())
        os.chmod(folder / "m_unreadable.png", 0)
        bad["m_unreadable.png"] = "Permission denied"
    return bad


def _safe(name: str) -> str:
    """A path as the result file stores it (non-UTF-8 bytes escaped)."""
    return name.encode("utf-8", "backslashreplace").decode("utf-8")


def _mine(corpus, out, tiny_model, **kw):
    args = dict(
        model=tiny_model,
        weights="none",
        layers=LAYERS,
        k=4,
        input_size=64,
        batch_size=4,
        workers=0,
        progress=False,
    )
    return mine(corpus, out, **{**args, **kw})


def _assert_same_for_good_images(zoo_h5: Path, good_h5: Path) -> None:
    """Every layer of two results holds the same winners, image indices mapped through paths."""
    with patchmine.open(zoo_h5) as a, patchmine.open(good_h5) as b:
        assert a.layers == b.layers
        pa, pb = np.array(a.image_paths, object), np.array(b.image_paths, object)
        ia = {p: i for i, p in enumerate(a.image_paths)}
        for p, j in zip(b.image_paths, range(b.n_images), strict=True):
            i = ia[p]
            assert a.image_ok[i] and b.image_ok[j], p
            assert np.array_equal(a.image_shape[i], b.image_shape[j]), p
            assert np.array_equal(a.image_transform[i], b.image_transform[j]), p
        for name in a.layers:
            la, lb = a.layer(name), b.layer(name)
            assert la.attrs == lb.attrs, name
            assert np.array_equal(la.score, lb.score, equal_nan=True), name
            used = lb.image >= 0
            assert np.array_equal(la.image >= 0, used), name
            assert list(pa[la.image[used]]) == list(pb[lb.image[used]]), name
            for key in ("yx", "box", "box_orig"):
                assert np.array_equal(
                    getattr(la, key)[used], getattr(lb, key)[used], equal_nan=True
                ), (name, key)
            for ch in range(la.channels):
                assert np.array_equal(la.patches(ch), lb.patches(ch)), (name, ch)
                assert np.array_equal(la.heat(ch), lb.heat(ch), equal_nan=True), (name, ch)
            sa, sb = la.stats(), lb.stats()
            for key in sb:
                assert np.array_equal(sa[key], sb[key], equal_nan=True), (name, key)


def test_zoo_is_mined_and_bad_files_are_recorded(tmp_path, tiny_model, monkeypatch):
    zoo, alone = tmp_path / "zoo", tmp_path / "good"
    good = _write_good(zoo)
    shutil.copytree(zoo, alone)
    bad = _write_bad(zoo)

    real_discover = mine_mod.discover

    def discover_then_delete(sources):
        corpus = real_discover(sources)
        victim = zoo / "m_deleted.png"
        if victim.exists() and Path(sources[0]) == zoo:
            victim.unlink()
        return corpus

    monkeypatch.setattr(mine_mod, "discover", discover_then_delete)
    t0 = time.perf_counter()
    s = _mine([zoo], tmp_path / "zoo.h5", tiny_model, workers=2)
    assert time.perf_counter() - t0 < 60  # the bomb headers are refused, never decoded
    _mine([alone], tmp_path / "good.h5", tiny_model)

    assert s.n_images == len(good) + len(bad) and s.n_failed == len(bad)
    text = str(s)
    with patchmine.open(tmp_path / "zoo.h5") as r:
        assert r.attrs["n_failed"] == len(bad)
        got = {p: (bool(ok), e) for p, ok, e in zip(r.image_paths, r.image_ok, r.image_error,
                                                    strict=True)}
        assert sorted(got) == sorted(_safe(n) for n in [*good, *bad])
        for name in good:
            assert got[_safe(name)] == (True, ""), name
        for name, reason in bad.items():
            ok, error = got[_safe(name)]
            assert not ok and reason in error, (name, error)
            assert "\n" not in error
            assert _safe(name) in text, name  # the summary names every failure
        for word in ("unreadable", str(len(bad))):
            assert word in text
        ok_shapes = {p: tuple(r.image_shape[i]) for i, p in enumerate(r.image_paths)}
    assert ok_shapes["c_wide.png"] == (3, 4000) and ok_shapes["c_tall.png"] == (4000, 3)
    assert ok_shapes["h_exif_rotated.jpg"] == (100, 50)  # rotated as displayed
    assert ok_shapes["b_one_pixel.png"] == (1, 1)
    _assert_same_for_good_images(tmp_path / "zoo.h5", tmp_path / "good.h5")
    assert sorted(os.listdir(tmp_path)) == ["good", "good.h5", "zoo", "zoo.h5"]


@pytest.mark.skipif(not IS_ROOT, reason="covered by the zoo when not root")
def test_unreadable_file(tmp_path, tiny_model):
    """chmod 000 stops everyone but root; as root, a folder named like an image stands in for it."""
    write_corpus(tmp_path / "c", 3, duplicates=False)
    (tmp_path / "c" / "x_folder.png").mkdir()  # not discovered in a folder walk
    lst = tmp_path / "list.txt"
    lst.write_text("c/img_000.jpg\nc/x_folder.png\nc/img_001.png\n")
    s = _mine([lst], tmp_path / "r.h5", tiny_model)
    assert s.n_failed == 1
    assert "c/x_folder.png" in str(s) and "not a regular file" in str(s)


def test_list_naming_missing_files_records_them(tmp_path, tiny_model):
    write_corpus(tmp_path / "c", 3, duplicates=False)
    lst = tmp_path / "list.txt"
    lst.write_text("c/img_000.jpg\nc/gone.png\n/nowhere/at/all.jpg\nc/img_002.png\n")
    s = _mine([lst], tmp_path / "r.h5", tiny_model)
    assert (s.n_images, s.n_failed) == (4, 2)
    with patchmine.open(tmp_path / "r.h5") as r:
        assert list(r.image_ok) == [True, False, False, True]
        assert all("No such file" in r.image_error[i] for i in (1, 2))
