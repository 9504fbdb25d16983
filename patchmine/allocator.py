"""The C allocator of the patchmine command: keep freed batch buffers for the next batch.

Public names: tune_allocator, allocator_setting, applied_settings, ENV, TUNED.

PyTorch's CPU tensors come from the C library's ``malloc``. glibc serves blocks over its mmap
threshold (at most 32 MB) with ``mmap`` and gives them back with ``munmap`` when freed, so every
batch's activation buffers are faulted in afresh, page by page, by the next batch (on a 2-core
machine the embedded model spent more time in the kernel than in its convolutions). With
``mallopt`` the process instead serves every block from its heap (``M_MMAP_MAX`` 0) and keeps up to
``M_TRIM_THRESHOLD`` of freed memory for reuse, growing the heap ``M_TOP_PAD`` at a time.

This is an application configuring its own process: the ``patchmine`` command (and
``python -m patchmine``, each torchrun rank) calls :func:`tune_allocator` before any tensor exists;
importing patchmine or calling its functions changes nothing. Library users opt in with
``patchmine.tune_allocator()``. ``PATCHMINE_MALLOC=default`` turns it off; it is a no-op where the C
library is not glibc (musl, macOS, Windows). The settings change where memory comes from, never a
value: results are bit-identical either way.
"""

from __future__ import annotations

import ctypes
import os
import platform

__all__ = ["tune_allocator", "allocator_setting", "applied_settings", "ENV", "TUNED"]

ENV = "PATCHMINE_MALLOC"

# mallopt parameter numbers (glibc's malloc.h)
_PARAMS = {"trim_threshold": -1, "top_pad": -2, "mmap_threshold": -3, "mmap_max": -4}

# Measured on the embedded model, 2 cores (docs/benchmarks.md): no mmap, keep up to 1 GiB of freed
# memory, grow the heap 64 MiB at a time.
TUNED = {"mmap_max": 0, "trim_threshold": 1 << 30, "top_pad": 64 << 20}

_applied: dict[str, int] | None = None  # what tune_allocator set in this process


def _parse(text: str) -> dict[str, int]:
    """``"mmap_max=0,top_pad=64M"`` -> settings (K, M, G suffixes are powers of 1024)."""
    out = {}
    for item in text.split(","):
        key, _, value = item.strip().partition("=")
        key = key.strip()
        if key not in _PARAMS or not value.strip():
            raise ValueError(
                f"{ENV}: expected default, tuned or name=value pairs among "
                f"{', '.join(_PARAMS)}, got {text!r}"
            )
        value = value.strip().upper()
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(value[-1:], 1)
        out[key] = int(value[:-1] if scale > 1 else value) * scale
    return out


def _describe(settings: dict[str, int]) -> str:
    def size(v: int) -> str:
        for unit, s in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
            if v >= s and v % s == 0:
                return f"{v // s}{unit}"
        return str(v)

    return "glibc mallopt " + ",".join(f"{k}={size(v)}" for k, v in settings.items())


def _glibc_mallopt():
    """glibc's ``mallopt``, or None where the C library is another one."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - glibc has it, musl does not
        fn = libc.mallopt
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return fn


def tune_allocator(settings: dict[str, int] | None = None) -> str:
    """Configure glibc's malloc for streaming batches (see the module docstring).

    Call it at the start of a process, before large tensors exist; DataLoader workers forked later
    inherit it (patchmine's own loader also applies it in spawned workers). Honors
    ``PATCHMINE_MALLOC``: ``default`` leaves malloc alone, ``tuned`` (or unset) applies
    :data:`TUNED`, ``name=value,...`` applies those settings (mmap_max, mmap_threshold,
    trim_threshold, top_pad).

    Args:
        settings: explicit settings (override the environment); default :data:`TUNED`.

    Returns:
        What malloc now runs with, as recorded in result files (``allocator`` attribute):
        ``"default"`` when nothing was changed.

    Raises:
        ValueError: a malformed ``PATCHMINE_MALLOC``.
    """
    global _applied
    env = os.environ.get(ENV, "").strip()
    if settings is None:
        if env.lower() in ("default", "off", "0", "none"):
            return allocator_setting()
        settings = TUNED if env.lower() in ("", "tuned", "on", "1") else _parse(env)
    mallopt = _glibc_mallopt()
    if mallopt is None or not settings:
        return allocator_setting()
    for key, value in settings.items():
        if not mallopt(_PARAMS[key], int(value)):
            raise ValueError(f"mallopt refused {key}={value}")
    _applied = dict(settings)
    return allocator_setting()


def allocator_setting() -> str:
    """What :func:`tune_allocator` set in this process, or ``"default"`` if it did not run."""
    return _describe(_applied) if _applied else "default"


def applied_settings() -> dict[str, int] | None:
    """The settings :func:`tune_allocator` applied in this process (None: malloc's defaults);
    a DataLoader worker started by spawn re-applies them (a forked one inherits them)."""
    return dict(_applied) if _applied else None
