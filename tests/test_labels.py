"""Labels, channel names and class statistics (patchmine.labels) against independent references:
label files written by hand, torchvision's category lists, exact rational class means."""

from __future__ import annotations

import math
import os
import random
import socket
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from patchmine import labels as labels_module
from patchmine.corpus import discover
from patchmine.errors import UsageError
from patchmine.labels import (
    ClassMeans,
    assign_labels,
    channel_names,
    layer_channel_names,
    read_channel_names,
    selectivity,
)
from patchmine.models import LoadedModel, load_model


def touch(root: Path, *names: str) -> Path:
    """Empty image files (discovery goes by extension; nothing here decodes them)."""
    for name in names:
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")
    return root


def by_path(corpus, names, label) -> dict[str, str | None]:
    return {
        f"{corpus.root_index[i]}:{p}": (names[label[i]] if label[i] >= 0 else None)
        for i, p in enumerate(corpus.paths)
    }


# ----------------------------------------------------------------------------- --labels folder
def test_folder_labels_first_level_under_each_root(tmp_path):
    a = touch(tmp_path / "a", "cat/1.png", "dog/2.jpg", "top.png", "cat/deep/3.png")
    b = touch(tmp_path / "b", "bird/x/4.png", "cat/5.png")
    corpus = discover([a, b])
    names, label = assign_labels(corpus, "folder")
    assert names == ["bird", "cat", "dog"]
    assert label.dtype == torch.int32 and label.shape == (len(corpus),)
    assert by_path(corpus, names, label.tolist()) == {
        "0:cat/1.png": "cat",
        "0:cat/deep/3.png": "cat",
        "0:dog/2.jpg": "dog",
        "0:top.png": None,  # directly in its root
        "1:bird/x/4.png": "bird",
        "1:cat/5.png": "cat",  # the same folder name under another root: the same label
    }


def test_folder_labels_from_a_file_list(tmp_path):
    touch(tmp_path / "data", "cat/1.png", "dog/2.png")
    touch(tmp_path, "outside.png")
    lst = tmp_path / "data" / "list.txt"
    lst.write_text(
        f"cat/1.png\n./dog/2.png\n../outside.png\n{tmp_path / 'data' / 'cat' / '1.png'}\n"
    )
    corpus = discover([lst])
    names, label = assign_labels(corpus, "folder")
    assert names == ["cat", "dog"]
    # relative, normalized; outside its root: none; absolute inside the root: its first folder
    assert label.tolist() == [0, 1, -1, 0]


def test_numeric_names_sort_as_numbers(tmp_path):
    root = touch(tmp_path, "10/a.png", "2/b.png", "1/c.png", "999/d.png")
    names, label = assign_labels(discover([root]), "folder")
    assert names == ["1", "2", "10", "999"]
    root2 = touch(tmp_path / "x", "b10/a.png", "b2/b.png")
    assert assign_labels(discover([root2]), "folder")[0] == ["b10", "b2"]


def test_folder_labels_nothing(tmp_path):
    root = touch(tmp_path, "a.png", "b.png")
    with pytest.raises(UsageError, match="no image lies in a class folder"):
        assign_labels(discover([root]), "folder")


# ---------------------------------------------------------------------------- --labels FILE.csv
def test_csv_labels(tmp_path):
    a = touch(tmp_path / "a", "x/1.png", "x/2.png", "y,z.png", "3.png", "4.png")
    b = touch(tmp_path / "b", "x/1.png")
    corpus = discover([a, b])
    csv = tmp_path / "labels.csv"
    csv.write_text(
        "path,label\n"
        "x/2.png,dog\n"
        "\n"
        '"y,z.png",cat\n'
        f"{b / 'x' / '1.png'},cat\n"  # absolute: picks the root
        f"{a / 'x' / '1.png'}, dog \n"
        "./3.png,dog\n"
        "3.png,dog\n"  # the same image and label twice: fine
    )
    names, label = assign_labels(corpus, csv)
    assert names == ["cat", "dog"]
    assert by_path(corpus, names, label.tolist()) == {
        "0:3.png": "dog",
        "0:4.png": None,  # not in the file
        "0:x/1.png": "dog",
        "0:x/2.png": "dog",
        "0:y,z.png": "cat",
        "1:x/1.png": "cat",
    }


