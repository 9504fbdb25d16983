"""Running per-channel statistics of a node's activations: count, mean, std, max, quantiles.

Public names: `RunningStats`, `bin_edges`.

count, mean, std (population, ddof=0) and max cover every location of every image. Each
(image, channel) map gives its count n_i, mean m_i and M2 q_i (sum of squared deviations from its
mean; see `patchmine.maps`, no E[x^2] - E[x]^2 cancellation), a function of the image alone. From
them, in float64, s_i = n_i * m_i and r_i = s_i^2 / n_i (as a double-double, hi + lo, within
~2^-104 of the exact quotient); each float64 is split into float32 pieces that sum to it exactly
and the pieces are summed exactly (`patchmine.exact.ExactSum`, integer limbs). So the state is a
pure function of the multiset of maps: any batching, order, resume, sharding or merge tree gives
the same state and the same results, bit for bit. `result` computes, exactly (fractions) from the
sums S, Q, R and the count n: mean = S / n, M2 = Q + max(R - S^2 / n, 0) (the spread of the map
means: r_i is precise enough that it does not cancel away), std = sqrt(M2 / n), each rounded once
to float64, then to float32. NaN activations are skipped (not counted, enter no statistic); a map
with an infinity makes its channel's mean +-inf (NaN with both signs) and its std NaN.

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

import math

import torch

from patchmine.exact import LIMBS, NAN, NEG_INF, POS_INF, ExactSum, split_float64
from patchmine.maps import Maps, exact_moments, lattice, reduce_maps

__all__ = ["RunningStats", "bin_edges"]

_VERSION = 3  # 1: float64 sum and sum of squares; 2: float64 mean and M2 merged by Chan's formula
_S, _Q, _R = 0, 1, 2  # rows of the exact sums: sum of n_i m_i, of M2_i, of (n_i m_i)^2 / n_i
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


def _two_prod(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(p, e) with p = fl(a * b) and p + e = a * b exactly (Dekker, float64, no FMA needed)."""
    p = a * b
    ca, cb = a * 134217729.0, b * 134217729.0  # 2^27 + 1: Veltkamp's split
    ah, bh = ca - (ca - a), cb - (cb - b)
    al, bl = a - ah, b - bh
    return p, ((ah * bh - p) + ah * bl + al * bh) + al * bl


