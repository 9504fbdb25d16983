"""Property tests (hypothesis): the algebra of TopK merging and the geometry of boxes.

tests/test_topk.py already holds merge associativity/commutativity against one pass (seeded
data) and the brute-force reference over fixed cases. Added here, with drawn data that shrinks:
- any grouping and order of shard merges equals the brute-force top-k directly (ties, NaN, -inf,
  2-D (N, C) nodes, NMS with per_image > 1, k beyond the candidates), merging an empty collector is
  the identity, and a state saved mid-way merges like the live one;
- receptive-field boxes round-trip between model-input and original-image pixels for the transform
  that ``corpus.preprocess`` records on random image sizes, and that transform maps the input square
  onto the centered crop of the original.
"""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from patchmine.corpus import preprocess
from patchmine.receptive import Field, boxes, to_input, to_original
from patchmine.topk import TopK
from tests.test_topk import assert_same, reference

# ------------------------------------------------------------------------------------------------
# TopK

LEVELS = st.sampled_from([0.0, 0.0, 1.0, 2.0, 2.5, -1.0, np.nan, -np.inf])  # ties, ReLU zeros


@st.composite
def mining_case(draw):
    n = draw(st.integers(1, 12))
    c = draw(st.integers(1, 3))
    spatial = draw(st.booleans())
    hw = (draw(st.integers(1, 4)), draw(st.integers(1, 4))) if spatial else (1, 1)
    shape = (n, c, *hw) if spatial else (n, c)
    acts = draw(hnp.arrays(np.float32, shape, elements=LEVELS))
    images = np.asarray(draw(st.permutations(range(3 * n)))[:n], dtype=np.int64)
    per_image = draw(st.integers(1, 3)) if spatial else 1
    rf_size = (draw(st.integers(1, 9)), draw(st.integers(1, 9)))
    rf_stride = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    k = draw(st.sampled_from([1, 2, 5, 40]))
    # shards: a random partition of the images, possibly with empty parts
    labels = draw(hnp.arrays(np.int64, n, elements=st.integers(0, 3)))
    parts = [np.flatnonzero(labels == s) for s in range(4)]
    return acts, images, hw, per_image, rf_size, rf_stride, k, parts


def _collector(acts, images, hw, per_image, rf_size, rf_stride, k, rows):
    tk = TopK(acts.shape[1], k, per_image, hw, rf_size, rf_stride)
    if len(rows):
        tk.add(torch.from_numpy(acts[rows]), torch.from_numpy(images[rows]))
    return tk


def _clone(tk: TopK) -> TopK:
    return TopK.from_state_dict(tk.state_dict())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=mining_case(), data=st.data())
def test_any_merge_tree_equals_brute_force(case, data):
    acts, images, hw, per_image, rf_size, rf_stride, k, parts = case
    ref = reference(acts, images, k, per_image, rf_size, rf_stride)
    shards = [_collector(acts, images, hw, per_image, rf_size, rf_stride, k, p) for p in parts]
    # merge in a random order and grouping: repeatedly merge two random collectors
    pool = [_clone(s) for s in shards]
    while len(pool) > 1:
        i, j = data.draw(st.permutations(range(len(pool))))[:2]
        a, b = pool[i], pool[j]
        a.merge(b)
        pool = [a] + [p for q, p in enumerate(pool) if q not in (i, j)]
    assert_same(pool[0].result(), ref)
    # a + b == b + a, exactly
    ab, ba = _clone(shards[0]), _clone(shards[1])
    ab.merge(_clone(shards[1]))
    ba.merge(_clone(shards[0]))
    for name, t in ab.result().items():
        torch.testing.assert_close(ba.result()[name], t, equal_nan=True, rtol=0, atol=0)


@settings(max_examples=40, deadline=None)
@given(case=mining_case())
def test_empty_collector_is_the_identity_and_states_merge_like_live_ones(case):
    acts, images, hw, per_image, rf_size, rf_stride, k, parts = case
    everything = np.arange(len(images))
    full = _collector(acts, images, hw, per_image, rf_size, rf_stride, k, everything)
    empty = _collector(acts, images, hw, per_image, rf_size, rf_stride, k, everything[:0])
    ref = reference(acts, images, k, per_image, rf_size, rf_stride)
    left = _clone(full)
    left.merge(_clone(empty))
    right = _clone(empty)
    right.merge(_clone(full))
    assert_same(left.result(), ref)
    assert_same(right.result(), ref)
    # a shard resumed from its saved state, then fed the rest, merges like the uninterrupted one
    first, rest = parts[0], np.concatenate(parts[1:])
    resumed = _clone(_collector(acts, images, hw, per_image, rf_size, rf_stride, k, first))
    if len(rest):
        resumed.add(torch.from_numpy(acts[rest]), torch.from_numpy(images[rest]))
    assert_same(resumed.result(), ref)


