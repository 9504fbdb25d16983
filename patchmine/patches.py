"""The second pass: re-read each winner image once, cut its patches, capture heat maps, verify scores.

Public names: LayerPlan, cut_patches, second_pass.

Its cost follows the number of distinct winner images, not the corpus. Patches and heat maps go
straight into memory-mapped scratch arrays in their final (C, k, ...) layout, so memory stays bounded
by one batch however large a layer is.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from patchmine.corpus import Corpus, CorpusDataset, make_loader
from patchmine.receptive import Field, boxes

__all__ = ["LayerPlan", "ScoreMismatch", "cut_patches", "second_pass"]


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


def cut_patches(
    pixels: torch.Tensor,
    rows: np.ndarray,
    box: np.ndarray,
    patch_size: int,
    fill: tuple[int, int, int],
) -> torch.Tensor:
    """Crop boxes out of images, filling outside the image with ``fill``; shrink to ``patch_size``.

    Args:
        pixels: (B, 3, S, S) uint8 images.
        rows: (M,) which image each box is cut from.
        box: (M, 4) int y0, x0, y1, x1 half-open, may run past the image; all boxes of one size.
        patch_size: P; boxes larger than P (either side) are resampled to P x P.
        fill: the RGB color (0-255) outside the image.

    Returns:
        (M, h, w, 3) uint8, a pixel-exact crop, when the box fits in P; else (M, P, P, 3): each
        image is shrunk once by P / box size and pasted at the box's scaled, rounded position, so
        memory and time follow P, not the box.
    """
    s = pixels.shape[-1]
    m = len(rows)
    h, w = int(box[0, 2] - box[0, 0]), int(box[0, 3] - box[0, 1])
    color = torch.tensor(fill, dtype=torch.uint8, device=pixels.device).view(3, 1, 1)
    if h <= patch_size and w <= patch_size:
        out = color.expand(m, 3, h, w).clone()
        for i, (r, (y0, x0, y1, x1)) in enumerate(zip(rows.tolist(), box.tolist(), strict=True)):
            sy0, sx0, sy1, sx1 = max(y0, 0), max(x0, 0), min(y1, s), min(x1, s)
            if sy1 > sy0 and sx1 > sx0:
                out[i, :, sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = pixels[r, :, sy0:sy1, sx0:sx1]
        return out.permute(0, 2, 3, 1)
    fy, fx = patch_size / h, patch_size / w
    used, where = np.unique(rows, return_inverse=True)
    small = F.interpolate(
        pixels[torch.from_numpy(used)].float(),
        size=(max(1, round(s * fy)), max(1, round(s * fx))),
        mode="bilinear",
        antialias=True,
        align_corners=False,
    )
    small = small.round_().clamp_(0, 255).to(torch.uint8)
    sh, sw = small.shape[-2:]
    out = color.expand(m, 3, patch_size, patch_size).clone()
    for i, (u, y0, x0) in enumerate(
        zip(where.tolist(), box[:, 0].tolist(), box[:, 1].tolist(), strict=True)
    ):
        py, px = round(-y0 * fy), round(-x0 * fx)  # the image's top-left corner in the patch
        ty0, tx0 = max(py, 0), max(px, 0)
        ty1, tx1 = min(py + sh, patch_size), min(px + sw, patch_size)
        if ty1 > ty0 and tx1 > tx0:
            out[i, :, ty0:ty1, tx0:tx1] = small[u, :, ty0 - py : ty1 - py, tx0 - px : tx1 - px]
    return out.permute(0, 2, 3, 1)


_CHUNK = 1024  # patches cut at a time


def _scratch(folder: Path, name: str, shape: tuple, dtype) -> np.ndarray:
    return np.lib.format.open_memmap(folder / name, mode="w+", dtype=dtype, shape=shape)


@torch.inference_mode()
def second_pass(
    tap: Callable[[torch.Tensor], dict[str, torch.Tensor]],
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
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Re-forward each winner image once and fill every layer's patches and heat maps.

    ``input_size`` and ``resize`` preprocess the images as the first pass did (`CorpusDataset`).

    Returns:
        plan key (`LayerPlan.key`: the node, or NODE/bottom) -> (patch (C, k, P', P', 3) uint8,
        heat (C, k, H, W) float16), memory-mapped in ``scratch``. P' is the patch size, or the box
        size when the box is smaller. Every winner image of every plan (bottom-k ones included)
        is re-forwarded once, and every entry's score verified.
    """
    device = torch.device(device)
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    owners: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    winners: set[int] = set()
    for p in plans:
        c, k = p.score.shape
        rh, rw = p.field.size
        ph, pw = (p.patch_size, p.patch_size) if max(rh, rw) > p.patch_size else (rh, rw)
        safe = p.name.replace(os.sep, "_") + (".bottom" if p.bottom else "")
        patch = _scratch(scratch, f"{safe}.patch.npy", (c, k, ph, pw, 3), np.uint8)
        heat = _scratch(scratch, f"{safe}.heat.npy", (c, k, *p.fmap_hw), np.float16)
        unused = np.argwhere(p.image < 0)
        patch[unused[:, 0], unused[:, 1]] = np.asarray(fill, dtype=np.uint8)  # empty slots: fill
        out[p.key] = (patch, heat)
        flat = p.image.reshape(-1)
        entries = np.flatnonzero(flat >= 0)
        order = entries[np.argsort(flat[entries], kind="stable")]
        owners[p.key] = (flat[order], order)  # sorted image ids, flat (c*k + slot) entry ids
        winners.update(np.unique(flat[entries]).tolist())
    ids = sorted(winners)
    if not ids:
        return out
    loader = make_loader(
        CorpusDataset(corpus, input_size, ids, resize),
        batch_size,
        workers,
        pin_memory=device.type == "cuda",
    )

    def fill_batch(acts: dict[str, torch.Tensor], index: np.ndarray, pixels_cpu: torch.Tensor):
        # a function, so that no name holds the activations into the next batch's forward
        for p in plans:
            img_sorted, entry = owners[p.key]
            lo = np.searchsorted(img_sorted, index[0], side="left")
            hi = np.searchsorted(img_sorted, index[-1], side="right")
            if hi <= lo:
                continue
            e = entry[lo:hi]
            row = np.searchsorted(index, img_sorted[lo:hi])  # position in the batch
            k = p.score.shape[1]
            ch, slot = e // k, e % k
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
            heat, patch = out[p.key][1], out[p.key][0]
            heat[ch, slot] = a[row, ch].to(torch.float16).cpu().numpy()
            bx = boxes(p.field, yx)
            for lo in range(0, len(e), _CHUNK):  # bounded memory on layers with many channels
                part = slice(lo, lo + _CHUNK)
                cut = cut_patches(pixels_cpu, row[part], bx[part], p.patch_size, fill)
                patch[ch[part], slot[part]] = cut.numpy()

    bar = tqdm(total=len(ids), desc="patches", unit="img", disable=not progress, leave=False)
    for batch in loader:
        if should_stop():
            raise KeyboardInterrupt
        bad = [int(i) for i, ok in zip(batch["index"], batch["ok"], strict=True) if not ok]
        if bad:
            raise ScoreMismatch(
                f"winner image {corpus.file(bad[0])} can no longer be read "
                f"({batch['error'][int(np.flatnonzero(~batch['ok'].numpy())[0])]})"
            )
        index = batch["index"].numpy()
        fill_batch(tap(batch["pixels"].to(device, non_blocking=True)), index, batch["pixels"])
        bar.update(len(index))
    bar.close()
    return out
