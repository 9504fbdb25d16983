"""One read of a batch's activation maps, shared by the collectors.

Public names: `Maps`, `reduce_maps`, `lattice`, `locate`.

TopK needs the max of every (image, channel) map and RunningStats its sum, sum of squares and a few
sampled values. On CPU the activations of a batch are far larger than the caches, so reading them
from memory is most of a collector's cost, and torch has no reduction that takes a max and two sums
in one read (chained, three `amax`/`sum` passes cost about twice one read). `reduce_maps` runs a
compiled loop over the maps instead (`patchmine.kernels`): one read for everything both need.

Every number is a function of its own map alone, whatever the batch or thread count: each map is
reduced start to end by one thread, in an order fixed by its length.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

__all__ = ["Maps", "reduce_maps", "lattice", "locate"]


class Maps(NamedTuple):
    """Per-(image, channel) reductions of an (N, C, ...) batch, each (N, C) float32.

    A map whose sum is NaN (it holds a NaN, or both infinities) has NaN max and sum: the
    collectors redo such maps themselves.
    """

    max: torch.Tensor
    sum: torch.Tensor
    sumsq: torch.Tensor  # sum of squares
    grid: torch.Tensor | None  # (N, C, S): the values at the `lattice` locations
    lattice: tuple[int, int] | None  # (offset, step) of the sampled flat locations
    nan: bool  # whether any map has a NaN max


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


def reduce_maps(acts: torch.Tensor, sample: int | None = None) -> Maps:
    """Max, sum and sum of squares of every map of ``acts`` (N, C, ...) on CPU, in one read.

    With ``sample`` (RunningStats' setting) the values at ``lattice(H, W, sample)`` are copied out
    as well, for the quantile histogram. Hand the result to ``TopK.add`` and ``RunningStats.add``
    (``maps=``).
    """
    from patchmine.kernels import reduce_rows  # numba: loaded when first needed

    N, C = acts.shape[:2]
    L = math.prod(acts.shape[2:])
    x = acts.detach().reshape(N, C, L).float().contiguous()
    lat, S = None, 0
    if sample is not None:
        H, W = acts.shape[2:] if acts.dim() == 4 else (1, 1)
        lat = lattice(H, W, sample)
        S = len(range(lat[0], L, lat[1]))
    key = torch.empty(N, C, dtype=torch.int32)
    total, sumsq = torch.empty(N, C), torch.empty(N, C)
    grid = torch.empty(N, C, S)
    if N * C:
        flat = x.view(N * C, L).numpy()
        outs = [t.view(N * C, *t.shape[2:]).numpy() for t in (key, total, sumsq, grid)]
        reduce_rows(flat, *(lat or (0, 1)), *outs, threads=torch.get_num_threads())
    nan = torch.isnan(total)
    top = key.bitwise_xor_(key.bitwise_right_shift(31).bitwise_and_(0x7FFFFFFF)).view(torch.float32)
    has_nan = bool(nan.any())
    if has_nan:
        top.masked_fill_(nan, float("nan"))
    return Maps(top, total, sumsq, grid if lat is not None else None, lat, has_nan)


def locate(x: torch.Tensor, rows: torch.Tensor, target: torch.Tensor):
    """(location, value) of the first max of each map ``x[rows]``; ``x`` (R, L) on CPU.

    ``target`` holds those maps' maxima (``Maps.max``; for a map with NaNs, the max of the rest),
    so each map is read only up to its max, in place: the location `torch.argmax` gives, without
    the full read and the gathered copy. Returns int64 and float32 tensors of ``rows``' shape.
    """
    from patchmine.kernels import first_max

    loc = torch.empty(rows.shape, dtype=torch.int64)
    value = torch.empty(rows.shape)
    if rows.numel():
        x = x.detach().float().contiguous()
        first_max(x.numpy(), rows.contiguous().numpy(), target.float().contiguous().numpy(),
                  loc.numpy(), value.numpy(), threads=torch.get_num_threads())
    return loc, value
