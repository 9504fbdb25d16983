"""Running per-channel statistics of a node's activations: count, mean, std, max, quantiles.

Public names: `RunningStats`, `bin_edges`.

count, mean, std (population, ddof=0) and max cover every location of every image. Each
(image, channel) map gives its count, mean and M2 (sum of squared deviations from its mean; see
`patchmine.maps`, no E[x^2] - E[x]^2 cancellation), a function of the image alone. They are merged
in float64 with Chan et al.'s parallel formula (as dissect's RunningVariance does): buffered maps
into one group per channel, that group into the state, and states into each other by `merge`.
Another batching, order or sharding changes the float64 state in its last bits only (relative
~1e-15), so the float32 results do not depend on it in practice. NaN activations are skipped (not
counted, enter no statistic).

Quantiles come from a fixed-bin histogram with int64 counts (exactly mergeable). Bins follow the
float32 bit pattern: 32 bins per octave for 2^-14 <= |v| < 2^17, uniform in value inside an octave,
so a bin spans at most 1/32 (3.1%) of its lower edge; |v| < 2^-14 (about 6.1e-5, including exact
zeros) shares one bin reported as 0, and |v| >= 2^17 (131072) one bin per sign reported as +-2^17.
A quantile is interpolated linearly inside the bin holding the order statistic at rank
``q * (n - 1)``: it lies in that bin, i.e. within one bin width of the value numpy's linear
quantile would give for the same values. 1987 bins per channel (16 KB of int64).

For speed the histogram (only the histogram) sees a fixed subsample of each map's locations: about
`sample` flat locations ``offset + j * step``, with ``step`` the largest value <= H * W // sample
coprime to W and ``offset = step // 2`` (a lattice: no two samples share a row-major run or a
column). All locations are used when the map has no more than `sample` (e.g. (N, C) nodes). The
lattice is the same for every image, so the counts stay a pure function of the images fed in.
`patchmine.maps.reduce_maps` copies these values out while it reduces the maps, so that the
histogram costs no extra read of the activations.
"""

from __future__ import annotations

import torch

from patchmine.maps import Maps, exact_moments, lattice, reduce_maps

__all__ = ["RunningStats", "bin_edges"]

_VERSION = 2  # 1: float64 sum and sum of squares instead of mean and M2
_SHIFT = 18  # float32 bits dropped: 23 - 18 = 5 mantissa bits kept, 32 bins per octave
_LO_EXP, _HI_EXP = -14, 17
_FIRST_GROUP = (127 + _LO_EXP) << (23 - _SHIFT)  # bit group of 2^-14: the first regular bin
_SIDE = (
    (_HI_EXP - _LO_EXP) << (23 - _SHIFT)
) + 1  # bins per sign; _SIDE itself is the overflow bin
_NBINS = 2 * _SIDE + 1  # slot _SIDE holds |v| < 2^-14
_NSLOTS = _NBINS + 1  # the last slot collects NaN and is never read
_DEFAULT_Q = (0.5, 0.9, 0.95, 0.99, 0.995, 0.999)
_FLUSH_AT = 1 << 21  # values (maps and histogram samples) buffered before they are counted
_GROUPS = 1 << (31 - _SHIFT)  # float32 bit groups of one sign


def _slots(v: torch.Tensor) -> torch.Tensor:
    """Histogram slot - _SIDE, in [-_SIDE, _SIDE], of each value of a contiguous float32 tensor (int32).

    NaN lands in an end slot: mask it.
    """
    b = v.view(torch.int32)
    p = (b & 0x7FFFFFFF).bitwise_right_shift_(_SHIFT)
    p.sub_(_FIRST_GROUP - 1).clamp_(0, _SIDE)
    s = b >> 31  # 0 or -1: negate p for negative values
    return p.bitwise_xor_(s).sub_(s)


def _slot_table() -> torch.Tensor:
    """(2 * _GROUPS,) int32: _SIDE + the slot of the values whose bits >> _SHIFT are g - _GROUPS."""
    g = torch.arange(-_GROUPS, _GROUPS, dtype=torch.int32)
    return _slots((g << _SHIFT).view(torch.float32)) + _SIDE


