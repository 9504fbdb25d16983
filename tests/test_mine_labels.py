"""Mining with --labels, --channel-names and --bottom-k end to end: the file against brute force
(per-image maxima averaged by hand, every activation sorted by hand), identical across batch sizes,
shards + merge, resume and torchrun; channel names against torchvision's lists; the docs' snippets."""

from __future__ import annotations

import os
import re
from fractions import Fraction
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torchvision

import patchmine
from patchmine.cli import main
from patchmine.errors import UsageError
from patchmine.merge import merge
from patchmine.mine import mine
from patchmine.pipeline import load_pipeline
from tests.conftest import (
    SHARED_CORPUS,
    assert_same_file,
    assert_winners,
    signal_at,
    tiny_settings,
    write_corpus,
)
from tests.test_mine import brute_force

REPO = Path(__file__).resolve().parents[1]
LAYERS = ["pool", "add", "head"]
CLASSES = ["cat", "dog", "eel"]


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    """Three class folders of 5 images (cat has a duplicate: an exact tie) and 2 unlabelled
    images directly in the root."""
    root = tmp_path_factory.mktemp("labelled")
    for j, name in enumerate(CLASSES):
        write_corpus(root / name, 5, seed=j + 1, duplicates=name == "cat")
    write_corpus(root, 2, seed=9, duplicates=False)
    return root


def settings(model: str, per_image: int = 1, **change) -> dict:
    base = {"layers": LAYERS, "batch_size": 5, "labels": "folder", "bottom_k": True}
    return tiny_settings(model, per_image=per_image, **{**base, **change})


@pytest.fixture(scope="module")
def single(tmp_path_factory, labelled, tiny_model):
    """The single-process file of the labelled corpus per ``per_image``, made once."""
    made: dict = {}
    folder = tmp_path_factory.mktemp("single")

    def get(per_image: int) -> Path:
        if per_image not in made:
            made[per_image] = folder / f"p{per_image}.h5"
            mine([labelled], made[per_image], **settings(tiny_model, per_image))
        return made[per_image]

    return get


def exact_mean(values) -> np.float32:
    """A mean of float32 values, summed as rationals and rounded once (via float64)."""
    return np.float32(float(sum(Fraction(float(v)) for v in values) / len(values)))


# ------------------------------------------------------------------------- against brute force
@pytest.mark.parametrize("per_image", [1, 2])
def test_labels_class_means_and_bottom_k_equal_brute_force(
    tmp_path, labelled, tiny_model, single, per_image, monkeypatch
):
    out = single(per_image)
    other = tmp_path / "b2w2.h5"  # another batching and worker count: the same file
    monkeypatch.setattr("patchmine.miner._CLASS_BATCH", 3)  # maxima added every 2 batches
    mine([labelled], other, **settings(tiny_model, per_image, batch_size=2, workers=2))
    assert_same_file(out, other)
    top, fields = brute_force(tiny_model, LAYERS, 64, labelled, 4, per_image)
    bottom, _ = brute_force(tiny_model, LAYERS, 64, labelled, 4, per_image, bottom=True)
    with patchmine.open(out) as r:
        assert r.attrs["version"] == 2 and r.attrs["bottom_k"] and r.attrs["labels"] == "folder"
        assert r.label_names == CLASSES
        want = [CLASSES.index(p.split("/")[0]) if "/" in p else -1 for p in r.image_paths]
        assert r.image_label.dtype == np.int32 and r.image_label.tolist() == want
        with h5py.File(out) as f:
            count = f["labels/count"][()]
        assert count.tolist() == [6, 5, 5]
        for n in LAYERS:
            lr = r.layer(n)
            score, image, yx, a = top[n]
            assert_winners(lr, score, image, yx, n)
            b_score, b_image, b_yx, _ = bottom[n]
            b = lr.bottom
            assert b is not None and b.k == 4
            assert_winners(b, b_score, b_image, b_yx, n)
            assert (np.diff(b.score, axis=1) >= 0).all(), n  # ascending
            for c in range(lr.channels):  # heat maps of the bottom entries: their images' maps
                for slot in range(4):
                    np.testing.assert_array_equal(
                        b.heat(c)[slot], a[b_image[c, slot], c].astype(np.float16)
                    )
            assert b.patches(0).shape[0] == 4
            # class means: each image's max of the map, averaged per label by hand
            per_image_max = a.reshape(*a.shape[:2], -1).max(2)  # (N, C); every image decodes
            C, L = per_image_max.shape[1], len(CLASSES)
            ref = np.array(
                [
                    [exact_mean(per_image_max[np.array(want) == j, c]) for j in range(L)]
                    for c in range(C)
                ],
                np.float32,
            )
            np.testing.assert_array_equal(lr.class_mean, ref)
            # selectivity: (m_max - m_rest) / (m_max + m_rest), m_rest the mean of the others
            m = lr.class_mean.astype(np.float64)
            m_max = m.max(1)
            m_rest = (m.sum(1) - m_max) / (L - 1)
            sel = ((m_max - m_rest) / (m_max + m_rest)).astype(np.float32)
            np.testing.assert_array_equal(lr.selectivity, sel)
            rec = lr.records(0)
            assert [x["label"] for x in rec] == [
                CLASSES[want[i]] if want[i] >= 0 else None for i in lr.image[0]
            ]
            assert all(x["channel_name"] is None for x in rec)  # the tiny net has no names


