"""Image corpora: discover files, decode them robustly, preprocess, record each image's geometry.

Public names: IMAGE_EXTENSIONS, Corpus, discover, load_rgb, preprocess, resized_size, CorpusDataset,
make_loader, CorpusLoader, printable.

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

from patchmine.allocator import applied_settings, tune_allocator
from patchmine.errors import UsageError

__all__ = [
    "IMAGE_EXTENSIONS",
    "Corpus",
    "discover",
    "load_rgb",
    "preprocess",
    "resized_size",
    "CorpusDataset",
    "make_loader",
    "CorpusLoader",
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


def resized_size(h: int, w: int, resize: int) -> tuple[int, int]:
    """The (height, width) torchvision's ``Resize(resize)`` gives an ``h`` x ``w`` image: the shorter
    side becomes ``resize``, the longer ``int(resize * long / short)`` (truncated, as torchvision's
    ``_compute_resized_output_size`` does)."""
    if w <= h:
        return int(resize * h / w), resize
    return resize, int(resize * w / h)


def _crop_start(n: int, size: int) -> int:
    """torchvision's ``CenterCrop`` start along one axis of length ``n``: ``round((n - size) / 2)``
    (Python's round, half to even); where ``n < size`` it pads ``(size - n) // 2`` zeros before."""
    if size > n:
        return -((size - n) // 2)
    return int(round((n - size) / 2.0))


# Above this many pixels the resized image is not made whole (a 1 x 5000 strip would become
# 224 x 1.1M): the crop is resampled straight from the original instead, which can differ from
# torchvision in the last grey level. Every image with an aspect ratio below ~300:1 stays exact.
_WHOLE_RESIZE_PIXELS = 1 << 24


def preprocess(
    image: Image.Image,
    size: int,
    resize: int | None = None,
    full: tuple[int, int] | None = None,
) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """torchvision's ``Resize(resize)`` + ``CenterCrop(size)`` on a PIL image, pixel for pixel.

    The shorter side is resized to ``resize`` (default ``size``; Pillow's bilinear, antialiased when
    shrinking), the longer to ``int(resize * long / short)``, then the ``size`` x ``size`` center is
    cut at ``round((n - size) / 2)``, zero-padded where the resized image is smaller. An image whose
    size the resize leaves unchanged (a ``size`` x ``size`` one with ``resize == size``) is only
    cropped: it passes through pixel-exact. ``full``: the (height, width) of the image that
    ``image`` is a reduced decode of (a JPEG draft); sizes and the transform are those of the full
    image, only the pixels come from the reduced one.

    Returns:
        pixels: (size, size, 3) uint8.
        transform: ``(scale_y, offset_y, offset_x, scale_x)``, per axis
            ``original = (input + offset) / scale``. The two scales differ slightly where the long
            side's length was truncated; the first three are the 3-column transform of older files.
    """
    r = size if resize is None else int(resize)
    if r < 1 or size < 1:
        raise ValueError(f"sizes must be positive, got size={size} resize={resize}")
    w, h = image.size
    if full is not None:
        h, w = full
    nh, nw = resized_size(h, w, r)
    top, left = _crop_start(nh, size), _crop_start(nw, size)
    transform = (nh / h, float(top), float(left), nw / w)
    box = (left, top, left + size, top + size)
    if (nh, nw) == (image.height, image.width):
        out = image.crop(box)  # Pillow fills outside the image with zeros, as torchvision pads
    elif nh * nw <= _WHOLE_RESIZE_PIXELS:
        out = image.resize((nw, nh), Image.Resampling.BILINEAR).crop(box)
    else:
        out = _resample_crop(image, (nh, nw), box)
    return np.asarray(out, dtype=np.uint8), transform


def _resample_crop(
    image: Image.Image, resized: tuple[int, int], box: tuple[int, int, int, int]
) -> Image.Image:
    """The part of ``image.resize(resized)`` inside ``box``, resampled straight from the original."""
    w, h = image.size
    nh, nw = resized
    x0, y0, x1, y1 = box
    ix0, iy0, ix1, iy1 = max(x0, 0), max(y0, 0), min(x1, nw), min(y1, nh)
    out = Image.new(image.mode, (x1 - x0, y1 - y0))
    if ix1 > ix0 and iy1 > iy0:
        src = (ix0 * w / nw, iy0 * h / nh, ix1 * w / nw, iy1 * h / nh)
        part = image.resize((ix1 - ix0, iy1 - iy0), Image.Resampling.BILINEAR, box=src)
        out.paste(part, (ix0 - x0, iy0 - y0))
    return out


class CorpusDataset(Dataset):
    """Decoded, preprocessed images of a corpus; never raises for a bad file.

    Each item is a dict: ``index`` (global corpus index), ``pixels`` (3, S, S) uint8, ``ok`` bool,
    ``shape`` (2,) int32 original height/width, ``transform`` (4,) float32 (see `preprocess`),
    ``error`` str. ``resize`` (default ``size``) is the shorter side before the center crop.
    """

    def __init__(
        self,
        corpus: Corpus,
        size: int,
        indices: Sequence[int] | None = None,
        resize: int | None = None,
        jpeg_draft: bool = False,
    ):
        self.corpus = corpus
        self.size = size
        self.resize = size if resize is None else resize
        self.draft = self.resize if jpeg_draft else None  # see load_rgb
        self.indices = list(range(len(corpus))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> dict:
        i = self.indices[item]
        s = self.size
        try:
            img, _, shape = _decode(self.corpus.file(i), self.draft)
            pixels, transform = preprocess(img, s, self.resize, full=shape)
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
                "transform": torch.zeros(4, dtype=torch.float32),
                "error": reason or type(e).__name__,
            }


def _init_worker(allocator: dict[str, int] | None, _worker_id: int) -> None:
    """Workers leave Ctrl-C and SIGTERM to the main process, which stops cleanly and ends them,
    and run with the main process's malloc settings (inherited by fork, re-applied after spawn).

    Ctrl-C reaches the whole process group: a worker that died of it would make the main process
    fail with "DataLoader worker exited unexpectedly" (and print the worker's traceback) instead of
    saving its checkpoint.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if allocator:
        tune_allocator(allocator)


def _loader_options(workers: int, pin_memory: bool) -> dict:
    return {
        "num_workers": workers,
        "pin_memory": pin_memory,
        "prefetch_factor": 4 if workers > 0 else None,
        "worker_init_fn": (
            functools.partial(_init_worker, applied_settings()) if workers > 0 else None
        ),
    }


def make_loader(
    dataset: CorpusDataset, batch_size: int, workers: int = 0, pin_memory: bool = False
) -> DataLoader:
    """A DataLoader that keeps corpus order (no shuffling) whatever the worker count."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        persistent_workers=False,
        **_loader_options(workers, pin_memory),
    )


class _Batches:
    """A batch sampler whose indices are set before each pass (DataLoader keeps the sampler)."""

    def __init__(self, batch_size: int):
        self.batch_size, self.indices = batch_size, []
        self.first = batch_size  # the size of the batches that make up the first batch_size

    def __iter__(self):
        lo = 0
        while lo < len(self.indices):
            size = self.first if lo < self.batch_size else self.batch_size
            yield self.indices[lo : lo + size]
            lo += size

    def __len__(self) -> int:
        return sum(1 for _ in self)


class CorpusLoader:
    """Batches of chosen corpus images, in the order given, from workers kept for every pass.

    The workers are started once, on the first pass: a worker forked later, from a process whose
    heap holds a pass's activations, makes that process copy every page it writes next (copy on
    write: ~0.5 s at the start of AlexNet's second pass, 39,000 page faults in its first batch).
    """

    def __init__(
        self,
        corpus: Corpus,
        size: int,
        resize: int | None = None,
        jpeg_draft: bool = False,
        batch_size: int = 32,
        workers: int = 0,
        pin_memory: bool = False,
    ):
        self._sampler = _Batches(batch_size)
        self._loader = DataLoader(
            CorpusDataset(corpus, size, None, resize, jpeg_draft),  # item i is corpus image i
            batch_sampler=self._sampler,
            persistent_workers=workers > 0,
            **_loader_options(workers, pin_memory),
        )

    def batches(self, indices: Sequence[int], first: int | None = None):
        """An iterator over the batches (dicts of `CorpusDataset` items, stacked) of ``indices``.

        ``first``: the first batch comes as batches of this many images, which the workers decode
        at once (each worker makes whole batches), so that the model starts sooner.
        """
        self._sampler.indices = [int(i) for i in indices]
        self._sampler.first = first or self._sampler.batch_size
        return iter(self._loader)

    def close(self) -> None:
        """End the workers now, even while a pass's iterator is still referenced (a traceback)."""
        running = getattr(self._loader, "_iterator", None)  # DataLoader keeps persistent workers
        if running is not None and hasattr(running, "_shutdown_workers"):  # there; no public close
            running._shutdown_workers()
        self._loader = None
