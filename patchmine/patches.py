"""The second pass: re-read each winner image once, cut its patches, capture heat maps, verify scores
(and, with a projector, compute every entry's projection).

Public names: LayerPlan, Scratch, SharedPatches, ScoreMismatch, cut_patches, second_pass,
winner_batches, winner_files.

Its cost follows the number of distinct winner images, not the corpus. Heat maps go straight into
scratch arrays in their final (C, k, ...) layout, files written with ``pwrite`` when large, so
memory stays bounded by one batch however large a layer is; patches likewise, each cut and stored
once per image and box and shared by the entries that hold it (`SharedPatches`).
"""

from __future__ import annotations

import contextlib
import os
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from patchmine.corpus import Corpus, CorpusLoader
from patchmine.geometry import Field, boxes
from patchmine.taps import chunk_size

if TYPE_CHECKING:
    from patchmine.projections import Projector
    from patchmine.taps import Tap

__all__ = [
    "LayerPlan",
    "Scratch",
    "SharedPatches",
    "ScoreMismatch",
    "cut_patches",
    "second_pass",
    "winner_batches",
    "winner_files",
]


class ScoreMismatch(RuntimeError):
    """A re-forwarded activation differs from the first pass (a changed file or nondeterminism)."""


@dataclass
class LayerPlan:
    """What the second pass needs to know of one mined layer."""

    name: str
    field: Field
    fmap_hw: tuple[int, int]
    patch_size: int
    score: np.ndarray  # (C, k) float32
    image: np.ndarray  # (C, k) int64, -1 unused
    yx: np.ndarray  # (C, k, 2) int32
    bottom: bool = False  # the layer's bottom-k (``--bottom-k``): stored under ``bottom/``

    @property
    def key(self) -> str:
        """Where the second pass puts this plan's patches: the node name, or NAME/bottom."""
        return f"{self.name}/bottom" if self.bottom else self.name


def _windows(
    images: torch.Tensor, which: np.ndarray, y0: np.ndarray, x0: np.ndarray, size, fill
) -> torch.Tensor:
    """(M, h, w, 3) windows of (U, H, W, 3) ``images`` at top-left (y0, x0), ``fill`` outside.

    Windows inside their image are gathered in one indexing of a strided view (each window row is
    one block copy); when all run off an edge (a field larger than the input), from copies of the
    images framed in ``fill``; else the few that do are filled and their overlap copied one by one.
    """
    src = images.contiguous().numpy()  # free for a channels_last batch
    (h, w), (u, ih, iw, _) = size, src.shape
    inside = (y0 >= 0) & (x0 >= 0) & (y0 + h <= ih) & (x0 + w <= iw)
    if inside.all():
        return torch.from_numpy(_gather(src, which, y0, x0, size))
    if not inside.any():  # a field larger than the input: frame the images in fill, then gather
        used, where = np.unique(which, return_inverse=True)
        top, left = max(0, -int(y0.min())), max(0, -int(x0.min()))
        fh, fw = max(top + ih, int(y0.max()) + top + h), max(left + iw, int(x0.max()) + left + w)
        framed = np.empty((len(used), fh, fw * 3), src.dtype)
        framed[...] = np.tile(np.asarray(fill, src.dtype), fw)  # rows of fill, one copy each
        framed = framed.reshape(len(used), fh, fw, 3)
        framed[:, top : top + ih, left : left + iw] = src[used]
        return torch.from_numpy(_gather(framed, where.reshape(-1), y0 + top, x0 + left, size))
    out = np.empty((len(which), h, w, 3), src.dtype)
    out[inside] = _gather(src, which[inside], y0[inside], x0[inside], size)
    rows_out, rows_src = out.reshape(len(which), h, w * 3), src.reshape(u, ih, iw * 3)
    color = np.tile(np.asarray(fill, src.dtype), w)  # a window row of fill
    for i in np.flatnonzero(~inside).tolist():  # rows as (w * 3) runs: numpy copies them whole
        ya, yb = max(int(y0[i]), 0), min(int(y0[i]) + h, ih)
        xa, xb = max(int(x0[i]), 0), min(int(x0[i]) + w, iw)
        rows_out[i] = color
        if yb > ya and xb > xa:
            dy, dx = ya - int(y0[i]), (xa - int(x0[i])) * 3
            rows_out[i, dy : dy + yb - ya, dx : dx + (xb - xa) * 3] = rows_src[
                which[i], ya:yb, xa * 3 : xb * 3
            ]
    return torch.from_numpy(out)


