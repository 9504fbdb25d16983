"""Per-channel bottom-k: the k most negative activations with their locations (``--bottom-k``).

Public names: `BottomK`.

The bottom-k of ``x`` is the top-k of ``-x``, read back negated: `BottomK` wraps a
`patchmine.topk.TopK` and negates on the way in and out, so it has the same rules and guarantees
mirrored. Per channel, ``per_image=1`` keeps an image's argmin location (the first in row-major
order on ties); ``per_image=N`` up to N locations per image, greedy by ascending score with IoU > 0.5
suppression of the receptive-field boxes. Entries are ordered by score ascending, then image index
ascending, then flat location ascending. NaN and +inf activations never enter (the mirror of TopK
leaving out NaN and -inf); -inf does, first. Negation is exact and maps -0.0 and 0.0 onto each
other, which compare equal: a kept score is bit for bit the activation at its location.
"""

from __future__ import annotations

import torch

from patchmine.maps import Maps, map_min
from patchmine.topk import TopK

__all__ = ["BottomK"]

_VERSION = 1
_ORDER = "ascending"  # marks a BottomK state: a TopK state read as one would be upside down


class BottomK:
    """Per-channel bottom-k of one node's activations over a corpus.

    Args: as `patchmine.topk.TopK` (channels, k, per_image, fmap_hw, rf_size, rf_stride, device).

    Example:
        >>> bk = BottomK(channels=64, k=9, fmap_hw=(55, 55))
        >>> bk.add(acts, torch.arange(64) + offset)       # acts (64, 64, 55, 55)
        >>> bk.result()["score"][:, 0]                     # each channel's most negative activation
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
        self._top = TopK(channels, k, per_image, fmap_hw, rf_size, rf_stride, device=device)

    channels = property(lambda self: self._top.channels)
    k = property(lambda self: self._top.k)
    per_image = property(lambda self: self._top.per_image)
    fmap_hw = property(lambda self: self._top.fmap_hw)
    device = property(lambda self: self._top.device)

    def add(self, acts: torch.Tensor, image_index: torch.Tensor, maps: Maps | None = None) -> None:
        """Offer a batch of activations: (N, C, H, W) or (N, C), and (N,) int64 corpus indices
        (as `TopK.add`); ``maps``: ``reduce_maps(acts, minimum=True)`` when the caller has it
        (only its ``min`` and ``nan`` are read).

        On CPU the batch is not negated whole: one ``amin`` per map gives the negated maxima
        (NaN left out, as `patchmine.maps.map_max` does), and only the maps that can enter
        (``TopK._candidates``, the maps TopK then reads) are negated for it to locate.
        """
        top = self._top
        if top._sync_free or acts.dim() not in (2, 4) or acts.shape[0] == 0:
            top.add(acts.neg(), image_index)
            return
        N, C = acts.shape[:2]
        x = acts.detach().reshape(N * C, -1)
        if maps is not None and maps.min is not None:
            low, has_nan = maps.min.reshape(-1).clone(), maps.nan
        else:  # +inf (never enters) for a map without a value
            low, has_nan = map_min(x.float())
        high = low.neg_().view(N, C)  # the maxima of -acts
        need = top._candidates(high, image_index.to(torch.int64) * (x.shape[1]))
        if 2 * need.numel() >= N * C:
            neg = x.neg()
        else:
            neg = torch.empty_like(x)  # rows TopK does not read stay unset
            neg[need] = x[need].neg()
        maps = Maps(high, None, None, None, None, None, has_nan)  # TopK reads max and nan only
        top.add(neg.view(acts.shape), image_index, maps)

    def merge(self, other: BottomK) -> None:
        """Fold another collector of the same node into this one, in place (associative and
        commutative: merged shards equal one pass over their union)."""
        if not isinstance(other, BottomK):
            raise TypeError(f"can only merge a BottomK, got {type(other).__name__}")
        self._top.merge(other._top)

    def result(self) -> dict[str, torch.Tensor]:
        """The current bottom-k per channel.

        Returns:
            score: (C, k) float32, ascending per row, NaN in unused slots.
            image: (C, k) int64 corpus index, -1 in unused slots.
            yx: (C, k, 2) int32 location in the feature map, 0 in unused slots.
        """
        out = self._top.result()
        out["score"] = out["score"].neg()
        return out

    def state_dict(self) -> dict:
        """Plain data: TopK's state with the scores as stored (ascending), "order": "ascending"."""
        sd = self._top.state_dict()
        sd["score"] = sd["score"].neg()
        sd["order"] = _ORDER
        sd["bottom_version"] = _VERSION
        return sd

    def load_state_dict(self, sd: dict) -> None:
        """Restore a state from `state_dict` exactly.

        Raises:
            ValueError: a state that is not a BottomK's (a TopK state), or that differs in config.
        """
        if sd.get("order") != _ORDER or sd.get("bottom_version") != _VERSION:
            raise ValueError("not a BottomK state (a top-k state cannot be read as a bottom-k)")
        top = dict(sd)
        top["score"] = torch.as_tensor(sd["score"], dtype=torch.float32).neg()
        self._top.load_state_dict(top)

    @classmethod
    def from_state_dict(cls, sd: dict, device="cpu") -> BottomK:
        """Build a collector from `state_dict` output."""
        bk = cls(
            sd["channels"],
            sd["k"],
            sd["per_image"],
            tuple(sd["fmap_hw"]),
            tuple(sd["rf_size"]),
            tuple(sd["rf_stride"]),
            device=device,
        )
        bk.load_state_dict(sd)
        return bk

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
    ) -> BottomK:
        """A collector that holds a stored bottom-k (a file's ``bottom/`` score, image, yx).

        Args:
            score: (C, k) float32 ascending, image: (C, k) int64 (-1 unused), yx: (C, k, 2);
                numpy arrays or tensors. The rest as for the constructor.
        """
        bk = cls.__new__(cls)
        bk._top = TopK.from_result(
            torch.as_tensor(score).neg(),
            image,
            yx,
            per_image=per_image,
            fmap_hw=fmap_hw,
            rf_size=rf_size,
            rf_stride=rf_stride,
            device=device,
        )
        return bk

    def to(self, device) -> BottomK:
        """Move the state to `device` (in place); returns self."""
        self._top.to(device)
        return self

    def __repr__(self) -> str:
        t = self._top
        return (
            f"BottomK(channels={t.channels}, k={t.k}, per_image={t.per_image}, fmap_hw={t.fmap_hw})"
        )
