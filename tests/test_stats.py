"""RunningStats against float64 numpy; batching, merge and state invariance, bit for bit."""

import io

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from patchmine.stats import RunningStats

Q = (0.0, 0.1, 0.5, 0.9, 0.99, 1.0)


def make_acts(rng, shape, nan=0.0):
    """A mix of ReLU zeros, small-integer ties, wide-range magnitudes and negatives."""
    scale = np.float32(10.0) ** rng.integers(-3, 4, shape)
    a = (rng.standard_normal(shape) * scale).astype(np.float32)
    a[rng.random(shape) < 0.3] = 0.0
    ties = rng.random(shape) < 0.2
    a[ties] = rng.integers(-2, 3, ties.sum())
    if nan:
        a[rng.random(shape) < nan] = np.nan
    return a


def channel_values(a):
    a = a if a.ndim == 4 else a[:, :, None, None]
    return a.transpose(1, 0, 2, 3).reshape(a.shape[1], -1)


def check_quantiles(est, values, q):
    """Documented resolution: within one bin (<= 1/32 relative, 2^-14 absolute near 0) of numpy."""
    for c in range(values.shape[0]):
        v = np.sort(values[c][~np.isnan(values[c])]).astype(np.float64)
        for j, qj in enumerate(q):
            r = qj * (len(v) - 1)
            lo, hi = v[int(np.floor(r))], v[int(np.ceil(r))]
            tol_lo = max(abs(lo) / 32, 2.0**-14) * 1.0001
            tol_hi = max(abs(hi) / 32, 2.0**-14) * 1.0001
            assert lo - tol_lo <= est[c, j] <= hi + tol_hi, (c, qj, est[c, j], lo, hi)


def feed(acts, batches=None, sync_free=False, sample=0):
    """Accumulate acts in the given batches; by default the histogram sees every location."""
    rs = RunningStats(acts.shape[1], quantiles=Q, sample=sample)
    rs._sync_free = sync_free
    for b in batches if batches is not None else [np.arange(len(acts))]:
        rs.add(torch.from_numpy(acts[b]))
    return rs


def assert_identical(a, b):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("sync_free", [False, True], ids=["cpu", "sync_free"])
@pytest.mark.parametrize("shape", [(40, 3), (30, 4, 1, 1), (25, 3, 4, 4), (20, 2, 3, 5)])
@pytest.mark.parametrize("nan", [0.0, 0.05])
def test_against_numpy(shape, nan, sync_free):
    rng = np.random.default_rng(abs(hash((shape, nan))) % 2**32)
    acts = make_acts(rng, shape, nan)
    res = feed(acts, sync_free=sync_free).result()
    vals = channel_values(acts)
    ok = ~np.isnan(vals)
    np.testing.assert_array_equal(res["count"].numpy(), ok.sum(1))
    v64 = np.where(ok, vals, 0).astype(np.float64)
    mean = v64.sum(1) / ok.sum(1)
    std = np.sqrt((np.where(ok, (vals - mean[:, None]) ** 2, 0)).sum(1) / ok.sum(1))
    np.testing.assert_allclose(res["mean"].numpy(), mean, rtol=1e-5, atol=1e-6 * np.abs(v64).max())
    np.testing.assert_allclose(res["std"].numpy(), std, rtol=1e-5)
    np.testing.assert_array_equal(res["max"].numpy(), np.nanmax(vals, 1).astype(np.float32))
    check_quantiles(res["quantile"].numpy(), vals, Q)
    np.testing.assert_array_equal(res["q"].numpy(), np.float32(Q))
    assert res["mean"].dtype == res["std"].dtype == res["quantile"].dtype == torch.float32
    assert res["count"].dtype == torch.int64


def test_relu_zeros_give_exact_zero_quantiles():
    acts = np.zeros((10, 2, 3, 3), np.float32)
    acts[:, 1, 0, 0] = 3.0  # channel 1: 1/9 of the values are 3 (sorted ranks 80..89)
    res = feed(acts).result()
    q = res["quantile"].numpy()  # levels 0, 0.1, 0.5, 0.9, 0.99, 1
    assert (q[0] == 0).all()
    assert (q[1, :3] == 0).all() and (abs(q[1, 3:] - 3.0) <= 3.0 / 32).all()


