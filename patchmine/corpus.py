"""Image corpora: discover files, decode them robustly, preprocess, record each image's geometry.

Public names: IMAGE_EXTENSIONS, Corpus, discover, load_rgb, preprocess, CorpusDataset, make_loader,
printable.

A corpus is an ordered list of files under one or more roots. The order is part of the result (ties
between equal activations break by corpus index), so discovery is sorted and stable. A file that
cannot be decoded never stops a run: the dataset yields it with ``ok=False`` and the reason.
"""

from __future__ import annotations

import functools
import hashlib
import os
import signal
import stat
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset

from patchmine.errors import UsageError

__all__ = [
    "IMAGE_EXTENSIONS",
    "Corpus",
    "discover",
    "load_rgb",
    "preprocess",
    "CorpusDataset",
    "make_loader",
    "printable",
]

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)


@dataclass(frozen=True)
class Corpus:
    """An ordered image list. Image ``i`` is ``roots[root_index[i]] / paths[i]``."""

    roots: tuple[str, ...]
    paths: tuple[str, ...]
    root_index: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.paths)

    def file(self, i: int) -> Path:
        """Absolute path of image ``i``."""
        return Path(self.roots[self.root_index[i]]) / self.paths[i]

    def fingerprint(self) -> str:
        """A digest of the roots and the ordered file list (what ``--resume`` checks)."""
        return self._digest

    @functools.cached_property
    def _digest(self) -> str:  # computed once: every checkpoint records it
        h = hashlib.sha256()
        for r in self.roots:
            h.update(os.fsencode(r) + b"\0")
        for ri, p in zip(self.root_index, self.paths, strict=True):
            h.update(b"%d\0" % ri + os.fsencode(p) + b"\0")
        return h.hexdigest()


def printable(text: str) -> str:
    """A file name as valid UTF-8 (bytes that are not, kept as surrogate escapes by the file
    system layer, are shown as backslash escapes), for messages and the result file."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _walk(root: Path) -> list[str]:
    """Image files under ``root``, relative, sorted; follows symlinks but never loops."""
    found: list[str] = []
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        try:
            st = os.stat(dirpath)
        except OSError:
            dirnames[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames.sort()
        rel = os.path.relpath(dirpath, root)
        for name in filenames:
            if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                found.append(name if rel == "." else os.path.join(rel, name))
    return sorted(found)


def _read_list(path: Path) -> list[str]:
    """Lines of a file list; blank lines and ``#`` comments skipped."""
    lines = path.read_text(encoding="utf-8", errors="surrogateescape").splitlines()
    return [s.strip() for s in lines if s.strip() and not s.lstrip().startswith("#")]


def discover(sources: Sequence[str | os.PathLike]) -> Corpus:
    """Build a corpus from folders (searched recursively) and/or text files listing images.

    A list file holds one path per line, absolute or relative to the list's folder; entries may repeat.
    Folders contribute their image files (by extension, case-insensitive) in sorted order.

    Raises:
        UsageError: a source does not exist, or the corpus is empty.
    """
    if not sources:
        raise UsageError("no corpus given: name one or more image folders or file lists")
    roots: list[str] = []
    paths: list[str] = []
    index: list[int] = []
    for src in sources:
        p = Path(src)
        if p.is_dir():
            root = str(p.resolve())
            files = _walk(p)
        elif p.is_file():
            if p.suffix.lower() in IMAGE_EXTENSIONS:
                root, files = str(p.parent.resolve()), [p.name]
            else:
                root = str(p.parent.resolve())
                files = _read_list(p)
        else:
            raise UsageError(f"corpus path does not exist: {src}")
        if root not in roots:
            roots.append(root)
        ri = roots.index(root)
        paths.extend(files)
        index.extend([ri] * len(files))
    if not paths:
        names = ", ".join(str(s) for s in sources)
        exts = " ".join(sorted(IMAGE_EXTENSIONS))
        raise UsageError(f"empty corpus: no image files ({exts}) in {names}")
    return Corpus(tuple(roots), tuple(paths), tuple(index))


def load_rgb(path: str | os.PathLike, draft: int | None = None) -> Image.Image:
    """Decode any image to 8-bit RGB, EXIF orientation applied.

    Palette and alpha images are composited over white; 16- and 32-bit grayscale is scaled to 8 bits;
    animated images give their first frame. Raises on any decoding problem (the caller records it),
    on anything but a regular file (a FIFO would block), and on images over Pillow's
    ``MAX_IMAGE_PIXELS`` (decompression bombs).

    ``draft``: decode a JPEG at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, much cheaper) as long
    as both sides stay at least ``draft`` pixels; other formats are decoded in full.
    """
    return _decode(path, draft)[0]