def test_shards_merged_resumed_equal_one_run(tmp_path, labelled, tiny_model, single):
    ref = single(1)
    parts = [tmp_path / f"part{i}.h5" for i in range(3)]
    for i, part in enumerate(parts):
        mine([labelled], part, shard=(i, 3), **settings(tiny_model))
    with patchmine.open(parts[2]) as r:  # labels are assigned on the whole corpus
        assert r.label_names == CLASSES
    out = merge([parts[1], parts[2], parts[0]], tmp_path / "merged.h5")
    assert_same_file(ref, out)

    # a shard without --bottom-k, or with other labels, does not belong to the run
    plain = tmp_path / "plain1.h5"
    mine([labelled], plain, shard=(1, 3), **settings(tiny_model, bottom_k=False))
    with pytest.raises(UsageError, match="bottom-k"):
        merge([parts[0], plain, parts[2]], tmp_path / "m2.h5")
    csv = tmp_path / "labels.csv"
    csv.write_text("path,label\ncat/img_000.jpg,cat\ndog/img_000.jpg,dog\n")
    other = tmp_path / "other1.h5"
    mine([labelled], other, shard=(1, 3), **settings(tiny_model, labels=csv))
    with pytest.raises(UsageError, match="labels"):
        merge([parts[0], other, parts[2]], tmp_path / "m3.h5")


def _interrupted(tmp_path, corpus, model, out) -> Path:
    """A checkpoint of ``out``'s run, stopped by SIGINT during its second batch."""
    import patchmine.miner as m

    with pytest.MonkeyPatch.context() as mp:
        signal_at(mp, m.TopK, "add", call=len(LAYERS) + 1)
        with pytest.raises(KeyboardInterrupt):
            mine([corpus], out, **settings(model, batch_size=3))
    ckpt = out.with_name(out.name + ".ckpt")
    assert ckpt.exists() and not out.exists()
    return ckpt


def test_resume_gives_the_same_file_and_refuses_changed_labels(
    tmp_path, labelled, tiny_model, single
):
    out = tmp_path / "r.h5"
    _interrupted(tmp_path, labelled, tiny_model, out)
    csv = tmp_path / "labels.csv"
    csv.write_text("path,label\ncat/img_000.jpg,cat\n")
    for change, match in [
        ({"labels": None}, "labels: checkpoint '3 names"),
        ({"labels": csv}, "labels: checkpoint '3 names, sha256 [0-9a-f]+', now '1 names"),
        ({"bottom_k": False}, "bottom_k: checkpoint True, now None"),
    ]:
        with pytest.raises(UsageError, match=match):
            mine([labelled], out, resume=True, **settings(tiny_model, batch_size=3, **change))
    s = mine([labelled], out, resume=True, **settings(tiny_model, batch_size=3))
    assert s.resumed_from > 0
    assert_same_file(single(1), out)


@pytest.mark.slow
def test_torchrun_two_ranks_equal_one_process(tmp_path, labelled, tiny_model, single):
    from tests.test_scaleout import _finish, _torchrun

    out = tmp_path / "tr.h5"
    args = [str(labelled), "--out", str(out), "--model", tiny_model, "--weights", "none"]
    args += ["--layers", ",".join(LAYERS), "-k", "4", "--input-size", "64", "--batch-size", "5"]
    args += ["--workers", "0", "--labels", "folder", "--bottom-k", "-q"]
    _finish(_torchrun(2, args))
    assert_same_file(single(1), out)


