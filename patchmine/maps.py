"""Per-map reductions of a batch of activations, shared by the collectors (pure torch).

Public names: `Maps`, `reduce_maps`, `map_max`, `map_min`, `exact_moments`, `lattice`.

TopK needs the max of every (image, channel) map, RunningStats its count, mean and M2 (the sum of
squared deviations from its mean) and a few sampled values. `reduce_maps` takes them all on CPU:
``amax`` (exact and order-free), then a float32 ``sum`` and ``vector_norm`` per map (per row of
a map above 4096 values), turned into mean and M2 in float64 as ``M2 = sum(x^2) - sum(x)^2 / L``. That formula cancels when a map's std
is small against its mean, so a map where ``sum(x^2) > 8 * M2`` (|mean| > 2.6 std), or that holds a
NaN or an infinity, is redone by `exact_moments` (float64, two passes): M2's relative error stays
below ~1e-5 on every map, without the cancellation.

Every number is a function of its own map alone, whatever the batch or thread count: torch reduces
each segment (a map, or a row of a large one) start to end on one thread, by a loop fixed by its
length. (It would split a lone segment of 32768 values or more over threads; segments stay shorter
unless a map is wider than that.)
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

__all__ = ["Maps", "reduce_maps", "map_max", "map_min", "exact_moments", "lattice"]

_WELL_CONDITIONED = 8.0  # sum(x^2) <= 8 * M2: the fast formula loses at most ~3 bits of M2
_SEGMENT = 4096  # maps with more values are summed row by row
_CHUNK = 1 << 19  # values per chunk of maps reduced together: 2 MB, a core's L2 cache


class Maps(NamedTuple):
    """Per-(image, channel) reductions of an (N, C, ...) batch, NaN values skipped.

    A map without a non-NaN value has count 0, max -inf, mean and M2 0.
    """

    max: torch.Tensor  # (N, C) float32
    count: torch.Tensor  # (N, C) int64: values that are not NaN
    mean: torch.Tensor  # (N, C) float64
    m2: torch.Tensor  # (N, C) float64: sum of squared deviations from the map's mean
    grid: torch.Tensor | None  # (N, C, S) float32: the values at the `lattice` locations
    lattice: tuple[int, int] | None  # (offset, step) of the sampled flat locations
    nan: bool  # whether any map holds a NaN
    min: torch.Tensor | None = None  # (N, C) float32, over the non-NaN values (+inf when none)


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


def map_max(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Max of each row of ``x`` (R, L) over its non-NaN values (-inf when none), and whether any
    row holds a NaN. Uses ``amax`` (which propagates NaN); only rows with a NaN are read twice."""
    m = x.amax(1)
    return m, _skip_nan(m, x, largest=True)


def map_min(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """`map_max`'s counterpart: the min over the non-NaN values (+inf when none)."""
    m = x.amin(1)
    return m, _skip_nan(m, x, largest=False)


def _skip_nan(m: torch.Tensor, x: torch.Tensor, largest: bool) -> bool:
    """Mend in place the entries of ``m`` (``amax`` or ``amin`` of ``x``'s rows) that a NaN made
    NaN: the extreme of the row's other values. Returns whether there were any."""
    nan = torch.isnan(m)
    if not bool(nan.any()):
        return False
    rows = nan.nonzero().squeeze(1)
    inf = math.inf
    rest = x[rows].float().nan_to_num(nan=-inf if largest else inf, posinf=inf, neginf=-inf)
    m[rows] = rest.amax(1) if largest else rest.amin(1)
    return True


def exact_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(count int64, mean float64, M2 float64) of each row of ``x`` (R, L) over its non-NaN values.

    Two passes in float64 (mean, then squared deviations from it): no cancellation. Needs no host
    synchronization. Rows without a value get count 0, mean 0 and M2 0.
    """
    x = x.double()
    ok = ~torch.isnan(x)
    count = ok.sum(1)
    mean = x.where(ok, 0.0).sum(1) / count.clamp(min=1)
    dev = (x - mean[:, None]).where(ok, 0.0)
    return count, mean, dev.square().sum(1)


def reduce_maps(acts: torch.Tensor, sample: int | None = None, minimum: bool = False) -> Maps:
    """Max, count, mean and M2 of every map of ``acts`` (N, C, ...) on CPU.

    With ``sample`` (RunningStats' setting) the values at ``lattice(H, W, sample)`` are copied out
    as well, for the quantile histogram; with ``minimum`` each map's min too (for BottomK). Hand
    the result to ``TopK.add``, ``RunningStats.add`` and ``BottomK.add`` (``maps=``). The maps are
    reduced a chunk of ~2 MB at a time, so that ``amax``, ``sum`` and ``vector_norm`` (and
    ``amin``) read each chunk from memory once and from cache after.
    """
    N, C = acts.shape[:2]
    L = math.prod(acts.shape[2:])
    R = N * C
    x = acts.detach().float().reshape(R, L).contiguous()
    # sums over segments (rows of a large map) in float32, then over a map's segments in float64:
    # vector_norm adds a row sequentially, so its error grows with the row's length
    seg = acts.shape[3] if acts.dim() == 4 and L > _SEGMENT else L
    mx = torch.empty(R)
    mn = torch.empty(R) if minimum else None
    total = torch.empty(R, dtype=torch.float64)
    sumsq = torch.empty(R, dtype=torch.float64)
    rows = max(1, _CHUNK // L)
    for at in range(0, R, rows):
        part = x[at : at + rows]
        torch.amax(part, 1, out=mx[at : at + rows])  # propagates NaN: mended below
        if mn is not None:
            torch.amin(part, 1, out=mn[at : at + rows])
        part = part.view(-1, L // seg, seg)
        torch.sum(part.sum(2).double(), 1, out=total[at : at + rows])
        norm = torch.linalg.vector_norm(part, dim=2).double().square_()
        torch.sum(norm, 1, out=sumsq[at : at + rows])
    has_nan = _skip_nan(mx, x, largest=True)
    if has_nan and mn is not None:
        _skip_nan(mn, x, largest=False)
    mean = total / L
    m2 = sumsq - total * mean
    count = torch.full((R,), L, dtype=torch.int64)
    redo = (~(sumsq <= _WELL_CONDITIONED * m2)).nonzero().squeeze(1)  # NaN compares False
    if redo.numel():
        count[redo], mean[redo], m2[redo] = exact_moments(x[redo])
    lat = grid = None
    if sample is not None:
        H, W = acts.shape[2:] if acts.dim() == 4 else (1, 1)
        lat = lattice(H, W, sample)
        grid = x.view(N, C, L)[:, :, lat[0] :: lat[1]].contiguous()
    stats = (t.view(N, C) for t in (mx, count, mean, m2))
    return Maps(*stats, grid, lat, has_nan, None if mn is None else mn.view(N, C))
