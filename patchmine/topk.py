"""Per-channel top-k activations with their locations: exact, vectorized, mergeable.

Public names: `TopK`.

Per channel, every (image, location) is a candidate whose score is the channel's activation there.
With ``per_image=1`` an image contributes its argmax location only (first in row-major order on
ties); with ``per_image=N`` up to N locations, greedy by score with IoU > 0.5 suppression of the
receptive-field boxes of the same image. Across images the k best entries are kept, ordered by score
descending, then image index ascending, then flat location ``y * W + x`` ascending. NaN (and -inf)
activations never enter. The result is a pure function of the multiset of (image index,
activations) fed in: batching, batch order, merges of shards and resumes do not change it.

Speed: an entry's order is the composite key (score desc, ``image * H * W + loc`` asc). On CPU the
hot path takes each (image, channel) map's max with ``amax`` (exact, so the filter below is too;
`patchmine.maps.reduce_maps` shares it with `patchmine.stats.RunningStats`), drops the maps that
cannot beat their channel's current k-th entry (one comparison on the (N, C) maxima; while the state
fills up, also those below their channel's k-th best in the batch), and runs ``argmax`` on the few
maps that survive (first occurrence on ties: the smallest flat location). Survivors are buffered
and merged into the (C, k) state with three stable sorts over the flat buffer, which resolve ties
exactly (``torch.topk`` gives a threshold value at most, it never picks among tied entries). On
other devices the same state and merge run without host synchronization: NaNs are replaced in a
temporary copy, every map yields its candidates, and the buffer is merged when full. The state is
C * k entries plus a bounded buffer.
"""

from __future__ import annotations

import torch

from patchmine.geometry import _pair
from patchmine.maps import Maps, map_max

__all__ = ["TopK", "entry_key"]

_VERSION = 1
_NONE = torch.iinfo(torch.int64).max  # key of an unused slot: sorts after every real entry
_NEG_INF = float("-inf")


def entry_key(image, yx, fmap_hw: tuple[int, int]):
    """The key of entries (image, location): ``image * H * W + y * W + x``, ties' second order.

    Args:
        image: (...) int64 corpus indices (numpy or torch).
        yx: (..., 2) locations in the (H, W) feature map, of the same kind.
        fmap_hw: (H, W).

    Returns:
        (...) int64 keys (unused slots, image -1, are the caller's to mask).
    """
    H, W = fmap_hw
    return image * (H * W) + yx[..., 0] * W + yx[..., 1]


def _sort_entries(chan, score, key):
    """Order flat entries by (channel asc, score desc, key asc); returns the sorted triple."""
    order = torch.argsort(key, stable=True)
    order = order[torch.argsort(score[order], descending=True, stable=True)]
    order = order[torch.argsort(chan[order], stable=True)]
    return chan[order], score[order], key[order]


