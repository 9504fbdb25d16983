"""Exact, order-free sums of float32 values in integer limbs (pure torch).

Public names: `ExactSum`, `split_float64`.

A float32 value is an integer multiple of 2^-149 below 2^277, so the sum of any number of them is
an integer in that unit. `ExactSum` keeps such sums exactly, per cell of a fixed shape, in nine
signed 32-bit limbs each held in an int64 (carried every 2^30 values per cell, so they never
overflow); only the limbs that values have reached are allocated. Integer addition is
associative, so the state is a pure function of the multiset of (cell, value) added: any
batching, order, resume or merge gives the same state, bit for bit, on any device. +inf, -inf and
NaN are counted apart, per cell. `split_float64` turns float64 values into float32 pieces whose
exact sum is the value, so that float64 values can be summed exactly too.
"""

from __future__ import annotations

from fractions import Fraction

import torch

__all__ = ["ExactSum", "split_float64"]

LIMB_BITS = 32
LIMBS = 9  # a float32 is an integer multiple of 2^-149 below 2^277: 9 limbs of 32 bits
UNIT = -149  # log2 of the fixed-point unit
NORMALIZE_AT = 1 << 30  # values per cell between carries: each adds < 2^32 to a limb
_BIN_SHIFT = 3  # float32 exponents per float64 pre-sum bin: 2^3
_BIN_CHUNK = 1 << 22  # values per pre-sum: 24 + 7 + 22 bits <= 53, the float64 sums are exact
_BIN_TOP = 28 << _BIN_SHIFT  # exponents from here (|v| >= 2^97) skip the pre-sum: bin sums < 2^128
POS_INF, NEG_INF, NAN = 0, 1, 2  # rows of the non-finite counts


def normalize(limbs: torch.Tensor) -> torch.Tensor:
    """Carry (n, ...) int64 limbs so that all but the last lie in [0, 2^32); the last is signed."""
    limbs = limbs.clone()
    for j in range(limbs.shape[0] - 1):
        carry = limbs[j] >> LIMB_BITS  # floor division by 2^32
        limbs[j] -= carry << LIMB_BITS
        limbs[j + 1] += carry
    return limbs


def split_float64(x: torch.Tensor) -> torch.Tensor:
    """(3, ...) float32 pieces of a float64 tensor whose exact sum is ``x``.

    hi = float32(x), mid = float32(x - hi), lo = float32(x - hi - mid); both differences are exact
    in float64, and 3 x 24 bits cover float64's 53. Exact unless a piece falls below float32's
    subnormal range (|x| < ~2^-100 loses its bits under 2^-149) or ``|x| >= 2^128`` (hi = +-inf).
    A non-finite x gives hi = x and zero mid and lo.
    """
    x = x.double()
    hi = x.float()
    r = torch.where(torch.isfinite(hi), x - hi.double(), 0.0)
    mid = r.float()
    lo = (r - mid.double()).float()
    return torch.stack([hi, mid, lo])


