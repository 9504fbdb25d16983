"""reduce_maps: every number is a function of its own map, whatever the batch or thread count."""

import os
import subprocess
import sys

import pytest
import torch

from patchmine.maps import lattice, locate, reduce_maps


def assert_same(a, b):
    for name in ("max", "sum", "sumsq", "grid"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


@pytest.mark.parametrize("shape,layout", [
    ((7, 5, 33, 31), "contiguous"),
    ((3, 64, 55, 55), "contiguous"),
    ((5, 12, 9, 9), "channels_last"),
    ((4, 300), "contiguous"),
    ((1, 1, 1000, 1001), "contiguous"),  # one map
    ((3, 1, 1000, 1001), "contiguous"),
])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_maps_are_independent_of_batch_and_threads(shape, layout, threads):
    g = torch.Generator().manual_seed(sum(shape))
    acts = torch.randn(shape, generator=g) * 10
    if layout == "channels_last":
        acts = acts.contiguous(memory_format=torch.channels_last)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = reduce_maps(acts, sample=4)
        halves = [reduce_maps(part, sample=4) for part in acts.split(max(1, len(acts) // 2))]
    finally:
        torch.set_num_threads(before)
    one = reduce_maps(acts[-1:, -1:], sample=4)  # the last map alone, on all threads
    for name in ("max", "sum", "sumsq", "grid"):
        assert torch.equal(torch.cat([getattr(h, name) for h in halves]), getattr(got, name))
        assert torch.equal(getattr(one, name)[0, 0], getattr(got, name)[-1, -1]), name
    assert not got.nan

    # the values: max and grid exact, the sums as float64 gives them to float32 rounding
    N, C = shape[:2]
    x = acts.reshape(N, C, -1)
    off, step = lattice(*(shape[2:] if len(shape) == 4 else (1, 1)), 4)
    assert got.lattice == (off, step)
    assert torch.equal(got.max, x.amax(2))
    assert torch.equal(got.grid, x[:, :, off::step])
    x64 = x.double()
    scale = x64.abs().sum(2)
    assert ((got.sum.double() - x64.sum(2)).abs() <= 1e-5 * scale + 1e-30).all()
    assert torch.allclose(got.sumsq.double(), x64.square().sum(2), rtol=1e-5)


def test_max_orders_like_the_floats():
    """The max (taken over integer keys of the float bits) equals torch's on signs, zeros,
    subnormals and infinities."""
    tiny = torch.finfo(torch.float32).tiny
    rows = [
        [-3.0, -1.0, -2.0],
        [-0.0, -5.0, -0.0],
        [tiny / 4, -tiny / 4, 0.0],
        [float("-inf"), -1e38, -7.0],
        [float("-inf"), float("-inf"), float("-inf")],
        [1.0, float("inf"), 3.0],
        [-1e-40, -2e-40, -3e-40],
    ]
    acts = torch.tensor(rows)[:, None, :]
    m = reduce_maps(acts)
    assert torch.equal(m.max[:, 0], acts[:, 0].amax(1)) and not m.nan


def test_nan_and_low_precision_inputs():
    acts = torch.rand(3, 4, 6, 6)
    acts[1, 2, 3, 3] = float("nan")
    acts[2, 0, 0, 0] = -float("nan")  # a NaN with the sign bit set
    acts[0, 3, 0, 0], acts[0, 3, 0, 1] = float("inf"), float("-inf")  # both infinities
    m = reduce_maps(acts)
    assert m.nan
    flagged = torch.isnan(m.max)
    assert flagged.nonzero().tolist() == [[0, 3], [1, 2], [2, 0]]
    assert torch.isnan(m.sum[flagged]).all() and not torch.isnan(m.max[~flagged]).any()
    assert m.grid is None and m.lattice is None
    half = reduce_maps(acts.to(torch.bfloat16), sample=0)
    assert half.max.dtype == torch.float32
    want = acts.to(torch.bfloat16).float().reshape(3, 4, 36)
    assert torch.equal(half.grid.nan_to_num(), want.nan_to_num())


def test_empty_batch():
    m = reduce_maps(torch.empty(0, 3, 4, 4), sample=2)
    assert m.max.shape == m.sum.shape == (0, 3) and m.grid.shape[:2] == (0, 3) and not m.nan


def test_locate_gives_torch_argmax():
    """The first max of each selected map, as torch.argmax gives it: ties, zeros, NaNs."""
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 4, (500, 37), generator=g).float()  # many tied maxima
    x[7] = 0.0
    x[7, 5], x[7, 9] = -0.0, 0.0
    x[11, 3] = float("nan")  # the max of the rest is found; NaN is skipped
    x[12] = float("-inf")
    rows = torch.tensor([0, 7, 11, 12, 499, 3, 3])
    m = reduce_maps(x[:, None, :]).max.view(-1)
    w = x.nan_to_num(nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    target = w.amax(1)[rows]
    assert torch.equal(m[rows][[0, 1, 3, 4, 5, 6]], target[[0, 1, 3, 4, 5, 6]])
    loc, value = locate(x, rows, target)
    assert torch.equal(loc, w[rows].argmax(1)) and torch.equal(value, target)
    # a target the map does not hold: its first max all the same
    loc, value = locate(x, rows[:1], torch.tensor([99.0]))
    assert loc.item() == x[0].argmax().item() and value.item() == x[0].max().item()
    loc, value = locate(x.half(), rows, target)
    assert torch.equal(loc, w[rows].argmax(1)) and value.dtype == torch.float32
    assert locate(x, rows[:0], target[:0])[0].shape == (0,)


def test_serial_parallel_and_workqueue_loops_agree(tmp_path):
    """The parallel loop on one or two threads, and the serial one that numba's workqueue layer
    (no OpenMP on the system) gets: every number is the same bit for bit."""
    g = torch.Generator().manual_seed(1)
    acts = torch.randn(6, 9, 13, 17, generator=g) * 3
    torch.save(acts, tmp_path / "acts.pt")
    before = torch.get_num_threads()
    runs = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        try:
            runs.append(reduce_maps(acts, sample=4))
        finally:
            torch.set_num_threads(before)
    assert_same(*runs)
    code = (
        "import sys, torch\n"
        "from patchmine.maps import reduce_maps\n"
        "m = reduce_maps(torch.load(sys.argv[1]), sample=4)\n"
        "torch.save(tuple(m[:4]), sys.argv[2])\n"
        "from patchmine.kernels import _pool_is_fast\n"
        "assert not _pool_is_fast()\n"
    )
    env = {**os.environ, "NUMBA_THREADING_LAYER": "workqueue"}
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "acts.pt"), str(tmp_path / "m.pt")],
                   check=True, env=env)
    for got, want in zip(torch.load(tmp_path / "m.pt"), runs[0][:4], strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("policy", [None, "ACTIVE"])
def test_loading_the_loops_leaves_the_environment_as_it_was(policy):
    """numba's OpenMP pool loads passive unless the user chose; the environment is unchanged."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    code = (
        "import os, torch\n"
        "from patchmine.maps import reduce_maps\n"
        "reduce_maps(torch.ones(2, 3, 4, 4))\n"
        "print(os.environ.get('OMP_WAIT_POLICY'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True,
                         capture_output=True, text=True).stdout.strip()
    assert out == str(policy)
