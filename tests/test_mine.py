"""Mining end to end: brute-force exactness, invariance to batching/workers, resume, faithful patches."""

from __future__ import annotations

import signal
import time

import numpy as np
import pytest
import torch

import patchmine
from patchmine.corpus import CorpusDataset, discover
from patchmine.errors import UsageError
from patchmine.mine import mine
from patchmine.models import load_model
from patchmine.receptive import receptive_fields
from patchmine.taps import Tap
from tests.conftest import (
    TINY_LAYERS,
    assert_same_file,
    assert_winners,
    popen_cli,
    run_cli,
    signal_at,
    tiny_settings,
    write_corpus,
)

LITE0_LAYERS = ["_blocks.2.add", "_blocks.7.add", "_fc"]
CASES = {
    "tiny": (None, ["pool", "add", "head"], 64),
    "lite0": ("efficientnet_lite0", LITE0_LAYERS, 96),
}


def _model(case, tiny_model):
    name, layers, size = CASES[case]
    return (name or tiny_model), layers, size


# The tiny net's fields by hand (DESIGN.md rules): conv1 5x5/2 pad 2 -> r 5, j 2, o -2; pool 3x3/2
# pad 1 -> r 5 + 2*2 = 9, j 4, o -2 - 1*2 = -4; conv2 3x3 pad 1 -> r 17, o -8; conv3 -> r 25, o -12;
# add = the union (r 25, o -12); head after global pooling: the whole input.
TINY_FIELDS = {
    "pool": ((9, 9), (4, 4), (-4, -4)),
    "add": ((25, 25), (4, 4), (-12, -12)),
    "head": "whole",
}


def _box(field, y: int, x: int, size: int) -> tuple[int, int, int, int]:
    """Unit (y, x)'s box written out: rows [y*stride + offset, y*stride + offset + size), the
    same for columns; the whole input for a whole-input field."""
    if field.whole:
        return (0, 0, size, size)
    (ry, rx), (jy, jx), (oy, ox) = field.size, field.stride, field.offset
    return (y * jy + oy, x * jx + ox, y * jy + oy + ry, x * jx + ox + rx)


def _iou(a, b) -> float:
    iy = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ix = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iy * ix
    area = (a[2] - a[0]) * (a[3] - a[1])
    return inter / (2 * area - inter)


def inside_by_pixels(field, fmap_hw, size: int) -> np.ndarray:
    """(H, W): the pixels of each unit's box inside the input, counted one by one, over the most a
    box of that size can have inside (its area, or the input's side per axis when larger)."""
    h, w = fmap_hw
    out = np.ones((h, w))
    if field.whole:
        return out
    most = min(field.size[0], size) * min(field.size[1], size)
    for y in range(h):
        for x in range(w):
            y0, x0, y1, x1 = _box(field, y, x, size)
            ys, xs = np.arange(y0, y1), np.arange(x0, x1)
            inside = ((ys >= 0) & (ys < size))[:, None] & ((xs >= 0) & (xs < size))[None, :]
            out[y, x] = int(inside.sum()) / most
    return out


