"""Compiled loops for what no torch op does in one read (numba; imported on first use).

Public names: `reduce_rows`, `first_max`.
"""

from __future__ import annotations

import functools
import os
import threading

import numba
import numpy as np

__all__ = ["reduce_rows", "first_max"]

_lock = threading.Lock()  # numba's workqueue layer runs one parallel loop at a time


def _rows(x, bits, offset, step, key, total, sumsq, grid):
    for r in numba.prange(x.shape[0]):
        row, b = x[r], bits[r]
        m = np.int32(-(2**31))
        s = np.float32(0.0)
        q = np.float32(0.0)
        for i in range(x.shape[1]):
            v = row[i]
            k = b[i] ^ ((b[i] >> 31) & np.int32(0x7FFFFFFF))
            m = k if k > m else m
            s += v
            q += v * v
        key[r], total[r], sumsq[r] = m, s, q
        for j in range(grid.shape[1]):
            grid[r, j] = row[offset + j * step]


def _first(x, rows, target, loc, score):
    L = x.shape[1]
    for j in numba.prange(rows.shape[0]):
        row = x[rows[j]]
        t = target[j]
        i = 0
        while i < L and row[i] != t:
            i += 1
        if i == L:  # t is not in the row: its first max instead
            i = 0
            for p in range(1, L):
                if row[p] > row[i]:
                    i = p
        loc[j] = i
        score[j] = row[i]


_OPTIONS = dict(nogil=True, boundscheck=False)
_FAST = {"reassoc", "contract"}


def _compile(fn, **options):
    options = dict(parallel=True, **_OPTIONS, **options)
    try:
        return numba.njit(cache=True, **options)(fn)
    except RuntimeError:  # nowhere to keep the compiled code: compile it in every process
        return numba.njit(**options)(fn)


_parallel = {"rows": _compile(_rows, fastmath=_FAST), "first": _compile(_first)}


@functools.cache
def _serial() -> dict:
    """The same loops on the calling thread (prange runs as range; bit-identical results).

    Not cached on disk: numba's cache would not tell them from the parallel ones.
    """
    return {
        "rows": numba.njit(fastmath=_FAST, **_OPTIONS)(_rows),
        "first": numba.njit(**_OPTIONS)(_first),
    }


def _run(name: str, threads: int, *args) -> None:
    with _lock:
        if _pool_is_fast():
            numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
            _parallel[name](*args)
        else:
            _serial()[name](*args)


@functools.cache
def _pool_is_fast() -> bool:
    """Whether numba's threading layer is an OpenMP or TBB pool (the layer loads here).

    Without either (e.g. no libgomp on the system), numba falls back to its "workqueue" layer,
    which hands every loop to its own threads, even with one: after a torch forward it measured
    slower (9 ms per AlexNet batch) than the calling thread alone (6 ms; OpenMP: 4 ms).

    numba's OpenMP layer loads the system libgomp, a runtime apart from torch's, and it reads
    OMP_WAIT_POLICY as it loads. Unless the user set it, it loads passive: its threads sleep
    after each loop instead of spinning through the next forward (first pass 0.97 -> 0.98 of
    the forward alone). The variable is restored at once; torch's runtime keeps its setting.
    """
    one = np.zeros((1, 1), np.float32)
    ours = "OMP_WAIT_POLICY" not in os.environ
    if ours:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    try:
        _parallel["first"](one, np.zeros(1, np.int64), one[0], np.empty(1, np.int64), one[0].copy())
    finally:
        if ours:
            del os.environ["OMP_WAIT_POLICY"]
    return numba.threading_layer() != "workqueue"


def reduce_rows(
    x: np.ndarray,
    offset: int,
    step: int,
    key: np.ndarray,
    total: np.ndarray,
    sumsq: np.ndarray,
    grid: np.ndarray,
    threads: int,
) -> None:
    """Reduce each row of ``x`` (R, L) float32 C-contiguous into the (R,) and (R, S) outputs.

    ``key``: the row's max as an int32 that orders like the float (``bits ^ ((bits >> 31) &
    0x7FFFFFFF)``, its own inverse; an integer max vectorizes, a float max with NaN semantics
    does not); ``total``, ``sumsq``: float32 sum and sum of squares; ``grid[r, j] = x[r, offset +
    j * step]``. Each row is reduced start to end by one of ``threads`` threads, in an order set
    by L alone, so every number is a function of its row.
    """
    _run("rows", threads, x, x.view(np.int32), offset, step, key, total, sumsq, grid)


def first_max(
    x: np.ndarray,
    rows: np.ndarray,
    target: np.ndarray,
    loc: np.ndarray,
    score: np.ndarray,
    threads: int,
) -> None:
    """For each j, the first location of ``x[rows[j]]`` holding ``target[j]`` (its max) into
    ``loc[j]``, and that value into ``score[j]``; the first max where the row lacks ``target``.

    Reads each row up to its max, once, instead of `torch.argmax` over a gathered copy.
    """
    _run("first", threads, x, rows, target, loc, score)
