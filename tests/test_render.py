"""Montages, overlays, overview, context views and the HTML gallery, on a synthetic result."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from patchmine import gallery, pictures, store
from patchmine.cli import parse_channels
from patchmine.corpus import preprocess
from patchmine.errors import UsageError
from tests.conftest import run_cli

S = 32  # model input side
SIZE, STRIDE, OFFSET = 11, 4, -2  # receptive field of the spatial layer
FMAP = 8
K = 9
C_SPATIAL = 5
DEAD = 3  # dead channel of the spatial layer
C_WHOLE = 4
P_WHOLE = 16
MEAN = (0.485, 0.456, 0.406)


def _image(rng: np.random.Generator, h: int, w: int, i: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack(
        [
            127 + 120 * np.sin(xx / (3 + i % 5) + i),
            127 + 120 * np.cos(yy / (4 + i % 3) - i),
            (xx * 7 + yy * 3 + 40 * i) % 256,
        ],
        axis=-1,
    )
    return np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)


def make_result(tmp: Path, n_images: int = 12, remove: tuple[int, ...] = ()) -> Path:
    """A result file with a spatial layer ``conv`` (5 channels, one dead) and a whole-input layer
    ``fc`` (N, C); its images are real files under ``tmp/corpus`` (those in ``remove`` deleted)."""
    rng = np.random.default_rng(0)
    root = tmp / "corpus"
    (root / "sub").mkdir(parents=True, exist_ok=True)
    paths, shapes, transforms, inputs = [], [], [], []
    for i in range(n_images):
        h, w = [(40, 56), (48, 48), (64, 40), (32, 32)][i % 4]
        rel = f"sub/img_{i:03d}.png" if i % 2 else f"img_{i:03d}.jpg"
        if i == 5:
            rel = 'sub/we<i>rd & "q".png'  # must come out escaped in the HTML
        arr = _image(rng, h, w, i)
        Image.fromarray(arr).save(root / rel, quality=95)
        # preprocess what the file decodes to, like the corpus loader
        pix, tr = preprocess(Image.open(root / rel).convert("RGB"), S)
        paths.append(rel)
        shapes.append((h, w))
        transforms.append(tr)
        inputs.append(pix)
    inputs = np.stack(inputs)
    transforms = np.asarray(transforms, dtype=np.float32)
    fill = np.array([round(m * 255) for m in MEAN], dtype=np.uint8)

    def crop(img: int, y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
        out = np.empty((y1 - y0, x1 - x0, 3), np.uint8)
        out[:] = fill
        sy0, sx0, sy1, sx1 = max(y0, 0), max(x0, 0), min(y1, S), min(x1, S)
        out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = inputs[img, sy0:sy1, sx0:sx1]
        return out

    def orig(b: np.ndarray, img: int) -> np.ndarray:
        sy, oy, ox, sx = transforms[img]
        return (b + np.array([oy, ox, oy, ox])) / np.array([sy, sx, sy, sx])

    # spatial layer: per channel k distinct images, a smooth bump of activation at yx
    c, k = C_SPATIAL, K
    score = np.full((c, k), np.nan, np.float32)
    image = np.full((c, k), -1, np.int64)
    yx = np.zeros((c, k, 2), np.int32)
    box = np.zeros((c, k, 4), np.int32)
    box_orig = np.full((c, k, 4), np.nan, np.float32)
    patch = np.zeros((c, k, SIZE, SIZE, 3), np.uint8)
    heat = np.zeros((c, k, FMAP, FMAP), np.float16)
    gy, gx = np.mgrid[0:FMAP, 0:FMAP]
    for ch in range(c):
        if ch == DEAD:
            continue
        imgs = rng.permutation(n_images)[:k]
        scores = np.sort(rng.uniform(1, 10, k))[::-1]
        for s in range(k):
            y, x = int(rng.integers(0, FMAP)), int(rng.integers(0, FMAP))
            if ch == 0 and s == 0:
                y, x = 0, 0  # a corner box, partly outside the input
            b = np.array(
                [
                    y * STRIDE + OFFSET,
                    x * STRIDE + OFFSET,
                    y * STRIDE + OFFSET + SIZE,
                    x * STRIDE + OFFSET + SIZE,
                ]
            )
            score[ch, s], image[ch, s], yx[ch, s] = scores[s], imgs[s], (y, x)
            box[ch, s] = b
            box_orig[ch, s] = orig(b, imgs[s])
            patch[ch, s] = crop(imgs[s], *b)
            heat[ch, s] = scores[s] * np.exp(-((gy - y) ** 2 + (gx - x) ** 2) / 2.0)
    # channel 4 keeps only 5 entries: 4 unused slots
    score[4, 5:], image[4, 5:], box_orig[4, 5:] = np.nan, -1, np.nan
    mx = np.nan_to_num(score[:, 0], nan=0.0)
    qs = np.array([0.5, 0.99, 0.995], np.float32)
    quant = np.stack([mx * 0.1, mx * 0.5, mx * 0.6], axis=1).astype(np.float32)
    spatial = store.LayerData(
        attrs={
            "channels": c,
            "fmap_hw": [FMAP, FMAP],
            "rf_size": [SIZE, SIZE],
            "rf_stride": [STRIDE, STRIDE],
            "rf_offset": [OFFSET, OFFSET],
            "rf_whole": False,
            "patch_size": SIZE,
        },
        score=score,
        image=image,
        yx=yx,
        box=box,
        box_orig=box_orig,
        patch=patch,
        heat=heat,
        stats={
            "count": np.full(c, n_images * FMAP * FMAP, np.int64),
            "mean": (mx * 0.05).astype(np.float32),
            "std": np.ones(c, np.float32),
            "max": mx.astype(np.float32),
            "quantile": quant,
            "q": qs,
        },
    )
    # whole-input layer (N, C): the patch is the whole input resampled
    c2 = C_WHOLE
    score2 = np.zeros((c2, k), np.float32)
    image2 = np.zeros((c2, k), np.int64)
    whole = np.array([0, 0, S, S], np.int32)
    box2 = np.broadcast_to(whole, (c2, k, 4)).copy()
    box_orig2 = np.zeros((c2, k, 4), np.float32)
    patch2 = np.zeros((c2, k, P_WHOLE, P_WHOLE, 3), np.uint8)
    for ch in range(c2):
        imgs = rng.permutation(n_images)[:k]
        score2[ch] = np.sort(rng.normal(0, 3, k))[::-1]
        image2[ch] = imgs
        for s in range(k):
            box_orig2[ch, s] = orig(whole, imgs[s])
            patch2[ch, s] = np.asarray(
                Image.fromarray(inputs[imgs[s]]).resize((P_WHOLE, P_WHOLE), Image.BILINEAR)
            )
    fc = store.LayerData(
        attrs={
            "channels": c2,
            "fmap_hw": [1, 1],
            "rf_size": [S, S],
            "rf_stride": [1, 1],
            "rf_offset": [0, 0],
            "rf_whole": True,
            "patch_size": P_WHOLE,
        },
        score=score2,
        image=image2,
        yx=np.zeros((c2, k, 2), np.int32),
        box=box2,
        box_orig=box_orig2,
        patch=patch2,
        heat=score2.reshape(c2, k, 1, 1).astype(np.float16),
        stats={
            "count": np.full(c2, n_images, np.int64),
            "mean": np.zeros(c2, np.float32),
            "std": np.ones(c2, np.float32),
            "max": score2[:, 0].copy(),
            "quantile": np.stack([score2[:, 0]] * 3, 1),
            "q": qs,
        },
    )
    attrs = {
        "model": "synthetic",
        "weights": "none",
        "input_size": S,
        "mean": list(MEAN),
        "std": [0.229, 0.224, 0.225],
        "k": k,
        "per_image": 1,
        "n_images": n_images,
        "n_failed": 0,
        "created_utc": "2024-01-01T00:00:00Z",
        "patchmine_version": "0",
        "torch_version": "0",
        "torchvision_version": "0",
        "corpus_roots": [str(root)],
        "layer_order": ["conv", "fc"],
    }
    images = {
        "path": paths,
        "root": np.zeros(n_images, np.int16),
        "shape": np.array(shapes),
        "ok": np.ones(n_images, bool),
        "transform": transforms,
        "error": [""] * n_images,
    }
    out = store.write_result(tmp / "result.h5", attrs, images, {"conv": spatial, "fc": fc})
    for i in remove:
        (root / paths[i]).unlink()
    return out


@pytest.fixture(scope="module")
def result_file(tmp_path_factory) -> Path:
    return make_result(tmp_path_factory.mktemp("render"))


@pytest.fixture()
def result(result_file):
    with store.open_result(result_file) as r:
        yield r


def _arr(im: Image.Image) -> np.ndarray:
    return np.asarray(im.convert("RGB"), dtype=np.int16)


def _region(a: np.ndarray, box) -> np.ndarray:
    x0, y0, x1, y1 = box
    return a[y0:y1, x0:x1]


# ---------------------------------------------------------------------------------------------
# montage


def test_montage_geometry_3x3(result):
    layer = result.layer("conv")
    im = pictures.montage(layer, 0)
    g = pictures.montage_grid(K, SIZE)
    assert (g.cols, g.rows) == (3, 3)
    assert im.size == g.size
    assert g.tile >= 96 and g.tile % SIZE == 0  # integer upscale of the 11 px patch
    a = _arr(im)
    patches = layer.patches(0)
    for slot in range(K):
        tile = _region(a, g.tile_box(slot))
        assert tile.shape[:2] == (g.tile, g.tile)
        # nearest upscale: every tile pixel block equals the stored patch pixel
        f = g.tile // SIZE
        np.testing.assert_array_equal(tile[::f, ::f], patches[slot])
    # the grid is really 3 wide: the 4th tile starts a new row
    assert g.tile_box(3)[0] == g.tile_box(0)[0] and g.tile_box(3)[1] > g.tile_box(0)[1]


@pytest.mark.parametrize("k,cols,rows", [(1, 1, 1), (4, 2, 2), (10, 4, 3), (16, 4, 4)])
def test_grid_columns(k, cols, rows):
    g = pictures.montage_grid(k, 24)
    assert (g.cols, g.rows) == (cols, rows)
    w, h = g.size
    x0, y0, x1, y1 = g.cell(k - 1)
    assert x1 <= w and y1 <= h


def test_labels_show_rank_score_and_file_name(result):
    """Line 1 of a label is the rank and the score, line 2 the file name."""
    layer = result.layer("conv")
    g = pictures.montage_grid(K, SIZE)
    half = g.label_h // 2
    a = {c: _arr(pictures.montage(layer, c)) for c in (0, 1)}
    bg = np.array(pictures.BG)
    labels = {(c, s): _region(a[c], g.label_box(s)) for c in (0, 1) for s in range(K)}
    for lab in labels.values():
        for line in (lab[:half], lab[half:]):
            assert (np.abs(line - bg).sum(-1) > 60).mean() > 0.01  # text pixels on both lines
    recs = {c: layer.records(c) for c in (0, 1)}
    for s in range(K):  # same rank, another score: line 1 differs
        assert not np.array_equal(labels[0, s][:half], labels[1, s][:half])
    # 9 + 9 entries over 12 images: some image is a winner of both channels, at other ranks
    same = [
        (s, t)
        for s in range(K)
        for t in range(K)
        if recs[0][s]["path"] == recs[1][t]["path"] and s != t
    ]
    assert same
    for s, t in same:  # the same file: the same line 2, whatever the rank
        np.testing.assert_array_equal(labels[0, s][half:], labels[1, t][half:])
    for s in range(1, K):  # another file: another line 2
        if recs[0][s]["path"] != recs[0][0]["path"]:
            assert not np.array_equal(labels[0, 0][half:], labels[0, s][half:])


def test_unused_slots_are_empty_tiles(result):
    layer = result.layer("conv")
    g = pictures.montage_grid(K, SIZE)
    a = _arr(pictures.montage(layer, 4))  # channel 4 has 5 entries
    assert len(layer.records(4)) == 5
    for slot in range(5, K):
        tile = _region(a, g.tile_box(slot))
        assert (np.abs(tile - np.array(pictures.EMPTY)).sum(-1) < 10).mean() > 0.9
        lab = _region(a, g.label_box(slot))
        assert (np.abs(lab - np.array(pictures.BG)).sum(-1) == 0).all()  # no label


@pytest.mark.parametrize("mode", ["heat", "mask"])
def test_overlay_changes_only_tile_pixels(result, mode):
    layer = result.layer("conv")
    g = pictures.montage_grid(K, SIZE)
    plain = _arr(pictures.montage(layer, 0, overlay="none"))
    over = _arr(pictures.montage(layer, 0, overlay=mode))
    assert plain.shape == over.shape
    diff = np.abs(plain - over).sum(-1) > 0
    assert diff.any()
    inside = np.zeros_like(diff)
    for slot in range(K):
        x0, y0, x1, y1 = g.tile_box(slot)
        inside[y0:y1, x0:x1] = True
    inside[: g.header_h] = False  # the title mentions the overlay; nothing else may differ
    header = np.zeros_like(diff)
    header[: g.header_h] = True
    assert not (diff & ~inside & ~header).any()
    for slot in range(K):
        assert diff[slice(*g.tile_box(slot)[1::2]), slice(*g.tile_box(slot)[0::2])].any()


def test_heat_overlay_follows_the_map(result):
    """The strongest overlay is where the activation bump is (tile center for its own unit)."""
    layer = result.layer("conv")
    g = pictures.montage_grid(K, SIZE)
    plain = _arr(pictures.montage(layer, 1, overlay="none"))
    over = _arr(pictures.montage(layer, 1, overlay="heat"))
    x0, y0, x1, y1 = g.tile_box(0)
    d = np.abs(plain - over).sum(-1)[y0:y1, x0:x1].astype(float)
    t = g.tile
    center = d[t // 3 : 2 * t // 3, t // 3 : 2 * t // 3].mean()
    corner = np.mean([d[: t // 8, : t // 8].mean(), d[-t // 8 :, -t // 8 :].mean()])
    assert center > corner


def test_overlay_skips_pixels_outside_the_input(result):
    """Channel 0's best box sits at the top-left corner: its 2-pixel margin is padding."""
    layer = result.layer("conv")
    assert layer.records(0)[0]["box"][:2] == (-2, -2)
    g = pictures.montage_grid(K, SIZE)
    plain = _arr(pictures.montage(layer, 0, overlay="none"))
    over = _arr(pictures.montage(layer, 0, overlay="heat"))
    x0, y0, _, _ = g.tile_box(0)
    m = 2 * g.tile // SIZE  # two patch pixels of padding
    assert (plain[y0 : y0 + m, x0 : x0 + g.tile] == over[y0 : y0 + m, x0 : x0 + g.tile]).all()
    assert (plain[y0 : y0 + g.tile, x0 : x0 + m] == over[y0 : y0 + g.tile, x0 : x0 + m]).all()
    inner = slice(y0 + m, y0 + g.tile), slice(x0 + m, x0 + g.tile)
    assert (plain[inner] != over[inner]).any()


