"""Mining a corpus: the first pass (top-k + statistics), the second pass, the result file.

Public names: mine, MineSummary.

The first pass streams every image once through the tapped model and feeds per-layer collectors whose
state is checkpointed every few batches; the second pass re-reads only winner images; the result is
written atomically. The file is a pure function of the corpus order and the settings.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torchvision
from tqdm.auto import tqdm

import patchmine
from patchmine import store
from patchmine.corpus import Corpus, CorpusDataset, discover, make_loader
from patchmine.errors import UsageError
from patchmine.models import LoadedModel, load_model
from patchmine.patches import LayerPlan, second_pass
from patchmine.receptive import Field, boxes, receptive_fields, to_original
from patchmine.stats import RunningStats
from patchmine.taps import Tap, default_layers, node_shapes, resolve_layers
from patchmine.topk import TopK

__all__ = ["mine", "MineSummary", "DEFAULT_PATCH_SIZE"]

DEFAULT_PATCH_SIZE = 96


@dataclass
class MineSummary:
    """What a finished run did."""

    out: Path
    n_images: int
    n_failed: int
    failures: list[tuple[str, str]]
    layers: list[str]
    seconds: float
    first_pass_seconds: float = 0.0
    second_pass_seconds: float = 0.0
    write_seconds: float = 0.0
    winner_images: int = 0
    resumed_from: int = 0
    extra: dict = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [
            f"mined {self.n_images - self.n_failed} of {self.n_images} images into {self.out} "
            f"in {self.seconds:.1f}s (first pass {self.first_pass_seconds:.1f}s, second pass "
            f"{self.second_pass_seconds:.1f}s over {self.winner_images} winner images, write "
            f"{self.write_seconds:.1f}s)",
            f"layers: {', '.join(self.layers)}",
        ]
        if self.resumed_from:
            lines.append(f"resumed at image {self.resumed_from}")
        if self.n_failed:
            lines.append(f"{self.n_failed} unreadable, skipped:")
            lines += [f"  {p}: {e}" for p, e in self.failures[:20]]
            if self.n_failed > 20:
                lines.append(f"  ... and {self.n_failed - 20} more (see /images/error)")
        return "\n".join(lines)


class _StopFlag:
    """SIGINT/SIGTERM set a flag; the loops check it between batches and stop cleanly."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, object] = {}

    def __call__(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, _frame) -> None:
        if self.signum is not None:  # a second signal: stop at once
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> _StopFlag:
        with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def _default_workers() -> int:
    return max(1, min(4, (os.cpu_count() or 2) - 1))


def _checkpoint_path(out: Path) -> Path:
    return out.with_name(out.name + ".ckpt")


def _run_meta(lm: LoadedModel, corpus: Corpus, layers, k, per_image, input_size, shard) -> dict:
    """What a checkpoint must agree on to be resumed."""
    return {
        "model": lm.name,
        "weights": lm.weights,
        "layers": list(layers),
        "k": k,
        "per_image": per_image,
        "input_size": input_size,
        "corpus": corpus.fingerprint(),
        "n_images": len(corpus),
        "shard": list(shard) if shard else None,
    }


def _check_meta(ckpt: Path, saved: dict, now: dict) -> None:
    diff = [key for key in now if saved.get(key) != now[key]]
    if diff:
        what = "; ".join(
            f"{key}: checkpoint {saved.get(key)!r}, now {now[key]!r}"
            for key in diff
            if key != "corpus"
        )
        if "corpus" in diff:
            what = "the corpus file list differs" + (f"; {what}" if what else "")
        raise UsageError(
            f"cannot resume from {ckpt}: {what}. Run with the same settings, or delete the "
            "checkpoint (or pass --force) to start over"
        )


def _patch_size(field_: Field, cap: int) -> int:
    return min(max(field_.size), cap)