def _gather(src: np.ndarray, which: np.ndarray, y0: np.ndarray, x0: np.ndarray, size) -> np.ndarray:
    """The (M, h, w, 3) windows of (U, H, W, 3) ``src`` at (y0, x0), all inside their image."""
    (h, w), (u, ih, iw, _) = size, src.shape
    b, r, c, _ = src.strides
    view = np.lib.stride_tricks.as_strided(
        src, (u, ih - h + 1, iw - w + 1, h, w * 3), (b, r, c, r, src.itemsize), writeable=False
    )
    return view[which, y0, x0].reshape(-1, h, w, 3)


def cut_patches(
    pixels: torch.Tensor,
    rows: np.ndarray,
    box: np.ndarray,
    patch_size: int,
    fill: tuple[int, int, int],
) -> torch.Tensor:
    """Crop boxes out of images, filling outside the image with ``fill``; shrink to ``patch_size``.

    Args:
        pixels: (B, 3, S, S) uint8 images (or float maps, such as projections: the same geometry
            and filter, in float).
        rows: (M,) which image each box is cut from.
        box: (M, 4) int y0, x0, y1, x1 half-open, may run past the image; all boxes of one size.
        patch_size: P; boxes larger than P (either side) are resampled to P x P.
        fill: the RGB color (0-255) outside the image.

    Returns:
        (M, h, w, 3) of the dtype of ``pixels``, a pixel-exact crop, when the box fits in P; else
        (M, P, P, 3): each image is shrunk once by P / box size and pasted at the box's scaled,
        rounded position, so memory and time follow P, not the box.
    """
    s = pixels.shape[-1]
    h, w = int(box[0, 2] - box[0, 0]), int(box[0, 3] - box[0, 1])
    y0, x0 = box[:, 0].astype(np.int64), box[:, 1].astype(np.int64)
    if h <= patch_size and w <= patch_size:
        return _windows(pixels.cpu().permute(0, 2, 3, 1), np.asarray(rows), y0, x0, (h, w), fill)
    used, where = np.unique(rows, return_inverse=True)
    which = where.reshape(-1)
    fy, fx = patch_size / h, patch_size / w
    if pixels.dtype == torch.uint8:  # torch's uint8 kernel (channels_last): Pillow's within 1 level
        nhwc = pixels.cpu().permute(0, 2, 3, 1).contiguous().numpy()
        images = torch.from_numpy(nhwc[used]).permute(0, 3, 1, 2)
    else:
        images = pixels[torch.from_numpy(used)].cpu().float()
    small = F.interpolate(
        images,
        size=(max(1, round(s * fy)), max(1, round(s * fx))),
        mode="bilinear",
        antialias=True,
        align_corners=False,
    )
    small = small.to(pixels.dtype).permute(0, 2, 3, 1)
    # the image's top-left corner sits at (round(-y0 * fy), round(-x0 * fx)) in the patch
    py, px = np.round(-y0 * fy).astype(np.int64), np.round(-x0 * fx).astype(np.int64)
    return _windows(small, which, -py, -px, (patch_size, patch_size), fill)