# ------------------------------------------------------------------------------------------------
# Geometry

SIZES = st.integers(1, 1500)


def _transform(h: int, w: int, s: int) -> tuple[float, float, float, float]:
    """The transform preprocess records for an ``h`` x ``w`` image (a flat gray one: cheap)."""
    pixels, t = preprocess(Image.new("L", (w, h), 128).convert("RGB"), s)
    assert pixels.shape == (s, s, 3)
    return t


@settings(max_examples=60, deadline=None)
@given(h=SIZES, w=SIZES, s=st.sampled_from([1, 7, 32, 64, 224]))
def test_preprocess_transform_maps_input_onto_the_centered_crop(h, w, s):
    sy, oy, ox, sx = _transform(h, w, s)
    assert (sx if w <= h else sy) == s / min(h, w)  # the short side: exactly s
    nh, nw = (int(s * h / w), s) if w <= h else (s, int(s * w / h))  # torchvision's Resize(s)
    assert (sy, sx) == (nh / h, nw / w)
    crop = to_original(np.array([0, 0, s, s], np.float32), np.array([sy, oy, ox, sx]))
    scale = min(sy, sx)
    tol = 1e-3 * max(h, w) + 1.0 / scale  # rounding of the resized size, at most one input pixel
    side = min(h, w)
    assert np.allclose(crop[2] - crop[0], side, atol=tol)
    assert np.allclose(crop[3] - crop[1], side, atol=tol)
    assert -tol <= crop[0] and crop[2] <= h + tol and -tol <= crop[1] and crop[3] <= w + tol
    # centered: equal margins up to one input pixel
    assert abs(crop[0] - (h - crop[2])) <= 2 * tol and abs(crop[1] - (w - crop[3])) <= 2 * tol


@st.composite
def field_and_locations(draw):
    size = (draw(st.integers(1, 300)), draw(st.integers(1, 300)))
    stride = (draw(st.integers(1, 32)), draw(st.integers(1, 32)))
    offset = (draw(st.integers(-150, 10)), draw(st.integers(-150, 10)))
    field = Field(size, stride, offset, whole=draw(st.booleans()) and size == stride)
    yx = draw(hnp.arrays(np.int64, (draw(st.integers(1, 6)), 2), elements=st.integers(0, 60)))
    return field, yx


@settings(max_examples=80, deadline=None)
@given(fy=field_and_locations(), h=SIZES, w=SIZES, s=st.sampled_from([32, 64, 224]))
def test_boxes_round_trip_between_input_and_original(fy, h, w, s):
    field, yx = fy
    t = np.array(_transform(h, w, s), np.float32)
    b = boxes(field, yx)
    if field.whole:
        assert (b == [0, 0, *field.size]).all()
    else:
        assert (b[:, 2:] - b[:, :2] == field.size).all()  # every box has the field's size
        assert (b[:, :2] == yx * field.stride + field.offset).all()
    orig = to_original(b, t)
    back = to_input(orig, t)
    scale = t[[0, 3, 0, 3]].astype(np.float64)  # per axis: y, x, y, x
    # float32 throughout: relative error of a few ulps of the largest coordinate involved
    mag = np.abs(b).max() + np.abs(t[1:3]).max() + 1
    assert np.allclose(back, b, rtol=0, atol=1e-5 * mag), (back, b)
    assert np.allclose(orig * scale - t[[1, 2, 1, 2]], b, rtol=0, atol=1e-5 * mag)
    # and from original pixels: input -> original is the inverse of original -> input
    again = to_original(to_input(orig, t), t)
    assert np.allclose(
        again, orig, rtol=0, atol=1e-5 * mag / scale.min() + 1e-6 * np.abs(orig).max()
    )
    # sizes scale by 1 / scale, and the transform preserves order
    assert np.allclose(
        orig[:, 2:] - orig[:, :2],
        (b[:, 2:] - b[:, :2]) / scale[:2],
        rtol=1e-5,
        atol=1e-5 * mag / scale[:2],
    )