def test_whole_input_layer_has_no_overlay(result):
    layer = result.layer("fc")
    a = pictures.montage(layer, 0, overlay="none")
    b = pictures.montage(layer, 0, overlay="heat")
    g = pictures.montage_grid(K, P_WHOLE)
    assert a.size == g.size
    pa, pb = _arr(a), _arr(b)
    for slot in range(K):
        np.testing.assert_array_equal(_region(pa, g.tile_box(slot)), _region(pb, g.tile_box(slot)))


def test_bad_overlay_and_channel(result):
    layer = result.layer("conv")
    with pytest.raises(UsageError, match="overlay"):
        pictures.montage(layer, 0, overlay="glow")
    with pytest.raises(UsageError, match="0..4"):
        pictures.montage(layer, 5)


# ---------------------------------------------------------------------------------------------
# overview and context


def test_overview_marks_dead_channel(result):
    layer = result.layer("conv")
    im = pictures.overview(layer)
    g = pictures.overview_grid(C_SPATIAL, SIZE)
    assert im.size == g.size
    a = _arr(im)
    tiles = [_region(a, g.tile_box(c)) for c in range(C_SPATIAL)]
    red = np.array(pictures.RED)

    def reds(t):
        return (np.abs(t - red).sum(-1) < 30).mean()

    assert reds(tiles[DEAD]) > 0.03
    for c in range(C_SPATIAL):
        if c != DEAD:
            assert reds(tiles[c]) < 0.01
            assert not np.array_equal(tiles[c], tiles[DEAD])
    # a live tile is its own channel's best patch, upscaled
    f = g.tile // SIZE
    for c in range(C_SPATIAL):
        if c != DEAD:
            np.testing.assert_array_equal(tiles[c][::f, ::f], layer.patches(c)[0])


