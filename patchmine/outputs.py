"""Output files: refused early when they cannot be written, written atomically, failures in one line.

Public names: WriteError, write_error, check_writable, atomic.

`atomic` gives a temporary file beside the target, renamed over it only when complete, so a reader
sees a whole file or none; result files (`patchmine.store`) and checkpoints
(`patchmine.checkpoints`) are written through it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

from patchmine.errors import UsageError

__all__ = ["WriteError", "write_error", "check_writable", "atomic"]


class WriteError(OSError):
    """A result or checkpoint could not be written: the disk is full, a size limit, an I/O error.

    ``stuck`` is true when HDF5 could not let go of the abandoned file (it may crash the process
    at exit: a command-line program should report the error and leave with ``os._exit``).
    """

    stuck = False


_DISK_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


def write_error(path: Path, e: BaseException) -> WriteError:
    """The first errno in ``e``'s chain, as one line naming ``path`` (h5py hides it in the text)."""
    cause: BaseException | None = e
    while cause is not None:
        code = cause.errno if isinstance(cause, OSError) else None
        if code is None:  # h5py: "... errno = 28, error message = 'No space left' ..."
            found = re.search(r"errno = (\d+),", str(cause))
            code = int(found.group(1)) if found else None
        if code:
            why = os.strerror(code)
            if code in _DISK_FULL:
                why += " (the disk is full, or a quota or file-size limit was hit)"
            return WriteError(code, f"cannot write {path}: {why}")
        cause = cause.__cause__ or cause.__context__
    text = str(e).splitlines()[0] if str(e) else ""
    return WriteError(errno.EIO, f"cannot write {path}: {type(e).__name__}: {text}")


def check_writable(
    path: str | os.PathLike,
    force: bool = False,
    resume: bool = False,
    *,
    create: bool = False,
    resumable: bool = True,
) -> Path:
    """Refuse early (before any work) an output that cannot or must not be written.

    Args:
        path: the output file.
        force: an existing file may be overwritten.
        resume: the run continues a checkpoint (an existing file is still refused without force).
        create: a missing output folder is accepted where it can be made (the nearest existing
            folder above it takes new files); the caller makes it before it writes.
        resumable: the command has ``--resume`` (the "output exists" message mentions it).
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    where = folder
    if not folder.is_dir():
        if not create or folder.exists():
            what = "is not a folder" if folder.exists() else "does not exist"
            raise UsageError(f"output folder {what}: {folder}")
        where = next((p for p in folder.parents if p.exists()), Path("."))
        if not where.is_dir():
            raise UsageError(f"cannot create output folder {folder}: {where} is not a folder")
    try:  # os.access says yes to root, and knows nothing of read-only mounts or ACLs
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=where)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        why = {
            errno.EACCES: "permission denied",
            errno.EPERM: "permission denied",
            errno.EROFS: "a read-only file system",
        }.get(e.errno, "it takes no new files")
        raise UsageError(f"output folder is not writable: {where} ({why})") from None
    if path.is_dir():
        raise UsageError(f"output is a folder, expected a file path: {path}")
    if path.exists() and not force:
        hint = " (--resume continues an interrupted run)" if resumable and not resume else ""
        raise UsageError(f"output exists: {path}; pass --force to overwrite{hint}")
    return path


@contextlib.contextmanager
def atomic(path: Path, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary path beside ``path``, fsynced and renamed over it when the block completes;
    removed when the block raises."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent or ".")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a result file is as readable as any other
    try:
        yield Path(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:  # on disk before it has the final name (a crash must not leave an empty result)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
