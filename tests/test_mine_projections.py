"""Projections in result files: ``mine --projection``, merge, ``patchmine project``, reader, montage."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

import patchmine
from patchmine import pictures, store
from patchmine.cli import main
from patchmine.errors import UsageError
from patchmine.merge import merge
from patchmine.mine import mine
from patchmine.projections import METHODS, ProjectionWarning
from patchmine.reproject import project
from tests.conftest import assert_same_file, tiny_settings, write_corpus

LAYERS = ["pool", "conv2", "add", "head"]  # fields 9, 17, 25 px and the whole 64 px input


def _settings(model: str, **kw) -> dict:
    return tiny_settings(model, **{"layers": LAYERS, **kw})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("pc"), 11, seed=3)


@pytest.fixture(scope="module")
def mined(tmp_path_factory, corpus, tiny_model):
    """The file of each projection method ("none" included), made once."""
    made: dict[str, Path] = {}
    folder = tmp_path_factory.mktemp("mined")

    def get(method: str) -> Path:
        if method not in made:
            out = folder / f"{method}.h5"
            mine([corpus], out, **_settings(tiny_model, projection=method))
            made[method] = out
        return made[method]

    return get


@pytest.mark.parametrize("method", METHODS)
def test_zero_outside_the_box_clipped_to_the_input(mined, method):
    """Every stored projection is exactly 0 outside the entry's box clipped to the input (patch
    coordinates; no layer here is resampled), and not 0 everywhere inside it."""
    with store.open_result(mined(method)) as r:
        assert r.attrs["projection"] == method
        s = int(r.attrs["input_size"])
        nonzero = 0
        for name in LAYERS:
            lr = r.layer(name)
            assert lr.projection_attrs["method"] == method
            ds = lr._g["projection"]
            assert ds.dtype == np.float16 and ds.shape[:2] == lr.score.shape  # per slot, also
            # where whole-input patches are stored once per image (patch_ref)
            for c in range(lr.channels):
                proj = lr.projection(c)
                assert proj.dtype == np.float32 and proj.shape == lr.patches(c).shape
                for slot in range(lr.k):
                    p = proj[slot]
                    if lr.image[c, slot] < 0:
                        assert not p.any()
                        continue
                    y0, x0, y1, x1 = (int(v) for v in lr.box[c, slot])
                    assert p.shape[:2] == (y1 - y0, x1 - x0)  # not resampled
                    inside = np.zeros(p.shape[:2], bool)
                    inside[max(0, -y0) : min(s, y1) - y0, max(0, -x0) : min(s, x1) - x0] = True
                    assert not p[~inside].any(), (name, c, slot)
                    nonzero += bool(p[inside].any())
        assert nonzero > 0.9 * sum(int((r.layer(n).image >= 0).sum()) for n in LAYERS)


def test_projection_attrs_and_none(mined):
    with store.open_result(mined("none")) as r:
        assert "projection" not in r.attrs
        for name in LAYERS:
            assert r.layer(name).projection(0) is None
            assert r.layer(name).projection_attrs is None
    with store.open_result(mined("deconvnet")) as r:
        counts = {n: r.layer(n).projection_attrs["n_modified"] for n in LAYERS}
    assert counts == {"pool": 1, "conv2": 1, "add": 2, "head": 2}  # the ReLUs before each node
    with store.open_result(mined("gradient")) as r:
        assert all(r.layer(n).projection_attrs["n_modified"] == 0 for n in LAYERS)


def test_the_other_datasets_do_not_change(mined):
    """Projections add datasets and a root attribute; patches, heat maps, scores stay the same."""
    a, b = mined("none"), mined("deconvnet")
    with h5py.File(a) as fa, h5py.File(b) as fb:
        for name in LAYERS:
            for key in fa["layers"][name]:
                if isinstance(fa["layers"][name][key], h5py.Dataset):
                    np.testing.assert_array_equal(
                        fa["layers"][name][key][()], fb["layers"][name][key][()], err_msg=key
                    )
        assert set(fb["layers"]["pool"]) - set(fa["layers"]["pool"]) == {"projection"}


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_identical_across_batch_sizes(tmp_path, corpus, tiny_model, mined, batch_size):
    out = tmp_path / "b.h5"
    mine([corpus], out, **_settings(tiny_model, projection="deconvnet", batch_size=batch_size))
    assert_same_file(mined("deconvnet"), out)


@pytest.mark.parametrize("method", METHODS)
def test_packing_leaves_the_file_unchanged(
    tmp_path, corpus, tiny_model, mined, method, monkeypatch
):
    """Entries with disjoint boxes share a backward; the file is the one that one backward per
    entry (without packing) gives, bit for bit."""
    from patchmine import projections

    pack, shared = projections._pack, []

    def spy(rows, boxes=None, max_rows=None):
        copy_of, round_of = pack(rows, boxes, max_rows)
        shared.append(len(set(zip(copy_of.tolist(), round_of.tolist(), strict=True))) < len(rows))
        return copy_of, round_of

    monkeypatch.setattr(projections, "_pack", spy)
    packed = tmp_path / "packed.h5"
    mine([corpus], packed, **_settings(tiny_model, projection=method))
    assert any(shared)
    monkeypatch.setattr(projections.Projector, "packable", lambda self, node: False)
    shared.clear()
    single = tmp_path / "single.h5"
    mine([corpus], single, **_settings(tiny_model, projection=method))
    assert shared and not any(shared)
    assert_same_file(single, packed)
    assert_same_file(mined(method), packed)


def test_shards_merge_to_one_run(tmp_path, corpus, tiny_model, mined):
    parts = []
    for i in range(3):
        parts.append(tmp_path / f"part-{i}.h5")
        mine([corpus], parts[-1], shard=(i, 3), **_settings(tiny_model, projection="deconvnet"))
    out = merge([parts[1], parts[2], parts[0]], tmp_path / "all.h5")
    assert_same_file(mined("deconvnet"), out)


def test_merge_refuses_mixed_projections(tmp_path, corpus, tiny_model):
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    mine([corpus], a, shard=(0, 2), **_settings(tiny_model, projection="deconvnet"))
    mine([corpus], b, shard=(1, 2), **_settings(tiny_model))
    with pytest.raises(UsageError, match="projection method"):
        merge([a, b], tmp_path / "all.h5")


def _same_layers(a: Path, b: Path, names) -> None:
    """Every dataset of the layers ``names`` is the same in files ``a`` and ``b``."""
    with h5py.File(a) as fa, h5py.File(b) as fb:
        for name in names:
            ga, gb = fa["layers"][name], fb["layers"][name]
            assert set(ga) == set(gb), name
            for key, ds in ga.items():
                if isinstance(ds, h5py.Dataset):
                    np.testing.assert_array_equal(ds[()], gb[key][()], err_msg=f"{name}/{key}")


def test_projection_layers_subset(tmp_path, corpus, tiny_model, mined, capsys):
    """--projection-layers: only those layers get projections, the very ones a run projecting
    every layer stores; the others equal a run without projections; recorded and shown by info."""
    out = tmp_path / "some.h5"
    kw = _settings(tiny_model, projection="deconvnet")
    mine([corpus], out, projection_layers=["add", "pool"], **kw)
    _same_layers(mined("deconvnet"), out, ["pool", "add"])
    _same_layers(mined("none"), out, ["conv2", "head"])
    with store.open_result(out) as r:
        assert r.attrs["projection"] == "deconvnet"
        assert r.attrs["projection_layers"] == ["pool", "add"]  # in mining order
        assert r.layer("conv2").projection(0) is None
    assert main(["info", str(out)]) == 0
    assert "deconvnet (per entry, beside each patch; layers pool, add)" in capsys.readouterr().out


def test_projection_layers_errors(tmp_path, corpus, tiny_model, capsys):
    args = ["mine", str(corpus), "--out", str(tmp_path / "x.h5"), "--model", tiny_model, "-q"]
    args += ["--weights", "none", "--layers", "pool,add"]
    assert main([*args, "--projection-layers", "pool"]) == 2
    assert "needs --projection" in capsys.readouterr().err
    assert main([*args, "--projection", "guided", "--projection-layers", "conv2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "conv2" in err and "pool, add" in err, err
    assert not (tmp_path / "x.h5").exists()


def test_project_layers_subset_then_all(tmp_path, mined, capsys):
    """`project --layers` projects only those layers (as mining them with projections does) and
    records them; a later `project` of every layer drops the record."""
    out = tmp_path / "p.h5"
    shutil.copy(mined("none"), out)
    assert main(["project", str(out), "--layers", "head,conv2", "-j", "0", "-q"]) == 0
    _same_layers(mined("deconvnet"), out, ["conv2", "head"])
    _same_layers(mined("none"), out, ["pool", "add"])
    with store.open_result(out) as r:
        assert r.attrs["projection_layers"] == ["conv2", "head"]
    assert main(["project", str(out), "--layers", "nope", "-q"]) == 2
    assert "no layer nope" in capsys.readouterr().err
    assert main(["project", str(out), "-j", "0", "-q"]) == 0
    assert_same_file(mined("deconvnet"), out)


def test_merge_refuses_different_projection_layers(tmp_path, corpus, tiny_model):
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    kw = _settings(tiny_model, projection="deconvnet")
    mine([corpus], a, shard=(0, 2), projection_layers=["pool"], **kw)
    mine([corpus], b, shard=(1, 2), **kw)
    with pytest.raises(UsageError, match="projection layers"):
        merge([a, b], tmp_path / "all.h5")


@pytest.mark.parametrize("method", ["deconvnet", "guided"])
def test_project_equals_mining_with_them(tmp_path, mined, method):
    """`patchmine project` on a file mined without projections (or with another method) gives
    the file that mining with them gives, bit for bit."""
    out = tmp_path / "p.h5"
    shutil.copy(mined("none" if method == "deconvnet" else "gradient"), out)
    assert main(["project", str(out), "--method", method, "-b", "5", "-j", "0", "-q"]) == 0
    assert_same_file(mined(method), out)
    assert not [p for p in tmp_path.iterdir() if p.name != "p.h5"]  # no temp files left


def test_project_failure_leaves_the_file(tmp_path, mined, monkeypatch):
    out = tmp_path / "p.h5"
    shutil.copy(mined("none"), out)
    before = out.read_bytes()

    def boom(*a, **kw):
        raise OSError(5, "I/O error")

    monkeypatch.setattr(store, "_projection_dataset", boom)
    with pytest.raises(OSError):
        project(out, "deconvnet", workers=0, progress=False)
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["p.h5"]


def test_project_refuses_bad_input(tmp_path, mined, capsys):
    good = mined("none")
    cut = tmp_path / "cut.h5"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert main(["project", str(cut), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cut.h5" in err, err
    assert main(["project", str(tmp_path / "missing.h5"), "-q"]) == 2
    assert main(["project", str(good), "--method", "deconvnt", "-q"]) == 2
    err = capsys.readouterr().err
    assert "deconvnet" in err and "guided" in err and "gradient" in err


def test_project_refuses_changed_images(tmp_path, tiny_model):
    images = write_corpus(tmp_path / "c", 5, seed=9, duplicates=False)
    out = tmp_path / "r.h5"
    mine([images], out, **_settings(tiny_model, layers=["pool"], k=2))
    with store.open_result(out) as r:
        first = r.image_paths[int(r.layer("pool").image[0, 0])]
    shutil.copy(images / "img_002.png" if first != "img_002.png" else images / "img_001.png",
                images / first)  # fmt: skip
    with pytest.raises(UsageError, match="cannot project"):
        project(out, "deconvnet", workers=0, progress=False)


def test_typo_exits_2_naming_the_methods(tmp_path, corpus, tiny_model, capsys):
    args = ["mine", str(corpus), "--out", str(tmp_path / "x.h5"), "--model", tiny_model]
    assert main([*args, "--weights", "none", "--projection", "deconvnt", "-q"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert all(m in err for m in ("deconvnet", "guided", "gradient", "none"))
    assert not (tmp_path / "x.h5").exists()


def test_warning_when_no_op_is_modified(tmp_path, corpus):
    model = tmp_path / "linear.py"
    model.write_text(
        "import torch.nn as nn\n"
        "def build():\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3, stride=2))\n"
    )
    with pytest.warns(ProjectionWarning, match="equals gradient"):
        mine(
            [corpus],
            tmp_path / "l.h5",
            **_settings(f"{model}:build", layers=["1"], k=2, projection="guided"),
        )
    with store.open_result(tmp_path / "l.h5") as r:
        assert r.layer("1").projection_attrs == {"method": "guided", "n_modified": 0}


def test_montage_shows_projections_beside_patches(mined):
    with patchmine.open(mined("deconvnet")) as r:
        lr = r.layer("add")
        plain = pictures.montage(lr, 1)
        both = pictures.montage(lr, 1, overlay="projection")
        assert both.height == plain.height and both.width > 1.8 * plain.width
        right = np.asarray(both)[:, both.width - plain.width :]
        np.testing.assert_array_equal(right[40:], np.asarray(plain)[40:])  # below the header
    with patchmine.open(mined("none")) as r, pytest.raises(UsageError, match="no projections"):
        pictures.montage(r.layer("add"), 1, overlay="projection")


def test_pipeline_key(tmp_path):
    from patchmine.pipeline import load_pipeline

    toml = tmp_path / "p.toml"
    body = '[corpus]\npaths = ["c"]\n[mine]\nout = "o.h5"\nprojection = "{}"\n'
    toml.write_text(body.format("guided"))
    assert load_pipeline(toml).mine["projection"] == "guided"
    toml.write_text(body.format("guided") + 'projection_layers = ["a", "b"]\n')
    assert load_pipeline(toml).mine["projection_layers"] == ["a", "b"]
    toml.write_text(body.format("guide"))
    with pytest.raises(UsageError, match="deconvnet, guided, gradient or none"):
        load_pipeline(toml)


@pytest.mark.slow
def test_torchrun_two_ranks_equal_one_process(tmp_path, corpus, tiny_model, mined):
    """The second pass spread over two ranks gathers the projections too."""
    from tests.test_scaleout import _finish, _torchrun

    out = tmp_path / "tr.h5"
    args = [str(corpus), "--out", str(out), "--model", tiny_model, "--weights", "none"]
    args += ["--layers", ",".join(LAYERS), "-k", "4", "--input-size", "64", "-b", "4", "-j", "0"]
    _finish(_torchrun(2, [*args, "--projection", "deconvnet", "-q"]))
    assert_same_file(mined("deconvnet"), out)


def test_token_and_cls_nodes(tmp_path):
    """ViT token and @cls nodes: projections of the mined map's units (through the token view),
    0 outside the token's patch before the first attention, the same across batch sizes."""
    from tests.test_tokens import MODELS, POST, PRE, S, make_image

    models = tmp_path / "tokmodels.py"
    models.write_text(MODELS)
    images = tmp_path / "c"
    images.mkdir()
    for i in range(6):
        make_image(700 + i, (S, S)).save(images / f"t{i}.png")
    layers = [PRE, f"{POST}@cls"]
    files = []
    for b in (2, 8):
        files.append(tmp_path / f"v{b}.h5")
        with pytest.warns(ProjectionWarning):  # GELU, no ReLU: guided equals gradient
            mine([images], files[-1], model=f"{models}:vit", weights="none", layers=layers,
                 k=3, input_size=S, batch_size=b, workers=0, progress=False,
                 projection="guided")  # fmt: skip
    assert_same_file(*files)
    with store.open_result(files[0]) as r:
        pre = r.layer(PRE)
        for c in range(pre.channels):
            for slot in range(pre.k):
                y0, x0, y1, x1 = (int(v) for v in pre.box[c, slot])
                p = pre.projection(c)[slot]
                assert p.shape[:2] == (y1 - y0, x1 - x0) == (8, 8) and p.any()
        cls = r.layer(f"{POST}@cls").projection(0)
        assert cls.shape == (3, S, S, 3) and all(cls[s].any() for s in range(3))


def test_bottom_k_entries_get_projections(tmp_path, corpus, tiny_model):
    """With --bottom-k, bottom/projection too (0 outside the box), and `project` adds both."""
    with_, without = tmp_path / "w.h5", tmp_path / "p.h5"
    mine([corpus], with_, **_settings(tiny_model, bottom_k=True, projection="deconvnet"))
    mine([corpus], without, **_settings(tiny_model, bottom_k=True))
    with store.open_result(with_) as r:
        s = int(r.attrs["input_size"])
        for name in ["conv2", "add"]:  # nodes that go negative
            b = r.layer(name).bottom
            assert b.projection_attrs["method"] == "deconvnet"
            for c in range(b.channels):
                for slot in np.flatnonzero(b.image[c] >= 0):
                    y0, x0, y1, x1 = (int(v) for v in b.box[c, slot])
                    p = b.projection(c)[slot]
                    inside = np.zeros(p.shape[:2], bool)
                    inside[max(0, -y0) : min(s, y1) - y0, max(0, -x0) : min(s, x1) - x0] = True
                    assert not p[~inside].any() and p[inside].any()
    project(without, "deconvnet", batch_size=3, workers=0, progress=False)
    assert_same_file(with_, without)
