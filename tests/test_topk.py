"""TopK against a brute-force reference; batching, order, merge and state invariance."""

import io
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from patchmine.topk import TopK


def reference(acts, images, k, per_image=1, rf_size=(1, 1), rf_stride=(1, 1)):
    """Direct reference: every candidate of every map, sorted by the composite key."""
    acts = np.asarray(acts, dtype=np.float32)
    if acts.ndim == 2:
        acts = acts[:, :, None, None]
    N, C, H, W = acts.shape
    (ry, rx), (jy, jx) = rf_size, rf_stride

    def overlaps(a, b):
        dy, dx = abs(a // W - b // W), abs(a % W - b % W)
        inter = max(0, ry - dy * jy) * max(0, rx - dx * jx)
        return Fraction(inter, 2 * ry * rx - inter) > Fraction(1, 2)

    score = np.full((C, k), np.nan, np.float32)
    image = np.full((C, k), -1, np.int64)
    yx = np.zeros((C, k, 2), np.int32)
    for c in range(C):
        entries = []
        for n in range(N):
            flat = acts[n, c].reshape(-1)
            locs = [i for i in range(H * W) if not np.isnan(flat[i]) and flat[i] > -np.inf]
            locs.sort(key=lambda i: (-flat[i], i))
            kept = []
            for i in locs:
                if len(kept) == per_image:
                    break
                if all(not overlaps(i, j) for j in kept):
                    kept.append(i)
            entries += [(-float(flat[i]), int(images[n]), i) for i in kept]
        entries.sort()
        for r, (s, img, i) in enumerate(entries[:k]):
            score[c, r], image[c, r], yx[c, r] = -s, img, (i // W, i % W)
    return {"score": score, "image": image, "yx": yx}


def tied_acts(rng, shape, nan=0.0, levels=4):
    """Small integers: many exact ties, about half ReLU zeros; optional NaN / -inf sprinkle."""
    a = rng.integers(-levels, levels, size=shape).clip(min=0).astype(np.float32)
    if nan:
        a[rng.random(shape) < nan] = np.nan
        a[rng.random(shape) < nan / 2] = -np.inf
    return a


def run(acts, images, k, per_image=1, fmap_hw=(1, 1), batches=None, sync_free=False, **rf):
    tk = TopK(acts.shape[1], k, per_image, fmap_hw, device="cpu", **rf)
    tk._sync_free = sync_free
    batches = batches if batches is not None else [np.arange(len(images))]
    for b in batches:
        tk.add(torch.from_numpy(acts[b]), torch.from_numpy(np.asarray(images)[b]))
    return tk


def assert_same(res, ref):
    np.testing.assert_array_equal(res["score"].numpy(), ref["score"])
    np.testing.assert_array_equal(res["image"].numpy(), ref["image"])
    np.testing.assert_array_equal(res["yx"].numpy(), ref["yx"])
    assert res["score"].dtype == torch.float32
    assert res["image"].dtype == torch.int64
    assert res["yx"].dtype == torch.int32


def random_batches(rng, n):
    perm = rng.permutation(n)
    cuts = np.sort(rng.choice(np.arange(1, n), size=min(3, n - 1), replace=False)) if n > 1 else []
    parts = np.split(perm, cuts)
    rng.shuffle(parts)
    return parts


CASES = [  # shape (N, C, H, W) or (N, C), per_image, rf_size, rf_stride
    ((13, 5), 1, (1, 1), (1, 1)),
    ((13, 4, 1, 1), 1, (1, 1), (1, 1)),
    ((11, 3, 5, 7), 1, (1, 1), (1, 1)),
    ((11, 3, 5, 7), 2, (3, 3), (1, 1)),
    ((9, 3, 6, 6), 3, (11, 11), (4, 4)),
    ((9, 2, 4, 5), 3, (1, 1), (1, 1)),
    ((9, 2, 6, 4), 2, (7, 5), (2, 3)),
    ((7, 2, 8, 8), 3, (35, 35), (8, 8)),
]


@pytest.mark.parametrize("sync_free", [False, True], ids=["filtered", "dense"])
@pytest.mark.parametrize("k", [1, 5, 40])
@pytest.mark.parametrize("shape,per_image,rf_size,rf_stride", CASES)
def test_brute_force(shape, per_image, rf_size, rf_stride, k, sync_free):
    rng = np.random.default_rng(hash((shape, per_image, k)) % 2**32)
    acts = tied_acts(rng, shape, nan=0.05)
    images = rng.permutation(100)[: shape[0]].astype(np.int64)
    fmap = shape[2:] if len(shape) == 4 else (1, 1)
    rf = {"rf_size": rf_size, "rf_stride": rf_stride}
    ref = reference(acts, images, k, per_image, rf_size, rf_stride)
    assert_same(run(acts, images, k, per_image, fmap, sync_free=sync_free, **rf).result(), ref)
    for _ in range(3):
        batches = random_batches(rng, shape[0])
        tk = run(acts, images, k, per_image, fmap, batches, sync_free=sync_free, **rf)
        assert_same(tk.result(), ref)


def test_dead_channel_ties_keep_smallest_images():
    acts = np.zeros((20, 2, 3, 3), np.float32)
    images = np.arange(20)[::-1].copy()
    tk = run(acts, images, 4, fmap_hw=(3, 3), batches=[np.arange(10), np.arange(10, 20)])
    res = tk.result()
    assert res["image"].tolist() == [[0, 1, 2, 3]] * 2
    assert (res["yx"] == 0).all() and (res["score"] == 0).all()


def test_first_occurrence_argmax_and_nan_ignored():
    a = torch.tensor([[[[1.0, 3.0], [3.0, float("nan")]]]])
    tk = TopK(1, 2, fmap_hw=(2, 2))
    tk.add(a, torch.tensor([7]))
    res = tk.result()
    assert res["image"].tolist() == [[7, -1]]
    assert res["yx"][0, 0].tolist() == [0, 1]
    assert res["score"][0, 0] == 3.0 and torch.isnan(res["score"][0, 1])


def test_all_nan_map_never_enters():
    tk = TopK(2, 3, fmap_hw=(2, 2))
    a = torch.full((2, 2, 2, 2), float("nan"))
    a[1, 1, 1, 1] = 5.0
    tk.add(a, torch.tensor([0, 1]))
    res = tk.result()
    assert res["image"].tolist() == [[-1, -1, -1], [1, -1, -1]]
    assert res["yx"][1, 0].tolist() == [1, 1]


def test_large_stream_matches_reference():
    rng = np.random.default_rng(3)
    acts = tied_acts(rng, (300, 6, 3, 3), levels=6)
    acts[:, 0] = 0.0  # a dead channel
    images = np.arange(300)
    ref = reference(acts, images, 9)
    batches = np.array_split(rng.permutation(300), 17)
    assert_same(run(acts, images, 9, fmap_hw=(3, 3), batches=batches).result(), ref)


def test_large_stream_per_image_nms_matches_reference():
    rng = np.random.default_rng(6)
    acts = tied_acts(rng, (120, 3, 4, 4), levels=5)
    images = rng.permutation(1000)[:120]
    rf = {"rf_size": (7, 7), "rf_stride": (2, 2)}
    ref = reference(acts, images, 7, 2, **rf)
    batches = np.array_split(rng.permutation(120), 9)
    assert_same(run(acts, images, 7, 2, (4, 4), batches=batches, **rf).result(), ref)


def test_float64_and_half_inputs():
    rng = np.random.default_rng(4)
    acts = tied_acts(rng, (10, 3, 2, 2))
    ref = reference(acts, np.arange(10), 4)
    for dtype in (torch.float64, torch.float16):
        tk = TopK(3, 4, fmap_hw=(2, 2))
        tk.add(torch.from_numpy(acts).to(dtype), torch.arange(10))
        assert_same(tk.result(), ref)


# ---------------------------------------------------------------- merge and state


def shard_collectors(acts, images, k, per_image, fmap, parts, **rf):
    out = []
    for p in parts:
        tk = TopK(acts.shape[1], k, per_image, fmap, **rf)
        if len(p):
            tk.add(torch.from_numpy(acts[p]), torch.from_numpy(images[p]))
        out.append(tk)
    return out


def clone(tk):
    return TopK.from_state_dict(tk.state_dict())


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    per_image=st.sampled_from([1, 2, 3]),
    k=st.sampled_from([1, 3, 7, 30]),
    n=st.integers(1, 24),
)
def test_merge_associative_commutative_and_equal_to_one_pass(seed, per_image, k, n):
    rng = np.random.default_rng(seed)
    acts = tied_acts(rng, (n, 3, 3, 4), nan=0.03, levels=3)
    images = rng.permutation(4 * n)[:n].astype(np.int64)
    rf = {"rf_size": (5, 5), "rf_stride": (2, 2)}
    one = run(acts, images, k, per_image, (3, 4), **rf).result()
    perm = rng.permutation(n)
    parts = np.split(perm, np.sort(rng.integers(0, n + 1, size=2)))
    a, b, c = shard_collectors(acts, images, k, per_image, (3, 4), parts, **rf)
    left = clone(a)
    left.merge(clone(b))
    left.merge(clone(c))  # (a + b) + c
    bc = clone(b)
    bc.merge(clone(c))
    right = clone(a)
    right.merge(bc)  # a + (b + c)
    swapped = clone(c)
    swapped.merge(clone(a))
    swapped.merge(clone(b))  # c + a + b
    for tk in (left, right, swapped):
        for name, t in tk.result().items():
            torch.testing.assert_close(t, one[name], equal_nan=True, rtol=0, atol=0)


def test_state_dict_round_trip_through_torch_save():
    rng = np.random.default_rng(5)
    acts = tied_acts(rng, (12, 4, 3, 3), nan=0.05)
    tk = run(acts, np.arange(12), 5, 2, (3, 3), rf_size=(3, 3), rf_stride=(1, 1))
    sd = tk.state_dict()
    assert sd["version"] == 1
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    sd2 = torch.load(buf, weights_only=True)
    back = TopK(4, 5, 2, (3, 3), rf_size=(3, 3), rf_stride=(1, 1))
    back.load_state_dict(sd2)
    for name, t in tk.result().items():
        torch.testing.assert_close(back.result()[name], t, equal_nan=True, rtol=0, atol=0)
    # resume: continuing from the restored state equals one pass
    more = tied_acts(rng, (6, 4, 3, 3))
    back.add(torch.from_numpy(more), torch.arange(12, 18))
    full = np.concatenate([acts, more])
    ref = reference(full, np.arange(18), 5, 2, (3, 3), (1, 1))
    assert_same(back.result(), ref)


def test_merge_refuses_differences():
    a = TopK(4, 5, fmap_hw=(3, 3))
    with pytest.raises(ValueError, match="k 5 here vs 6"):
        a.merge(TopK(4, 6, fmap_hw=(3, 3)))
    with pytest.raises(ValueError, match="channels"):
        a.merge(TopK(5, 5, fmap_hw=(3, 3)))
    with pytest.raises(ValueError, match="fmap_hw"):
        a.merge(TopK(4, 5, fmap_hw=(3, 4)))
    with pytest.raises(ValueError, match="per_image"):
        a.merge(TopK(4, 5, 2, fmap_hw=(3, 3)))
    with pytest.raises(ValueError, match="rf_size"):
        TopK(4, 5, 2, (3, 3), (3, 3)).merge(TopK(4, 5, 2, (3, 3), (5, 5)))
    with pytest.raises(ValueError, match="version"):
        a.load_state_dict({**a.state_dict(), "version": 99})


def test_add_validates_shapes():
    tk = TopK(4, 2, fmap_hw=(3, 3))
    with pytest.raises(ValueError, match="do not match"):
        tk.add(torch.zeros(2, 4, 3, 4), torch.arange(2))
    with pytest.raises(ValueError, match="image_index"):
        tk.add(torch.zeros(2, 4, 3, 3), torch.arange(3))
    with pytest.raises(ValueError, match="positive"):
        TopK(4, 0)


@pytest.mark.parametrize("sync_free", [False, True], ids=["filtered", "dense"])
def test_scores_and_ties_are_float32(sync_free):
    """float64 values that round to the same float32 tie: the first location wins."""
    a = torch.tensor([[[[1.0, 1.0 + 1e-12], [0.5, 1.0 + 2e-12]]]], dtype=torch.float64)
    tk = TopK(1, 1, fmap_hw=(2, 2))
    tk._sync_free = sync_free
    tk.add(a, torch.tensor([3]))
    res = tk.result()
    assert res["yx"][0, 0].tolist() == [0, 0] and res["score"][0, 0].item() == 1.0


ACCELERATORS = [d for d in ("cuda", "mps") if getattr(torch, d).is_available()]


@pytest.mark.skipif(not ACCELERATORS, reason="no accelerator (cuda, mps) on this machine")
@pytest.mark.parametrize("device", ACCELERATORS)
@pytest.mark.parametrize("per_image", [1, 2])
def test_to_an_accelerator_and_back(device, per_image):
    """Batches on CPU, then on the device (the sync-free path), then on CPU again: brute force."""
    rng = np.random.default_rng(9)
    acts = tied_acts(rng, (30, 4, 3, 5), nan=0.05)
    images = rng.permutation(100)[:30].astype(np.int64)
    rf = {"rf_size": (3, 3), "rf_stride": (1, 1)}
    tk = TopK(4, 6, per_image, (3, 5), **rf)
    parts = np.array_split(np.arange(30), 3)
    for part, dev in zip(parts, ["cpu", device, "cpu"], strict=True):
        tk.to(dev)
        tk.add(torch.from_numpy(acts[part]).to(dev), torch.from_numpy(images[part]).to(dev))
    with pytest.raises(ValueError, match="call .to"):
        tk.add(torch.from_numpy(acts[:1]).to(device), torch.from_numpy(images[:1]))
    assert_same(tk.result(), reference(acts, images, 6, per_image, **rf))
