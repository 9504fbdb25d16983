"""Image labels, channel names and per-channel class statistics.

Public names: FOLDER, assign_labels, read_channel_names, channel_names, layer_channel_names,
ClassMeans, selectivity.

- `assign_labels` gives every corpus image a label index from ``--labels folder`` (the first folder
  level under its corpus root, torchvision's ImageFolder layout) or ``--labels FILE.csv`` (``path,label``
  rows), -1 where it has none.
- `channel_names` names the channels of a node whose channels are classes: the classifier output of
  a torchvision model (its weights' ``meta["categories"]``), the embedded model's ``_fc`` (ImageNet-1k),
  or any node whose channel count matches a ``--channel-names`` file.
- `ClassMeans` accumulates, per channel and label, the mean of the per-image maximum, exactly: the
  sums are integers (below), so the result does not depend on batching, order, resume or sharding,
  bit for bit; `result` adds the class selectivity index of Morcos et al. (2018).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from patchmine.errors import UsageError

__all__ = [
    "FOLDER",
    "assign_labels",
    "read_channel_names",
    "channel_names",
    "layer_channel_names",
    "ClassMeans",
    "selectivity",
]

FOLDER = "folder"  # the --labels value that takes labels from class folders


# ---------------------------------------------------------------------------------------- labels
def _sort_names(names) -> list[str]:
    """Sorted label names; numerically when every name is a decimal integer (0, 1, ..., 999)."""
    names = set(names)
    if names and all(n.isascii() and n.isdigit() for n in names):
        return sorted(names, key=lambda n: (int(n), n))
    return sorted(names)


def _relative(root: str, path: str) -> str | None:
    """``path`` (as discovered) relative to ``root``, normalized; None when it lies outside."""
    full = os.path.normpath(os.path.join(root, path))
    rel = os.path.relpath(full, root)
    if rel == os.pardir or rel.startswith(os.pardir + os.sep):
        return None
    return rel


def _folder_labels(corpus) -> tuple[list[str], list[str | None]]:
    per_image: list[str | None] = []
    for ri, path in zip(corpus.root_index, corpus.paths, strict=True):
        rel = _relative(corpus.roots[ri], path)
        parts = rel.split(os.sep) if rel else []
        per_image.append(parts[0] if len(parts) >= 2 else None)
    if all(p is None for p in per_image):
        roots = ", ".join(corpus.roots)
        raise UsageError(
            f"--labels folder: no image lies in a class folder under its corpus root ({roots}); "
            "arrange the corpus as ROOT/CLASS/IMAGE, or give --labels FILE.csv"
        )
    return _sort_names(p for p in per_image if p is not None), per_image


def _csv_labels(corpus, file: Path) -> tuple[list[str], list[str | None]]:
    by_rel: dict[str, list[int]] = {}
    by_abs: dict[str, list[int]] = {}
    for i, (ri, path) in enumerate(zip(corpus.root_index, corpus.paths, strict=True)):
        root = corpus.roots[ri]
        by_abs.setdefault(os.path.normpath(os.path.join(root, path)), []).append(i)
        by_rel.setdefault(os.path.normpath(path), []).append(i)
    per_image: list[str | None] = [None] * len(corpus)
    line_of: list[int] = [0] * len(corpus)
    rows = 0
    try:
        with open(file, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
            reader = csv.reader(f)
            for row in reader:
                line = reader.line_num
                if not row or all(not c.strip() for c in row):
                    continue
                fields = [c.strip() for c in row]
                if rows == 0 and [c.lower() for c in fields] == ["path", "label"]:
                    rows = -1  # the header; the next row is the first one
                    continue
                rows = max(rows, 0) + 1
                where = f"{file}:{line}"
                if len(fields) != 2 or not fields[0] or not fields[1]:
                    raise UsageError(
                        f"{where}: malformed row {','.join(row)!r}: expected path,label "
                        "(quote a path that holds a comma)"
                    )
                path, label = fields
                key = os.path.normpath(path)
                hits = by_abs.get(key) if os.path.isabs(path) else by_rel.get(key)
                if not hits:
                    example = corpus.paths[0]
                    raise UsageError(
                        f"{where}: {path!r} is not in the corpus; paths are as discovered, "
                        f"relative to their corpus root (e.g. {example!r}), or absolute"
                    )
                hit_roots = sorted({corpus.root_index[i] for i in hits})
                if len(hit_roots) > 1:
                    names = ", ".join(corpus.roots[r] for r in hit_roots)
                    raise UsageError(
                        f"{where}: {path!r} is under {len(hit_roots)} corpus roots ({names}); "
                        "give its absolute path to say which"
                    )
                for i in hits:
                    if per_image[i] is not None and per_image[i] != label:
                        raise UsageError(
                            f"{where}: {path!r} is labelled {label!r} here but "
                            f"{per_image[i]!r} on line {line_of[i]}"
                        )
                    per_image[i], line_of[i] = label, line
    except OSError as e:
        raise UsageError(f"cannot read label file {file}: {e}") from e
    except (csv.Error, UnicodeError) as e:
        raise UsageError(f"{file}: not a readable CSV file: {e}") from e
    if rows <= 0:
        raise UsageError(f"{file}: labels nothing: it holds no path,label rows")
    return _sort_names(p for p in per_image if p is not None), per_image


def assign_labels(corpus, spec: str | os.PathLike) -> tuple[list[str], torch.Tensor]:
    """A label index for every image of the corpus.

    Call it on the whole corpus (before any ``--shard`` slice), so that every shard gets the same
    names and indices.

    Args:
        corpus: a `patchmine.corpus.Corpus`.
        spec: ``"folder"``: an image's label is the first folder of its path under its corpus root
            (``ROOT/cat/x.jpg`` -> ``cat``; an image directly in a root, or listed outside its root,
            gets -1; the same folder name under two roots is one label). Otherwise a CSV file of
            ``path,label`` rows (an optional ``path,label`` header; blank lines skipped; quote a
            path that holds a comma). ``path`` is the image's path as discovered, relative to its
            corpus root, or its absolute path; a relative path found under two roots is refused
            (give the absolute path). Images the file does not name get -1.

    Returns:
        names: the L label names, sorted (as numbers when every name is a decimal integer, so
            that labels 0..999 keep their order).
        label: (N,) int32 index into ``names`` per image, -1 for none.

    Raises:
        UsageError: a label file that cannot be read, names an image not in the corpus (or one
            under two roots), has a malformed row, labels one image twice differently, or labels
            nothing; ``folder`` with no image in a class folder. The message names the file and
            line.
    """
    if str(spec) == FOLDER:
        names, per_image = _folder_labels(corpus)
    else:
        file = Path(spec)
        if not file.is_file():
            raise UsageError(
                f"--labels {spec}: expected 'folder' or a CSV file of path,label rows; "
                f"{'it is a directory' if file.is_dir() else 'no such file'}"
            )
        names, per_image = _csv_labels(corpus, file)
    index = {n: j for j, n in enumerate(names)}
    label = torch.tensor([index[p] if p is not None else -1 for p in per_image], dtype=torch.int32)
    return names, label


# ---------------------------------------------------------------------------------- channel names
def read_channel_names(file: str | os.PathLike) -> list[str]:
    """Names from a ``--channel-names`` file: one per line, in channel order (trailing blank lines
    ignored; names may repeat).

    Raises:
        UsageError: the file cannot be read, is empty, or has a blank line among the names (named by
            its line number).
    """
    try:
        text = Path(file).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeError) as e:
        raise UsageError(f"cannot read channel names from {file}: {e}") from e
    lines = [s.strip() for s in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise UsageError(f"{file}: no channel names (expected one name per line)")
    for n, s in enumerate(lines, 1):
        if not s:
            raise UsageError(f"{file}:{n}: blank line among the channel names (one per line)")
    return lines


def _imagenet_categories() -> list[str]:
    """torchvision's ImageNet-1k class names, in class-index order (no network needed)."""
    try:
        from torchvision.models._meta import _IMAGENET_CATEGORIES
    except ImportError:  # a torchvision that moved it: every ImageNet weights enum carries it
        import torchvision

        return list(torchvision.models.ResNet50_Weights.DEFAULT.meta["categories"])
    return list(_IMAGENET_CATEGORIES)


