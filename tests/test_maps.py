"""reduce_maps against float64 numpy; every number a function of its own map, whatever the batch."""

import numpy as np
import pytest
import torch

from patchmine.maps import exact_moments, lattice, map_max, reduce_maps


def numpy_moments(x):
    """count, mean, M2 of each row of a 2-D float32 array over its non-NaN values, two-pass f64."""
    x = x.astype(np.float64)
    ok = ~np.isnan(x)
    count = ok.sum(1)
    mean = np.where(ok, x, 0).sum(1) / np.maximum(count, 1)
    m2 = (np.where(ok, x - mean[:, None], 0) ** 2).sum(1)
    return count, mean, m2


def check_values(m, acts, sample):
    """max, grid exact; count exact; mean and M2 as float64 numpy gives them."""
    N, C = acts.shape[:2]
    x = acts.float().reshape(N * C, -1).numpy()
    count, mean, m2 = numpy_moments(x)
    ok = ~np.isnan(x)
    want_max = np.where(ok, x, -np.inf).max(1).astype(np.float32)
    np.testing.assert_array_equal(m.max.reshape(-1).numpy(), want_max)
    if m.min is not None:
        want_min = np.where(ok, x, np.inf).min(1).astype(np.float32)
        np.testing.assert_array_equal(m.min.reshape(-1).numpy(), want_min)
    np.testing.assert_array_equal(m.count.reshape(-1).numpy(), count)
    scale = np.sqrt(np.where(ok, x.astype(np.float64) ** 2, 0).sum(1) / np.maximum(count, 1))
    np.testing.assert_allclose(m.mean.reshape(-1).numpy(), mean, rtol=0, atol=1e-6 * scale.max())
    np.testing.assert_allclose(m.m2.reshape(-1).numpy(), m2, rtol=1e-5, atol=1e-30)
    assert m.nan == bool((~ok).any())
    if sample is not None:
        H, W = acts.shape[2:] if acts.dim() == 4 else (1, 1)
        off, step = lattice(H, W, sample)
        assert m.lattice == (off, step)
        want = x.reshape(N, C, -1)[:, :, off::step]
        np.testing.assert_array_equal(m.grid.numpy(), want)


