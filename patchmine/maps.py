"""One read of a batch's activation maps, shared by the collectors.

Public names: `Maps`, `reduce_maps`, `lattice`.

TopK needs the max of every (image, channel) map and RunningStats its sum, 2-norm and a few sampled
values. On CPU the activations of a batch are far larger than the caches, so reading them from
memory is most of a collector's cost: `reduce_maps` reads them once, a chunk of images at a time,
and takes everything the collectors need while the chunk is in cache.

Every number is a function of its own map alone, whatever the batch, chunk or thread count: the
reductions run on all intra-op threads, which torch splits over output maps, never inside a map
(a chunk of a single map, the one case torch would split, runs on one thread).
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import torch

__all__ = ["Maps", "reduce_maps", "lattice"]

_CHUNK_BYTES = 1 << 22  # activations reduced together: stays in cache between the reductions


class Maps(NamedTuple):
    """Per-(image, channel) reductions of an (N, C, ...) batch; each (N, C) float32 unless noted.

    A map holding a NaN has NaN max and sum (the collectors redo such maps themselves).
    """

    max: torch.Tensor
    sum: torch.Tensor | None
    norm: torch.Tensor | None
    grid: torch.Tensor | None  # (N, C, S): the values at the `lattice` locations
    lattice: tuple[int, int] | None  # (offset, step) of the sampled flat locations
    nan: bool  # whether any map holds a NaN


def lattice(H: int, W: int, sample: int) -> tuple[int, int]:
    """(offset, step) of the flat locations offset, offset + step, ... sampled from an H x W map.

    About ``sample`` locations; all of them when the map has no more (or ``sample`` is 0). The step
    is the largest one <= H * W // sample that is coprime to W, so that successive locations move
    to another column as well as down the map (a lattice, not a column).
    """
    if sample <= 0 or H * W <= sample:
        return 0, 1
    step = H * W // sample
    while math.gcd(step, W) != 1:
        step -= 1
    return step // 2, step


@contextlib.contextmanager
def one_thread(device: torch.device):
    """Run the enclosed CPU ops on the calling thread only (elsewhere: no effect).

    For the collectors' many small ops: spread over intra-op threads, each op ends at a barrier,
    and on a busy machine a barrier waits out a scheduler time slice for a preempted thread. One
    thread also keeps the sum of a lone map (which torch would split) independent of the count.
    """
    n = torch.get_num_threads() if device.type == "cpu" else 1
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def reduce_maps(acts: torch.Tensor, full: bool = True, sample: int | None = None) -> Maps:
    """Max (and with ``full`` sum, 2-norm) of every map of ``acts`` (N, C, ...), in one read.

    With ``sample`` (RunningStats' setting) the values at ``lattice(H, W, sample)`` are copied out
    as well, for the quantile histogram. Hand the result to ``TopK.add`` and ``RunningStats.add``
    (``maps=``).
    """
    N, C = acts.shape[:2]
    x = acts.reshape(N, C, -1)
    dev = acts.device
    out = [torch.empty(N, C, dtype=torch.float32, device=dev) for _ in range(3 if full else 1)]
    lat = grid = None
    if sample is not None:
        H, W = acts.shape[2:] if acts.dim() == 4 else (1, 1)
        lat = lattice(H, W, sample)
        grid = torch.empty(x[:, :, lat[0]::lat[1]].shape, dtype=torch.float32, device=dev)
    step = max(1, _CHUNK_BYTES // max(1, x[0].numel() * x.element_size()))
    # torch would split a chunk of a single map across threads, adding in another order
    threads = one_thread(dev) if C == 1 and min(step, N) == 1 else contextlib.nullcontext()
    with threads:
        for i in range(0, N, step):
            c, rows = x[i : i + step], slice(i, i + step)
            if c.dtype != torch.float32:
                c = c.float()
            torch.amax(c, 2, out=out[0][rows])
            if full:
                torch.sum(c, 2, out=out[1][rows])
                torch.linalg.vector_norm(c, dim=2, out=out[2][rows])
            if grid is not None:
                grid[rows] = c[:, :, lat[0] :: lat[1]]
    if not full:
        out += [None, None]
    return Maps(*out, grid, lat, bool(torch.isnan(out[0]).any()))