class Scratch:
    """A (C, k, ...) array filled entry by entry in any order and read back one channel at a time.

    Small ones live in memory; larger ones in a raw file in the final layout, written with
    ``pwrite`` and read with ``pread``, so that the page cache, not this process, holds them (a
    memory map would count every page it touched in the process's resident memory). The file is
    also the faster of the two beyond a few MB: a fresh array faults in each page on its first
    write (AlexNet's 96 px patches at k = 9: 0.55 s in memory, 0.07 s through the file).
    """

    def __init__(self, path: Path, shape: tuple, dtype, in_memory: int = 4 << 20):
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self._entry = self.shape[2:]
        self._nbytes = int(np.prod(self._entry, dtype=np.int64)) * self.dtype.itemsize
        total = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize
        self._array: np.ndarray | None = None
        self._fd = -1
        if total <= in_memory:
            self._array = np.zeros(self.shape, self.dtype)
        else:
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            self._closer = weakref.finalize(self, os.close, self._fd)
            os.ftruncate(self._fd, total)  # sparse: unwritten entries read as zeros

    def put(self, entries: np.ndarray, values: np.ndarray) -> None:
        """Write ``values`` (M, ...) at flat entries (c * k + slot) ``entries`` (M,)."""
        if self._array is not None:
            self._array.reshape(-1, *self._entry)[entries] = values
            return
        values = np.ascontiguousarray(values, self.dtype).reshape(len(entries), -1)
        e = np.asarray(entries, np.int64)
        breaks = np.flatnonzero(np.diff(e) != 1) + 1  # runs of consecutive entries: one write
        for lo, hi in zip([0, *breaks.tolist()], [*breaks.tolist(), len(e)], strict=True):
            if hi > lo:
                _pwrite_all(self._fd, values[lo:hi], int(e[lo]) * self._nbytes)

    def take(self, entries: np.ndarray) -> np.ndarray:
        """The values at flat entries ``entries`` (M,), as (M, ...)."""
        if self._array is not None:
            return self._array.reshape(-1, *self._entry)[entries]
        out = np.empty((len(entries), *self._entry), self.dtype)
        for i, e in enumerate(np.asarray(entries, np.int64).tolist()):
            _pread_into(self._fd, out[i], e * self._nbytes)
        return out

    def __getitem__(self, c: int) -> np.ndarray:
        """Channel ``c``: (k, ...)."""
        if self._array is not None:
            return self._array[c]
        out = np.empty(self.shape[1:], self.dtype)
        _pread_into(self._fd, out, int(c) * self.shape[1] * self._nbytes)
        return out

    def close(self) -> None:
        if self._fd >= 0:
            self._closer()
            self._fd = -1


class SharedPatches:
    """A (C, k, P, P, 3) patch array whose entries share stored patches: the entries of one image
    at one place (one box) hold the same patch, in many channels of a deep layer, and every unit
    of a whole-field node sees the whole input, so all of one image's entries do. Each patch is
    stored once (a `Scratch` row) and the entries point at it; unset entries read as ``fill``.
    """

    def __init__(self, path: Path, shape: tuple, fill: tuple[int, int, int]):
        self.shape, self.dtype = tuple(shape), np.dtype(np.uint8)
        c, k = self.shape[:2]
        rows = (c * k, 1, *self.shape[2:])  # at most one row per entry
        self._rows = Scratch(path, rows, self.dtype)
        self._row = np.full(c * k, -1, np.int64)
        self._n = 0
        self._fill = np.asarray(fill, self.dtype)

    def share(self, entries: np.ndarray, which: np.ndarray, values: np.ndarray) -> None:
        """Store ``values`` (U, ...) once each; flat entry ``entries[i]`` holds ``values[which[i]]``."""
        rows = self._n + np.arange(len(values))
        self._rows.put(rows, values)
        self._row[np.asarray(entries, np.int64)] = rows[np.asarray(which)]
        self._n += len(values)

    def put(self, entries: np.ndarray, values: np.ndarray) -> None:
        """Write ``values`` (M, ...) at flat entries ``entries`` (M,), each stored on its own."""
        self.share(entries, np.arange(len(entries)), values)

    def take(self, entries: np.ndarray) -> np.ndarray:
        """The values at flat entries ``entries`` (M,), as (M, ...)."""
        rows = self._row[np.asarray(entries, np.int64)]
        if (rows >= 0).all():
            return self._rows.take(rows)
        out = np.empty((len(rows), *self.shape[2:]), self.dtype)
        out[:] = self._fill
        out[rows >= 0] = self._rows.take(rows[rows >= 0])
        return out

    def __getitem__(self, c: int) -> np.ndarray:
        """Channel ``c``: (k, ...)."""
        k = self.shape[1]
        return self.take(np.arange(int(c) * k, (int(c) + 1) * k))

    def close(self) -> None:
        self._rows.close()


def _pwrite_all(fd: int, data: np.ndarray, offset: int) -> None:
    view = memoryview(data).cast("B")
    while len(view):
        n = os.pwrite(fd, view[:_WRITE], offset)
        view, offset = view[n:], offset + n


# Bytes per pwrite: here the page cache took 135 MB of lite0's patches in 0.18-0.30 s as 28 MB
# writes and in 0.04 s as 1 MB ones (measured, not explained; the dirty-page throttling, perhaps).
_WRITE = 1 << 20


def _pread_into(fd: int, out: np.ndarray, offset: int) -> None:
    view = memoryview(out).cast("B")
    while len(view):
        n = os.preadv(fd, [view], offset)
        if n <= 0:
            raise OSError(f"scratch file ended early at byte {offset}")
        view, offset = view[n:], offset + n


