"""Combine the shard files of one run (``patchmine mine --shard I/N``) into the single-run file.

Public names: merge.

Shard i of N holds images ``i * n // N : (i + 1) * n // N`` of the corpus, indexed locally, and its
own top-k and statistics state. The merged file is what one run over the whole corpus writes: per
channel the top-k over every shard's entries under the exact tie rule (score descending, global image
ascending, flat location ascending: ``TopK.merge`` over states rebuilt from the files), each winner's
box, patch, heat map (and projection) copied from its shard (no image is read, no model run), and
the statistics merged from the files' ``stats/state`` accumulators. With ``--bottom-k`` the
``bottom/`` entries are merged the same way (``BottomK.merge``: score ascending); with ``--labels``
the class means from the exact ``class_state/`` accumulators (``ClassMeans.merge``), so they too
equal a single run's, bit for bit. Files that do not belong together (model, weights, layers, k,
per-image, --min-inside, preprocessing, corpus, labels, bottom-k, projection), an incomplete or
overlapping set of shards and files that are not patchmine results are refused with a UsageError
naming the difference.
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from patchmine import store
from patchmine.bottomk import BottomK
from patchmine.errors import UsageError, differences
from patchmine.geometry import Field
from patchmine.labels import ClassMeans
from patchmine.stats import RunningStats
from patchmine.topk import TopK, entry_key

__all__ = ["merge"]

# Layer attributes computed from a file's own entries (recomputed when the merged file is written).
_OWN = ("border_share",)
# Root attributes that every shard of one run shares (what the run computed, and over what).
_SAME = [
    ("model", "model"),
    ("weights", "weights"),
    ("layer_order", "layers"),
    ("k", "k"),
    ("per_image", "per-image"),
    ("min_inside", "--min-inside"),
    ("input_size", "input size"),
    ("resize", "resize (shorter side before the crop)"),
    ("mean", "preprocessing (mean)"),
    ("std", "preprocessing (std)"),
    ("jpeg_draft", "JPEG draft decoding"),
    ("n_corpus", "corpus size"),
    ("corpus_fingerprint", "corpus (file list)"),
    ("corpus_roots", "corpus roots"),
    ("labels", "labels (--labels)"),
    ("bottom_k", "bottom-k (--bottom-k)"),
    ("projection", "projection method"),
    ("projection_layers", "projection layers (--projection-layers)"),
]


def _shard_of(r: store.Result) -> tuple[int, int]:
    for key in ("n_corpus", "shard_start", "corpus_fingerprint", "layer_order"):
        if key not in r.attrs:
            raise UsageError(f"{r.path} lacks attribute {key!r}: not a file that merge can combine")
    i, n = r.attrs.get("shard", [0, 1])
    return int(i), int(n)


def _check(results: list[store.Result]) -> list[store.Result]:
    """The shards in order 0..N-1, after checking that they are one complete run."""
    first = results[0]
    for r in results[1:]:
        diff = differences(r.attrs, first.attrs, [key for key, _ in _SAME])
        if not diff and r.label_names != first.label_names:
            diff = ["labels"]
        if diff:
            key = diff[0]
            a, b = first.attrs.get(key), r.attrs.get(key)
            if key == "min_inside":  # absent: the option was off
                a, b = ("off" if v is None else v for v in (a, b))
            raise UsageError(
                f"cannot merge {r.path} with {first.path}: {dict(_SAME)[key]} differs "
                f"({_short(a)} vs {_short(b)})"
            )
        for name in first.layers:
            la, lb = first.layer(name).attrs, r.layer(name).attrs
            diff = differences(lb, la, [key for key in la if key not in _OWN])
            if diff:
                raise UsageError(
                    f"cannot merge {r.path} with {first.path}: layer {name} differs in "
                    + ", ".join(f"{k} ({la[k]} vs {lb.get(k)})" for k in diff)
                )
    shards = [_shard_of(r) for r in results]
    counts = sorted({n for _, n in shards})
    if len(counts) > 1:
        desc = ", ".join(
            f"{r.path.name} is {i}/{n}" for r, (i, n) in zip(results, shards, strict=True)
        )
        raise UsageError(f"the files come from runs split in different ways: {desc}")
    total = counts[0]
    by_index: dict[int, store.Result] = {}
    for r, (i, _) in zip(results, shards, strict=True):
        if i in by_index:
            raise UsageError(
                f"shard {i}/{total} is given twice ({by_index[i].path} and {r.path}): "
                "each shard must appear once"
            )
        by_index[i] = r
    missing = [i for i in range(total) if i not in by_index]
    if missing:
        raise UsageError(
            f"missing shard(s) {', '.join(f'{i}/{total}' for i in missing)}: a merge needs all "
            f"{total} shards of the run (have {', '.join(str(i) for i in sorted(by_index))})"
        )
    n = int(first.attrs["n_corpus"])
    ordered = [by_index[i] for i in range(total)]
    for i, r in enumerate(ordered):
        lo, hi = i * n // total, (i + 1) * n // total
        if int(r.attrs["shard_start"]) != lo or r.n_images != hi - lo:
            raise UsageError(
                f"{r.path} says shard {i}/{total} but holds images {r.attrs['shard_start']}:"
                f"{int(r.attrs['shard_start']) + r.n_images}, not {lo}:{hi} of {n}: a damaged file"
            )
    return ordered


def _short(v) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


class _Picked:
    """A lazy (C, k, ...) array: row c holds, per slot, an entry copied from a shard file.

    ``store.write_result`` copies it one channel at a time, so only one channel of one shard is in
    memory at once.
    """

    def __init__(
        self,
        shape: tuple,
        dtype,
        fill,
        src: np.ndarray,
        slot: np.ndarray,
        read: Callable[[int, int], np.ndarray],
    ):
        self.shape, self.dtype, self.fill = shape, np.dtype(dtype), fill
        self.src, self.slot, self.read = src, slot, read

    def __getitem__(self, c: int) -> np.ndarray:
        out = np.empty(self.shape[1:], self.dtype)
        out[...] = self.fill
        for s in np.unique(self.src[c][self.src[c] >= 0]).tolist():
            rows = np.flatnonzero(self.src[c] == s)
            out[rows] = self.read(s, c)[self.slot[c, rows]]
        return out


def _merge_entries(
    layers: list[store.LayerResult],
    starts: np.ndarray,
    name: str,
    a: dict,
    per_image: int,
    fill: np.ndarray,
    bottom: bool = False,
) -> dict:
    """The merged entries of one layer (its top-k, or with ``bottom`` its bottom-k): score, image,
    yx, box, box_orig, and lazy patch and heat copied from the shards."""
    first = layers[0]
    C, k = first.score.shape
    H, W = (int(v) for v in a["fmap_hw"])
    kind = BottomK if bottom else TopK
    nms = Field.from_attrs(a).suppression  # a whole-field token's own patch
    merged = kind(C, k, per_image, (H, W), nms.size, nms.stride)
    keys = []
    for lr, start in zip(layers, starts, strict=True):
        image = np.where(lr.image >= 0, lr.image + start, -1)
        keys.append(np.where(image >= 0, entry_key(image, lr.yx, (H, W)), -1))
        merged.merge(
            kind.from_result(
                lr.score,
                image,
                lr.yx,
                per_image=per_image,
                fmap_hw=(H, W),
                rf_size=nms.size,
                rf_stride=nms.stride,
            )
        )
    res = {key: v.numpy() for key, v in merged.result().items()}
    used = res["image"] >= 0
    key = np.where(used, entry_key(res["image"], res["yx"], (H, W)), -1)
    # Where each winner comes from: its shard (by global image) and its slot in that shard's row.
    src = np.where(used, np.searchsorted(starts, res["image"], side="right") - 1, -1)
    slot = np.zeros((C, k), np.int64)
    for s, skey in enumerate(keys):
        here = src == s
        eq = key[:, :, None] == skey[:, None, :]
        if not eq.any(2)[here].all():  # pragma: no cover - the merge only keeps shard entries
            raise AssertionError(f"layer {name}: a merged entry is missing from shard {s}")
        slot = np.where(here, eq.argmax(2), slot)

    def pick(values: list[np.ndarray], fill) -> np.ndarray:
        out = np.empty_like(values[0])
        out[...] = fill
        for s, v in enumerate(values):
            here = src == s
            out[here] = v[np.nonzero(here)[0], slot[here]]
        return out

    patch_shape = (C, k, *first.patches(0).shape[1:])
    out = {
        **res,
        "box": pick([lr.box for lr in layers], 0),
        "box_orig": pick([lr.box_orig for lr in layers], np.nan),
        "patch": _Picked(patch_shape, np.uint8, fill, src, slot, lambda s, c: layers[s].patches(c)),
        "heat": _Picked((C, k, H, W), np.float16, 0, src, slot, lambda s, c: layers[s].heat(c)),
    }
    if first.projection_attrs is not None:  # the root attribute `projection` is the same
        if any(lr.projection_attrs != first.projection_attrs for lr in layers):
            raise UsageError(f"cannot merge: the shards' projections of layer {name} differ")
        out["projection"] = _Picked(
            patch_shape, np.float16, 0, src, slot, lambda s, c: layers[s].projection(c)
        )
        out["projection_attrs"] = first.projection_attrs
    return out


def _merge_classes(layers: list[store.LayerResult]) -> ClassMeans | None:
    """The layer's class means over every shard, from their exact ``class_state/``."""
    states = [lr.class_state() for lr in layers]
    if not states[0]:
        return None
    merged = None
    for lr, sd in zip(layers, states, strict=True):
        try:
            cm = ClassMeans.from_state_dict(sd)
        except (KeyError, ValueError) as e:
            raise UsageError(
                f"{lr.result.path}: layer {lr.name} has a damaged class_state ({e})"
            ) from None
        if merged is None:
            merged = cm
        else:
            merged.merge(cm)
    return merged