class ExactSum:
    """Exact sums of float32 values, per cell of a fixed shape, plus counts of +inf, -inf, NaN.

    Args:
        shape: the cells' shape; `add` names a cell by its flat (row-major) index.
        device: where the state lives.
        carry_at: values per cell between carries (the int64 limbs' headroom).

    Example:
        >>> s = ExactSum((2, 3))
        >>> s.add(torch.tensor([0.1, 0.2]), torch.tensor([0, 0]), per_cell=2)
        >>> s.sums()[0, 0]     # exact 0.1f + 0.2f, rounded to float64
    """

    def __init__(self, shape: tuple[int, ...], device="cpu", carry_at: int = NORMALIZE_AT):
        self.shape = tuple(int(s) for s in shape)
        self.device = torch.device(device)
        self.carry_at = int(carry_at)
        self.limbs = torch.zeros(0, *self.shape, dtype=torch.int64, device=self.device)
        self.first = 0  # limb index of self.limbs[0]
        self.nonfinite = torch.zeros(0, *self.shape, dtype=torch.int64, device=self.device)
        self._since_carry = 0

    @property
    def cells(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    # -------------------------------------------------------------------------- accumulate
    def _cover(self, lo: int, hi: int) -> None:
        """Grow the allocated limbs to cover limb indices [lo, hi)."""
        n = self.limbs.shape[0]
        if n == 0:
            self.first, n = lo, 0
        lo, hi = min(lo, self.first), max(hi, self.first + n)
        if (lo, hi) == (self.first, self.first + n):
            return
        grown = torch.zeros(hi - lo, *self.shape, dtype=torch.int64, device=self.device)
        grown[self.first - lo : self.first - lo + n] = self.limbs
        self.limbs, self.first = grown, lo

    @torch.inference_mode()
    def add(self, values: torch.Tensor, cell: torch.Tensor, per_cell: int) -> None:
        """Add float32 ``values`` into the cells of the same-shaped int64 flat indices ``cell``.

        ``per_cell`` bounds how many of the values any one cell receives (for the carry).
        """
        if values.numel() == 0:
            return
        if values.numel() >= 8 * self.cells:
            self._add_binned(values, cell)
            return
        self._add_limbs(values, cell, per_cell)

    def _add_binned(self, values: torch.Tensor, cell: torch.Tensor) -> None:
        """Many values per cell: pre-sum them exactly in float64, per cell and bin of 8 float32
        exponents (values there are multiples of one unit, below 2^31 units; 2^22 of them sum
        exactly), then add the few bin sums to the limbs (split into float32 pieces, exactly)."""
        v = values.to(self.device).float().reshape(-1)
        cell = cell.to(self.device).reshape(-1)
        exp = (v.view(torch.int32) >> 23) & 0xFF
        odd = exp >= _BIN_TOP  # non-finite and huge values: the direct way
        if bool(odd.any()):
            self._add_limbs(v[odd], cell[odd], int(odd.sum()))
            v, cell, exp = v[~odd], cell[~odd], exp[~odd]
        cells = self.cells
        for at in range(0, v.numel(), _BIN_CHUNK):
            vb, cb = v[at : at + _BIN_CHUNK], cell[at : at + _BIN_CHUNK]
            b = exp[at : at + _BIN_CHUNK] >> _BIN_SHIFT
            lo, hi = int(b.min()), int(b.max())
            acc = torch.zeros((hi - lo + 1) * cells, dtype=torch.float64, device=self.device)
            acc.index_add_(0, (b - lo).long() * cells + cb, vb.double())
            acc = acc.view(hi - lo + 1, cells)
            nz = acc.ne(0).any(1)
            acc = acc[nz]
            pieces = split_float64(acc)  # (3, bins, cells): exact, no piece overflows
            where = torch.arange(cells, device=self.device).expand_as(pieces)
            self._add_limbs(pieces, where, 3 * acc.shape[0])

    def _add_limbs(self, values: torch.Tensor, cell: torch.Tensor, per_cell: int) -> None:
        if values.numel() == 0:
            return
        if self._since_carry + per_cell > self.carry_at:
            self.carry()
        self._since_carry += per_cell
        bits = values.to(self.device).float().contiguous().view(torch.int32).to(torch.int64)
        exp = (bits >> 23) & 0xFF
        mant = bits & 0x7FFFFF
        finite = exp != 0xFF
        if not bool(finite.all()):
            self._count_nonfinite(bits, mant, cell, ~finite)
        mant = mant | ((exp > 0).long() << 23)  # the implicit bit of normal numbers
        mant = mant.masked_fill_(~finite, 0)  # counted apart
        shift = exp.clamp(min=1) - 1  # value = mant * 2^(shift + UNIT), shift in [0, 253]
        limb = shift >> 5
        scaled = mant << (shift & 31)  # < 2^55: its low and high 32 bits go to limb, limb + 1
        neg = bits < 0
        lo = torch.where(neg, -(scaled & 0xFFFFFFFF), scaled & 0xFFFFFFFF)
        hi = torch.where(neg, -(scaled >> 32), scaled >> 32)
        used = limb[mant != 0]
        if used.numel() == 0:
            return
        lowest, highest = int(used.min()), int(used.max())
        self._cover(lowest, highest + 2)
        limb = limb.clamp_(lowest, highest)  # zeros (which add nothing) into an allocated limb
        flat = self.limbs.view(-1)
        base = (limb - self.first) * self.cells + cell
        flat.index_add_(0, base.reshape(-1), lo.reshape(-1))
        flat.index_add_(0, (base + self.cells).reshape(-1), hi.reshape(-1))

    def _count_nonfinite(self, bits, mant, cell, bad) -> None:
        if self.nonfinite.shape[0] == 0:
            self.nonfinite = torch.zeros(3, *self.shape, dtype=torch.int64, device=self.device)
        kind = torch.where(mant != 0, NAN, torch.where(bits < 0, NEG_INF, POS_INF))
        idx = kind * self.cells + cell
        self.nonfinite.view(-1).index_add_(0, idx[bad], torch.ones_like(idx[bad]))

    @torch.inference_mode()
    def carry(self) -> None:
        """Carry the limbs into canonical form (it also makes room: limbs below 2^32 again)."""
        if self.limbs.shape[0]:
            self._cover(self.first, LIMBS)
            self.limbs = normalize(self.limbs)
        self._since_carry = 0

    @torch.inference_mode()
    def merge(self, other: ExactSum) -> None:
        """Add another sum of the same shape into this one, in place."""
        if other.shape != self.shape:
            raise ValueError(f"cannot merge ExactSum of shape {other.shape} into {self.shape}")
        if self._since_carry + other._since_carry > self.carry_at:
            self.carry()
            other = other.copy()
            other.carry()
        n = other.limbs.shape[0]
        if n:
            self._cover(other.first, other.first + n)
            at = other.first - self.first
            self.limbs[at : at + n] += other.limbs.to(self.device)
        if other.nonfinite.shape[0]:
            if self.nonfinite.shape[0] == 0:
                self.nonfinite = torch.zeros_like(other.nonfinite, device=self.device)
            self.nonfinite += other.nonfinite.to(self.device)
        self._since_carry += other._since_carry

    def copy(self) -> ExactSum:
        out = ExactSum(self.shape, self.device, self.carry_at)
        out.limbs, out.first = self.limbs.clone(), self.first
        out.nonfinite, out._since_carry = self.nonfinite.clone(), self._since_carry
        return out

    def to(self, device) -> ExactSum:
        """Move the state to `device` (in place); returns self."""
        self.device = torch.device(device)
        self.limbs, self.nonfinite = self.limbs.to(self.device), self.nonfinite.to(self.device)
        return self

    # ------------------------------------------------------------------------ read out, state
    def canonical(self, trim: bool = True) -> tuple[int, torch.Tensor]:
        """(first limb index, limbs) on CPU, carried; all-zero limbs trimmed from both ends, or
        (``trim=False``) all nine limbs with first 0."""
        C = self.shape
        if self.limbs.shape[0] == 0:
            return (0, self.limbs.cpu()) if trim else (0, torch.zeros(LIMBS, *C, dtype=torch.int64))
        limbs = torch.zeros(LIMBS - self.first, *C, dtype=torch.int64)
        limbs[: self.limbs.shape[0]] = self.limbs.cpu()
        limbs = normalize(limbs)
        if not trim:
            full = torch.zeros(LIMBS, *C, dtype=torch.int64)
            full[self.first :] = limbs
            return 0, full
        nonzero = limbs.flatten(1).any(1).nonzero().squeeze(1)
        if nonzero.numel() == 0:
            return 0, limbs[:0]
        lo, hi = int(nonzero[0]), int(nonzero[-1]) + 1
        return self.first + lo, limbs[lo:hi]

    def nonfinite_counts(self) -> torch.Tensor:
        """(3, *shape) int64 counts of +inf, -inf and NaN added (CPU)."""
        if self.nonfinite.shape[0]:
            return self.nonfinite.cpu().clone()
        return torch.zeros(3, *self.shape, dtype=torch.int64)

    def sums(self) -> torch.Tensor:
        """(*shape) float64 sums of the finite values (CPU), from the exact sums: a few roundings
        of non-negative terms, a deterministic function of the sums."""
        first, limbs = self.canonical()
        if limbs.shape[0] == 0:
            return torch.zeros(self.shape, dtype=torch.float64)
        # sum the magnitude's limbs, all >= 0, smallest first: a few roundings, no cancellation
        neg = limbs[-1] < 0
        zero = torch.zeros(1, *self.shape, dtype=torch.int64)
        mag = normalize(torch.cat([torch.where(neg, -limbs, limbs), zero]))
        total = torch.zeros(self.shape, dtype=torch.float64)
        for j in range(mag.shape[0]):  # powers of two from 2^-149 to 2^139: exact in float64
            total += mag[j].double() * 2.0 ** ((first + j) * LIMB_BITS + UNIT)
        return torch.where(neg, -total, total)

    def values(self) -> torch.Tensor:
        """`sums` with the non-finite values applied: +-inf where one infinity was added, NaN
        where a NaN or both infinities were."""
        out = self.sums()
        if self.nonfinite.shape[0]:
            nf = self.nonfinite.cpu()
            pos, neg, nan = nf[POS_INF] > 0, nf[NEG_INF] > 0, nf[NAN] > 0
            out = torch.where(pos, float("inf"), out)
            out = torch.where(neg, float("-inf"), out)
            out = torch.where(nan | (pos & neg), float("nan"), out)
        return out

    @torch.inference_mode()
    def load(self, first: int, limbs: torch.Tensor, nonfinite: torch.Tensor) -> None:
        """Replace the state by (first, limbs (n, *shape), nonfinite (0 or 3, *shape))."""
        self.limbs = torch.as_tensor(limbs, dtype=torch.int64).reshape(-1, *self.shape)
        self.limbs = self.limbs.to(self.device).clone()
        self.first = int(first)
        nf = torch.as_tensor(nonfinite, dtype=torch.int64).reshape(-1, *self.shape)
        self.nonfinite = nf.to(self.device).clone()
        self._since_carry = 0

    def exact(self) -> list:
        """The exact sums of the finite values as `fractions.Fraction`, one per cell (row-major)."""
        first, limbs = self.canonical()
        n = limbs.shape[0]
        flat = limbs.reshape(n, self.cells).tolist()
        scale = Fraction(2) ** (first * LIMB_BITS + UNIT)
        out = []
        for k in range(self.cells):
            total = 0
            for j in range(n - 1, -1, -1):
                total = (total << LIMB_BITS) + flat[j][k]
            out.append(total * scale)
        return out