def test_csv_without_header_and_repeated_corpus_entries(tmp_path):
    touch(tmp_path, "a.png", "b.png")
    lst = tmp_path / "list.txt"
    lst.write_text("a.png\nb.png\na.png\n")  # a.png listed twice: both copies get its label
    csv = tmp_path / "l.csv"
    csv.write_text("a.png,1\nb.png,0\n")
    names, label = assign_labels(discover([lst]), csv)
    assert names == ["0", "1"] and label.tolist() == [1, 0, 1]


@pytest.mark.parametrize(
    "text, line, what",
    [
        ("path,label\na.png,cat\nmissing.png,dog\n", 3, "'missing.png' is not in the corpus"),
        ("a.png,cat,extra\n", 1, "malformed row"),
        ("a.png,cat\n\nb.png\n", 3, "malformed row"),
        ("a.png,\n", 1, "malformed row"),
        (",cat\n", 1, "malformed row"),
        ("a.png,cat\nb.png,dog\na.png,dog\n", 3, "labelled 'dog' here but 'cat' on line 1"),
        ("x/1.png,cat\n", 1, "under 2 corpus roots"),
    ],
)
def test_csv_errors_name_file_and_line(tmp_path, text, line, what):
    a = touch(tmp_path / "a", "a.png", "b.png", "x/1.png")
    b = touch(tmp_path / "b", "x/1.png")
    csv = tmp_path / "labels.csv"
    csv.write_text(text)
    with pytest.raises(UsageError) as e:
        assign_labels(discover([a, b]), csv)
    msg = str(e.value)
    assert msg.startswith(f"{csv}:{line}: ") and what in msg, msg


@pytest.mark.parametrize("text", ["", "\n\n", "path,label\n", "PATH,Label\n\n"])
def test_csv_that_labels_nothing(tmp_path, text):
    root = touch(tmp_path / "a", "a.png")
    csv = tmp_path / "labels.csv"
    csv.write_text(text)
    with pytest.raises(UsageError, match=f"{csv}: labels nothing"):
        assign_labels(discover([root]), csv)


def test_label_spec_neither_folder_nor_file(tmp_path):
    corpus = discover([touch(tmp_path / "a", "c/a.png")])
    with pytest.raises(UsageError, match="no such file"):
        assign_labels(corpus, tmp_path / "nope.csv")
    with pytest.raises(UsageError, match="it is a directory"):
        assign_labels(corpus, tmp_path)
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b'"unterminated\x00,x\n')
    with pytest.raises(UsageError, match="bad.csv"):
        assign_labels(corpus, bad)


# ----------------------------------------------------------------------------- channel names
@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_alexnet_logits_named_from_weights_meta(no_network):
    model = load_model("alexnet", "none")
    want = torchvision.models.AlexNet_Weights.IMAGENET1K_V1.meta["categories"]
    got = channel_names(model, "classifier.6", 1000)
    assert got == list(want) and len(got) == 1000
    assert channel_names(model, "features.0", 64) is None
    assert channel_names(model, "classifier.4", 4096) is None
    # the same channel count on a node that is not the output: no names
    assert channel_names(model, "classifier.5", 1000) is None


def test_torchvision_weights_name_picks_its_own_meta():
    module = torchvision.models.get_model("alexnet", weights=None)
    lm = LoadedModel(module, "alexnet", "AlexNet_Weights.IMAGENET1K_V1", (0, 0, 0), (1, 1, 1), 224)
    assert channel_names(lm, "classifier.6", 1000)[967] == "espresso"


def test_embedded_model_fc_named_imagenet(no_network):
    from torchvision.models._meta import _IMAGENET_CATEGORIES

    model = load_model(None, "none")
    got = channel_names(model, "_fc", 1000)
    assert got == list(_IMAGENET_CATEGORIES)
    assert got[967] == "espresso"
    assert channel_names(model, "_relu1", 1280) is None