# ------------------------------------------------------------------------------ channel names
def _imagenet() -> list[str]:
    return list(torchvision.models.ResNet50_Weights.IMAGENET1K_V2.meta["categories"])


def test_channel_names_of_alexnet_and_the_embedded_model(tmp_path, corpus_dir, capsys):
    alex, lite = tmp_path / "alex.h5", tmp_path / "lite.h5"
    common = {"k": 1, "workers": 0, "progress": False}
    mine([corpus_dir], alex, model="alexnet", weights="none", input_size=96,
         layers=["features.0", "classifier.6"], **common)  # fmt: skip
    mine([corpus_dir], lite, layers=["_blocks.2.add", "_fc"], input_size=96, **common)
    want = list(torchvision.models.AlexNet_Weights.DEFAULT.meta["categories"])
    assert want == _imagenet() and len(want) == 1000
    with patchmine.open(alex) as r:
        assert r.layer("classifier.6").channel_names == want
        assert r.layer("features.0").channel_names is None
        rec = r.layer("classifier.6").records(967)[0]
        assert rec["channel_name"] == "espresso" and rec["label"] is None
    with patchmine.open(lite) as r:
        assert r.layer("_fc").channel_names == want
        assert r.layer("_blocks.2.add").channel_names is None
    assert main(["info", str(lite)]) == 0
    out = capsys.readouterr().out
    assert "channel names: channel 0 - tench, channel 1 - goldfish, ..., " in out
    assert "channel 999 - toilet tissue" in out


def test_channel_names_file(tmp_path, corpus_dir, tiny_model):
    names = tmp_path / "names.txt"
    names.write_text("".join(f"class {i}\n" for i in range(5)))
    out = tmp_path / "n.h5"
    mine([corpus_dir], out, **settings(tiny_model, labels=None, bottom_k=False, k=1),
         channel_names=names)  # fmt: skip
    with patchmine.open(out) as r:
        assert r.layer("head").channel_names == [f"class {i}" for i in range(5)]
        assert r.layer("add").channel_names is None  # 8 channels, not 5
        assert r.label_names is None and r.image_label is None
        assert r.layer("add").bottom is None and r.layer("add").class_mean is None


