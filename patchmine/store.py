"""Result files (HDF5 schema version 2) and checkpoints: the only module that touches h5py.

Public names: FORMAT, VERSION, LayerData, layer_data, class_state_arrays, label_table, run_attrs,
image_table, write_result, replace_projections, Result, LayerResult, open_result, save_checkpoint,
load_checkpoint, load_plain, check_writable, WriteError.

Every write is atomic: data goes to a temporary file beside the target, which is renamed over it only
when complete, so a reader sees a whole file or none.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np

from patchmine.errors import UnknownNameError, UsageError, nearest

if TYPE_CHECKING:
    from patchmine.corpus import Corpus
    from patchmine.models import LoadedModel
    from patchmine.patches import LayerPlan
    from patchmine.receptive import Field

__all__ = [
    "FORMAT",
    "VERSION",
    "LayerData",
    "layer_data",
    "class_state_arrays",
    "label_table",
    "run_attrs",
    "image_table",
    "write_result",
    "replace_projections",
    "Result",
    "LayerResult",
    "open_result",
    "save_checkpoint",
    "load_checkpoint",
    "load_plain",
    "check_writable",
    "WriteError",
]

FORMAT = "patchmine"
VERSION = 2  # v2: /thumbs and patch_ref (whole-field nodes), border_share, min_inside, layouts
READS = (1, 2)  # the schema versions this patchmine reads
CHECKPOINT_VERSION = 1
_STR = h5py.string_dtype("utf-8")
# gzip level of the patch datasets and /thumbs. Measured on 60 photos (_blocks.4.add,
# _blocks.10.add, the _fc thumbs): level 1 gives 14.6 MB in 0.9 s, level 4 14.6 MB in 1.1 s, level 9
# 14.4 MB in 2.4 s (uncompressed 34.4 MB): photographs gain nothing from the slower levels.
_GZIP = 1


@dataclass
class LayerData:
    """Everything one layer contributes to a result file.

    ``patch`` (C, k, P, P, 3) uint8 and ``heat`` (C, k, H, W) float16 may be memory maps (or
    scratch arrays): they are copied one channel at a time. v2, each optional: ``bottom`` the
    bottom-k entries (a LayerData whose attrs and statistics are not written), ``class_mean``
    (C, L), ``selectivity`` (C,) and ``class_state`` (`class_state_arrays`, what merge and resume
    need), ``projection`` (C, k, P, P, 3) float16 (indexable by channel) with its dataset
    attributes ``projection_attrs``.
    """

    attrs: dict
    score: np.ndarray
    image: np.ndarray
    yx: np.ndarray
    box: np.ndarray
    box_orig: np.ndarray
    patch: np.ndarray
    heat: np.ndarray
    stats: dict[str, np.ndarray]
    stats_state: dict[str, np.ndarray] = field(default_factory=dict)
    bottom: LayerData | None = None
    class_mean: np.ndarray | None = None
    selectivity: np.ndarray | None = None
    class_state: dict[str, np.ndarray] = field(default_factory=dict)
    projection: np.ndarray | None = None
    projection_attrs: dict = field(default_factory=dict)


def class_state_arrays(state: dict) -> dict[str, np.ndarray]:
    """A `patchmine.labels.ClassMeans` state dict as the arrays ``class_state/`` holds (scalars
    as 0-d arrays); ``LayerResult.class_state`` reads them back in the same form."""
    out = {}
    for key, v in state.items():
        v = v.numpy() if hasattr(v, "numpy") else np.asarray(v)
        out[key] = v.astype(np.int64) if v.dtype.kind in "iub" else v
    return out


def label_table(names: list[str], label: np.ndarray, ok: np.ndarray) -> dict:
    """``/labels`` of a file holding images with ``label`` (-1: none) and ``ok`` (decoded):
    ``names`` and ``count``, the decoded images of each label (those its class means average)."""
    lab = np.asarray(label, np.int64)
    used = lab[(lab >= 0) & np.asarray(ok, bool)]
    return {"names": list(names), "count": np.bincount(used, minlength=len(names)).astype(np.int64)}


def layer_data(
    plan: LayerPlan,
    patch: np.ndarray,
    heat: np.ndarray,
    stats: dict[str, np.ndarray],
    stats_state: dict[str, np.ndarray],
    transform: np.ndarray,
    start: int = 0,
) -> LayerData:
    """One mined layer as the file holds it: its winners' boxes (model input and original image).

    Args:
        plan: the layer's winners (score, image, yx, field), image indices global to the corpus.
        patch, heat: (C, k, P, P, 3) and (C, k, H, W) from the second pass.
        stats, stats_state: the layer's statistics and their mergeable state, as numpy arrays.
        transform: (N, 3) every corpus image's transform (see ``/images/transform``).
        start: the first image of this file (a shard's ``shard_start``); indices become local.
    """
    from patchmine.receptive import boxes, to_original  # torch: only writers pay for it

    used = plan.image >= 0
    bx = boxes(plan.field, plan.yx).astype(np.int32)
    bx[~used] = 0
    bo = np.full(bx.shape, np.nan, dtype=np.float32)
    bo[used] = to_original(bx[used], transform[plan.image[used]])
    f = plan.field
    return LayerData(
        attrs={
            "channels": plan.score.shape[0],
            "fmap_hw": list(plan.fmap_hw),
            "rf_size": list(f.size),
            "rf_stride": list(f.stride),
            "rf_offset": list(f.offset),
            "rf_whole": bool(f.whole),
            "patch_size": plan.patch_size,
            **_layout_attrs(f),
        },
        score=plan.score,
        image=np.where(used, plan.image - start, -1),
        yx=plan.yx,
        box=bx,
        box_orig=bo,
        patch=patch,
        heat=heat,
        stats=stats,
        stats_state=stats_state,
    )


def _layout_attrs(f: Field) -> dict:
    """Schema v2 layer attrs: the layout, the token grid and prefix tokens, each unit's own patch."""
    attrs: dict = {"layout": f.layout}
    if f.grid is not None:
        attrs["token_grid"] = list(f.grid)
    if f.prefix:
        attrs["prefix_tokens"] = f.prefix
    if f.unit is not None:
        attrs.update(
            token_rf_size=list(f.unit.size),
            token_rf_stride=list(f.unit.stride),
            token_rf_offset=list(f.unit.offset),
        )
    return attrs


def run_attrs(
    model: LoadedModel,
    corpus: Corpus,
    *,
    layers: list[str],
    input_size: int,
    resize: int,
    jpeg_draft: bool,
    k: int,
    per_image: int,
    rows: range,
    n_failed: int,
    shard: tuple[int, int] | None = None,
    min_inside: float | None = None,
) -> dict:
    """The root attributes of a run's result file (``rows``: the corpus images it holds)."""
    import datetime as _dt

    import torch
    import torchvision

    import patchmine
    from patchmine.allocator import allocator_setting

    attrs = {
        "model": model.name,
        "weights": model.weights,
        "input_size": input_size,
        "resize": resize,
        "jpeg_draft": jpeg_draft,
        "mean": list(model.mean),
        "std": list(model.std),
        "k": k,
        "per_image": per_image,
        "n_images": len(rows),
        "n_failed": n_failed,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "patchmine_version": patchmine.__version__,
        "torch_version": torch.__version__,
        "torchvision_version": torchvision.__version__,
        "corpus_roots": list(corpus.roots),
        "layer_order": list(layers),
        "corpus_fingerprint": corpus.fingerprint(),
        "n_corpus": len(corpus),
        "shard_start": rows.start,
        "allocator": allocator_setting(),
    }
    if shard is not None:
        attrs["shard"] = list(shard)
    if min_inside is not None:
        attrs["min_inside"] = float(min_inside)
    return attrs


def image_table(corpus: Corpus, records: dict, rows: range) -> dict:
    """``/images`` for the corpus images ``rows``: paths and roots from the corpus, the rest from
    ``records`` (``shape``, ``ok``, ``transform``, ``error``, and ``label`` with --labels, one
    entry per corpus image)."""
    sl = slice(rows.start, rows.stop)
    keys = ("shape", "ok", "transform", "error") + (("label",) if "label" in records else ())
    return {
        "path": list(corpus.paths[sl]),
        "root": np.asarray(corpus.root_index[sl]),
        **{key: records[key][sl] for key in keys},
    }


class WriteError(OSError):
    """A result or checkpoint could not be written: the disk is full, a size limit, an I/O error.

    ``stuck`` is true when HDF5 could not let go of the abandoned file (it may crash the process
    at exit: a command-line program should report the error and leave with ``os._exit``).
    """

    stuck = False


_DISK_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


def _write_error(path: Path, e: BaseException) -> WriteError:
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
def _atomic(path: Path, suffix: str = ".tmp") -> Iterator[Path]:
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


def _set_attrs(obj: h5py.HLObject, attrs: dict) -> None:
    for key, value in attrs.items():
        if isinstance(value, str):
            obj.attrs.create(key, value, dtype=_STR)
        elif isinstance(value, (list, tuple)) and value and isinstance(value[0], str):
            obj.attrs.create(key, list(value), dtype=_STR)
        else:
            obj.attrs[key] = value


def write_result(
    path: str | os.PathLike,
    attrs: dict,
    images: dict[str, np.ndarray],
    layers: dict[str, LayerData],
    should_stop: Callable[[], bool] = lambda: False,
    labels: dict | None = None,
) -> Path:
    """Write a complete result file atomically.

    Args:
        attrs: root attributes (format and version are added).
        images: ``path`` (N,) str, ``root`` (N,) int16, ``shape`` (N,2), ``ok`` (N,), ``transform``
            (N,4), ``error`` (N,) str; with labels also ``label`` (N,) int32.
        layers: node name -> LayerData.
        labels: `label_table` (``/labels/names`` and ``/labels/count``), with --labels.
        should_stop: checked between channels; when true, the write is abandoned (nothing appears
            at ``path``) and KeyboardInterrupt raised.

    Raises:
        WriteError: the file could not be written (disk full, ...); nothing is left behind.
    """
    path = Path(path)
    closed = True
    try:
        with _atomic(path) as tmp:
            # HDF5 1.8 object headers (attributes over 64 KiB), nothing newer than 1.10: with
            # "latest", HDF5 2.0 encodes bool and float16 in forms 1.10-era tools cannot read
            f = h5py.File(tmp, "w", libver=("v108", "v110"))
            fd = f.id.get_vfd_handle()
            try:
                _write_file(f, attrs, images, layers, should_stop, labels)
                f.flush()  # a full disk shows here, while the file can still be abandoned cleanly
                f.close()
            except BaseException:
                closed = _abandon(f, fd, tmp)
                raise
    except (OSError, RuntimeError) as e:  # h5py reports a failed flush as RuntimeError
        if isinstance(e, RuntimeError) and "errno = " not in str(e):
            raise
        err = _write_error(path, e)
        err.stuck = not closed
        raise err from e
    return path


def _abandon(f: h5py.File, fd: int, tmp: Path) -> bool:
    """Close a file that will be deleted, after a failed write (a full disk) or an interruption.

    Returns False when HDF5 could not close it: after a failed write it retries the flush whenever
    an object of the file is released, and at exit, where it can crash the process (the CLI exits
    at once instead; see ``WriteError.stuck``). Pointing the descriptor at /dev/null lets the
    retried writes succeed and go nowhere (a file-size limit still fails the final truncation).
    """
    try:
        ours = os.path.samestat(os.fstat(fd), os.stat(tmp))
    except OSError:  # closed by a failed close, and HDF5 still writes to that number
        ours = True
    if ours:
        null = os.open(os.devnull, os.O_WRONLY)
        if null != fd:
            os.dup2(null, fd)
            os.close(null)
    try:
        f.close()
    except Exception:  # noqa: BLE001 - the write's own error is the one to report
        return False
    return True


def _write_file(f: h5py.File, attrs, images, layers, should_stop, labels=None) -> None:
    from patchmine.corpus import printable  # corpus pulls in torch: only writers pay for it

    _set_attrs(f, {"format": FORMAT, "version": VERSION, **attrs})
    g = f.create_group("images")
    g.create_dataset("path", data=[printable(p) for p in images["path"]], dtype=_STR)
    g.create_dataset("root", data=np.asarray(images["root"], dtype=np.int16))
    g.create_dataset("shape", data=np.asarray(images["shape"], dtype=np.int32).reshape(-1, 2))
    g.create_dataset("ok", data=np.asarray(images["ok"], dtype=bool))
    transform = np.asarray(images["transform"], dtype=np.float32)  # (N,4); (N,3) merged from old
    g.create_dataset(
        "transform", data=transform if transform.ndim == 2 else transform.reshape(-1, 4)
    )
    g.create_dataset("error", data=[printable(e) for e in images["error"]], dtype=_STR)
    if "label" in images:
        g.create_dataset("label", data=np.asarray(images["label"], dtype=np.int32))
    if labels is not None:
        lab = f.create_group("labels")
        lab.create_dataset("names", data=[printable(n) for n in labels["names"]], dtype=_STR)
        lab.create_dataset("count", data=np.asarray(labels["count"], dtype=np.int64))
    size = attrs.get("input_size")
    shared = _shared_patches(layers)
    with_bottom = [d for n in shared for d in (layers[n], layers[n].bottom) if d is not None]
    thumbs = _write_thumbs(f, with_bottom, should_stop) if shared else None
    lg = f.create_group("layers")
    for name, d in layers.items():
        ids = thumbs if name in shared else None
        _write_layer(lg.create_group(name), d, ids, size, should_stop)


def _shared_patches(layers: dict[str, LayerData]) -> list[str]:
    """The whole-field layers, whose patches go to ``/thumbs`` (every slot of one image holds the
    same whole-input patch): those with the patch shape of the first one."""
    whole = [n for n, d in layers.items() if d.attrs.get("rf_whole")]
    if not whole:
        return []
    shape = tuple(layers[whole[0]].patch.shape[2:])
    return [n for n in whole if tuple(layers[n].patch.shape[2:]) == shape]


def _write_thumbs(f: h5py.File, layers: list[LayerData], should_stop) -> np.ndarray:
    """``/thumbs``: one patch per distinct image of ``layers``, ordered by image index.

    Each patch is read from the first (layer, channel, slot) that holds its image, one channel at
    a time. Returns the (M,) image indices, ``/thumbs/image``.
    """
    ids = np.unique(np.concatenate([np.asarray(d.image).ravel() for d in layers]))
    ids = ids[ids >= 0]
    shape = (len(ids), *layers[0].patch.shape[2:])
    g = f.create_group("thumbs")
    g.create_dataset("image", data=ids.astype(np.int64))
    if not len(ids):
        g.create_dataset("patch", shape=shape, dtype=np.uint8)
        return ids
    patch = g.create_dataset(
        "patch", shape=shape, dtype=np.uint8, chunks=(1, *shape[1:]), **_gzip()
    )
    todo = np.ones(len(ids), bool)
    for d in layers:
        k = d.image.shape[1]
        flat = np.asarray(d.image).ravel()
        found, first = np.unique(flat, return_index=True)
        row = np.searchsorted(ids, found)
        new = (found >= 0) & todo[np.minimum(row, len(ids) - 1)]
        row, first = row[new], first[new]
        todo[row] = False
        order = np.argsort(first, kind="stable")  # channel by channel
        row, first = row[order], first[order]
        chans = first // k
        for c in np.unique(chans).tolist():
            if should_stop():
                raise KeyboardInterrupt
            patches = d.patch[c]
            for r, e in zip(row[chans == c].tolist(), first[chans == c].tolist(), strict=True):
                patch[r] = patches[e % k]
    return ids


def _gzip() -> dict:
    return {"compression": "gzip", "compression_opts": _GZIP}


def _border_share(d: LayerData, size: int | None) -> float | None:
    """The fraction of the used slots whose box crosses the input edge (NaN with none)."""
    if size is None:
        return None
    from patchmine.receptive import crosses_edge

    used = np.asarray(d.image) >= 0
    if not used.any():
        return float("nan")
    return float(crosses_edge(np.asarray(d.box)[used], (size, size)).mean())


def _write_layer(
    g: h5py.Group,
    d: LayerData,
    thumbs: np.ndarray | None,
    size: int | None,
    should_stop=lambda: False,
    entries: bool = False,
) -> None:
    """One layer; with ``thumbs`` (the ``/thumbs/image`` ids) its patches as ``patch_ref``;
    ``entries``: only the entry datasets (``bottom/``)."""
    if not entries:
        share = _border_share(d, size)
        _set_attrs(g, {**d.attrs, **({} if share is None else {"border_share": share})})
    g.create_dataset("score", data=np.asarray(d.score, dtype=np.float32))
    image = np.asarray(d.image, dtype=np.int64)
    g.create_dataset("image", data=image)
    g.create_dataset("yx", data=np.asarray(d.yx, dtype=np.int32))
    g.create_dataset("box", data=np.asarray(d.box, dtype=np.int32))
    g.create_dataset("box_orig", data=np.asarray(d.box_orig, dtype=np.float32))
    c = d.score.shape[0]
    patch = None
    if thumbs is None:
        patch = g.create_dataset(
            "patch", shape=d.patch.shape, dtype=np.uint8, chunks=(1, *d.patch.shape[1:]), **_gzip()
        )
    else:
        ref = np.searchsorted(thumbs, image).astype(np.int32)
        g.create_dataset("patch_ref", data=np.where(image >= 0, ref, np.int32(-1)))
    heat = g.create_dataset(
        "heat",
        shape=d.heat.shape,
        dtype=np.float16,
        chunks=(1, *d.heat.shape[1:]),
        compression="gzip",
        compression_opts=1,
    )
    proj = None
    if d.projection is not None:
        proj = _projection_dataset(g, d.projection.shape, d.projection_attrs)
    for ch in range(c):
        if should_stop():
            raise KeyboardInterrupt
        if patch is not None:
            patch[ch] = d.patch[ch]
        heat[ch] = d.heat[ch]
        if proj is not None:
            proj[ch] = d.projection[ch]
    if entries:
        return
    if d.bottom is not None:
        _write_layer(g.create_group("bottom"), d.bottom, thumbs, size, should_stop, entries=True)
    if d.class_mean is not None:
        g.create_dataset("class_mean", data=np.asarray(d.class_mean, dtype=np.float32))
        g.create_dataset("selectivity", data=np.asarray(d.selectivity, dtype=np.float32))
        cs = g.create_group("class_state")
        for key, value in d.class_state.items():
            cs.create_dataset(key, data=np.asarray(value))
    s = g.create_group("stats")
    for key, value in d.stats.items():
        if key == "q":
            continue
        ds = s.create_dataset(key, data=np.asarray(value))
        if key == "quantile":
            ds.attrs["q"] = np.asarray(d.stats["q"], dtype=np.float32)
    if d.stats_state:
        st = s.create_group("state")
        for key, value in d.stats_state.items():
            value = np.asarray(value)  # the (C, bins) histogram is mostly zeros: gzip
            st.create_dataset(key, data=value, **(_gzip() if value.ndim > 1 else {}))


def _projection_dataset(g: h5py.Group, shape: tuple, attrs: dict) -> h5py.Dataset:
    ds = g.create_dataset(
        "projection",
        shape=shape,
        dtype=np.float16,
        chunks=(1, *shape[1:]),
        compression="gzip",
        compression_opts=1,
    )
    _set_attrs(ds, attrs)
    return ds


def _copy_without(src: h5py.Group, dst: h5py.Group, skip: set[str]) -> None:
    """Copy ``src``'s attributes and members into ``dst``, leaving out the paths in ``skip``."""
    for key in src.attrs:  # with their stored types (utf-8 strings stay utf-8 strings)
        dst.attrs.create(key, src.attrs[key], dtype=src.attrs.get_id(key).dtype)
    for name, obj in src.items():
        if obj.name in skip:
            continue
        if isinstance(obj, h5py.Group) and any(p.startswith(obj.name + "/") for p in skip):
            _copy_without(obj, dst.create_group(name), skip)
        else:
            src.copy(obj, dst, name=name)


def replace_projections(
    path: str | os.PathLike,
    root_attrs: dict,
    layers: dict[str, tuple[object, dict]],
    should_stop: Callable[[], bool] = lambda: False,
) -> Path:
    """Rewrite a result file with new ``projection`` datasets, atomically.

    Everything else is copied as it is (HDF5 object copies: no data changes); existing projection
    datasets of the layers are dropped. The new file replaces ``path`` only when complete.

    Args:
        root_attrs: root attributes to set (or overwrite), e.g. ``projection``.
        layers: node name (``NAME/bottom`` for a bottom-k) -> (projection (C, k, P, P, 3)
            float16, indexable by channel; its dataset attributes). Others keep no projection.

    Raises:
        WriteError: the file could not be written; ``path`` is left as it was.
    """
    path = Path(path)
    closed = True
    try:
        with h5py.File(path, "r") as src, _atomic(path) as tmp:
            f = h5py.File(tmp, "w", libver=("v108", "v110"))
            fd = f.id.get_vfd_handle()
            try:
                skip = set()
                for name in src["layers"]:
                    for where in (f"/layers/{name}", f"/layers/{name}/bottom"):
                        if where in src:
                            skip.add(f"{where}/projection")
                _copy_without(src, f, skip)
                _set_attrs(f, root_attrs)
                for name, (proj, attrs) in layers.items():
                    ds = _projection_dataset(f["layers"][name], proj.shape, attrs)
                    for ch in range(proj.shape[0]):
                        if should_stop():
                            raise KeyboardInterrupt
                        ds[ch] = proj[ch]
                f.flush()
                f.close()
            except BaseException:
                closed = _abandon(f, fd, tmp)
                raise
    except (OSError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and "errno = " not in str(e):
            raise
        err = _write_error(path, e)
        err.stuck = not closed
        raise err from e
    return path


class LayerResult:
    """One mined layer of a result file; arrays come back as numpy.

    Attributes:
        name: the node name; channels, fmap_hw, rf_size, rf_stride, rf_offset, patch_size from attrs.
        score (C,k) float32, image (C,k) int64, yx (C,k,2) int32, box (C,k,4) int32,
        box_orig (C,k,4) float32: loaded on first access.
    """

    def __init__(self, result: Result, name: str, group: h5py.Group | None = None):
        self.result = result
        self.name = name
        self._layer_g = result.file["layers"][name]
        self._g = self._layer_g if group is None else group
        self.attrs = {k: _plain(v) for k, v in self._layer_g.attrs.items()}
        self.channels = int(self.attrs["channels"])
        self.k = int(self._g["score"].shape[1])
        self.patch_size = int(self.attrs["patch_size"])
        self._cache: dict[str, np.ndarray] = {}

    def _get(self, key: str) -> np.ndarray:
        if key not in self._cache:
            self._cache[key] = self._g[key][()]
        return self._cache[key]

    score = property(lambda self: self._get("score"))
    image = property(lambda self: self._get("image"))
    yx = property(lambda self: self._get("yx"))
    box = property(lambda self: self._get("box"))
    box_orig = property(lambda self: self._get("box_orig"))

    def patches(self, channel: int) -> np.ndarray:
        """(k, P, P, 3) uint8 patches of one channel, best first (also from ``patch_ref``: unused
        slots are then filled with the model's mean color, as ``patch`` stores them)."""
        if "patch" in self._g or "patch_ref" not in self._g:
            return self._g["patch"][channel]
        ref = self._g["patch_ref"][channel]
        thumbs = self.result.file["thumbs"]["patch"]
        out = np.empty((len(ref), *thumbs.shape[1:]), np.uint8)
        out[...] = [int(round(m * 255)) for m in self.result.attrs.get("mean", (0, 0, 0))]
        rows, where = np.unique(ref[ref >= 0], return_inverse=True)
        if len(rows):
            out[ref >= 0] = thumbs[rows.tolist()][where.reshape(-1)]
        return out

    def projection(self, channel: int) -> np.ndarray | None:
        """(k, P, P, 3) float32 projections of one channel's entries (v2, stored as float16), or
        None when the file has none. Aligned with :meth:`patches` pixel for pixel; 0 in unused
        slots."""
        if "projection" not in self._g:
            return None
        return self._g["projection"][channel].astype(np.float32)

    @property
    def projection_attrs(self) -> dict | None:
        """The projections' ``method`` (deconvnet, guided, gradient) and ``n_modified`` (how many
        ReLU-family ops the method changed on the way to this node), or None without them."""
        if "projection" not in self._g:
            return None
        return {k: _plain(v) for k, v in self._g["projection"].attrs.items()}

    @property
    def bottom(self) -> LayerResult | None:
        """The k most negative entries (v2 ``bottom/``, score ascending) as a LayerResult, or None."""
        if self._g is not self._layer_g or "bottom" not in self._g:
            return None
        return LayerResult(self.result, self.name, self._g["bottom"])

    @property
    def class_mean(self) -> np.ndarray | None:
        """(C, L) float32 class means of the per-image maximum (v2), or None."""
        return self._layer_g["class_mean"][()] if "class_mean" in self._layer_g else None

    @property
    def selectivity(self) -> np.ndarray | None:
        """(C,) float32 class selectivity index (v2), or None."""
        return self._layer_g["selectivity"][()] if "selectivity" in self._layer_g else None

    @property
    def channel_names(self) -> list[str] | None:
        """The channels' names (class names of logits, v2), or None."""
        names = self.attrs.get("channel_names")
        if names is None:
            return None
        return [names] if isinstance(names, str) else [_plain(n) for n in names]

    def heat(self, channel: int) -> np.ndarray:
        """(k, H, W) float16 activation maps of one channel on its top images."""
        return self._g["heat"][channel]

    def stats(self) -> dict[str, np.ndarray]:
        """Per-channel ``count``, ``mean``, ``std``, ``max``, ``quantile`` (C,Q) and ``q`` (Q,)."""
        s = self._g["stats"]
        out = {k: s[k][()] for k in s if isinstance(s[k], h5py.Dataset)}
        out["q"] = s["quantile"].attrs["q"]
        return out

    def class_state(self) -> dict[str, np.ndarray]:
        """The mergeable class-mean state (v2 ``class_state/``, what `patchmine merge` combines;
        `patchmine.labels.ClassMeans.from_state_dict` takes it), or {} without labels."""
        g = self._layer_g
        return {k: v[()] for k, v in g["class_state"].items()} if "class_state" in g else {}

    def stats_state(self) -> dict[str, np.ndarray]:
        """The mergeable statistics state (what `patchmine merge` combines)."""
        s = self._g["stats"]
        return {k: v[()] for k, v in s["state"].items()} if "state" in s else {}

    def records(self, channel: int) -> list[dict]:
        """The used top-k slots of one channel, best first (of a ``bottom`` LayerResult: most
        negative first), as plain dicts: rank, score, image, path, yx, box, box_orig, and
        ``label`` (the image's label name, None without one) and ``channel_name`` (None where
        the layer has no channel names)."""
        labels, names = self.result.image_label, self.result.label_names
        cnames = self.channel_names
        out = []
        for slot in range(self.k):
            i = int(self.image[channel, slot])
            if i < 0:
                break
            out.append(
                {
                    "rank": slot,
                    "score": float(self.score[channel, slot]),
                    "image": i,
                    "path": self.result.image_paths[i],
                    "yx": tuple(int(v) for v in self.yx[channel, slot]),
                    "box": tuple(int(v) for v in self.box[channel, slot]),
                    "box_orig": tuple(float(v) for v in self.box_orig[channel, slot]),
                    "label": (
                        names[int(labels[i])]
                        if labels is not None and names is not None and labels[i] >= 0
                        else None
                    ),
                    "channel_name": cnames[channel] if cnames else None,
                }
            )
        return out

    def __repr__(self) -> str:
        return f"<LayerResult {self.name}: {self.channels} channels, k={self.k}>"


def _plain(v):
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    return v


class Result:
    """A patchmine result file, opened read-only. Use as a context manager or call ``close()``.

    Example:
        >>> with patchmine.open("out.h5") as r:
        ...     layer = r.layer("features.10")
        ...     layer.records(0)[0]["path"], layer.patches(0).shape
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise UsageError(f"no such file: {self.path}")
        try:
            self.file = h5py.File(self.path, "r")
        except OSError as e:
            raise UsageError(f"not an HDF5 file: {self.path} ({e})") from None
        fmt = self.file.attrs.get("format")
        fmt = fmt.decode() if isinstance(fmt, bytes) else fmt
        if fmt != FORMAT:
            self.file.close()
            raise UsageError(f"not a patchmine result file: {self.path}")
        version = int(self.file.attrs.get("version", -1))
        if version not in READS:
            self.file.close()
            raise UsageError(
                f"{self.path} has schema version {version}; this patchmine reads versions "
                + " and ".join(str(v) for v in READS)
            )
        self.attrs = {k: _plain(v) for k, v in self.file.attrs.items()}
        self.layers = list(self.attrs.get("layer_order") or self.file["layers"].keys())
        g = self.file["images"]
        self.image_paths = [p.decode("utf-8") if isinstance(p, bytes) else p for p in g["path"][()]]
        self.image_root = g["root"][()]
        self.image_shape = g["shape"][()]
        self.image_ok = g["ok"][()]
        self.image_transform = g["transform"][()]
        self.image_error = (
            [e.decode("utf-8") if isinstance(e, bytes) else e for e in g["error"][()]]
            if "error" in g
            else [""] * len(self.image_paths)
        )
        self._layers: dict[str, LayerResult] = {}

    @property
    def n_images(self) -> int:
        return len(self.image_paths)

    @property
    def label_names(self) -> list[str] | None:
        """``/labels/names`` (v2, with --labels), or None."""
        if "labels" not in self.file or "names" not in self.file["labels"]:
            return None
        return [_plain(n) for n in self.file["labels"]["names"][()]]

    @property
    def image_label(self) -> np.ndarray | None:
        """(N,) int32 label index of each image, -1 for none (v2), or None."""
        g = self.file["images"]
        return g["label"][()] if "label" in g else None

    def image_file(self, i: int) -> Path:
        """Where image ``i`` was read from (its corpus root joined with its path)."""
        roots = self.attrs["corpus_roots"]
        roots = [roots] if isinstance(roots, str) else roots
        return Path(roots[int(self.image_root[i])]) / self.image_paths[i]

    def layer(self, name: str) -> LayerResult:
        """One layer's results; the error lists the nearest layer names."""
        if name not in self.layers:
            hint = ", ".join(nearest(name, self.layers)) or ", ".join(self.layers)
            raise UnknownNameError(f"{self.path} has no layer {name!r}; nearest: {hint}")
        if name not in self._layers:
            self._layers[name] = LayerResult(self, name)
        return self._layers[name]

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> Result:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Result {self.path}: {self.n_images} images, layers {self.layers}>"


def open_result(path: str | os.PathLike) -> Result:
    """Open a result file for reading (also available as ``patchmine.open``)."""
    return Result(path)


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Atomically save a run's resumable state (tensors, arrays, plain values)."""
    import torch

    path = Path(path)
    buf = io.BytesIO()  # torch.save turns a failed write (full disk) into an opaque RuntimeError
    state = {"checkpoint_version": CHECKPOINT_VERSION, **state}
    torch.save({**state, "digest": _digest(state)}, buf)
    try:
        with _atomic(path, ".ckpt-tmp") as tmp:
            tmp.write_bytes(buf.getbuffer())
    except OSError as e:
        raise _write_error(path, e) from e


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