def test_dead_montage_is_empty(result):
    layer = result.layer("conv")
    assert layer.records(DEAD) == []
    g = pictures.montage_grid(K, SIZE)
    a = _arr(pictures.montage(layer, DEAD, overlay="heat"))
    for slot in range(K):
        tile = _region(a, g.tile_box(slot))
        assert (np.abs(tile - np.array(pictures.EMPTY)).sum(-1) < 10).mean() > 0.9


def test_context_draws_box_on_original(result):
    im = pictures.context(result, "conv", 1)
    g = pictures.context_grid(K)
    assert im.size == g.size
    a = _arr(im)
    box = np.array(pictures.BOX)
    for slot in range(K):
        t = _region(a, g.tile_box(slot))
        assert (np.abs(t - box).sum(-1) < 30).sum() > 20  # the yellow box is there
    # the original is shown bigger than the patch: much more than 11x11 image pixels
    assert (np.abs(_region(a, g.tile_box(0)) - np.array(pictures.PANEL)).sum(-1) > 0).mean() > 0.5


def test_context_falls_back_to_patch_when_original_gone(tmp_path):
    layer_name, ch = "conv", 1
    with store.open_result(make_result(tmp_path)) as r:
        first = r.layer(layer_name).records(ch)[0]["image"]
    path = make_result(tmp_path / "gone", remove=(first,))
    with store.open_result(path) as r:
        layer = r.layer(layer_name)
        assert not r.image_file(first).exists()
        im = pictures.context(r, layer, ch)
        g = pictures.context_grid(K)
        a = _arr(im)
        f = g.tile // SIZE  # the patch, upscaled by a whole factor, centered in the cell
        off = (g.tile - f * SIZE) // 2
        tile = _region(a, g.tile_box(0))[off : off + f * SIZE, off : off + f * SIZE]
        np.testing.assert_array_equal(tile[::f, ::f], layer.patches(ch)[0])
        lab = _region(a, g.label_box(0))
        assert (np.abs(lab - np.array(pictures.RED)).sum(-1) < 60).sum() > 10  # "original missing"