def _categories(loaded) -> list[str] | None:
    """The class names the model's weights declare, or None (custom models)."""
    from patchmine.models import DEFAULT_MODEL

    if loaded.name == DEFAULT_MODEL:
        return _imagenet_categories()
    import torchvision

    if loaded.name not in torchvision.models.list_models(module=torchvision.models):
        return None
    enum = torchvision.models.get_model_weights(loaded.name)
    # LoadedModel.weights is "Enum.MEMBER" for torchvision weights; "none" and checkpoints (which
    # load only when they fit the architecture's classifier) take the default weights' classes
    member = str(loaded.weights).rpartition(".")[2]
    w = enum[member] if member in enum.__members__ else enum.DEFAULT
    cats = w.meta.get("categories")
    return list(cats) if cats else None


def _output_node(loaded) -> str:
    from patchmine.taps import layer_names

    return layer_names(loaded.module)[-1]


def channel_names(
    loaded, node: str, channels: int, names: Sequence[str] | None = None
) -> list[str] | None:
    """Names of a node's channels, or None where they are not classes.

    Args:
        loaded: a `patchmine.models.LoadedModel`.
        node: the node's name.
        channels: its channel count C.
        names: ``--channel-names`` (`read_channel_names`); they name any node with C channels
            (before the weights' own categories).

    Returns:
        C names: ``names`` when given and C long; else the weights' categories for the model's output
        node (the last node of the traced graph) when it has as many channels as categories
        (torchvision models: ``weights.meta["categories"]``, also with ``--weights none``; the
        embedded EfficientNet-Lite0: ImageNet-1k); else None.
    """
    if names is not None and len(names) == channels:
        return list(names)
    cats = _categories(loaded)
    if cats is None or len(cats) != channels or node != _output_node(loaded):
        return None
    return cats


