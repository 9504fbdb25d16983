"""Result files (HDF5 schema version 1) and checkpoints: the only module that touches h5py.

Public names: FORMAT, VERSION, LayerData, write_result, Result, LayerResult, open_result,
save_checkpoint, load_checkpoint, check_writable.

Every write is atomic: data goes to a temporary file beside the target, which is renamed over it only
when complete, so a reader sees a whole file or none.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from patchmine.errors import UnknownNameError, UsageError, nearest

__all__ = [
    "FORMAT",
    "VERSION",
    "LayerData",
    "write_result",
    "Result",
    "LayerResult",
    "open_result",
    "save_checkpoint",
    "load_checkpoint",
    "check_writable",
]

FORMAT = "patchmine"
VERSION = 1
CHECKPOINT_VERSION = 1
_STR = h5py.string_dtype("utf-8")


@dataclass
class LayerData:
    """Everything one layer contributes to a result file.

    ``patch`` (C, k, P, P, 3) uint8 and ``heat`` (C, k, H, W) float16 may be memory maps: they are
    copied one channel at a time.
    """

    attrs: dict
    score: np.ndarray
    image: np.ndarray
    yx: np.ndarray
    box: np.ndarray
    box_orig: np.ndarray
    patch: np.ndarray
    heat: np.ndarray
    stats: dict[str, np.ndarray]
    stats_state: dict[str, np.ndarray] = field(default_factory=dict)


def check_writable(path: str | os.PathLike, force: bool = False, resume: bool = False) -> Path:
    """Refuse early (before any work) an output that cannot or must not be written."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise UsageError(f"output folder does not exist: {folder}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"output folder is not writable: {folder}")
    if path.is_dir():
        raise UsageError(f"output is a folder, expected a file path: {path}")
    if path.exists() and not force:
        hint = "" if resume else " (--resume continues an interrupted run)"
        raise UsageError(f"output exists: {path}; pass --force to overwrite{hint}")
    return path


@contextlib.contextmanager
def _atomic(path: Path, suffix: str = ".tmp") -> Iterator[Path]:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent or ".")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a result file is as readable as any other
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _set_attrs(obj: h5py.HLObject, attrs: dict) -> None:
    for key, value in attrs.items():
        if isinstance(value, str):
            obj.attrs.create(key, value, dtype=_STR)
        elif isinstance(value, (list, tuple)) and value and isinstance(value[0], str):
            obj.attrs.create(key, list(value), dtype=_STR)
        else:
            obj.attrs[key] = value


def _safe_text(values) -> list[str]:
    """Strings as valid UTF-8 (file names that are not are shown with backslash escapes)."""
    return [v.encode("utf-8", "backslashreplace").decode("utf-8") for v in values]


def write_result(
    path: str | os.PathLike,
    attrs: dict,
    images: dict[str, np.ndarray],
    layers: dict[str, LayerData],
) -> Path:
    """Write a complete result file atomically.

    Args:
        attrs: root attributes (format and version are added).
        images: ``path`` (N,) str, ``root`` (N,) int16, ``shape`` (N,2), ``ok`` (N,), ``transform``
            (N,3), ``error`` (N,) str.
        layers: node name -> LayerData.
    """
    path = Path(path)
    with _atomic(path) as tmp, h5py.File(tmp, "w", libver="latest") as f:
        _set_attrs(f, {"format": FORMAT, "version": VERSION, **attrs})
        g = f.create_group("images")
        g.create_dataset("path", data=_safe_text(images["path"]), dtype=_STR)
        g.create_dataset("root", data=np.asarray(images["root"], dtype=np.int16))
        g.create_dataset("shape", data=np.asarray(images["shape"], dtype=np.int32).reshape(-1, 2))
        g.create_dataset("ok", data=np.asarray(images["ok"], dtype=bool))
        g.create_dataset(
            "transform", data=np.asarray(images["transform"], dtype=np.float32).reshape(-1, 3)
        )
        g.create_dataset("error", data=_safe_text(images["error"]), dtype=_STR)
        lg = f.create_group("layers")
        for name, d in layers.items():
            _write_layer(lg.create_group(name), d)
    return path