# ---------------------------------------------------------------------------------------------
# channels and the gallery


def test_parse_channels():
    assert parse_channels("0,5,9-12") == [0, 5, 9, 10, 11, 12]
    assert parse_channels("3, 1,1") == [1, 3]
    assert parse_channels([2, 0]) == [0, 2]
    assert parse_channels(None) is None
    for bad in ("a", "5-2", "1-", "", "-3"):
        with pytest.raises(UsageError):
            parse_channels(bad)
    with pytest.raises(UsageError, match="out of range"):
        parse_channels("0-9", channels=5)


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs: list[str] = []

    def handle_starttag(self, tag, attrs):
        for k, v in attrs:
            if k in ("href", "src") and v:
                self.refs.append(v)
            if k == "style" and v and "url(" in v:
                self.refs += re.findall(r"url\(([^)]+)\)", v)


def _check_links(root: Path) -> int:
    n = 0
    for page in root.rglob("*.html"):
        p = _Links()
        text = page.read_text(encoding="utf-8")
        p.feed(text)
        for ref in p.refs:
            if ref.startswith("#"):  # an anchor on the same page
                assert f'id="{ref[1:]}"' in text, f"{page}: no anchor {ref}"
                continue
            assert not re.match(r"^[a-z]+:", ref), f"{page}: non-relative link {ref}"
            assert (page.parent / ref).is_file(), f"{page}: broken link {ref}"
            n += 1
    return n