def brute_force(model, layers, size, corpus_dir, k, per_image, min_inside=None, bottom=False):
    """Every activation of every image, sorted by hand: the reference the file must equal (with
    ``min_inside``, over the units whose box has at least that share inside the input).

    With ``bottom`` the k most negative entries (``--bottom-k``), ascending, under the same rules.
    """
    sign = -1.0 if bottom else 1.0  # rank by sign * activation, best first
    lm = load_model(model, "none", size)
    corpus = discover([corpus_dir])
    ds = CorpusDataset(corpus, size)
    tap = Tap(lm.module, layers, lm.mean, lm.std)
    fields = receptive_fields(lm.module, size, layers)
    acts = {n: [] for n in layers}
    index = []
    with torch.inference_mode():
        for i in range(len(ds)):
            item = ds[i]
            if item["ok"]:
                out = tap(item["pixels"][None])
                for n in layers:
                    a = out[n][0]
                    acts[n].append((a if a.ndim == 3 else a[:, None, None]).numpy())
                index.append(i)
    ref = {}
    for n in layers:
        a = np.stack(acts[n])  # (N, C, H, W)
        _, c, h, w = a.shape
        loc_boxes = [_box(fields[n], *divmod(j, w), size) for j in range(h * w)]
        allowed = np.ones(h * w, bool)
        if min_inside is not None:
            allowed = inside_by_pixels(fields[n], (h, w), size).reshape(-1) >= min_inside
        score = np.full((c, k), np.nan, np.float32)
        image = np.full((c, k), -1, np.int64)
        yx = np.zeros((c, k, 2), np.int32)
        for ch in range(c):
            entries = []
            for row, img in enumerate(index):
                flat = a[row, ch].reshape(-1)
                order = sorted(np.flatnonzero(allowed), key=lambda j, f=flat: (-sign * f[j], j))
                kept: list[int] = []
                for j in order:
                    if len(kept) == per_image:
                        break
                    if all(_iou(loc_boxes[j], loc_boxes[q]) <= 0.5 for q in kept):
                        kept.append(j)
                entries += [(-sign * float(flat[j]), img, j) for j in kept]
            entries.sort()
            for slot, (key, img, j) in enumerate(entries[:k]):
                score[ch, slot], image[ch, slot] = -sign * key, img
                yx[ch, slot] = divmod(j, w)
        ref[n] = (score, image, yx, a)
    return ref, fields


@pytest.mark.parametrize("case", ["tiny", "lite0"])
@pytest.mark.parametrize("per_image", [1, 2])
def test_matches_brute_force_and_is_invariant(tmp_path, corpus_dir, tiny_model, case, per_image):
    model, layers, size = _model(case, tiny_model)
    k = 4
    ref, fields = brute_force(model, layers, size, corpus_dir, k, per_image)
    if case == "tiny":  # the fields the boxes below are built from, against the hand derivation
        got = {n: "whole" if f.whole else (f.size, f.stride, f.offset) for n, f in fields.items()}
        assert got == TINY_FIELDS
    outs = []
    for bs, workers in [(16, 0), (3, 2), (1, 0)]:
        out = tmp_path / f"b{bs}w{workers}.h5"
        mine(
            [corpus_dir],
            out,
            model=model,
            weights="none",
            layers=layers,
            k=k,
            per_image=per_image,
            input_size=size,
            batch_size=bs,
            workers=workers,
            progress=False,
        )
        outs.append(out)
    for other in outs[1:]:
        assert_same_file(outs[0], other)
    with patchmine.open(outs[0]) as r:
        assert r.layers == layers
        for n in layers:
            lr = r.layer(n)
            score, image, yx, a = ref[n]
            assert_winners(lr, score, image, yx, n)
            used = image >= 0
            want = [_box(fields[n], y, x, size) for y, x in yx[used].tolist()]
            assert lr.box[used].tolist() == [list(b) for b in want], n
            st = lr.stats()
            assert np.array_equal(st["count"], np.full(a.shape[1], a[:, 0].size))
            assert np.array_equal(st["max"], a.max(axis=(0, 2, 3)))
            assert np.allclose(st["mean"], a.mean(axis=(0, 2, 3), dtype=np.float64), atol=1e-5)
            assert lr.heat(0).shape == (k, *a.shape[2:])


def test_file_layout_and_api(tmp_path, corpus_dir, tiny_model):
    out = tmp_path / "r.h5"
    settings = tiny_settings(tiny_model, layers=["pool", "head"], k=3, workers=None)
    s = mine([corpus_dir], out, **settings)
    assert s.n_images == len(discover([corpus_dir])) and s.n_failed == 0
    with patchmine.open(out) as r:
        a = r.attrs
        for key in [
            "model",
            "weights",
            "input_size",
            "mean",
            "std",
            "k",
            "per_image",
            "n_images",
            "n_failed",
            "created_utc",
            "patchmine_version",
            "torch_version",
            "torchvision_version",
            "corpus_roots",
        ]:
            assert key in a, key
        assert a["format"] == "patchmine" and a["version"] == 2
        assert (
            a["resize"] == 64
        )  # default: the input size (torchvision's Resize(S) + CenterCrop(S))
        pool, head = r.layer("pool"), r.layer("head")
        assert pool.attrs["rf_size"] == [9, 9] and pool.attrs["rf_stride"] == [4, 4]
        assert pool.patches(0).shape == (3, 9, 9, 3)
        assert head.attrs["rf_whole"] and head.attrs["fmap_hw"] == [1, 1]
        assert np.array_equal(head.box[:, 0], np.tile([0, 0, 64, 64], (5, 1)))
        assert head.patches(0).shape == (3, 64, 64, 3)
        rec = pool.records(0)[0]
        assert r.image_file(rec["image"]).is_file() and rec["score"] == pool.score[0, 0]
        with pytest.raises(KeyError, match="pool"):
            r.layer("pol")


