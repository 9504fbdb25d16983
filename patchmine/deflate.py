"""Writing gzip-compressed HDF5 datasets row by row, compressed on several threads.

Public names: `write_rows`.

HDF5 runs its filters under a global lock, so h5py compresses one chunk at a time; on a result
file most of the write is that compression (patch sheets of natural images). `write_rows` deflates
whole chunks with ``zlib`` on a few threads (zlib releases the GIL) and stores them with
``write_direct_chunk``, in order: the bytes are those HDF5's own gzip filter would write (the
same ``compress2`` at the same level), and any HDF5 reader sees an ordinary gzip dataset.
"""

from __future__ import annotations

import os
import zlib
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

import h5py
import numpy as np

__all__ = ["write_rows"]


def _threads() -> int:
    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1))


def write_rows(
    ds: h5py.Dataset,
    rows: Iterable[tuple[int, np.ndarray]],
    should_stop: Callable[[], bool] = lambda: False,
) -> None:
    """Write ``(i, value)`` rows into ``ds[i]``: a dataset chunked one row per chunk, with gzip
    as its only filter. Raises KeyboardInterrupt between rows once ``should_stop()`` is true."""
    one_row = ds.chunks is not None and ds.chunks == (1, *ds.shape[1:])
    if not one_row or ds.compression != "gzip" or ds.shuffle or ds.fletcher32 or ds.scaleoffset:
        raise ValueError(f"{ds.name}: write_rows needs gzip alone and one chunk per row")
    level, zeros = int(ds.compression_opts), (0,) * (ds.ndim - 1)

    def deflate(value: np.ndarray) -> bytes:  # HDF5 keeps it even when it grew: so do we
        raw = np.ascontiguousarray(value, dtype=ds.dtype)
        if raw.shape != ds.shape[1:]:
            raise ValueError(f"{ds.name}: a row of shape {raw.shape}, want {ds.shape[1:]}")
        return zlib.compress(raw, level)

    def store(i: int, job) -> None:
        ds.id.write_direct_chunk((i, *zeros), job.result())

    threads = _threads()
    pending: deque = deque()
    with ThreadPoolExecutor(threads) as pool:
        for i, value in rows:
            if should_stop():
                raise KeyboardInterrupt
            pending.append((i, pool.submit(deflate, value)))
            if len(pending) >= 2 * threads:  # a bounded window: a few rows in memory
                store(*pending.popleft())
        while pending:
            store(*pending.popleft())
