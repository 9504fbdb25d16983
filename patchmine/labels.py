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
from patchmine.exact import NORMALIZE_AT, ExactSum

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
_NORMALIZE_AT = NORMALIZE_AT  # images added between carries (read when an accumulator is made)


class ClassMeans:
    """Per channel and label, the mean of each image's maximum activation; exact and mergeable.

    The sums are kept exactly by a `patchmine.exact.ExactSum` per (channel, label): integers in
    units of 2^-149 in nine signed 32-bit limbs (only the limbs values have reached are allocated,
    about three for activations between 1e-3 and 1e3). Integer addition is associative, so the
    state is a pure function of the multiset of (label, values) added: any batching, order,
    resume or merge of shards gives the same state and result, bit for bit, on any device. +inf,
    -inf and NaN are counted apart: a class mean is NaN if its images include a NaN (or both
    infinities), else +-inf if they include one. Images with label -1 are left out.

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
        self._sum = ExactSum((C, L), self.device, carry_at=_NORMALIZE_AT)

    # -------------------------------------------------------------------------- accumulate
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
        cell = torch.arange(C, device=self.device) * L + label[:, None]  # (n, C): c * L + l
        self._sum.add(v, cell, per_cell=n)

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
        # out of place: `add` may have made count under torch.inference_mode (a torchrun merge)
        self.count = self.count + other.count.to(self.device)
        self._sum.merge(other._sum)

    def sums(self) -> torch.Tensor:
        """(C, L) float64 sums of the per-image maxima (finite values only), rounded from exact."""
        return self._sum.sums()

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
        mean = self._sum.values() / self.count.cpu().double()  # 0 / 0 = NaN for an empty label
        class_mean = mean.float()
        return class_mean, selectivity(class_mean, self.count.cpu() > 0)

    # -------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """Plain data, canonical (equal states give equal dicts): "version", "channels",
        "labels", "count" (L,) int64, "limb_first" (int), "limbs" (n, C, L) int64 (the exact sums
        in units of 2^-149: sum_j limbs[j] * 2^(32 * (limb_first + j))), "nonfinite" (3, C, L)
        int64 counts of +inf, -inf, NaN, or (0, C, L) when there were none."""
        first, limbs = self._sum.canonical()
        nonfinite = self._sum.nonfinite.cpu().clone()
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
        L = self.labels
        self.count = torch.as_tensor(sd["count"], dtype=torch.int64).reshape(L).to(self.device)
        self._sum.load(sd["limb_first"], sd["limbs"], sd["nonfinite"])

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