@pytest.mark.parametrize("hw,sample", [((55, 55), 16), ((27, 27), 4), ((13, 16), 8)])
def test_subsampled_histogram_uses_a_fixed_lattice(hw, sample):
    rng = np.random.default_rng(1)
    H, W = hw
    acts = make_acts(rng, (12, 3, H, W))
    res = feed(acts, sample=sample).result()
    vals = channel_values(acts)
    np.testing.assert_array_equal(res["count"].numpy(), np.full(3, 12 * H * W))
    np.testing.assert_array_equal(res["max"].numpy(), vals.max(1))
    # the documented lattice: the largest step <= H*W // sample coprime to W, from step // 2
    step = max(s for s in range(1, H * W // sample + 1) if np.gcd(s, W) == 1)
    flat = np.arange(step // 2, H * W, step)
    assert len(set(flat % W)) == len(flat)  # no two samples share a column
    grid = channel_values(acts.reshape(12, 3, H * W)[:, :, flat, None])
    assert abs(grid.shape[1] - 12 * sample) <= 12
    rs = RunningStats(3, quantiles=Q, sample=sample)
    rs.add(torch.from_numpy(acts))
    check_quantiles(res["quantile"].numpy(), grid, Q)
    assert int(rs.state_dict()["hist"].sum()) == grid.size


def test_large_and_tiny_magnitudes_saturate_as_documented():
    acts = np.array([[1e9], [-1e9], [1e-9], [2.0**17]], np.float32)
    res = RunningStats(1, quantiles=(0.0, 0.4, 1.0))
    res.add(torch.from_numpy(acts))
    q = res.result()["quantile"][0].tolist()
    assert q == [-(2.0**17), 0.0, 2.0**17]


def test_empty_channel_is_nan():
    res = RunningStats(2).result()
    assert res["count"].tolist() == [0, 0]
    for name in ("mean", "std", "max", "quantile"):
        assert torch.isnan(res[name]).all()


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(2, 30),
    spatial=st.sampled_from([(), (1, 1), (3, 3), (6, 7)]),
)
def test_batching_order_and_merge_are_bit_identical(seed, n, spatial):
    rng = np.random.default_rng(seed)
    acts = make_acts(rng, (n, 3, *spatial), nan=0.02)
    one = feed(acts, sample=9).result()
    perm = rng.permutation(n)
    cuts = np.sort(rng.integers(0, n + 1, size=3))
    parts = np.split(perm, cuts)
    assert_identical(feed(acts, parts, sample=9).result(), one)
    shards = [feed(acts, [p], sample=9) for p in parts]
    left = shards[0]
    for s in shards[1:]:
        left.merge(s)
    assert_identical(left.result(), one)
    right = shards[-1]
    rest = feed(acts, [np.concatenate(parts[:-1])], sample=9)
    right.merge(rest)
    assert_identical(right.result(), one)


def test_state_dict_round_trip_through_torch_save():
    rng = np.random.default_rng(2)
    acts = make_acts(rng, (9, 4, 3, 3), nan=0.05)
    rs = feed(acts)
    buf = io.BytesIO()
    torch.save(rs.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    assert sd["version"] == 3
    back = RunningStats.from_state_dict(sd)
    assert_identical(back.result(), rs.result())
    more = make_acts(rng, (5, 4, 3, 3))
    back.add(torch.from_numpy(more))
    assert_identical(
        back.result(), feed(np.concatenate([acts, more]), [np.arange(9), 9 + np.arange(5)]).result()
    )


def test_refuses_mismatch():
    a = RunningStats(3)
    with pytest.raises(ValueError, match="channels 3 here vs 4"):
        a.merge(RunningStats(4))
    with pytest.raises(ValueError, match="quantiles"):
        a.merge(RunningStats(3, quantiles=(0.5,)))
    with pytest.raises(ValueError, match="version"):
        a.load_state_dict({**a.state_dict(), "version": 7})
    with pytest.raises(ValueError, match="acts must be"):
        a.add(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="quantiles"):
        RunningStats(3, quantiles=(1.5,))


def numpy_stats(acts):
    """count, mean, std (float64, two-pass), max of each channel over its non-NaN values."""
    vals = channel_values(acts).astype(np.float64)
    ok = ~np.isnan(vals)
    count = ok.sum(1)
    mean = np.where(ok, vals, 0).sum(1) / count
    std = np.sqrt(np.where(ok, (vals - mean[:, None]) ** 2, 0).sum(1) / count)
    return count, mean, std, np.nanmax(vals, 1).astype(np.float32)


def assert_equals_numpy(res: dict, acts: np.ndarray, rtol: float, atol: float) -> None:
    """A result of RunningStats against numpy: count and max exact, the mean to ``rtol`` and
    ``atol``, the std to ``rtol``, the quantiles within their bounds."""
    count, mean, std, mx = numpy_stats(acts)
    np.testing.assert_array_equal(res["count"].numpy(), count)
    np.testing.assert_allclose(res["mean"].numpy(), mean, rtol=rtol, atol=atol)
    np.testing.assert_allclose(res["std"].numpy(), std, rtol=rtol)
    np.testing.assert_array_equal(res["max"].numpy(), mx)
    check_quantiles(res["quantile"].numpy(), channel_values(acts), Q)


def test_fed_the_shared_map_reductions_as_the_miner_does():
    """RunningStats and TopK fed one reduce_maps() result (Miner.collect on CPU), batch by batch,
    against numpy and a brute-force argmax."""
    from patchmine.maps import reduce_maps
    from patchmine.topk import TopK

    rng = np.random.default_rng(7)
    acts = make_acts(rng, (12, 3, 7, 9), nan=0.02)
    acts[4, 1] = np.nan  # a map without a value
    rs, tk = RunningStats(3, quantiles=Q, sample=0), TopK(3, 2, fmap_hw=(7, 9))
    for part in np.array_split(np.arange(12), 5):
        a = torch.from_numpy(acts[part])
        maps = reduce_maps(a, sample=rs.sample)
        tk.add(a, torch.from_numpy(part), maps)
        rs.add(a, maps)
    assert_equals_numpy(rs.result(), acts, rtol=1e-6, atol=1e-9)
    flat = np.where(np.isnan(acts), -np.inf, acts).reshape(12, 3, -1)
    for c in range(3):  # the two best (score desc, image asc, first location)
        best = sorted((-flat[n, c].max(), n, int(flat[n, c].argmax())) for n in range(12))[:2]
        top = tk.result()
        assert top["image"][c].tolist() == [n for _, n, _ in best]
        assert top["score"][c].tolist() == [-s for s, _, _ in best]
        assert [y * 9 + x for y, x in top["yx"][c].tolist()] == [i for _, _, i in best]


@pytest.mark.parametrize("sync_free", [False, True], ids=["cpu", "sync_free"])
def test_std_much_smaller_than_the_mean_keeps_its_digits(sync_free):
    """std / |mean| ~ 1e-6: E[x^2] - E[x]^2 (in float32 per map, or even in float64 over a
    channel) loses most digits; the per-map M2 merged by Chan's formula does not."""
    rng = np.random.default_rng(11)
    offset = np.array([1e4, -2e3, 50.0], np.float32)[None, :, None, None]
    acts = (offset + 1e-2 * rng.standard_normal((40, 3, 8, 8))).astype(np.float32)
    batches = np.array_split(np.arange(40), 6)
    res = feed(acts, batches, sync_free=sync_free).result()
    count, mean, std, mx = numpy_stats(acts)
    np.testing.assert_allclose(res["mean"].numpy(), mean, rtol=1e-7)
    np.testing.assert_allclose(res["std"].numpy(), std, rtol=1e-5)
    np.testing.assert_array_equal(res["max"].numpy(), mx)


def test_loads_a_version_1_state():
    """States written before the mean / M2 layout (float64 sum and sum of squares) still load."""
    rng = np.random.default_rng(3)
    acts = make_acts(rng, (10, 2, 4, 4))
    vals = channel_values(acts).astype(np.float64)
    new = feed(acts).state_dict()
    old = {k: v for k, v in new.items() if k not in ("mean", "m2")}
    old.update(
        version=1, sum=torch.from_numpy(vals.sum(1)), sumsq=torch.from_numpy((vals**2).sum(1))
    )
    res = RunningStats.from_state_dict(old).result()
    count, mean, std, mx = numpy_stats(acts)
    np.testing.assert_allclose(res["mean"].numpy(), mean, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(res["std"].numpy(), std, rtol=1e-5)
    # as merge() sees it: a fresh state updated with a version-1 file's tensors
    fresh = RunningStats(2, quantiles=Q, sample=0).state_dict()
    fresh.update({k: v for k, v in old.items() if isinstance(v, torch.Tensor)})
    assert_identical(RunningStats.from_state_dict(fresh).result(), res)


ACCELERATORS = [d for d in ("cuda", "mps") if getattr(torch, d).is_available()]


@pytest.mark.skipif(not ACCELERATORS, reason="no accelerator (cuda, mps) on this machine")
@pytest.mark.parametrize("device", ACCELERATORS)
def test_to_an_accelerator_and_back(device):
    """Half the batches on CPU, half on the device (the sync-free path), back: numpy's values."""
    rng = np.random.default_rng(8)
    acts = make_acts(rng, (16, 3, 5, 5), nan=0.02)
    rs = RunningStats(3, quantiles=Q, sample=0)
    rs.add(torch.from_numpy(acts[:8]))
    rs.to(device)
    assert rs.state_dict()["count"].device.type == "cpu"
    rs.add(torch.from_numpy(acts[8:]).to(device))
    res = {k: v.cpu() for k, v in rs.to("cpu").result().items()}
    assert_equals_numpy(res, acts, rtol=1e-5, atol=1e-6)


def test_slot_table_matches_the_bit_formula():
    """The lookup by bit group gives every float32 the slot the documented formula gives."""
    from patchmine.stats import _SHIFT, _SIDE, _slot_table, _slots

    g = torch.Generator().manual_seed(0)
    bits = torch.randint(-(2**31), 2**31, (200_000,), generator=g, dtype=torch.int64)
    bits = torch.cat([bits, torch.tensor([0, -(2**31), 0x7F800000, -0x800000, 1, 0x38800000])])
    v = bits.to(torch.int32).view(torch.float32)
    v = v[~torch.isnan(v)]
    table = _slot_table()
    looked_up = table[(v.view(torch.int32) >> _SHIFT).long() + (1 << (31 - _SHIFT))]
    assert torch.equal(looked_up, _slots(v.clone()) + _SIDE)


@pytest.mark.parametrize("flush_at", [1, 50, 1 << 21])
def test_buffering_does_not_change_results(flush_at, monkeypatch):
    """Batches are counted every ~flush_at values; results are the same whenever that happens."""
    rng = np.random.default_rng(5)
    acts = make_acts(rng, (24, 3, 5, 6), nan=0.01)
    want = feed(acts, np.array_split(np.arange(24), 24)).result()
    monkeypatch.setattr("patchmine.stats._FLUSH_AT", flush_at)
    rs = feed(acts, np.array_split(np.arange(24), 7))
    sd = rs.state_dict()  # counts what is buffered
    assert int(sd["hist"][:, :-1].sum()) == int(sd["count"].sum())  # the last slot: NaN
    assert_identical(rs.result(), want)


def _states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a
    )


def _tie_acts(rng, n, c, h, w):
    """Maps of values 1 and 1 + 2^-23 (and their scaled copies): channel means sit on or near
    float32 rounding ties, where any rounding in the accumulation can flip the float32 result."""
    base = np.float32([1.0, 1.0 + 2.0**-23, 3.0, 3.0 + 2.0**-22])
    a = base[rng.integers(0, 4, (n, c, h, w))]
    scale = np.float32(2.0) ** rng.integers(-3, 4, (1, c, 1, 1))
    return (a * scale).astype(np.float32)


def _fraction_stats(acts):
    """Exact mean and population variance of each channel (fractions), then rounded."""
    from fractions import Fraction

    vals = channel_values(acts)
    out = []
    for row in vals:
        xs = [Fraction(float(x)) for x in row if not np.isnan(x)]
        m = sum(xs) / len(xs)
        out.append((m, sum((x - m) ** 2 for x in xs) / len(xs)))
    return out


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), maps_split=st.integers(1, 9), shards=st.integers(2, 5))
def test_any_grouping_gives_the_same_state_bits(seed, maps_split, shards):
    """Batchings, flush points, merge orders and merge trees: the same state, bit for bit, and
    a mean equal to the exact mean rounded (float32 ties included), std within 1e-12 of exact."""
    rng = np.random.default_rng(seed)
    acts = _tie_acts(rng, 30, 3, 3, 5) if seed % 2 else make_acts(rng, (30, 3, 3, 5), nan=0.02)
    want = feed(acts, [np.arange(30)])
    sd = want.state_dict()
    order = rng.permutation(30)
    assert _states_equal(feed(acts, np.array_split(order, maps_split)).state_dict(), sd)
    cuts = np.sort(rng.choice(np.arange(1, 30), shards - 1, replace=False))
    parts = [feed(acts, [p]) for p in np.split(order, cuts)]
    while len(parts) > 1:  # a random merge tree
        i = int(rng.integers(len(parts) - 1))
        parts[i].merge(parts.pop(i + 1))
    assert _states_equal(parts[0].state_dict(), sd)
    res = want.result()
    # the per-map reductions summed exactly (fractions): the mean is that, rounded
    from fractions import Fraction

    from patchmine.maps import reduce_maps

    m = reduce_maps(torch.from_numpy(acts))
    for c, (mean, var) in enumerate(_fraction_stats(acts)):
        n = int(m.count[:, c].sum())
        pairs = zip(m.count[:, c].tolist(), m.mean[:, c].double().tolist(), strict=True)
        S = sum(Fraction(k * mu) for k, mu in pairs)
        assert res["mean"][c].item() == np.float32(float(S / n))
        # against the data: what the per-map float32 reductions allow
        scale = float(np.nanmean(np.abs(channel_values(acts)[c].astype(np.float64))))
        assert abs(res["mean"][c].item() - float(mean)) <= 1e-6 * scale
        sd_exact = float(var) ** 0.5
        assert abs(res["std"][c].item() - sd_exact) <= 1e-5 * sd_exact + 1e-6 * scale


def test_ties_chan_would_split_between_groupings():
    """Values whose exact mean is a float32 rounding tie: the old float64 Chan merge (one value
    at a time) gives float32 means that depend on the order for some of them; the exact sums
    give one answer, the exact mean rounded (to even)."""
    from fractions import Fraction

    def chan(xs):
        n, mean = 0, 0.0
        for x in xs:
            n += 1
            mean += (x - mean) / n
        return np.float32(mean)

    differed = 0
    for seed in range(200):
        rng = np.random.default_rng(seed)
        N = 2 * int(rng.integers(3, 12))
        j = rng.integers(0, 64, N - 1)
        last = N * (2 * int(rng.integers(0, 32)) + 1) // 2 - int(j.sum())  # sum: N ties
        if not 0 <= last < 2**20:
            continue
        acts = (1.0 + np.append(j, last) * 2.0**-23).astype(np.float32)[:, None]  # (N, 1)
        perm = rng.permutation(N)
        xs = acts[:, 0].astype(np.float64)
        differed += bool(chan(xs) != chan(xs[perm]))
        exact = sum(Fraction(float(x)) for x in xs) / N
        want = np.float32(float(exact))
        for order in (np.arange(N), perm):
            for parts in (1, 3, N):
                got = feed(acts, np.array_split(order, parts)).result()["mean"][0].item()
                assert got == want, (seed, parts)
    assert differed, "the tie data no longer exercises the old formula's rounding"


def test_loads_a_version_2_state():
    """Files written with the Chan-merged float64 mean and M2 still load and merge."""
    rng = np.random.default_rng(4)
    acts = make_acts(rng, (10, 2, 4, 4))
    count, mean, std, mx = numpy_stats(acts)
    new = feed(acts).state_dict()
    old = {k: v for k, v in new.items() if k not in ("sums", "nonfinite")}
    old.update(
        version=2,
        mean=torch.from_numpy(mean),
        m2=torch.from_numpy(std**2 * count),
    )
    res = RunningStats.from_state_dict(old).result()
    np.testing.assert_allclose(res["mean"].numpy(), mean, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(res["std"].numpy(), std, rtol=1e-6)
    fresh = RunningStats(2, quantiles=Q, sample=0).state_dict()  # as merge() sees it
    fresh.update({k: v for k, v in old.items() if isinstance(v, torch.Tensor)})
    both = RunningStats.from_state_dict(fresh)
    both.merge(RunningStats.from_state_dict(old))
    np.testing.assert_allclose(both.result()["mean"].numpy(), mean, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(both.result()["std"].numpy(), std, rtol=1e-6)