def mine(
    sources: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    model: str | None = None,
    weights: str | None = None,
    layers: Sequence[str] | None = None,
    k: int = 9,
    per_image: int = 1,
    input_size: int = 224,
    batch_size: int = 32,
    workers: int | None = None,
    device: str = "cpu",
    resume: bool = False,
    checkpoint_every: int = 50,
    shard: tuple[int, int] | None = None,
    force: bool = False,
    progress: bool = True,
    patch_size: int = DEFAULT_PATCH_SIZE,
) -> MineSummary:
    """Mine the top-k activations of every channel of ``layers`` over a corpus into ``out``.

    Args:
        sources: image folders and/or text files listing images.
        out: the result file (HDF5, schema version 1), written atomically.
        model, weights: see :func:`patchmine.models.load_model` (default: embedded EfficientNet-Lite0).
        layers: node names (``patchmine layers MODEL``); default: the last node of each map size.
        k: entries kept per channel. per_image: entries one image may contribute per channel.
        input_size: images are resized (shorter side) and center-cropped to this square.
        batch_size, workers, device: how the first pass runs (the result does not depend on them).
        resume: continue from ``out``'s checkpoint after an interruption.
        checkpoint_every: save the collectors every this many batches (0: never).
        shard: (i, n) mine only the i-th of n contiguous slices of the corpus (for `merge`).
        force: overwrite an existing ``out`` (and ignore a stale checkpoint).
        progress: show tqdm bars.
        patch_size: largest stored patch side; larger receptive fields are resampled down.

    Returns:
        A summary of the run. Raises UsageError on bad arguments before any work is done.
    """
    t0 = time.perf_counter()
    if k < 1:
        raise UsageError(f"k must be at least 1, got {k}")
    if per_image < 1:
        raise UsageError(f"per-image must be at least 1, got {per_image}")
    if batch_size < 1:
        raise UsageError(f"batch size must be at least 1, got {batch_size}")
    if patch_size < 1:
        raise UsageError(f"patch size must be at least 1, got {patch_size}")
    out = store.check_writable(out, force=force, resume=resume)
    ckpt_path = _checkpoint_path(out)
    full = discover(sources)
    if shard is not None:
        i, n = shard
        if not (n >= 1 and 0 <= i < n):
            raise UsageError(f"shard must be I/N with 0 <= I < N, got {i}/{n}")
        start, stop = i * len(full) // n, (i + 1) * len(full) // n
    else:
        start, stop = 0, len(full)
    workers = _default_workers() if workers is None else workers
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {device!r} asked for, but CUDA is not available here")

    lm = load_model(model, weights, input_size)
    shapes = node_shapes(lm.module, input_size)
    layers = resolve_layers(shapes, layers) if layers else default_layers(shapes)
    fields = receptive_fields(lm.module, input_size, layers)
    meta = _run_meta(lm, full, layers, k, per_image, input_size, shard)
    lm.module.to(dev)
    tap = Tap(lm.module, layers, lm.mean, lm.std).to(dev).eval()

    def fmap(name: str) -> tuple[int, int]:
        s = shapes[name]
        return (s[1], s[2]) if len(s) == 3 else (1, 1)

    collectors = {
        n: TopK(shapes[n][0], k, per_image, fmap(n), fields[n].size, fields[n].stride, device=dev)
        for n in layers
    }
    statistics = {n: RunningStats(shapes[n][0], device=dev) for n in layers}
    n_total = len(full)
    ok = np.zeros(n_total, dtype=bool)
    shape = np.zeros((n_total, 2), dtype=np.int32)
    transform = np.zeros((n_total, 3), dtype=np.float32)
    error = [""] * n_total
    cursor = start
    if ckpt_path.exists() and force:
        ckpt_path.unlink()
    if ckpt_path.exists() and not resume:
        raise UsageError(
            f"{ckpt_path} holds an interrupted run: pass --resume to continue it, "
            "or --force to start over"
        )
    resumed_from = 0
    if resume and ckpt_path.exists():
        state = store.load_checkpoint(ckpt_path)
        _check_meta(ckpt_path, state["meta"], meta)
        cursor = int(state["cursor"])
        resumed_from = cursor
        for n in layers:
            collectors[n].load_state_dict(state["topk"][n])
            statistics[n].load_state_dict(state["stats"][n])
        ok[:], shape[:], transform[:] = state["ok"], state["shape"], state["transform"]
        error = list(state["error"])

    def save(cur: int) -> None:
        store.save_checkpoint(
            ckpt_path,
            {
                "meta": meta,
                "cursor": cur,
                "ok": ok,
                "shape": shape,
                "transform": transform,
                "error": error,
                "topk": {n: c.state_dict() for n, c in collectors.items()},
                "stats": {n: s.state_dict() for n, s in statistics.items()},
            },
        )

    t1 = time.perf_counter()
    with _StopFlag() as stop_flag:
        # First pass: every image of the shard once.
        if cursor < stop:
            loader = make_loader(
                CorpusDataset(full, input_size, range(cursor, stop)),
                batch_size,
                workers,
                pin_memory=dev.type == "cuda",
            )
            bar = tqdm(
                total=stop - start,
                initial=cursor - start,
                desc="mining",
                unit="img",
                disable=not progress,
                dynamic_ncols=True,
            )
            batches = 0
            with torch.inference_mode():
                for batch in loader:
                    idx = batch["index"]
                    good = batch["ok"]
                    lo, hi = int(idx[0]), int(idx[-1]) + 1
                    ok[lo:hi] = good.numpy()
                    shape[lo:hi] = batch["shape"].numpy()
                    transform[lo:hi] = batch["transform"].numpy()
                    for j, e in zip(range(lo, hi), batch["error"], strict=True):
                        error[j] = e
                    pixels = batch["pixels"]
                    if not bool(good.all()):
                        pixels, idx = pixels[good], idx[good]
                    if len(idx):
                        acts = tap(pixels.to(dev, non_blocking=True))
                        idx = idx.to(dev, non_blocking=True)
                        for n in layers:
                            collectors[n].add(acts[n], idx)
                            statistics[n].add(acts[n])
                    cursor = hi
                    batches += 1
                    bar.update(hi - lo)
                    if stop_flag():
                        save(cursor)
                        bar.close()
                        raise KeyboardInterrupt
                    if checkpoint_every and batches % checkpoint_every == 0:
                        save(cursor)
            bar.close()
            save(cursor)
        first_s = time.perf_counter() - t1
        summary = _finish(
            out=out,
            full=full,
            start=start,
            stop=stop,
            lm=lm,
            tap=tap,
            layers=layers,
            shapes=shapes,
            fields=fields,
            collectors=collectors,
            statistics=statistics,
            ok=ok,
            shape=shape,
            transform=transform,
            error=error,
            k=k,
            per_image=per_image,
            input_size=input_size,
            batch_size=batch_size,
            workers=workers,
            dev=dev,
            progress=progress,
            patch_size=patch_size,
            shard=shard,
            stop_flag=stop_flag,
        )
    ckpt_path.unlink(missing_ok=True)
    summary.first_pass_seconds = first_s
    summary.seconds = time.perf_counter() - t0
    summary.resumed_from = resumed_from
    return summary