def layer_channel_names(
    loaded, channels: Mapping[str, int], names_file: str | os.PathLike | None = None
) -> dict[str, list[str]]:
    """`channel_names` for every mined node; only the nodes that get names are in the result.

    Args:
        loaded: a `patchmine.models.LoadedModel`.
        channels: {node: C} of the mined nodes.
        names_file: the ``--channel-names`` file, if any.

    Raises:
        UsageError: ``names_file`` does not fit: no mined node has as many channels as it has names
            (the message gives both counts).
    """
    names = read_channel_names(names_file) if names_file is not None else None
    if names is not None and len(names) not in channels.values():
        have = ", ".join(f"{n} {c}" for n, c in channels.items())
        raise UsageError(
            f"--channel-names {names_file} has {len(names)} names, but no mined layer has "
            f"{len(names)} channels ({have})"
        )
    out = {}
    for node, c in channels.items():
        got = channel_names(loaded, node, c, names)
        if got is not None:
            out[node] = got
    return out


# ------------------------------------------------------------------------------------ ClassMeans
_VERSION = 1
_LIMB_BITS = 32
_LIMBS = 9  # a float32 is an integer multiple of 2^-149 below 2^277: 9 limbs of 32 bits
_UNIT = -149  # log2 of the fixed-point unit
_NORMALIZE_AT = 1 << 30  # images added between carries: each adds < 2^32 to a limb (int64 < 2^63)
_POS_INF, _NEG_INF, _NAN = 0, 1, 2  # rows of the non-finite counts


def _normalize(limbs: torch.Tensor) -> torch.Tensor:
    """Carry (n, ...) int64 limbs so that all but the last lie in [0, 2^32); the last is signed."""
    limbs = limbs.clone()
    for j in range(limbs.shape[0] - 1):
        carry = limbs[j] >> _LIMB_BITS  # floor division by 2^32
        limbs[j] -= carry << _LIMB_BITS
        limbs[j + 1] += carry
    return limbs


