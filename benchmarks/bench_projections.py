"""What projections cost in the second pass: per winner image, with and without --projection.

Mines the corpus once per model at k=100 (kept in --work, reused), then for k in 1, 9, 100:

- section "second pass" (the default): ``patches.second_pass`` exactly as ``mine`` runs it, over
  the first ``--images`` winner images of the top-k (slots < k), once without a projector and once
  with ``Projector(method)``, alternated ``--repeats`` times; seconds per winner image and ratio;
  with ``--unpacked`` also with ``Projector(method, pack=False)`` (one entry per backward, the
  same bits). The forwards and backwards the projector ran are counted (counts are not noisy).
- section "batch" (``--sections batch``): one winner batch, the ``Tap`` re-forward against
  ``Projector.project`` (forward + every entry's backward) and ``cut_projections`` apart.

    python benchmarks/bench_projections.py --corpus ../shared/corpus/imagenet-sample-500 [--quick]

``make bench`` runs the second-pass part as its "projections" section (``second_pass_cost``);
this script stays the entry point for the k=100 runs and the per-batch breakdown.

Measured on the 2-core shared machine (load 8-11, so absolute times are inflated; batch 16,
``--images 16`` for AlexNet with random weights, conv1-conv5, ``--images 8`` for the embedded
model's default layers), seconds per winner image, plain second pass -> with deconvnet:
AlexNet k=1 0.20 -> 1.61 (8.0x), k=9 0.64 -> 5.14 (8.1x); Lite0 k=1 1.09 -> 10.0 (9.2x),
k=9 1.07 -> 21.3 (20x). k=100 did not finish in 20 minutes. The demo (225 crops, 5 layers with
the logits, k=9): plain mine 214 s; ``patchmine project --method deconvnet`` on it ran 32 of 225
winner images in 17.5 min (about 33 s per image) and was stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from patchmine.corpus import CorpusDataset, discover
from patchmine.mine import mine
from patchmine.models import load_model
from patchmine.patches import LayerPlan, second_pass
from patchmine.projections import Projector, cut_projections
from patchmine.receptive import boxes, receptive_fields
from patchmine.taps import Tap

MODELS = {
    "alexnet": (
        "alexnet",
        "none",
        ["features.0", "features.3", "features.6", "features.8", "features.10"],
    ),
    "lite0": (None, None, None),  # the embedded model's default layers
}


def _winners(path: Path, layers: list[str], k: int):
    """node -> (image, channel, yx) of the entries with slot < k."""
    out = {}
    with h5py.File(path, "r") as f:
        for n in layers:
            g = f["layers"][n]
            image = g["image"][:, :k]
            yx = g["yx"][:, :k]
            c, s = np.nonzero(image >= 0)
            out[n] = (image[c, s], c, yx[c, s])
    return out


def _time(fn, repeats: int) -> list[float]:
    t = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        t.append(time.perf_counter() - t0)
    return t


def model_and_layers(key: str):
    """The loaded model of ``MODELS[key]`` and its layers (the embedded model: its defaults)."""
    name, weights, layers = MODELS[key]
    lm = load_model(name, weights, 224)
    return lm, layers or list(lm.default_layers)


def mined(sources, key: str, layers: list[str], out: Path, k: int) -> Path:
    """``out``: the first pass of ``MODELS[key]`` over ``sources`` at ``k`` (kept if it exists)."""
    name, weights, _ = MODELS[key]
    if not out.exists():
        mine(sources, out, model=name, weights=weights, layers=layers, k=k, input_size=224,
             workers=0, progress=False)  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", default="../shared/corpus/imagenet-sample-500")
    ap.add_argument("--work", default="/tmp/patchmine-bench-projections")
    ap.add_argument("--models", default="alexnet,lite0")
    ap.add_argument("--ks", default="1,9,100")
    ap.add_argument("--methods", default="deconvnet")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--batches", type=int, default=1, help="winner batches timed per setting")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--images", type=int, default=32, help="winner images per second-pass run")
    ap.add_argument("--sections", default="second-pass", help="second-pass and/or batch")
    ap.add_argument("--quick", action="store_true", help="k=9 only, 1 repeat")
    ap.add_argument("--unpacked", action="store_true", help="also one entry per backward")
    args = ap.parse_args()
    if args.quick:
        args.ks, args.repeats = "9", 1
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    corpus = discover([args.corpus])
    print(f"torch threads {torch.get_num_threads()}, corpus {len(corpus)} images")
    for key in args.models.split(","):
        lm, layers = model_and_layers(key)
        result = mined([args.corpus], key, layers, work / f"{key}-k100.h5", 100)
        if "second-pass" in args.sections:
            _second_pass_section(args, key, lm, layers, corpus, result)
        if "batch" in args.sections:
            _batch_section(args, key, lm, layers, corpus, result)


def _plans(path: Path, layers: list[str], fields, k: int, images: int) -> list[LayerPlan]:
    """The top-k (slots < k) of each layer, restricted to ``images`` winner images spread evenly
    over the sorted winner ids (the first few are not typical)."""
    with h5py.File(path, "r") as f:
        plans = []
        for n in layers:
            g = f["layers"][n]
            plans.append(
                LayerPlan(
                    n,
                    fields[n],
                    tuple(int(v) for v in g.attrs["fmap_hw"]),
                    int(g.attrs["patch_size"]),
                    g["score"][:, :k],
                    g["image"][:, :k],
                    g["yx"][:, :k],
                )
            )
    ids = np.unique(np.concatenate([p.image[p.image >= 0] for p in plans]))
    ids = ids[np.unique(np.linspace(0, len(ids) - 1, min(images, len(ids))).astype(int))]
    return [
        dataclasses.replace(p, image=np.where(np.isin(p.image, ids), p.image, -1)) for p in plans
    ]


def second_pass_cost(lm, layers, corpus, result: Path, k: int, method: str = "deconvnet",
                     images: int = 32, batch_size: int = 32, repeats: int = 3,
                     pack: bool = True) -> dict:  # fmt: skip
    """``patches.second_pass`` as ``mine`` runs it (workers 0) over ``images`` winner images of the
    top-k (slots < k) of ``result``, without a projector and with ``Projector(method, pack=pack)``,
    alternated (A B, B A, ...) ``repeats`` times: seconds per winner image (medians), the
    median of the per-repeat ratios with / without, and the projector's forwards and backwards
    per second pass."""
    fields = receptive_fields(lm.module, 224, layers)
    tap = Tap(lm.module, layers, lm.mean, lm.std)
    fill = tuple(int(round(m * 255)) for m in lm.mean)
    every = _plans(result, layers, fields, k, 1 << 30)
    all_img = len(np.unique(np.concatenate([p.image[p.image >= 0] for p in every])))
    all_ent = sum(int((p.image >= 0).sum()) for p in every) / max(all_img, 1)
    plans = _plans(result, layers, fields, k, images)
    n_img = len(np.unique(np.concatenate([p.image[p.image >= 0] for p in plans])))
    n_ent = sum(int((p.image >= 0).sum()) for p in plans)
    proj = Projector(lm.module, layers, lm.mean, lm.std, method, batch_size, pack=pack)
    times: dict[bool, list[float]] = {False: [], True: []}
    for r in range(repeats):
        for projected in (False, True) if r % 2 == 0 else (True, False):
            scratch = Path(tempfile.mkdtemp())
            t0 = time.perf_counter()
            second_pass(tap, corpus, 224, plans, fill, scratch, batch_size, 0,
                        progress=False, projector=proj if projected else None)  # fmt: skip
            times[projected].append(time.perf_counter() - t0)
            shutil.rmtree(scratch)
    pairs = [b / a for a, b in zip(times[False], times[True], strict=True)]
    whole, floor, share = backward_floor(proj, corpus, plans, repeats)
    return {
        "k": k,
        "method": method,
        "images": n_img,
        "entries_per_image": n_ent / max(n_img, 1),
        "entries_per_image_all": all_ent,
        "repeats": repeats,
        "plain_s": statistics.median(times[False]) / n_img,
        "with_s": statistics.median(times[True]) / n_img,
        "ratio": statistics.median(pairs),
        "ratio_min": min(pairs),
        "ratio_max": max(pairs),
        "forwards": proj.forwards // repeats,
        "backwards": proj.backwards // repeats,
        "whole_per_image": whole / max(n_img, 1),
        "floor_s": floor / max(n_img, 1),
        "share_s": share / max(n_img, 1),
    }


def _box_share(p: LayerPlan, e: np.ndarray, size: int = 224) -> np.ndarray:
    """The boxes of the plan's flat entries ``e``, clipped to the input, as fractions of its
    area; 1.0 for a whole-input field."""
    if p.field.whole:
        return np.ones(len(e))
    b = np.clip(boxes(p.field, p.yx.reshape(-1, 2)[e]).astype(np.int64), 0, size)
    return (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) / size**2


def backward_floor(proj: Projector, corpus, plans: list[LayerPlan], repeats: int = 3,
                   rows: int = 16) -> tuple[int, float, float]:  # fmt: skip
    """What the entries' backwards cost at least: (entries whose field is the whole input, the
    seconds their backwards take, the seconds every entry's backward takes if it cost only its
    box's share of a whole-image backward).

    One backward of the graph cut at a node, over a whole image, is timed as
    ``torch.autograd.grad`` on ``rows`` stacked copies of a winner image (the forward not
    counted), per row, median of ``repeats``. Whole-input entries cost at least that each: no two
    can share a backward (their maps overlap everywhere) and none can run on a smaller input. The
    box share is an estimate, not a bound: it supposes a backward restricted to the box.
    """
    whole, floor, share = 0, 0.0, 0.0
    for p in plans:
        used = np.flatnonzero(p.image.reshape(-1) >= 0)
        if not len(used):
            continue
        part = _box_share(p, used)
        k = p.score.shape[1]
        first = int(used[0])
        c, (y, x) = first // k, p.yx.reshape(-1, 2)[first]
        one = CorpusDataset(corpus, 224, [int(p.image.reshape(-1)[first])])[0]["pixels"]
        with torch.enable_grad():
            leaf, _, act = proj._forward(one.expand(rows, -1, -1, -1), p.name)  # bench-only use
            seed = torch.zeros_like(act)
            if act.ndim == 4:
                seed[:rows, c, y, x] = 1
            else:
                seed[:rows, c] = 1
            t = _time(lambda a=act, i=leaf, g=seed: torch.autograd.grad(a, i, g, retain_graph=True),
                      repeats)  # fmt: skip
        one_backward = statistics.median(t) / rows
        n_whole = int((part >= 1.0).sum())
        whole += n_whole
        floor += n_whole * one_backward
        share += float(part.sum()) * one_backward
    return whole, floor, share


def _second_pass_section(args, key, lm, layers, corpus, result) -> None:
    print(f"\n{key}: second pass per winner image (batch {args.batch_size}, workers 0)")
    print(
        "model    k  images  entries/img (all)  plain s/img  method      with s/img  ratio"
        "  forwards backwards"
    )
    for k in [int(v) for v in args.ks.split(",")]:
        for method in args.methods.split(","):
            for pack in (True, False) if args.unpacked else (True,):
                c = second_pass_cost(lm, layers, corpus, result, k, method, args.images,
                                     args.batch_size, args.repeats, pack)  # fmt: skip
                name = method if pack else f"{method}/1"
                print(
                    f"{key:7s} {k:3d} {c['images']:6d} {c['entries_per_image']:11.1f} "
                    f"({c['entries_per_image_all']:5.1f}) {c['plain_s']:12.3f}  {name:10s} "
                    f"{c['with_s']:10.3f} {c['ratio']:6.1f}x {c['forwards']:9d} "
                    f"{c['backwards']:9d}",
                    flush=True,
                )


def _batch_section(args, key, lm, layers, corpus, result) -> None:
    print("model   k  entries/img  forward s  project s (x fwd)  cut s  shared-forward waste")
    fields = receptive_fields(lm.module, 224, layers)
    with h5py.File(result, "r") as f:
        patch_size = {n: int(f["layers"][n].attrs["patch_size"]) for n in layers}
    tap = Tap(lm.module, layers, lm.mean, lm.std)
    for k in [int(v) for v in args.ks.split(",")]:
        entries = _winners(result, layers, k)
        ids = sorted(set(np.concatenate([e[0] for e in entries.values()]).tolist()))
        for b in range(args.batches):
            batch_ids = ids[b * args.batch_size : (b + 1) * args.batch_size]
            if not batch_ids:
                break
            ds = CorpusDataset(corpus, 224, batch_ids)
            pixels = torch.stack([ds[i]["pixels"] for i in range(len(ds))])
            where = np.asarray(batch_ids)
            picked = {}
            for n, (img, ch, yx) in entries.items():
                sel = np.isin(img, where)
                picked[n] = (np.searchsorted(where, img[sel]), ch[sel], yx[sel])
            total = sum(len(p[0]) for p in picked.values())
            # what one shared forward with one entry per image per backward would run
            rounds = sum(np.bincount(p[0]).max(initial=0) for p in picked.values())
            waste = rounds * len(batch_ids) / max(total, 1)
            for method in args.methods.split(","):
                proj = Projector(lm.module, layers, lm.mean, lm.std, method)
                tf, tp = [], []
                for _ in range(args.repeats):  # alternated
                    tf.append(_forward(tap, pixels))
                    seconds, maps = _project(proj, pixels, picked)
                    tp.append(seconds)
                tc = _cut(maps, picked, fields, patch_size)
                f_, p_ = statistics.median(tf), statistics.median(tp)
                print(
                    f"{key:7s} {k:3d} {total / len(batch_ids):8.1f} ({method}) {f_:8.3f} "
                    f"{p_:9.2f} ({p_ / f_:5.1f}x) {tc:6.2f}  {waste:5.2f}",
                    flush=True,
                )


def _forward(tap, pixels) -> float:
    t0 = time.perf_counter()
    with torch.inference_mode():
        tap(pixels)
    return time.perf_counter() - t0


def _project(proj, pixels, picked):
    t0 = time.perf_counter()
    maps = {}
    with torch.inference_mode():  # as in the second pass
        for n, (rows, ch, yx) in picked.items():
            maps[n] = list(proj.project(pixels, n, rows, ch, yx))
    return time.perf_counter() - t0, maps


def _cut(maps, picked, fields, patch_size) -> float:
    t0 = time.perf_counter()
    for n, parts in maps.items():
        yx = picked[n][2]
        for index, m in parts:
            cut_projections(m, boxes(fields[n], yx[index]), patch_size[n])
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