def test_channel_names_file(tmp_path, tiny_model):
    model = load_model(tiny_model)
    assert channel_names(model, "head", 5) is None  # a custom model declares no classes
    f = tmp_path / "names.txt"
    f.write_text("zero\none\ntwo\nthree\nfour\n\n")
    names = read_channel_names(f)
    assert names == ["zero", "one", "two", "three", "four"]
    got = layer_channel_names(model, {"conv1": 6, "head": 5, "flatten": 8}, f)
    assert got == {"head": names}
    f.write_text("a\nb\n")
    with pytest.raises(
        UsageError, match=r"has 2 names, but no mined layer has 2 channels \(conv1 6"
    ):
        layer_channel_names(model, {"conv1": 6, "head": 5}, f)


def test_channel_names_file_wins_over_weights(tmp_path):
    model = load_model("alexnet", "none")
    f = tmp_path / "n.txt"
    f.write_text("".join(f"c{i}\n" for i in range(1000)))
    got = layer_channel_names(model, {"features.0": 64, "classifier.6": 1000}, f)
    assert list(got) == ["classifier.6"] and got["classifier.6"][967] == "c967"
    got = layer_channel_names(model, {"features.0": 64, "classifier.6": 1000})
    assert list(got) == ["classifier.6"] and got["classifier.6"][967] == "espresso"


@pytest.mark.parametrize(
    "text, match",
    [("", "no channel names"), ("\n\n", "no channel names"), ("a\n\nb\n", r"n\.txt:2: blank line")],
)
def test_channel_names_file_errors(tmp_path, text, match):
    f = tmp_path / "n.txt"
    f.write_text(text)
    with pytest.raises(UsageError, match=match):
        read_channel_names(f)
    with pytest.raises(UsageError, match="cannot read"):
        read_channel_names(tmp_path / "absent.txt")


# -------------------------------------------------------------------------------- ClassMeans
def nasty_values(rng: np.random.Generator, n: int, c: int) -> np.ndarray:
    """float32 (n, c) over the whole range: huge and tiny magnitudes, subnormals, zeros of both
    signs, exact repeats and cancelling pairs, so that any float rounding in the sums would show."""
    v = rng.standard_normal((n, c)) * np.exp2(rng.integers(-40, 40, (n, c)))
    v = v.astype(np.float32)
    flat = v.reshape(-1)
    picks = rng.choice(flat.size, size=min(flat.size, 12), replace=False)
    specials = np.array(
        [3e38, -3e38, 1e-42, -1e-45, 0.0, -0.0, 1.0, 1.0, 2.0**-126, 1e30, -1e30, 7.0],
        dtype=np.float32,
    )
    flat[picks] = specials[: picks.size]
    return v


def exact_class_means(v: np.ndarray, lab: np.ndarray, L: int) -> np.ndarray:
    """Rational means, rounded once to float32 (via the nearest float64)."""
    C = v.shape[1]
    out = np.full((C, L), np.nan, dtype=np.float32)
    for c in range(C):
        for j in range(L):
            vals = [Fraction(float(x)) for x in v[lab == j, c]]
            if vals:
                out[c, j] = np.float32(float(sum(vals) / len(vals)))
    return out


def equal_states(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, torch.Tensor):
            if x.shape != y.shape or x.dtype != y.dtype or not torch.equal(x, y):
                return False
        elif x != y:
            return False
    return True


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_class_means_equal_exact_recomputation(seed):
    rng = np.random.default_rng(seed)
    N, C, L = 90, 7, 5
    v = nasty_values(rng, N, C)
    lab = rng.integers(-1, L - 1, N)  # label L-1 has no image: NaN
    cm = ClassMeans(C, L)
    cm.add(torch.from_numpy(v), torch.from_numpy(lab))
    class_mean, sel = cm.result()
    assert class_mean.dtype == torch.float32 and class_mean.shape == (C, L)
    np.testing.assert_array_equal(class_mean.numpy(), exact_class_means(v, lab, L))
    assert cm.count.tolist() == [int((lab == j).sum()) for j in range(L)]
    assert sel.dtype == torch.float32 and sel.shape == (C,)


