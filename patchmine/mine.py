"""Mining a corpus into a result file: `mine` runs a `patchmine.miner.Miner` from arguments to file.

Public names: mine, Miner, MineSummary, Interrupted, DEFAULT_PATCH_SIZE.

`mine` checks the arguments and the output before any work, resumes from the output's checkpoint
with ``--resume`` (`patchmine.checkpoints`), saves it every few batches and when SIGINT or SIGTERM
stops the run (`patchmine.interrupts`), and under torchrun combines the ranks' first passes
(`patchmine.distributed`) before the second pass and the atomic write.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Sequence
from pathlib import Path

from patchmine import distributed, store
from patchmine.checkpoints import checkpoint_path, load_checkpoint, save_checkpoint
from patchmine.corpus import discover, printable
from patchmine.errors import UsageError
from patchmine.interrupts import Interrupted, StopFlag
from patchmine.labels import assign_labels
from patchmine.miner import DEFAULT_PATCH_SIZE, Labels, Miner, MineSummary
from patchmine.projections import check_method

__all__ = ["mine", "Miner", "MineSummary", "Interrupted", "DEFAULT_PATCH_SIZE"]


def _default_workers() -> int:
    return max(1, min(4, (os.cpu_count() or 2) - 1))


def _check_some_readable(miner: Miner, ckpt: Path) -> None:
    """Refuse a corpus of which no image could be decoded (no file is written, the checkpoint goes).

    A shard (or a torchrun rank) may hold only unreadable files of a corpus that has good ones:
    those are not refused.
    """
    if miner.ok[miner.start : miner.stop].any():
        return
    ckpt.unlink(missing_ok=True)
    rows = range(miner.start, miner.stop)
    first = next((j for j in rows if miner.error[j]), miner.start)
    raise UsageError(
        f"no image could be read: all {len(rows)} files of the corpus failed; the first, "
        f"{printable(miner.corpus.paths[first])}: {' '.join(printable(miner.error[first]).split())}"
    )


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
    extra_attrs: dict | None = None,
    resize: int | None = None,
    labels: str | os.PathLike | None = None,
    channel_names: str | os.PathLike | None = None,
    bottom_k: bool = False,
    min_inside: float | None = None,
    jpeg_draft: bool = False,
    projection: str | None = None,
    projection_layers: Sequence[str] | None = None,
) -> MineSummary:
    """Mine the top-k activations of every channel of ``layers`` over a corpus into ``out``.

    Args:
        sources: image folders and/or text files listing images.
        out: the result file (HDF5, schema version 2), written atomically.
        model, weights: see :func:`patchmine.models.load_model` (default: embedded EfficientNet-Lite0).
        layers: node or module names (``patchmine layers MODEL``); ``None``: the model's default
            set (an empty list is refused).
        k: entries kept per channel. per_image: entries one image may contribute per channel.
        input_size: images are resized (shorter side) and center-cropped to this square.
        resize: the shorter side before the center crop (default ``input_size``), as torchvision's
            ``Resize(resize)`` + ``CenterCrop(input_size)``; 256 for torchvision's ImageNet weights.
        batch_size, workers, device: how the first pass runs (the result does not depend on them).
        resume: continue from ``out``'s checkpoint after an interruption.
        checkpoint_every: save the collectors every this many batches (0: never).
        shard: (i, n) mine only the i-th of n contiguous slices of the corpus (for `merge`).
        force: overwrite an existing ``out`` (and ignore a stale checkpoint).
        progress: show tqdm bars.
        patch_size: largest stored patch side; larger receptive fields are resampled down.
        extra_attrs: more root attributes for the result file (str, numbers or lists of them),
            e.g. the settings a pipeline compares to decide whether the file is up to date.
        labels: ``"folder"`` (class folders under each corpus root) or a ``path,label`` CSV file
            (`patchmine.labels.assign_labels`, on the whole corpus even with ``shard``): stores
            the labels and, per layer, ``class_mean`` and ``selectivity``.
        channel_names: a file of channel names, one per line, for layers with as many channels.
        bottom_k: also keep each channel's k most negative activations (``bottom/``).
        min_inside: only units whose field box has at least this fraction (0 < F <= 1) inside
            the input compete (`patchmine.geometry.inside_fraction`); None: every unit.
        jpeg_draft: decode JPEGs at least twice the input size at 1/2, 1/4 or 1/8 scale
            (libjpeg's DCT scaling): faster decoding, pixels close to but not those of a full
            decode. Recorded as the root attribute ``jpeg_draft``.
        projection: ``deconvnet``, ``guided``, ``gradient`` or ``none`` (None): store every kept
            entry's projection (`patchmine.projections`), computed in the second pass. Recorded as
            the root attribute ``projection`` (absent for none).
        projection_layers: the mined layers whose entries get projections (default: all). Each
            entry costs about a backward pass through the model up to its layer, so on a large
            model the deep layers and the logits are the slow ones. Recorded as the root attribute
            ``projection_layers`` when not all.

    Returns:
        A summary of the run. Raises UsageError on bad arguments before any work is done.
    """
    t0 = time.perf_counter()
    for what, v in [
        ("k", k),
        ("per-image", per_image),
        ("batch size", batch_size),
        ("patch size", patch_size),
    ]:
        if v < 1:
            raise UsageError(f"{what} must be at least 1, got {v}")
    if resize is not None and resize < 1:
        raise UsageError(f"resize must be at least 1, got {resize}")
    projection = check_method(projection)
    out = store.check_writable(out, force=force, resume=resume, create=True)
    team = distributed.from_env(device)  # under torchrun: one rank of several
    ckpt = checkpoint_path(out) if team is None else team.checkpoint_path(out)
    progress = progress and (team is None or team.leader)
    corpus = discover(sources)
    labelled = None
    if labels is not None:
        names, label = assign_labels(corpus, labels)
        spec = str(labels) if str(labels) == "folder" else str(Path(labels).resolve())
        labelled = Labels(spec, names, label)
    workers = _default_workers() if workers is None else workers
    miner = Miner(
        corpus,
        model=model,
        weights=weights,
        layers=layers,
        k=k,
        per_image=per_image,
        input_size=input_size,
        device=device if team is None else team.device,
        patch_size=patch_size,
        shard=shard,
        extra_attrs=extra_attrs,
        part=None if team is None else team.part,
        resize=resize,
        labels=labelled,
        channel_names=channel_names,
        bottom_k=bottom_k,
        min_inside=min_inside,
        jpeg_draft=jpeg_draft,
        projection=projection,
        projection_layers=projection_layers,
    )
    if ckpt.exists() and force:
        ckpt.unlink()
    if ckpt.exists() and not resume:
        raise UsageError(
            f"{ckpt} holds an interrupted run: pass --resume to continue it, "
            "or --force to start over"
        )
    if resume and ckpt.exists():
        miner.load_state_dict(load_checkpoint(ckpt), source=str(ckpt))
    resumed_from = miner.cursor if miner.cursor > miner.span.start else 0
    out.parent.mkdir(parents=True, exist_ok=True)  # as `run` does; checked by check_writable

    def save() -> None:
        save_checkpoint(ckpt, miner.state_dict())

    with contextlib.closing(miner), StopFlag() as stop_flag:
        t1 = time.perf_counter()
        if miner.cursor < miner.span.stop:
            miner.first_pass(batch_size, workers, progress, stop_flag, save, checkpoint_every)
            if team is None:  # the workers decode the first winner images during the save
                miner.read_ahead(batch_size, workers)
            save()
        if team is not None:
            team.combine(miner)  # rank 0 now holds every rank's first pass
        elif shard is None:
            _check_some_readable(miner, ckpt)
        first_s = time.perf_counter() - t1
        summary = miner.finish(out, batch_size, workers, progress, stop_flag, team)
    if team is not None:
        team.barrier()  # the file is written: every rank may drop its checkpoint
        summary.extra.update(rank=team.rank, world=team.world)
    ckpt.unlink(missing_ok=True)
    summary.first_pass_seconds = first_s
    summary.seconds = time.perf_counter() - t0
    summary.resumed_from = resumed_from
    return summary