_CHUNK = 1024  # patches cut at a time


def winner_files(corpus: Corpus, plans: list[LayerPlan]) -> tuple[np.ndarray, np.ndarray]:
    """The plans' distinct winner images, sorted, and for each the first of them naming the same file.

    A file list may name a file more than once; its copies tie, so several can win one channel.
    The second pass reads and forwards each file once and fills the entries of all its copies.
    """
    used = [p.image[p.image >= 0] for p in plans]
    ids = np.unique(np.concatenate(used)) if used else np.zeros(0, np.int64)
    seen: dict[Path, int] = {}
    first = np.array([seen.setdefault(corpus.file(i), i) for i in ids.tolist()], np.int64)
    return ids, first


def winner_batches(
    loader: CorpusLoader, corpus: Corpus, plans: list[LayerPlan], device: str | torch.device
) -> Iterator[dict]:
    """The second pass's batches of the plans' winner files, their reading begun: the loader's
    workers decode the first ones while the caller goes on (`Miner.read_ahead`)."""
    files = np.unique(winner_files(corpus, plans)[1]).tolist()
    return loader.batches(files, first=chunk_size(device))


@torch.inference_mode()
def second_pass(
    tap: Tap,
    corpus: Corpus,
    input_size: int,
    plans: list[LayerPlan],
    fill: tuple[int, int, int],
    scratch: Path,
    batch_size: int = 32,
    workers: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    should_stop: Callable[[], bool] = lambda: False,
    atol: float = 1e-4,
    resize: int | None = None,
    jpeg_draft: bool = False,
    projector: Projector | None = None,
    loader: CorpusLoader | None = None,
    batches: Iterator[dict] | None = None,
) -> dict[str, tuple[SharedPatches, Scratch, Scratch | None]]:
    """Re-forward each winner image once and fill every layer's patches and heat maps.

    ``input_size`` and ``resize`` preprocess the images as the first pass did (`CorpusDataset`);
    a ``loader`` (the first pass's, with its workers) replaces them, ``batch_size`` and ``workers``;
    ``batches`` (`winner_batches` of the same plans, on that loader) replaces the loader.
    With a ``projector`` (built for some or all of the plans' nodes), every entry of its nodes has
    its projection computed from the same batch of pixels (batched backwards, see
    `patchmine.projections.Projector.project`) and cut like its patch.

    Returns:
        plan key (`LayerPlan.key`: the node, or NODE/bottom) -> (patch (C, k, P', P', 3) uint8,
        heat (C, k, H, W) float16, projection (C, k, P', P', 3) float16, or None without a
        projector or for a node it was not built for) as :class:`Scratch` arrays (files in
        ``scratch`` when large), the patches as :class:`SharedPatches`, one per image and box.
        P' is the patch size, or the box size when the box is smaller.
        Unused slots hold the fill color (patch) and zeros (heat, projection). Every winner file
        of every plan (bottom-k ones included) is re-forwarded once (see `winner_files`), and
        every entry's score verified.
    """
    device = torch.device(device)
    out: dict[str, tuple[SharedPatches, Scratch, Scratch | None]] = {}
    owners: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    ids, first = winner_files(corpus, plans)
    for p in plans:
        c, k = p.score.shape
        rh, rw = p.field.size
        ph, pw = (p.patch_size, p.patch_size) if max(rh, rw) > p.patch_size else (rh, rw)
        safe = p.name.replace(os.sep, "_") + (".bottom" if p.bottom else "")
        patch = SharedPatches(scratch / f"{safe}.patch", (c, k, ph, pw, 3), fill)
        heat = Scratch(scratch / f"{safe}.heat", (c, k, *p.fmap_hw), np.float16)
        proj = None
        if projector is not None and p.name in projector.layers:
            proj = Scratch(scratch / f"{safe}.projection", (c, k, ph, pw, 3), np.float16)
        flat = p.image.reshape(-1)
        out[p.key] = (patch, heat, proj)
        entries = np.flatnonzero(flat >= 0)
        read = first[np.searchsorted(ids, flat[entries])]  # the image forwarded for each entry
        order = np.argsort(read, kind="stable")
        owners[p.key] = (read[order], entries[order])  # sorted image ids, flat (c*k + slot) ids
    files = np.unique(first).tolist()  # the images read: one per winner file
    if not files:
        return out
    made = loader is None and batches is None  # ours to close: its workers outlive the pass
    if made:
        loader = CorpusLoader(
            corpus, input_size, resize, jpeg_draft, batch_size, workers, device.type == "cuda"
        )
    chunk = chunk_size(device)
    if batches is None:
        batches = loader.batches(files, first=chunk)  # what `winner_batches` gives, from `files`

    def entries(p: LayerPlan, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The layer's flat entries whose image is in the batch, and their rows in it."""
        img_sorted, entry = owners[p.key]
        lo = np.searchsorted(img_sorted, index[0], side="left")
        hi = np.searchsorted(img_sorted, index[-1], side="right")
        return entry[lo:hi], np.searchsorted(index, img_sorted[lo:hi])

    def fill_batch(acts: dict[str, torch.Tensor], index: np.ndarray, pixels_cpu: torch.Tensor):
        # a function, so that no name holds the activations into the next batch's forward
        for p in plans:
            e, row = entries(p, index)
            if not len(e):
                continue
            k = p.score.shape[1]
            ch = e // k
            a = acts[p.name]
            a = a.reshape(a.shape[0], a.shape[1], *p.fmap_hw)
            yx = p.yx.reshape(-1, 2)[e]
            got = a[row, ch, yx[:, 0], yx[:, 1]].float().cpu().numpy()
            want = p.score.reshape(-1)[e]
            tol = atol * max(1.0, float(np.abs(want).max()))
            diff = np.abs(got - want)
            if not np.all(diff <= tol):
                j = int(np.argmax(diff))
                raise ScoreMismatch(
                    f"layer {p.key} channel {int(ch[j])}: image {corpus.file(int(index[row[j]]))} "
                    f"now gives {got[j]:.6g}, the first pass gave {want[j]:.6g}; the file changed "
                    "or the model is not deterministic"
                )
            patch, heat, _ = out[p.key]
            heat.put(e, a[row, ch].to(torch.float16).cpu().numpy())
            bx = boxes(p.field, yx)
            # entries of one image at one place share a patch (of a whole-field node: all of them)
            h, w = p.fmap_hw
            key = row if p.field.whole else (row * h + yx[:, 0]) * w + yx[:, 1]
            _, one, which = np.unique(key, return_index=True, return_inverse=True)
            which = which.reshape(-1)
            for lo in range(0, len(one), _CHUNK):  # bounded memory on layers with many channels
                pick = one[lo : lo + _CHUNK]
                cut = cut_patches(pixels_cpu, row[pick], bx[pick], p.patch_size, fill)
                at = (which >= lo) & (which < lo + len(pick))
                patch.share(e[at], which[at] - lo, cut.numpy())

    def project_batch(index: np.ndarray, pixels: torch.Tensor) -> None:
        from patchmine.projections import cut_projections

        for p in plans:
            proj = out[p.key][2]
            e, row = entries(p, index)
            if proj is None or not len(e):
                continue
            yx = p.yx.reshape(-1, 2)[e]
            bx = boxes(p.field, yx)
            ch = e // p.score.shape[1]
            for at, maps in projector.project(pixels, p.name, row, ch, yx, bx):
                proj.put(e[at], cut_projections(maps, bx[at], p.patch_size))

    from tqdm.auto import tqdm  # imported where used: startup

    bar = tqdm(total=len(files), desc="patches", unit="img", disable=not progress, leave=False)
    with contextlib.closing(loader) if made else contextlib.nullcontext():
        for batch in batches:
            if should_stop():
                raise KeyboardInterrupt
            bad = [int(i) for i, ok in zip(batch["index"], batch["ok"], strict=True) if not ok]
            if bad:
                raise ScoreMismatch(
                    f"winner image {corpus.file(bad[0])} can no longer be read "
                    f"({batch['error'][int(np.flatnonzero(~batch['ok'].numpy())[0])]})"
                )
            index = batch["index"].numpy()
            pixels = batch["pixels"].to(device, non_blocking=True)
            cpu = batch["pixels"].contiguous(memory_format=torch.channels_last)  # cut as NHWC rows
            for at in range(0, len(index), chunk):  # the tap's chunks: no copy to stack them
                part = slice(at, at + chunk)
                fill_batch(tap(pixels[part], contiguous=False), index[part], cpu[part])
            if projector is not None:
                project_batch(index, pixels)
            bar.update(len(index))
    bar.close()
    return out