@pytest.mark.parametrize("seed", [0, 1])
def test_class_means_state_identical_across_batchings_orders_merges_resume(seed, monkeypatch):
    rng = np.random.default_rng(seed)
    N, C, L = 120, 6, 4
    v = torch.from_numpy(nasty_values(rng, N, C))
    lab = torch.from_numpy(rng.integers(-1, L, N))
    one = ClassMeans(C, L)
    one.add(v, lab)
    want = one.state_dict()

    def run(order, cuts):
        cm = ClassMeans(C, L)
        for lo, hi in zip(cuts[:-1], cuts[1:], strict=True):
            idx = order[lo:hi]
            cm.add(v[idx], lab[idx])
        return cm

    pyrng = random.Random(seed)
    for trial in range(6):
        order = torch.from_numpy(rng.permutation(N)) if trial % 2 else torch.arange(N)
        cuts = sorted({0, N, *pyrng.sample(range(1, N), pyrng.randint(0, 12))})
        assert equal_states(run(order, cuts).state_dict(), want)
        # shards merged in a random tree
        parts = [
            run(order[lo:hi], [0, hi - lo]) for lo, hi in zip(cuts[:-1], cuts[1:], strict=True)
        ]
        while len(parts) > 1:
            i = pyrng.randrange(len(parts) - 1)
            parts[i].merge(parts.pop(i + 1))
        assert equal_states(parts[0].state_dict(), want)
        # resume: state -> new accumulator -> the rest
        half = cuts[len(cuts) // 2]
        first = run(order[:half], [0, half])
        resumed = ClassMeans.from_state_dict(first.state_dict())
        resumed.add(v[order[half:]], lab[order[half:]])
        assert equal_states(resumed.state_dict(), want)
    # the carry that keeps the int64 limbs from overflowing changes nothing either
    monkeypatch.setattr(labels_module, "_NORMALIZE_AT", 5)
    small = run(torch.arange(N), list(range(0, N, 3)) + [N])
    assert equal_states(small.state_dict(), want)
    a, b = run(torch.arange(60), [0, 7, 60]), run(torch.arange(60, N), [0, 9, 60])
    a.merge(b)
    assert equal_states(a.state_dict(), want)
    r1, r2 = one.result(), small.result()
    assert all(torch.equal(x, y) for x, y in zip(r1, r2, strict=True))


def test_class_means_cancellation_is_exact():
    cm = ClassMeans(1, 1)
    v = torch.tensor([[1e30], [1.0], [-1e30], [2.0**-149], [-(2.0**-149)]], dtype=torch.float32)
    cm.add(v, torch.zeros(5, dtype=torch.int64))
    assert cm.result()[0].item() == np.float32(1 / 5)
    cm = ClassMeans(1, 1)
    cm.add(torch.tensor([[-3.0], [1.0]]), torch.tensor([0, 0]))  # a negative sum
    assert cm.result()[0].item() == -1.0


def test_class_means_non_finite():
    v = torch.tensor([[math.inf, math.nan, math.inf, 1.0], [1.0, 2.0, -math.inf, 1.0]])
    cm = ClassMeans(4, 1)
    cm.add(v, torch.tensor([0, 0]))
    mean = cm.result()[0][:, 0]
    assert mean[0] == math.inf and math.isnan(mean[1]) and math.isnan(mean[2]) and mean[3] == 1.0
    sd = cm.state_dict()
    assert sd["nonfinite"].shape == (3, 4, 1)
    assert ClassMeans(4, 1).state_dict()["nonfinite"].shape == (0, 4, 1)
    again = ClassMeans.from_state_dict(sd)
    assert equal_states(again.state_dict(), sd)


def test_class_means_refuse_mismatches():
    cm = ClassMeans(3, 2)
    with pytest.raises(ValueError, match="channels 3, labels 2 here vs 3, 4"):
        cm.merge(ClassMeans(3, 4))
    with pytest.raises(ValueError, match="labels must lie in"):
        cm.add(torch.zeros(2, 3), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match=r"must be \(N, 3\)"):
        cm.add(torch.zeros(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="version"):
        cm.load_state_dict({**cm.state_dict(), "version": 99})


def selectivity_by_hand(row: list[float]) -> float:
    m_max = max(row)
    rest = list(row)
    rest.remove(m_max)
    m_rest = sum(rest) / len(rest)
    return float("nan") if m_max + m_rest == 0 else (m_max - m_rest) / (m_max + m_rest)


def test_selectivity_formula():
    rng = np.random.default_rng(3)
    N, C, L = 200, 9, 6
    v = rng.gamma(1.0, 1.0, (N, C)).astype(np.float32)  # non-negative, like ReLU outputs
    lab = rng.integers(0, L, N)
    cm = ClassMeans(C, L)
    cm.add(torch.from_numpy(v), torch.from_numpy(lab))
    class_mean, sel = cm.result()
    want = [selectivity_by_hand([float(x) for x in row]) for row in class_mean.numpy()]
    np.testing.assert_allclose(sel.numpy(), np.array(want, dtype=np.float32), rtol=1e-6)
    assert ((sel >= 0) & (sel <= 1)).all()
    # worked values: one class at 3, the others at 1: (3 - 1) / (3 + 1)
    table = torch.tensor(
        [
            [3.0, 1.0, 1.0],
            [1.0, 1.0, 1.0],
            [1.0, -1.0, -1.0],
            [0.0, 0.0, 0.0],
            [2.0, math.nan, 0.0],
            [4.0, 4.0, 0.0],
        ]
    )
    got = selectivity(table).tolist()
    assert got[:2] == [0.5, 0.0] and all(math.isnan(x) for x in got[2:5])
    assert got[5] == pytest.approx((4 - 2) / (4 + 2))  # a tie: the other 4 is among the rest


def test_selectivity_leaves_out_labels_without_images():
    cm = ClassMeans(2, 3)
    cm.add(torch.tensor([[3.0, 1.0], [1.0, 1.0]]), torch.tensor([0, 2]))
    class_mean, sel = cm.result()
    assert math.isnan(class_mean[0, 1]) and sel.tolist() == [0.5, 0.0]
    one = ClassMeans(1, 3)
    one.add(torch.tensor([[2.0]]), torch.tensor([1]))
    assert math.isnan(one.result()[1].item())  # one label with images: no selectivity


@pytest.mark.corpus
@pytest.mark.slow
def test_embedded_logits_class_means_find_their_class(tmp_path):
    """On the 500 shared photos (one per even ImageNet class, in class folders made here), the
    embedded model's ``_fc`` channel of each class has its highest class mean on that class."""
    from tests.conftest import SHARED_CORPUS

    if not SHARED_CORPUS.is_dir():
        pytest.skip("needs ../shared/corpus/imagenet-sample-500")
    from patchmine.corpus import load_rgb, preprocess
    from patchmine.taps import Tap

    root = tmp_path / "classes"
    for f in sorted(SHARED_CORPUS.iterdir()):
        (root / f.name[:9]).mkdir(parents=True)
        os.symlink(f, root / f.name[:9] / f.name)
    corpus = discover([root])
    names, label = assign_labels(corpus, "folder")
    assert len(names) == 500 and names == sorted(names)
    model = load_model()
    tap = Tap(model.module, ["_fc"], model.mean, model.std)
    cm = ClassMeans(1000, len(names))
    for lo in range(0, len(corpus), 32):
        idx = range(lo, min(lo + 32, len(corpus)))
        px = np.stack([preprocess(load_rgb(corpus.file(i)), 224)[0] for i in idx])
        with torch.inference_mode():
            logits = tap(torch.from_numpy(px).permute(0, 3, 1, 2))["_fc"]
        cm.add(logits, label[lo : lo + len(idx)])
    class_mean, _ = cm.result()
    cats = channel_names(model, "_fc", 1000)
    wnids = sorted({p.name[:9] for p in SHARED_CORPUS.iterdir()})
    assert names == wnids
    channel = [2 * j for j in range(len(names))]  # class index of the j-th sorted wnid
    hits = sum(int(class_mean[c].argmax()) == j for j, c in enumerate(channel))
    assert hits >= 0.85 * len(names), (hits, cats[channel[0]])


def test_class_means_made_under_inference_mode_merge_outside_it():
    """A first pass fills its accumulators under torch.inference_mode; a torchrun merge after it
    runs outside (tensors made in that mode cannot be updated in place outside it)."""
    a, b = ClassMeans(3, 2), ClassMeans(3, 2)
    with torch.inference_mode():
        a.add(torch.tensor([[1.0, -2.0, float("nan")]]), torch.tensor([0]))
        b.add(torch.tensor([[4.0, 0.5, float("inf")]]), torch.tensor([0]))
    a.merge(b)
    mean, _ = a.result()
    assert mean[:, 0].tolist()[:2] == [2.5, -0.75] and math.isnan(mean[2, 0])