class TopK:
    """Per-channel top-k of one node's activations over a corpus.

    Args:
        channels: C, the node's channel count.
        k: entries kept per channel.
        per_image: entries one image may contribute per channel (greedy NMS at IoU > 0.5 when > 1).
        fmap_hw: (H, W) of the node's feature map; (1, 1) for a node with output (N, C).
        rf_size: receptive-field size (ry, rx) in input pixels; only used when per_image > 1.
        rf_stride: receptive-field stride (jy, jx) in input pixels; only used when per_image > 1.
        device: where the state lives; `add` expects activations there.

    Example:
        >>> tk = TopK(channels=64, k=9, fmap_hw=(55, 55))
        >>> tk.add(acts, torch.arange(64) + offset)       # acts (64, 64, 55, 55)
        >>> tk.result()["image"].shape
        torch.Size([64, 9])
    """

    def __init__(
        self,
        channels: int,
        k: int,
        per_image: int = 1,
        fmap_hw: tuple[int, int] = (1, 1),
        rf_size: tuple[int, int] = (1, 1),
        rf_stride: tuple[int, int] = (1, 1),
        device="cpu",
    ):
        for name, v in (("channels", channels), ("k", k), ("per_image", per_image)):
            if int(v) != v or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.channels, self.k, self.per_image = int(channels), int(k), int(per_image)
        self.fmap_hw = _pair(fmap_hw, "fmap_hw")
        self.rf_size = _pair(rf_size, "rf_size")
        self.rf_stride = _pair(rf_stride, "rf_stride")
        self.device = torch.device(device)
        # CPU: filter maps with data-dependent shapes; elsewhere avoid host syncs.
        self._sync_free = self.device.type != "cpu"
        n = self.channels * self.k
        self._flush_at = max(n, 4096)
        self._score = torch.full((n,), _NEG_INF, dtype=torch.float32, device=self.device)
        self._key = torch.full((n,), _NONE, dtype=torch.int64, device=self.device)
        self._pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._npending = 0
        self._cache: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ config and helpers
    def _config(self) -> dict:
        return {
            "channels": self.channels,
            "k": self.k,
            "per_image": self.per_image,
            "fmap_hw": list(self.fmap_hw),
            "rf_size": list(self.rf_size),
            "rf_stride": list(self.rf_stride),
        }

    def _check_same(self, other_cfg: dict, what: str) -> None:
        names = ["channels", "k", "per_image", "fmap_hw"]
        if self.per_image > 1:
            names += ["rf_size", "rf_stride"]
        mine = self._config()

        def norm(v):
            return [int(a) for a in v] if isinstance(v, (list, tuple)) else v

        diff = [
            f"{n} {mine[n]} here vs {norm(other_cfg.get(n))} in {what}"
            for n in names
            if norm(other_cfg.get(n)) != mine[n]
        ]
        if diff:
            raise ValueError("cannot combine TopK states that differ: " + "; ".join(diff))

    def _const(self, name: str) -> torch.Tensor:
        """Small per-instance constants, built once per device."""
        t = self._cache.get(name)
        if t is None or t.device != self.device:
            C, k = self.channels, self.k
            if name == "chan_state":
                t = torch.arange(C, device=self.device).repeat_interleave(k)
            elif name == "arange_c":
                t = torch.arange(C, device=self.device)
            elif name == "suppress":
                t = self._suppression_table()
            else:  # pragma: no cover
                raise KeyError(name)
            self._cache[name] = t
        return t

    def _suppression_table(self) -> torch.Tensor:
        """(2H-1, 2W-1) bool: True where boxes offset by (dy, dx) locations overlap by IoU > 0.5.

        inter = max(0, ry - |dy| jy) * max(0, rx - |dx| jx); IoU = inter / (2 ry rx - inter), so
        IoU > 1/2 exactly when 3 inter > 2 ry rx (integer arithmetic, no rounding).
        """
        (H, W), (ry, rx), (jy, jx) = self.fmap_hw, self.rf_size, self.rf_stride
        dy = torch.arange(-(H - 1), H, dtype=torch.int64).abs()
        dx = torch.arange(-(W - 1), W, dtype=torch.int64).abs()
        iy = (ry - dy * jy).clamp(min=0)
        ix = (rx - dx * jx).clamp(min=0)
        inter = iy[:, None] * ix[None, :]
        return (3 * inter > 2 * ry * rx).to(self.device)

    # ------------------------------------------------------------------ hot path
    def add(self, acts: torch.Tensor, image_index: torch.Tensor, maps: Maps | None = None) -> None:
        """Offer a batch of activations.

        Args:
            acts: (N, C, H, W), or (N, C) for a node without spatial dims (a 1 x 1 map); any
                floating dtype (scores are kept as float32), on `self.device`.
            image_index: (N,) int64 global corpus indices of the batch's images (>= 0).
            maps: ``maps.reduce_maps(acts)`` when the caller has it (shared with RunningStats);
                only its ``max`` and ``nan`` are read.
        """
        given = acts
        if acts.dim() == 2:
            acts = acts[:, :, None, None]
        if acts.dim() != 4:
            raise ValueError(f"acts must be (N, C, H, W) or (N, C), got shape {tuple(acts.shape)}")
        N, C, H, W = acts.shape
        if C != self.channels or (H, W) != self.fmap_hw:
            raise ValueError(
                f"acts of shape {tuple(acts.shape)} do not match this TopK "
                f"(channels={self.channels}, fmap_hw={self.fmap_hw})"
            )
        if image_index.shape != (N,) or image_index.dtype.is_floating_point:
            raise ValueError(
                f"image_index must be an integer tensor of shape ({N},), "
                f"got {image_index.dtype} {tuple(image_index.shape)}"
            )
        if N == 0:
            return
        if acts.device != self.device:
            raise ValueError(
                f"acts are on {acts.device} but this TopK lives on {self.device}; "
                "call .to(device) first"
            )
        L = H * W
        x = acts.reshape(N * C, L)
        img_l = image_index.to(self.device, torch.int64) * L  # (N,) key of location 0
        if self._sync_free:
            self._add_dense(x, img_l, N)
        else:
            self._add_filtered(given, x, img_l, N, maps)
        if self._npending >= (4 * self._flush_at if self._sync_free else self._flush_at):
            self._flush()

    def _add_filtered(
        self, given: torch.Tensor, x: torch.Tensor, img_l: torch.Tensor, N: int, maps: Maps | None
    ) -> None:
        """CPU path: drop maps whose max cannot enter, then locate the survivors' entries."""
        C = self.channels
        if maps is not None:
            m, has_nan = maps.max, maps.nan
        else:
            m, has_nan = map_max(x.float())
            m = m.view(N, C)
        rows = self._candidates(m, img_l)
        if rows.numel() == 0:
            return
        chan = rows % C
        base = img_l[rows // C]
        if self.per_image == 1:
            w = x[rows].float()
            if has_nan:
                w = w.nan_to_num(nan=_NEG_INF, posinf=float("inf"), neginf=_NEG_INF)
            loc = w.argmax(1)  # argmax documents the first occurrence on ties
            self._push(chan, m.view(-1)[rows], base + loc)
        else:
            self._push_nms(x[rows], chan, base)

    def _candidates(self, m: torch.Tensor, img_l: torch.Tensor) -> torch.Tensor:
        """Flat indices ``n * C + c`` of the maps (maxima ``m`` (N, C), keys of their location 0
        ``img_l`` (N,)) that may enter the state; `_add_filtered` reads no other map."""
        C, k = self.channels, self.k
        N = m.shape[0]
        t_score = self._score.view(C, k)[:, -1]
        t_key = self._key.view(C, k)[:, -1]
        # a -inf map kept while its channel has free slots is pushed as an unused slot
        keep = (m > t_score) | ((m == t_score) & (img_l[:, None] <= t_key))
        rows = keep.view(-1).nonzero().squeeze(1)
        if rows.numel() > k * C and N > k:
            # more candidates than can enter (the first batches of a run): a map below the k-th
            # best max of its channel in this batch has k entries above it
            keep &= m >= m.topk(k, dim=0).values[-1]
            rows = keep.view(-1).nonzero().squeeze(1)
        return rows

    def _add_dense(self, x: torch.Tensor, img_l: torch.Tensor, N: int) -> None:
        """Device path without host syncs: every map yields its candidates."""
        C = self.channels
        x = x.float().nan_to_num(nan=_NEG_INF, posinf=float("inf"), neginf=_NEG_INF)
        chan = self._const("arange_c").repeat(N)
        base = img_l.repeat_interleave(C)
        if self.per_image == 1:
            loc = x.argmax(1)  # argmax documents the first occurrence on ties
            score = x.gather(1, loc[:, None]).squeeze(1)
            self._push(chan, score.float(), base + loc)
        else:
            self._push_nms(x, chan, base)

    def _push_nms(self, rows: torch.Tensor, chan: torch.Tensor, base: torch.Tensor) -> None:
        """Greedy per-map NMS on (S, L) maps; pushes up to per_image entries per map."""
        H, W = self.fmap_hw
        S = rows.shape[0]
        w = rows.nan_to_num(nan=_NEG_INF, posinf=float("inf"), neginf=_NEG_INF)
        if w.data_ptr() == rows.data_ptr():
            w = w.clone()
        table = self._const("suppress")
        ys = torch.arange(H, device=w.device)
        xs = torch.arange(W, device=w.device)
        scores, locs = [], []
        for r in range(self.per_image):
            loc = w.argmax(1)  # first occurrence on ties: the smaller flat location
            v = w.gather(1, loc[:, None]).squeeze(1)
            scores.append(v)
            locs.append(loc)
            if r + 1 < self.per_image:
                dy = ys[None, :] - (loc // W)[:, None] + (H - 1)  # (S, H)
                dx = xs[None, :] - (loc % W)[:, None] + (W - 1)  # (S, W)
                w.view(S, H, W).masked_fill_(table[dy[:, :, None], dx[:, None, :]], _NEG_INF)
        score = torch.stack(scores, 1).float()  # (S, P)
        loc = torch.stack(locs, 1)
        P = self.per_image
        self._push(chan.repeat_interleave(P), score.reshape(-1), (base[:, None] + loc).reshape(-1))

    def _push(self, chan: torch.Tensor, score: torch.Tensor, key: torch.Tensor) -> None:
        """Buffer flat candidate entries; -inf scores become unused slots."""
        dead = ~(score > _NEG_INF)
        key = torch.where(dead, _NONE, key)
        score = torch.where(dead, _NEG_INF, score)
        self._pending.append((chan, score, key))
        self._npending += chan.numel()

    def _flush(self) -> None:
        """Merge buffered entries into the (C, k) state, exact on ties."""
        if not self._pending:
            return
        C, k = self.channels, self.k
        chan = torch.cat([self._const("chan_state")] + [p[0] for p in self._pending])
        score = torch.cat([self._score] + [p[1] for p in self._pending])
        key = torch.cat([self._key] + [p[2] for p in self._pending])
        self._pending, self._npending = [], 0
        chan, score, key = _sort_entries(chan, score, key)
        start = torch.searchsorted(chan, self._const("arange_c"))
        rank = torch.arange(chan.numel(), device=chan.device) - start[chan]
        dest = torch.where(rank < k, chan * k + rank, C * k)  # C * k: a discard slot
        new_score = torch.empty(C * k + 1, dtype=torch.float32, device=self.device)
        new_key = torch.empty(C * k + 1, dtype=torch.int64, device=self.device)
        new_score.scatter_(0, dest, score)
        new_key.scatter_(0, dest, key)
        self._score, self._key = new_score[:-1], new_key[:-1]

    # ------------------------------------------------------------------ combine, read out
    def merge(self, other: TopK) -> None:
        """Fold another collector of the same node into this one, in place.

        Associative and commutative: merged shards equal one pass over their union.

        Raises:
            ValueError: naming the difference when k, per_image, channels or fmap_hw (and, with
                per_image > 1, rf_size / rf_stride) differ.
        """
        if not isinstance(other, TopK):
            raise TypeError(f"can only merge a TopK, got {type(other).__name__}")
        self._check_same(other._config(), "the other TopK")
        other._flush()
        self._pending.append(
            (self._const("chan_state"), other._score.to(self.device), other._key.to(self.device))
        )
        self._npending += other._score.numel()
        self._flush()

    def result(self) -> dict[str, torch.Tensor]:
        """The current top-k per channel.

        Returns:
            score: (C, k) float32, descending per row, NaN in unused slots.
            image: (C, k) int64 corpus index, -1 in unused slots.
            yx: (C, k, 2) int32 location in the feature map, 0 in unused slots.
        """
        self._flush()
        C, k = self.channels, self.k
        H, W = self.fmap_hw
        unused = (self._key == _NONE).view(C, k)
        key = torch.where(unused, 0, self._key.view(C, k))
        loc = key % (H * W)
        return {
            "score": self._score.view(C, k).masked_fill(unused, float("nan")),
            "image": torch.where(unused, -1, key // (H * W)),
            "yx": torch.stack([loc // W, loc % W], -1).to(torch.int32),
        }

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Plain data: config ints, CPU tensors score / image / yx as in `result`, "version"."""
        sd = {"version": _VERSION, **self._config()}
        sd.update({name: t.cpu() for name, t in self.result().items()})
        return sd

    def load_state_dict(self, sd: dict) -> None:
        """Restore a state from `state_dict` exactly (replaces what this collector holds).

        Raises:
            ValueError: on an unknown version or a config that differs from this collector's.
        """
        if sd.get("version") != _VERSION:
            raise ValueError(
                f"TopK state version {sd.get('version')!r} is not supported (expected {_VERSION})"
            )
        self._check_same(sd, "the state dict")
        C, k = self.channels, self.k
        score = torch.as_tensor(sd["score"], dtype=torch.float32).reshape(C, k)
        image = torch.as_tensor(sd["image"], dtype=torch.int64).reshape(C, k)
        yx = torch.as_tensor(sd["yx"], dtype=torch.int64).reshape(C, k, 2)
        unused = image < 0
        key = entry_key(image, yx, self.fmap_hw)
        self._score = score.masked_fill(unused, _NEG_INF).reshape(-1).to(self.device)
        self._key = key.masked_fill(unused, _NONE).reshape(-1).to(self.device)
        self._pending, self._npending = [], 0

    @classmethod
    def from_state_dict(cls, sd: dict, device="cpu") -> TopK:
        """Build a collector from `state_dict` output."""
        tk = cls(
            sd["channels"],
            sd["k"],
            sd["per_image"],
            tuple(sd["fmap_hw"]),
            tuple(sd["rf_size"]),
            tuple(sd["rf_stride"]),
            device=device,
        )
        tk.load_state_dict(sd)
        return tk

    @classmethod
    def from_result(
        cls,
        score,
        image,
        yx,
        *,
        per_image: int = 1,
        fmap_hw: tuple[int, int] = (1, 1),
        rf_size: tuple[int, int] = (1, 1),
        rf_stride: tuple[int, int] = (1, 1),
        device="cpu",
    ) -> TopK:
        """A collector that holds a stored result (a file's score / image / yx, as `result` gives).

        Args:
            score: (C, k) float32, image: (C, k) int64 (-1 unused), yx: (C, k, 2) ints; numpy
                arrays or tensors.
            per_image, fmap_hw, rf_size, rf_stride, device: as for the constructor.
        """
        score = torch.as_tensor(score)
        C, k = score.shape
        tk = cls(C, k, per_image, fmap_hw, rf_size, rf_stride, device=device)
        tk.load_state_dict(
            {
                **tk._config(),
                "version": _VERSION,
                "score": score,
                "image": torch.as_tensor(image),
                "yx": torch.as_tensor(yx),
            }
        )
        return tk

    def to(self, device) -> TopK:
        """Move the state to `device` (in place); returns self."""
        self._flush()
        self.device = torch.device(device)
        self._sync_free = self.device.type != "cpu"
        self._score = self._score.to(self.device)
        self._key = self._key.to(self.device)
        self._cache = {}
        return self

    def __repr__(self) -> str:
        return (
            f"TopK(channels={self.channels}, k={self.k}, per_image={self.per_image}, "
            f"fmap_hw={self.fmap_hw})"
        )