# --------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "text, line, what",
    [
        ("path,label\ncat/img_000.jpg,cat\ncat/img_001.png\n", 3, "malformed row"),
        ("cat/img_000.jpg,cat\n\nnowhere/x.jpg,cat\n", 3, "is not in the corpus"),
    ],
)
def test_bad_label_file_exits_2_naming_file_and_line(
    tmp_path, labelled, tiny_model, capsys, text, line, what
):
    csv = tmp_path / "bad.csv"
    csv.write_text(text)
    rc = main(["mine", str(labelled), "--out", str(tmp_path / "x.h5"), "--model", tiny_model,
               "--weights", "none", "--input-size", "64", "--labels", str(csv), "-q"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert err.startswith("patchmine mine: error: ") and f"{csv}:{line}: " in err and what in err
    assert not (tmp_path / "x.h5").exists()


def test_pipeline_keys(tmp_path, tiny_model):
    from patchmine.corpus import discover

    write_corpus(tmp_path / "corpus" / "a", 2)
    (tmp_path / "labels.csv").write_text("a/img_000.jpg,x\n")
    job = tmp_path / "job.toml"
    body = (f'[corpus]\npaths = ["corpus"]\n[mine]\nout = "r.h5"\nmodel = "{tiny_model}"\n'
            'labels = "labels.csv"\nbottom_k = true\n')  # fmt: skip
    job.write_text(body)
    p = load_pipeline(job)
    assert p.mine["labels"] == str(tmp_path / "labels.csv") and p.mine["bottom_k"] is True
    s = p.settings(discover([tmp_path / "corpus"]))
    assert s["bottom_k"] is True and s["labels_file"]
    (tmp_path / "labels.csv").write_text("a/img_000.jpg,y\n")  # new contents: out of date
    assert (
        load_pipeline(job).settings(discover([tmp_path / "corpus"]))["labels_file"]
        != s["labels_file"]
    )
    job.write_text(body.replace("bottom_k = true", 'bottom_k = "yes"'))
    with pytest.raises(UsageError, match="bottom_k must be true or false"):
        load_pipeline(job)


# ------------------------------------------------------------------------------ docs/analysis.md
def test_analysis_doc_snippets_run(tmp_path, single, monkeypatch, capsys):
    """Every ```python block of docs/analysis.md, in order, in one namespace, on a mined file
    (matplotlib blocks only where matplotlib is installed)."""
    text = (REPO / "docs" / "analysis.md").read_text()
    blocks = re.findall(r"^```python( matplotlib)?\n(.*?)^```", text, re.S | re.M)
    assert len(blocks) >= 6
    try:
        import matplotlib  # noqa: F401

        plots = True
    except ImportError:
        plots = False
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    for i, (kind, code) in enumerate(blocks):
        if kind and not plots:
            continue
        exec(compile(code, f"docs/analysis.md block {i}", "exec"), ns)
        if i == 0:  # the settings block: point it at the test's file
            ns.update(path=str(single(1)), layer="add", other="pool")
    out = capsys.readouterr().out
    assert "channel" in out and "selectivity" in out and "most negative" in out
    if plots:
        assert (tmp_path / "channel_hist.png").is_file()


# --------------------------------------------------------------------------------- real photos
@pytest.mark.corpus
@pytest.mark.slow
def test_real_photos_logits_class_means_find_their_class(tmp_path):
    """The 500 shared photos (one per even ImageNet class) as class folders made here, mined with
    --labels folder: the embedded model's ``_fc`` channel of each class has its highest class
    mean on that class for at least 85% of the classes."""
    if not SHARED_CORPUS.is_dir():
        pytest.skip("needs ../shared/corpus/imagenet-sample-500")
    root = tmp_path / "classes"
    photos = sorted(SHARED_CORPUS.iterdir())
    for f in photos:
        (root / f.name[:9]).mkdir(parents=True, exist_ok=True)
        os.symlink(f, root / f.name[:9] / f.name)
    out = tmp_path / "photos.h5"
    mine([root], out, layers=["_fc"], k=1, batch_size=32, progress=False, labels="folder")
    with patchmine.open(out) as r:
        names, fc = r.label_names, r.layer("_fc")
        assert names == sorted({f.name[:9] for f in photos}) and len(names) == 500
        assert fc.channel_names == _imagenet()
        class_mean = fc.class_mean
    channel = [2 * j for j in range(len(names))]  # the j-th sorted wnid is ImageNet class 2j
    hits = sum(int(np.argmax(class_mean[c])) == j for j, c in enumerate(channel))
    assert hits >= 0.85 * len(names), hits
    assert torch.from_numpy(class_mean).isfinite().all()


def test_image_max_leaves_nan_out_on_either_path():
    """The per-image maxima the class means take: from `reduce_maps` (CPU) and without it (the
    device path) alike; NaN values left out, a map of NaN only gives NaN, infinities kept."""
    from patchmine.maps import reduce_maps
    from patchmine.miner import _image_max

    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 5, 4, 4, generator=g)
    a[0, 1, 2, 3] = float("nan")  # one NaN: the max of the rest
    a[1, 2] = float("nan")  # all NaN
    a[2, 3, 0, 0], a[2, 3, 1, 1] = float("inf"), float("-inf")  # both infinities: +inf
    a[2, 4] = float("-inf")
    want = torch.tensor(
        [
            [np.nanmax(m) if not np.isnan(m).all() else np.nan for m in img.reshape(5, -1).numpy()]
            for img in a
        ]  # fmt: skip
    )
    for got in (_image_max(a, reduce_maps(a)), _image_max(a, None)):
        torch.testing.assert_close(got, want, equal_nan=True, rtol=0, atol=0)
    flat = a[:, :, 0, 0].contiguous()  # (N, C) nodes
    torch.testing.assert_close(_image_max(flat, None), _image_max(flat, reduce_maps(flat)),
                               equal_nan=True, rtol=0, atol=0)  # fmt: skip


def test_min_inside_bars_units_from_the_bottom_k_too(tmp_path, labelled, tiny_model):
    out = tmp_path / "inside.h5"
    mine([labelled], out, **settings(tiny_model, min_inside=0.8))
    ref, _ = brute_force(tiny_model, LAYERS, 64, labelled, 4, 1, min_inside=0.8, bottom=True)
    with patchmine.open(out) as r:
        for n in LAYERS:
            score, image, yx, _ = ref[n]
            assert_winners(r.layer(n).bottom, score, image, yx, n)