def test_render_gallery(result_file, tmp_path):
    out = tmp_path / "gallery"
    index = gallery.render(result_file, out, progress=False)
    assert index == out / "index.html"
    assert _check_links(out) > 20
    for c in range(C_SPATIAL):
        assert (out / "conv" / f"c{c:04d}.html").is_file()
        assert (out / "conv" / f"c{c:04d}.webp").is_file() == (c != DEAD)
    assert (out / "fc" / "overview.webp").is_file() and (out / "gallery.js").is_file()
    assert not (out / "fc" / "c0000.webp").exists()  # whole-input winners: the context shows them
    assert not list(out.rglob("*.png")) and not list(out.rglob("*.jpg"))  # photographs are WebP
    page = (out / "conv" / "c0000.html").read_text()
    with store.open_result(result_file) as r:
        rec = r.layer("conv").records(0)[0]
    assert rec["path"] in page and "<table>" in page
    assert "dead" in (out / "conv" / "c0003.html").read_text()
    Image.open(out / "conv" / "c0001.webp").verify()


def test_render_subset_and_escaping(tmp_path):
    path = make_result(tmp_path)
    out = tmp_path / "g"
    gallery.render(path, out, layers=["conv"], channels=[2, 1, 2], overlay="mask", progress=False)
    files = sorted(p.name for p in (out / "conv").glob("c*"))
    assert files == ["c0001.html", "c0001.webp", "c0002.html", "c0002.webp"]
    assert not (out / "fc").exists()
    _check_links(out)
    with pytest.raises(UsageError, match="out of range"):
        gallery.render(path, out, channels=[7], progress=False)
    with pytest.raises(UsageError, match="0 or more"):
        gallery.render(path, out, channels=[-1], progress=False)
    with pytest.raises(UsageError, match="parse_channels"):
        gallery.render(path, out, channels="1-2", progress=False)
    with pytest.raises(UsageError):
        gallery.render(path, out, layers=["nope"], progress=False)


