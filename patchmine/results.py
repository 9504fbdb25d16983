"""Reading result files: ``patchmine.open(path)`` returns a `Result`, ``result.layer(name)`` a
`LayerResult` whose arrays come back as numpy.

Public names: Result, LayerResult, open_result.

Reads schema versions 1 and 2 (`patchmine.contents.READS`); a file of another version, or one that
is not a patchmine result, is refused in one line. Files are written by `patchmine.store`.
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np

from patchmine.contents import FORMAT, READS
from patchmine.errors import UnknownNameError, UsageError, nearest

__all__ = ["Result", "LayerResult", "open_result"]


class LayerResult:
    """One mined layer of a result file; arrays come back as numpy.

    Attributes:
        name: the node name; channels, fmap_hw, rf_size, rf_stride, rf_offset, patch_size from attrs.
        score (C,k) float32, image (C,k) int64, yx (C,k,2) int32, box (C,k,4) int32,
        box_orig (C,k,4) float32: loaded on first access.
    """

    def __init__(self, result: Result, name: str, group: h5py.Group | None = None):
        self.result = result
        self.name = name
        self._layer_g = result.file["layers"][name]
        self._g = self._layer_g if group is None else group
        self.attrs = {k: _plain(v) for k, v in self._layer_g.attrs.items()}
        self.channels = int(self.attrs["channels"])
        self.k = int(self._g["score"].shape[1])
        self.patch_size = int(self.attrs["patch_size"])
        self._cache: dict[str, np.ndarray] = {}

    def _get(self, key: str) -> np.ndarray:
        if key not in self._cache:
            self._cache[key] = self._g[key][()]
        return self._cache[key]

    score = property(lambda self: self._get("score"))
    image = property(lambda self: self._get("image"))
    yx = property(lambda self: self._get("yx"))
    box = property(lambda self: self._get("box"))
    box_orig = property(lambda self: self._get("box_orig"))

    def patches(self, channel: int) -> np.ndarray:
        """(k, P, P, 3) uint8 patches of one channel, best first (also from ``patch_ref``: unused
        slots are then filled with the model's mean color, as ``patch`` stores them)."""
        if "patch" in self._g or "patch_ref" not in self._g:
            return self._g["patch"][channel]
        ref = self._g["patch_ref"][channel]
        thumbs = self.result.file["thumbs"]["patch"]
        out = np.empty((len(ref), *thumbs.shape[1:]), np.uint8)
        out[...] = [int(round(m * 255)) for m in self.result.attrs.get("mean", (0, 0, 0))]
        rows, where = np.unique(ref[ref >= 0], return_inverse=True)
        if len(rows):
            out[ref >= 0] = thumbs[rows.tolist()][where.reshape(-1)]
        return out

    def projection(self, channel: int) -> np.ndarray | None:
        """(k, P, P, 3) float32 projections of one channel's entries (v2, stored as float16), or
        None when the file has none. Aligned with :meth:`patches` pixel for pixel; 0 in unused
        slots."""
        if "projection" not in self._g:
            return None
        return self._g["projection"][channel].astype(np.float32)

    @property
    def projection_attrs(self) -> dict | None:
        """The projections' ``method`` (deconvnet, guided, gradient) and ``n_modified`` (how many
        ReLU-family ops the method changed on the way to this node), or None without them."""
        if "projection" not in self._g:
            return None
        return {k: _plain(v) for k, v in self._g["projection"].attrs.items()}

    @property
    def bottom(self) -> LayerResult | None:
        """The k most negative entries (v2 ``bottom/``, score ascending) as a LayerResult, or None."""
        if self._g is not self._layer_g or "bottom" not in self._g:
            return None
        return LayerResult(self.result, self.name, self._g["bottom"])

    @property
    def class_mean(self) -> np.ndarray | None:
        """(C, L) float32 class means of the per-image maximum (v2), or None."""
        return self._layer_g["class_mean"][()] if "class_mean" in self._layer_g else None

    @property
    def selectivity(self) -> np.ndarray | None:
        """(C,) float32 class selectivity index (v2), or None."""
        return self._layer_g["selectivity"][()] if "selectivity" in self._layer_g else None

    @property
    def channel_names(self) -> list[str] | None:
        """The channels' names (class names of logits, v2), or None."""
        names = self.attrs.get("channel_names")
        if names is None:
            return None
        return [names] if isinstance(names, str) else [_plain(n) for n in names]

    def heat(self, channel: int) -> np.ndarray:
        """(k, H, W) float16 activation maps of one channel on its top images."""
        return self._g["heat"][channel]

    def stats(self) -> dict[str, np.ndarray]:
        """Per-channel ``count``, ``mean``, ``std``, ``max``, ``quantile`` (C,Q) and ``q`` (Q,)."""
        s = self._g["stats"]
        out = {k: s[k][()] for k in s if isinstance(s[k], h5py.Dataset)}
        out["q"] = s["quantile"].attrs["q"]
        return out

    def class_state(self) -> dict[str, np.ndarray]:
        """The mergeable class-mean state (v2 ``class_state/``, what `patchmine merge` combines;
        `patchmine.labels.ClassMeans.from_state_dict` takes it), or {} without labels."""
        g = self._layer_g
        return {k: v[()] for k, v in g["class_state"].items()} if "class_state" in g else {}

    def stats_state(self) -> dict[str, np.ndarray]:
        """The mergeable statistics state (what `patchmine merge` combines)."""
        s = self._g["stats"]
        return {k: v[()] for k, v in s["state"].items()} if "state" in s else {}

    def records(self, channel: int) -> list[dict]:
        """The used top-k slots of one channel, best first (of a ``bottom`` LayerResult: most
        negative first), as plain dicts: rank, score, image, path, yx, box, box_orig, and
        ``label`` (the image's label name, None without one) and ``channel_name`` (None where
        the layer has no channel names)."""
        labels, names = self.result.image_label, self.result.label_names
        cnames = self.channel_names
        out = []
        for slot in range(self.k):
            i = int(self.image[channel, slot])
            if i < 0:
                break
            out.append(
                {
                    "rank": slot,
                    "score": float(self.score[channel, slot]),
                    "image": i,
                    "path": self.result.image_paths[i],
                    "yx": tuple(int(v) for v in self.yx[channel, slot]),
                    "box": tuple(int(v) for v in self.box[channel, slot]),
                    "box_orig": tuple(float(v) for v in self.box_orig[channel, slot]),
                    "label": (
                        names[int(labels[i])]
                        if labels is not None and names is not None and labels[i] >= 0
                        else None
                    ),
                    "channel_name": cnames[channel] if cnames else None,
                }
            )
        return out

    def __repr__(self) -> str:
        return f"<LayerResult {self.name}: {self.channels} channels, k={self.k}>"


def _plain(v):
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    return v


class Result:
    """A patchmine result file, opened read-only. Use as a context manager or call ``close()``.

    Example:
        >>> with patchmine.open("out.h5") as r:
        ...     layer = r.layer("features.10")
        ...     layer.records(0)[0]["path"], layer.patches(0).shape
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise UsageError(f"no such file: {self.path}")
        try:
            self.file = h5py.File(self.path, "r")
        except OSError as e:
            raise UsageError(f"not an HDF5 file: {self.path} ({e})") from None
        fmt = self.file.attrs.get("format")
        fmt = fmt.decode() if isinstance(fmt, bytes) else fmt
        if fmt != FORMAT:
            self.file.close()
            raise UsageError(f"not a patchmine result file: {self.path}")
        version = int(self.file.attrs.get("version", -1))
        if version not in READS:
            self.file.close()
            raise UsageError(
                f"{self.path} has schema version {version}; this patchmine reads versions "
                + " and ".join(str(v) for v in READS)
            )
        self.attrs = {k: _plain(v) for k, v in self.file.attrs.items()}
        self.layers = list(self.attrs.get("layer_order") or self.file["layers"].keys())
        g = self.file["images"]
        self.image_paths = [p.decode("utf-8") if isinstance(p, bytes) else p for p in g["path"][()]]
        self.image_root = g["root"][()]
        self.image_shape = g["shape"][()]
        self.image_ok = g["ok"][()]
        self.image_transform = g["transform"][()]
        self.image_error = (
            [e.decode("utf-8") if isinstance(e, bytes) else e for e in g["error"][()]]
            if "error" in g
            else [""] * len(self.image_paths)
        )
        self._layers: dict[str, LayerResult] = {}

    @property
    def n_images(self) -> int:
        return len(self.image_paths)

    @property
    def label_names(self) -> list[str] | None:
        """``/labels/names`` (v2, with --labels), or None."""
        if "labels" not in self.file or "names" not in self.file["labels"]:
            return None
        return [_plain(n) for n in self.file["labels"]["names"][()]]

    @property
    def image_label(self) -> np.ndarray | None:
        """(N,) int32 label index of each image, -1 for none (v2), or None."""
        g = self.file["images"]
        return g["label"][()] if "label" in g else None

    def image_file(self, i: int) -> Path:
        """Where image ``i`` was read from (its corpus root joined with its path)."""
        roots = self.attrs["corpus_roots"]
        roots = [roots] if isinstance(roots, str) else roots
        return Path(roots[int(self.image_root[i])]) / self.image_paths[i]

    def layer(self, name: str) -> LayerResult:
        """One layer's results; the error lists the nearest layer names."""
        if name not in self.layers:
            hint = ", ".join(nearest(name, self.layers)) or ", ".join(self.layers)
            raise UnknownNameError(f"{self.path} has no layer {name!r}; nearest: {hint}")
        if name not in self._layers:
            self._layers[name] = LayerResult(self, name)
        return self._layers[name]

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> Result:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Result {self.path}: {self.n_images} images, layers {self.layers}>"


def open_result(path: str | os.PathLike) -> Result:
    """Open a result file for reading (also available as ``patchmine.open``)."""
    return Result(path)