def _write_layer(g: h5py.Group, d: LayerData) -> None:
    _set_attrs(g, d.attrs)
    g.create_dataset("score", data=np.asarray(d.score, dtype=np.float32))
    g.create_dataset("image", data=np.asarray(d.image, dtype=np.int64))
    g.create_dataset("yx", data=np.asarray(d.yx, dtype=np.int32))
    g.create_dataset("box", data=np.asarray(d.box, dtype=np.int32))
    g.create_dataset("box_orig", data=np.asarray(d.box_orig, dtype=np.float32))
    c = d.score.shape[0]
    patch = g.create_dataset(
        "patch", shape=d.patch.shape, dtype=np.uint8, chunks=(1, *d.patch.shape[1:])
    )
    heat = g.create_dataset(
        "heat",
        shape=d.heat.shape,
        dtype=np.float16,
        chunks=(1, *d.heat.shape[1:]),
        compression="gzip",
        compression_opts=1,
    )
    for ch in range(c):
        patch[ch] = d.patch[ch]
        heat[ch] = d.heat[ch]
    s = g.create_group("stats")
    for key, value in d.stats.items():
        if key == "q":
            continue
        ds = s.create_dataset(key, data=np.asarray(value))
        if key == "quantile":
            ds.attrs["q"] = np.asarray(d.stats["q"], dtype=np.float32)
    if d.stats_state:
        st = s.create_group("state")
        for key, value in d.stats_state.items():
            st.create_dataset(key, data=np.asarray(value))


class LayerResult:
    """One mined layer of a result file; arrays come back as numpy.

    Attributes:
        name: the node name; channels, fmap_hw, rf_size, rf_stride, rf_offset, patch_size from attrs.
        score (C,k) float32, image (C,k) int64, yx (C,k,2) int32, box (C,k,4) int32,
        box_orig (C,k,4) float32: loaded on first access.
    """

    def __init__(self, result: Result, name: str):
        self.result = result
        self.name = name
        self._g = result.file["layers"][name]
        self.attrs = {k: _plain(v) for k, v in self._g.attrs.items()}
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
        """(k, P, P, 3) uint8 patches of one channel, best first."""
        return self._g["patch"][channel]

    def heat(self, channel: int) -> np.ndarray:
        """(k, H, W) float16 activation maps of one channel on its top images."""
        return self._g["heat"][channel]

    def stats(self) -> dict[str, np.ndarray]:
        """Per-channel ``count``, ``mean``, ``std``, ``max``, ``quantile`` (C,Q) and ``q`` (Q,)."""
        s = self._g["stats"]
        out = {k: s[k][()] for k in s if isinstance(s[k], h5py.Dataset)}
        out["q"] = s["quantile"].attrs["q"]
        return out

    def stats_state(self) -> dict[str, np.ndarray]:
        """The mergeable statistics state (what `patchmine merge` combines)."""
        s = self._g["stats"]
        return {k: v[()] for k, v in s["state"].items()} if "state" in s else {}

    def records(self, channel: int) -> list[dict]:
        """The used top-k slots of one channel, best first, as plain dicts."""
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
        if version != VERSION:
            self.file.close()
            raise UsageError(
                f"{self.path} has schema version {version}; this patchmine reads version {VERSION}"
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


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Atomically save a run's resumable state (tensors, arrays, plain values)."""
    import torch

    path = Path(path)
    with _atomic(path, ".ckpt-tmp") as tmp:
        torch.save({"checkpoint_version": CHECKPOINT_VERSION, **state}, tmp)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint; a damaged one is refused with a clear message."""
    import torch

    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise UsageError(
            f"checkpoint {path} is damaged ({type(e).__name__}); delete it to start over"
        ) from None
    if not isinstance(state, dict) or state.get("checkpoint_version") != CHECKPOINT_VERSION:
        raise UsageError(f"checkpoint {path} is not a patchmine checkpoint of this version")
    return state
