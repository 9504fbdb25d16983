"""The Miner: one run's state over its slice of a corpus, and the passes that fill it.

Public names: Miner, MineSummary, Labels, DEFAULT_PATCH_SIZE.

The first pass streams every image once through the tapped model and feeds per-layer collectors
(top-k, statistics, bottom-k, class means) whose state saves to a checkpoint and merges with the
state of another slice; the second pass re-reads only winner images, and the result is written
atomically. The file is a pure function of the corpus order and the settings. Which nodes are mined
(and their shapes and fields) is `patchmine.taps.select_layers`; what the file holds is assembled
by `patchmine.contents` and written by `patchmine.store`. `patchmine.mine.mine` runs a Miner
from arguments to file (checkpoints, resume, signals).
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from patchmine import contents, distributed, store
from patchmine.bottomk import BottomK
from patchmine.checkpoints import check_resumable
from patchmine.corpus import Corpus, CorpusLoader, printable
from patchmine.errors import UsageError, differences
from patchmine.geometry import inside_fraction
from patchmine.labels import ClassMeans, layer_channel_names
from patchmine.maps import Maps, reduce_maps
from patchmine.models import load_model
from patchmine.patches import LayerPlan, second_pass, winner_batches, winner_files
from patchmine.projections import Projector, check_method
from patchmine.stats import RunningStats
from patchmine.taps import Tap, select_layers
from patchmine.topk import TopK

__all__ = ["Miner", "MineSummary", "Labels", "DEFAULT_PATCH_SIZE"]

DEFAULT_PATCH_SIZE = 96
_CLASS_BATCH = 1024  # images whose maxima are added to the class means at once


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
            lines += [f"  {printable(p)}: {printable(e)}" for p, e in self.failures[:20]]
            if self.n_failed > 20:
                lines.append(f"  ... and {self.n_failed - 20} more (see /images/error)")
        return "\n".join(lines)


@dataclass(frozen=True)
class Labels:
    """Every corpus image's label (``--labels``), assigned on the whole corpus before any slice.

    ``spec`` is what was given ("folder" or the CSV file), ``names`` the L label names, ``label``
    (N,) int32 indices into them (-1: unlabelled).
    """

    spec: str
    names: list[str]
    label: torch.Tensor

    @property
    def digest(self) -> str:
        """What a checkpoint must agree on: the names and every image's label."""
        h = hashlib.sha256("\n".join(self.names).encode("utf-8", "surrogateescape"))
        h.update(self.label.numpy().astype("<i4").tobytes())
        return f"{len(self.names)} names, sha256 {h.hexdigest()[:16]}"


def _image_max(acts: torch.Tensor, maps: Maps | None) -> torch.Tensor:
    """(N, C) each map's maximum, for the class means: ``maps.max`` where the caller has it (CPU),
    NaN values left out as TopK leaves them out; a map of NaN only has a NaN maximum."""
    if maps is not None:
        return maps.max.masked_fill(maps.count == 0, float("nan")) if maps.nan else maps.max
    N, C = acts.shape[:2]
    x = acts.reshape(N, C, -1).float()  # elsewhere: without host synchronization
    m = x.nan_to_num(nan=float("-inf"), posinf=float("inf"), neginf=float("-inf")).amax(2)
    return m.masked_fill(x.isnan().all(2), float("nan"))