def _slot_edges() -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi) float64 value range of each of the _NBINS slots, lo <= hi."""
    p = torch.arange(1, _SIDE, dtype=torch.int64)
    g = p + _FIRST_GROUP - 1
    lo = (g << _SHIFT).to(torch.int32).view(torch.float32).double()
    hi = ((g + 1) << _SHIFT).to(torch.int32).view(torch.float32).double()
    top = torch.tensor([2.0**_HI_EXP], dtype=torch.float64)
    zero = torch.zeros(1, dtype=torch.float64)
    pos_lo, pos_hi = torch.cat([lo, top]), torch.cat([hi, top])
    return (torch.cat([-pos_hi.flip(0), zero, pos_lo]), torch.cat([-pos_lo.flip(0), zero, pos_hi]))


def bin_edges():
    """(lo, hi) float64 numpy arrays: the value range of each bin of a state's ``hist`` (C, bins+1);
    its last column (NaN) has no bin."""
    lo, hi = _slot_edges()
    return lo.numpy(), hi.numpy()


class RunningStats:
    """Per-channel count, mean, std, max and quantiles over every location of every image.

    Args:
        channels: C.
        device: where the state lives; `add` expects activations there.
        quantiles: the q values reported by `result`, each in [0, 1].
        sample: about how many locations per map feed the quantile histogram (0: all); the
            default 4 keeps the histogram at ~10% of the cost of the mean/std/max sweep.

    Example:
        >>> rs = RunningStats(64)
        >>> rs.add(acts)                                   # (N, 64, H, W)
        >>> rs.result()["quantile"].shape
        torch.Size([64, 6])
    """

    def __init__(self, channels: int, device="cpu", quantiles=_DEFAULT_Q, sample: int = 4):
        if int(channels) != channels or channels < 1:
            raise ValueError(f"channels must be a positive int, got {channels!r}")
        q = [float(v) for v in quantiles]
        if not q or any(not 0.0 <= v <= 1.0 for v in q):
            raise ValueError(f"quantiles must be a non-empty list of values in [0, 1], got {q}")
        self.channels = int(channels)
        self.quantiles = tuple(q)
        self.sample = int(sample)
        self.device = torch.device(device)
        self._sync_free = self.device.type != "cpu"
        C, dev = self.channels, self.device
        self._count = torch.zeros(C, dtype=torch.int64, device=dev)
        self._mean = torch.zeros(C, dtype=torch.float64, device=dev)
        self._m2 = torch.zeros(C, dtype=torch.float64, device=dev)
        self._max = torch.full((C,), float("-inf"), dtype=torch.float32, device=dev)
        self._hist = torch.zeros(C, _NSLOTS, dtype=torch.int64, device=dev)
        self._ones = torch.ones(0, dtype=torch.int64, device=dev)
        self._table = _slot_table().to(dev)
        self._offsets = torch.arange(C, dtype=torch.int32, device=dev)[:, None] * _NSLOTS
        # batches not yet counted: (count, mean, M2, max) per map, and histogram slots
        self._pending_maps: list[tuple] = []
        self._pending_slots: list[torch.Tensor] = []
        self._npending = 0

    def add(self, acts: torch.Tensor, maps: Maps | None = None) -> None:
        """Accumulate a batch.

        Args:
            acts: (N, C, H, W), or (N, C) for a node without spatial dims; any floating dtype.
            maps: ``maps.reduce_maps(acts, sample=self.sample)`` when the caller has it (shared
                with TopK); without the sample, the histogram reads it from ``acts``.
        """
        if acts.dim() not in (2, 4) or acts.shape[1] != self.channels:
            raise ValueError(
                f"acts must be (N, {self.channels}, H, W) or (N, {self.channels}), "
                f"got shape {tuple(acts.shape)}"
            )
        if acts.device != self.device:
            raise ValueError(f"acts are on {acts.device} but these stats live on {self.device}")
        N, C = acts.shape[:2]
        if N == 0:
            return
        a4 = acts if acts.dim() == 4 else acts[:, :, None, None]
        H, W = a4.shape[2:]
        x = a4.reshape(N, C, H * W)
        if maps is None and not self._sync_free:
            maps = reduce_maps(acts, sample=self.sample)
        if maps is None:  # no host synchronization: every map the exact way
            count, mean, m2 = (t.view(N, C) for t in exact_moments(x.reshape(N * C, H * W)))
            rmax = x.float().masked_fill(torch.isnan(x), float("-inf")).amax(2)
            self._pending_maps.append((count, mean, m2, rmax))
            has_nan = True
        else:
            self._pending_maps.append((maps.count, maps.mean, maps.m2, maps.max))
            has_nan = maps.nan
        lat = lattice(H, W, self.sample)
        if maps is not None and maps.grid is not None and maps.lattice == lat:
            grid = maps.grid
        else:
            grid = torch.empty(
                x[:, :, lat[0] :: lat[1]].shape, dtype=torch.float32, device=self.device
            ).copy_(x[:, :, lat[0] :: lat[1]])
        group = grid.view(torch.int32).bitwise_right_shift(_SHIFT).add_(_GROUPS)
        idx = self._table.index_select(0, group.view(-1)).view(grid.shape)
        if has_nan:
            idx.masked_fill_(torch.isnan(grid), _NBINS)
        self._pending_slots.append(idx.add_(self._offsets).view(-1))
        self._npending += N * C + idx.numel()
        if self._npending >= _FLUSH_AT:
            self._flush()

    def _flush(self) -> None:
        """Count the buffered batches: a few large ops instead of many small ones per batch, and
        the histogram (MBs) read while it stays in cache, not once per batch after the
        activations have evicted it."""
        if self._pending_maps:
            count, mean, m2, rmax = (torch.cat(t) for t in zip(*self._pending_maps, strict=True))
            # the buffered maps as one group per channel (Chan's formula over many groups)
            n = count.sum(0)
            w = count.double()
            group_mean = (w * mean).sum(0) / n.clamp(min=1)
            group_m2 = m2.sum(0) + (w * (mean - group_mean).square()).sum(0)
            self._combine(n, group_mean, group_m2)
            self._max = torch.maximum(self._max, rmax.amax(0))
        for idx in self._pending_slots:
            if self._ones.numel() < idx.numel():
                self._ones = torch.ones(idx.numel(), dtype=torch.int64, device=self.device)
            self._hist.view(-1).index_add_(0, idx, self._ones[: idx.numel()])
        self._pending_maps, self._pending_slots, self._npending = [], [], 0

    def _combine(self, n: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor) -> None:
        """Fold a group's per-channel (count, mean, M2) into the state (Chan et al.'s formula)."""
        total = self._count + n
        share = n.double() / total.clamp(min=1)
        delta = mean - self._mean
        self._m2 = self._m2 + m2 + delta.square() * self._count.double() * share
        self._mean = self._mean + delta * share
        self._count = total

    def merge(self, other: RunningStats) -> None:
        """Fold another accumulator of the same node into this one, in place.

        Raises:
            ValueError: naming the difference when channels, quantiles or sample differ.
        """
        if not isinstance(other, RunningStats):
            raise TypeError(f"can only merge a RunningStats, got {type(other).__name__}")
        self._check_same(other._config(), "the other RunningStats")
        self._flush()
        other._flush()
        dev = self.device
        self._combine(other._count.to(dev), other._mean.to(dev), other._m2.to(dev))
        self._max = torch.maximum(self._max, other._max.to(dev))
        self._hist += other._hist.to(dev)

    def result(self) -> dict[str, torch.Tensor]:
        """The statistics so far (NaN for a channel that saw no value).

        Returns:
            count: (C,) int64. mean, std, max: (C,) float32. quantile: (C, Q) float32.
            q: (Q,) float32, the quantile levels.
        """
        self._flush()
        empty = self._count == 0
        nan = float("nan")
        std = (self._m2 / self._count.double()).sqrt()
        return {
            "count": self._count.clone(),
            "mean": self._mean.masked_fill(empty, nan).float(),
            "std": std.float(),
            "max": self._max.masked_fill(empty, nan),
            "quantile": self._quantiles().float(),
            "q": torch.tensor(self.quantiles, dtype=torch.float32, device=self.device),
        }

    def _quantiles(self) -> torch.Tensor:
        h = self._hist[:, :_NBINS]
        C, Q = self.channels, len(self.quantiles)
        total = h.sum(1, keepdim=True)
        cum = h.cumsum(1)
        q = torch.tensor(self.quantiles, dtype=torch.float64, device=self.device)
        rank = q[None, :] * (total - 1).clamp(min=0).double()  # (C, Q)
        b = torch.searchsorted(cum, rank.floor().long(), right=True).clamp(max=_NBINS - 1)
        before = torch.where(b > 0, cum.gather(1, (b - 1).clamp(min=0)), 0)
        cnt = h.gather(1, b).clamp(min=1)
        frac = ((rank - before + 0.5) / cnt).clamp(0, 1)
        lo, hi = (e.to(self.device) for e in _slot_edges())
        out = lo[b] + frac * (hi[b] - lo[b])
        return out.masked_fill(total.expand(C, Q) == 0, float("nan"))

    # ------------------------------------------------------------------ state
    def _config(self) -> dict:
        return {
            "channels": self.channels,
            "quantiles": list(self.quantiles),
            "sample": self.sample,
            "bins": _NBINS,
        }

    def _check_same(self, other_cfg: dict, what: str) -> None:
        mine = self._config()
        got = {n: list(v) if isinstance(v, (list, tuple)) else v for n, v in other_cfg.items()}
        diff = [
            f"{n} {mine[n]} here vs {got.get(n)} in {what}" for n in mine if got.get(n) != mine[n]
        ]
        if diff:
            raise ValueError("cannot combine RunningStats that differ: " + "; ".join(diff))

    def state_dict(self) -> dict:
        """Plain data: config, "version" and CPU tensors count, mean, m2 (float64), max, hist."""
        self._flush()
        return {
            "version": _VERSION,
            **self._config(),
            "count": self._count.cpu().clone(),
            "mean": self._mean.cpu().clone(),
            "m2": self._m2.cpu().clone(),
            "max": self._max.cpu().clone(),
            "hist": self._hist.cpu().clone(),
        }

    def load_state_dict(self, sd: dict) -> None:
        """Restore a state from `state_dict` exactly.

        A version-1 state (float64 ``sum`` and ``sumsq`` instead of ``mean`` and ``m2``, from
        files written before) is converted; its M2 keeps the cancellation of ``sumsq - sum^2/n``.

        Raises:
            ValueError: on an unknown version or a config that differs from this accumulator's.
        """
        if sd.get("version") not in (1, _VERSION):
            raise ValueError(
                f"RunningStats state version {sd.get('version')!r} is not supported "
                f"(expected {_VERSION})"
            )
        self._check_same({n: sd.get(n) for n in self._config()}, "the state dict")
        dev = self.device
        count = sd["count"].to(dev, torch.int64).clone()
        if "sumsq" in sd:  # version 1
            total = sd["sum"].to(dev, torch.float64)
            mean = total / count.clamp(min=1)
            m2 = (sd["sumsq"].to(dev, torch.float64) - total * mean).clamp(min=0)
        else:
            mean, m2 = sd["mean"].to(dev, torch.float64), sd["m2"].to(dev, torch.float64)
        self._count, self._mean, self._m2 = count, mean.clone(), m2.clone()
        self._max = sd["max"].to(dev, torch.float32).clone()
        self._hist = sd["hist"].to(dev, torch.int64).clone()
        self._pending_maps, self._pending_slots, self._npending = [], [], 0

    @classmethod
    def from_state_dict(cls, sd: dict, device="cpu") -> RunningStats:
        """Build an accumulator from `state_dict` output."""
        rs = cls(sd["channels"], device=device, quantiles=sd["quantiles"], sample=sd["sample"])
        rs.load_state_dict(sd)
        return rs

    def to(self, device) -> RunningStats:
        """Move the state to `device` (in place); returns self."""
        self._flush()
        self.device = torch.device(device)
        self._sync_free = self.device.type != "cpu"
        for name in ("_count", "_mean", "_m2", "_max", "_hist", "_ones", "_table", "_offsets"):
            setattr(self, name, getattr(self, name).to(self.device))
        return self

    def __repr__(self) -> str:
        return f"RunningStats(channels={self.channels}, quantiles={self.quantiles})"