def _finish(
    *,
    out,
    full,
    start,
    stop,
    lm,
    tap,
    layers,
    shapes,
    fields,
    collectors,
    statistics,
    ok,
    shape,
    transform,
    error,
    k,
    per_image,
    input_size,
    batch_size,
    workers,
    dev,
    progress,
    patch_size,
    shard,
    stop_flag,
) -> MineSummary:
    """Second pass and atomic write, from complete first-pass state."""
    fill = tuple(int(round(m * 255)) for m in lm.mean)
    plans = []
    for n in layers:
        r = {key: v.cpu().numpy() for key, v in collectors[n].result().items()}
        s = shapes[n]
        plans.append(
            LayerPlan(
                n,
                fields[n],
                (s[1], s[2]) if len(s) == 3 else (1, 1),
                _patch_size(fields[n], patch_size),
                r["score"],
                r["image"],
                r["yx"],
            )
        )
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".scratch", dir=out.parent))
    try:
        t2 = time.perf_counter()
        cut = second_pass(
            tap,
            full,
            input_size,
            plans,
            fill,
            scratch,
            batch_size,
            workers,
            dev,
            progress,
            stop_flag,
        )
        t3 = time.perf_counter()
        sl = slice(start, stop)
        layer_data = {}
        for p in plans:
            used = p.image >= 0
            bx = boxes(p.field, p.yx).astype(np.int32)
            bx[~used] = 0
            tr = transform[np.where(used, p.image, 0)]
            bo = to_original(bx, tr).astype(np.float32)
            bo[~used] = np.nan
            # shards store local image indices (their own /images), the merge maps them back
            img = np.where(used, p.image - start, -1)
            st = statistics[p.name]
            f = p.field
            layer_data[p.name] = store.LayerData(
                attrs={
                    "channels": p.score.shape[0],
                    "fmap_hw": list(p.fmap_hw),
                    "rf_size": list(f.size),
                    "rf_stride": list(f.stride),
                    "rf_offset": list(f.offset),
                    "rf_whole": bool(f.whole),
                    "patch_size": p.patch_size,
                },
                score=p.score,
                image=img,
                yx=p.yx,
                box=bx,
                box_orig=bo,
                patch=cut[p.name][0],
                heat=cut[p.name][1],
                stats={key: v.cpu().numpy() for key, v in st.result().items()},
                stats_state={
                    key: v.cpu().numpy()
                    for key, v in st.state_dict().items()
                    if isinstance(v, torch.Tensor)
                },
            )
        n_images = stop - start
        failed = [j for j in range(start, stop) if not ok[j]]
        attrs = {
            "model": lm.name,
            "weights": lm.weights,
            "input_size": input_size,
            "mean": list(lm.mean),
            "std": list(lm.std),
            "k": k,
            "per_image": per_image,
            "n_images": n_images,
            "n_failed": len(failed),
            "created_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "patchmine_version": patchmine.__version__,
            "torch_version": torch.__version__,
            "torchvision_version": torchvision.__version__,
            "corpus_roots": list(full.roots),
            "layer_order": list(layers),
            "corpus_fingerprint": full.fingerprint(),
            "n_corpus": len(full),
            "shard_start": start,
        }
        if shard is not None:
            attrs["shard"] = list(shard)
        images = {
            "path": list(full.paths[sl]),
            "root": np.asarray(full.root_index[sl]),
            "shape": shape[sl],
            "ok": ok[sl],
            "transform": transform[sl],
            "error": error[sl],
        }
        if stop_flag():
            raise KeyboardInterrupt
        store.write_result(out, attrs, images, layer_data)
        t4 = time.perf_counter()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return MineSummary(
        out=out,
        n_images=n_images,
        n_failed=len(failed),
        failures=[(full.paths[j], error[j]) for j in failed],
        layers=list(layers),
        seconds=0.0,
        second_pass_seconds=t3 - t2,
        write_seconds=t4 - t3,
        winner_images=len({int(i) for p in plans for i in p.image.reshape(-1) if i >= 0}),
    )
