"""Build the demo corpus: 225 crops of the real photographs that scikit-image ships.

    python data/demo_corpus.py [OUT]        # default OUT: build/demo-corpus (beside data/)

scikit-image (the ``demo`` extra) installs a handful of photographs in ``skimage/data``: an
astronaut, a cat, a coffee cup, a rocket, a stereo pair of motorcycles, the Hubble deep field, a
retina, brick/grass/gravel textures, a cameraman, coins, a printed page... Each becomes a family of
15 deterministic 224 x 224 crops (the whole picture, then corners, center and a grid at smaller
scales, every other one mirrored), so that every subject appears many times at different sizes and
positions: a late layer's top-9 montage then visibly groups one subject, an early layer's groups one
texture or edge. Nothing is downloaded; photographs a scikit-image release lacks are skipped.

The crops are 224 x 224 JPEGs, exactly the demo's input size, so they pass through preprocessing
without resampling. Each crop's label is its source photograph: ``sk_labels.csv`` beside them
(``path,label`` rows, for ``patchmine mine --labels``; 15 labels, the two motorcycle views apart). Building is fast (a few seconds) and idempotent: a file is rewritten only when
its bytes would change, and files the recipe no longer makes are removed, so mtimes stay put and a
pipeline that depends on the corpus is not re-run for nothing. The output is a pure function of the
scikit-image photographs and Pillow's resampling and JPEG encoder.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import sys
from pathlib import Path

from PIL import Image, ImageOps

SIDE = 224
QUALITY = 90
PREFIX = "sk_"  # every file the recipe writes starts with this; others in OUT are left alone
LABELS = f"{PREFIX}labels.csv"  # path,label: each crop's source photograph

# (file in skimage/data, name used in the corpus)
PHOTOS = [
    ("astronaut.png", "astronaut"),
    ("chelsea.png", "cat"),
    ("coffee.png", "coffee"),
    ("rocket.jpg", "rocket"),
    ("motorcycle_left.png", "motorcycle_l"),
    ("motorcycle_right.png", "motorcycle_r"),
    ("hubble_deep_field.jpg", "hubble"),
    ("retina.jpg", "retina"),
    ("brick.png", "brick"),
    ("grass.png", "grass"),
    ("gravel.png", "gravel"),
    ("camera.png", "camera"),
    ("coins.png", "coins"),
    ("page.png", "page"),
    ("text.png", "text"),
]

# (crop side as a fraction of the shorter side, grid positions per axis): 1 + 5 + 9 crops
SCALES = [(1.0, 1), (0.7, 2), (0.45, 3)]


def skimage_data_dir() -> Path:
    """The ``skimage/data`` folder of the installed scikit-image (found without importing it)."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "demo_corpus: scikit-image is not installed; install the demo extra: "
            "pip install -e '.[demo]' (or run make install)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def crops(w: int, h: int) -> list[tuple[str, tuple[int, int, int, int]]]:
    """Named square crop boxes (left, top, right, bottom) of a w x h picture."""
    out = []
    for frac, n in SCALES:
        side = round(min(w, h) * frac)
        xs = [round((w - side) * i / (n - 1)) for i in range(n)] if n > 1 else [(w - side) // 2]
        ys = [round((h - side) * i / (n - 1)) for i in range(n)] if n > 1 else [(h - side) // 2]
        boxes = [(x, y) for y in ys for x in xs]
        if n == 2:  # the four corners and the center
            boxes.append(((w - side) // 2, (h - side) // 2))
        for j, (x, y) in enumerate(boxes):
            out.append((f"s{round(frac * 100):03d}_{j}", (x, y, x + side, y + side)))
    return out


def encode(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=QUALITY, subsampling=0)
    return buf.getvalue()


def build(out: Path, quiet: bool = False) -> list[Path]:
    """Write the corpus into ``out``; return its files in sorted order."""
    src = skimage_data_dir()
    out.mkdir(parents=True, exist_ok=True)
    wanted: dict[str, bytes] = {}
    label_rows = ["path,label"]
    found = []
    for fname, name in PHOTOS:
        path = src / fname
        if not path.is_file():
            continue
        found.append(name)
        with Image.open(path) as im:
            photo = im.convert("RGB")
        for i, (tag, box) in enumerate(crops(*photo.size)):
            tile = photo.crop(box).resize((SIDE, SIDE), Image.Resampling.LANCZOS, reducing_gap=None)
            if i % 2:  # every other crop mirrored: varied, but never a crop and its mirror image
                tile, tag = ImageOps.mirror(tile), tag + "_m"
            wanted[f"{PREFIX}{name}_{tag}.jpg"] = encode(tile)
            label_rows.append(f"{PREFIX}{name}_{tag}.jpg,{name}")
    if len(found) < 5:
        raise SystemExit(f"demo_corpus: only {len(found)} scikit-image photographs found in {src}")
    images = sorted(out / f for f in wanted)
    wanted[LABELS] = ("\n".join(label_rows) + "\n").encode()
    written = 0
    for fname, data in wanted.items():
        path = out / fname
        if path.is_file() and path.read_bytes() == data:
            continue
        tmp = path.with_name(f".{fname}.tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
        written += 1
    stale = [p for p in out.glob(f"{PREFIX}*") if p.name not in wanted]
    for p in stale:
        p.unlink()
    if not quiet:
        state = "up to date" if not written and not stale else f"{written} written"
        if stale:
            state += f", {len(stale)} stale removed"
        print(f"demo corpus: {len(images)} images from {len(found)} photographs in {out} ({state})")
    return images


def main(argv: list[str] | None = None) -> int:
    default = Path(__file__).resolve().parent.parent / "build" / "demo-corpus"
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", nargs="?", type=Path, default=default, help=f"folder (default {default})")
    p.add_argument("--quiet", "-q", action="store_true")
    args = p.parse_args(argv)
    build(args.out, args.quiet)
    return 0


if __name__ == "__main__":
    sys.exit(main())