def test_html_escapes_names(result_file, tmp_path):
    out = tmp_path / "g"
    gallery.render(result_file, out, layers=["fc"], progress=False)
    pages = [p.read_text(encoding="utf-8") for p in (out / "fc").glob("c*.html")]
    assert not any("<i>" in p for p in pages)
    assert any("we&lt;i&gt;rd &amp; &quot;q&quot;.png" in p for p in pages)


def test_render_cli(result_file, tmp_path):
    out = tmp_path / "cli"
    args = ["--out", out, "--channels", "0,2-3", "--overlay", "heat", "--quiet"]
    p = run_cli("render", result_file, *args, timeout=120)
    assert p.returncode == 0, p.stderr
    assert (out / "index.html").is_file() and (out / "conv" / "c0002.webp").is_file()
    assert not (out / "conv" / "c0001.webp").exists()


@pytest.mark.parametrize("make_bad", ["text", "h5"])
def test_render_cli_refuses_non_patchmine_file(tmp_path, capsys, make_bad):
    bad = tmp_path / "bad.h5"
    if make_bad == "text":
        bad.write_text("not hdf5")
    else:
        import h5py

        with h5py.File(bad, "w") as f:
            f["x"] = np.arange(3)
    code, err = _main(capsys, "render", str(bad), "--out", str(tmp_path / "o"))
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in err and "not" in err and str(bad) in err


@pytest.mark.parametrize(
    "extra", [["--channels", "x-1"], ["--channels", "99"], ["--layers", "convv"]]
)
def test_render_cli_bad_arguments(result_file, tmp_path, capsys, extra):
    code, err = _main(capsys, "render", str(result_file), "--out", str(tmp_path / "o"), *extra)
    assert code == 2 and len(err.strip().splitlines()) == 1, err


def _main(capsys, *args: str) -> tuple[int, str]:
    from patchmine.cli import main

    code = main(list(args))
    return code, capsys.readouterr().err


