"""reduce_maps: every number is a function of its own map, whatever the batch or thread count."""

import pytest
import torch

from patchmine.maps import lattice, reduce_maps


def reference(acts: torch.Tensor, sample: int):
    """Each map reduced alone, on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        N, C = acts.shape[:2]
        x = acts.reshape(N, C, -1).float()
        H, W = acts.shape[2:] if acts.dim() == 4 else (1, 1)
        off, step = lattice(H, W, sample)
        rows = [[(r.amax(), r.sum(), torch.linalg.vector_norm(r), r[off::step].clone())
                 for r in x[n].unbind(0)] for n in range(N)]
    finally:
        torch.set_num_threads(threads)
    return [torch.stack([torch.stack([r[i] for r in row]) for row in rows]) for i in range(4)]


@pytest.mark.parametrize("shape,layout", [
    ((7, 5, 33, 31), "contiguous"),
    ((3, 64, 55, 55), "contiguous"),
    ((5, 12, 9, 9), "channels_last"),
    ((4, 300), "contiguous"),
    ((1, 1, 1000, 1001), "contiguous"),  # one map: torch would split it across threads
    ((3, 1, 1000, 1001), "contiguous"),  # chunks of one map each
])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_maps_are_independent_of_batch_and_threads(shape, layout, threads, monkeypatch):
    g = torch.Generator().manual_seed(sum(shape))
    acts = torch.randn(shape, generator=g) * 10
    if layout == "channels_last":
        acts = acts.contiguous(memory_format=torch.channels_last)
    monkeypatch.setattr("patchmine.maps._CHUNK_BYTES", 1 << 14)  # many chunks, cut anywhere
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = reduce_maps(acts, sample=4)
        halves = [reduce_maps(part, sample=4) for part in acts.split(max(1, len(acts) // 2))]
    finally:
        torch.set_num_threads(before)
    want = reference(acts, 4)
    for name, w in zip(("max", "sum", "norm", "grid"), want, strict=True):
        assert torch.equal(getattr(got, name), w), name
        assert torch.equal(torch.cat([getattr(h, name) for h in halves]), w), name
    assert not got.nan


def test_nan_and_low_precision_inputs():
    acts = torch.rand(3, 4, 6, 6)
    acts[1, 2, 3, 3] = float("nan")
    m = reduce_maps(acts)
    assert m.nan and torch.isnan(m.max[1, 2]) and torch.isnan(m.sum[1, 2])
    assert m.grid is None and m.lattice is None
    half = reduce_maps(acts.to(torch.bfloat16), sample=0)
    assert half.max.dtype == torch.float32
    want = acts.to(torch.bfloat16).float().reshape(3, 4, 36)
    assert torch.equal(half.grid.nan_to_num(), want.nan_to_num())
    only_max = reduce_maps(acts, full=False)
    assert only_max.sum is None and torch.equal(only_max.max.nan_to_num(), m.max.nan_to_num())
