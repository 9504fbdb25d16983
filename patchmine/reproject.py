"""``patchmine project``: add (or replace) the projections of an existing result file.

Public names: project.

For users who mined without ``--projection``: the first pass is not run again. The model is rebuilt
from the file's attributes (``model``, ``weights``, a custom ``file.py:factory`` as recorded), each
winner image is re-read once (the second pass, which also checks that it still gives the recorded
scores) and every entry's projection is computed and cut exactly as ``mine --projection`` does, so
the datasets equal those of a run that mined with them. The file is rewritten to a temporary file
beside it and renamed over it: a crash leaves the original as it was.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from patchmine import store
from patchmine.errors import UsageError

__all__ = ["project"]


def _weights_arg(name: str, recorded: str) -> str | None:
    """The ``--weights`` value that rebuilds the recorded weights (see `models.load_model`)."""
    from patchmine import lite0
    from patchmine.models import DEFAULT_MODEL

    if recorded in ("none", ""):
        return "none" if recorded == "none" else None
    if recorded == "factory":
        return None
    if name == DEFAULT_MODEL and recorded == lite0.WEIGHTS_PACKAGE:
        return "DEFAULT"
    if Path(recorded).is_file():
        return recorded
    if "." in recorded and recorded.split(".", 1)[0].endswith("_Weights"):
        return recorded.split(".", 1)[1]  # "AlexNet_Weights.IMAGENET1K_V1" -> "IMAGENET1K_V1"
    raise UsageError(
        f"cannot rebuild the weights {recorded!r} of this result (a checkpoint that is gone?)"
    )


def _read(r: store.Result) -> tuple[dict, list]:
    """The run settings and the layers' winners (as second-pass plans) of an open result."""
    from patchmine.geometry import Field
    from patchmine.patches import LayerPlan

    a = r.attrs
    need = ["model", "weights", "input_size", "mean", "std", "layer_order", "corpus_roots"]
    missing = [key for key in need if key not in a]
    if missing:
        raise UsageError(f"{r.path} lacks attribute(s) {', '.join(missing)}")
    plans = []
    for name in r.layers:
        lr = r.layer(name)
        la = lr.attrs

        def pair(v) -> tuple[int, int]:
            v = np.broadcast_to(np.asarray(v, np.int64), (2,))
            return int(v[0]), int(v[1])

        for entries, bottom in ((lr, False), (lr.bottom, True)):  # bottom/: with --bottom-k
            if entries is None:
                continue
            plans.append(
                LayerPlan(
                    name,
                    Field.from_attrs(la),
                    pair(la["fmap_hw"]),
                    int(la["patch_size"]),
                    entries.score,
                    entries.image,
                    entries.yx,
                    bottom,
                )
            )
    settings = {
        "model": a["model"],
        "weights": a["weights"],
        "input_size": int(a["input_size"]),
        "resize": int(a.get("resize", a["input_size"])),
        "jpeg_draft": bool(a.get("jpeg_draft", False)),
        "mean": tuple(float(v) for v in a["mean"]),
        "std": tuple(float(v) for v in a["std"]),
    }
    roots = a["corpus_roots"]
    settings["roots"] = (roots,) if isinstance(roots, str) else tuple(roots)
    settings["paths"] = tuple(r.image_paths)
    settings["root_index"] = tuple(int(v) for v in r.image_root)
    return settings, plans