@pytest.mark.parametrize(
    "shape,layout",
    [
        ((7, 5, 33, 31), "contiguous"),
        ((3, 64, 55, 55), "contiguous"),
        ((5, 12, 9, 9), "channels_last"),
        ((4, 300), "contiguous"),
        ((1, 1, 1000, 1001), "contiguous"),  # one map: torch would split its sums over threads
        ((3, 1, 1000, 1001), "contiguous"),
    ],
)
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_maps_match_numpy_and_are_independent_of_batch_and_threads(shape, layout, threads):
    g = torch.Generator().manual_seed(sum(shape))
    acts = torch.randn(shape, generator=g) * 10 + 3
    far = (torch.rand(shape[:2], generator=g) < 0.3) * 1e3  # std << |mean|: the exact redo
    acts += far.view(*shape[:2], *[1] * (len(shape) - 2))
    if layout == "channels_last":
        acts = acts.contiguous(memory_format=torch.channels_last)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = reduce_maps(acts, sample=4, minimum=True)
        halves = [
            reduce_maps(part, sample=4, minimum=True) for part in acts.split(max(1, len(acts) // 2))
        ]
        one = reduce_maps(acts[-1:, -1:], sample=4, minimum=True)  # the last map alone
    finally:
        torch.set_num_threads(before)
    check_values(got, acts, 4)
    for name in ("max", "min", "count", "mean", "m2", "grid"):
        assert torch.equal(torch.cat([getattr(h, name) for h in halves]), getattr(got, name))
        assert torch.equal(getattr(one, name)[0, 0], getattr(got, name)[-1, -1]), name


def test_chunks_do_not_change_a_map(monkeypatch):
    """Maps are reduced in chunks of rows: a map's numbers do not depend on where a chunk ends."""
    import patchmine.maps as maps

    g = torch.Generator().manual_seed(5)
    acts = torch.randn(6, 7, 9, 11, generator=g) * 4 + 2
    acts[2, 3, 4, 5] = float("nan")
    want = reduce_maps(acts, sample=4, minimum=True)
    for chunk in (1, 99, 3 * 99, 1000):  # a row per chunk, three, rows split unevenly
        monkeypatch.setattr(maps, "_CHUNK", chunk)
        got = reduce_maps(acts, sample=4, minimum=True)
        for name in ("max", "min", "count", "mean", "m2", "grid"):
            assert torch.equal(getattr(got, name), getattr(want, name)), (chunk, name)
    check_values(want, acts, 4)


def test_m2_has_no_cancellation():
    """std / |mean| = 1e-7: sum(x^2) - sum(x)^2 / L in float32 would lose every digit."""
    g = torch.Generator().manual_seed(0)
    base = torch.tensor([1e4, -3e3, 0.5, 7.0])[None, :, None, None]
    acts = base + base.abs() * 1e-7 * torch.randn(6, 4, 9, 11, generator=g)
    acts[0, 0] = 5.0  # a constant map: M2 exactly 0
    m = reduce_maps(acts)
    check_values(m, acts, None)
    assert m.m2[0, 0] == 0 and m.mean[0, 0] == 5.0


def test_nan_infinities_and_low_precision_inputs():
    acts = torch.rand(3, 4, 6, 6)
    acts[1, 2, 3, 3] = float("nan")
    acts[2, 0, 0, 0] = -float("nan")  # a NaN with the sign bit set
    acts[2, 1] = float("nan")  # a map without a value
    acts[0, 3, 0, 0] = float("inf")
    m = reduce_maps(acts, sample=4, minimum=True)
    assert m.min[2, 1] == float("inf") and m.min[1, 2] == acts[1, 2].nan_to_num(9).min()
    assert m.nan and m.max[1, 2] == acts[1, 2].nan_to_num(-1).max()
    assert m.count[1, 2] == 35 and m.count[2, 0] == 35 and m.count[2, 1] == 0
    assert m.max[2, 1] == -float("inf") and m.mean[2, 1] == 0 and m.m2[2, 1] == 0
    assert m.max[0, 3] == float("inf")
    finite = acts.clone()
    finite[0, 3, 0, 0] = 0.0
    check_values(reduce_maps(finite, sample=4), finite, 4)
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        low = finite.to(dtype)
        got = reduce_maps(low, sample=0, minimum=True)
        assert got.max.dtype == torch.float32 and got.mean.dtype == torch.float64
        check_values(got, low, 0)


def test_max_orders_like_the_floats():
    tiny = torch.finfo(torch.float32).tiny
    rows = torch.tensor(
        [
            [-3.0, -1.0, -2.0],
            [-0.0, -5.0, -0.0],
            [tiny / 4, -tiny / 4, 0.0],
            [float("-inf"), -1e38, -7.0],
            [float("-inf"), float("-inf"), float("-inf")],
            [1.0, float("inf"), 3.0],
            [float("nan"), -2.0, -1.0],
            [float("nan"), float("nan"), float("nan")],
        ]
    )
    m, has_nan = map_max(rows.clone())
    want = [-1.0, 0.0, tiny / 4, -7.0, -float("inf"), float("inf"), -1.0, -float("inf")]
    assert m.tolist() == want and has_nan
    assert map_max(rows[:6].clone())[1] is False


def test_exact_moments_against_numpy():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(20, 50, generator=g) * 100 + 1e5
    x[3, :10] = float("nan")
    count, mean, m2 = exact_moments(x)
    want = numpy_moments(x.numpy())
    np.testing.assert_array_equal(count.numpy(), want[0])
    np.testing.assert_allclose(mean.numpy(), want[1], rtol=1e-15)
    np.testing.assert_allclose(m2.numpy(), want[2], rtol=1e-9)


def test_empty_batch():
    m = reduce_maps(torch.empty(0, 3, 4, 4), sample=2)
    assert m.max.shape == m.mean.shape == m.count.shape == (0, 3)
    assert m.grid.shape[:2] == (0, 3) and not m.nan