def _merge_layer(shards: list[store.Result], starts: np.ndarray, name: str) -> store.LayerData:
    layers = [r.layer(name) for r in shards]
    first = layers[0]
    a = first.attrs
    C = first.channels
    per_image = int(shards[0].attrs["per_image"])
    fill = np.array([int(round(m * 255)) for m in shards[0].attrs["mean"]], np.uint8)
    top = _merge_entries(layers, starts, name, a, per_image, fill)
    bottom = None
    if first.bottom is not None:
        b = _merge_entries([lr.bottom for lr in layers], starts, name, a, per_image, fill, True)
        bottom = store.LayerData(attrs={}, stats={}, **b)
    stats = None
    for lr in layers:
        rs = RunningStats(C)
        q = np.asarray(lr.stats()["q"], np.float32)
        if not np.array_equal(q, np.asarray(rs.quantiles, np.float32)):
            raise UsageError(
                f"{lr.result.path}: layer {name} has quantiles {q.tolist()}, "
                f"this patchmine computes {list(rs.quantiles)}"
            )
        sd = rs.state_dict()
        sd.update({key: torch.from_numpy(v) for key, v in lr.stats_state().items()})
        rs.load_state_dict(sd)
        if stats is None:
            stats = rs
        else:
            stats.merge(rs)
    state = stats.state_dict()
    out = store.LayerData(
        attrs={key: v for key, v in a.items() if key not in _OWN},
        **top,
        stats={key: v.cpu().numpy() for key, v in stats.result().items()},
        stats_state={key: v.numpy() for key, v in state.items() if isinstance(v, torch.Tensor)},
        bottom=bottom,
    )
    classes = _merge_classes(layers)
    if classes is not None:
        mean, sel = classes.result()
        out.class_mean, out.selectivity = mean.numpy(), sel.numpy()
        out.class_state = store.class_state_arrays(classes.state_dict())
    return out


