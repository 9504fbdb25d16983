"""Bottom-k (patchmine.bottomk) against a brute-force reference with exact rational IoU, on
activations full of planted ties (repeated values, -0.0 beside 0.0, duplicate images, NaN, +-inf)."""

from __future__ import annotations

import math
import random
from fractions import Fraction

import numpy as np
import pytest
import torch

from patchmine.bottomk import BottomK
from patchmine.maps import reduce_maps
from patchmine.topk import TopK


def suppresses(a: int, b: int, W: int, rf_size, rf_stride) -> bool:
    """Whether the boxes of flat locations a and b overlap by IoU > 1/2 (exact)."""
    (ry, rx), (jy, jx) = rf_size, rf_stride
    dy, dx = abs(a // W - b // W), abs(a % W - b % W)
    inter = max(0, ry - dy * jy) * max(0, rx - dx * jx)
    return Fraction(inter, 2 * ry * rx - inter) > Fraction(1, 2)


def brute_bottom_k(acts: np.ndarray, k: int, per_image: int, rf_size, rf_stride):
    """Per channel: each image's greedy ascending NMS picks, then the k smallest by (score,
    image, location); NaN and +inf never enter."""
    N, C, H, W = acts.shape
    score = np.full((C, k), np.nan, dtype=np.float32)
    image = np.full((C, k), -1, dtype=np.int64)
    yx = np.zeros((C, k, 2), dtype=np.int32)
    for c in range(C):
        entries = []
        for n in range(N):
            m = acts[n, c].reshape(-1)
            avail = [i for i in range(H * W) if not math.isnan(m[i]) and m[i] != math.inf]
            for _ in range(per_image):
                if not avail:
                    break
                best = min(avail, key=lambda i, m=m: (m[i], i))
                entries.append((m[best], n, best))
                avail = [i for i in avail if not suppresses(best, i, W, rf_size, rf_stride)]
        entries.sort(key=lambda e: (e[0], e[1], e[2]))
        for j, (s, n, loc) in enumerate(entries[:k]):
            score[c, j], image[c, j], yx[c, j] = s, n, (loc // W, loc % W)
    return score, image, yx


def planted(seed: int, N: int, C: int, H: int, W: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = (rng.integers(-4, 4, (N, C, H, W)) / 2).astype(np.float32)  # few values: ties everywhere
    zeros = a == 0
    a[zeros & (rng.random(a.shape) < 0.5)] = -0.0
    a[3] = a[1]  # a duplicate image: ties across images
    flat = a.reshape(-1)
    for value in (np.nan, np.nan, np.inf, np.inf, -np.inf):
        flat[rng.integers(0, flat.size)] = value
    a[N - 1, 0] = np.nan  # a map with no candidate at all
    a[N - 2, 1] = np.inf
    return a


def assert_matches(got: dict, want) -> None:
    score, image, yx = want
    s = got["score"].numpy()
    np.testing.assert_array_equal(s, score)
    # bit for bit: the sign of a zero is the activation's own
    np.testing.assert_array_equal(np.signbit(s), np.signbit(score))
    np.testing.assert_array_equal(got["image"].numpy(), image)
    np.testing.assert_array_equal(got["yx"].numpy(), yx)


CASES = [
    (1, (1, 1), (1, 1), (5, 6)),
    (1, (3, 3), (1, 1), (5, 6)),
    (3, (3, 3), (1, 1), (5, 6)),
    (2, (5, 4), (2, 1), (4, 7)),
    (4, (2, 2), (2, 2), (3, 3)),
    (1, (1, 1), (1, 1), (1, 1)),  # an (N, C) node
]


@pytest.mark.parametrize("per_image, rf_size, rf_stride, hw", CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_bottom_k_equals_brute_force(seed, per_image, rf_size, rf_stride, hw):
    N, C, k = 14, 5, 9
    acts = planted(seed, N, C, *hw)
    want = brute_bottom_k(acts, k, per_image, rf_size, rf_stride)
    x = torch.from_numpy(acts)
    if hw == (1, 1):
        x = x[:, :, 0, 0]
    pyrng = random.Random(seed)
    for trial in range(3):
        bk = BottomK(C, k, per_image, hw, rf_size, rf_stride)
        if trial == 2:
            bk._top._sync_free = True  # TopK's device path (no host syncs), run on the CPU
        order = list(range(N))
        pyrng.shuffle(order)  # batches offered in any order
        cuts = sorted({0, N, *pyrng.sample(range(1, N), 4)})
        for lo, hi in zip(cuts[:-1], cuts[1:], strict=True):
            idx = torch.tensor(order[lo:hi])
            # as the first pass offers it: with the minima reduce_maps took for all collectors
            maps = reduce_maps(x[idx], minimum=True) if trial == 1 else None
            bk.add(x[idx], idx, maps)
        assert_matches(bk.result(), want)
        # two shards, one through a state round trip, merged
        a, b = (BottomK(C, k, per_image, hw, rf_size, rf_stride) for _ in range(2))
        a.add(x[: N // 2], torch.arange(N // 2))
        b.add(x[N // 2 :], torch.arange(N // 2, N))
        b = BottomK.from_state_dict(b.state_dict())
        b.merge(a)
        assert_matches(b.result(), want)


def test_bottom_k_is_ascending_and_negative_first():
    acts = torch.tensor([[[[0.5, -2.0], [3.0, -1.0]]], [[[-5.0, 1.0], [0.0, 2.0]]]])
    bk = BottomK(1, 3, fmap_hw=(2, 2))
    bk.add(acts, torch.tensor([0, 1]))
    r = bk.result()
    assert r["score"].tolist() == [[-5.0, -2.0, float("nan")]] or (
        r["score"][0, :2].tolist() == [-5.0, -2.0] and math.isnan(r["score"][0, 2])
    )
    assert r["image"].tolist() == [[1, 0, -1]]
    assert r["yx"][0, :2].tolist() == [[0, 0], [0, 1]]


def test_bottom_k_state_is_not_a_top_k_state():
    bk = BottomK(2, 3, fmap_hw=(2, 2))
    bk.add(torch.randn(4, 2, 2, 2), torch.arange(4))
    sd = bk.state_dict()
    assert sd["order"] == "ascending"
    assert (sd["score"][:, :-1] <= sd["score"][:, 1:]).all()
    tk = TopK(2, 3, fmap_hw=(2, 2))
    with pytest.raises(ValueError, match="not a BottomK state"):
        BottomK(2, 3, fmap_hw=(2, 2)).load_state_dict(tk.state_dict())
    with pytest.raises(ValueError, match="differ"):
        BottomK(2, 4, fmap_hw=(2, 2)).load_state_dict(sd)
    with pytest.raises(TypeError):
        bk.merge(tk)


@pytest.mark.parametrize("per_image", [1, 2])
def test_long_stream_negates_only_the_maps_that_can_enter(per_image, monkeypatch):
    """Once the state is full, most maps of a batch cannot enter and are left un-negated (their
    rows are never read): a long stream in small batches still equals brute force."""
    N, C, k, hw, rf = 120, 4, 3, (5, 5), (3, 3)
    rng = np.random.default_rng(7)
    acts = rng.standard_normal((N, C, *hw)).astype(np.float32)  # few maps reach the bottom 3
    acts[50:52] = planted(7, 4, C, *hw)[:2] - 9  # ties, NaN, +-inf, -0.0 among the winners
    acts[90] = acts[51]  # a later duplicate: ties across images
    want = brute_bottom_k(acts, k, per_image, rf, (1, 1))
    partial = {"n": 0}
    real = torch.empty_like

    def counting(t, *a, **kw):  # the partial branch allocates its buffer with empty_like
        partial["n"] += 1
        return real(t, *a, **kw)

    monkeypatch.setattr(torch, "empty_like", counting)
    bk = BottomK(C, k, per_image, hw, rf, (1, 1))
    x = torch.from_numpy(acts)
    for lo in range(0, N, 7):
        bk.add(x[lo : lo + 7], torch.arange(lo, min(lo + 7, N)))
        if lo % 28 == 0:
            bk.result()  # a look at the state also brings its pending entries in
    monkeypatch.undo()
    assert partial["n"] > 5
    assert_matches(bk.result(), want)