def test_patches_are_faithful(tmp_path, corpus_dir, tiny_model):
    """Paste a patch at its box into a mean-colored input: the unit gives the recorded score."""
    size, layers = 64, ["pool", "add"]
    out = tmp_path / "f.h5"
    mine(
        [corpus_dir],
        out,
        model=tiny_model,
        weights="none",
        layers=layers,
        k=3,
        input_size=size,
        progress=False,
    )
    lm = load_model(tiny_model, "none", size)
    tap = Tap(lm.module, layers, lm.mean, lm.std)
    fill = np.array([round(m * 255) for m in lm.mean], np.uint8)
    checked = 0
    with patchmine.open(out) as r, torch.inference_mode():
        for n in layers:
            lr = r.layer(n)
            assert max(lr.attrs["rf_size"]) <= lr.patch_size  # not resampled
            for ch in range(lr.channels):
                patches = lr.patches(ch)
                for slot in range(lr.k):
                    y0, x0, y1, x1 = lr.box[ch, slot]
                    canvas = np.tile(fill, (size, size, 1))
                    sy0, sx0, sy1, sx1 = max(y0, 0), max(x0, 0), min(y1, size), min(x1, size)
                    canvas[sy0:sy1, sx0:sx1] = patches[
                        slot, sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0
                    ]
                    outside = np.ones((y1 - y0, x1 - x0), bool)
                    outside[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = False
                    assert (patches[slot][outside] == fill).all()
                    px = torch.from_numpy(canvas.transpose(2, 0, 1).copy())[None]
                    y, x = lr.yx[ch, slot]
                    got = float(tap(px)[n][0, ch, y, x])
                    assert got == pytest.approx(float(lr.score[ch, slot]), rel=1e-4, abs=1e-5)
                    checked += 1
    assert checked > 20


def test_a_listed_file_is_forwarded_once_for_all_its_copies(
    tmp_path, corpus_dir, tiny_model, monkeypatch
):
    """A list naming every file three times: the winners are the brute force's (copies tie, the
    first wins), the second pass reads each winner file once, and every copy's entry gets its
    image's heat map and patch; the file does not depend on the batch size."""
    from patchmine.corpus import CorpusLoader
    from tests.test_patches import reference_cut

    files = [str(corpus_dir / p) for p in discover([corpus_dir]).paths]
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(files + files[::-1] + files) + "\n")
    layers, size, k = TINY_LAYERS, 64, 6
    ref, _ = brute_force(tiny_model, layers, size, listing, k, 1)
    read = []
    real = CorpusLoader.batches

    def batches(self, indices, **kw):
        read.append([int(i) for i in indices])
        return real(self, indices, **kw)

    monkeypatch.setattr(CorpusLoader, "batches", batches)
    outs = []
    for bs in (16, 1):
        outs.append(tmp_path / f"b{bs}.h5")
        s = mine([listing], outs[-1], **tiny_settings(tiny_model, k=k, batch_size=bs))
    assert_same_file(outs[0], outs[1])
    corpus = discover([listing])
    winners = np.unique(np.concatenate([ref[n][1][ref[n][1] >= 0] for n in layers]))
    first = {}
    for i in winners.tolist():
        first.setdefault(corpus.file(i), i)
    assert read[-1] == sorted(first.values())  # the last run's second pass: each file once
    assert s.winner_images == len(first) < len(winners)
    ds = CorpusDataset(corpus, size)
    with patchmine.open(outs[0]) as r:
        fill = [round(m * 255) for m in r.attrs["mean"]]
        for n in layers:
            lr = r.layer(n)
            score, image, yx, a = ref[n]
            assert_winners(lr, score, image, yx, n)
            for ch in range(lr.channels):
                heat, patches = lr.heat(ch), lr.patches(ch)
                for slot in np.flatnonzero(image[ch] >= 0):
                    i = int(image[ch, slot])
                    want = a[i, ch].reshape(heat.shape[1:]).astype(np.float16)
                    assert np.array_equal(heat[slot], want), (n, ch, slot)
                    cut = reference_cut(
                        ds[i]["pixels"][None],
                        np.array([0]),
                        lr.box[ch, slot][None],
                        lr.patch_size,
                        fill,
                    )
                    assert np.array_equal(patches[slot], cut[0].numpy()), (n, ch, slot)