def merge(paths: Sequence[str | os.PathLike], out: str | os.PathLike, force: bool = False) -> Path:
    """Merge the shard files of one run into ``out``, exactly the file a single run would write.

    Args:
        paths: every shard file of the run (``patchmine mine --shard I/N``), in any order. A
            single-run file counts as shard 0/1.
        out: the merged result file, written atomically.
        force: overwrite an existing ``out``.

    Returns:
        ``out`` as a Path.

    Raises:
        UsageError: a file is missing or not a patchmine result; files that differ in model,
            weights, layers, k, per-image, min-inside, preprocessing or corpus; missing or
            repeated shards.
    """
    if not paths:
        raise UsageError("nothing to merge: name the shard files (patchmine mine --shard I/N)")
    out = store.check_writable(out, force=force, resumable=False)
    for p in paths:
        if Path(p).resolve() == out.resolve():
            raise UsageError(f"the output {out} is also an input: write the merge elsewhere")
    results: list[store.Result] = []
    try:
        for p in paths:
            results.append(store.open_result(p))
        shards = _check(results)
        starts = np.array([int(r.attrs["shard_start"]) for r in shards], np.int64)
        attrs = {
            k: v for k, v in shards[0].attrs.items() if k not in ("format", "version", "shard")
        }
        attrs.update(
            n_images=int(shards[0].attrs["n_corpus"]),
            n_failed=sum(int(r.attrs["n_failed"]) for r in shards),
            shard_start=0,
            created_utc=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        )
        images = {
            "path": [p for r in shards for p in r.image_paths],
            "root": np.concatenate([r.image_root for r in shards]),
            "shape": np.concatenate([r.image_shape for r in shards]),
            "ok": np.concatenate([r.image_ok for r in shards]),
            "transform": np.concatenate([r.image_transform for r in shards]),
            "error": [e for r in shards for e in r.image_error],
        }
        labels = None
        if shards[0].label_names is not None:
            images["label"] = np.concatenate([r.image_label for r in shards])
            labels = store.label_table(shards[0].label_names, images["label"], images["ok"])
        layers = {name: _merge_layer(shards, starts, name) for name in shards[0].layers}
        return store.write_result(out, attrs, images, layers, labels=labels)
    finally:
        for r in results:
            r.close()