def _decode(path: str | os.PathLike, draft: int | None = None) -> tuple[Image.Image, int, tuple]:
    """`load_rgb`, and the draft's reduction factor and the full (height, width) of the image."""
    if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO or device would block or never end
        raise OSError(f"not a regular file: {os.fsdecode(path)}")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as im:
            full = im.size
            reduced = 1
            if draft and im.format == "JPEG":
                im.draft(im.mode, (draft, draft))
                reduced = im.decoderconfig[0] if im.decoderconfig else 1
            im.load()
            turned = im.size
            im = ImageOps.exif_transpose(im)
    if im.size != turned:  # turned a quarter: the full size turns too
        full = full[::-1]
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        peak = 65535.0 if im.mode.startswith("I") and a.max(initial=0) > 255 else 255.0
        if im.mode == "F":
            peak = max(float(a.max(initial=0)), 1e-12)
        im = Image.fromarray(np.clip(np.rint(a * (255.0 / peak)), 0, 255).astype(np.uint8), "L")
    if im.mode == "P":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, im)
    return im.convert("RGB"), reduced, (full[1], full[0])


def preprocess(image: Image.Image, size: int) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Resize the shorter side to ``size`` and center-crop ``size`` x ``size``.

    An image that is already ``size`` x ``size`` passes through pixel-exact; one whose shorter side is
    already ``size`` is only cropped. The crop and resize are one resampling step (Pillow's bilinear,
    antialiased when shrinking).

    Returns:
        pixels: (size, size, 3) uint8.
        transform: (scale, offset_y, offset_x) with ``original = (input + offset) / scale``.
    """
    w, h = image.size
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    top, left = (nh - size) // 2, (nw - size) // 2
    if scale == 1.0:
        out = image.crop((left, top, left + size, top + size))
    else:
        box = (left / scale, top / scale, (left + size) / scale, (top + size) / scale)
        out = image.resize((size, size), Image.Resampling.BILINEAR, box=box)
    return np.asarray(out, dtype=np.uint8), (float(scale), float(top), float(left))


class CorpusDataset(Dataset):
    """Decoded, preprocessed images of a corpus; never raises for a bad file.

    Each item is a dict: ``index`` (global corpus index), ``pixels`` (3, S, S) uint8, ``ok`` bool,
    ``shape`` (2,) int32 original height/width, ``transform`` (3,) float32, ``error`` str.
    """

    def __init__(
        self,
        corpus: Corpus,
        size: int,
        indices: Sequence[int] | None = None,
        jpeg_draft: bool = False,
    ):
        self.corpus = corpus
        self.size = size
        self.draft = size if jpeg_draft else None  # see load_rgb
        self.indices = list(range(len(corpus))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> dict:
        i = self.indices[item]
        s = self.size
        try:
            img, reduced, shape = _decode(self.corpus.file(i), self.draft)
            pixels, (scale, top, left) = preprocess(img, s)
            transform = (scale / reduced, top, left)  # from the full image, not the draft
            return {
                "index": i,
                "pixels": torch.from_numpy(pixels.transpose(2, 0, 1).copy()),
                "ok": True,
                "shape": torch.tensor(shape, dtype=torch.int32),
                "transform": torch.tensor(transform, dtype=torch.float32),
                "error": "",
            }
        except Exception as e:  # noqa: BLE001 - any decoding failure is recorded, never fatal
            reason = f"{type(e).__name__}: {e}".strip().splitlines()[0][:300]
            reason = reason.encode("utf-8", "backslashreplace").decode("utf-8")  # odd file names
            return {
                "index": i,
                "pixels": torch.zeros(3, s, s, dtype=torch.uint8),
                "ok": False,
                "shape": torch.zeros(2, dtype=torch.int32),
                "transform": torch.zeros(3, dtype=torch.float32),
                "error": reason or type(e).__name__,
            }


def _ignore_stop_signals(_worker_id: int) -> None:
    """Workers leave Ctrl-C and SIGTERM to the main process, which stops cleanly and ends them.

    Ctrl-C reaches the whole process group: a worker that died of it would make the main process
    fail with "DataLoader worker exited unexpectedly" (and print the worker's traceback) instead of
    saving its checkpoint.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def make_loader(
    dataset: CorpusDataset, batch_size: int, workers: int = 0, pin_memory: bool = False
) -> DataLoader:
    """A DataLoader that keeps corpus order (no shuffling) whatever the worker count."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=_ignore_stop_signals if workers > 0 else None,
    )