def _sheet_tiles(path: Path, side: int, n: int) -> list[np.ndarray]:
    a = _arr(Image.open(path))
    cols = a.shape[1] // side
    return [a[(i // cols) * side : (i // cols + 1) * side, (i % cols) * side : (i % cols + 1) * side]
            for i in range(n)]  # fmt: skip


def _close(tile: np.ndarray, patch: np.ndarray) -> None:
    """A lossy tile shows its patch: the patch upscaled (nearest) within WebP's error."""
    f = tile.shape[0] // patch.shape[0]
    up = np.repeat(np.repeat(patch.astype(np.int16), f, 0), f, 1)
    err = np.abs(tile - up).mean()
    assert err < 12, err  # noisy synthetic pictures; an unrelated patch is off by ~60
    other = np.abs(tile - np.roll(up, up.shape[0] // 2, axis=(0, 1))).mean()
    assert other > 2.5 * err, (other, err)


@pytest.mark.parametrize("channels", [None, [1, 2]])
def test_gallery_pictures_show_the_stored_patches(tmp_path, result_file, channels):
    """Every top-k tile on disk is its slot's stored patch (up to WebP's loss); every overview tile
    is its channel's best patch (also for the channels left out of the selection), dead ones
    crossed."""
    out = tmp_path / "g"
    gallery.render(result_file, out, channels=channels, overlay="none", progress=False)
    with store.open_result(result_file) as r:
        layer = r.layer("conv")
        side = 66  # 11 px patches stored x6
        for c in channels or range(layer.channels):
            if c == DEAD:
                continue
            n = len(layer.records(c))
            for slot, tile in enumerate(_sheet_tiles(out / "conv" / f"c{c:04d}.webp", side, n)):
                _close(tile, layer.patches(c)[slot])
        for name, side in (("conv", 66), ("fc", 64)):
            layer = r.layer(name)
            got = _sheet_tiles(out / name / "overview.webp", side, layer.channels)
            for c, tile in enumerate(got):
                if name == "conv" and c == DEAD:
                    assert (np.abs(tile - np.array(pictures.RED)).sum(-1) < 60).mean() > 0.03
                else:
                    _close(tile, layer.patches(c)[0])


# ---------------------------------------------------------------------------------------------
# schema v2 datasets (written here with h5py: their writers live on other branches)

NAMES = ["tench", "goldfish", "espresso", "great white shark"]
LABELS = ["cat", "dog", "fish"]


def add_v2(path: Path) -> Path:
    """Add projections, bottom-k, labels, class means, selectivity and channel names to a
    `make_result` file, as schema v2 stores them."""
    import h5py

    rng = np.random.default_rng(1)
    with h5py.File(path, "a") as f:
        f.attrs["version"] = 2
        n = f["images/path"].shape[0]
        f["images/label"] = (np.arange(n) % len(LABELS)).astype(np.int32)
        f.create_dataset("labels/names", data=LABELS, dtype=h5py.string_dtype())
        conv = f["layers/conv"]
        conv["projection"] = rng.normal(0, 1, conv["patch"].shape).astype(np.float16)
        b = conv.create_group("bottom")
        for key in ("score", "image", "yx", "box", "box_orig", "patch", "heat", "projection"):
            b[key] = conv[key][()]
        b["score"][...] = -np.abs(b["score"][()])
        conv["class_mean"] = rng.uniform(0, 1, (C_SPATIAL, len(LABELS))).astype(np.float32)
        conv["selectivity"] = np.linspace(0.1, 0.9, C_SPATIAL).astype(np.float32)
        fc = f["layers/fc"]
        fc.attrs.create("channel_names", NAMES, dtype=h5py.string_dtype())
    return path


@pytest.fixture(scope="module")
def v2_file(tmp_path_factory) -> Path:
    return add_v2(make_result(tmp_path_factory.mktemp("v2")))


def test_reader_v2_datasets(result_file, v2_file):
    with store.open_result(result_file) as r:  # v1: all absent
        conv = r.layer("conv")
        assert conv.projection(0) is None and conv.bottom is None
        assert conv.class_mean is None and conv.selectivity is None and conv.channel_names is None
        assert r.label_names is None and r.image_label is None
    with store.open_result(v2_file) as r:
        conv, fc = r.layer("conv"), r.layer("fc")
        assert conv.projection(1).shape == (K, SIZE, SIZE, 3)
        assert conv.bottom.k == K and (conv.bottom.score[1] <= 0).all()
        np.testing.assert_array_equal(conv.bottom.patches(1), conv.patches(1))
        assert conv.bottom.bottom is None
        assert conv.class_mean.shape == (C_SPATIAL, 3) and conv.selectivity.shape == (C_SPATIAL,)
        assert fc.channel_names == NAMES and r.label_names == LABELS
        assert r.image_label.shape == (r.n_images,)


def test_gallery_shows_v2_datasets(v2_file, tmp_path):
    out = tmp_path / "g"
    gallery.render(v2_file, out, progress=False)
    _check_links(out)
    page = (out / "conv" / "c0001.html").read_text()
    for f in ("c0001_proj.webp", "c0001_bottom.webp", "c0001_bottom_proj.webp"):
        assert (out / "conv" / f).is_file() and f in page
    assert "projections (grey = 0)" in page and "bottom-9" in page
    assert "class selectivity 0.300" in page and "labels of the top-9" in page
    assert "<svg" in page and "activations" in page
    fc = (out / "fc" / "c0002.html").read_text()
    assert "<title>fc · channel 2 - espresso</title>" in fc
    index = (out / "index.html").read_text()
    assert "espresso" in index and "great white shark" in index and 'id="filter"' in index
    layer = (out / "conv" / "index.html").read_text()
    assert "selectivity" in layer and "top label" in layer and "dead channels (1" in layer
    # projections are scaled symmetrically about grey: the mean of a tile is near 128
    a = _arr(Image.open(out / "conv" / "c0001_proj.webp"))[:66, :66]
    assert abs(a.mean() - 128) < 20


def test_rerender_with_fewer_channels_leaves_no_stale_page(result_file, tmp_path):
    out = tmp_path / "g"
    gallery.render(result_file, out, progress=False)
    assert (out / "conv" / "c0004.html").is_file() and (out / "fc").is_dir()
    gallery.render(result_file, out, layers=["conv"], channels=[1], progress=False)
    assert sorted(p.name for p in (out / "conv").glob("c*")) == ["c0001.html", "c0001.webp"]
    assert not (out / "fc").exists()
    kept = {p.name for p in (out / "img").iterdir()}
    with store.open_result(result_file) as r:
        assert kept == {f"i{i:06d}.webp" for i in r.layer("conv").image[1] if i >= 0}
    _check_links(out)


def test_token_layer_overlay_and_crops(tmp_path):
    """A whole-input token layer: the montage shows the token map over the input, and a second
    sheet crops each winning token with one token of context."""
    import h5py

    path = make_result(tmp_path)
    grid, tok = 4, S // 4
    with h5py.File(path, "a") as f:
        fc = f["layers/fc"]
        fc.attrs["layout"] = "tokens"
        fc.attrs["token_grid"] = [grid, grid]
        fc.attrs["prefix_tokens"] = 1
        fc.attrs["token_rf_size"] = [tok, tok]
        fc.attrs["token_rf_stride"] = [tok, tok]
        fc.attrs["token_rf_offset"] = [0, 0]
        heat = np.zeros((C_WHOLE, K, grid, grid), np.float16)
        heat[:, :, 1, 2] = 5.0  # the winning token of every entry
        del fc["heat"]
        fc["heat"] = heat
    with store.open_result(path) as r:
        layer = r.layer("fc")
        plain = _arr(pictures.montage(layer, 0, overlay="none"))
        over = _arr(pictures.montage(layer, 0, overlay="heat"))
        g = pictures.montage_grid(K, P_WHOLE)
        x0, y0, _, _ = g.tile_box(0)
        d = np.abs(plain - over).sum(-1)[y0 : y0 + g.tile, x0 : x0 + g.tile]
        t = g.tile // grid  # the token (1, 2) is where the overlay is strongest
        assert d[t : 2 * t, 2 * t : 3 * t].mean() > 3 * d[3 * t :, :t].mean()
    out = tmp_path / "g"
    gallery.render(path, out, layers=["fc"], progress=False)
    page = (out / "fc" / "c0000.html").read_text()
    assert (out / "fc" / "c0000.webp").is_file() and "c0000_tokens.webp" in page
    assert "the winning token" in page and "tokens 4x4" in (out / "fc" / "index.html").read_text()