def project(
    path: str | os.PathLike,
    method: str = "deconvnet",
    *,
    layers: Sequence[str] | None = None,
    batch_size: int = 32,
    workers: int | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> str:
    """Compute the projections of every kept entry of a result file and store them in it.

    Args:
        path: a result file (schema version 1 or 2), rewritten atomically.
        method: ``deconvnet``, ``guided`` or ``gradient`` (see `patchmine.projections`).
        layers: the file's layers to project (default: all); the others are left without
            projections (recorded as the root attribute ``projection_layers``).
        batch_size, workers, device: how the winner images are re-read and re-forwarded.
        progress: show a tqdm bar.

    Returns:
        A one-line summary.

    Raises:
        UsageError: not a (complete) result file, an unknown method, a model or weights that
            cannot be rebuilt, or winner images that are gone or changed.
    """
    import torch

    from patchmine.contents import projection_attrs
    from patchmine.corpus import Corpus
    from patchmine.interrupts import StopFlag
    from patchmine.mine import _default_workers
    from patchmine.models import load_model
    from patchmine.patches import ScoreMismatch, second_pass, winner_files
    from patchmine.projections import Projector, check_method
    from patchmine.taps import Tap, select_layers

    t0 = time.perf_counter()
    method = check_method(method)
    if method is None:
        raise UsageError("--method none computes nothing; use deconvnet, guided or gradient")
    if batch_size < 1:
        raise UsageError(f"batch size must be at least 1, got {batch_size}")
    path = Path(path)
    try:
        with store.open_result(path) as r:
            settings, plans = _read(r)
    except UsageError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as e:  # truncated or damaged HDF5
        why = (str(e).splitlines() or [""])[0]
        raise UsageError(f"{path} is damaged or truncated ({type(e).__name__}: {why})") from None
    every = list(dict.fromkeys(p.name for p in plans))
    if layers:
        unknown = [n for n in layers if n not in every]
        if unknown:
            raise UsageError(
                f"{path} has no layer {', '.join(unknown)} (it has {', '.join(every)})"
            )
        plans = [p for p in plans if p.name in layers]
    store.check_writable(path, force=True)
    corpus = Corpus(settings["roots"], settings["paths"], settings["root_index"])
    s = settings["input_size"]
    lm = load_model(settings["model"], _weights_arg(settings["model"], settings["weights"]), s)
    if not (
        np.allclose(lm.mean, settings["mean"], rtol=0, atol=1e-6)
        and np.allclose(lm.std, settings["std"], rtol=0, atol=1e-6)
    ):
        raise UsageError(
            f"model {settings['model']} now normalizes with mean {lm.mean}, std {lm.std}; the "
            f"file was mined with {settings['mean']}, {settings['std']}"
        )
    names = list(dict.fromkeys(p.name for p in plans))
    chosen = select_layers(lm.module, s, names)
    for p in plans:
        f = chosen.fields[p.name]
        same = (f.size, f.stride, f.offset, f.whole) == (
            p.field.size,
            p.field.stride,
            p.field.offset,
            p.field.whole,
        )
        if not same or tuple(chosen.fmap_hw(p.name)) != p.fmap_hw:
            raise UsageError(
                f"layer {p.name} of model {settings['model']} is not the one mined into {path} "
                "(its receptive field or map size differs): the model changed"
            )
    dev = torch.device(device)
    lm.module.to(dev)
    tap = Tap(lm.module, names, lm.mean, lm.std, chosen.views).to(dev).eval()
    projector = Projector(
        lm.module, names, lm.mean, lm.std, method, max_rows=batch_size, views=chosen.views
    )
    fill = tuple(int(round(m * 255)) for m in lm.mean)
    scratch = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".scratch", dir=path.parent))
    try:
        with StopFlag() as stop:
            try:
                cut = second_pass(
                    tap,
                    corpus,
                    s,
                    plans,
                    fill,
                    scratch,
                    batch_size,
                    _default_workers() if workers is None else workers,
                    dev,
                    progress,
                    stop,
                    resize=settings["resize"],
                    jpeg_draft=settings["jpeg_draft"],
                    projector=projector,
                )
            except ScoreMismatch as e:
                raise UsageError(f"cannot project {path}: {e}") from None
            cut_layers = {
                p.key: (cut[p.key][2], projection_attrs(projector, p.name)) for p in plans
            }
            subset = names if len(names) < len(every) else None  # in the file's order
            root = {"projection": method, "projection_layers": subset}
            store.replace_projections(path, root, cut_layers, stop)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    winners = len(np.unique(winner_files(corpus, plans)[1]))
    return (
        f"added {method} projections to {path} ({len(names)} layers, {winners} winner images, "
        f"{time.perf_counter() - t0:.1f}s)"
    )
