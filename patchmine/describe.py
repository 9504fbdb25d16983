"""What ``patchmine layers`` and ``patchmine info`` print, as lines of text.

Public names: layer_table, result_summary. Both return lists of lines, so that a notebook can
show them as the command line does.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

__all__ = ["layer_table", "result_summary"]


def layer_table(model: str | None, input_size: int = 224, modules: bool = False) -> list[str]:
    """A model's minable nodes (or, with ``modules``, its blocks) with output shape, receptive
    field and layout; ``*`` marks the default layers.

    The table is the architecture's: the model is built without weights, so nothing is
    downloaded.
    """
    from patchmine.models import load_model
    from patchmine.taps import default_layers, layer_names, module_outputs
    from patchmine.tokens import minable

    lm = load_model(model, "none", input_size)
    found = minable(lm.module, input_size)  # nodes without a field are left out
    shapes, fields = found.shapes, found.fields
    defaults = set(lm.default_layers or default_layers(shapes))
    blocks_of = {  # the blocks (modules that hold others) -> their output nodes, in module order
        m: node
        for m, node in module_outputs(layer_names(lm.module)).items()
        if m != node and node in shapes
    }
    blocks: dict[str, list[str]] = {}  # node -> the blocks it is the output of
    for m, node in blocks_of.items():
        blocks.setdefault(node, []).append(m)

    def pair(v: tuple[int, int]) -> str:
        return str(v[0]) if v[0] == v[1] else f"{v[0]}x{v[1]}"

    def columns(name: str) -> tuple[str, ...]:
        f = fields[name]
        out = "(" + ",".join(str(s) for s in shapes[name]) + ")"
        layout = f.layout
        if f.grid is not None:
            layout += f" {f.prefix}+{f.grid[0]}x{f.grid[1]}"
        elif f.prefix:
            layout = f"{f.prefix} prefix token" + "s" * (f.prefix > 1)
        if f.unit is not None and f.whole:
            layout += f" (token {pair(f.unit.size)}/{pair(f.unit.stride)})"
        if f.whole:
            return out, "whole", "-", "-", layout
        return out, pair(f.size), pair(f.stride), pair(f.offset), layout

    mark = {True: "*", False: ""}
    head = ("output (C,H,W)", "rf size", "stride", "offset", "layout")
    if modules:
        rows = [("", "module", "node", *head)]
        rows += [(mark[node in defaults], m, node, *columns(node)) for m, node in blocks_of.items()]
    else:
        rows = [("", "node", *head, "module")]
        rows += [
            (mark[name in defaults], name, *columns(name), ", ".join(blocks.get(name, ())))
            for name in shapes
        ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [
        f"# {lm.name}  input={input_size}x{input_size}  (architecture only: no weights are loaded)",
        "# * mined when --layers is not given; a module name means its output node",
    ] + ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def result_summary(path: str | os.PathLike) -> list[str]:
    """What a result file holds: the run's settings and provenance, labels, each layer's map,
    field, border share, channel names and selectivity, and the first unreadable images."""
    from patchmine.store import open_result

    with open_result(path) as r:
        a = r.attrs
        lines = [f"{r.path}: patchmine result, schema version {a['version']}"]
        resize = f" (resize {a['resize']})" if "resize" in a else ""
        lines.append(
            f"  model      {a['model']}  weights={a['weights']}  input={a['input_size']}{resize}"
        )
        inside = f"  min_inside={a['min_inside']:g}" if "min_inside" in a else ""
        bottom = "  bottom-k too" if a.get("bottom_k") else ""
        lines.append(f"  top-k      k={a['k']}  per_image={a['per_image']}{inside}{bottom}")
        roots = a["corpus_roots"] if isinstance(a["corpus_roots"], list) else [a["corpus_roots"]]
        lines.append(
            f"  images     {a['n_images']} ({a['n_failed']} unreadable)  roots: " + ", ".join(roots)
        )
        if "shard" in a:
            lines.append(f"  shard      {a['shard'][0]}/{a['shard'][1]}")
        lines.append(
            f"  made       {a['created_utc']} by patchmine {a['patchmine_version']}, "
            f"torch {a['torch_version']}, torchvision {a['torchvision_version']}"
        )
        if "allocator" in a:
            lines.append(f"  allocator  {a['allocator']}")
        if "projection" in a:
            only = a.get("projection_layers")
            where = f"; layers {', '.join(only)}" if only is not None else ""
            lines.append(f"  projection {a['projection']} (per entry, beside each patch{where})")
        names = r.label_names
        if names is not None:
            count = r.file["labels"]["count"][()]
            unlabelled = int((r.image_label < 0).sum())
            shown = ", ".join(f"{n} {c}" for n, c in zip(names[:8], count[:8], strict=False))
            more = f", ... ({len(names) - 8} more)" if len(names) > 8 else ""
            lines.append(
                f"  labels     {len(names)} from {a.get('labels', '?')}; images per label: "
                f"{shown}{more}; {unlabelled} unlabelled"
            )
        lines.append(
            "  layers     (border: the share of kept entries whose field crosses the input edge)"
        )
        for name in r.layers:
            lr = r.layer(name)
            la = lr.attrs
            fh = "x".join(str(v) for v in la["fmap_hw"])
            rf = f"rf {la['rf_size'][0]} stride {la['rf_stride'][0]} offset {la['rf_offset'][0]}"
            if la.get("rf_whole"):
                rf = "whole input"
            share = la.get("border_share")  # NaN for a layer without entries
            edge = "" if share is None or share != share else f"  border {100 * share:.0f}%"
            node = la.get("node", name)
            node = f"  (node {node})" if node != name else ""
            lines.append(
                f"    {name:<28} {lr.channels:>5} ch  {fh:>7}  {rf}  patch {lr.patch_size}px"
                f"{edge}{node}"
            )
            lines += [f"      {line}" for line in _layer_notes(lr, names)]
        fails = [
            (p, e)
            for p, e, ok in zip(r.image_paths, r.image_error, r.image_ok, strict=True)
            if not ok
        ]
        lines += [f"  unreadable {p}: {e}" for p, e in fails[:10]]
    return lines


def _channel_title(c: int, names: Sequence[str] | None) -> str:
    """ "channel 967 - espresso" where the layer has channel names, else "channel 967"."""
    return f"channel {c} - {names[c]}" if names else f"channel {c}"


def _layer_notes(lr, label_names: Sequence[str] | None) -> list[str]:
    """`result_summary`'s lines on a layer's channel names and class selectivity."""
    import numpy as np

    cnames = lr.channel_names
    lines = []
    if cnames:
        ends = ", ".join(_channel_title(c, cnames) for c in (0, 1))
        lines.append(f"channel names: {ends}, ..., {_channel_title(len(cnames) - 1, cnames)}")
    sel, mean = lr.selectivity, lr.class_mean
    if sel is not None and label_names is not None:
        ok = ~np.isnan(sel)
        if ok.any():
            c = int(np.argmax(np.where(ok, sel, -np.inf)))
            best = label_names[int(np.argmax(np.where(np.isnan(mean[c]), -np.inf, mean[c])))]
            lines.append(
                f"selectivity median {np.median(sel[ok]):.3f}, max {sel[c]:.3f} at "
                f"{_channel_title(c, cnames)} (prefers {best!r}); {int((~ok).sum())} undefined"
            )
        else:
            lines.append("selectivity undefined on every channel (fewer than two labels?)")
    return lines