class Miner:
    """One run over a slice ``start:stop`` of a corpus: model, collectors, image records.

    Its state (collectors, statistics, image records, cursor) saves to and loads from a checkpoint
    and merges with the state of another slice (see :mod:`patchmine.merge`). Collectors per
    layer: ``topk`` (TopK), ``stats`` (RunningStats), ``bottom`` (BottomK, with ``--bottom-k``;
    else empty) and ``classes`` (ClassMeans, with ``--labels``; else empty).
    """

    def __init__(
        self,
        corpus: Corpus,
        *,
        model: str | None,
        weights: str | None,
        layers: Sequence[str] | None,
        k: int,
        per_image: int,
        input_size: int,
        device: str | torch.device = "cpu",
        patch_size: int = DEFAULT_PATCH_SIZE,
        shard: tuple[int, int] | None = None,
        part: tuple[int, int] | None = None,
        extra_attrs: dict | None = None,
        resize: int | None = None,
        labels: Labels | None = None,
        channel_names: str | os.PathLike | None = None,
        bottom_k: bool = False,
        min_inside: float | None = None,
        jpeg_draft: bool = False,
        projection: str | None = None,
        projection_layers: Sequence[str] | None = None,
    ):
        self.projection = check_method(projection)
        self.corpus = corpus
        self.labels, self.bottom_k = labels, bool(bottom_k)
        self.jpeg_draft = jpeg_draft
        self.extra_attrs = dict(extra_attrs or {})
        self.k, self.per_image, self.input_size = k, per_image, input_size
        self.resize = input_size if resize is None else resize
        self.patch_size, self.shard = patch_size, shard
        n = len(corpus)
        self.start, self.stop = (0, n) if shard is None else _shard_range(n, *shard)
        # The images this process streams: all of start:stop, or its part (rank, world) of them.
        self.part = part
        size = self.stop - self.start
        lo, hi = (0, size) if part is None else _shard_range(size, *part)
        self.span = range(self.start + lo, self.start + hi)
        self.cursor = self.span.start
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError):
            raise UsageError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"device {str(device)!r} asked for, but CUDA is not available here")
        self.model = load_model(model, weights, input_size)
        chosen = select_layers(self.model.module, input_size, layers, self.model.default_layers)
        self.layers, self.shapes, self.fields = chosen.names, chosen.shapes, chosen.fields
        self.nodes = chosen.nodes  # a module name -> the node it means
        self.fmap_hw = chosen.fmap_hw
        self.projected = self._projected(projection_layers)
        self.model.module.to(self.device)
        lm = self.model
        self.views = chosen.views
        self.tap = Tap(lm.module, self.layers, lm.mean, lm.std, chosen.views)
        self.tap.to(self.device).eval()

        def collector(kind, name: str):  # TopK or BottomK of one node, with its NMS geometry
            return kind(
                self.shapes[name][0],
                k,
                per_image,
                self.fmap_hw(name),
                self.fields[name].suppression.size,
                self.fields[name].suppression.stride,
                device=self.device,
            )

        self.topk = {name: collector(TopK, name) for name in self.layers}
        self.stats = {n: RunningStats(self.shapes[n][0], device=self.device) for n in self.layers}
        self.bottom = {
            name: collector(BottomK, name) for name in (self.layers if self.bottom_k else [])
        }
        self.classes = {}
        # per-image maxima and labels waiting for the class means: added a few thousand images at
        # a time (the sums are exact, so when does not matter; the op count does, per batch)
        self._maxima: dict[str, list[torch.Tensor]] = {}
        self._labels: list[torch.Tensor] = []
        if labels is not None:
            if len(labels.label) != n:
                raise ValueError(f"labels for {len(labels.label)} images, the corpus has {n}")
            self._label = labels.label.to(self.device)
            L = len(labels.names)
            self.classes = {
                name: ClassMeans(self.shapes[name][0], L, device=self.device)
                for name in self.layers
            }
        self.channel_names = layer_channel_names(
            self.model, {name: self.shapes[name][0] for name in self.layers}, channel_names
        )
        self.min_inside = _fraction(min_inside)
        self.barred = self._barred()
        self.ok = np.zeros(n, dtype=bool)
        self.shape = np.zeros((n, 2), dtype=np.int32)
        self.transform = np.zeros((n, 4), dtype=np.float32)
        self.error = [""] * n
        self._loader: tuple[tuple[int, int], CorpusLoader] | None = None  # both passes' workers
        self._ahead: Iterator[dict] | None = None  # the second pass's batches, read ahead

    def _projected(self, names: Sequence[str] | None) -> list[str]:
        """The mined layers that get projections, in mining order (all of them by default)."""
        if self.projection is None:
            if names:
                raise UsageError("--projection-layers needs --projection deconvnet|guided|gradient")
            return []
        if not names:
            return list(self.layers)
        known = {n: n for n in self.layers} | {node: n for n, node in self.nodes.items()}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise UsageError(
                f"--projection-layers names {', '.join(unknown)}, which this run does not mine "
                f"(it mines {', '.join(self.layers)})"
            )
        chosen = {known[n] for n in names}
        return [n for n in self.layers if n in chosen]

    def _barred(self) -> dict[str, torch.Tensor]:
        """node -> (H, W) bool, true where a unit's box has less than ``min_inside`` inside the
        input (such units never compete for the top-k); only nodes that have such units."""
        if self.min_inside is None:
            return {}
        out = {}
        side = (self.input_size, self.input_size)
        for n in self.layers:
            frac = inside_fraction(self.fields[n], self.fmap_hw(n), side)
            barred = frac < self.min_inside
            if barred.all():
                raise UsageError(
                    f"--min-inside {self.min_inside:g} leaves no unit of layer {n} (at most "
                    f"{frac.max():.2f} of its fields lies inside the input); lower it"
                )
            if barred.any():
                out[n] = torch.from_numpy(barred).to(self.device)
        return out

    @property
    def meta(self) -> dict:
        """What a checkpoint must agree on to be resumed."""
        lm = self.model
        return {
            "model": lm.name,
            "weights": lm.weights,
            "layers": list(self.layers),
            "k": self.k,
            "per_image": self.per_image,
            "input_size": self.input_size,
            "resize": self.resize,
            "min_inside": self.min_inside,
            "jpeg_draft": self.jpeg_draft,
            "corpus": self.corpus.fingerprint(),
            "n_images": len(self.corpus),
            "shard": list(self.shard) if self.shard else None,
            "part": list(self.part) if self.part else None,
            "labels": self.labels.digest if self.labels is not None else None,
            "bottom_k": True if self.bottom_k else None,
            "projection": self.projection,
            "projection_layers": self.projection_subset,
        }

    @property
    def projection_subset(self) -> list[str] | None:
        """The layers with projections when not all of them (None: all, or no projections)."""
        return self.projected if len(self.projected) < len(self.layers) else None

    def state_dict(self) -> dict:
        """Plain data (tensors, numbers, strings), as `checkpoints.load_checkpoint` accepts it."""
        return {
            "meta": self.meta,
            "cursor": self.cursor,
            "ok": torch.from_numpy(self.ok),
            "shape": torch.from_numpy(self.shape),
            "transform": torch.from_numpy(self.transform),
            "error": self.error,
            **self._collector_states(),
        }

    def _collector_states(self) -> dict:
        out = {
            "topk": {n: c.state_dict() for n, c in self.topk.items()},
            "stats": {n: s.state_dict() for n, s in self.stats.items()},
        }
        if self.bottom:
            out["bottom"] = {n: c.state_dict() for n, c in self.bottom.items()}
        if self.classes:
            self._add_maxima()
            out["classes"] = {n: c.state_dict() for n, c in self.classes.items()}
        return out

    def load_state_dict(self, state: dict, source: str = "checkpoint") -> None:
        check_resumable(source, state["meta"], self.meta)
        self.cursor = int(state["cursor"])
        for n in self.layers:
            self.topk[n].load_state_dict(state["topk"][n])
            self.stats[n].load_state_dict(state["stats"][n])
            if self.bottom:
                self.bottom[n].load_state_dict(state["bottom"][n])
            if self.classes:
                self.classes[n].load_state_dict(state["classes"][n])
        self._maxima, self._labels = {}, []
        for key in ("ok", "shape", "transform"):
            getattr(self, key)[:] = np.asarray(state[key])
        self.error = list(state["error"])

    @torch.inference_mode()
    def first_pass(
        self,
        batch_size: int,
        workers: int,
        progress: bool = True,
        should_stop: Callable[[], bool] = lambda: False,
        checkpoint: Callable[[], None] | None = None,
        checkpoint_every: int = 0,
    ) -> None:
        """Stream images ``cursor:span.stop`` once through the model into the collectors.

        ``checkpoint`` is called every ``checkpoint_every`` batches and when ``should_stop`` turns
        true (then KeyboardInterrupt is raised), always between batches.
        """
        if self.cursor >= self.span.stop:
            return
        dev = self.device
        loader = self.loader(batch_size, workers).batches(range(self.cursor, self.span.stop))
        bar = tqdm(
            total=len(self.span),
            initial=self.cursor - self.span.start,
            desc="mining",
            unit="img",
            disable=not progress,
            dynamic_ncols=True,
        )
        with bar:
            for batches, batch in enumerate(loader, 1):
                idx, good = batch["index"], batch["ok"]
                lo, hi = int(idx[0]), int(idx[-1]) + 1
                self.ok[lo:hi] = good.numpy()
                self.shape[lo:hi] = batch["shape"].numpy()
                self.transform[lo:hi] = batch["transform"].numpy()
                self.error[lo:hi] = batch["error"]
                pixels = batch["pixels"]
                if not bool(good.all()):
                    pixels, idx = pixels[good], idx[good]
                if len(idx):  # no name holds the activations past this batch: they are freed
                    # before the next forward, not after it (one batch's worth less peak memory)
                    self.collect(
                        self.tap(pixels.to(dev, non_blocking=True)), idx.to(dev, non_blocking=True)
                    )
                self.cursor = hi
                bar.update(hi - lo)
                if should_stop():
                    if checkpoint:
                        checkpoint()
                    raise KeyboardInterrupt
                if checkpoint and checkpoint_every and batches % checkpoint_every == 0:
                    checkpoint()

    def read_ahead(self, batch_size: int, workers: int) -> None:
        """Start reading the second pass's winner images: the workers decode the first of them
        while the caller goes on (`mine` saves the first pass's checkpoint). Not for a torchrun
        rank, whose winners are known only once its team has combined its first passes."""
        plans = self.plans()
        self._ahead = winner_batches(
            self.loader(batch_size, workers), self.corpus, plans, self.device
        )

    def loader(self, batch_size: int, workers: int) -> CorpusLoader:
        """The corpus loader of this run: one set of worker processes for both passes."""
        key = (batch_size, workers)
        if self._loader is None or self._loader[0] != key:
            cuda = self.device.type == "cuda"
            made = CorpusLoader(
                self.corpus, self.input_size, self.resize, self.jpeg_draft, *key, cuda
            )
            self._loader = key, made
        return self._loader[1]

    def close(self) -> None:
        """End the loader's worker processes (`finish` does; so does `mine`, however it stops)."""
        self._ahead = None
        if self._loader is not None:
            self._loader[1].close()
            self._loader = None

    @torch.inference_mode()
    def collect(self, acts: dict[str, torch.Tensor], index: torch.Tensor) -> None:
        """Feed one batch to the collectors: ``acts`` from ``self.tap``, ``index`` (N,) corpus indices.

        On CPU each activation map is read from memory once for both collectors (`reduce_maps`);
        the class means take its per-map maxima.
        """
        label = self._label[index] if self.classes else None
        for n in self.layers:
            a = acts[n]
            maps = None  # elsewhere the collectors reduce without host syncs
            if self.device.type == "cpu":
                maps = reduce_maps(a, sample=self.stats[n].sample, minimum=bool(self.bottom))
            barred = self.barred.get(n)
            if barred is None:
                self.topk[n].add(a, index, maps)
            else:  # --min-inside: barred units can never win (statistics still see them)
                self.topk[n].add(a.masked_fill(barred, float("-inf")), index)
            self.stats[n].add(a, maps)
            if self.bottom:  # --min-inside bars units from the bottom-k as well
                if barred is None:
                    self.bottom[n].add(a, index, maps)
                else:
                    self.bottom[n].add(a.masked_fill(barred, math.inf), index)
            if self.classes:
                self._maxima.setdefault(n, []).append(_image_max(a, maps))
        if self.classes:
            self._labels.append(label)
            if sum(len(b) for b in self._labels) >= _CLASS_BATCH:
                self._add_maxima()

    def _add_maxima(self) -> None:
        """Add the buffered per-image maxima to the class means."""
        if not self._labels:
            return
        label = torch.cat(self._labels)
        for n, parts in self._maxima.items():
            self.classes[n].add(torch.cat(parts), label)
        self._maxima, self._labels = {}, []

    def part_state(self) -> dict:
        """This process's share of a multi-process run: collectors, statistics, its span's records."""
        sl = slice(self.span.start, self.span.stop)
        return {
            "meta": {**self.meta, "part": None},
            "span": (sl.start, sl.stop),
            **self._collector_states(),
            "ok": self.ok[sl],
            "shape": self.shape[sl],
            "transform": self.transform[sl],
            "error": self.error[sl],
        }

    def absorb(self, part: dict) -> None:
        """Merge another process's `part_state` (a disjoint span of the same run) into this one."""
        diff = differences(part["meta"], {**self.meta, "part": None})
        if diff:
            raise UsageError(
                f"the processes of this run disagree on {', '.join(diff)} (span {part['span']}): "
                "start every rank with the same command, corpus and files"
            )
        a, b = part["span"]
        for n in self.layers:
            self.topk[n].merge(TopK.from_state_dict(part["topk"][n], self.device))
            self.stats[n].merge(RunningStats.from_state_dict(part["stats"][n], self.device))
            if self.bottom:
                self.bottom[n].merge(BottomK.from_state_dict(part["bottom"][n], self.device))
            if self.classes:
                self._add_maxima()
                self.classes[n].merge(ClassMeans.from_state_dict(part["classes"][n], self.device))
        self.ok[a:b], self.shape[a:b], self.transform[a:b] = (
            part["ok"],
            part["shape"],
            part["transform"],
        )
        self.error[a:b] = part["error"]

    def plans(self) -> list[LayerPlan]:
        """The winners of every layer, as the second pass needs them (with ``--bottom-k`` each
        layer's bottom-k follows as a plan of its own, ``bottom=True``)."""
        plans = []
        for n in self.layers:
            f = self.fields[n]
            size = min(max(f.size), self.patch_size)
            kinds = [(self.topk[n], False)] + ([(self.bottom[n], True)] if self.bottom else [])
            for collector, bottom in kinds:
                r = {key: v.cpu().numpy() for key, v in collector.result().items()}
                plans.append(
                    LayerPlan(n, f, self.fmap_hw(n), size, r["score"], r["image"], r["yx"], bottom)
                )
        return plans

    def finish(
        self,
        out: Path,
        batch_size: int,
        workers: int,
        progress: bool = True,
        should_stop: Callable[[], bool] = lambda: False,
        team: distributed.Team | None = None,
    ) -> MineSummary:
        """The second pass over the winner images, then the atomic write of ``out``.

        With a ``team`` (after ``team.combine(self)``) the second pass is spread over its ranks and
        only rank 0 writes ``out``.
        """
        fill = tuple(int(round(m * 255)) for m in self.model.mean)
        plans = self.plans()
        own = team.own(plans, self.corpus) if team is not None else plans
        writes = team is None or team.leader
        where = out.parent if writes else None
        scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".scratch", dir=where))
        projector = None
        if self.projection is not None:
            projector = Projector(
                self.model.module,
                self.projected,
                self.model.mean,
                self.model.std,
                self.projection,
                max_rows=batch_size,
                views=self.views,
            )
        ahead, self._ahead = (self._ahead if team is None else None), None
        try:
            t0 = time.perf_counter()
            cut = second_pass(
                self.tap,
                self.corpus,
                self.input_size,
                own,
                fill,
                scratch,
                batch_size,
                workers,
                self.device,
                progress,
                should_stop,
                resize=self.resize,
                jpeg_draft=self.jpeg_draft,
                projector=projector,
                loader=self.loader(batch_size, workers),
                batches=ahead,
            )
            self.close()  # the workers are done: they end before the write
            if team is not None:
                team.collect(own, cut)
            t1 = time.perf_counter()
            if writes:
                self._add_maxima()  # the class means hold every image before they are read
                layers = contents.run_layers(self, plans, cut, projector)
                if should_stop():
                    raise KeyboardInterrupt
                attrs, images, labels = contents.run_tables(self)
                store.write_result(out, attrs, images, layers, should_stop, labels=labels)
            t2 = time.perf_counter()
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
            self.close()
        rows = range(self.start, self.stop) if writes else self.span  # a helper rank: its own
        failed = [j for j in rows if not self.ok[j]]
        return MineSummary(
            out=out,
            n_images=len(rows),
            n_failed=len(failed),
            failures=[(self.corpus.paths[j], self.error[j]) for j in failed],
            layers=list(self.layers),
            seconds=0.0,
            second_pass_seconds=t1 - t0,
            write_seconds=t2 - t1,
            winner_images=len(np.unique(winner_files(self.corpus, plans)[1])),
        )


def _fraction(value: float | None) -> float | None:
    """``--min-inside``: None (off) or a number in (0, 1]."""
    if value is None:
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"min-inside must be a number in (0, 1], got {value!r}") from None
    if not 0 < f <= 1:
        raise UsageError(f"min-inside must be in (0, 1] (a share of the field), got {value!r}")
    return f


def _shard_range(n: int, i: int, count: int) -> tuple[int, int]:
    if not (count >= 1 and 0 <= i < count):
        raise UsageError(f"shard must be I/N with 0 <= I < N, got {i}/{count}")
    return i * n // count, (i + 1) * n // count