def test_sigkill_then_resume_gives_the_same_file(tmp_path, tiny_model):
    corpus = write_corpus(tmp_path / "c", 160, seed=3)
    common = [
        "--model",
        tiny_model,
        "--weights",
        "none",
        "--layers",
        "pool,add,head",
        "-k",
        "5",
        "--input-size",
        "64",
        "--batch-size",
        "1",
        "--workers",
        "0",
        "-q",
    ]
    ref = tmp_path / "ref.h5"
    p = run_cli("mine", corpus, "--out", ref, *common)
    assert p.returncode == 0, p.stderr
    out = tmp_path / "run.h5"
    ckpt = tmp_path / "run.h5.ckpt"
    p = popen_cli("mine", corpus, "--out", out, "--checkpoint-every", "3", *common)
    deadline = time.time() + 120
    while not ckpt.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert ckpt.exists(), "the run ended before its first checkpoint"
    assert not out.exists()
    cursor = torch.load(ckpt, weights_only=False)["cursor"]
    assert 0 < cursor < 161
    # the same command without --resume refuses to clobber the checkpoint
    q = run_cli("mine", corpus, "--out", out, *common)
    assert q.returncode == 2 and "--resume" in q.stderr
    r = run_cli("mine", corpus, "--out", out, "--resume", *common)
    assert r.returncode == 0, r.stderr
    assert not ckpt.exists()
    assert_same_file(ref, out)


def test_resume_refuses_changed_settings(tmp_path, corpus_dir, tiny_model, monkeypatch):
    out = tmp_path / "x.h5"
    base = dict(
        model=tiny_model, weights="none", layers=["pool"], k=3, input_size=64, progress=False
    )
    mine([corpus_dir], out, **base)
    ckpt = tmp_path / "y.h5.ckpt"
    # make a checkpoint by interrupting a run right at its first batch
    import patchmine.miner as m

    with monkeypatch.context() as mp:
        signal_at(mp, m.TopK, "add", call=2)
        with pytest.raises(KeyboardInterrupt):
            mine([corpus_dir], tmp_path / "y.h5", batch_size=2, **base)
    assert ckpt.exists() and not (tmp_path / "y.h5").exists()
    for change, match in [
        ({"k": 4}, "k: checkpoint 3, now 4"),
        ({"layers": ["add"]}, "layers"),
        ({"per_image": 2}, "per_image"),
        ({"resize": 80}, "resize: checkpoint 64, now 80"),
    ]:
        with pytest.raises(UsageError, match=match):
            mine([corpus_dir], tmp_path / "y.h5", resume=True, **{**base, **change})
    with pytest.raises(UsageError, match="corpus"):
        mine([corpus_dir / "img_000.jpg"], tmp_path / "y.h5", resume=True, **base)
    s = mine([corpus_dir], tmp_path / "y.h5", resume=True, batch_size=2, **base)
    assert s.resumed_from > 0
    with patchmine.open(out) as a, patchmine.open(tmp_path / "y.h5") as b:
        assert np.array_equal(a.layer("pool").score, b.layer("pool").score, equal_nan=True)
