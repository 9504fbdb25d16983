"""``--jpeg-draft``: reduced-scale JPEG decoding keeps the geometry of the full image."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import patchmine
from patchmine import cli
from patchmine.corpus import CorpusDataset, discover, load_rgb
from tests.conftest import assert_same_file, make_image


@pytest.fixture()
def jpegs(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    make_image(1, (300, 260)).resize((600, 520)).save(d / "a_big.jpg", quality=95)  # 2x: drafted
    make_image(2, (120, 90)).save(d / "b_small.jpg", quality=95)  # too small: full decode
    make_image(3, (530, 610)).save(d / "c_big.png")  # not a JPEG: full decode
    turned = make_image(4, (300, 240)).resize((900, 720))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated a quarter
    turned.save(d / "d_turned.jpg", quality=95, exif=exif)
    return d


def test_draft_keeps_shape_and_transform(jpegs):
    corpus = discover([jpegs])
    full = CorpusDataset(corpus, 64)
    draft = CorpusDataset(corpus, 64, jpeg_draft=True)
    reduced = []
    for i in range(len(corpus)):
        a, b = full[i], draft[i]
        assert a["ok"] and b["ok"]
        assert np.array_equal(a["shape"], b["shape"])  # the full image's size, not the draft's
        assert np.allclose(a["transform"], b["transform"], rtol=1e-6)
        mad = (a["pixels"].float() - b["pixels"].float()).abs().mean()
        reduced.append(bool(mad > 0))
        assert mad < 8
    assert reduced == [True, False, False, True]
    assert load_rgb(jpegs / "a_big.jpg", draft=64).size == (75, 65)  # 1/8
    assert load_rgb(jpegs / "d_turned.jpg").size == (720, 900)


def test_mine_records_draft(tmp_path, jpegs, tiny_model):
    args = ["--model", tiny_model, "--weights", "none", "-k", "2", "--input-size", "64", "-q"]
    outs = []
    for extra in ([], ["--jpeg-draft"], ["--jpeg-draft", "-b", "1", "-j", "1"]):
        outs.append(tmp_path / f"r{len(outs)}.h5")
        assert cli.main(["mine", str(jpegs), "--out", str(outs[-1]), *args, *extra]) == 0
    with patchmine.open(outs[0]) as a, patchmine.open(outs[1]) as b:
        assert not a.attrs["jpeg_draft"] and b.attrs["jpeg_draft"]
        assert np.array_equal(a.image_shape, b.image_shape)
    assert_same_file(outs[1], outs[2])  # deterministic across batch size and workers
