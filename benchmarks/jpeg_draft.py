"""What ``--jpeg-draft`` trades: decode time, preprocessed-pixel difference and top-1, both ways.

    python benchmarks/jpeg_draft.py /work/shared/corpus/imagenet-sample-500 [--limit N]

For every image: decode + preprocess in full and with libjpeg's DCT scaling (`load_rgb(draft=S)`),
the mean absolute difference of the S x S uint8 pixels (0-255), and the embedded model's top-1
both ways (agreement, and accuracy where the file name carries the class name).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from PIL import Image

from patchmine.corpus import discover, load_rgb, preprocess
from patchmine.models import load_model


def _label_index(stem: str, names: list[str]) -> int | None:
    """ImageNet sample files are named WNID_class_name."""
    name = stem.split("_", 1)[-1].replace("_", " ").lower()
    low = [n.lower() for n in names]
    return low.index(name) if name in low else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("corpus")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--limit", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    corpus = discover([args.corpus])
    n = len(corpus) if not args.limit else min(args.limit, len(corpus))
    s = args.size
    lm = load_model(None, None, s)
    mean = torch.tensor(lm.mean).view(1, 3, 1, 1)
    std = torch.tensor(lm.std).view(1, 3, 1, 1)
    try:
        from torchvision.models import EfficientNet_B0_Weights  # the ImageNet class names

        names = list(EfficientNet_B0_Weights.IMAGENET1K_V1.meta["categories"])
    except Exception:  # noqa: BLE001
        names = []
    times = []
    mads, drafted, full_px, draft_px, labels = [], 0, [], [], []
    for i in range(n):
        f = corpus.file(i)
        t0 = time.process_time()
        a = preprocess(load_rgb(f), s)[0]
        t1 = time.process_time()
        im = load_rgb(f, draft=s)
        b = preprocess(im, s)[0]
        t2 = time.process_time()
        times.append((t1 - t0, t2 - t1))
        with Image.open(f) as raw:
            drafted += raw.size != im.size and min(raw.size) >= 2 * s
        mads.append(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())
        full_px.append(a)
        draft_px.append(b)
        labels.append(_label_index(f.stem, names) if names else None)

    def top1(px: list[np.ndarray]) -> np.ndarray:
        out = []
        with torch.inference_mode():
            for lo in range(0, len(px), 32):
                x = torch.from_numpy(np.stack(px[lo : lo + 32])).permute(0, 3, 1, 2).float() / 255
                out.append(lm.module((x - mean) / std).argmax(1).numpy())
        return np.concatenate(out)

    pa, pb = top1(full_px), top1(draft_px)
    mads = np.asarray(mads)
    changed = mads > 0
    times = np.asarray(times)
    t_full, t_draft = times.sum(0)
    tf_big, td_big = times[changed].sum(0) if changed.any() else (0.0, 0.0)
    print(f"images {n}, decoded at reduced scale {int(changed.sum())} ({drafted} at least 2x{s})")
    print(
        f"decode+preprocess CPU s: full {t_full:.2f}, draft {t_draft:.2f} "
        f"({t_draft / max(t_full, 1e-9):.2f}x); on the drafted images full {tf_big:.2f}, "
        f"draft {td_big:.2f} ({td_big / max(tf_big, 1e-9):.2f}x)"
    )
    print(
        f"MAD (0-255) over all {mads.mean():.3f}; over drafted images {mads[changed].mean():.3f} "
        f"(max {mads.max():.3f})"
        if changed.any()
        else "MAD 0: no image was drafted"
    )
    print(
        f"top-1 agreement full vs draft: {(pa == pb).mean():.4f} ({int((pa != pb).sum())} differ)"
    )
    known = np.array([lab is not None for lab in labels])
    if known.any():
        y = np.array([lab if lab is not None else -1 for lab in labels])
        print(
            f"top-1 accuracy on {int(known.sum())} labelled: full {(pa == y)[known].mean():.4f}, "
            f"draft {(pb == y)[known].mean():.4f}"
        )


if __name__ == "__main__":
    main()
