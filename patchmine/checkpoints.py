"""Checkpoints: a run's resumable state on disk, saved atomically and loaded safely.

Public names: CHECKPOINT_VERSION, checkpoint_path, save_checkpoint, load_checkpoint, load_plain,
check_resumable.

A checkpoint holds plain data only (tensors, arrays, numbers, strings) and a digest of it; loading
uses ``torch.load(weights_only=True)``, so a file crafted to run code on load is refused. A run
resumes only from a checkpoint whose settings (its ``meta``) equal its own.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from pathlib import Path

import numpy as np

from patchmine.errors import UsageError, differences
from patchmine.outputs import atomic, write_error

__all__ = [
    "CHECKPOINT_VERSION",
    "checkpoint_path",
    "save_checkpoint",
    "load_checkpoint",
    "load_plain",
    "check_resumable",
]

CHECKPOINT_VERSION = 1


def checkpoint_path(out: Path) -> Path:
    """``OUT.ckpt``: where the run writing ``out`` saves its state (one per rank under torchrun:
    `patchmine.distributed.Team.checkpoint_path`)."""
    return out.with_name(out.name + ".ckpt")


def check_resumable(source: str, saved: dict, now: dict) -> None:
    """Refuse to resume from ``source`` when its settings ``saved`` differ from ``now``'s,
    naming each difference (the corpus by its file list)."""
    diff = differences(saved, now)
    if diff:
        what = "; ".join(
            f"{key}: checkpoint {saved.get(key)!r}, now {now[key]!r}"
            for key in diff
            if key != "corpus"
        )
        if "corpus" in diff:
            what = "the corpus file list differs" + (f"; {what}" if what else "")
        raise UsageError(
            f"cannot resume from {source}: {what}. Run with the same settings, or delete the "
            "checkpoint (or pass --force) to start over"
        )


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Atomically save a run's resumable state (tensors, arrays, plain values)."""
    import torch

    path = Path(path)
    buf = io.BytesIO()  # torch.save turns a failed write (full disk) into an opaque RuntimeError
    state = {"checkpoint_version": CHECKPOINT_VERSION, **state}
    torch.save({**state, "digest": _digest(state)}, buf)
    try:
        with atomic(path, ".ckpt-tmp") as tmp:
            tmp.write_bytes(buf.getbuffer())
    except OSError as e:
        raise write_error(path, e) from e


def _digest(obj) -> str:
    """A SHA-256 over a state's contents (dicts, sequences, tensors, arrays, plain values)."""
    import torch

    h = hashlib.sha256()

    def feed(o) -> None:
        if isinstance(o, dict):
            h.update(b"{%d" % len(o))
            for key in sorted(o, key=str):
                feed(str(key))
                feed(o[key])
        elif isinstance(o, (list, tuple)):
            h.update(b"[%d" % len(o))
            for v in o:
                feed(v)
        elif isinstance(o, torch.Tensor):
            feed(o.detach().cpu().contiguous().numpy() if o.dtype != torch.bfloat16 else o.float())
        elif isinstance(o, np.ndarray):
            h.update(f"a{o.dtype.str}{o.shape}".encode())
            h.update(np.ascontiguousarray(o).tobytes() if o.dtype != object else repr(o).encode())
        else:
            h.update(f"{type(o).__name__}:{o!r}".encode("utf-8", "backslashreplace"))

    feed(obj)
    return h.hexdigest()


def load_plain(path: str | os.PathLike, what: str = "checkpoint", hint: str = ""):
    """``torch.load`` of a file that may only hold tensors and plain values (``weights_only``).

    A file that names anything else (a class, a function: what a crafted pickle calls to run code
    on load) is refused before any of it runs.

    Args:
        path: the file. what: how messages name it. hint: what the user can do, ending them.

    Raises:
        UsageError: such a file ("refused", naming what it calls), or an unreadable one ("damaged").
    """
    import pickle
    import warnings

    import torch

    path = Path(path)
    try:
        # scoped: torch warns about the pickle protocol of a damaged file; our error says enough
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        found = (
            re.search(r"GLOBAL (\S+)", str(e)) if isinstance(e, pickle.UnpicklingError) else None
        )
        if found:
            why = (
                f"is refused: it names {found.group(1)}, which loading would call (only tensors "
                "and plain values are loaded)"
            )
        else:
            why = f"is damaged ({type(e).__name__})"
        raise UsageError(f"{what} {path} {why}{hint}") from None


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint; a damaged one, or one that would run code on load, is refused clearly."""
    path = Path(path)
    state = load_plain(path, "checkpoint", "; delete it to start over")
    if not isinstance(state, dict) or state.get("checkpoint_version") != CHECKPOINT_VERSION:
        raise UsageError(f"checkpoint {path} is not a patchmine checkpoint of this version")
    missing = [key for key in ("meta", "cursor") if key not in state]
    if missing or not isinstance(state["meta"], dict):
        raise UsageError(f"checkpoint {path} is damaged (no {', '.join(missing) or 'meta'})")
    digest = state.pop("digest", None)
    if digest is not None and digest != _digest(state):  # torch.load does not check tensor data
        raise UsageError(
            f"checkpoint {path} is damaged (checksum mismatch); delete it to start over"
        )
    return state