def _square_over(s: torch.Tensor, n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) float64 with hi + lo = s^2 / n to ~2^-104 relative (0 where n is 0)."""
    n = n.clamp(min=1)
    p, e = _two_prod(s, s)
    hi = p / n
    t, te = _two_prod(hi, n)
    lo = (((p - t) - te) + e) / n
    fin = torch.isfinite(hi)
    return hi, torch.where(fin, lo, 0.0)


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
        self._sums = ExactSum((3, C), dev)  # rows _S, _Q, _R
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

    @torch.inference_mode()
    def _flush(self) -> None:
        """Count the buffered batches: a few large ops instead of many small ones per batch, and
        the histogram (MBs) read while it stays in cache, not once per batch after the
        activations have evicted it."""
        if self._pending_maps:
            count, mean, m2, rmax = (torch.cat(t) for t in zip(*self._pending_maps, strict=True))
            self._add_maps(count, mean, m2)
            self._max = torch.maximum(self._max, rmax.amax(0))
        for idx in self._pending_slots:
            if self._ones.numel() < idx.numel():
                self._ones = torch.ones(idx.numel(), dtype=torch.int64, device=self.device)
            self._hist.view(-1).index_add_(0, idx, self._ones[: idx.numel()])
        self._pending_maps, self._pending_slots, self._npending = [], [], 0

    def _add_maps(self, count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor) -> None:
        """Add (M, C) maps' count, mean and M2 to the exact sums (pieces that are zero in every
        map, e.g. all but one for (N, C) nodes, are skipped: they add nothing)."""
        M, C = count.shape
        cell = torch.arange(C, device=self.device).expand(M, C)
        if bool((count <= 1).all()) and not bool(m2.any()):
            # one value per map ((N, C) nodes): s is that float32 value, r = s^2 is exact in
            # float64 and splits into two pieces; the general way gives the same pieces
            s = mean.float()
            r = split_float64(s.double().square())[:2]
            cells = torch.stack([cell + _S * C, cell + _R * C, cell + _R * C])
            self._sums.add(torch.cat([s[None], r]), cells, per_cell=3 * M)
        else:
            w = count.double()
            s = w * mean.double()
            r_hi, r_lo = _square_over(s, w)
            rows = (_S, _Q, _R, _R)
            pieces = torch.cat([split_float64(x) for x in (s, m2.double(), r_hi, r_lo)])
            keep = pieces.flatten(1).ne(0).any(1).nonzero().squeeze(1).tolist()
            if keep:
                cells = torch.stack([cell + rows[k // 3] * C for k in keep])
                self._sums.add(pieces[keep], cells, per_cell=M * len(keep))
        self._count += count.sum(0)

    @torch.inference_mode()
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
        self._count += other._count.to(dev)
        self._sums.merge(other._sums)
        self._max = torch.maximum(self._max, other._max.to(dev))
        self._hist += other._hist.to(dev)

    def result(self) -> dict[str, torch.Tensor]:
        """The statistics so far (NaN for a channel that saw no value).

        Returns:
            count: (C,) int64. mean, std, max: (C,) float32. quantile: (C, Q) float32.
            q: (Q,) float32, the quantile levels.
        """
        self._flush()
        mean, std = self._mean_std()
        return {
            "count": self._count.clone(),
            "mean": mean.float().to(self.device),
            "std": std.float().to(self.device),
            "max": self._max.masked_fill(self._count == 0, float("nan")),
            "quantile": self._quantiles().float(),
            "q": torch.tensor(self.quantiles, dtype=torch.float32, device=self.device),
        }

    def _mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(C,) float64 mean and std from the exact sums, each rounded once from exact (CPU)."""
        C = self.channels
        exact = self._sums.exact()
        nf = self._sums.nonfinite_counts()
        pos, neg, nan = ((nf[k, _S] > 0).tolist() for k in (POS_INF, NEG_INF, NAN))
        bad = (nf.flatten(0, 1) > 0).any(0).tolist()  # any non-finite S, Q or R piece
        mean, std = [], []
        for c, n in enumerate(self._count.cpu().tolist()):
            S, Q, R = exact[_S * C + c], exact[_Q * C + c], exact[_R * C + c]
            if n == 0 or nan[c] or (pos[c] and neg[c]):
                mean.append(math.nan)
            else:
                mean.append(math.inf if pos[c] else -math.inf if neg[c] else float(S / n))
            if n == 0 or bad[c]:
                std.append(math.nan)
            else:
                std.append(math.sqrt(float((Q + max(R - S * S / n, 0)) / n)))
        return torch.tensor(mean, dtype=torch.float64), torch.tensor(std, dtype=torch.float64)

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
        """Plain data, canonical (equal states give equal dicts): config, "version" and CPU
        tensors "count" (C,) int64, "sums" (9, 3, C) int64 (the exact sums of rows S, Q, R in
        carried 32-bit limbs, units of 2^-149: sum_j sums[j] * 2^(32 j - 149)), "nonfinite"
        (3, 3, C) int64 (counts of +inf, -inf, NaN pieces per row), "max", "hist"."""
        self._flush()
        return {
            "version": _VERSION,
            **self._config(),
            "count": self._count.cpu().clone(),
            "sums": self._sums.canonical(trim=False)[1],
            "nonfinite": self._sums.nonfinite_counts(),
            "max": self._max.cpu().clone(),
            "hist": self._hist.cpu().clone(),
        }

    @torch.inference_mode()
    def load_state_dict(self, sd: dict) -> None:
        """Restore a state from `state_dict` exactly.

        States of files written before are converted, each channel as one map: version 2 (float64
        ``mean`` and ``m2``, merged by Chan's formula) and version 1 (float64 ``sum`` and
        ``sumsq``; its M2 keeps the cancellation of ``sumsq - sum^2/n``). They are recognised by
        those keys, so a fresh state updated with an old file's tensors (as merge does) loads too.

        Raises:
            ValueError: on an unknown version or a config that differs from this accumulator's.
        """
        if sd.get("version") not in (1, 2, _VERSION):
            raise ValueError(
                f"RunningStats state version {sd.get('version')!r} is not supported "
                f"(expected {_VERSION})"
            )
        self._check_same({n: sd.get(n) for n in self._config()}, "the state dict")
        dev, C = self.device, self.channels
        count = torch.as_tensor(sd["count"]).to(dev, torch.int64).clone()
        self._sums = ExactSum((3, C), dev)
        self._count = torch.zeros(C, dtype=torch.int64, device=dev)
        if "sumsq" in sd or "m2" in sd:  # version 1 or 2
            if "sumsq" in sd:
                total = torch.as_tensor(sd["sum"]).to(dev, torch.float64)
                mean = total / count.clamp(min=1)
                m2 = (torch.as_tensor(sd["sumsq"]).to(dev, torch.float64) - total * mean).clamp(
                    min=0
                )
            else:
                mean = torch.as_tensor(sd["mean"]).to(dev, torch.float64)
                m2 = torch.as_tensor(sd["m2"]).to(dev, torch.float64)
            self._add_maps(count[None], mean[None], m2[None])
        else:
            self._sums.load(0, torch.as_tensor(sd["sums"]).reshape(LIMBS, 3, C), sd["nonfinite"])
            self._count = count
        self._max = torch.as_tensor(sd["max"]).to(dev, torch.float32).clone()
        self._hist = torch.as_tensor(sd["hist"]).to(dev, torch.int64).clone()
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
        for name in ("_count", "_max", "_hist", "_ones", "_table", "_offsets"):
            setattr(self, name, getattr(self, name).to(self.device))
        self._sums.to(self.device)
        return self

    def __repr__(self) -> str:
        return f"RunningStats(channels={self.channels}, quantiles={self.quantiles})"
