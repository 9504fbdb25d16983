"""Writing result files (HDF5 schema version 2): the only module that writes HDF5.

Public names: write_result, replace_projections. Re-exported, so that ``patchmine.store`` stays the
one name to import: FORMAT, VERSION, LayerData, layer_data, class_state_arrays, label_table,
run_attrs, image_table (what a file holds: `patchmine.contents`), Result, LayerResult, open_result
(reading one: `patchmine.results`), save_checkpoint, load_checkpoint, load_plain
(`patchmine.checkpoints`), check_writable, WriteError (`patchmine.outputs`).

Every write is atomic: data goes to a temporary file beside the target, which is renamed over it only
when complete, so a reader sees a whole file or none.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import h5py
import numpy as np

from patchmine.checkpoints import load_checkpoint, load_plain, save_checkpoint
from patchmine.contents import (
    FORMAT,
    VERSION,
    LayerData,
    class_state_arrays,
    image_table,
    label_table,
    layer_data,
    run_attrs,
)
from patchmine.deflate import write_rows
from patchmine.outputs import WriteError, atomic, check_writable, write_error
from patchmine.results import LayerResult, Result, open_result

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

_STR = h5py.string_dtype("utf-8")
# gzip level of the patch datasets and /thumbs. Measured on 60 photos (_blocks.4.add,
# _blocks.10.add, the _fc thumbs): level 1 gives 14.6 MB in 0.9 s, level 4 14.6 MB in 1.1 s, level 9
# 14.4 MB in 2.4 s (uncompressed 34.4 MB): photographs gain nothing from the slower levels.
_GZIP = 1


def _set_attrs(obj: h5py.HLObject, attrs: dict) -> None:
    """Set ``attrs`` on ``obj``; a value of None deletes the attribute."""
    for key, value in attrs.items():
        if value is None:
            if key in obj.attrs:
                del obj.attrs[key]
        elif isinstance(value, str):
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
    with _new_file(path) as f:
        _write_file(f, attrs, images, layers, should_stop, labels)
    return path


@contextlib.contextmanager
def _new_file(path: Path) -> Iterator[h5py.File]:
    """A new HDF5 file that replaces ``path`` atomically once the block ends without error.

    An error or interruption in the block abandons it (nothing appears at ``path``); a failed
    write (a full disk) raises `WriteError`, with ``stuck`` set when HDF5 could not close the file.
    """
    closed = True
    try:
        with atomic(path) as tmp:
            # HDF5 1.8 object headers (attributes over 64 KiB), nothing newer than 1.10: with
            # "latest", HDF5 2.0 encodes bool and float16 in forms 1.10-era tools cannot read
            f = h5py.File(tmp, "w", libver=("v108", "v110"))
            fd = f.id.get_vfd_handle()
            try:
                yield f
                f.flush()  # a full disk shows here, while the file can still be abandoned cleanly
                f.close()
            except BaseException:
                closed = _abandon(f, fd, tmp)
                raise
    except (OSError, RuntimeError) as e:  # h5py reports a failed flush as RuntimeError
        if isinstance(e, RuntimeError) and "errno = " not in str(e):
            raise
        err = write_error(path, e)
        err.stuck = not closed
        raise err from e


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

    def rows():
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
                patches = d.patch[c]
                for r, e in zip(row[chans == c].tolist(), first[chans == c].tolist(), strict=True):
                    yield r, patches[e % k]

    write_rows(patch, rows(), should_stop)
    return ids


def _gzip() -> dict:
    return {"compression": "gzip", "compression_opts": _GZIP}


def _border_share(d: LayerData, size: int | None) -> float | None:
    """The fraction of the used slots whose box crosses the input edge (NaN with none)."""
    if size is None:
        return None
    from patchmine.geometry import crosses_edge

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
    for ds, values in ((patch, d.patch), (heat, d.heat), (proj, d.projection)):
        if ds is not None:
            write_rows(ds, ((ch, values[ch]) for ch in range(c)), should_stop)
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
        root_attrs: root attributes to set (or overwrite; None: delete), e.g. ``projection``.
        layers: node name (``NAME/bottom`` for a bottom-k) -> (projection (C, k, P, P, 3)
            float16, indexable by channel; its dataset attributes). Others keep no projection.

    Raises:
        WriteError: the file could not be written; ``path`` is left as it was.
    """
    path = Path(path)
    with _new_file(path) as f, h5py.File(path, "r") as src:
        skip = set()
        for name in src["layers"]:
            for where in (f"/layers/{name}", f"/layers/{name}/bottom"):
                if where in src:
                    skip.add(f"{where}/projection")
        _copy_without(src, f, skip)
        _set_attrs(f, root_attrs)
        for name, (proj, attrs) in layers.items():
            ds = _projection_dataset(f["layers"][name], proj.shape, attrs)
            write_rows(ds, ((ch, proj[ch]) for ch in range(proj.shape[0])), should_stop)
    return path
