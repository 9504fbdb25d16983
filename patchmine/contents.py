"""What a result file holds (HDF5 schema version 2), in memory, and its assembly from a run.

Public names: FORMAT, VERSION, READS, LayerData, layer_data, class_state_arrays, label_table,
run_attrs, image_table, projection_attrs, run_layers, run_tables.

`patchmine.store` writes what is assembled here, `patchmine.results` reads it back. `run_layers`
and `run_tables` assemble a finished `patchmine.mine.Miner`'s file: every layer's winners with
their boxes, patches, heat maps, statistics, class means and projections, the root attributes and
the image and label tables of its slice of the corpus.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from patchmine.corpus import Corpus
    from patchmine.geometry import Field
    from patchmine.mine import Miner
    from patchmine.models import LoadedModel
    from patchmine.patches import LayerPlan, Scratch
    from patchmine.projections import Projector

__all__ = [
    "FORMAT",
    "VERSION",
    "READS",
    "LayerData",
    "layer_data",
    "class_state_arrays",
    "label_table",
    "run_attrs",
    "image_table",
    "projection_attrs",
    "run_layers",
    "run_tables",
]

FORMAT = "patchmine"
VERSION = 2  # v2: /thumbs and patch_ref (whole-field nodes), border_share, min_inside, layouts
READS = (1, 2)  # the schema versions this patchmine reads


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
    from patchmine.geometry import boxes, to_original  # torch: only writers pay for it

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


def projection_attrs(projector: Projector, node: str) -> dict:
    """The attributes of a layer's ``projection`` dataset: the method and the ops it modified."""
    return {"method": projector.method, "n_modified": projector.modified(node)}


def run_layers(
    miner: Miner,
    plans: list[LayerPlan],
    cut: dict[str, tuple[np.ndarray, np.ndarray, Scratch | None]],
    projector: Projector | None = None,
) -> dict[str, LayerData]:
    """Every layer of a run's file, from its ``plans`` and what the second pass ``cut`` for each
    (patches, heat maps, projections made by ``projector``); a bottom-k plan (``--bottom-k``)
    goes into its layer's ``bottom``. The run's class means must hold every image."""
    bottoms = {p.name: (p, *cut[p.key]) for p in plans if p.bottom}
    return {
        p.name: _run_layer(miner, p, *cut[p.key], bottom=bottoms.get(p.name), projector=projector)
        for p in plans
        if not p.bottom
    }


def _run_layer(
    miner: Miner,
    plan: LayerPlan,
    patch: np.ndarray,
    heat: np.ndarray,
    projection: Scratch | None = None,
    bottom: tuple[LayerPlan, np.ndarray, np.ndarray, Scratch | None] | None = None,
    projector: Projector | None = None,
) -> LayerData:
    """One layer's datasets for the file, with image indices local to the run's slice.

    ``bottom``: the layer's bottom-k plan with its patches, heat maps and projections
    (``--bottom-k``); ``projection``: the top-k's projections, made by ``projector``.
    """
    import torch

    st = miner.stats[plan.name]
    data = layer_data(
        plan,
        patch,
        heat,
        stats={key: v.cpu().numpy() for key, v in st.result().items()},
        stats_state={
            key: v.cpu().numpy()
            for key, v in st.state_dict().items()
            if isinstance(v, torch.Tensor)
        },
        transform=miner.transform,
        start=miner.start,
    )
    if bottom is not None:
        *entries, bottom_projection = bottom
        data.bottom = layer_data(
            *entries, stats={}, stats_state={}, transform=miner.transform, start=miner.start
        )
        if bottom_projection is not None and projector is not None:
            data.bottom.projection = bottom_projection
            data.bottom.projection_attrs = projection_attrs(projector, plan.name)
    if plan.name in miner.channel_names:
        data.attrs["channel_names"] = list(miner.channel_names[plan.name])
    if miner.classes:
        cm = miner.classes[plan.name]
        mean, sel = cm.result()
        data.class_mean, data.selectivity = mean.numpy(), sel.numpy()
        data.class_state = class_state_arrays(cm.state_dict())
    data.attrs["node"] = miner.nodes.get(plan.name, plan.name)
    if projection is not None and projector is not None:
        data.projection = projection
        data.projection_attrs = projection_attrs(projector, plan.name)
    return data


def run_tables(miner: Miner) -> tuple[dict, dict, dict | None]:
    """A run's root attributes, ``/images`` and ``/labels`` (None without ``--labels``) for its
    slice ``start:stop``, as `patchmine.store.write_result` takes them."""
    rows = range(miner.start, miner.stop)
    attrs = run_attrs(
        miner.model,
        miner.corpus,
        layers=miner.layers,
        input_size=miner.input_size,
        resize=miner.resize,
        jpeg_draft=miner.jpeg_draft,
        k=miner.k,
        per_image=miner.per_image,
        rows=rows,
        n_failed=int((~miner.ok[rows.start : rows.stop]).sum()),
        shard=miner.shard,
        min_inside=miner.min_inside,
    )
    attrs["bottom_k"] = miner.bottom_k
    records = {
        "shape": miner.shape,
        "ok": miner.ok,
        "transform": miner.transform,
        "error": miner.error,
    }
    if miner.projection is not None:
        attrs["projection"] = miner.projection
        if miner.projection_subset is not None:
            attrs["projection_layers"] = miner.projection_subset
    labels = None
    if miner.labels is not None:
        attrs["labels"] = miner.labels.spec
        records["label"] = miner.labels.label.numpy()
        labels = label_table(
            miner.labels.names,
            records["label"][rows.start : rows.stop],
            miner.ok[rows.start : rows.stop],
        )
    return {**attrs, **miner.extra_attrs}, image_table(miner.corpus, records, rows), labels