class ClassMeans:
    """Per channel and label, the mean of each image's maximum activation; exact and mergeable.

    A float32 value is an integer multiple of 2^-149 below 2^277, so the sum of any number of
    them is an integer in that unit. It is kept exactly in nine signed 32-bit limbs per (channel,
    label), each in an int64 (carried every 2^30 images, so they never overflow); only the limbs
    that values have reached are allocated (about three for activations between 1e-3 and 1e3).
    Integer addition is associative, so the state is a pure function of the multiset of (label,
    values) added: any batching, order, resume or merge of shards gives the same state and
    result, bit for bit, on any device. +inf, -inf and NaN are counted apart: a class mean is NaN
    if its images include a NaN (or both infinities), else +-inf if they include one. Images with
    label -1 are left out.

    Args:
        channels: C.
        labels: L, the number of label names.
        device: where the state lives; `add` expects its inputs there.

    Example:
        >>> cm = ClassMeans(channels=64, labels=10)
        >>> cm.add(per_image_max, label)      # (N, 64) activations' per-image max, (N,) labels
        >>> class_mean, selectivity = cm.result()   # (64, 10), (64,)
    """

    def __init__(self, channels: int, labels: int, device="cpu"):
        for name, v in (("channels", channels), ("labels", labels)):
            if int(v) != v or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.channels, self.labels = int(channels), int(labels)
        self.device = torch.device(device)
        C, L = self.channels, self.labels
        self.count = torch.zeros(L, dtype=torch.int64, device=self.device)
        self._limbs = torch.zeros(0, C, L, dtype=torch.int64, device=self.device)
        self._first = 0  # limb index of self._limbs[0]
        self._nonfinite = torch.zeros(0, C, L, dtype=torch.int64, device=self.device)
        self._since_carry = 0

    # -------------------------------------------------------------------------- accumulate
    def _cover(self, lo: int, hi: int) -> None:
        """Grow the allocated limbs to cover limb indices [lo, hi)."""
        n = self._limbs.shape[0]
        if n == 0:
            self._first, n = lo, 0
        lo, hi = min(lo, self._first), max(hi, self._first + n)
        if (lo, hi) == (self._first, self._first + n):
            return
        grown = torch.zeros(hi - lo, *self._limbs.shape[1:], dtype=torch.int64, device=self.device)
        grown[self._first - lo : self._first - lo + n] = self._limbs
        self._limbs, self._first = grown, lo

    def add(self, per_image_max: torch.Tensor, label: torch.Tensor) -> None:
        """Add a batch of images.

        Args:
            per_image_max: (N, C) each image's maximum activation per channel (any float dtype; used
                as float32), on `self.device`.
            label: (N,) integer label index per image, -1 for none (left out).
        """
        if per_image_max.dim() != 2 or per_image_max.shape[1] != self.channels:
            raise ValueError(
                f"per_image_max must be (N, {self.channels}), got {tuple(per_image_max.shape)}"
            )
        N, C, L = per_image_max.shape[0], self.channels, self.labels
        if label.shape != (N,) or label.dtype.is_floating_point:
            raise ValueError(
                f"label must be an integer tensor of shape ({N},), "
                f"got {label.dtype} {tuple(label.shape)}"
            )
        label = label.to(self.device, torch.int64)
        if bool(((label < -1) | (label >= L)).any()):
            raise ValueError(
                f"labels must lie in [-1, {L}), got {int(label.min())}..{int(label.max())}"
            )
        keep = label >= 0
        v = per_image_max.to(self.device).float()[keep].contiguous()
        label = label[keep]
        n = v.shape[0]
        if n == 0:
            return
        self.count += torch.bincount(label, minlength=L)
        if self._since_carry + n > _NORMALIZE_AT:
            self._carry()
        self._since_carry += n

        bits = v.view(torch.int32).to(torch.int64)
        exp = (bits >> 23) & 0xFF
        mant = bits & 0x7FFFFF
        cell = torch.arange(C, device=self.device) * L + label[:, None]  # (n, C): c * L + l
        finite = exp != 0xFF
        if not bool(finite.all()):
            self._count_nonfinite(bits, mant, cell, ~finite)
        mant = mant | ((exp > 0).long() << 23)  # the implicit bit of normal numbers
        mant = mant.masked_fill_(~finite, 0)  # counted apart
        shift = exp.clamp(min=1) - 1  # value = mant * 2^(shift + _UNIT), shift in [0, 253]
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
        flat = self._limbs.view(-1)
        base = (limb - self._first) * (C * L) + cell
        flat.index_add_(0, base.reshape(-1), lo.reshape(-1))
        flat.index_add_(0, (base + C * L).reshape(-1), hi.reshape(-1))

    def _count_nonfinite(self, bits, mant, cell, bad) -> None:
        if self._nonfinite.shape[0] == 0:
            self._nonfinite = torch.zeros(
                3, self.channels, self.labels, dtype=torch.int64, device=self.device
            )
        kind = torch.where(mant != 0, _NAN, torch.where(bits < 0, _NEG_INF, _POS_INF))
        idx = kind * (self.channels * self.labels) + cell
        self._nonfinite.view(-1).index_add_(0, idx[bad], torch.ones_like(idx[bad]))

    def _carry(self) -> None:
        """Carry the limbs into canonical form (it also makes room: limbs below 2^32 again)."""
        if self._limbs.shape[0]:
            self._cover(self._first, _LIMBS)
            self._limbs = _normalize(self._limbs)
        self._since_carry = 0

    # ------------------------------------------------------------------------ combine, read out
    def _check_same(self, channels: int, labels: int, what: str) -> None:
        if (int(channels), int(labels)) != (self.channels, self.labels):
            raise ValueError(
                f"cannot combine ClassMeans that differ: channels {self.channels}, "
                f"labels {self.labels} here vs {channels}, {labels} in {what}"
            )

    def merge(self, other: ClassMeans) -> None:
        """Fold another accumulator of the same node and label set into this one, in place.

        Associative and commutative: merged shards equal one pass over their union.
        """
        if not isinstance(other, ClassMeans):
            raise TypeError(f"can only merge a ClassMeans, got {type(other).__name__}")
        self._check_same(other.channels, other.labels, "the other ClassMeans")
        if self._since_carry + other._since_carry > _NORMALIZE_AT:
            self._carry()
            other = ClassMeans.from_state_dict(other.state_dict(), self.device)
        # out of place: tensors made by `add` under torch.inference_mode cannot be updated in
        # place outside it (a torchrun merge after the first pass)
        self.count = self.count + other.count.to(self.device)
        n = other._limbs.shape[0]
        if n:
            self._cover(other._first, other._first + n)
            at = other._first - self._first
            limbs = self._limbs.clone()
            limbs[at : at + n] += other._limbs.to(self.device)
            self._limbs = limbs
        if other._nonfinite.shape[0]:
            if self._nonfinite.shape[0] == 0:
                self._nonfinite = torch.zeros_like(other._nonfinite, device=self.device)
            self._nonfinite = self._nonfinite + other._nonfinite.to(self.device)
        self._since_carry += other._since_carry

    def _canonical(self) -> tuple[int, torch.Tensor]:
        """(first limb index, limbs): carried, with all-zero limbs trimmed from both ends."""
        if self._limbs.shape[0] == 0:
            return 0, self._limbs.cpu()
        limbs = torch.zeros(_LIMBS - self._first, *self._limbs.shape[1:], dtype=torch.int64)
        limbs[: self._limbs.shape[0]] = self._limbs.cpu()
        limbs = _normalize(limbs)
        nonzero = limbs.flatten(1).any(1).nonzero().squeeze(1)
        if nonzero.numel() == 0:
            return 0, limbs[:0]
        lo, hi = int(nonzero[0]), int(nonzero[-1]) + 1
        return self._first + lo, limbs[lo:hi]

    def sums(self) -> torch.Tensor:
        """(C, L) float64 sums of the per-image maxima (finite values only), rounded from exact."""
        first, limbs = self._canonical()
        C, L = self.channels, self.labels
        if limbs.shape[0] == 0:
            return torch.zeros(C, L, dtype=torch.float64)
        # sum the magnitude's limbs, all >= 0, smallest first: a few roundings, no cancellation
        neg = limbs[-1] < 0
        mag = _normalize(
            torch.cat([torch.where(neg, -limbs, limbs), torch.zeros(1, C, L, dtype=torch.int64)])
        )
        total = torch.zeros(C, L, dtype=torch.float64)
        for j in range(mag.shape[0]):  # powers of two from 2^-149 to 2^139: exact in float64
            total += mag[j].double() * 2.0 ** ((first + j) * _LIMB_BITS + _UNIT)
        return torch.where(neg, -total, total)

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Class means and class selectivity.

        Returns:
            class_mean: (C, L) float32, the mean over images of label l of channel c's per-image
                maximum (exact sum, divided by the count in float64); NaN for a label without
                images.
            selectivity: (C,) float32, ``(m_max - m_rest) / (m_max + m_rest)`` over the labels with
                images (Morcos et al. 2018), m_max the largest class mean and m_rest the mean of the
                others, computed in float64 from the float32 class means; NaN where the
                denominator is 0, where fewer than two labels have images, or where a class mean is
                NaN. Meant for non-negative activations (after a ReLU); on signed ones it can leave
                [0, 1].
        """
        mean = self.sums() / self.count.cpu().double()  # 0 / 0 = NaN for an empty label
        if self._nonfinite.shape[0]:
            nf = self._nonfinite.cpu()
            pos, neg, nan = nf[_POS_INF] > 0, nf[_NEG_INF] > 0, nf[_NAN] > 0
            mean = torch.where(pos, float("inf"), mean)
            mean = torch.where(neg, float("-inf"), mean)
            mean = torch.where(nan | (pos & neg), float("nan"), mean)
        class_mean = mean.float()
        return class_mean, selectivity(class_mean, self.count.cpu() > 0)

    # -------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """Plain data, canonical (equal states give equal dicts): "version", "channels",
        "labels", "count" (L,) int64, "limb_first" (int), "limbs" (n, C, L) int64 (the exact sums
        in units of 2^-149: sum_j limbs[j] * 2^(32 * (limb_first + j))), "nonfinite" (3, C, L)
        int64 counts of +inf, -inf, NaN, or (0, C, L) when there were none."""
        first, limbs = self._canonical()
        nonfinite = self._nonfinite.cpu().clone()
        if nonfinite.shape[0] and not bool(nonfinite.any()):
            nonfinite = nonfinite[:0]
        return {
            "version": _VERSION,
            "channels": self.channels,
            "labels": self.labels,
            "count": self.count.cpu().clone(),
            "limb_first": first,
            "limbs": limbs,
            "nonfinite": nonfinite,
        }

    def load_state_dict(self, sd: dict) -> None:
        """Restore a state from `state_dict` exactly (replaces what this accumulator holds).

        Raises:
            ValueError: an unknown version, or channels / labels that differ from this one's.
        """
        if sd.get("version") != _VERSION:
            raise ValueError(
                f"ClassMeans state version {sd.get('version')!r} is not supported "
                f"(expected {_VERSION})"
            )
        self._check_same(sd["channels"], sd["labels"], "the state dict")
        C, L = self.channels, self.labels
        self.count = torch.as_tensor(sd["count"], dtype=torch.int64).reshape(L).to(self.device)
        self._limbs = torch.as_tensor(sd["limbs"], dtype=torch.int64).reshape(-1, C, L)
        self._limbs = self._limbs.to(self.device).clone()
        self._first = int(sd["limb_first"])
        self._nonfinite = torch.as_tensor(sd["nonfinite"], dtype=torch.int64).reshape(-1, C, L)
        self._nonfinite = self._nonfinite.to(self.device).clone()
        self._since_carry = 0

    @classmethod
    def from_state_dict(cls, sd: dict, device="cpu") -> ClassMeans:
        """Build an accumulator from `state_dict` output."""
        cm = cls(sd["channels"], sd["labels"], device=device)
        cm.load_state_dict(sd)
        return cm

    def __repr__(self) -> str:
        return f"ClassMeans(channels={self.channels}, labels={self.labels})"


def selectivity(class_mean: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
    """Class selectivity index per channel of a (C, L) class-mean table (see `ClassMeans.result`).

    Args:
        class_mean: (C, L) class means.
        present: (L,) bool, the labels that have images (default: all).

    Returns:
        (C,) float32.
    """
    m = class_mean.double()
    if present is not None:
        m = m[:, present.to(torch.bool)]
    C, L = m.shape
    if L < 2:
        return torch.full((C,), float("nan"))
    top = m.argmax(1, keepdim=True)  # a NaN counts as the max: the index comes out NaN
    m_max = m.gather(1, top).squeeze(1)
    m_rest = m.scatter(1, top, 0.0).sum(1) / (L - 1)
    denom = m_max + m_rest
    out = (m_max - m_rest) / denom
    return torch.where(denom == 0, float("nan"), out).float()
